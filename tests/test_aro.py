"""ARO (``adaptive_rotate`` and ``orthax.structured.aro``) against the
float64 reference.

The reference (``reference.aro``) is Langford's step (microsoft/dion,
dev/aro, ``dion/aro.py``) in NumPy float64, one 2-D matrix at a time, with
``side="output"`` on the torch-layout ``M^T`` as that code has it. Float
bounds come from :func:`_step_bound`, a first-order error analysis of one
step evaluated on the reference's own iterates.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ready_check
import reference
from checkpoints import orbax_round_trip
from orthax.matrices import MuonDimensionNumbers as DIMS
from orthax.structured import aro
from orthax.transforms.adaptive_rotate import (AdaptiveRotateState,
                                               adaptive_rotate)
from orthax.transforms.momentum import momentum

U32, U64 = 2.0**-24, 2.0**-53  # unit roundoffs
BETA = 0.95
STEPS = 6
# Higham, Accuracy and Stability, Thm 19.4: Householder QR of an s × s
# matrix is backward stable with gamma~_{c s^2}, c "a small integer
# constant"; 4 is taken for it.
QR_CONSTANT = 4
# name: (shape, dimension numbers, side); the rotated side s is at most
# the other one, k, in each (see test_larger_side_is_rounding_dominated).
CASES = {
    "square_input": ((8, 8), None, "input"),
    "square_output": ((8, 8), None, "output"),
    "wide": ((6, 12), None, "smaller"),
    "tall": ((12, 6), None, "smaller"),
    "stacked": ((3, 6, 10), DIMS(1, 2), "smaller"),
}


def _np_grads(seed, shapes, steps=STEPS):
  """Gaussian gradients, float64 NumPy arrays."""
  rng = np.random.default_rng(seed)
  return [{k: rng.normal(size=s) for k, s in shapes.items()}
          for _ in range(steps)]


def _grads(seed, shapes, dtype, steps=STEPS):
  return [{k: jnp.asarray(x, dtype) for k, x in g.items()}
          for g in _np_grads(seed, shapes, steps)]


def _chain(base="sinkhorn", side="smaller", dims=None, **kw):
  return optax.chain(momentum(BETA, nesterov=False),
                     adaptive_rotate(base, side=side, dimension_numbers=dims,
                                     **kw))


def _run(tx, grads):
  """The transform's outputs over the steps (jitted), and its last state."""
  state = tx.init(grads[0])
  update = jax.jit(tx.update)
  outs = []
  for g in grads:
    u, state = update(g, state)
    outs.append(u)
  return outs, state


def _slices(x, dims):
  """A leaf as its list of 2-D float64 (fan_in, fan_out) matrices."""
  x = np.asarray(x, np.float64)
  if dims is None:
    return [x]
  return list(np.moveaxis(x, (dims.reduction_axis, dims.output_axis),
                          (-2, -1)).reshape(-1, *x.shape[-2:]))


def _oriented(m, side):
  return m if side == "input" or (side == "smaller"
                                  and m.shape[0] <= m.shape[1]) else m.T


# --------------------------------------------------------------------------
# The error analysis


def _gamma(n, u):
  return n * u / (1 - n * u)


def _base_error(y, dy, base, u, iters=5):
  """``f(y)`` and a first-order bound on the Frobenius error of the
  floating-point ``f`` of an input within ``dy`` of ``y``.

  A normalization ``z_i -> sqrt(n) z_i / ||z_i||`` (rows, or columns, of
  length ``n``) has the Jacobian ``sqrt(n) / ||z_i|| (I - z^_i z^_i^T)``
  per vector: an input error grows by at most ``L = sqrt(n) / min ||z_i||``.
  Its own rounding: the sum of ``n`` squares (gamma_n on the square, half on
  the norm), the square root, the quotient, the product and the rounded
  ``sqrt(n)``, ``(n / 2 + 4) u`` relative per entry. ``sign`` is exact
  where no entry can cross zero (``dy < min |y|``), else unbounded.
  """
  if base == "sign":
    return np.sign(y), (0.0 if dy < np.abs(y).min() else np.inf)
  s, k = y.shape
  passes = ((1, k), (0, s)) if base == "sinkhorn" else ((1, k),)
  err, z = dy, y
  for _ in range(iters if base == "sinkhorn" else 1):
    for axis, n in passes:
      norms = np.linalg.norm(z, axis=axis, keepdims=True)
      z = z * np.sqrt(n) / norms
      err = np.sqrt(n) / norms.min() * err + (n / 2 + 4) * u * np.linalg.norm(z)
  return z, err


