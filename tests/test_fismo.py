"""FISMO (``kronecker_whiten`` and the ready ``fismo``) against the float64
reference ``reference.fismo_step`` (METHODS.md §5, Algorithm 1), and the
method's properties.

The inner transform is ``momentum(beta, nesterov=False)`` then the exact
polar factor (``coeffs="svd"``) on both sides, so the two routes differ only
by rounding.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
import ready_check
import reference
from checkpoints import orbax_round_trip
from orthax.structured import fismo
from orthax.transforms.kronecker_whiten import (KroneckerWhitenState,
                                                kronecker_whiten)

BETA, GAMMA, MU = 0.9, 0.5, 0.05  # factors that move within a few steps
STEPS = 6
U32 = 2.0**-24  # float32 unit roundoff
DIMS = orthax.MuonDimensionNumbers
SHAPES = {
    "square": ((10, 10), None),
    "wide": ((6, 15), None),
    "tall": ((15, 6), None),
    "stacked": ((3, 8, 12), DIMS(1, 2)),
}
SPECS = {k: spec for k, (_, spec) in SHAPES.items()}


def _grads(seed, dtype=jnp.float64, shapes=SHAPES, steps=STEPS):
  """Gradients ``D_in N D_out`` at the scale 1e-3: white noise ``N`` with
  rows and columns scaled by 0.5 to 2, so that both factors move away from
  the identity."""
  rng = np.random.default_rng(seed)
  scales = {k: [np.geomspace(0.5, 2, s[a]).reshape(
      [s[a] if i == a else 1 for i in range(len(s))])
      for a in ((0, 1) if spec is None else (spec.reduction_axis,
                                             spec.output_axis))]
      for k, (s, spec) in shapes.items()}
  return [{k: jnp.asarray(1e-3 * scales[k][0] * scales[k][1]
                          * rng.normal(size=s), dtype)
           for k, (s, _) in shapes.items()} for _ in range(steps)]


def _tx(*, beta=BETA, gamma=GAMMA, damping=MU, dims=SPECS, **kw):
  inner = optax.chain(orthax.momentum(beta, nesterov=False),
                      orthax.orthogonalize(coeffs="svd",
                                           dimension_numbers=dims))
  return kronecker_whiten(inner, gamma=gamma, damping=damping,
                          dimension_numbers=dims, **kw)


def _run(tx, grads, params=None):
  """Every step's updates and the final state (one jit)."""
  state = tx.init(grads[0] if params is None else params)
  update, out = jax.jit(tx.update), []
  for g in grads:
    u, state = update(g, state, params)
    out.append(u)
  return out, state


def _slices(x, spec):
  return reference.matrices_of(np.asarray(x, np.float64), spec)


def _reference(grads, shapes=SHAPES, **kw):
  """fismo_run on every 2-D slice: {leaf: [(steps, factors) per slice]}."""
  kw = dict(beta=BETA, gamma=GAMMA, damping=MU) | kw
  return {k: [reference.fismo_run(list(gs), **kw) for gs in
              zip(*[_slices(g[k], spec) for g in grads])]
          for k, (_, spec) in shapes.items()}


def _finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------
# A first-order bound on one step's rounding error
#
# Norms are Frobenius unless two() (spectral). gam(k) = k u / (1 - k u)
# bounds the rounding of a dot product of length k (Higham, Thm. 3.5):
# |fl(A B) - A B| <= gam(k) |A| |B| entrywise. The eigendecomposition is taken
# as backward stable with constant d: the computed pairs are exact for F + E,
# ||E|| <= d u ||F||, and the computed eigenvectors are within d u (spectral)
# of an orthogonal matrix; the SVD likewise with max(d1, d2).


def _gam(k, u):
  return k * u / (1 - k * u)


def _two(a):
  return np.linalg.norm(a, 2)


def _fro(a):
  return np.linalg.norm(a)


