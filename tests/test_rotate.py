"""Pion's spectrum-preserving rotation against a NumPy float64 reference."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
import reference
from checkpoints import orbax_round_trip

LR = 0.02
U32 = 2.0**-24  # float32 unit roundoff
EXPMS = ("cayley", "exact", "taylor2")
MDN = orthax.MuonDimensionNumbers


def _grads(seed, shape, steps):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=shape) for _ in range(steps)]


def _run(tx, w, grads):
  params = {"w": w}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads:
    u, state = update({"w": jnp.asarray(g, w.dtype)}, state, params)
    params = optax.apply_updates(params, u)
  return params["w"], state


def _finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------
# The algorithm, against the float64 reference


@pytest.mark.parametrize("expm", EXPMS)
@pytest.mark.parametrize("sides,left,right,std", [
    ("both", True, True, 0.25), ("left", True, False, 0.25),
    ("right", False, True, 0.25), ("smaller", True, False, 0.25),
    ("both", True, True, 1e-3)])  # lr * rms_scale = 4 RMS(W): clamped
def test_float64_matches_reference(expm, sides, left, right, std):
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(12, 20)) * std
  grads = _grads(1, (12, 20), 5)
  want = reference.pion_run(w0, grads, lr=LR, expm=expm, left=left,
                            right=right, max_angle=0.5)[-1]
  with jax.enable_x64(True):
    tx = orthax.spectrum_preserving_rotate(LR, expm=expm, sides=sides,
                                           max_angle=0.5)
    got, _ = _run(tx, jnp.asarray(w0), grads)
  # float64 rounding (u = 1.1e-16) over 5 steps of products of length <= 20:
  # far below 1e-10 of entries of size std.
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-10 * std / 0.25)


def test_float32_and_stacked_match_reference():
  rng = np.random.default_rng(2)
  w0 = rng.normal(size=(3, 10, 6)) / 4
  grads = _grads(3, (3, 10, 6), 5)
  tx = orthax.spectrum_preserving_rotate(LR, dimension_numbers=MDN(1, 2))
  got, state = _run(tx, jnp.asarray(w0, jnp.float32), grads)
  assert state.mu_left["w"].shape == (3, 10, 10)
  assert state.mu_right["w"].shape == (3, 6, 6)
  # Each step rounds products of length <= m + n = 16 (error <= 16 u of the
  # entries' scale max|W|) and the generators' elementwise Adam ratios; over
  # 5 steps, with a factor 2 for the step size recomputed from rounded
  # values: 5 * 2 * 16 u max|W|.
  atol = 5 * 2 * 16 * U32 * np.max(np.abs(w0))
  for b in range(3):
    want = reference.pion_run(w0[b], [g[b] for g in grads], lr=LR,
                              expm="cayley", max_angle=0.5)[-1]
    np.testing.assert_allclose(np.asarray(got[b]), want, atol=atol)


# --------------------------------------------------------------------------
# Step size (issue 11, item 4)


def _documented_step(w, state, *, lr, rms_scale=0.2, max_angle=0.5,
                     eps=1e-8):
  """One step's generators A_l, A_r (from the moments after the step) and
  its documented h = min(lr rms_scale sqrt(mn), max_angle ||W||_F) /
  (||A_l W + W A_r||_F + eps), in float64."""
  w = np.asarray(w, np.float64)
  a_l, a_r = (-np.asarray(mu, np.float64)[0]
              / (np.sqrt(np.asarray(nu, np.float64)[0]) + eps)
              for mu, nu in ((state.mu_left["w"], state.nu_left["w"]),
                             (state.mu_right["w"], state.nu_right["w"])))
  m, n = w.shape
  step = min(lr * rms_scale * math.sqrt(m * n), max_angle * np.linalg.norm(w))
  return a_l, a_r, step / (np.linalg.norm(a_l @ w + w @ a_r) + eps)


def _cayley_band(w, state, *, lr):
  """Bounds on ``||W_new - W||_F`` for one Cayley step, from the documented
  step size and the step's generators (read back from the moments).

  With X_s = h A_s (skew), F = E - I = (I - X/2)^{-1} X, ||(I - X/2)^{-1}|| <=
  1, ||F|| <= theta = ||X||_2 and F - X = (I - X/2)^{-1} X^2 / 2:
  W_new - W = F_l W E_r + W F_r gives ||.|| <= a + b (a = ||X_l W||, b =
  ||W X_r||); and W_new - W - (X_l W + W X_r) = (F_l - X_l) W + W (F_r - X_r)
  + F_l W F_r gives |.| <= theta_l a / 2 + theta_r b / 2 + min(theta_r a,
  theta_l b) around the first-order norm.
  """
  a_l, a_r, h = _documented_step(w, state, lr=lr)
  w = np.asarray(w, np.float64)
  first = h * np.linalg.norm(a_l @ w + w @ a_r)
  a, b = h * np.linalg.norm(a_l @ w), h * np.linalg.norm(w @ a_r)
  t_l, t_r = h * np.linalg.norm(a_l, 2), h * np.linalg.norm(a_r, 2)
  second = t_l * a / 2 + t_r * b / 2 + min(t_r * a, t_l * b)
  # float32 rounding of the step: products of length <= m + n, relative to
  # the step's size, with a factor 10 to spare.
  slack = 10 * sum(w.shape) * U32 * first
  return first - second - slack, a + b + slack, first


@pytest.mark.parametrize("std,lr", [
    (1.0, 1e-3),   # angle lr * rms_scale / RMS(W) = 2e-4: first order
    (1e-3, LR)])   # angle 4 rad, clamped to max_angle = 0.5
def test_update_size_is_as_documented(std, lr):
  """Update RMS min(lr * rms_scale, max_angle * RMS(W)) to first order; the
  Cayley step stays inside its derived band (taylor2 without the clamp gave
  5.5x the nominal RMS on RMS(W) = 1e-3)."""
  rng = np.random.default_rng(4)
  w0 = jnp.asarray(std * rng.normal(size=(48, 96)), jnp.float32)
  g = {"w": jnp.asarray(rng.normal(size=(48, 96)), jnp.float32)}
  tx = orthax.spectrum_preserving_rotate(lr)
  u, state = tx.update(g, tx.init({"w": w0}), {"w": w0})
  lower, upper, first = _cayley_band(w0, state, lr=lr)
  norm = float(np.linalg.norm(np.asarray(u["w"], np.float64)))
  print(f"\nstd {std}, lr {lr}: ||update|| / first order = {norm / first:.3f}")
  assert lower <= norm <= upper, (lower, norm, upper)


def test_taylor2_only_grows_singular_values():
  """``E^T E = I + (hA)^4 / 4``: one taylor2 step multiplies each singular
  value by a factor in [1, sqrt((1 + theta_l^4/4)(1 + theta_r^4/4))]."""
  rng = np.random.default_rng(5)
  with jax.enable_x64(True):
    w0 = jnp.asarray(0.01 * rng.normal(size=(12, 20)))  # angle 0.4
    g = {"w": jnp.asarray(rng.normal(size=(12, 20)))}
    tx = orthax.spectrum_preserving_rotate(LR, expm="taylor2")
    u, state = tx.update(g, tx.init({"w": w0}), {"w": w0})
    w = np.asarray(w0 + u["w"])
    a_l, a_r, h = _documented_step(w0, state, lr=LR)
  t_l, t_r = h * np.linalg.norm(a_l, 2), h * np.linalg.norm(a_r, 2)
  ratio = (np.linalg.svd(w, compute_uv=False)
           / np.linalg.svd(np.asarray(w0), compute_uv=False))
  growth = math.sqrt((1 + t_l**4 / 4) * (1 + t_r**4 / 4))
  # float64 SVDs: relative errors ~1e-14 of the largest value, ~1e-12 here.
  assert np.all(ratio >= 1 - 1e-12) and np.all(ratio <= growth + 1e-12)
  assert np.max(ratio) > 1 + 1e-6  # and it does grow at this angle


# --------------------------------------------------------------------------
# Singular values over long runs (issue 11, item 4)

DRIFT_STEPS = 2000
DRIFT_STDS = (1.0, 0.02, 0.005, 1e-3)


@functools.lru_cache(maxsize=None)
def _long_run(expm):
  """``DRIFT_STEPS`` float32 steps on 48x96 matrices of each std in
  ``DRIFT_STDS`` (one stacked leaf: each matrix has its own step) with
  random gradients. Returns, per std, the initial and final singular values
  (float64) and how far W turned (||W - W0|| / ||W0||)."""
  tx = orthax.spectrum_preserving_rotate(LR, expm=expm,
                                         dimension_numbers=MDN(1, 2))
  shape = (len(DRIFT_STDS), 48, 96)
  w0 = (jnp.asarray(DRIFT_STDS, jnp.float32)[:, None, None]
        * jax.random.normal(jax.random.key(0), shape))

  @jax.jit
  def run(w0):
    def body(carry, key):
      params, state = carry
      u, state = tx.update({"w": jax.random.normal(key, shape)}, state, params)
      return (optax.apply_updates(params, u), state), None

    keys = jax.random.split(jax.random.key(1), DRIFT_STEPS)
    (params, _), _ = jax.lax.scan(body, ({"w": w0}, tx.init({"w": w0})), keys)
    return params["w"]

  w = run(w0)
  svd = lambda x: np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)
  norm = lambda x: float(np.linalg.norm(np.asarray(x, np.float64)))
  out = {}
  for i, std in enumerate(DRIFT_STDS):
    s0, s = svd(w0[i]), svd(w[i])
    turned = norm(w[i] - w0[i]) / norm(w0[i])
    stretch = norm(w[i]) / norm(w0[i]) - 1
    drift = float(orthax.spectrum_drift({"w": w[i]}, {"w": w0[i]})["w"])
    print(f"\n{expm} std {std}: spectrum_drift {drift:.1e}, ||W|| / ||W0|| "
          f"- 1 = {stretch:.1e} after {DRIFT_STEPS} steps (||W - W0|| / "
          f"||W0|| = {turned:.2f})")
    out[std] = s0, s, drift, stretch, turned
  return out


def _angle(std):
  """The step's first-order turn: lr * rms_scale / RMS(W), clamped at 0.5."""
  return min(LR * 0.2 / std, 0.5)


