"""Pallas kernels for the Newton–Schulz iteration (``backend="pallas"``).

* :mod:`orthax.kernels.matmul`: the kernels, a symmetric product (upper
  triangle of tiles, mirrored) with a fused ``s_I I + s_C C`` epilogue, and
  the update ``a X + P X`` with its accumulator started at ``a X``.
* :mod:`orthax.kernels.ops`: those kernels as the iteration's
  :class:`~orthax.polar.newton_schulz.MatmulOps`.
* :mod:`orthax.kernels.platform`: lowering per platform (Mosaic TPU, Triton
  on GPU, the TPU interpreter on CPU), tiles and compiler parameters.
"""

from orthax.kernels.matmul import matmul_update, symmetric_matmul
from orthax.kernels.ops import PALLAS_OPS, pallas_ops
from orthax.kernels.platform import Target, Tiles, target, tiles_for

__all__ = ["PALLAS_OPS", "Target", "Tiles", "matmul_update", "pallas_ops",
           "symmetric_matmul", "target", "tiles_for"]