def _factor_bound(old, stat, d_stat, u, gamma, mu):
  """The refreshed factor and its error from the statistic's ``d_stat``:
  ``d stat / tr`` moves by ``d/tr (d_stat + ||stat|| d_tr / tr)`` with
  ``|d_tr| <= sqrt(d) d_stat`` plus the trace's summation; the average
  passes ``(1 - gamma)`` of it on (and rounds each of its 4 operations);
  the second trace normalization amplifies the same way; the scaling, the
  division and the symmetrization round 4 times."""
  d = old.shape[0]
  tr = np.trace(stat)
  scaled = d * stat / tr
  d_scaled = (d / tr * (d_stat + _fro(stat) * (np.sqrt(d) * d_stat
                                                + _gam(d, u) * tr) / tr)
              + 2 * u * _fro(scaled))
  damp = mu * np.trace(old) / d
  mixed = gamma * old + (1 - gamma) * (scaled + damp * np.eye(d))
  d_mixed = (1 - gamma) * (d_scaled + np.sqrt(d) * _gam(d + 2, u) * damp) + \
      _gam(4, u) * (gamma * _fro(old) + (1 - gamma) * (
          _fro(scaled) + np.sqrt(d) * damp))
  trm = np.trace(mixed)
  new = d * mixed / trm
  d_new = (d / trm * (d_mixed + _fro(mixed) * (np.sqrt(d) * d_mixed
                                               + _gam(d, u) * trm) / trm)
           + 4 * u * _fro(new))
  return (new + new.T) / 2, d_new


def _root_bound(f, d_f, u):
  """``F^(-1/2)`` and its error: the map's Frobenius gain is at most
  ``max |(x^(-1/2))'| = lambda_min^(-3/2) / 2`` (Daleckii-Krein: the
  derivative's divided differences of a convex decreasing function are
  bounded by its slope at lambda_min), applied to ``d_f`` and eigh's
  backward error; the non-orthogonality of ``V`` moves ``V D V^T`` by ``2
  ||dV|| ||D||``; forming it rounds by ``gam(d + 1) ||V||^2 ||D||``, the
  reciprocal roots by ``u``."""
  d = f.shape[0]
  lmin = np.linalg.eigvalsh(f)[0]
  root = reference.fismo_inv_sqrt(f)
  d_root = (0.5 * lmin**-1.5 * (d_f + d * u * _fro(f))
            + (2 * d * u * np.sqrt(d) + _gam(d + 1, u) * d) * lmin**-0.5
            + u * _fro(root))
  return root, d_root


def _step_bound(g, p_old, q_old, mom_old, u, *, beta, gamma, mu):
  """First-order bound on ``||dX_orthax - dX||`` for one step of the
  paper-oriented ``g`` (``d1 x d2``) from the state ``(P, Q, M)``, which
  both sides are given exactly but for ``Q^(-1/2)``, which orthax holds
  rounded (``u ||Q^-1/2||``). Each line propagates the error of the
  previous values through the next operation and adds its rounding."""
  d1, d2 = g.shape
  x = g / np.max(np.abs(g))   # rounded once (the division by the mantissa)
  ro = reference.fismo_inv_sqrt(q_old)
  z = x @ ro
  d_z = u * _fro(ro) * _two(x) + _gam(d2 + 1, u) * _fro(np.abs(x) @ np.abs(ro))
  s = z @ z.T
  d_s = 2 * d_z * _two(z) + _gam(d2, u) * _fro(np.abs(z) @ np.abs(z).T)
  p, d_p = _factor_bound(p_old, s, d_s, u, gamma, mu)
  rp, d_rp = _root_bound(p, d_p, u)
  w = rp @ x
  d_w = d_rp * _two(x) + _gam(d1 + 1, u) * _fro(np.abs(rp) @ np.abs(x))
  t = w.T @ w
  d_t = 2 * d_w * _two(w) + _gam(d1, u) * _fro(np.abs(w).T @ np.abs(w))
  q, d_q = _factor_bound(q_old, t, d_t, u, gamma, mu)
  rq, d_rq = _root_bound(q, d_q, u)

  def sandwich(a, d_a):
    """``rp a rq`` and its error (two products, lengths d1 and d2)."""
    return rp @ a @ rq, (d_rp * _two(a) * _two(rq) + _two(rp) * d_a * _two(rq)
                         + _two(rp) * _two(a) * d_rq + _gam(d1 + d2, u)
                         * _fro(np.abs(rp) @ np.abs(a) @ np.abs(rq)))

  gt, d_gt = sandwich(g, 0.0)
  mom = beta * mom_old + (1 - beta) * gt
  d_mom = (1 - beta) * d_gt + _gam(3, u) * (beta * _fro(mom_old)
                                            + (1 - beta) * _fro(gt))
  # polar factor: Frobenius gain 2 / sigma_min for a full-rank matrix (Li
  # and Sun 2003), on d_mom and the SVD's backward error; U V^T rounds by
  # gam(r) ||U|| ||V|| = gam(r) r
  r = min(d1, d2)
  sigma_min = np.linalg.svd(mom, compute_uv=False)[-1]
  d_o = (2 / sigma_min * (d_mom + max(d1, d2) * u * _fro(mom))
         + _gam(r, u) * r)
  out, d_out = sandwich(reference.exact_polar(mom), d_o)
  return d_out + u * _fro(out)


