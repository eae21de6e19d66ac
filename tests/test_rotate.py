"""Pion's spectrum-preserving rotation against a NumPy float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
import reference

LR = 0.02


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


@pytest.mark.parametrize("expm", ["taylor2", "cayley"])
@pytest.mark.parametrize("sides,left,right", [
    ("both", True, True), ("left", True, False), ("right", False, True),
    ("smaller", True, False)])
def test_float64_matches_reference(expm, sides, left, right):
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(12, 20)) / 4
  grads = _grads(1, (12, 20), 5)
  want = reference.pion_run(w0, grads, lr=LR, expm=expm, left=left,
                            right=right)[-1]
  with jax.enable_x64(True):
    tx = orthax.spectrum_preserving_rotate(LR, expm=expm, sides=sides)
    got, _ = _run(tx, jnp.asarray(w0), grads)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-10)


def test_float32_and_stacked_match_reference():
  """f32 (tolerance: 5 steps of rotations of entries ~0.25, measured 2e-7)."""
  rng = np.random.default_rng(2)
  w0 = rng.normal(size=(3, 10, 6)) / 4
  grads = _grads(3, (3, 10, 6), 5)
  tx = orthax.spectrum_preserving_rotate(
      LR, dimension_numbers=orthax.MuonDimensionNumbers(1, 2))
  got, state = _run(tx, jnp.asarray(w0, jnp.float32), grads)
  assert state.mu_left["w"].shape == (3, 10, 10)
  assert state.mu_right["w"].shape == (3, 6, 6)
  for b in range(3):
    want = reference.pion_run(w0[b], [g[b] for g in grads], lr=LR)[-1]
    np.testing.assert_allclose(np.asarray(got[b]), want, atol=2e-6)


def test_first_order_update_rms():
  """One step moves W by RMS lr * rms_scale (to first order in lr)."""
  rng = np.random.default_rng(4)
  w0 = jnp.asarray(rng.normal(size=(32, 64)), jnp.float32)
  lr = 1e-3
  tx = orthax.spectrum_preserving_rotate(lr, rms_scale=0.2)
  u, _ = tx.update({"w": jnp.asarray(rng.normal(size=(32, 64)), jnp.float32)},
                   tx.init({"w": w0}), {"w": w0})
  rms = float(jnp.sqrt(jnp.mean(u["w"] ** 2)))
  np.testing.assert_allclose(rms, lr * 0.2, rtol=0.02)


# float32, 48x96, 300 steps at lr 0.02 with random gradients; measured drift:
# taylor2 3.7e-5, cayley 6.1e-6, exact 5.4e-6. Bounds ~3x above.
DRIFT_BOUNDS = {"taylor2": 1e-4, "cayley": 2e-5, "exact": 2e-5}


@pytest.mark.parametrize("expm", sorted(DRIFT_BOUNDS))
def test_singular_values_preserved(expm):
  rng = np.random.default_rng(0)
  w0 = jnp.asarray(rng.normal(size=(48, 96)) / 8, jnp.float32)
  tx = orthax.spectrum_preserving_rotate(LR, expm=expm)
  w, _ = _run(tx, w0, _grads(5, (48, 96), 300))
  drift = float(orthax.spectrum_drift({"w": w}, {"w": w0})["w"])
  assert drift < DRIFT_BOUNDS[expm], drift
  assert float(jnp.linalg.norm(w - w0)) > 1.0  # it did move


def test_restore_every_resets_spectrum():
  rng = np.random.default_rng(0)
  w0 = jnp.asarray(rng.normal(size=(24, 40)) / 8, jnp.float32)
  tx = orthax.spectrum_preserving_rotate(0.2, restore_every=10)
  w, state = _run(tx, w0, _grads(6, (24, 40), 30))
  np.testing.assert_allclose(state.spectrum["w"][0],
                             np.linalg.svd(np.asarray(w0), compute_uv=False),
                             rtol=1e-5)
  assert float(orthax.spectrum_drift({"w": w}, {"w": w0})["w"]) < 1e-5
  loose = orthax.spectrum_preserving_rotate(0.2)
  w_loose, _ = _run(loose, w0, _grads(6, (24, 40), 30))
  assert float(orthax.spectrum_drift({"w": w_loose}, {"w": w0})["w"]) > 1e-5


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
  assert float(drift["w"]) < 1e-3


def test_needs_params_and_validates():
  tx = orthax.spectrum_preserving_rotate(LR)
  params = {"w": jnp.ones((4, 6))}
  with pytest.raises(ValueError, match="needs the params"):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match=r"\['b'\] has shape \(6,\)"):
    tx.init({"b": jnp.ones(6)})
  with pytest.raises(ValueError, match="Unknown expm"):
    orthax.spectrum_preserving_rotate(LR, expm="pade")
  with pytest.raises(ValueError, match="Unknown sides"):
    orthax.spectrum_preserving_rotate(LR, sides="top")


def test_pion_optimizer_routes_and_injects():
  rng = np.random.default_rng(8)
  params = {"embedding": jnp.asarray(rng.normal(size=(20, 8)), jnp.float32),
            "w": jnp.asarray(rng.normal(size=(8, 12)), jnp.float32),
            "b": jnp.zeros(12)}
  grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.1 + x, params)
  opt = optax.inject_hyperparams(orthax.pion)(learning_rate=0.02,
                                              adam_learning_rate=1e-3)
  u, state = jax.jit(opt.update)(grads, opt.init(params), params)
  # the matrix is rotated: its singular values are unchanged
  new = optax.apply_updates(params, u)
  assert float(orthax.spectrum_drift({"w": new["w"]}, {"w": params["w"]})["w"]) < 1e-5
  # the rest is AdamW: first step -lr * sign(g)
  np.testing.assert_allclose(u["b"], -1e-3 * np.sign(grads["b"]), rtol=1e-4)
  assert state.hyperparams["learning_rate"] == pytest.approx(0.02)


def test_zero_gradient_moments_dtype_and_chain():
  rng = np.random.default_rng(9)
  w = jnp.asarray(rng.normal(size=(8, 12)), jnp.float32)
  tx = orthax.spectrum_preserving_rotate(LR)
  u, _ = tx.update({"w": jnp.zeros_like(w)}, tx.init({"w": w}), {"w": w})
  np.testing.assert_array_equal(u["w"], 0.0)  # no rotation, no NaN
  g = {"w": jnp.asarray(rng.normal(size=(8, 12)), jnp.float32)}
  # bf16 moments: state in bf16, the update close to the f32 one
  bf = orthax.spectrum_preserving_rotate(LR, moments_dtype=jnp.bfloat16)
  state = bf.init({"w": w})
  assert state.nu_right["w"].dtype == jnp.bfloat16
  u_bf, state = bf.update(g, state, {"w": w})
  assert state.mu_left["w"].dtype == jnp.bfloat16
  u32, _ = tx.update(g, tx.init({"w": w}), {"w": w})
  np.testing.assert_allclose(u_bf["w"], u32["w"], rtol=0.02, atol=1e-4)
  # inside optax.chain after gradient clipping: params reach it
  chained = optax.chain(optax.clip_by_global_norm(1.0), tx)
  u_c, _ = chained.update(g, chained.init({"w": w}), {"w": w})
  clipped = jax.tree.map(lambda x: x / jnp.linalg.norm(x), g)
  u_ref, _ = tx.update(clipped, tx.init({"w": w}), {"w": w})
  np.testing.assert_allclose(u_c["w"], u_ref["w"], rtol=1e-5, atol=1e-7)