def _rounding_drift_bound(angle, steps=DRIFT_STEPS, shape=(48, 96)):
  """Bound on an orthogonal map's spectrum drift (relative to s_1).

  Random part: each step's result carries a rounding error E_t, ||E_t||_2 <=
  ||E_t||_F <= u ||W||_F (the final sum rounds each entry by u/2 |W_ij|,
  the increment's products by u of a step below ||W||_F / 2), unbiased and
  independent across steps; |delta s_i| <= ||E_t||_2, so the walk has a
  standard deviation <= sqrt(steps) u ||W||_F: allow 3 of them.
  Systematic part: the increment (of size angle * ||W||_F) has its own
  rounding, which may be biased: allow u of it per step, in one direction.
  Relative to s_1 >= ||W||_F / sqrt(min(m, n)).
  """
  norm_wise = 3 * math.sqrt(steps) * U32 + steps * U32 * angle
  return norm_wise * math.sqrt(min(shape))


def _stretch_bound(angle, steps=DRIFT_STEPS, shape=(48, 96)):
  """Bound on | ||W||_F / ||W0||_F - 1 | for an orthogonal map.

  A rotation keeps ||W||_F; rounding W's entries (by e_ij, |e_ij| <= u/2
  |W_ij|, unbiased, independent) moves ||W||_F^2 by sum 2 W_ij e_ij, of
  relative standard deviation <= u sqrt(sum W^4 / 3) / ||W||^2 = u / sqrt(mn)
  for Gaussian entries (E W^4 = 3 RMS^4): sqrt(steps) times over the walk,
  6 of them. The increment's rounding may be biased: u of the step (angle)
  per step, in one direction. Far below the spectrum bound: a bias of u
  relative to W itself (forming E, then E W) fails it.
  """
  return (6 * math.sqrt(steps) * U32 / math.sqrt(math.prod(shape))
          + steps * U32 * angle)


