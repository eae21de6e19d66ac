"""The exact polar factor by SVD, and measures of how orthogonal a matrix is.

Used as the ``coeffs="svd"`` reference method of ``orthax.orthogonalize`` and by
tests and benchmarks to score the Newton–Schulz presets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from orthax.polar.newton_schulz import divide_by_max_abs

__all__ = ["polar_svd", "singular_values", "orthogonality_error"]


def polar_svd(x: jax.Array, *, rtol: float | None = None) -> jax.Array:
  """Exact polar factor ``U V^T`` of each matrix in ``x`` (last two axes).

  Singular directions whose singular value is below ``rtol * s_max`` are
  dropped (they carry no signal, and their vectors are arbitrary): a zero
  matrix maps to zero, as it does under Newton–Schulz, rather than to an
  arbitrary orthogonal matrix.

  Args:
    x: array of shape ``(..., m, n)``; a side may be 0.
    rtol: relative threshold; default ``max(m, n) * machine epsilon`` of the
      computation dtype.

  Returns:
    Array like ``x`` (same dtype); computed in at least float32, on ``x``
    divided by its largest magnitude, so any finite scale gives the factor
    of the unit-scale matrix.
  """
  acc = jnp.promote_types(x.dtype, jnp.float32)
  # The factor does not depend on the scale: the SVD sees entries in [-1, 1].
  unit, _ = divide_by_max_abs(x.astype(acc), (-2, -1))
  u, s, vt = jnp.linalg.svd(unit, full_matrices=False)
  if rtol is None:
    rtol = max(x.shape[-2:]) * float(jnp.finfo(acc).eps)
  # initial=0: a matrix with a side of 0 has no singular values (and an
  # empty polar factor)
  keep = s > rtol * jnp.max(s, axis=-1, keepdims=True, initial=0.0)
  q = (u * keep[..., None, :].astype(acc)) @ vt
  return q.astype(x.dtype)


def singular_values(x: jax.Array) -> jax.Array:
  """Singular values of each matrix (last two axes), descending, float32+."""
  acc = jnp.promote_types(x.dtype, jnp.float32)
  return jnp.linalg.svd(x.astype(acc), compute_uv=False)


def orthogonality_error(q: jax.Array) -> jax.Array:
  """``max |s_i - 1|`` over the singular values of each matrix in ``q``."""
  return jnp.max(jnp.abs(singular_values(q) - 1.0), axis=-1)