def _step_bound(x, r, base, u, dx=0.0, dr=0.0):
  """First-order bounds on one ARO step's errors, ``(||dD||_F, ||dR||_F)``,
  for ``x`` (``s × k``, rotated side first) known within ``dx`` and the
  previous rotation ``r`` within ``dr`` (Frobenius), in arithmetic of unit
  roundoff ``u``:

  * ``Y = Q^T x``: ``dQ ||x||_2 + dx`` carried, ``gamma_s || |Q^T| |x| ||``
    rounded; then ``f`` by :func:`_base_error`;
  * ``C = x f^T``: ``dx ||f||_2 + ||x||_2 df + gamma_k || |x| |f|^T ||``;
  * ``R = Q(C)``: Sun's first-order bound for the Q factor, ``||dQ||_F <=
    sqrt(2) ||C^-1||_2 ||dC||_F``, with Householder QR's backward error
    ``gamma~ ||C||_F`` added to ``dC`` and its distance to an orthogonal
    matrix ``sqrt(s) gamma~`` to ``dQ`` (gamma~ = gamma_{c s^2});
  * ``D = R f(R^T x)``: ``dR ||f||_2 + df + gamma_s || |R| |f| ||`` and the
    output's rounding ``u ||D||``.

  Flipping the sign of a column of ``R`` leaves ``D`` unchanged, so the
  bound holds for the sign convention that matches.
  """
  s, k = x.shape
  dx = dx + u * np.linalg.norm(x)  # orthax divides x by its peak first
  norm2 = lambda a: np.linalg.norm(a, 2)

  def rotated(q, dq):
    y = q.T @ x
    dy = (dq * norm2(x) + dx
          + _gamma(s, u) * np.linalg.norm(np.abs(q.T) @ np.abs(x)))
    return _base_error(y, dy, base, u)

  f, df = rotated(r, dr)
  c = x @ f.T
  dc = (dx * norm2(f) + norm2(x) * df
        + _gamma(k, u) * np.linalg.norm(np.abs(x) @ np.abs(f).T))
  qr = _gamma(QR_CONSTANT * s * s, u)
  smallest = np.linalg.svd(c, compute_uv=False)[-1]
  dq = (np.sqrt(2) / smallest * (dc + qr * np.linalg.norm(c))
        + np.sqrt(s) * qr)
  q, _ = np.linalg.qr(c)
  f2, df2 = rotated(q, dq)
  d = q @ f2
  dd = (dq * norm2(f2) + df2 + _gamma(s, u) * np.linalg.norm(
      np.abs(q) @ np.abs(f2)) + u * np.linalg.norm(d))
  return dd, dq


def _trajectory(grads, side, base):
  """The reference's momenta ``M_t`` (fan_in, fan_out) and rotations
  ``R_{t-1}`` for one 2-D matrix over the steps, from ``R_0 = I``."""
  m, r, out = None, None, []
  for g in grads:
    m = (1 - BETA) * g if m is None else BETA * m + (1 - BETA) * g
    x = _oriented(m, side)
    r = np.eye(x.shape[0]) if r is None else r
    out.append((m, r))
    _, r = reference.aro_direction(x, r, base)
  return out


def _match_signs(q, like):
  """``q`` with its columns' signs flipped to agree with ``like``'s."""
  return q * np.where(np.sum(q * like, axis=0) < 0, -1.0, 1.0)


def _leaf(slices, dims):
  """Inverse of :func:`_slices`."""
  if dims is None:
    return slices[0]
  return np.moveaxis(np.stack(slices), (-2, -1),
                     (dims.reduction_axis, dims.output_axis))


