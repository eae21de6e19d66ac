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
  tx = orthax.muon(0.1, dimension_numbers={"layer": None})
  with pytest.raises(ValueError, match="does not match the updates"):
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
  with pytest.raises(ValueError, match="preconditioning 'spectral'"):
    orthax.orthogonalize(preconditioning="spectral")
  with pytest.raises(ValueError, match="gram must be True, False or 'auto', got 'yes'"):
    orthax.orthogonalize(gram="yes")
  with pytest.raises(ValueError, match="gram=True needs Newton-Schulz coefficients"):
    orthax.orthogonalize(coeffs="svd", gram=True)
  with pytest.raises(ValueError, match="gram_restart must be None or a positive"):
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
    ("muon", 0, "steps must be a positive integer, got 0"),
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
    orthax.muon(0.1, label_fn=labels).init(_PARAMS)
  with pytest.raises(ValueError, match=r"one label per leaf.*\['b', 'w'\]"):
    orthax.muon(0.1, label_fn=lambda p: {"layer": {"w": "matrix"}, "conv": "adamw"}
                ).init(_PARAMS)
  # A 1-D leaf labelled as a matrix fails where it is first used as one.
  as_matrix = {"layer": {"w": True, "b": True}, "conv": False}
  tx = orthax.muon(0.1, label_fn=as_matrix)
  with pytest.raises(ValueError, match=_names("['layer']['b']", (6,))):
    tx.update(_PARAMS, tx.init(_PARAMS), _PARAMS)
  with pytest.raises(ValueError, match=_names("['layer']['b']", (6,))):
    orthax.normuon(0.1, label_fn=as_matrix).init(_PARAMS)


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


def _scalar_map(norm, coeffs):
  """Where Newton-Schulz sends the one singular value of a rank-1 matrix."""
  if coeffs == "svd":
    return 1.0
  preset = PRESETS[coeffs]
  s = norm / (preset.norm_margin * norm + 1e-7)
  for a, b, c in preset.coeffs:
    s = a * s + b * s**3 + c * s**5
  return s


@pytest.mark.parametrize("coeffs", ["svd", "muon", "polar_express", "you"])
@pytest.mark.parametrize("shape", [(1, 7), (7, 1)])
def test_vector_maps_to_normalized_vector(coeffs, shape):
  g = _normal(3, shape)
  out = orthax.orthogonalize(coeffs=coeffs).update({"w": g}, None)[0]["w"]
  norm = float(np.linalg.norm(np.asarray(g, np.float64)))
  unit = np.asarray(g, np.float64) / norm  # the exact polar factor
  assert out.shape == shape
  np.testing.assert_allclose(out, _scalar_map(norm, coeffs) * unit, rtol=2e-5, atol=1e-6)
  if coeffs == "svd":
    np.testing.assert_allclose(out, unit, rtol=1e-5, atol=1e-7)
  else:  # within the preset's documented band around the exact factor
    lo, hi = PRESETS[coeffs].band
    assert lo <= _scalar_map(norm, coeffs) <= hi


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
  want = -lr * (scale * _scalar_map(norm, "polar_express") * nesterov / norm + wd * np.asarray(p))
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
