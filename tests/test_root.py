"""ROOT's building blocks: clip_to_quantile, coefficients keyed by shape, and
the ROOT chain against the float64 reference of its official code."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
import reference
from checkpoints import orbax_round_trip

MDN = orthax.MuonDimensionNumbers
U32 = 2.0**-24  # float32 unit roundoff
U64 = 2.0**-53
LR = 0.02

# Leaves of every kind: square, wide, tall, and a stack of 3 matrices whose
# batch axis sits between its matrix axes.
SHAPES = {"square": (24, 24), "wide": (16, 40), "tall": (40, 16),
          "stack": (16, 3, 24)}
DIMS = {"square": None, "wide": None, "tall": None, "stack": MDN(0, 2)}


def _tree(seed, shapes=SHAPES, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in shapes.items()}


def _matrices(name, x):
  """The (fan_in, fan_out) matrices of a leaf of _tree, in float64."""
  x = np.asarray(x, np.float64)
  return [x[:, i, :] for i in range(x.shape[1])] if name == "stack" else [x]


def _numpy_clip(m, q=0.9, eps=0.0, mode="clip"):
  """NumPy's 'linear' quantile of |m| plus eps max|m|; the clip or the soft
  threshold."""
  a = np.abs(m)
  tau = np.quantile(a, q, method="linear") + eps * a.max()
  soft = np.sign(m) * np.maximum(a - tau, 0.0)
  return m - soft if mode == "clip" else soft


def _clip(tree, **kw):
  tx = orthax.clip_to_quantile(dimension_numbers=DIMS, **kw)
  return tx.update(tree, tx.init(tree))[0]


# ---------------------------------------------------------------------------
# clip_to_quantile
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["clip", "outliers"])
@pytest.mark.parametrize("q", [0.9, 0.37, 1.0])
def test_clip_matches_numpy_float64(mode, q):
  """Every leaf kind, per matrix, against np.quantile ('linear'), in float64:
  each side's threshold a + w (b - a) + eps max takes 4 roundings of values
  at most max|X| (u = 2^-53), and the soft threshold one more subtraction:
  within 10u max|X| of each other."""
  with jax.enable_x64(True):
    tree = _tree(0, dtype=jnp.float64)
    got = _clip(tree, quantile=q, mode=mode)
  for name, x in tree.items():
    for m, o in zip(_matrices(name, x), _matrices(name, got[name])):
      want = _numpy_clip(m, q, 1e-9, mode)
      np.testing.assert_allclose(o, want, rtol=0,
                                 atol=10 * U64 * np.abs(m).max())


def test_clip_is_roots_b_and_clips_about_ten_percent():
  """ROOT's B = M - T(M) is clip(M, -tau, tau) (NumPy, independently of
  orthax), and orthax's result clips exactly the entries above the
  interpolated order statistic: N - 1 - floor(q (N - 1)) of them (10%
  rounded up), every other entry passing unchanged."""
  with jax.enable_x64(True):
    tree = _tree(1, dtype=jnp.float64)
    got = _clip(tree)
  for name, x in tree.items():
    for m, o in zip(_matrices(name, x), _matrices(name, got[name])):
      tau = np.quantile(np.abs(m), 0.9)
      np.testing.assert_allclose(np.clip(m, -tau, tau), _numpy_clip(m),
                                 rtol=0, atol=2 * U64 * tau)
      changed = o != m
      assert changed.sum() == m.size - 1 - math.floor(0.9 * (m.size - 1))
      assert abs(changed.mean() - 0.1) < 1 / m.size + 1e-12
      np.testing.assert_array_equal(np.abs(o[changed]), np.abs(o).max())


def test_clip_float32_bfloat16_and_scale():
  """float32 against NumPy float64: the threshold a + w (b - a) + eps max
  takes 4 roundings of values at most max|X|, so tau and each clipped entry
  are within 4u max|X| (u = 2^-24); kept entries are exact. bfloat16 leaves
  are computed in float32: the float32 result rounded. Powers of two scale
  the input exactly, and the result with it (eps is relative), from 2^-100
  to 2^100."""
  tree = _tree(2)
  got = _clip(tree)
  for name, x in tree.items():
    for m, o in zip(_matrices(name, x), _matrices(name, got[name])):
      np.testing.assert_allclose(o, _numpy_clip(m, eps=1e-9), rtol=0,
                                 atol=4 * U32 * np.abs(m).max())
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)
  out = _clip(half)
  want = _clip(jax.tree.map(lambda x: x.astype(jnp.float32), half))
  for k in tree:
    assert out[k].dtype == jnp.bfloat16
    np.testing.assert_array_equal(out[k], want[k].astype(jnp.bfloat16))
  for scale in (2.0**-100, 2.0**100):
    scaled = _clip(jax.tree.map(lambda x: x * scale, tree))
    for k in tree:
      np.testing.assert_array_equal(scaled[k], got[k] * scale)


def test_clip_zero_and_mostly_zero_matrices():
  """A zero matrix stays zero; where more than 90% of the entries are zero
  the quantile is 0, and eps keeps the others' signs (clipped to
  eps max|X|) rather than zeroing a non-zero matrix; "outliers" is then the
  rest. NaN makes the matrix NaN; Inf makes tau infinite (nothing
  clipped)."""
  x = np.zeros((10, 10))
  x[0, :5] = [3.0, -1.0, 2.0, 0.5, -4.0]
  tree = {"w": jnp.asarray(x, jnp.float32), "z": jnp.zeros((4, 6)),
          "empty": jnp.zeros((0, 5)),
          "nan": jnp.asarray(x, jnp.float32).at[1, 1].set(jnp.nan),
          "inf": jnp.asarray(x, jnp.float32).at[1, 1].set(-jnp.inf)}
  tx = orthax.clip_to_quantile()
  out, _ = tx.update(tree, tx.init(tree))
  np.testing.assert_allclose(out["w"], np.sign(x) * 4e-9, rtol=1e-6)
  np.testing.assert_array_equal(out["z"], 0.0)
  assert out["empty"].shape == (0, 5)
  assert bool(jnp.all(jnp.isnan(out["nan"])))
  np.testing.assert_array_equal(out["inf"], tree["inf"])
  tx = orthax.clip_to_quantile(mode="outliers")
  rest, _ = tx.update(tree, tx.init(tree))
  np.testing.assert_allclose(rest["w"] + out["w"], x, rtol=1e-6)


def test_clip_jit_vmap_and_stacking():
  """jit gives the eager result; vmap over a batch of matrices, and a 3-D
  leaf with dimension numbers, give each matrix's own."""
  x = _tree(3, {"w": (4, 12, 20)})["w"]
  tx = orthax.clip_to_quantile(0.8)
  one = lambda m: tx.update({"w": m}, None)[0]["w"]
  eager = jnp.stack([one(m) for m in x])
  np.testing.assert_array_equal(jax.jit(jax.vmap(one))(x), eager)
  stacked = orthax.clip_to_quantile(0.8, dimension_numbers=MDN(1, 2))
  np.testing.assert_array_equal(stacked.update({"w": x}, None)[0]["w"], eager)