def _check_steps(base, dtype, u, cases, seed, teeth):
  """Every step of the reference's trajectory, one at a time: orthax's
  ``adaptive_rotate`` given the reference's momentum ``M_t`` and rotation
  ``R_{t-1}`` (rounded to ``dtype``; the reference takes the rounded
  values) returns the reference's ``D_t`` and ``R_t`` (up to column signs)
  within _step_bound, and that bound is below ``teeth`` of ``||D_t||``.
  Steps are checked one at a time because worst-case bounds carried from
  step to step (each multiplying by the base's Lipschitz constant and
  ``||C^-1||``) pass 1 within three steps, far above what happens."""
  # drawn for every case, so that a subset sees the same gradients
  grads = _np_grads(seed, {k: s for k, (s, _, _) in {**CASES, **cases}.items()})
  cast = lambda a: np.asarray(jnp.asarray(a, dtype), np.float64)
  for key, (_, dims, side) in cases.items():
    update = jax.jit(adaptive_rotate(base, side=side,
                                     dimension_numbers=dims).update)
    paths = [_trajectory(gs, side, base)
             for gs in zip(*[_slices(g[key], dims) for g in grads])]
    for t in range(STEPS):
      ms = [cast(path[t][0]) for path in paths]
      rs = [cast(path[t][1]) for path in paths]
      d, state = update({key: jnp.asarray(_leaf(ms, dims), dtype)},
                        AdaptiveRotateState(rotation={key: jnp.asarray(
                            np.stack(rs), dtype)}))
      got = _slices(d[key], dims)
      for i, (m, r) in enumerate(zip(ms, rs)):
        x = _oriented(m, side)
        want, q = reference.aro_direction(x, r, base)
        dd, dq = _step_bound(x, r, base, u)
        assert np.linalg.norm(_oriented(got[i], side) - want) <= dd, (key, t)
        rotation = np.asarray(state.rotation[key][i], np.float64)
        assert np.linalg.norm(_match_signs(rotation, q) - q) <= dq, (key, t)
        assert dd < teeth * np.linalg.norm(want), (key, t, dd)


# --------------------------------------------------------------------------
# Against the reference


@pytest.mark.parametrize("base", ["sinkhorn", "row_norm"])
def test_float64_steps_match_reference(base):
  """Six steps on square (both sides), wide, tall and stacked leaves (fewer
  for ``row_norm``, to save time), each
  within its float64 bound, which is below 1e-8 of ``||D||`` on these
  gradients. (A square ``C = X f(R^T X)^T`` can be ill conditioned, 1e7 on
  some draws, and its Q factor then is only known to ``||C^-1||`` times the
  rounding: the draw is one where every step's bound is that tight.)"""
  cases = CASES if base == "sinkhorn" else {
      k: CASES[k] for k in ("square_output", "tall", "stacked")}
  with jax.enable_x64(True):
    _check_steps(base, jnp.float64, U64, cases, 4, teeth=1e-8)


def test_sign_base_steps_match_reference():
  """``sign`` on a 6 × 24 matrix, whose 6 × 6 ``C`` is well conditioned;
  _step_bound is finite only if no entry of ``R^T M`` is within rounding of
  zero (then the signs are exact)."""
  with jax.enable_x64(True):
    _check_steps("sign", jnp.float64, U64, {"w": ((6, 24), None, "input")},
                 1, teeth=1e-8)


@pytest.mark.parametrize("base", ["sinkhorn", "row_norm"])
def test_float32_steps_within_derived_bound(base):
  """float32 on the wide, tall and stacked leaves (stacked only for
  ``row_norm``), within _step_bound's
  float32 bound: a few percent of ``||D||`` at most, the Lipschitz
  constants of ten normalizations being worst cases."""
  names = ("wide", "tall", "stacked") if base == "sinkhorn" else ("stacked",)
  _check_steps(base, jnp.float32, U32, {k: CASES[k] for k in names}, 2,
               teeth=0.05)


def test_chain_follows_reference_over_the_steps():
  """The chain with its momentum, run on its own for six float64 steps,
  stays with the reference's run within 1e-10 of ``||D||``. Not a derived
  bound (carried worst cases grow past 1, see _check_steps): each step's
  own error is bounded above, and the momentum's rounding is 4 u per step
  of its sums of magnitudes."""
  cases = {k: CASES[k] for k in ("wide", "stacked")}
  with jax.enable_x64(True):
    grads = _grads(3, {k: s for k, (s, _, _) in cases.items()}, jnp.float64)
    outs, _ = _run(_chain(dims={k: d for k, (_, d, _) in cases.items()}),
                   grads)
  for key, (_, dims, _) in cases.items():
    for i, gs in enumerate(zip(*[_slices(g[key], dims) for g in grads])):
      # both are (6, k) with k > 6: "smaller" is the input side
      for t, want in enumerate(reference.aro(gs, side="input", beta=BETA)):
        got = _slices(outs[t][key], dims)[i]
        assert np.linalg.norm(got - want) <= 1e-10 * np.linalg.norm(want)


