"""Dion (issue 15): ``scale_by_dion``, ``scale_by_shape("spectral")`` and the
ready ``dion``.

The transform is checked step by step against the independent float64
reference of ``tests/reference.py`` (``dion_step``, written in the official
code's torch layout) from the transform's own state, so that each step's
bound is one step's rounding; then the implementation-independent
properties of METHODS.md §8c(e), the edge cases, and on 8 simulated devices
that the sharded program equals the unsharded one and moves only the
low-rank factors.
"""

from __future__ import annotations

import functools
import inspect
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
import reference
from checkpoints import orbax_round_trip
from orthax.structured import dion
from orthax.transforms.dion import dion_rank, scale_by_dion

DIMS = {"square": None, "wide": None, "tall": None,
        "stack": orthax.MuonDimensionNumbers(1, 2)}
SHAPES = {"square": (8, 8), "wide": (6, 10), "tall": (10, 6),
          "stack": (3, 7, 9)}


def _tree(seed, dtype=jnp.float64, shapes=SHAPES):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in shapes.items()}


@functools.cache
def _update(tx):
  """``tx.update`` under jit, one trace per transform and tree."""
  return jax.jit(tx.update)


@functools.cache
def _init(tx):
  """``tx.init`` under jit: one program draws every leaf's Q_0."""
  return jax.jit(tx.init)


def _slices(k, x):
  """The (fan_in, fan_out) matrices of leaf ``k`` (float64 NumPy)."""
  return reference.matrices_of(np.asarray(x, np.float64), DIMS.get(k))


def _step_bounds(g, m, q, *, mu, eps, u):
  """First-order bounds on the max-entry error of one step's direction,
  factor and buffer, for a program of unit roundoff ``u`` given the same
  ``(g, m, q)`` as the exact step (``g, m`` (fan_in, fan_out), ``q``
  (fan_in, r), float64).

  Standard bounds (Higham, Accuracy and Stability, §3.5 and Thm 19.4), Frobenius
  norms, every factor of the product taken on the unit-scale ``B / max|B|``:
  ``B = M + G`` and the division by ``max|B|`` round each entry by ``2u``;
  ``X = B^T Q`` (sums of m terms) by ``(m + 2) u ||B|| ||Q||``; Householder QR
  is the exact QR of ``X + dX``, ``||dX|| <= 4 n r u ||X||``, and the Q
  factor moves by ``sqrt(2) ||X^+||_2`` times the perturbation of ``X`` (Sun
  1991), and is orthonormal to ``n r u``; ``R = B P`` (sums of n terms) adds
  ``(n + 2) u ||B|| ||P||``; normalizing column j multiplies its error by
  ``2 / ||R_j||``; the final products (sums of r terms) add ``(r + 2) u`` of
  their factors' norms, and storing the result rounds it by ``u``. Twice
  the sum covers the second-order terms (each below ``u`` times a first-order
  one at these sizes).
  """
  b = (m + g)
  s = np.max(np.abs(b))
  unit = b / s
  nm, nn = b.shape
  r = q.shape[1]
  x = unit.T @ q
  fro = np.linalg.norm
  e_x = (nm + 2) * u * fro(unit) * fro(q) + 4 * nn * r * u * fro(x)
  e_p = np.sqrt(2) * np.linalg.norm(np.linalg.pinv(x), 2) * e_x + nn * r * u
  p = np.linalg.qr(x)[0]
  rr = unit @ p
  e_r = np.linalg.norm(unit, 2) * e_p + (nn + 2) * u * fro(unit) * np.sqrt(r)
  norms = np.linalg.norm(rr, axis=0)
  e_q = 2 * e_r / np.min(norms) + (nm + 3) * u * np.sqrt(r)
  e_d = e_q + np.sqrt(r) * e_p + (r + 2) * u * np.sqrt(r) * np.sqrt(r) + u
  e_m = s * (e_r + fro(rr) * e_p + (r + 2) * u * fro(rr) * np.sqrt(r)) \
      + 2 * u * np.max(np.abs(b))
  del mu, eps  # both exact factors: their rounding is in the u terms above
  return 2 * e_d, 2 * e_q, 2 * e_m