def test_clip_bad_input():
  for kw, err, match in [
      ({"quantile": 0.0}, ValueError, r"quantile must be in \(0, 1\]"),
      ({"quantile": 1.5}, ValueError, r"quantile must be in \(0, 1\]"),
      ({"quantile": jnp.asarray(0.9)}, TypeError, "quantile must be a real"),
      ({"eps": 0.0}, ValueError, r"eps must be in \(0, inf\)"),
      ({"mode": "soft"}, ValueError, "unknown mode 'soft'"),
  ]:
    with pytest.raises(err, match="orthax.clip_to_quantile: " + match):
      orthax.clip_to_quantile(**kw)
  tx = orthax.clip_to_quantile()
  with pytest.raises(ValueError,
                     match=r"leaf \['b'\]\['w'\] has shape \(2, 3, 4\)"):
    tx.update({"b": {"w": jnp.ones((2, 3, 4))}}, None)
  with pytest.raises(TypeError, match=r"leaf \['w'\] has dtype int32"):
    tx.update({"w": jnp.ones((3, 4), jnp.int32)}, None)


# ---------------------------------------------------------------------------
# Coefficients keyed by shape
# ---------------------------------------------------------------------------

# Four different quintics (ROOT's) for small shapes, and one for the rest.
SMALL_TABLE = {(24, 24): (3.4916, -4.8224, 2.1095),
               (16, 40): (2.9794, -3.6674, 1.6207),
               (16, 24): (3.4509, -4.5790, 1.9325)}