# --------------------------------------------------------------------------
# Properties (METHODS.md section 4 (e))


def _orthogonal(seed, s):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(s, s)))
  return q


def test_direction_is_invariant_to_column_signs_of_the_rotation():
  """``R -> R S`` (S = diag(±1)) gives ``C S``, whose Q factor is ``Q S'``
  for the signs S' that QR picks, and ``D = Q S' f(S' Q^T X) = Q f(Q^T X)``
  (each base is odd in a row): the same ``D``, to float64 rounding
  (_step_bound's float64 bound for each)."""
  with jax.enable_x64(True):
    g = jnp.asarray(np.random.default_rng(3).normal(size=(6, 10)))
    r = _orthogonal(4, 6)
    signs = np.where(np.random.default_rng(5).random(6) < 0.5, -1.0, 1.0)
    update = jax.jit(adaptive_rotate().update)
    run = lambda rot: update({"w": g}, AdaptiveRotateState(
        rotation={"w": jnp.asarray(rot)[None]}))[0]["w"]
    d, flipped = run(r), run(r * signs)
    other = run(_orthogonal(6, 6))
  bound, _ = _step_bound(np.asarray(g), r, "sinkhorn", U64)
  assert np.linalg.norm(np.asarray(d) - np.asarray(flipped)) <= 2 * bound
  # and the rotation matters: another R gives another D
  assert np.linalg.norm(np.asarray(other) - np.asarray(d)) > 1e-3


def test_row_norm_fixed_point_is_scaled_polar_factor():
  """With ``f = row_norm`` and a fixed ``M = U S V^T`` (s <= k), ``R = U``
  is a fixed point: ``R^T M = S V^T`` has rows ``s_i v_i``, normalized to
  ``sqrt(k) v_i``, so ``C = U S V^T V sqrt(k) = sqrt(k) U S`` has Q factor
  ``U`` (up to column signs) and ``D = sqrt(k) U V^T = sqrt(k) polar(M)``,
  within the float64 step bound. From ``R = I`` the iteration converges to
  it: orthax's iterates track the reference's (each within the step bound
  of the previous, on a contraction) and the reference's distance to the
  fixed point shrinks; after 100 steps orthax's is within that distance
  plus 1e-10."""
  with jax.enable_x64(True):
    m = np.random.default_rng(7).normal(size=(6, 10))
    u, _, vt = np.linalg.svd(m, full_matrices=False)
    polar = np.sqrt(10) * u @ vt
    tx = adaptive_rotate("row_norm", side="input")
    g = {"w": jnp.asarray(m)}
    d, state = tx.update(g, AdaptiveRotateState(
        rotation={"w": jnp.asarray(u)[None]}))
    bound, _ = _step_bound(m, u, "row_norm", U64)
    assert np.linalg.norm(np.asarray(d["w"]) - polar) <= bound
    np.testing.assert_allclose(np.abs(state.rotation["w"][0]), np.abs(u),
                               atol=1e-12)
    state, update = tx.init(g), jax.jit(tx.update)
    r = np.eye(6)
    for _ in range(100):
      d, state = update(g, state)
      want, r = reference.aro_direction(m, r, "row_norm")
  distance = np.linalg.norm(want - polar)
  assert distance < 1e-6  # the reference converges
  assert np.linalg.norm(np.asarray(d["w"]) - polar) <= distance + 1e-10


def test_sinkhorn_columns_have_norm_sqrt_s_and_rms_one():
  """After the last column pass every column of ``f`` has norm sqrt(s),
  and ``D = R f`` keeps each column's norm: so ``RMS(D) = 1``. float32:
  the column pass rounds ``(s / 2 + 4) u`` relative, the product with
  ``R`` ``gamma_s`` and ``R``'s distance to orthogonality (Householder,
  sqrt(s) gamma_{4 s^2}, 0.02 at s = 12) another: under 3e-2 relative; in
  practice far less, but that is what can be promised."""
  shapes = {"wide": (6, 16), "tall": (12, 20)}
  grads = _grads(8, shapes, jnp.float32, steps=2)
  outs, _ = _run(_chain(), grads)
  for key, (s, k) in shapes.items():
    d = np.asarray(outs[-1][key], np.float64)
    bound = (s / 2 + 4) * U32 + _gamma(s, U32) + np.sqrt(s) * _gamma(
        QR_CONSTANT * s * s, U32)
    np.testing.assert_allclose(np.linalg.norm(d, axis=0), np.sqrt(s),
                               rtol=bound)
    np.testing.assert_allclose(np.sqrt(np.mean(d**2)), 1.0, rtol=bound)