def _check_steps(dtype, rank_fraction, steps, u):
  """``steps`` jitted updates of the four leaves, each checked against
  ``reference.dion_step`` from the transform's own previous state."""
  mu, eps = 0.9, 1e-8
  tx = scale_by_dion(rank_fraction, mu=mu, eps=eps, dimension_numbers=DIMS)
  update = _update(tx)
  state = _init(tx)(_tree(0, dtype))
  for step in range(steps):
    g = _tree(10 + step, dtype)
    out, new = update(g, state)
    for k in SHAPES:
      for i, (gi, mi, oi, mi_new) in enumerate(zip(
          _slices(k, g[k]), _slices(k, state.buffer[k]), _slices(k, out[k]),
          _slices(k, new.buffer[k]))):
        qi = np.asarray(state.factor[k][i], np.float64)
        d, m_want, q_want, _ = reference.dion_step(gi, mi, qi, mu=mu, eps=eps)
        bd, bq, bm = _step_bounds(gi, mi, qi, mu=mu, eps=eps, u=u)
        where = f"{k}[{i}] step {step}"
        np.testing.assert_allclose(oi, d, rtol=0, atol=bd, err_msg=where)
        np.testing.assert_allclose(np.asarray(new.factor[k][i]), q_want,
                                   rtol=0, atol=bq, err_msg=where)
        np.testing.assert_allclose(mi_new, m_want, rtol=0, atol=bm,
                                   err_msg=where)
    state = new


def test_transform_follows_the_float64_reference():
  """Square, wide, tall and stacked leaves at rank_fraction 0.5 (ranks 4,
  3, 3 and 4 of 8, 6, 6 and 7), 6 steps under jit, in float64 (u = 2^-53:
  the derived bounds are near 1e-13, and the check is that tight)."""
  with jax.enable_x64(True):
    _check_steps(jnp.float64, 0.5, 6, 2.0**-53)


def test_float32_follows_the_float64_reference():
  """Full rank in float32, 4 steps, against the float64 reference, within
  each step's bound derived for u = 2^-24 (:func:`_step_bounds`)."""
  with jax.enable_x64(True):  # the reference in float64; the transform f32
    _check_steps(jnp.float32, 1.0, 4, 2.0**-24)


def test_power_iteration_identities():
  """METHODS.md §8c(e), from the public outputs alone: with ``P^T = Q_t^+
  D`` recovered from the direction ``D = Q_t P^T`` and the new factor,
  ``P^T P = I``, ``Q_t``'s columns are ``B P``'s normalized (unit up to
  eps), and the buffer lost ``(1 - mu) B P P^T``. float64: each identity
  holds to the rounding of a few products of norm <= ||B|| (at most
  ``10 (m + n) u ||B||``, below 1e-12 here)."""
  mu, eps = 0.8, 1e-8
  with jax.enable_x64(True):
    tx = scale_by_dion(0.5, mu=mu, eps=eps, dimension_numbers=DIMS)
    state = _init(tx)(_tree(0))
    for step in range(3):
      g = _tree(20 + step)
      out, new = _update(tx)(g, state)
      for k in SHAPES:
        for gi, mi, di, mi_new, qi in zip(
            _slices(k, g[k]), _slices(k, state.buffer[k]), _slices(k, out[k]),
            _slices(k, new.buffer[k]), np.asarray(new.factor[k])):
          b = gi + mi
          tol = 10 * sum(b.shape) * 2.0**-53 * np.linalg.norm(b, 2)
          p = np.linalg.lstsq(qi, di, rcond=None)[0].T
          np.testing.assert_allclose(p.T @ p, np.eye(p.shape[1]), atol=1e-12)
          r = b @ p
          scale = np.linalg.norm(r, axis=0) + eps * np.max(np.abs(b))
          np.testing.assert_allclose(qi * scale, r, rtol=0, atol=tol)
          np.testing.assert_allclose(b - mi_new, (1 - mu) * r @ p.T, rtol=0,
                                     atol=tol)
          norms = np.linalg.norm(qi, axis=0)
          assert np.all(norms <= 1 + 1e-15)
          assert np.all(1 - norms <= eps * np.max(np.abs(b)) /
                        np.linalg.norm(r, axis=0) + 1e-14)
      state = new


def _tan_angles(z, v):
  """``tan`` of the angle between the span of ``z``'s first j columns and of
  ``v``'s, for each j (0 for the whole space)."""
  out = []
  for j in range(1, z.shape[1] + 1):
    inside = v[:, :j].T @ z[:, :j]
    outside = v[:, j:].T @ z[:, :j]
    out.append(np.linalg.norm(outside @ np.linalg.inv(inside), 2)
               if v.shape[1] > j else 0.0)
  return np.array(out)