OTHER = (3.1943, -3.8221, 1.5322)


# One float32 run of these quintics against float64 is off by at most 4u
# times the sum, over the start and each step, of the slope at 0 of the
# steps after it (the a's, < 3.5 here), in the largest entry (the derivation
# of tests/test_sharded.py's F32_BOUND; the Gram path's restart keeps it in
# the same range): 2 steps, 4u (1 + 3.5 + 3.5^2) = 3.8e-6. Another quintic
# moves the result by ~1e-2.
NS_F32 = 4 * U32 * sum(3.5**k for k in range(3))


def _orthogonalize(tree, coeffs, dims=None, **kw):
  tx = orthax.orthogonalize(coeffs=coeffs, dimension_numbers=dims, **kw)
  return tx.update(tree, None)[0]


@pytest.mark.parametrize("kw, names", [
    ({}, (*SHAPES, "other")), ({"gram": True}, ("tall", "other")),
    ({"backend": "pallas"}, ("tall",))])
def test_by_shape_runs_each_shapes_coefficients(kw, names):
  """Each matrix, in either orientation and in a stack, runs its shape's
  triple (2 steps here; float64 NumPy, tests/reference.py) and the other
  shapes the default, which is reported once per trace with the shapes and
  leaves; on the plain path and the Gram path (the default takes it for the
  16x40 matrices), and on the Pallas kernels (interpreted on CPU, slowly:
  one leaf)."""
  shapes = {**SHAPES, "other": (20, 20)}
  tree = _tree(4, {k: shapes[k] for k in names})
  dims = {k: DIMS.get(k) for k in names}
  coeffs = orthax.polar.by_shape(
      {(40, 16): SMALL_TABLE[(16, 40)],
       **{k: v for k, v in SMALL_TABLE.items() if k != (16, 40)}},
      default=OTHER)
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    got = _orthogonalize(tree, coeffs, dims, steps=2, **kw)
  assert len(record) == ("other" in names)
  if record:
    message = str(record[0].message)
    assert ("by_shape table has no Newton-Schulz coefficients for matrices "
            "of shape (short, long) (20, 20) (['other'])") in message
    assert "(3.1943, -3.8221, 1.5322)" in message
  for name, x in tree.items():
    abc = SMALL_TABLE.get((min(x.shape[0], x.shape[-1]),
                           max(x.shape[0], x.shape[-1])), OTHER)
    for m, o in zip(_matrices(name, x), _matrices(name, got[name])):
      want = reference.newton_schulz(m, [abc] * 2)
      np.testing.assert_allclose(o, want, rtol=0, atol=NS_F32)


def test_by_shape_warns_only_for_missing_shapes():
  tree = _tree(5, {"a": (24, 24), "b": (40, 16)})
  covered = orthax.polar.by_shape(SMALL_TABLE)
  missing = orthax.polar.by_shape({}, default="polar_express", warn=False)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _orthogonalize(tree, covered)
    out = _orthogonalize(tree, missing)
    # an empty silent table is the default for every shape
    want = _orthogonalize(tree, "polar_express")
  for k in tree:
    np.testing.assert_array_equal(out[k], want[k])


def _program(coeffs, shape):
  """The traced update of one leaf: its equations and its constants."""
  tx = orthax.orthogonalize(coeffs=coeffs)
  closed = jax.make_jaxpr(lambda g: tx.update(g, None)[0])(
      {"w": jax.ShapeDtypeStruct(shape, jnp.float32)})
  return str(closed.jaxpr), [np.asarray(c) for c in closed.consts]