@pytest.mark.parametrize("expm", ["cayley", "exact"])
@pytest.mark.parametrize("std", DRIFT_STDS)
def test_singular_values_preserved(expm, std):
  """Orthogonal maps keep the spectrum to rounding at every weight scale:
  under 1e-3 of s_1 over 2000 float32 steps (taylor2 at GPT-2's init std
  0.02 drifts by a third)."""
  _, _, drift, stretch, turned = _long_run(expm)[std]
  bound = _rounding_drift_bound(_angle(std))
  assert bound <= 1e-3
  assert drift < bound, (drift, bound)
  assert abs(stretch) < _stretch_bound(_angle(std)), stretch
  assert turned > 0.5  # it did move


@pytest.mark.parametrize("std", DRIFT_STDS)
def test_taylor2_drift_only_grows(std):
  """taylor2 grows singular values only (E^T E >= I), up to rounding (its
  drift at each scale is the docstring's table)."""
  s0, s, _, _, _ = _long_run("taylor2")[std]
  assert np.min(s - s0) / s0[0] > -_rounding_drift_bound(_angle(std))


def test_restore_every_resets_spectrum():
  rng = np.random.default_rng(0)
  w0 = jnp.asarray(rng.normal(size=(24, 40)) / 8, jnp.float32)
  # taylor2 at angle 0.04 / 0.125: the spectrum drifts unless restored
  tx = orthax.spectrum_preserving_rotate(0.2, expm="taylor2", restore_every=10)
  w, state = _run(tx, w0, _grads(6, (24, 40), 30))
  # The restored W is U diag(s0) V^T from a float32 SVD, and the drift is
  # measured by two more: each has backward error <= max(m, n) u s_1,
  # 3 * 40 u = 7e-6.
  bound = 3 * 40 * U32
  np.testing.assert_allclose(state.spectrum["w"][0],
                             np.linalg.svd(np.asarray(w0), compute_uv=False),
                             rtol=bound)
  assert float(orthax.spectrum_drift({"w": w}, {"w": w0})["w"]) < bound
  loose = orthax.spectrum_preserving_rotate(0.2, expm="taylor2")
  w_loose, _ = _run(loose, w0, _grads(6, (24, 40), 30))
  assert float(orthax.spectrum_drift({"w": w_loose}, {"w": w0})["w"]) > bound