@pytest.mark.parametrize("shape", [(10, 6), (6, 10)])
def test_full_rank_without_feedback_converges_to_the_polar_factor(shape):
  """``rank_fraction=1, mu=0`` on a fixed full-rank G: the buffer empties
  each step (``P`` spans G's row space), and ``P_t`` is orthogonal iteration
  on ``G^T G`` from ``Z = G^T Q_0``: after T steps the span of its first j
  columns is within ``tan_j = (s_{j+1} / s_j)^{2 (T - 1)} tan(Z_j, V_j)`` of
  G's leading right singular vectors. Column j of ``P`` is then within
  ``tan_j + tan_{j-1}`` of ``v_j``, ``Q``'s column ``B p_j / ||B p_j||``
  within ``2 (s_1 / s_j)`` times that of ``u_j``, and the direction within
  their sum of the polar factor ``U V^T``. Singular values ``2^-j``: ratio
  1/4 per step, 16 steps."""
  m, n = shape
  k = min(m, n)
  rng = np.random.default_rng(0)
  u = np.linalg.qr(rng.normal(size=(m, k)))[0]
  v = np.linalg.qr(rng.normal(size=(n, k)))[0]
  sigma = 2.0 ** -np.arange(k)
  g = (u * sigma) @ v.T
  steps = 16
  with jax.enable_x64(True):
    tx = scale_by_dion(1.0, mu=0.0)
    state = _init(tx)({"w": jnp.zeros(shape)})
    tan = _tan_angles(g.T @ np.asarray(state.factor["w"][0]), v)
    for _ in range(steps):
      out, state = _update(tx)({"w": jnp.asarray(g)}, state)
  ratios = np.append(sigma[1:] / sigma[:-1], 0.0)
  tan_t = ratios ** (2 * (steps - 1)) * tan
  per_column = tan_t + np.append(0.0, tan_t[:-1])
  bound = np.sum((1 + 2 * sigma[0] / sigma) * per_column) + 1e-12
  err = np.max(np.abs(np.asarray(out["w"]) - reference.exact_polar(g)))
  assert err <= bound, (err, bound)


def test_spectral_shape_factor():
  """``sqrt(fan_out / fan_in)``, with no floor at 1 (Muon's mode has one)."""
  tree = {"wide": jnp.ones((4, 16)), "tall": jnp.ones((16, 4)),
          "stack": jnp.ones((2, 4, 9))}
  dims = {"wide": None, "tall": None,
          "stack": orthax.MuonDimensionNumbers(1, 2)}
  spectral = orthax.scale_by_shape("spectral", dimension_numbers=dims)
  muon = orthax.scale_by_shape("muon", dimension_numbers=dims)
  got = spectral.update(tree, spectral.init(tree))[0]
  for k, factor in (("wide", 2.0), ("tall", 0.5), ("stack", 1.5)):
    np.testing.assert_array_equal(got[k], jnp.full_like(tree[k], factor))
  assert float(muon.update(tree, None)[0]["tall"][0, 0]) == 1.0
  with pytest.raises(ValueError, match="'spectral'"):
    orthax.scale_by_shape("spectra")


def test_rank_and_initial_factor():
  view = orthax.matrices.matrix_views(
      {"w": jnp.zeros((7, 9))}, None, "t")[0]
  assert dion_rank(view, 0.5) == 4  # ceil(3.5), dion.py's rule
  assert dion_rank(view, 1.0) == 7
  assert dion_rank(view, 0.01) == 1
  assert dion_rank(view, 1.0, rank=100) == 7
  assert dion_rank(view, 0.5, rank=2) == 2
  params = {"a": jnp.zeros((6, 10)), "b": jnp.zeros((6, 10)),
            "s": jnp.zeros((2, 6, 10))}
  dims = {"a": None, "b": None, "s": orthax.MuonDimensionNumbers(1, 2)}
  q = _init(scale_by_dion(dimension_numbers=dims))(params).factor
  # another transform (another run): the same Q_0 for the same seed
  again = _init(scale_by_dion(seed=0))({"a": params["a"]}).factor
  other = _init(scale_by_dion(seed=1))({"a": params["a"]}).factor
  np.testing.assert_array_equal(q["a"], again["a"])
  assert q["a"].shape == (1, 6, 6) and q["s"].shape == (2, 6, 6)
  assert not np.array_equal(q["a"], q["b"])  # per leaf
  assert not np.array_equal(q["s"][0], q["s"][1])  # per slice
  assert not np.array_equal(q["a"], other["a"])  # per seed
  # N(0, 1): the 72 entries' mean and variance within 4 standard errors
  entries = np.asarray(q["s"]).ravel()
  assert abs(entries.mean()) < 4 / np.sqrt(72)
  assert abs(entries.var() - 1) < 4 * np.sqrt(2 / 72)


