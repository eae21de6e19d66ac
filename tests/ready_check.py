"""A ready optimizer against its float64 reference, step by step: the small
tree of one hidden matrix, a bias and an embedding that test_aro and
test_fismo train, its gradients, and the comparison."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def model(dtype):
  """An (8, 16) hidden matrix, a bias and an embedding, entries O(0.1-1)."""
  rng = np.random.default_rng(20)
  return {"hidden": jnp.asarray(rng.normal(size=(8, 16)) * 0.1, dtype),
          "bias": jnp.asarray(rng.normal(size=(16,)) * 0.1, dtype),
          "embedding": jnp.asarray(rng.normal(size=(30, 8)), dtype)}


def gradients(params, steps):
  """``steps`` trees of standard normal gradients shaped like ``params``."""
  return [jax.tree.map(lambda p, k: jax.random.normal(k, p.shape, p.dtype),
                       params, dict(zip(params, jax.random.split(
                           jax.random.key(t), len(params)))))
          for t in range(steps)]


def assert_follows(tx, params, grads, hidden, adamw, atol):
  """Applies ``tx`` (jitted) to ``grads`` from ``params``: after each step
  the hidden matrix is the matching entry of ``hidden`` and every other leaf
  where ``adamw`` alone takes it, within ``atol``. Run under
  ``jax.enable_x64``."""
  state, p, update = tx.init(params), params, jax.jit(tx.update)
  others = {k: v for k, v in params.items() if k != "hidden"}
  adam_state, q = adamw.init(others), others
  for g, w in zip(grads, hidden, strict=True):
    u, state = update(g, state, p)
    p = optax.apply_updates(p, u)
    a, adam_state = adamw.update({k: g[k] for k in others}, adam_state, q)
    q = optax.apply_updates(q, a)
    np.testing.assert_allclose(p["hidden"], w, rtol=0, atol=atol)
    for k in others:
      np.testing.assert_allclose(p[k], q[k], rtol=0, atol=atol)