# --------------------------------------------------------------------------
# Against the reference


@pytest.mark.parametrize("side_order, update_every, names", [
    ("output_first", 1, tuple(SHAPES)), ("input_first", 1, ("stacked",)),
    ("output_first", 3, ("wide",))])
def test_float64_steps_match_reference(side_order, update_every, names):
  """Six float64 steps on square, wide, tall and stacked leaves: every
  step's update and the final factors. Each step's own rounding is
  _step_bound at u = 2^-53, below 1e-12 of these O(1) updates (the float32
  test's bound times 2^-29); the state carries it on, shrunk by the average
  (gamma = 0.5) and the momentum (beta = 0.9), so 1e-10 covers six steps.
  The other side order falls outside it (teeth)."""
  shapes = {k: SHAPES[k] for k in names}
  dims = {k: SPECS[k] for k in names}
  flipped = {"output_first": "input_first", "input_first": "output_first"}
  with jax.enable_x64(True):
    grads = _grads(0, shapes=shapes)
    steps, state = _run(_tx(side_order=side_order, update_every=update_every,
                            dims=dims), grads)
  want = _reference(grads, shapes, side_order=side_order,
                    update_every=update_every)
  other = _reference(grads, shapes, side_order=flipped[side_order],
                     update_every=update_every)
  for k, (_, spec) in shapes.items():
    for i, (ref_steps, ref_factors) in enumerate(want[k]):
      for t in range(STEPS):
        np.testing.assert_allclose(_slices(steps[t][k], spec)[i],
                                   ref_steps[t], rtol=0, atol=1e-10)
      for got, factor in zip((state.input_factor, state.output_factor),
                             ref_factors[-1]):
        np.testing.assert_allclose(np.asarray(got[k])[i], factor, rtol=0,
                                   atol=1e-10)
      assert np.max(np.abs(_slices(steps[-1][k], spec)[i]
                           - other[k][i][0][-1])) > 1e-6
  assert state.input_factor[names[0]].dtype == jnp.float64


def _fed_state(tx, grads, p_in, p_out, mom):
  """``tx``'s state holding the given float64 factors (lists of slices per
  leaf), their roots and the whitened momentum (orthax's layout), rounded to
  the gradients' dtype as orthax stores them."""
  state = tx.init(grads)
  cast = lambda tree: {k: jnp.asarray(np.stack(v).reshape(
      (-1,) + v[0].shape), grads[k].dtype) for k, v in tree.items()}
  roots = lambda tree: {k: [reference.fismo_inv_sqrt(f) for f in v]
                        for k, v in tree.items()}
  momentum_state, polar_state = state.inner_state
  mu = {k: jnp.asarray(np.stack(v).reshape(grads[k].shape), grads[k].dtype)
        for k, v in mom.items()}
  return state._replace(
      input_factor=cast(p_in), output_factor=cast(p_out),
      input_root=cast(roots(p_in)), output_root=cast(roots(p_out)),
      inner_state=(momentum_state._replace(mu=mu), polar_state))