def test_zero_gradients_and_scale():
  """A zero buffer gives a zero update and keeps Q (eps = 0 included); a
  gradient scaled by 2^100 or 2^-100 gives bitwise the same direction (the
  products run on B / max|B|, whose power of two divides exactly)."""
  params = {"w": jnp.zeros((6, 10))}
  g = _tree(3, jnp.float32, {"w": (6, 10)})
  for eps in (1e-8, 0.0):
    update = _update(scale_by_dion(0.5, eps=eps))
    state = _init(scale_by_dion(0.5, eps=eps))(params)
    out, new = update({"w": jnp.zeros((6, 10))}, state)
    assert np.all(np.asarray(out["w"]) == 0)
    np.testing.assert_array_equal(new.factor["w"], state.factor["w"])
    out, new = update(g, new)
    assert np.all(np.isfinite(np.asarray(out["w"])))
    plain = update(g, state)
    for scale in (2.0**100, 2.0**-100):
      big = update({"w": g["w"] * scale}, state)
      np.testing.assert_array_equal(big[0]["w"], plain[0]["w"])
      np.testing.assert_array_equal(big[1].factor["w"], plain[1].factor["w"])


def test_bfloat16_leaves():
  """bfloat16 gradients are computed in float32 (a float32 buffer and
  factor) and their updates returned in bfloat16: the float32 run on the
  same (exactly widened) gradients, rounded."""
  shapes = {k: SHAPES[k] for k in ("tall", "stack")}
  tx = scale_by_dion(0.5, dimension_numbers={k: DIMS[k] for k in shapes})
  g16 = _tree(5, jnp.bfloat16, shapes)
  g32 = jax.tree.map(lambda x: x.astype(jnp.float32), g16)
  state16 = _init(tx)(g16)
  state32 = _init(tx)(g32)
  for _ in range(2):
    out16, state16 = _update(tx)(g16, state16)
    out32, state32 = _update(tx)(g32, state32)
  for k in shapes:
    assert out16[k].dtype == jnp.bfloat16
    assert state16.buffer[k].dtype == state16.factor[k].dtype == jnp.float32
    np.testing.assert_array_equal(out16[k], out32[k].astype(jnp.bfloat16))


def test_bad_input_is_named():
  for kw, err, match in [
      (dict(rank_fraction=0.0), ValueError, "rank_fraction"),
      (dict(rank_fraction=1.5), ValueError, "rank_fraction"),
      (dict(rank=0), ValueError, "rank"),
      (dict(rank=2.5), TypeError, "rank"),
      (dict(mu=1.5), ValueError, "mu"),
      (dict(eps=-1.0), ValueError, "eps"),
      (dict(seed=-1), ValueError, "seed"),
      (dict(seed=1.5), TypeError, "seed"),
  ]:
    with pytest.raises(err, match=f"orthax.scale_by_dion: {match}"):
      scale_by_dion(**kw)
  tx = scale_by_dion(0.5)
  params = {"w": jnp.zeros((6, 10)), "v": jnp.zeros((4, 4))}
  state = _init(tx)(params)
  with pytest.raises(ValueError, match=r"leaf \['b'\] has shape \(3,\)"):
    tx.update({"b": jnp.zeros(3)}, _init(tx)({"b": jnp.zeros((3, 3))}))
  with pytest.raises(ValueError, match=r"\['w'\] has a gradient of shape"):
    tx.update({"w": jnp.zeros((6, 11)), "v": params["v"]}, state, params)
  other = _init(scale_by_dion(1.0))(params)
  with pytest.raises(ValueError, match=r"state for leaf \['v'\] is an array "
                     r"of shape \(1, 4, 4\); expected an array of shape "
                     r"\(1, 4, 2\)"):
    tx.update(params, other)
  with pytest.raises(TypeError, match=r"leaf \['w'\] has dtype int32"):
    tx.update({"w": jnp.zeros((6, 10), jnp.int32), "v": params["v"]}, state)