def test_fits_an_isospectral_target():
  """Target Q1 W0 Q2 lies on W0's orbit: Pion drives the loss down >= 10x."""
  rng = np.random.default_rng(7)
  w0 = rng.normal(size=(16, 24)) / 4
  q1, _ = np.linalg.qr(rng.normal(size=(16, 16)))
  q2, _ = np.linalg.qr(rng.normal(size=(24, 24)))
  target = jnp.asarray(q1 @ w0 @ q2, jnp.float32)
  loss = lambda w: 0.5 * jnp.sum((w - target) ** 2)
  tx = orthax.spectrum_preserving_rotate(
      optax.cosine_decay_schedule(0.05, 600))
  params = {"w": jnp.asarray(w0, jnp.float32)}
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    g = jax.grad(lambda p: loss(p["w"]))(params)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  start = float(loss(params["w"]))
  for _ in range(600):
    params, state = step(params, state)
  end = float(loss(params["w"]))
  assert end < start / 10, (start, end)
  drift = orthax.spectrum_drift(params, {"w": jnp.asarray(w0, jnp.float32)})
  # angle at most 0.05 * 0.2 / RMS(W0) = 0.04 (RMS(W0) ~ 0.25)
  assert float(drift["w"]) < _rounding_drift_bound(0.04, 600, (16, 24))


# --------------------------------------------------------------------------
# spectrum_drift (issue 11, items 10, 11, 13)


def test_spectrum_drift_is_relative_to_the_largest_value():
  """A rank-1 matrix rotated exactly: its zero singular values move by
  rounding only, which was divided by finfo.tiny (drift 3e7)."""
  rng = np.random.default_rng(11)
  w0 = np.asarray(np.outer(rng.normal(size=48), rng.normal(size=96)),
                  np.float32)
  q1, _ = np.linalg.qr(rng.normal(size=(48, 48)))
  q2, _ = np.linalg.qr(rng.normal(size=(96, 96)))
  w = np.asarray(q1 @ w0.astype(np.float64) @ q2, np.float32)
  drift = float(orthax.spectrum_drift({"w": jnp.asarray(w)},
                                      {"w": jnp.asarray(w0)})["w"])
  # Rounding W (<= u/2 ||W||_F = u/2 s_1 for rank 1) and two float32 SVDs
  # (backward error <= max(m, n) u s_1 each).
  assert drift <= (0.5 + 2 * 96) * U32, drift
  zero = {"w": jnp.zeros((4, 6))}
  assert float(orthax.spectrum_drift(zero, zero)["w"]) == 0.0