@pytest.mark.parametrize("key", sorted(reference.ROOT_TABLE))
def test_root_preset_is_roots_table(key):
  """coeffs="root" builds, for each of ROOT's shapes in both orientations,
  the program of that shape's triple run 5 times (traced only: ROOT's
  matrices are 2048 wide); another shape runs Jordan's quintic, with a
  warning."""
  triple = reference.ROOT_TABLE[key]
  for shape in (key, key[::-1]):
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      root = _program("root", shape)
    text, consts = _program(triple, shape)
    assert root[0] == text
    assert len(consts) == len(root[1]) == 1
    np.testing.assert_array_equal(root[1][0], consts[0])
    np.testing.assert_array_equal(consts[0], np.float32([triple] * 5))
  with pytest.warns(UserWarning, match=r"the 'root' table .* \(2048, 4096\) "
                    r"\(\['w'\]\); they run its default \(3.4445, -4.775, "
                    r"2.0315\)"):
    other = _program("root", (4096, 2048))
  text, consts = _program(reference.MUON_ABC, (4096, 2048))
  assert other[0] == text
  np.testing.assert_array_equal(other[1][0], consts[0])


def test_by_shape_bad_input():
  by_shape = orthax.polar.by_shape
  for table, kw, err, match in [
      ({(0, 4): (1, 2, 3)}, {}, ValueError,
       r"pair of positive integers.*\(0, 4\)"),
      ({(4, True): (1, 2, 3)}, {}, ValueError, "pair of positive integers"),
      ({4: (1, 2, 3)}, {}, ValueError, "pair of positive integers"),
      ({(4, 8): (1, 2, 3), (8, 4): (1, 2, 3)}, {}, ValueError,
       r"\(8, 4\) is given twice"),
      ({(4, 8): "svd"}, {}, ValueError, r"entry for \(4, 8\) must be Newton"),
      ({}, {"default": "svd"}, ValueError, "default must be Newton"),
      ({}, {"default": by_shape({})}, ValueError, "default must be Newton"),
      ({(4, 8): "root"}, {}, ValueError, r"keyed by shape.*\['root'\]"),
      ({(4, 8): np.ones((2, 2))}, {}, ValueError, r"got shape \(2, 2\)"),
      ({(4, 8): (1, np.inf, 3)}, {}, ValueError, "finite"),
      ([((4, 8), (1, 2, 3))], {}, ValueError, "must be a mapping"),
      ({}, {"warn": 1}, TypeError, "warn must be a bool"),
  ]:
    with pytest.raises(err, match=match):
      by_shape(table, **kw)
  with pytest.raises(ValueError, match="Unknown Newton-Schulz coefficient "
                     r"preset 'root'.*keyed by shape .*\['root'\]"):
    orthax.polar.resolve_coefficients("root", None)
  # the table is read-only
  coeffs = by_shape({(4, 8): np.ones((2, 3))})
  with pytest.raises(TypeError):
    coeffs.table[(2, 2)] = (1, 2, 3)
  with pytest.raises(ValueError, match="read-only"):
    coeffs.table[(4, 8)][0, 0] = 2.0


_SHARDED_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import orthax
jax.config.update("jax_enable_x64", True)
mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Explicit,))
rng = np.random.default_rng(0)
tree = {"big": rng.normal(size=(32, 64)), "small": rng.normal(size=(16, 24))}
coeffs = orthax.polar.by_shape({(32, 64): (3.4445, -4.7750, 2.0315),
                                (16, 24): (1.875, -1.25, 0.375)})
tx = orthax.orthogonalize(coeffs=coeffs, steps=2, gram=False)
want = tx.update(tree, None)[0]
put = lambda x: jax.device_put(x, NamedSharding(mesh, P("fsdp", None)))
got = jax.jit(lambda t: tx.update(t, None)[0])(jax.tree.map(put, tree))
for k in tree:
  assert got[k].sharding.spec == P("fsdp", None), got[k].sharding
  err = float(np.max(np.abs(np.asarray(got[k]) - np.asarray(want[k]))))
  print(k, err)
  # float64 roundings (2^-53) of 2 quintic steps on whole matrices, other
  # stacks and reduction orders: a few hundred ulps at most
  assert err < 1e-12, (k, err)
"""


def test_by_shape_on_the_sharded_path():
  """On 8 devices (a subprocess) each device iterates whole matrices with
  their own shape's coefficients: the small matrix is not zero-padded into
  the big one's slot, where it would run the big one's quintic (the plan
  packs leftovers so when coefficients do not depend on shape)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=8")
  run = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


# ---------------------------------------------------------------------------
# The ROOT chain against the reference
# ---------------------------------------------------------------------------


