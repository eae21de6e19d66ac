"""Bad inputs fail with errors naming the leaf; edge cases give sensible numbers."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
from orthax.polar import PRESETS
from checkpoints import orbax_round_trip

MDN = orthax.MuonDimensionNumbers


def _normal(seed, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


def _names(path, shape):
  """A regex matching a message that contains both the key path and the shape."""
  return rf"(?s)(?=.*{re.escape(path)})(?=.*{re.escape(str(tuple(shape)))})"


def _update(tx, g):
  return tx.update(g, tx.init(g), g)


# --------------------------------------------------------------------------
# Errors


_PARAMS = {"layer": {"w": jnp.ones((4, 6)), "b": jnp.ones(6)},
           "conv": jnp.ones((3, 3, 4, 5))}


@pytest.mark.parametrize("make", [
    orthax.orthogonalize, orthax.neuron_normalize, orthax.scale_by_shape])
@pytest.mark.parametrize("tree, path, shape", [
    ({"layer": {"b": jnp.ones(6)}}, "['layer']['b']", (6,)),
    ({"s": jnp.ones(())}, "['s']", ()),
    ({"conv": jnp.ones((3, 3, 4, 5))}, "['conv']", (3, 3, 4, 5)),  # no dimension numbers
])
def test_non_matrix_leaf_is_named(make, tree, path, shape):
  with pytest.raises(ValueError, match=_names(path, shape)):
    _update(make(), tree)


def test_explicit_dimension_numbers_on_1d_leaf():
  tx = orthax.orthogonalize(dimension_numbers=MDN(0, 1))
  with pytest.raises(ValueError, match=_names("['b']", (6,))):
    tx.update({"b": jnp.ones(6)}, None)


@pytest.mark.parametrize("dn, what", [
    (MDN(reduction_axis=4, output_axis=3), "reduction_axis=4 is out of range"),
    (MDN(reduction_axis=2, output_axis=-5), "output_axis=-5 is out of range"),
    (MDN(reduction_axis=(0, 2), output_axis=2), "overlap"),
    (MDN(reduction_axis=(1, -3), output_axis=3), "repeats an axis"),
])
@pytest.mark.parametrize("make", [
    orthax.orthogonalize, orthax.neuron_normalize, orthax.scale_by_shape])
def test_bad_dimension_numbers_are_named(make, dn, what):
  tx = make(dimension_numbers={"layer": None, "conv": dn})
  tree = {"layer": {"w": jnp.ones((4, 6))}, "conv": jnp.ones((3, 3, 4, 5))}
  with pytest.raises(ValueError, match=_names("['conv']", (3, 3, 4, 5))) as e:
    _update(tx, tree)
  assert what in str(e.value)


@pytest.mark.parametrize("dn, path", [
    ({"layer": {"w": None}, "conv": MDN(2, 3)}, "['layer']"),  # missing 'b'
    ({"layer": None, "conv": {"kernel": MDN(2, 3)}}, "['conv']"),
    ([MDN(2, 3)], ""),
])
def test_dimension_number_tree_mismatch(dn, path):
  with pytest.raises(ValueError, match=r"(?s)does not match the updates.*" + re.escape(path)):
    orthax.orthogonalize(dimension_numbers=dn).update(_PARAMS, None)


def test_dimension_number_tree_mismatch_in_muon():
  tx = orthax.muon(0.1, routing={"layer": "auto"})
  with pytest.raises(ValueError, match="does not match the params"):
    tx.init(_PARAMS)


@pytest.mark.parametrize("make", [
    lambda: orthax.orthogonalize(coeffs="nope"),
    lambda: orthax.muon(0.1, coeffs="nope"),
    lambda: orthax.normuon(0.1, coeffs="nope"),
])
def test_unknown_preset(make):
  with pytest.raises(ValueError, match=r"preset 'nope'.*'muon', 'polar_express'"):
    make()


def test_unknown_backend_preconditioning_mode_axis():
  with pytest.raises(ValueError, match=r"backend 'triton'.*\('auto', 'xla', 'pallas'\)"):
    orthax.orthogonalize(backend="triton")
  with pytest.raises(ValueError, match="preconditioning 'newton'.*'aol'"):
    orthax.orthogonalize(preconditioning="newton")
  with pytest.raises(ValueError, match="adaptive must be one of"):
    orthax.orthogonalize(adaptive="matrix")
  with pytest.raises(ValueError, match="adaptive must be one of"):
    orthax.orthogonalize(adaptive=1)
  with pytest.raises(ValueError, match="norm_margin must be in"):
    orthax.orthogonalize(norm_margin=0.0)
  with pytest.raises(ValueError, match="leave them None"):
    orthax.orthogonalize(coeffs="svd", preconditioning="aol")
  with pytest.raises(ValueError, match="gram must be True, False or 'auto', got 'yes'"):
    orthax.orthogonalize(gram="yes")
  with pytest.raises(ValueError, match="gram=True needs Newton-Schulz coefficients"):
    orthax.orthogonalize(coeffs="svd", gram=True)
  with pytest.raises(ValueError, match=re.escape("gram_restart must be in [1, inf), got 0")):
    orthax.orthogonalize(gram_restart=0)
  with pytest.raises(ValueError, match="scale_by_shape mode 'adam'"):
    orthax.scale_by_shape("adam")
  with pytest.raises(ValueError, match="neuron_normalize axis 'rows'"):
    orthax.normuon(0.1, neuron_axis="rows")


@pytest.mark.parametrize("coeffs, steps, match", [
    (np.ones((5, 4)), None, re.escape("got shape (5, 4)")),
    (np.ones(2), None, re.escape("got shape (2,)")),
    (np.ones((0, 3)), None, re.escape("got shape (0, 3)")),
    (np.ones((2, 3, 3)), None, re.escape("got shape (2, 3, 3)")),
    ([[1.0, np.nan, 0.0]], None, "must be finite"),
    ("muon", 0, re.escape("steps must be in [1, inf), got 0")),
])
def test_bad_coefficients(coeffs, steps, match):
  with pytest.raises(ValueError, match=match):
    orthax.orthogonalize(coeffs=coeffs, steps=steps)


def test_integer_leaves_are_named():
  ints = {"w": jnp.ones((2, 3), jnp.int32), "f": jnp.ones((2, 3))}
  pattern = _names("['w']", (2, 3)) + "(?=.*int32)"
  with pytest.raises(TypeError, match=pattern):
    orthax.momentum().init(ints)
  floats = {"w": jnp.ones((2, 3)), "f": jnp.ones((2, 3))}
  with pytest.raises(TypeError, match=pattern):
    orthax.momentum().update(ints, orthax.momentum().init(floats))
  with pytest.raises(TypeError, match=pattern):
    orthax.orthogonalize().update(ints, None)
  with pytest.raises(TypeError, match=pattern):
    orthax.neuron_normalize().init(ints)


def test_bad_labels_in_muon():
  labels = {"layer": {"w": "matrix", "b": "adam"}, "conv": "adamw"}
  with pytest.raises(ValueError, match=_names("['layer']['b']", (6,)) + "(?=.*'adam')"):
    orthax.muon(0.1, routing=labels).init(_PARAMS)
  with pytest.raises(ValueError, match=r"(?s)does not match the params.*tree\['layer'\].*b w"):
    orthax.muon(0.1, routing=lambda p: {"layer": {"w": "matrix"}, "conv": "adamw"}
                ).init(_PARAMS)
  # A 1-D leaf routed to the matrices fails at init, named, with the way out.
  as_matrix = {"layer": {"w": True, "b": True}, "conv": False}
  for make in (orthax.muon, orthax.normuon):
    with pytest.raises(ValueError, match=_names("['layer']['b']", (6,))
                       + ".*MuonDimensionNumbers"):
      make(0.1, routing=as_matrix).init(_PARAMS)


def _first_update(tx, params, grads):
  return tx.update(grads, tx.init(params), params)


@pytest.mark.parametrize("dn", [
    MDN(np.int64(1), np.int32(2)),
    MDN((np.int64(1),), (np.int16(-1),)),
    MDN([np.int64(1)], 2),
])
@pytest.mark.parametrize("make", [
    orthax.orthogonalize, orthax.neuron_normalize, orthax.scale_by_shape])
def test_numpy_integer_axes_are_accepted(make, dn):
  g = {"w": _normal(0, (3, 4, 5))}
  got = _update(make(dimension_numbers=dn), g)[0]["w"]
  want = _update(make(dimension_numbers=MDN(1, 2)), g)[0]["w"]
  np.testing.assert_array_equal(got, want)


def test_numpy_integer_axes_in_muon():
  params = {"w": _normal(0, (3, 4, 5)), "b": _normal(1, (5,))}
  dn = {"w": MDN(np.int64(1), np.int64(2)), "b": "adamw"}
  got = _first_update(orthax.muon(0.1, routing=dn), params, params)[0]
  want = _first_update(orthax.muon(0.1, routing={"w": MDN(1, 2), "b": "adamw"}),
                       params, params)[0]
  jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("dn, what", [
    (MDN(1.0, 2), "reduction_axis=1.0"),
    (MDN(None, 2), "reduction_axis=None"),
    (MDN(1, (2.0,)), "output_axis=(2.0,)"),
    (MDN(True, 2), "reduction_axis=True"),
])
@pytest.mark.parametrize("make", [
    orthax.orthogonalize, orthax.neuron_normalize, orthax.scale_by_shape])
def test_non_integer_axes_are_named(make, dn, what):
  tree = {"layer": {"w": jnp.ones((4, 6))}, "conv": jnp.ones((3, 4, 5))}
  tx = make(dimension_numbers={"layer": None, "conv": dn})
  with pytest.raises(TypeError, match=_names("['conv']", (3, 4, 5)) + "(?=.*integer)") as e:
    _update(tx, tree)
  assert what in str(e.value)


@pytest.mark.parametrize("make", [orthax.muon, orthax.normuon])
@pytest.mark.parametrize("leaf, grad_shape", [
    ("w", (6, 4)),     # a hidden matrix, transposed
    ("w", (1, 6)),     # ... or one that would broadcast
    ("bias", (1, 6)),  # an AdamW leaf
])
def test_gradient_of_another_shape_is_named(make, leaf, grad_shape):
  params = {"w": _normal(0, (4, 6)), "bias": _normal(1, (6,))}
  grads = {**params, leaf: _normal(2, grad_shape)}
  shape = params[leaf].shape
  pattern = _names(f"['{leaf}']", grad_shape) + f"(?=.*{re.escape(str(shape))})"
  with pytest.raises(ValueError, match=pattern):
    _first_update(make(0.1), params, grads)


def test_neuron_normalize_update_of_another_fan_in_is_named():
  """The state holds one entry per output neuron, so another fan_in is seen
  through the params (or, with axis="input", through the state)."""
  params = {"w": _normal(0, (4, 6))}
  other = {"w": _normal(1, (5, 6))}
  tx = orthax.neuron_normalize()
  with pytest.raises(ValueError, match=_names("['w']", (5, 6)) + r"(?=.*\(4, 6\))"):
    tx.update(other, tx.init(params), params)
  tx = orthax.neuron_normalize(axis="input")
  with pytest.raises(ValueError, match=_names("['w']", (1, 5)) + r"(?=.*\(1, 4\))"):
    tx.update(other, tx.init(params))


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_float8_leaves_are_named(dtype):
  tree = {"w": jnp.ones((4, 6), dtype), "f": jnp.ones((4, 6))}
  pattern = (_names("['w']", (4, 6)) + f"(?=.*{jnp.dtype(dtype).name})"
             "(?=.*float32, bfloat16, float16 or float64)")
  for call in (lambda: orthax.orthogonalize().update(tree, None),
               lambda: orthax.momentum().init(tree),
               lambda: orthax.neuron_normalize().init(tree),
               lambda: orthax.scale_by_shape().update(tree, None),
               lambda: orthax.muon(0.1).init(tree),
               lambda: orthax.normuon(0.1).init(tree),
               lambda: orthax.pion(0.1).init(tree)):
    with pytest.raises(TypeError, match=pattern):
      call()


@pytest.mark.parametrize("make", [orthax.muon, orthax.normuon, orthax.pion])
@pytest.mark.parametrize("leaf", [
    jnp.arange(3), jnp.ones(3, bool), jnp.zeros((), jnp.int32),
    jnp.ones((2, 3), jnp.int8)])
def test_non_float_leaves_are_named_by_the_optimizers(make, leaf):
  """Not routed to AdamW (whose integer update apply_updates truncates)."""
  params = {"w": _normal(0, (4, 6)), "step": leaf}
  pattern = _names("['step']", leaf.shape) + f"(?=.*{leaf.dtype.name})"
  with pytest.raises(TypeError, match=pattern):
    make(0.1).init(params)
  floats = {**params, "step": jnp.zeros(leaf.shape)}
  tx = make(0.1)
  with pytest.raises(TypeError, match=pattern):
    tx.update(params, tx.init(floats), floats)


@pytest.mark.parametrize("make, arg, match", [
    (lambda: orthax.momentum(beta=1.0), "beta", r"\[0, 1\)"),
    (lambda: orthax.momentum(beta=-0.1), "beta", r"\[0, 1\)"),
    (lambda: orthax.momentum(beta=1.5), "beta", r"\[0, 1\)"),
    (lambda: orthax.momentum(beta=np.nan), "beta", "finite"),
    (lambda: orthax.neuron_normalize(beta2=2), "beta2", r"\[0, 1\)"),
    (lambda: orthax.neuron_normalize(eps=-1e-10), "eps", r"\[0, inf\)"),
    (lambda: orthax.orthogonalize(eps=-1e-7), "eps", r"\[0, inf\)"),
    (lambda: orthax.orthogonalize(steps=0), "steps", r"\[1, inf\)"),
    (lambda: orthax.orthogonalize(gram_restart=0), "gram_restart", r"\[1, inf\)"),
    (lambda: orthax.scale_by_shape("rms", rms=-1), "rms", r"\(0, inf\)"),
    (lambda: orthax.scale_by_shape("rms", rms=0.0), "rms", r"\(0, inf\)"),
    (lambda: orthax.muon(0.1, beta=1.0), "beta", r"\[0, 1\)"),
    (lambda: orthax.muon(0.1, eps=-1.0), "eps", r"\[0, inf\)"),
    (lambda: orthax.muon(0.1, weight_decay=-0.01), "weight_decay", r"\[0, inf\)"),
    (lambda: orthax.muon(0.1, adam_b1=1.0), "adam_b1", r"\[0, 1\)"),
    (lambda: orthax.muon(0.1, adam_b2=-0.5), "adam_b2", r"\[0, 1\)"),
    (lambda: orthax.muon(0.1, adam_eps=-1e-8), "adam_eps", r"\(0, inf\)"),
    (lambda: orthax.muon(0.1, adam_eps=0.0), "adam_eps", r"\(0, inf\)"),
    (lambda: orthax.muon(0.1, adam_weight_decay=-1.0), "adam_weight_decay",
     r"\[0, inf\)"),
    (lambda: orthax.normuon(0.1, beta2=1.0), "beta2", r"\[0, 1\)"),
    (lambda: orthax.normuon(0.1, neuron_eps=-1.0), "eps", r"\[0, inf\)"),
    (lambda: orthax.normuon(0.1, weight_decay=-0.01), "weight_decay", r"\[0, inf\)"),
])
def test_hyperparameters_out_of_range(make, arg, match):
  with pytest.raises(ValueError, match=rf"{arg} must be .*{match}"):
    make()


@pytest.mark.parametrize("make, arg", [
    (lambda: orthax.momentum(nesterov=1), "nesterov"),
    (lambda: orthax.momentum(beta="0.9"), "beta"),
    (lambda: orthax.orthogonalize(steps=2.5), "steps"),
    (lambda: orthax.orthogonalize(gram_restart=1.0), "gram_restart"),
    (lambda: orthax.orthogonalize(eps=None), "eps"),
    (lambda: orthax.scale_by_shape("rms", rms=None), "rms"),
    (lambda: orthax.muon(0.1, adam_b1=None), "adam_b1"),
])
def test_hyperparameters_of_the_wrong_type(make, arg):
  with pytest.raises(TypeError, match=f"{arg} must be"):
    make()


_MATRIX = {"w": (4, 6)}
_MIXED = {"w": (4, 6), "bias": (6,)}


@pytest.mark.parametrize("numpy_made, python_made, shapes", [
    (lambda: orthax.momentum(np.float32(0.5), nesterov=np.bool_(False)),
     lambda: orthax.momentum(0.5, nesterov=False), _MIXED),
    (lambda: orthax.orthogonalize(steps=np.int64(3), gram=np.bool_(True),
                                  gram_restart=np.int32(1), eps=np.float64(0.0)),
     lambda: orthax.orthogonalize(steps=3, gram=True, gram_restart=1, eps=0.0),
     _MATRIX),
    (lambda: orthax.orthogonalize(coeffs="svd", gram=np.bool_(False)),
     lambda: orthax.orthogonalize(coeffs="svd", gram=False), _MATRIX),
    (lambda: orthax.neuron_normalize(np.float64(0.5), np.float32(0.0)),
     lambda: orthax.neuron_normalize(0.5, 0.0), _MATRIX),
    (lambda: orthax.scale_by_shape("rms", rms=np.float32(0.5)),
     lambda: orthax.scale_by_shape("rms", rms=0.5), _MATRIX),
    (lambda: orthax.muon(0.1, beta=np.float64(0.5), nesterov=np.bool_(False),
                         steps=np.int64(3), weight_decay=np.float32(0.5),
                         adam_b1=np.float64(0.5), adam_eps=np.float64(1e-3)),
     lambda: orthax.muon(0.1, beta=0.5, nesterov=False, steps=3,
                         weight_decay=0.5, adam_b1=0.5, adam_eps=1e-3), _MIXED),
])
def test_numpy_scalars_are_accepted(numpy_made, python_made, shapes):
  """NumPy numbers and np.bool_ give what the Python ones give."""
  tx, ref = numpy_made(), python_made()
  params = {k: _normal(i, s) for i, (k, s) in enumerate(shapes.items())}
  state, ref_state = tx.init(params), ref.init(params)
  for step in range(2):
    g = {k: _normal(10 + 2 * step + i, s) for i, (k, s) in enumerate(shapes.items())}
    u, state = tx.update(g, state, params)
    want, ref_state = ref.update(g, ref_state, params)
    jax.tree.map(np.testing.assert_array_equal, u, want)


@pytest.mark.parametrize("make", [orthax.muon, orthax.normuon])
def test_restored_state_of_other_labels_is_named(make, tmp_path):
  """A checkpoint of an optimizer that sent the embedding to AdamW, restored
  into one whose routing makes it a matrix: orbax fills the missing
  momentum (and NorMuon statistic) with None, and the first update names
  the leaf instead of failing on None."""
  params = {"embedding": _normal(0, (10, 8)), "hidden": _normal(1, (8, 16)),
            "bias": _normal(2, (16,))}
  grads = jax.tree.map(lambda x: 0.5 * x, params)
  old = make(0.02)
  moved = make(0.02, routing=lambda p: {"embedding": "matrix",
                                         "hidden": "matrix", "bias": "adamw"})
  _, state = _first_update(old, params, grads)
  restored = orbax_round_trip(tmp_path / "ckpt", {"opt_state": state},
                              {"opt_state": moved.init(params)})["opt_state"]
  pattern = _names("['embedding']", (10, 8)) + "(?=.*does not match this optimizer)"
  with pytest.raises(ValueError, match=pattern):
    moved.update(grads, restored, params)


def test_state_of_another_shape_is_named():
  params = {"w": _normal(0, (4, 6))}
  other = {"w": _normal(1, (6, 4))}
  for tx in (orthax.momentum(), orthax.neuron_normalize()):
    with pytest.raises(ValueError, match=r"\['w'\].*does not match this optimizer"):
      tx.update(other, tx.init(params))


# --------------------------------------------------------------------------
# Zero gradients


_ZERO_TXS = {
    "momentum": orthax.momentum(),
    **{f"orthogonalize-{c}": orthax.orthogonalize(coeffs=c)
       for c in ("muon", "polar_express", "you", "svd")},
    "orthogonalize-bf16": orthax.orthogonalize(compute_dtype=jnp.bfloat16),
    **{f"neuron_normalize-{a}": orthax.neuron_normalize(axis=a)
       for a in ("output", "input", "larger")},
    "scale_by_shape-muon": orthax.scale_by_shape("muon"),
    "scale_by_shape-rms": orthax.scale_by_shape("rms"),
    "muon": orthax.muon(0.1, weight_decay=0.0),
    "normuon": orthax.normuon(0.1, weight_decay=0.0),
    # eps = 0 must not turn 0 / 0 into NaN
    "orthogonalize-eps0": orthax.orthogonalize(eps=0.0),
    "orthogonalize-gram-eps0": orthax.orthogonalize(eps=0.0, gram=True),
    "neuron_normalize-eps0": orthax.neuron_normalize(eps=0.0),
    "normuon-eps0": orthax.normuon(0.1, weight_decay=0.0, eps=0.0,
                                   neuron_eps=0.0),
}


@pytest.mark.parametrize("name", list(_ZERO_TXS))
def test_zero_gradients_give_zero_updates(name):
  tx = _ZERO_TXS[name]
  params = {"a": _normal(0, (6, 12)), "b": _normal(1, (9, 5))}
  if name in ("muon", "normuon"):
    params |= {"bias": _normal(2, (5,)), "embedding": _normal(3, (7, 6))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  for _ in range(2):
    u, state = tx.update(zeros, state, params)
    for x in jax.tree.leaves(u):
      np.testing.assert_array_equal(x, 0.0)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


@pytest.mark.parametrize("make", [orthax.muon, orthax.normuon])
def test_zero_gradients_leave_only_weight_decay(make):
  params = {"w": _normal(0, (6, 12)), "bias": _normal(1, (12,))}
  tx = make(0.1, weight_decay=0.5)
  u, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(u["w"], -0.1 * 0.5 * params["w"], rtol=1e-6)
  np.testing.assert_array_equal(u["bias"], 0.0)


# --------------------------------------------------------------------------
# Vectors: 1 x n and n x 1 matrices


def _scalar_map(g, coeffs):
  """Where Newton-Schulz sends the one singular value of a rank-1 matrix g."""
  if coeffs == "svd":
    return 1.0
  preset = PRESETS[coeffs]
  norm = np.linalg.norm(g)
  s = norm / (preset.norm_margin * norm + 1e-7 * np.max(np.abs(g)))
  for a, b, c in preset.coeffs:
    s = a * s + b * s**3 + c * s**5
  return s


@pytest.mark.parametrize("coeffs", ["svd", "muon", "polar_express", "you"])
@pytest.mark.parametrize("shape", [(1, 7), (7, 1)])
def test_vector_maps_to_normalized_vector(coeffs, shape):
  g = _normal(3, shape)
  out = orthax.orthogonalize(coeffs=coeffs).update({"w": g}, None)[0]["w"]
  g64 = np.asarray(g, np.float64)
  unit = g64 / np.linalg.norm(g64)  # the exact polar factor
  assert out.shape == shape
  np.testing.assert_allclose(out, _scalar_map(g64, coeffs) * unit, rtol=2e-5, atol=1e-6)
  if coeffs == "svd":
    np.testing.assert_allclose(out, unit, rtol=1e-5, atol=1e-7)
  else:  # within the preset's documented band around the exact factor
    lo, hi = PRESETS[coeffs].band
    assert lo <= _scalar_map(g64, coeffs) <= hi


@pytest.mark.parametrize("shape", [(1, 7), (7, 1)])
def test_vector_through_muon(shape):
  lr, wd, beta = 0.1, 0.01, 0.95
  p, g = _normal(0, shape), _normal(1, shape)
  tx = orthax.muon(lr, weight_decay=wd, beta=beta)
  u = tx.update({"w": g}, tx.init({"w": p}), {"w": p})[0]["w"]
  nesterov = (1 - beta) * (1 + beta) * np.asarray(g, np.float64)  # first step
  norm = np.linalg.norm(nesterov)
  scale = np.sqrt(max(1.0, shape[1] / shape[0]))
  # orthax.muon's default coefficients are Polar Express's
  want = -lr * (scale * _scalar_map(nesterov, "polar_express") * nesterov / norm
                + wd * np.asarray(p))
  np.testing.assert_allclose(u, want, rtol=2e-5, atol=1e-7)


# --------------------------------------------------------------------------
# Mixed precision


@pytest.mark.parametrize("make", [orthax.muon, orthax.normuon])
@pytest.mark.parametrize("param_dtype, grad_dtype, mu_dtype", [
    (jnp.bfloat16, jnp.float32, None),        # bf16 params, f32 grads
    (jnp.bfloat16, jnp.bfloat16, jnp.float32),  # bf16 params/grads, f32 momentum
    (jnp.float32, jnp.bfloat16, None),        # f32 params, bf16 grads
    (jnp.float32, jnp.float32, jnp.bfloat16),   # f32 everything, bf16 momentum
])
def test_mixed_precision(make, param_dtype, grad_dtype, mu_dtype):
  params = {"w": _normal(0, (16, 32), param_dtype), "v": _normal(1, (24, 8), param_dtype),
            "bias": _normal(2, (32,), param_dtype)}
  grads = [jax.tree.map(lambda x, i=i: _normal(10 + i, x.shape, grad_dtype), params)
           for i in range(3)]
  f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  tx, ref = make(0.1, mu_dtype=mu_dtype), make(0.1)
  state, ref_state = tx.init(params), ref.init(f32(params))
  for g in grads:
    u, state = tx.update(g, state, params)
    want, ref_state = ref.update(f32(g), ref_state, f32(params))

  update_dtype = jnp.promote_types(param_dtype, grad_dtype)
  mu = state.inner_states["matrix"].inner_state[0][0].mu
  assert mu["w"].dtype == jnp.dtype(mu_dtype or param_dtype)
  if mu_dtype is not None:  # AdamW's first moment follows it too, as in optax
    adam_mu = state.inner_states["adamw"].inner_state[0].mu
    assert adam_mu["bias"].dtype == jnp.dtype(mu_dtype)
  new = optax.apply_updates(params, u)
  # The Newton-Schulz iteration runs in the gradient's dtype: bf16 rounding
  # there costs a few percent; bf16 storage of params or momentum alone ~0.1%.
  tol = 0.05 if grad_dtype == jnp.bfloat16 else 0.01
  for k in params:
    # optax's AdamW (the bias) computes in its moments' dtype.
    want_dtype = (update_dtype if k != "bias" or mu_dtype is None
                  else jnp.promote_types(update_dtype, mu_dtype))
    assert u[k].dtype == want_dtype and new[k].dtype == param_dtype
    assert np.isfinite(np.asarray(u[k], np.float32)).all()
    err = jnp.linalg.norm(u[k].astype(jnp.float32) - want[k]) / jnp.linalg.norm(want[k])
    assert float(err) < tol, (k, float(err))


# --------------------------------------------------------------------------
# NaN and Inf


_BAD = [np.nan, np.inf, -np.inf]


def _poison(tree, key, value):
  return {**tree, key: tree[key].at[1, 2].set(value)}


@pytest.mark.parametrize("bad", _BAD)
@pytest.mark.parametrize("coeffs", ["muon", "svd"])
def test_orthogonalize_non_finite_leaf_is_nan_others_unaffected(bad, coeffs):
  g = {"a": _normal(0, (4, 6)), "b": _normal(1, (5, 3))}
  tx = orthax.orthogonalize(coeffs=coeffs)
  clean = tx.update(g, None)[0]
  out = tx.update(_poison(g, "a", bad), None)[0]
  assert np.isnan(out["a"]).all()
  np.testing.assert_array_equal(out["b"], clean["b"])


@pytest.mark.parametrize("bad", _BAD)
@pytest.mark.parametrize("make", [orthax.momentum, orthax.scale_by_shape])
def test_elementwise_transforms_propagate_only_the_bad_entry(bad, make):
  g = {"a": _normal(0, (4, 6)), "b": _normal(1, (5, 3))}
  tx = make()
  clean = _update(tx, g)[0]
  out, state = tx.update(_poison(g, "a", bad), tx.init(g))
  got, want = np.asarray(out["a"]), np.asarray(clean["a"])
  np.testing.assert_array_equal(got[1, 2], bad)  # NaN stays NaN, ±Inf keeps its sign
  mask = np.ones(got.shape, bool)
  mask[1, 2] = False
  np.testing.assert_array_equal(got[mask], want[mask])
  np.testing.assert_array_equal(out["b"], clean["b"])
  if make is orthax.momentum:  # the state remembers it (use apply_if_finite)
    assert not np.isfinite(state.mu["a"][1, 2])


@pytest.mark.parametrize("bad", _BAD)
def test_neuron_normalize_non_finite_leaf_others_unaffected(bad):
  g = {"a": _normal(0, (4, 6)), "b": _normal(1, (5, 3))}
  tx = orthax.neuron_normalize()
  clean = _update(tx, g)[0]
  out = tx.update(_poison(g, "a", bad), tx.init(g))[0]
  assert not np.isfinite(out["a"]).all()
  np.testing.assert_array_equal(out["b"], clean["b"])


@pytest.mark.parametrize("bad", _BAD)
@pytest.mark.parametrize("make", [orthax.muon, orthax.normuon])
def test_optimizer_non_finite_matrix_is_nan_others_unaffected(bad, make):
  params = {"w": _normal(0, (4, 6)), "v": _normal(1, (5, 3)), "bias": _normal(2, (3,))}
  g = {"w": _normal(3, (4, 6)), "v": _normal(4, (5, 3)), "bias": _normal(5, (3,))}
  tx = make(0.1)
  clean = tx.update(g, tx.init(params), params)[0]
  out = tx.update(_poison(g, "w", bad), tx.init(params), params)[0]
  assert np.isnan(out["w"]).all()
  np.testing.assert_array_equal(out["v"], clean["v"])
  np.testing.assert_array_equal(out["bias"], clean["bias"])


@pytest.mark.parametrize("bad", _BAD)
def test_apply_if_finite_skips_non_finite_normuon_step(bad):
  params = {"w": _normal(0, (4, 6)), "bias": _normal(2, (6,))}
  g = {"w": _normal(3, (4, 6)), "bias": _normal(5, (6,))}
  tx = optax.apply_if_finite(orthax.normuon(0.1), max_consecutive_errors=2)
  update = jax.jit(tx.update)
  state = tx.init(params)
  u, state = update(g, state, params)
  before = state.inner_state
  poisoned = {**g, "bias": g["bias"].at[3].set(bad)}  # an AdamW leaf
  u, state = update(poisoned, state, params)
  jax.tree.map(lambda x: np.testing.assert_array_equal(x, 0.0), u)
  jax.tree.map(np.testing.assert_array_equal, state.inner_state, before)
  assert int(state.notfinite_count) == 1 and int(state.total_notfinite) == 1
