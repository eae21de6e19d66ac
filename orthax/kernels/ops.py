"""The Newton–Schulz products on the Pallas kernels (``backend="pallas"``).

Maps the four operations of :class:`orthax.polar.newton_schulz.MatmulOps`
onto the two kernels of :mod:`orthax.kernels.matmul`:

=============  ==========================================================
``gram``       ``X X^T``: :func:`symmetric_matmul` of ``X`` with itself
``polynomial`` ``a I + b A + c A^2``: :func:`symmetric_matmul` of ``A``
               with itself (``A A^T = A^2``), ``bA`` and ``aI`` fused in
               its epilogue
``product``    ``P Q`` of commuting symmetric matrices:
               :func:`symmetric_matmul` (``P Q^T = P Q``)
``apply``      ``a X + P X``: :func:`matmul_update`
=============  ==========================================================
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from orthax.kernels.matmul import matmul_update, symmetric_matmul
from orthax.kernels.platform import Target, Tiles
from orthax.polar.newton_schulz import MatmulOps

__all__ = ["PALLAS_OPS", "pallas_ops"]


def _check_accumulator(acc) -> None:
  if jnp.dtype(acc) != jnp.float32:
    raise ValueError(
        f"backend='pallas' accumulates in float32; this iteration needs "
        f"{jnp.dtype(acc)} (float64 input). Use backend='xla' for float64.")


def pallas_ops(target: Target | None = None,
               tiles: Tiles | None = None) -> MatmulOps:
  """:class:`MatmulOps` running on the Pallas kernels.

  Args:
    target: kernel variant (:func:`orthax.kernels.platform.target`);
      ``None`` picks the default backend's when the iteration is traced.
    tiles: preferred blocks for every product; ``None`` takes the table in
      :mod:`orthax.kernels.platform` for each product's shape.

  Returns:
    The operations, to pass as ``newton_schulz(..., backend=...)``.
  """
  kw = dict(target=target, tiles=tiles)

  def gram(x: jax.Array, acc) -> jax.Array:
    _check_accumulator(acc)
    return symmetric_matmul(x, x, out_dtype=acc, **kw)

  def polynomial(a_mat: jax.Array, a, b, c, operand_dtype) -> jax.Array:
    _check_accumulator(a_mat.dtype)
    return symmetric_matmul(a_mat, a_mat, scale=c, addend=a_mat,
                            addend_scale=b, identity_scale=a,
                            operand_dtype=operand_dtype, out_dtype=a_mat.dtype,
                            **kw)

  def product(p: jax.Array, q: jax.Array) -> jax.Array:
    return symmetric_matmul(p, q, out_dtype=p.dtype, **kw)

  def apply(p: jax.Array, x: jax.Array, a) -> jax.Array:
    _check_accumulator(p.dtype)
    return matmul_update(p, x, a, **kw)

  return MatmulOps(gram=gram, polynomial=polynomial, product=product,
                   apply=apply)


PALLAS_OPS = pallas_ops()