_PARAMS = {"embedding": (20, 12), "w1": (12, 24), "w2": (24, 8), "bias": (8,)}


def test_ready_optimizer_follows_the_reference():
  """float64, 4 steps: the hidden matrices' updates are ``-lr (sqrt(fan_out
  / fan_in) D + wd W)`` with ``D`` the reference step from the optimizer's
  own Dion state (bound: ``lr sqrt(fan_out / fan_in)`` times the
  direction's bound of :func:`_step_bounds`, plus the rounding ``u`` of the
  O(lr) sum), the other leaves optax's AdamW with Dion's betas."""
  lr, wd = 0.02, 0.01
  with jax.enable_x64(True):
    params = _tree(0, shapes=_PARAMS)
    tx = dion(lr, rank_fraction=0.5, adam_learning_rate=3e-3)
    adamw = optax.adamw(3e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)
    state, adam_state = _init(tx)(params), None
    adam_params = {k: params[k] for k in ("embedding", "bias")}
    adam_state = _init(adamw)(adam_params)
    for step in range(4):
      g = _tree(30 + step, shapes=_PARAMS)
      dion_state = optax.tree_utils.tree_get(state, "DionState")
      u, state = _update(tx)(g, state, params)
      for k in ("w1", "w2"):
        gi, mi = np.asarray(g[k]), np.asarray(dion_state.buffer[k])
        qi = np.asarray(dion_state.factor[k][0])
        d = reference.dion_step(gi, mi, qi)[0]
        scale = np.sqrt(gi.shape[1] / gi.shape[0])
        want = -lr * (scale * d + wd * np.asarray(params[k]))
        bound = lr * scale * _step_bounds(gi, mi, qi, mu=0.95, eps=1e-8,
                                          u=2.0**-53)[0] + 4 * 2.0**-53 * lr
        np.testing.assert_allclose(u[k], want, rtol=0, atol=bound)
      want_adam, adam_state = adamw.update(
          {k: g[k] for k in adam_params}, adam_state, adam_params)
      # the same AdamW, jitted or not: m and v sum at most 4 steps' terms,
      # each rounded by a few u of the largest, and Cauchy-Schwarz bounds
      # sum|terms| / sqrt(v_hat) by sqrt(4 / (1 - b2)) < 9: 32 u * 9 * lr
      for k in adam_params:
        np.testing.assert_allclose(u[k], want_adam[k], rtol=0,
                                   atol=32 * 2.0**-53 * 9 * 3e-3)
      params = optax.apply_updates(params, u)
      adam_params = {k: params[k] for k in adam_params}


def test_ready_optimizer_defaults_and_zero_gradients():
  sig = inspect.signature(dion).parameters
  assert sig["learning_rate"].default is inspect.Parameter.empty
  for name, value in dict(rank_fraction=1.0, mu=0.95,
                          eps=1e-8, weight_decay=0.01, adam_b1=0.9,
                          adam_b2=0.95, adam_eps=1e-8).items():
    assert sig[name].default == value, name
  params = _tree(0, jnp.float32, _PARAMS)
  tx = dion(0.01, weight_decay=0.0)
  u, _ = _update(tx)(jax.tree.map(jnp.zeros_like, params), _init(tx)(params),
                   params)
  for k, x in u.items():
    assert np.all(np.asarray(x) == 0), k


def test_orbax_resume_is_bit_identical(tmp_path):
  tx = dion(0.02, rank_fraction=0.5)
  params0 = _tree(0, jnp.float32, _PARAMS)
  target = _tree(1, jnp.float32, {"t": (20, 8)})["t"]

  def loss_fn(p):
    h = jnp.tanh(p["embedding"] @ p["w1"]) @ p["w2"] + p["bias"]
    return jnp.mean((h - target) ** 2)

  @jax.jit
  def step(params, state):
    u, state = tx.update(jax.grad(loss_fn)(params), state, params)
    return optax.apply_updates(params, u), state

  def run(params, state, n):
    for _ in range(n):
      params, state = step(params, state)
    return params, state

  straight = run(params0, _init(tx)(params0), 6)
  first = run(params0, _init(tx)(params0), 3)
  restored = orbax_round_trip(tmp_path / "ckpt",
                              {"params": first[0], "opt_state": first[1]})
  resumed = run(restored["params"], restored["opt_state"], 3)
  assert not np.array_equal(straight[0]["w1"], params0["w1"])
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)