def test_spectrum_drift_checks_shapes_and_empty_leaves():
  w = {"w": jnp.ones((4, 6))}
  with pytest.raises(ValueError, match=r"(?s)\['w'\].*\(4, 6\).*\(4, 5\)"):
    orthax.spectrum_drift(w, {"w": jnp.ones((4, 5))})
  empty = {"a": jnp.zeros((0, 5)), "b": jnp.zeros((5, 0))}
  assert jax.tree.map(float, orthax.spectrum_drift(empty, empty)) == {
      "a": 0.0, "b": 0.0}


# --------------------------------------------------------------------------
# Edge cases and bad input (issue 11, items 6, 11, 13, 16, 17)


@pytest.mark.parametrize("eps, restore_every", [(1e-8, None), (0.0, 1)])
def test_zero_size_leaves(eps, restore_every):
  rng = np.random.default_rng(12)
  params = {"a": jnp.zeros((0, 5)), "b": jnp.zeros((5, 0)),
            "stack": jnp.zeros((0, 3, 4)),
            "w": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)}
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, params)
  dn = {"a": None, "b": None, "stack": MDN(1, 2), "w": None}
  tx = orthax.spectrum_preserving_rotate(LR, eps=eps, dimension_numbers=dn,
                                         restore_every=restore_every)
  u, state = jax.jit(tx.update)(grads, tx.init(params), params)
  assert jax.tree.map(jnp.shape, u) == jax.tree.map(jnp.shape, params)
  assert _finite(u) and _finite(state)
  alone = orthax.spectrum_preserving_rotate(LR, eps=eps,
                                            restore_every=restore_every)
  u_w, _ = alone.update({"w": grads["w"]}, alone.init({"w": params["w"]}),
                        {"w": params["w"]})
  # the same float32 steps, compiled apart: products of length <= m + n = 10
  # may be summed in another order, 10 u of the step, x10 to spare.
  np.testing.assert_allclose(u["w"], u_w["w"], rtol=0,
                             atol=100 * U32 * float(jnp.max(jnp.abs(u_w["w"]))))


def test_gradient_of_another_shape_is_named():
  tx = orthax.spectrum_preserving_rotate(LR)
  params = {"layer": {"w": jnp.ones((4, 6))}}
  with pytest.raises(ValueError,
                     match=r"(?s)\['layer'\]\['w'\].*\(4, 5\).*\(4, 6\)"):
    tx.update({"layer": {"w": jnp.ones((4, 5))}}, tx.init(params), params)


def test_needs_params():
  tx = orthax.spectrum_preserving_rotate(LR)
  params = {"w": jnp.ones((4, 6))}
  with pytest.raises(ValueError, match="needs the params"):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match=r"\['b'\] has shape \(6,\)"):
    tx.init({"b": jnp.ones(6)})


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(b1=1.0), ValueError, "b1"), (dict(b1=-0.1), ValueError, "b1"),
    (dict(b2=1.0), ValueError, "b2"), (dict(b2=-1e-3), ValueError, "b2"),
    (dict(eps=-1e-8), ValueError, "eps"),
    (dict(rms_scale=0.0), ValueError, "rms_scale"),
    (dict(rms_scale=-0.2), ValueError, "rms_scale"),
    (dict(max_angle=0.0), ValueError, "max_angle"),
    (dict(restore_every=0), ValueError, "restore_every"),
    (dict(restore_every=2.5), TypeError, "restore_every"),
    (dict(restore_every=True), TypeError, "restore_every"),
    (dict(expm="pade"), ValueError, "expm"),
    (dict(sides="top"), ValueError, "sides"),
    (dict(moments_dtype=jnp.int32), TypeError, "moments_dtype"),
    (dict(learning_rate="0.02"), TypeError, "learning_rate"),
    (dict(learning_rate=float("nan")), ValueError, "learning_rate"),
])
@pytest.mark.parametrize("make", [orthax.spectrum_preserving_rotate,
                                  orthax.pion])
