"""Which kernel variant runs where, with which tiles and compiler parameters.

Every platform decision of :mod:`orthax.kernels` is made here, so a lowering
can be swapped without touching the kernels:

* TPU: Mosaic (``jax.experimental.pallas.tpu``); the contraction is the last
  grid axis, marked ``"arbitrary"``, with a float32 VMEM accumulator.
* GPU: the Triton lowering (``jax.experimental.pallas.triton``); the
  contraction is a loop inside the kernel. BUILD.md ("Pallas kernels") says
  why Triton rather than Mosaic GPU for the installed JAX.
* Anything else (CPU): the TPU variant under the TPU interpreter
  (``pltpu.InterpretParams``), which simulates VMEM and SMEM and fills
  uninitialized buffers with NaN, so CI runs the very kernels a TPU compiles.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

__all__ = ["LOWERINGS", "Target", "Tiles", "block_size", "coefficient_spec",
           "compiler_params", "target", "tiles_for"]

LOWERINGS = ("mosaic_tpu", "triton")


@dataclasses.dataclass(frozen=True)
class Target:
  """A kernel variant and how to run it.

  Attributes:
    lowering: ``"mosaic_tpu"`` (reduction over a grid axis into a VMEM
      accumulator) or ``"triton"`` (reduction in a loop inside the kernel).
    interpret: ``False`` to compile for the device; otherwise the value given
      to ``pallas_call(interpret=...)``: ``pltpu.InterpretParams(...)`` for
      the TPU interpreter, ``True`` for the generic one (which runs the Triton
      variant on CPU).
  """
  lowering: str
  interpret: Any = False

  def __post_init__(self):
    if self.lowering not in LOWERINGS:
      raise ValueError(f"Unknown Pallas lowering {self.lowering!r}; expected "
                       f"one of {LOWERINGS}.")

  @property
  def reduces_in_grid(self) -> bool:
    """Whether the contraction is a grid axis (else a loop in the kernel)."""
    return self.lowering == "mosaic_tpu"


def target(platform: str | None = None) -> Target:
  """The kernel variant for ``platform`` (default ``jax.default_backend()``).

  The one place that maps a platform to a lowering.
  """
  platform = jax.default_backend() if platform is None else platform
  if platform == "tpu":
    return Target("mosaic_tpu")
  if platform in ("gpu", "cuda", "rocm"):
    return Target("triton")
  return Target("mosaic_tpu", interpret=pltpu.InterpretParams())


class Tiles(NamedTuple):
  """Preferred block sizes: ``block`` for output rows and columns,
  ``block_k`` for the contraction (for 2-byte operands)."""
  block: int
  block_k: int


# Untuned defaults: no GPU or TPU was available to measure them (BUILD.md).
# Per lowering, rows of (largest side of the product up to, tiles); the first
# row that fits applies. TPU: 256/512 blocks keep a step's double-buffered
# operands, addend, output and accumulator under 10 MiB of VMEM in float32.
# Triton: 64x64 tiles give a 768-sided Gram product 78 programs, 128x128 with
# 8 warps suit the larger ones; 64-wide contraction chunks of 2-byte operands.
_TILE_TABLE = {
    "mosaic_tpu": ((1024, Tiles(256, 512)), (None, Tiles(512, 512))),
    "triton": ((1024, Tiles(64, 64)), (None, Tiles(128, 64))),
}
_TRITON_STAGES = 3


def tiles_for(target_: Target, side: int, itemsize: int) -> Tiles:
  """Preferred tiles for a product whose largest side is ``side``.

  Operands wider than 2 bytes get half the contraction block, so a pipeline
  stage holds the same number of bytes.
  """
  for limit, tiles in _TILE_TABLE[target_.lowering]:
    if limit is None or side <= limit:
      break
  if itemsize > 2:
    tiles = tiles._replace(block_k=max(16, tiles.block_k // 2))
  return tiles


def block_size(dim: int, preferred: int) -> int:
  """The power-of-two block for an axis of length ``dim``, at most ``preferred``.

  The axis is zero-padded to a multiple of the block, so the block that pads
  least wins (the larger one on ties). Blocks are at least 16 (the smallest
  Triton dot) and, on axes of 128 or more, at least 128 (a TPU lane row).
  Triton needs power-of-two blocks; on TPU a block is either a multiple of
  (8, 128) or the whole (padded) axis, and these are.
  """
  smallest = min(128, max(16, int(pl.next_power_of_2(dim))), preferred)
  candidates = [smallest << s for s in range(32) if smallest << s <= preferred]
  return min(candidates, key=lambda b: (-(-dim // b) * b, -b))


def compiler_params(target_: Target, tiles: Tiles,
                    dimension_semantics: tuple[str, ...]) -> Any:
  """Compiler parameters for a kernel of ``target_``'s lowering.

  Args:
    target_: the kernel variant.
    tiles: the blocks the kernel runs with (Triton: picks the warp count).
    dimension_semantics: per grid axis, ``"parallel"`` or ``"arbitrary"``
      (Mosaic only; Triton programs are always independent).
  """
  if target_.lowering == "mosaic_tpu":
    return pltpu.CompilerParams(dimension_semantics=dimension_semantics)
  return pltriton.CompilerParams(num_warps=4 if tiles.block <= 64 else 8,
                                 num_stages=_TRITON_STAGES)


def coefficient_spec(target_: Target) -> pl.BlockSpec:
  """Where a kernel's small vector of scalar coefficients lives.

  Mosaic reads scalars from SMEM; Triton loads them from global memory.
  """
  if target_.lowering == "mosaic_tpu":
    return pl.BlockSpec(memory_space=pltpu.SMEM)
  return pl.BlockSpec()