def test_first_step_uses_the_identity():
  """init holds ``R_0 = I`` per matrix slice (exactly), and the first step
  is the reference's from ``I``; from another ``R_0`` it would differ."""
  with jax.enable_x64(True):
    g = jnp.asarray(np.random.default_rng(9).normal(size=(2, 5, 9)))
    tx = adaptive_rotate(dimension_numbers=DIMS(1, 2))
    state = tx.init({"w": g})
    np.testing.assert_array_equal(state.rotation["w"],
                                  np.broadcast_to(np.eye(5), (2, 5, 5)))
    d, _ = tx.update({"w": g}, state)
  for i in range(2):
    x = np.asarray(g[i])
    want, _ = reference.aro_direction(x, np.eye(5), "sinkhorn")
    bound, _ = _step_bound(x, np.eye(5), "sinkhorn", U64)
    assert np.linalg.norm(np.asarray(d["w"][i]) - want) <= bound
    other, _ = reference.aro_direction(x, _orthogonal(10, 5), "sinkhorn")
    assert np.linalg.norm(other - want) > 1e-3


def test_output_side_is_input_side_on_the_transpose():
  """``side="output"`` on ``W`` is ``side="input"`` on ``W^T``: the same
  operations on the same numbers, up to which axis is which, so equal to
  rounding (a reordered reduction at most): twice _step_bound's float32
  bound, from ``R = I`` and from a random rotation."""
  g = np.random.default_rng(11).normal(size=(12, 7)).astype(np.float32)
  x = np.asarray(g, np.float64).T
  output_side = jax.jit(adaptive_rotate(side="output").update)
  input_side = jax.jit(adaptive_rotate(side="input").update)
  for r in (np.eye(7), _orthogonal(19, 7).astype(np.float32)):
    state = AdaptiveRotateState(rotation={"w": jnp.asarray(r, jnp.float32)[None]})
    out, _ = output_side({"w": jnp.asarray(g)}, state)
    out_t, _ = input_side({"w": jnp.asarray(g.T)}, state)
    bound, _ = _step_bound(x, np.asarray(r, np.float64), "sinkhorn", U32)
    assert np.linalg.norm(np.asarray(out["w"]).T - np.asarray(out_t["w"])) \
        <= 2 * bound


def test_larger_side_is_rounding_dominated():
  """Rotating the larger side (s > k) leaves ``s - k`` rows of ``R^T M``
  that are zero in exact arithmetic; the row normalizations scale their
  rounding up to full size, so float32 and float64 disagree by O(1), as the
  docstring says. ``"smaller"`` picks the other side."""
  grads = _np_grads(12, {"w": (6, 12)}, steps=2)
  with jax.enable_x64(True):
    d64, _ = _run(_chain(side="output"), [
        {"w": jnp.asarray(g["w"], jnp.float64)} for g in grads])
  d32, _ = _run(_chain(side="output"), [
      {"w": jnp.asarray(g["w"], jnp.float32)} for g in grads])
  diff = np.linalg.norm(np.asarray(d64[-1]["w"]) - np.asarray(d32[-1]["w"]))
  assert diff > 0.1 * np.linalg.norm(np.asarray(d64[-1]["w"]))
  state = _chain().init({"w": jnp.zeros((6, 12))})
  assert state[1].rotation["w"].shape == (1, 6, 6)


# --------------------------------------------------------------------------
# Edge cases, dtypes, jit, checkpoints


def test_zero_gradients_give_zero_and_keep_the_rotation():
  """A zero matrix gives a zero ``D`` (no NaN from QR of a zero ``C``) and
  keeps its rotation, also after nonzero steps (no momentum: the input
  itself is zero)."""
  tx = adaptive_rotate()
  g = {"w": jnp.asarray(np.random.default_rng(13).normal(size=(5, 8)),
                        jnp.float32)}
  zero = jax.tree.map(jnp.zeros_like, g)
  update = jax.jit(tx.update)
  d, state = update(zero, tx.init(g))
  assert np.all(np.asarray(d["w"]) == 0)
  np.testing.assert_array_equal(state.rotation["w"][0], np.eye(5))
  _, state = update(g, state)
  d, kept = update(zero, state)
  assert np.all(np.asarray(d["w"]) == 0)
  np.testing.assert_array_equal(kept.rotation["w"], state.rotation["w"])