def test_hyperparameters_checked_at_construction(make, kwargs, error, match):
  kwargs = {"learning_rate": LR, **kwargs}
  with pytest.raises(error, match=match):
    make(**kwargs)


def test_numpy_scalars_and_schedules_accepted():
  params = {"w": jnp.asarray(np.random.default_rng(13).normal(size=(4, 6)),
                             jnp.float32)}
  tx = orthax.spectrum_preserving_rotate(
      np.float32(LR), b1=np.float32(0.9), b2=np.float64(0.99),
      eps=np.float32(1e-8), rms_scale=np.float64(0.2),
      max_angle=np.float32(0.5), restore_every=np.int64(2))
  plain = orthax.spectrum_preserving_rotate(LR, b2=0.99, restore_every=2)
  sched = orthax.spectrum_preserving_rotate(optax.constant_schedule(LR),
                                            b2=0.99, restore_every=2)
  want, _ = plain.update(params, plain.init(params), params)
  for t in (tx, sched):
    got, _ = t.update(params, t.init(params), params)
    # the same float32 arithmetic up to the hyperparameters' rounding
    # (np.float32(0.9) vs 0.9: relative 3e-8), amplified by the Adam ratio
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-5, atol=1e-7)


def test_zero_gradient_with_zero_eps_is_a_zero_step():
  w = {"w": jnp.asarray(np.random.default_rng(14).normal(size=(8, 12)),
                        jnp.float32)}
  for eps in (1e-8, 0.0):
    tx = orthax.spectrum_preserving_rotate(LR, eps=eps)
    u, state = jax.jit(tx.update)({"w": jnp.zeros_like(w["w"])}, tx.init(w),
                                  w)
    np.testing.assert_array_equal(u["w"], 0.0)
    assert _finite(state)


def test_float16_params_keep_float32_moments():
  """float16 moments underflow ((1 - b2) G^2 of small gradients is 0): the
  default keeps them in float32, so the update equals the float32 one."""
  rng = np.random.default_rng(15)
  w16 = jnp.asarray(0.02 * rng.normal(size=(16, 32)), jnp.float16)
  p16, p32 = {"w": w16}, {"w": w16.astype(jnp.float32)}
  tx = orthax.spectrum_preserving_rotate(LR)
  update = jax.jit(tx.update)
  s16, s32 = tx.init(p16), tx.init(p32)
  assert s16.nu_left["w"].dtype == jnp.float32
  for _ in range(3):
    g = jnp.asarray(1e-4 * rng.normal(size=(16, 32)), jnp.float16)
    u16, s16 = update({"w": g}, s16, p16)
    u32, s32 = update({"w": g.astype(jnp.float32)}, s32, p32)
    assert u16["w"].dtype == jnp.float16 and _finite(u16)
    # the same float32 computation, then one rounding to float16 (half an
    # ulp: 2^-11 relative, 2^-25 absolute below float16's normal range),
    # with 1e-5 relative for float32 paths compiled apart.
    np.testing.assert_allclose(np.asarray(u16["w"], np.float32), u32["w"],
                               rtol=2.0**-11 + 1e-5, atol=2.0**-25)


