"""Tiled Pallas matmuls with fused epilogues for one Newton–Schulz step.

Two kernels cover every product of the iteration (:mod:`orthax.kernels.ops`
maps them onto it):

* :func:`symmetric_matmul`: ``s_I I + s_C C + s L R^T`` for a product the
  caller knows to be symmetric (``X X^T``, ``A^2``, products of commuting
  symmetric matrices). The grid walks the tiles on and above the diagonal
  only, about half the FLOPs of the full product, and the tiles below are
  filled with the transposes of those above.
* :func:`matmul_update`: ``s X + P X`` with the accumulator started at
  ``s X``.

Operands are rounded to the operand dtype inside the kernel (so an f32 matrix
feeds a bf16 product without a separate cast) and accumulated in float32.
Leading axes are a batch, one grid axis. Axes that are not a multiple of the
block are zero-padded, which leaves every product exact, and the result is
sliced back; an empty result is returned as is, and an empty contraction
(``k = 0``) is padded to one block of zeros.

How the contraction is reduced depends on the lowering
(:mod:`orthax.kernels.platform`): Mosaic TPU makes it the last grid axis,
``"arbitrary"``, with a VMEM accumulator, so each step holds only
``block × block_k`` operand tiles; Triton programs run concurrently and have
no scratch memory, so each program loops over the contraction itself.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from orthax.kernels import platform

__all__ = ["matmul_update", "symmetric_matmul"]

_ACC = jnp.dtype(jnp.float32)
_OPERAND_DTYPES = tuple(map(jnp.dtype, (jnp.float32, jnp.bfloat16,
                                        jnp.float16)))


def _triangle(t, n: int):
  """Row and column of tile ``t`` of an ``n×n`` grid's upper triangle.

  Tiles are numbered row by row, row ``i`` holding columns ``i..n-1``. Only
  integer compares and adds, unrolled over the rows, so that every lowering
  can evaluate it in index maps as well as in kernels.
  """
  row = jnp.int32(0)
  before = jnp.int32(0)  # tiles in the rows above `row`
  for r in range(1, n):
    passed = (t >= r * n - r * (r - 1) // 2).astype(jnp.int32)
    row += passed
    before += passed * (n - r + 1)
  return row, t - before + row


class _Tile(NamedTuple):
  """What a tile's prologue and epilogue may read."""
  coeffs: Any        # SMEM/global ref of float32 scalars, or None
  addend: Any        # ref of the output-shaped addend's tile, or None
  position: tuple[Any, Any]  # (row, column) of the tile
  shape: tuple[int, int]