def _conditioned_grads(seed, shapes, steps=STEPS):
  """float32 gradients ``D_in U S V^T D_out``: singular values from 1 to 2,
  rows and columns scaled by 0.7 to 1.4, so that the polar factor and the
  roots are well conditioned and the bound below is not swamped by them."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    g = {}
    for k, (shape, spec) in shapes.items():
      slices = []
      for _ in range(1 if spec is None else shape[0]):
        m, n = shape[-2:]
        u_, _ = np.linalg.qr(rng.normal(size=(m, min(m, n))))
        v_, _ = np.linalg.qr(rng.normal(size=(n, min(m, n))))
        core = u_ * np.linspace(1, 2, min(m, n)) @ v_.T
        slices.append(np.geomspace(0.7, 1.4, m)[:, None] * core
                      * np.geomspace(0.7, 1.4, n)[None, :])
      g[k] = jnp.asarray(np.stack(slices).reshape(shape), jnp.float32)
    out.append(g)
  return out


def test_float32_steps_within_derived_bound():
  """Each of four float32 steps (output_first, wide, tall and stacked leaves)
  from the reference trajectory's state rounded to float32: orthax's update
  is within _step_bound of the reference's step from the same rounded
  state, and the bound is below 5e-2 of the update (teeth). One step at a
  time, because a first-order bound carried through the state would
  compound its worst cases at every step. The bound is a worst case chained
  through twelve stages (each normwise, with sqrt(d) between Frobenius and
  spectral norms): it lies about 1e4 above the errors seen (about 30 u);
  the float64 test above is the tight one."""
  beta, gamma, mu = 0.5, 0.5, 0.5
  names = ("wide", "tall", "stacked")
  shapes = {k: SHAPES[k] for k in names}
  dims = {k: SPECS[k] for k in names}
  grads = _conditioned_grads(1, shapes, steps=4)
  tx = _tx(beta=beta, gamma=gamma, damping=mu, dims=dims)
  update = jax.jit(tx.update)
  rounded = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  # the reference's state per slice, paper-oriented (x = g^T, P the fan_out
  # side's factor), from P = Q = I and M = 0
  paths = {k: [(np.eye(s[-1]), np.eye(s[-2]), np.zeros(s[-2:][::-1]))
               for _ in _slices(grads[0][k], dims[k])]
           for k, (s, _) in shapes.items()}
  for t, g in enumerate(grads):
    paths = {k: [tuple(map(rounded, st)) for st in v]
             for k, v in paths.items()}
    pick = lambda j, f=lambda a: a: {k: [f(st[j]) for st in v]
                                     for k, v in paths.items()}
    got, _ = update(g, _fed_state(tx, g, pick(1), pick(0),
                                  pick(2, lambda a: a.T)))
    for k, spec in dims.items():
      for i, x in enumerate(_slices(g[k], spec)):
        p, q, m = paths[k][i]
        want, *paths[k][i] = reference.fismo_step(
            x.T, p, q, m, beta=beta, gamma=gamma, damping=mu)
        bound = _step_bound(x.T, p, q, m, U32, beta=beta, gamma=gamma, mu=mu)
        err = np.linalg.norm(_slices(got[k], spec)[i].T - want)
        assert err <= bound, (k, t, i)
        assert bound < 5e-2 * np.linalg.norm(want), (k, t, i)


# --------------------------------------------------------------------------
# Properties of the method (METHODS.md section 5 (e))


def test_gamma_one_is_muon_with_ema_momentum():
  """gamma = 1 keeps P = Q = I (exactly: the trace of I is exact), so every
  step is the polar factor of the EMA momentum of the raw gradients. Only
  the float64 SVDs differ (a few u64 times the polar's gain): 1e-12."""
  with jax.enable_x64(True):
    grads = _grads(2, shapes={"wide": SHAPES["wide"]})
    steps, state = _run(_tx(gamma=1.0, dims=None), grads)
  m = 0.0
  for g, u in zip(grads, steps):
    m = BETA * m + (1 - BETA) * np.asarray(g["wide"])
    np.testing.assert_allclose(u["wide"], reference.exact_polar(m), rtol=0,
                               atol=1e-12)
  for f in (state.input_factor, state.output_factor, state.input_root,
            state.output_root):
    np.testing.assert_array_equal(f["wide"][0], np.eye(f["wide"].shape[-1]))


def test_factors_are_spd_with_the_trace_of_their_side():
  """After six float32 steps every factor is symmetric, positive definite,
  and has trace d. Symmetric to rounding: XLA may evaluate ``F[j, i]`` from
  another matrix product than ``F[i, j]`` (a transposed product rewritten),
  each entry a dot of length k (the other side, at most 15) through 6 more
  roundings, of entries at most max|F|: ``2 (k + 6) u max|F|``. The trace:
  3 roundings per entry (scaling, division, average) and the sum of d:
  ``(d + 3) u d``."""
  names = ("wide", "stacked")
  dims = {k: SPECS[k] for k in names}
  grads = _grads(3, jnp.float32, {k: SHAPES[k] for k in names})
  _, state = _run(_tx(dims=dims), grads)
  for factors in (state.input_factor, state.output_factor):
    for k in names:
      f = np.asarray(factors[k], np.float64)
      d = f.shape[-1]
      assert np.all(np.abs(f - np.swapaxes(f, -1, -2))
                    <= 2 * (15 + 6) * U32 * np.max(np.abs(f)))
      assert np.all(np.linalg.eigvalsh(f) > 0)
      assert np.all(np.abs(np.trace(f, axis1=1, axis2=2) - d)
                    <= (d + 3) * U32 * d)
      assert np.max(np.abs(f - np.eye(d))) > 0.05  # the factors moved


def test_step_is_optimal_in_the_trust_region():
  """With beta = 0, ``-dW`` minimizes <G, Y> over ``||A^1/2 Y B^1/2||_2 <=
  1`` (A, B the fan_in and fan_out factors): it is feasible with norm 1,
  reaches ``-||A^-1/2 G B^-1/2||_*``, and no random feasible Y does better.
  float64: the sides agree to a few u64 times the roots' and polar's gains
  (1e-10)."""
  with jax.enable_x64(True):
    grads = _grads(4, shapes={"tall": SHAPES["tall"]}, steps=3)
    steps, state = _run(_tx(beta=0.0, dims=None), grads)
    a, b = (np.asarray(f["tall"][0])
            for f in (state.input_factor, state.output_factor))
  g, du = np.asarray(grads[-1]["tall"]), -np.asarray(steps[-1]["tall"])
  half = lambda f: np.real(__import__("scipy.linalg").linalg.sqrtm(f))
  ra, rb = half(a), half(b)
  assert abs(np.linalg.norm(ra @ du @ rb, 2) - 1) < 1e-10
  whitened = np.linalg.inv(ra) @ g @ np.linalg.inv(rb)
  best = np.sum(g * du)
  assert abs(best + np.linalg.norm(whitened, "nuc")) < 1e-10
  rng = np.random.default_rng(0)
  for _ in range(50):
    z = rng.normal(size=g.shape)
    y = np.linalg.inv(ra) @ (z / np.linalg.norm(z, 2)) @ np.linalg.inv(rb)
    assert best <= np.sum(g * y) + 1e-10


def test_gamma_zero_converges_to_the_coupled_fixed_point():
  """gamma = 0 with one gradient repeated: the Gauss-Seidel refresh is a
  fixed-point iteration, here (damping 0.5) contracting by about 0.7 a step.
  After 60 steps the last step moved the factors by below 1e-9, and they
  satisfy A = F(G, B) and B = F(G^T, A) (the reference's refresh with gamma
  = 0, from the other side's factor) within 1e-8: the remaining movement
  over 1 - 0.7, plus float64 rounding."""
  with jax.enable_x64(True):
    g = _grads(5, shapes={"wide": SHAPES["wide"]}, steps=1)[0]
    tx = _tx(gamma=0.0, damping=0.5, dims=None)
    state, update = tx.init(g), jax.jit(tx.update)
    for _ in range(60):
      before = np.asarray(state.output_factor["wide"][0])
      _, state = update(g, state)
    p, q = (np.asarray(f["wide"][0])
            for f in (state.output_factor, state.input_factor))
  x = np.asarray(g["wide"]).T  # output_first: P = B on the left of G^T
  d1, d2 = x.shape
  refresh = lambda f, st: reference.fismo_factor(f, st, gamma=0.0,
                                                 damping=0.5)
  np.testing.assert_allclose(before, p, rtol=0, atol=1e-9)
  np.testing.assert_allclose(
      refresh(p, x @ np.linalg.inv(q) @ x.T / d2), p, rtol=0, atol=1e-8)
  np.testing.assert_allclose(
      refresh(q, x.T @ np.linalg.inv(p) @ x / d1), q, rtol=0, atol=1e-8)
  assert np.max(np.abs(p - np.eye(d1))) > 0.05  # not the identity


def test_update_every_keeps_the_factors_and_roots_between_refreshes():
  """update_every=3: the factors and roots after steps 2 and 3 are those of
  step 1 (bit for bit), step 4 refreshes them (the updates themselves follow
  the reference: test_float64_steps_match_reference)."""
  grads = _grads(6, jnp.float32, {"wide": SHAPES["wide"]}, steps=4)
  tx = _tx(update_every=3, dims=None)
  state, update, kept = tx.init(grads[0]), jax.jit(tx.update), []
  for g in grads:
    _, state = update(g, state)
    kept.append(state[1:5])
  for t in (1, 2):
    for a, b in zip(jax.tree.leaves(kept[0]), jax.tree.leaves(kept[t])):
      np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(kept[0]), jax.tree.leaves(kept[3])):
    assert np.max(np.abs(a - b)) > 1e-3