@pytest.mark.parametrize("scale", [2.0**100, 2.0**-120])
def test_scale_invariant_for_any_finite_input(scale):
  """Each matrix is divided by its largest magnitude first (by a power of
  two, exactly): a gradient scaled by 2^100 or 2^-120 (subnormal entries
  included) gives bit for bit the same direction and rotation."""
  g = np.random.default_rng(14).normal(size=(6, 9)).astype(np.float32)
  tx = adaptive_rotate()
  update = jax.jit(tx.update)
  state = tx.init({"w": jnp.asarray(g)})
  want = update({"w": jnp.asarray(g)}, state)
  got = update({"w": jnp.asarray(g * np.float32(scale))}, state)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.all(np.isfinite(np.asarray(a)))
    np.testing.assert_array_equal(a, b)


def test_bfloat16_leaves_keep_a_float32_rotation():
  """bfloat16 leaves are computed in float32 from their exact float32
  values: the output is the float32 run's, rounded once to bfloat16."""
  g = np.random.default_rng(15).normal(size=(2, 6, 10))
  g16 = jnp.asarray(g, jnp.bfloat16)
  tx = adaptive_rotate(dimension_numbers=DIMS(1, 2))
  d16, state16 = jax.jit(tx.update)({"w": g16}, tx.init({"w": g16}))
  g32 = g16.astype(jnp.float32)
  d32, state32 = jax.jit(tx.update)({"w": g32}, tx.init({"w": g32}))
  assert d16["w"].dtype == jnp.bfloat16
  assert state16.rotation["w"].dtype == jnp.float32
  np.testing.assert_array_equal(d16["w"], d32["w"].astype(jnp.bfloat16))
  np.testing.assert_array_equal(state16.rotation["w"], state32.rotation["w"])


def test_callable_base():
  """A callable base is applied to the rotated stack: ``jnp.sign`` is the
  ``"sign"`` base, bit for bit."""
  g = {"w": jnp.asarray(np.random.default_rng(16).normal(size=(5, 9)),
                        jnp.float32)}
  a = adaptive_rotate(jnp.sign).update(g, adaptive_rotate().init(g))
  b = adaptive_rotate("sign").update(g, adaptive_rotate().init(g))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_jit_matches_eager():
  """Eager and jitted runs evaluate the same float64 operations, possibly
  fused differently: within twice _step_bound's float64 bound."""
  with jax.enable_x64(True):
    g = {"w": jnp.asarray(np.random.default_rng(17).normal(size=(6, 11)))}
    tx = adaptive_rotate()
    state = tx.init(g)
    eager, _ = tx.update(g, state)
    jitted, _ = jax.jit(tx.update)(g, state)
  bound, _ = _step_bound(np.asarray(g["w"]), np.eye(6), "sinkhorn", U64)
  assert np.linalg.norm(np.asarray(eager["w"]) - np.asarray(jitted["w"])) \
      <= 2 * bound