def _round_up(n: int, block: int) -> int:
  return -(-n // block) * block


def _flatten_padded(x: jax.Array, rows: int, cols: int) -> jax.Array:
  x = x.reshape((math.prod(x.shape[:-2]),) + x.shape[-2:])
  pad = ((0, 0), (0, rows - x.shape[1]), (0, cols - x.shape[2]))
  return jnp.pad(x, pad) if any(p for _, p in pad) else x


def _mirror_upper(u: jax.Array, block: int) -> jax.Array:
  """Fills the tiles below the diagonal with the transposes of those above
  (the kernel never wrote them)."""
  tile = jnp.arange(u.shape[-1]) // block
  return jnp.where(tile[:, None] <= tile[None, :], u, jnp.swapaxes(u, -1, -2))


def _tiled_product(lhs, rhs, *, addend, coeffs, transpose_rhs: bool,
                   symmetric: bool, prologue, epilogue, operand_dtype,
                   out_dtype, target, tiles) -> jax.Array:
  """``epilogue(prologue + sum_k lhs_k rhs_k)`` over the output's tiles.

  Args:
    lhs: ``(..., m, k)``.
    rhs: ``(..., n, k)`` if ``transpose_rhs`` (the product is ``L R^T``), else
      ``(..., k, n)``.
    addend: ``(..., m, n)`` read by ``prologue``/``epilogue``, or ``None``.
    coeffs: float32 vector of scalars they read, or ``None``.
    transpose_rhs: contract both operands along their last axis.
    symmetric: compute the upper triangle of tiles and mirror it (m == n).
    prologue: ``(_Tile) -> float32 block``, the accumulator's start.
    epilogue: ``(_Tile, acc) -> block``, stored as ``out_dtype``.
    operand_dtype: both operands are rounded to it before each product.
    out_dtype: dtype of the result.
    target: a :class:`~orthax.kernels.platform.Target`; ``None`` picks one for
      the default backend.
    tiles: preferred :class:`~orthax.kernels.platform.Tiles`; ``None`` takes
      the platform's table.

  Returns:
    ``(..., m, n)`` array of ``out_dtype``.
  """
  target = platform.target() if target is None else target
  batch_shape, (m, k) = lhs.shape[:-2], lhs.shape[-2:]
  n = rhs.shape[-2] if transpose_rhs else rhs.shape[-1]
  if 0 in (math.prod(batch_shape), m, n):  # no tile to compute
    return jnp.zeros(batch_shape + (m, n), out_dtype)
  if tiles is None:
    itemsize = max(jnp.dtype(lhs.dtype).itemsize, jnp.dtype(rhs.dtype).itemsize)
    tiles = platform.tiles_for(target, max(m, n, k), itemsize)
  bm = platform.block_size(m, tiles.block)
  bn = bm if symmetric else platform.block_size(n, tiles.block)
  bk = platform.block_size(k, tiles.block_k)
  # An empty contraction still needs one (zero) block: the epilogue runs at
  # its last step.
  mp, np_, kp = _round_up(m, bm), _round_up(n, bn), _round_up(max(k, 1), bk)
  lhs = _flatten_padded(lhs, mp, kp)
  rhs = (_flatten_padded(rhs, np_, kp) if transpose_rhs
         else _flatten_padded(rhs, kp, np_))
  batch, ni, nj, nk = lhs.shape[0], mp // bm, np_ // bn, kp // bk

  if symmetric:
    tile_grid = (ni * (ni + 1) // 2,)
    position = lambda t: _triangle(t, ni)
  else:
    tile_grid = (ni, nj)
    position = lambda i, j: (i, j)
  in_grid = target.reduces_in_grid
  grid = (batch, *tile_grid, nk) if in_grid else (batch, *tile_grid)
  chunk = bk if in_grid else kp  # contraction extent of one operand block

  def spec(block, pick):
    def index_map(b, *ids):
      tile_ids, kk = (ids[:-1], ids[-1]) if in_grid else (ids, 0)
      return (b, *pick(*position(*tile_ids), kk))
    return pl.BlockSpec((None, *block), index_map)

  out_spec = spec((bm, bn), lambda i, j, kk: (i, j))
  in_specs = [spec((bm, chunk), lambda i, j, kk: (i, kk)),
              spec((bn, chunk), lambda i, j, kk: (j, kk)) if transpose_rhs
              else spec((chunk, bn), lambda i, j, kk: (kk, j))]
  inputs = [lhs, rhs]
  if coeffs is not None:
    in_specs.insert(0, platform.coefficient_spec(target))
    inputs.insert(0, coeffs)
  if addend is not None:
    in_specs.append(out_spec)
    inputs.append(_flatten_padded(addend, mp, np_))
  contract = (((1,), (1 if transpose_rhs else 0,)), ((), ()))

  def dot(a, b):
    return jax.lax.dot_general(a.astype(operand_dtype), b.astype(operand_dtype),
                               contract, preferred_element_type=_ACC)

  def kernel(*refs):
    refs = list(refs)
    coeff_ref = refs.pop(0) if coeffs is not None else None
    lhs_ref, rhs_ref = refs.pop(0), refs.pop(0)
    addend_ref = refs.pop(0) if addend is not None else None
    out_ref = refs.pop(0)
    # Read outside pl.when: the generic interpreter cannot see program ids
    # inside a conditional.
    tile = _Tile(coeff_ref, addend_ref, position(
        *(pl.program_id(1 + a) for a in range(len(tile_grid)))), (bm, bn))
    if in_grid:
      (acc_ref,) = refs
      step = pl.program_id(len(grid) - 1)

      @pl.when(step == 0)
      def _():
        acc_ref[...] = prologue(tile)

      acc_ref[...] += dot(lhs_ref[...], rhs_ref[...])

      @pl.when(step == nk - 1)
      def _():
        out_ref[...] = epilogue(tile, acc_ref[...]).astype(out_ref.dtype)
    else:
      def body(kk, acc):
        part = pl.ds(pl.multiple_of(kk * bk, bk), bk)
        right = rhs_ref[:, part] if transpose_rhs else rhs_ref[part, :]
        return acc + dot(lhs_ref[:, part], right)

      acc = jax.lax.fori_loop(0, nk, body, prologue(tile))
      out_ref[...] = epilogue(tile, acc).astype(out_ref.dtype)

  n_tiles = batch * math.prod(tile_grid)
  in_bytes = lhs.dtype.itemsize * bm + rhs.dtype.itemsize * bn
  cost = pl.CostEstimate(
      flops=2 * n_tiles * bm * bn * kp, transcendentals=0,
      bytes_accessed=n_tiles * (in_bytes * kp + bm * bn * (
          jnp.dtype(out_dtype).itemsize
          + (addend.dtype.itemsize if addend is not None else 0))))
  semantics = ("parallel",) * (1 + len(tile_grid)) + (
      ("arbitrary",) if in_grid else ())
  out = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_spec,
      out_shape=jax.ShapeDtypeStruct((batch, mp, np_), out_dtype),
      scratch_shapes=[pltpu.VMEM((bm, bn), _ACC)] if in_grid else [],
      compiler_params=platform.compiler_params(target, tiles, semantics),
      interpret=target.interpret,
      cost_estimate=cost,
  )(*inputs)
  if symmetric:
    out = _mirror_upper(out, bm)
  return out[:, :m, :n].reshape(batch_shape + (m, n))


def _check_dtypes(operand_dtype, *arrays) -> None:
  if jnp.dtype(operand_dtype) not in _OPERAND_DTYPES:
    raise ValueError(
        "The Pallas kernels take float32, bfloat16 or float16 operands and "
        f"accumulate in float32; got {jnp.dtype(operand_dtype)} operands. "
        "Use backend='xla' for float64.")
  for a in arrays:
    if a is not None and jnp.dtype(a.dtype) not in _OPERAND_DTYPES:
      raise ValueError(f"The Pallas kernels take float32, bfloat16 or float16 "
                       f"arrays, got {a.dtype}. Use backend='xla' for float64.")


def symmetric_matmul(lhs: jax.Array, rhs: jax.Array, *, scale=None,
                     addend: jax.Array | None = None, addend_scale=None,
                     identity_scale=None, operand_dtype=None,
                     out_dtype=jnp.float32, target=None,
                     tiles=None) -> jax.Array:
  r"""``identity_scale I + addend_scale C + scale L R^T``, known symmetric.

  Only the tiles on and above the diagonal are computed; the rest are their
  mirror images, so the result is exactly symmetric. It equals the full
  product (up to rounding) only where ``L R^T`` is symmetric: ``L = R`` (a
  Gram matrix ``X X^T``), or ``L`` and ``R`` symmetric and commuting (then
  ``L R^T = L R``, e.g. ``A·A`` or two polynomials in the same matrix). The
  addend must then be symmetric too.

  Args:
    lhs: ``(..., m, k)``.
    rhs: ``(..., m, k)``, the same shape.
    scale: scalar multiplying the product (``None``: 1).
    addend: optional ``(..., m, m)`` matrix ``C``, added in the epilogue.
    addend_scale: scalar multiplying ``C`` (``None``: 1).
    identity_scale: scalar times the identity, added in the epilogue
      (``None``: no identity term).
    operand_dtype: ``L`` and ``R`` are rounded to it before the product
      (``None``: ``lhs.dtype``); the product accumulates in float32.
    out_dtype: dtype of the result.
    target: :class:`~orthax.kernels.platform.Target`; ``None``: the default
      backend's.
    tiles: :class:`~orthax.kernels.platform.Tiles` overriding the table.

  Returns:
    ``(..., m, m)`` array of ``out_dtype``; the epilogue is
    ``(s_I I + s_C C) + s P`` in float32 (the XLA path's order).
  """
  if lhs.shape != rhs.shape:
    raise ValueError(f"symmetric_matmul needs operands of one shape, got "
                     f"{lhs.shape} and {rhs.shape}.")
  m = lhs.shape[-2]
  if addend is not None and addend.shape != lhs.shape[:-2] + (m, m):
    raise ValueError(f"addend must have shape {lhs.shape[:-2] + (m, m)}, got "
                     f"{addend.shape}.")
  if addend is None and addend_scale is not None:
    raise ValueError("addend_scale needs an addend.")
  operand_dtype = lhs.dtype if operand_dtype is None else operand_dtype
  _check_dtypes(operand_dtype, lhs, rhs, addend)
  with_identity, with_addend = identity_scale is not None, addend is not None
  scaled = scale is not None
  coeffs = None
  if with_identity or addend_scale is not None or scaled:
    coeffs = jnp.stack([jnp.asarray(1.0 if c is None else c, _ACC)
                        for c in (identity_scale, addend_scale, scale)])

  def epilogue(tile: _Tile, acc):
    if scaled:
      acc = tile.coeffs[2] * acc
    extra = None
    if with_identity:
      i, j = tile.position
      rows = jax.lax.broadcasted_iota(jnp.int32, tile.shape, 0)
      cols = jax.lax.broadcasted_iota(jnp.int32, tile.shape, 1)
      extra = jnp.where((rows == cols) & (i == j), tile.coeffs[0], 0.0)
    if with_addend:
      term = tile.addend[...].astype(_ACC)
      if coeffs is not None:
        term = tile.coeffs[1] * term
      extra = term if extra is None else extra + term
    return acc if extra is None else extra + acc

  return _tiled_product(
      lhs, rhs, addend=addend, coeffs=coeffs, transpose_rhs=True,
      symmetric=True, prologue=lambda tile: jnp.zeros(tile.shape, _ACC),
      epilogue=epilogue, operand_dtype=operand_dtype, out_dtype=out_dtype,
      target=target, tiles=tiles)


def matmul_update(p: jax.Array, x: jax.Array, scale=None, *, target=None,
                  tiles=None) -> jax.Array:
  r"""``scale X + P X`` in ``x.dtype``, the Newton–Schulz update.

  ``P`` is rounded to ``x.dtype`` inside the kernel and the product
  accumulates in float32, starting from ``scale X`` (so the sum needs no
  second pass over ``X``).

  Args:
    p: ``(..., m, m)``, any supported float dtype (float32 from the
      polynomial kernel).
    x: ``(..., m, n)``.
    scale: scalar ``a`` (``None``: ``P X`` alone).
    target: :class:`~orthax.kernels.platform.Target`; ``None``: the default
      backend's.
    tiles: :class:`~orthax.kernels.platform.Tiles` overriding the table.

  Returns:
    ``(..., m, n)`` array of ``x.dtype``.
  """
  m = x.shape[-2]
  if p.shape != x.shape[:-2] + (m, m):
    raise ValueError(f"matmul_update needs p of shape {x.shape[:-2] + (m, m)} "
                     f"for x of shape {x.shape}, got {p.shape}.")
  _check_dtypes(x.dtype, p, x)
  coeffs = None if scale is None else jnp.asarray(scale, _ACC).reshape(1)

  def prologue(tile: _Tile):
    if coeffs is None:
      return jnp.zeros(tile.shape, _ACC)
    return tile.coeffs[0] * tile.addend[...].astype(_ACC)

  return _tiled_product(
      p, x, addend=None if scale is None else x, coeffs=coeffs,
      transpose_rhs=False, symmetric=False, prologue=prologue,
      epilogue=lambda tile, acc: acc, operand_dtype=x.dtype,
      out_dtype=x.dtype, target=target, tiles=tiles)