@pytest.mark.parametrize("scale", [2.0**60, 2.0**-60])
def test_the_gradient_scale_cancels(scale):
  """A power of two commutes with every rounding short of over- or
  underflow, and the statistics are taken on the matrix divided by its
  largest entry: gradients scaled by 2^60 or 2^-60 give the same updates
  and factors, bit for bit."""
  grads = _grads(7, jnp.float32, {"stacked": SHAPES["stacked"]}, steps=3)
  tx = _tx(dims=DIMS(1, 2))
  base = _run(tx, grads)
  scaled = _run(tx, [jax.tree.map(lambda x: x * scale, g) for g in grads])
  for a, b in zip(jax.tree.leaves(base[0]), jax.tree.leaves(scaled[0])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(base[1][1:5]),
                  jax.tree.leaves(scaled[1][1:5])):
    np.testing.assert_array_equal(a, b)


def test_zero_gradients_give_zero_updates_and_finite_factors():
  """Zero gradients with gamma = damping = 0 (no information at all, the
  averaged statistic is 0): zero updates, the factors kept. A side of size
  0 gives an empty update. (Zero gradients at the defaults:
  test_ready_optimizer_defaults_and_state.)"""
  zeros = {"w": jnp.zeros((6, 15)), "e": jnp.zeros((0, 5))}
  steps, state = _run(_tx(gamma=0.0, damping=0.0, dims=None), [zeros] * 2)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(steps))
  assert steps[0]["e"].shape == (0, 5) and _finite(state)
  for f in jax.tree.leaves(state[1:5]):  # kept: still the identity
    np.testing.assert_array_equal(f[0], np.eye(f.shape[-1]))