def _root(coeffs="root", *, clip_eps=1e-9, ns_eps=1e-7, dims=DIMS):
  """ROOT as orthax transforms (METHODS.md section 3(d))."""
  return optax.chain(
      orthax.momentum(0.95, nesterov=True),
      orthax.clip_to_quantile(0.9, eps=clip_eps, dimension_numbers=dims),
      orthax.orthogonalize(coeffs=coeffs, eps=ns_eps,
                           steps=None if coeffs == "svd" else 5,
                           dimension_numbers=dims),
      orthax.scale_by_shape("rms", rms=0.2, dimension_numbers=dims),
      optax.add_decayed_weights(0.1),
      optax.scale_by_learning_rate(LR))


@functools.cache
def _jit_update(tx):
  return jax.jit(tx.update)


def _train(tx, params, grads, state=None):
  """The params after each step (jit, one trace per chain and tree), from
  ``state`` (default: a fresh one), and the last state."""
  state = tx.init(params) if state is None else state
  update = _jit_update(tx)
  history = []
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    history.append(params)
  return history, state


def _reference(params, grads, **kw):
  """reference.root_run on every matrix of the tree; per step, the tree."""
  names = list(params)
  flat = lambda tree: [m for k in names for m in _matrices(k, tree[k])]
  runs = reference.root_run(flat(params), [flat(g) for g in grads], lr=LR,
                            **kw)
  out = []
  for mats in runs:
    tree, i = {}, 0
    for k in names:
      n = params[k].shape[1] if k == "stack" else 1
      tree[k] = np.stack(mats[i:i + n], axis=1) if k == "stack" else mats[i]
      i += n
    out.append(tree)
  return out


@pytest.mark.parametrize("coeffs", ["root", "small", "svd"])
def test_chain_matches_root_float64(coeffs):
  """orthax's chain is ROOT's update over 6 steps, in float64, on every leaf
  kind: orthax.momentum's average is (1 - beta) times ROOT's sum (and its
  Nesterov output (1 - beta) times ROOT's), and every later stage is
  positively homogeneous (the quantile and the clip) or scale-free (the
  normalization). Only the eps terms break that, and their conventions
  differ (orthax's relative, ROOT's absolute), so both sides drop them here
  (1e-30 relative in the clip, which must be positive). "root": these
  shapes are not ROOT's, so both run Jordan's quintic (reported); "small":
  a by_shape table, with each shape's own quintic on both sides; "svd": the
  exact polar factor on both sides. What remains is float64 rounding, u =
  1.1e-16, amplified by Newton-Schulz at most ~500-fold (the product of 5
  a's, the slope at 0) and by lr * 0.2 * sqrt(40) < 0.03 into the weights,
  over 6 steps: ~1e-14, and 1e-10 leaves room for any reduction order."""
  table = {"root": {}, "small": SMALL_TABLE, "svd": None}[coeffs]
  given = orthax.polar.by_shape(SMALL_TABLE) if coeffs == "small" else coeffs
  with jax.enable_x64(True):
    params = _tree(6, dtype=jnp.float64)
    grads = [_tree(10 + t, dtype=jnp.float64) for t in range(6)]
    with warnings.catch_warnings(record=True) as record:
      warnings.simplefilter("always")
      got, _ = _train(_root(given, clip_eps=1e-30, ns_eps=0.0), params, grads)
  fallback = [w for w in record if "no Newton-Schulz" in str(w.message)]
  assert len(fallback) == (coeffs == "root")
  want = _reference(params, grads, quantile_eps=0.0, ns_eps=0.0, table=table)
  for g, w in zip(got, want):
    for k in params:
      np.testing.assert_allclose(g[k], w[k], rtol=0, atol=1e-10)