_SHARDED_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import orthax
from sharded import hlo_costs, COLLECTIVES
from test_dion import _step_bounds
from orthax.transforms.dion import scale_by_dion
jax.config.update("jax_enable_x64", True)
u64 = 2.0**-53
rng = np.random.default_rng(0)
# fan_in sharded (FSDP), fan_out sharded, a stack sharded along its batch
shapes = {"fan_in": (64, 48), "fan_out": (24, 64), "experts": (8, 16, 24)}
specs = {"fan_in": P("fsdp", None), "fan_out": P(None, "fsdp"),
         "experts": P("fsdp", None, None)}
dims = {"fan_in": None, "fan_out": None,
        "experts": orthax.MuonDimensionNumbers(1, 2)}
tx = scale_by_dion(0.25, dimension_numbers=dims)
grads = [{k: rng.normal(size=s) for k, s in shapes.items()} for _ in range(2)]
plain = jax.jit(tx.update)
for kind in (AxisType.Explicit, AxisType.Auto):
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(kind,))
  put = lambda t: {k: jax.device_put(x, NamedSharding(mesh, specs[k]))
                   for k, x in t.items()}
  state = jax.jit(tx.init)(grads[0])
  with jax.set_mesh(mesh):
    update = jax.jit(tx.update)
    placed = jax.jit(tx.init)(put(grads[0]))  # the state's own shardings
    for g in grads:
      sharded_state = jax.tree.map(
          lambda x, like: jax.device_put(x, like.sharding), state, placed)
      got, _ = update(put(g), sharded_state)
      want, new_state = plain(g, state)
      for k in shapes:
        if kind == AxisType.Explicit:
          assert got[k].sharding.spec == specs[k], (k, got[k].sharding)
        for i in range(len(state.factor[k])):
          sl = (lambda x: x) if k != "experts" else (lambda x: x[i])
          # both programs compute the same step from the same state, and
          # differ in the order of their sums only: each is within the
          # derived bound of the exact step, so within twice it of the other
          bd = _step_bounds(sl(g[k]), sl(np.asarray(state.buffer[k])),
                            np.asarray(state.factor[k][i]), mu=0.95,
                            eps=1e-8, u=u64)[0]
          err = np.max(np.abs(sl(np.asarray(got[k])) - sl(np.asarray(want[k]))))
          assert err <= 2 * bd, (kind, k, err, bd)
      state = new_state
    # bytes: fan_in sharded (64 x 48, r = 12): B^T Q (48 x 12) reduced, 12
    # column norms, max|B| and the zero flag; fan_out sharded (24 x 64,
    # r = 6): B^T Q gathered (64 x 6) and R = B P (24 x 6) reduced, the
    # same scalars; the batch-sharded stack: nothing. float64: 8 bytes.
    costs = hlo_costs(update.lower(put(grads[0]), sharded_state)
                      .compile().as_text())
    total = sum(costs[op] for op in COLLECTIVES)
    allowed = 8 * (48 * 12 + 12 + 2) + 8 * ((64 + 24) * 6 + 6 + 2)
    whole = 8 * sum(np.prod(s) for s in shapes.values())
    print(kind, "collective bytes", total, "allowed", allowed, "whole", whole)
    assert total <= allowed, (kind, total, allowed)
    assert allowed < whole / 6  # gathering the matrices would move ~whole
print("ok")
"""


def test_sharded_equals_unsharded_and_moves_only_the_factors():
  """On 8 devices (a subprocess), ``Explicit`` and ``Auto`` axes: leaves
  sharded along fan_in, fan_out and a batch axis; each sharded step from
  the unsharded run's state equals the unsharded step within the derived
  bound, and the compiled program's collectives carry only the low-rank
  factors and per-column scalars (an upper bound from ``n r`` and ``m r``
  entries, far below the matrices' bytes)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=8")
  here = os.path.dirname(os.path.abspath(__file__))
  env["PYTHONPATH"] = os.pathsep.join(
      [here, os.path.join(os.path.dirname(here), "benchmarks"),
       env.get("PYTHONPATH", "")])
  run = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