def test_bfloat16_leaves_keep_float32_factors():
  """bf16 gradients: the update is bf16, the factors float32 and equal to
  those of the same (exactly representable) gradients in float32, bit for
  bit; the update within bf16's rounding (2^-8 relative, twice: the
  whitened gradient handed to the inner transform, then the output),
  amplified by the polar factor's gain 2 ||M|| / sigma_min ≈ 10 here: 0.1
  of the update's norm."""
  shapes = {"wide": SHAPES["wide"]}
  grads = _grads(8, jnp.bfloat16, shapes, steps=2)
  tx = _tx(dims=None)
  steps, state = _run(tx, grads)
  steps32, state32 = _run(tx, [jax.tree.map(
      lambda x: x.astype(jnp.float32), g) for g in grads])
  assert steps[-1]["wide"].dtype == jnp.bfloat16
  assert state.input_factor["wide"].dtype == jnp.float32
  for a, b in zip(jax.tree.leaves(state[1:5]), jax.tree.leaves(state32[1:5])):
    np.testing.assert_array_equal(a, b)
  got = np.asarray(steps[-1]["wide"], np.float32)
  want = np.asarray(steps32[-1]["wide"])
  assert np.linalg.norm(got - want) < 0.1 * np.linalg.norm(want)


def test_orbax_resume_is_bit_identical(tmp_path):
  grads = _grads(10, jnp.float32, {"stacked": SHAPES["stacked"]}, steps=4)
  tx = _tx(update_every=2, dims=DIMS(1, 2))
  straight = _run(tx, grads)[1]
  first = _run(tx, grads[:2])[1]
  state = orbax_round_trip(tmp_path / "ckpt", first)
  assert isinstance(state, KroneckerWhitenState)
  update = jax.jit(tx.update)
  for g in grads[2:]:
    _, state = update(g, state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------
# Bad input


def test_bad_leaves_and_states_are_named():
  tx = _tx(dims=None)
  good = {"w": jnp.ones((4, 6))}
  with pytest.raises(ValueError, match=r"\['v'\] has shape \(3,\)"):
    tx.update({"w": jnp.ones((4, 6)), "v": jnp.ones(3)},
              tx.init({"w": jnp.ones((4, 6)), "v": jnp.ones(3)}))
  with pytest.raises(ValueError, match=r"\['w'\] has a gradient of shape"):
    tx.update(good, tx.init(good), {"w": jnp.ones((4, 5))})
  with pytest.raises(ValueError, match=r"\['w'\] \(input_factor\) is an "
                     r"array of shape \(1, 5, 5\); expected an array of "
                     r"shape \(1, 4, 4\)"):
    tx.update(good, tx.init({"w": jnp.ones((5, 6))}))
  with pytest.raises(TypeError, match=r"\['w'\] has dtype int32"):
    tx.update({"w": jnp.ones((4, 6), jnp.int32)}, tx.init(good))


@pytest.mark.parametrize("kw, error, match", [
    (dict(gamma=1.5), ValueError, "gamma"),
    (dict(damping=-1.0), ValueError, "damping"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(update_every=0), ValueError, "update_every"),
    (dict(update_every=1.5), TypeError, "update_every"),
    (dict(side_order="left"), ValueError, "side_order"),
])
def test_bad_hyperparameters(kw, error, match):
  with pytest.raises(error, match=match):
    kronecker_whiten(optax.identity(), **kw)


# --------------------------------------------------------------------------
# The ready optimizer


def test_ready_optimizer_follows_the_float64_reference():
  """Four float64 steps of ``fismo(lr, coeffs="svd")``: the hidden matrix
  follows ``W <- W - lr (sqrt(max(1, fan_out / fan_in)) dW + wd W)`` with
  the reference's ``dW`` at the defaults (beta 0.95, gamma 0.95, damping
  0.01, output first), the bias and the embedding AdamW; 1e-12 of O(1)
  entries (each step's rounding, _step_bound at u = 2^-53, times lr)."""
  lr, steps = 0.02, 4
  with jax.enable_x64(True):
    params = ready_check.model(jnp.float64)
    grads = ready_check.gradients(params, steps)
    ds, _ = reference.fismo_run([np.asarray(g["hidden"]) for g in grads],
                                beta=0.95, gamma=0.95, damping=0.01)
    hidden = [np.asarray(params["hidden"])]
    for d in ds:
      hidden.append(hidden[-1] - lr * (np.sqrt(2.0) * d + 0.01 * hidden[-1]))
    adamw = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    ready_check.assert_follows(fismo(lr, coeffs="svd"), params, grads,
                               hidden[1:], adamw, atol=1e-12)


def test_ready_optimizer_defaults_and_state():
  """The chosen defaults; the hidden matrix's factors are float32 (bf16
  params) of its two sides; a zero gradient gives a zero step."""
  sig = inspect.signature(fismo).parameters
  for key, value in dict(gamma=0.95, damping=0.01, root_eps=0.0,
                         update_every=1, side_order="output_first", beta=0.95,
                         nesterov=False, shape_scale="muon",
                         weight_decay=0.01).items():
    assert sig[key].default == value, key
  params = ready_check.model(jnp.bfloat16)
  tx = fismo(1e-3, weight_decay=0.0)
  state = tx.init(params)
  factors = [x for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) == 3]
  assert sorted((f.shape, f.dtype) for f in factors) == sorted(
      [((1, 8, 8), jnp.float32)] * 2 + [((1, 16, 16), jnp.float32)] * 2)
  zeros = jax.tree.map(jnp.zeros_like, params)
  u, state = jax.jit(tx.update)(zeros, state, params)
  assert _finite(state)
  assert np.all(np.asarray(u["hidden"], np.float32) == 0)