def test_chain_matches_root_float32():
  """The float32 chain against the float64 reference (ROOT's defaults;
  Jordan's quintic on these shapes), step by step: the orthogonalized
  update U, recovered from each step's update (``-lr (s U + 0.1 W)``, s =
  0.2 sqrt(max(m, n))) and from the reference's weights (``W_t = (1 - 0.1
  lr) W_{t-1} - lr s U``), since the weights themselves carry float32
  roundings of |W| ~ 4 that would hide U's (lr s ~ 0.02).

  The bound on U's largest entry error follows tests/test_sharded.py's
  F32_BOUND: each rounding of every entry of the normalized input or of a
  step's product perturbs the iterate by spectral norm <= 4u (u = 2^-24),
  which later steps amplify by at most their a's (3.4445 each): the input
  by a^5 = 485, step k's product by a^(4-k). The input holds more than one
  rounding: the momentum's three a step (decaying by beta a step: sqrt(3 /
  (1 - beta^2)) = 5.5 in the random-rounding model), the Nesterov output's
  3, the threshold's 4 (interpolated), the eps terms' (relative 1e-9 and
  1e-7 against ROOT's absolute ones on entries ~1: under 2u), and the
  normalization's own: 20 in all. 4u (20 a^5 + a^4 + a^3 + a^2 + a + 1) =
  2.4e-3, against entries of U of ~0.2 and the ~1e-2 that another quintic
  or clip gives. The update's own roundings (|lr s U| ~ 1e-2 to float32)
  and the decay term's W difference (0.1 lr times the weights' rounding)
  are below 1e-8 in U.
  """
  shapes = {"wide": (24, 32), "tall": (32, 24), "stack": (20, 2, 28)}
  params = _tree(7, shapes)
  grads = [_tree(20 + t, shapes) for t in range(6)]
  tx = _root(dims={k: DIMS[k] for k in shapes})
  f64 = lambda tree: [m for k in shapes for m in _matrices(k, tree[k])]
  want = reference.root_run(f64(params), [f64(g) for g in grads], lr=LR)
  a = reference.MUON_ABC[0]
  bound = 4 * U32 * (20 * a**5 + sum(a**k for k in range(5)))
  state, update, p = tx.init(params), _jit_update(tx), params
  before = f64(params)
  with pytest.warns(UserWarning, match="'root' table"):
    for g, after in zip(grads, want):
      u, state = update(g, state, p)
      for mu, w, w0, w1 in zip(f64(u), f64(p), before, after):
        scale = LR * 0.2 * math.sqrt(max(w.shape))
        ours = -(mu / LR + 0.1 * w) / (scale / LR)
        theirs = ((1 - LR * 0.1) * w0 - w1) / scale
        assert np.abs(ours - theirs).max() <= bound
      p, before = optax.apply_updates(p, u), after


# One 2-D leaf: one chain (and its compiled updates) for the tests below.
ONE = {"w": (16, 24)}
ROOT_2D = _root(dims=None)


def test_chain_zero_gradients_and_bfloat16():
  """Zero gradients: the clip and the polar factor give zero, so the update
  is the decay alone; bf16 leaves stay bf16 and finite."""
  params = _tree(8, ONE)
  tx = ROOT_2D
  for dtype in (jnp.float32, jnp.bfloat16):
    p = jax.tree.map(lambda x: x.astype(dtype), params)
    with pytest.warns(UserWarning, match="'root' table"):
      zero, _ = _train(tx, p, [jax.tree.map(jnp.zeros_like, p)])
      u, _ = _jit_update(tx)(p, tx.init(p), p)
    np.testing.assert_allclose(np.float32(zero[0]["w"]),
                               np.float32(p["w"]) * (1 - LR * 0.1),
                               rtol=1e-6 if dtype == jnp.float32 else 1e-2)
    assert u["w"].dtype == dtype and bool(jnp.all(jnp.isfinite(u["w"])))


def test_chain_resumes_from_orbax(tmp_path):
  """The chain's state (the momentum; the other stages are stateless) saved
  with orbax after 3 steps and restored continues exactly as the
  uninterrupted run (and not as a fresh state would)."""
  params = _tree(9, ONE)
  grads = [_tree(30 + t, ONE) for t in range(5)]
  tx = ROOT_2D
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    straight, _ = _train(tx, params, grads)
    first, state = _train(tx, params, grads[:3])
    restored = orbax_round_trip(tmp_path / "ckpt", state, tx.init(params))
    resumed, _ = _train(tx, first[-1], grads[3:], restored)
    fresh, _ = _train(tx, first[-1], grads[3:])
  np.testing.assert_array_equal(resumed[-1]["w"], straight[-1]["w"])
  assert not np.array_equal(fresh[-1]["w"], straight[-1]["w"])