def test_zero_gradient_moments_dtype_and_chain():
  rng = np.random.default_rng(9)
  w = jnp.asarray(rng.normal(size=(8, 12)), jnp.float32)
  tx = orthax.spectrum_preserving_rotate(LR)
  g = {"w": jnp.asarray(rng.normal(size=(8, 12)), jnp.float32)}
  # bf16 moments: state in bf16, the update close to the f32 one
  bf = orthax.spectrum_preserving_rotate(LR, moments_dtype=jnp.bfloat16)
  state = bf.init({"w": w})
  assert state.nu_right["w"].dtype == jnp.bfloat16
  u_bf, state = bf.update(g, state, {"w": w})
  assert state.mu_left["w"].dtype == jnp.bfloat16
  u32, _ = tx.update(g, tx.init({"w": w}), {"w": w})
  # bfloat16 keeps 8 bits: the moments' ratio is off by up to 2 * 2^-8
  # relative, and the step follows it (0.02 with a little to spare).
  np.testing.assert_allclose(u_bf["w"], u32["w"], rtol=0.02, atol=1e-4)
  # inside optax.chain after gradient clipping: params reach it
  chained = optax.chain(optax.clip_by_global_norm(1.0), tx)
  u_c, _ = chained.update(g, chained.init({"w": w}), {"w": w})
  clipped = jax.tree.map(lambda x: x / jnp.linalg.norm(x), g)
  u_ref, _ = tx.update(clipped, tx.init({"w": w}), {"w": w})
  np.testing.assert_allclose(u_c["w"], u_ref["w"], rtol=1e-5, atol=1e-7)


def _orbax_round_trip(tmp_path, saved, restored_into, params):
  grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  _, state = saved.update(grads, saved.init(params), params)
  return state, orbax_round_trip(tmp_path / "ckpt", state,
                                 restored_into.init(params))


def _pion_params():
  rng = np.random.default_rng(16)
  return {"w": jnp.asarray(rng.normal(size=(8, 12)), jnp.float32),
          "b": jnp.zeros(12)}


@pytest.mark.parametrize("saved, into, match", [
    ({}, {"restore_every": 2}, r"(?s)\['w'\] \(spectrum\).*None.*\(1, 8\)"),
    ({"sides": "left"}, {},
     r"(?s)\['w'\] \(mu_right\).*None.*\(1, 12, 12\)"),
])
def test_orbax_restore_into_another_configuration_is_named(
    tmp_path, saved, into, match):
  params = _pion_params()
  other = orthax.pion(LR, **into)
  _, restored = _orbax_round_trip(tmp_path, orthax.pion(LR, **saved), other,
                                  params)
  with pytest.raises(ValueError, match=match + ".*does not match"):
    other.update(params, restored, params)


def test_orbax_restore_into_one_side_keeps_that_side(tmp_path):
  """pion() -> pion(sides="left"): the left moments are the same statistic,
  so the restored state continues exactly as pion(sides="left") would."""
  params = _pion_params()
  left = orthax.pion(LR, sides="left")
  state, restored = _orbax_round_trip(tmp_path, orthax.pion(LR), left, params)
  inner = lambda s: s.inner_states["matrix"].inner_state
  np.testing.assert_array_equal(inner(restored).mu_left["w"],
                                inner(state).mu_left["w"])
  u, _ = left.update(params, restored, params)
  assert _finite(u)


def test_pion_optimizer_routes_and_injects():
  rng = np.random.default_rng(8)
  params = {"embedding": jnp.asarray(rng.normal(size=(20, 8)), jnp.float32),
            "w": jnp.asarray(rng.normal(size=(8, 12)), jnp.float32),
            "b": jnp.zeros(12)}
  grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.1 + x, params)
  # b2 injected too: an array (a tracer under jit) where a float was checked
  opt = optax.inject_hyperparams(orthax.pion)(learning_rate=0.02, b2=0.99,
                                              adam_learning_rate=1e-3)
  u, state = jax.jit(opt.update)(grads, opt.init(params), params)
  # the matrix is rotated: its singular values are unchanged up to one
  # step's rounding: W's (u/2 ||W||_F <= u/2 sqrt(8) s_1), the increment's
  # (<= (m + n) u of a step of angle 0.004 / RMS(W) < 0.01) and two SVDs'
  # (max(m, n) u s_1 each).
  new = optax.apply_updates(params, u)
  drift = orthax.spectrum_drift({"w": new["w"]}, {"w": params["w"]})["w"]
  assert float(drift) < (math.sqrt(8) / 2 + 20 * 0.01 + 2 * 12) * U32
  # the rest is AdamW: first step -lr * sign(g)
  np.testing.assert_allclose(u["b"], -1e-3 * np.sign(grads["b"]), rtol=1e-4)
  assert state.hyperparams["learning_rate"] == pytest.approx(0.02)