def test_orbax_resume_is_bit_identical(tmp_path):
  dims = {"stacked": CASES["stacked"][1], "wide": None}
  grads = _grads(18, {"stacked": CASES["stacked"][0], "wide": (6, 12)},
                 jnp.float32)
  tx = _chain(dims=dims)
  straight, _ = _run(tx, grads)
  first, state = _run(tx, grads[:3])
  restored = orbax_round_trip(tmp_path / "ckpt", {"state": state})["state"]
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  update = jax.jit(tx.update)
  for t, g in enumerate(grads[3:], 3):
    u, restored = update(g, restored)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(straight[t])):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("make, match", [
    (lambda: adaptive_rotate("adam"), r"unknown base 'adam'"),
    (lambda: adaptive_rotate(side="left"), r"unknown side 'left'"),
    (lambda: adaptive_rotate(sinkhorn_iters=0), r"sinkhorn_iters must be"),
    (lambda: adaptive_rotate(eps=0.0), r"eps must be in \(0"),
    (lambda: adaptive_rotate(rotation_dtype=jnp.bfloat16),
     r"rotation_dtype must be float32 or float64"),
])
def test_bad_hyperparameters(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_bad_leaves_are_named():
  params = {"a": jnp.ones((4, 6)), "b": jnp.ones((3,))}
  tx = adaptive_rotate()
  with pytest.raises(ValueError, match=r"\['b'\] has shape \(3,\)"):
    tx.init(params)
  w = {"w": jnp.ones((4, 6))}
  with pytest.raises(ValueError, match=r"\['w'\] \(shape \(4, 6\)\) has side "
                     r"'up'"):
    adaptive_rotate(side={"w": "up"}).init(w)
  with pytest.raises(ValueError, match=r"side must be one of"):
    adaptive_rotate(side={"v": "input"}).init(w)
  with pytest.raises(ValueError,
                     match=r"\['w'\] is an array of shape \(1, 4, 4\); "
                     r"expected an array of shape \(1, 6, 6\)"):
    adaptive_rotate(side="output").update(w, tx.init(w))
  with pytest.raises(ValueError, match=r"\['w'\] has a gradient of shape"):
    tx.update({"w": jnp.ones((4, 7))}, tx.init(w), w)
  with pytest.raises(TypeError, match=r"\['w'\] has dtype int32"):
    tx.update({"w": jnp.ones((4, 6), jnp.int32)}, tx.init(w))


def test_empty_matrix_gives_empty_update_and_no_state():
  tx = adaptive_rotate()
  g = {"w": jnp.ones((0, 5)), "v": jnp.ones((3, 4))}
  state = tx.init(g)
  assert state.rotation["w"] is None
  d, _ = tx.update(g, state)
  assert d["w"].shape == (0, 5) and np.all(np.isfinite(np.asarray(d["v"])))


# --------------------------------------------------------------------------
# The ready optimizer


def test_ready_optimizer_follows_the_float64_reference():
  """Four float64 steps of ``aro(lr)``: the hidden matrix follows
  ``W <- W - lr (0.2 D / RMS(D) + wd W)`` with the reference's ``D``, the
  bias and the embedding AdamW with betas (0.9, 0.95), to 1e-12 of O(1)
  entries. As in test_chain_follows_reference_over_the_steps, this is not
  a derived bound (worst cases carried over steps grow past 1): one step's
  error is bounded in _check_steps, and here the step, 0.2 lr = 6e-4
  times D, scales D's float64 rounding far below it."""
  lr, steps = 3e-3, 4
  with jax.enable_x64(True):
    params = ready_check.model(jnp.float64)
    grads = ready_check.gradients(params, steps)
    ds = reference.aro([np.asarray(g["hidden"]) for g in grads],
                       side="input", base="sinkhorn", beta=0.95)
    hidden = [np.asarray(params["hidden"])]
    for d in ds:
      w = hidden[-1]
      hidden.append(w - lr * (0.2 * d / np.sqrt(np.mean(d**2)) + 0.01 * w))
    adamw = optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)
    ready_check.assert_follows(aro(lr), params, grads, hidden[1:], adamw,
                               atol=1e-12)


def test_ready_optimizer_defaults_and_rotation_state():
  """Langford's defaults; the hidden matrix's rotation is float32 and
  ``s × s`` for its smaller side; a zero gradient gives a zero step."""
  sig = inspect.signature(aro).parameters
  for key, value in dict(base="sinkhorn", side="smaller", sinkhorn_iters=5,
                         base_eps=1e-8, target_rms=0.2, beta=0.95,
                         nesterov=False, weight_decay=0.01, adam_b1=0.9,
                         adam_b2=0.95).items():
    assert sig[key].default == value, key
  params = ready_check.model(jnp.bfloat16)
  tx = aro(1e-3, weight_decay=0.0)
  state = tx.init(params)
  rotations = [x for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) == 3]
  assert [(r.shape, r.dtype) for r in rotations] == [((1, 8, 8), jnp.float32)]
  zeros = jax.tree.map(jnp.zeros_like, params)
  u, state = jax.jit(tx.update)(zeros, state, params)
  for x in jax.tree.leaves((u, state)):
    assert np.all(np.isfinite(np.asarray(x, np.float32)))
  assert np.all(np.asarray(u["hidden"], np.float32) == 0)
