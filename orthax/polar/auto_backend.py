"""Where ``backend="auto"`` runs the Pallas kernels: the measured table.

``newton_schulz(..., backend="auto")`` runs the kernels for a matrix only if
:data:`MEASURED_FASTER` holds a row for the default device's kind, the
iteration's compute dtype, its path (plain or Gram) and exactly the matrix's
sides; everywhere else it runs XLA. A row is never extrapolated to another
shape, dtype or device: the kernels' advantage depends on all of them.

Rows come from ``benchmarks/device.py`` (part 1), which prints them, ready to
paste here, for every shape where the kernels beat orthax's XLA iteration in
every batch size it measured. Each row keeps the date and speed-up it was
measured with.

No row has been measured yet: no GPU or TPU has run ``device.py`` (BUILD.md,
"Device runs"), so ``"auto"`` runs XLA everywhere.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["MEASURED_FASTER", "Measured", "uses_pallas"]


class Measured(NamedTuple):
  """One shape where the Pallas kernels were measured faster than XLA.

  Attributes:
    device_kind: ``jax.Device.device_kind`` of the device measured (e.g.
      ``"NVIDIA H100 80GB HBM3"``).
    dtype: the iteration's compute dtype, by name (``"bfloat16"``).
    gram: the path, Gram Newton–Schulz (``True``) or plain.
    sides: the matrix's sides, shorter first (either orientation matches).
    speedup: XLA's time over the kernels' (the smallest over the batch sizes
      measured).
    date: when, as ``YYYY-MM-DD`` (the run's JSON has the rest).
  """
  device_kind: str
  dtype: str
  gram: bool
  sides: tuple[int, int]
  speedup: float
  date: str


# None measured yet (see the module's docstring).
MEASURED_FASTER: tuple[Measured, ...] = ()


def uses_pallas(m: int, n: int, dtype, gram: bool) -> bool:
  """Whether ``backend="auto"`` takes the kernels for an ``m×n`` matrix.

  Args:
    m, n: the matrix's sides (either order).
    dtype: the iteration's compute dtype.
    gram: whether the iteration takes the Gram path.

  Returns:
    ``True`` exactly where a row matches the default device's kind, the
    dtype, the path and the sides.
  """
  key = (jax.devices()[0].device_kind, jnp.dtype(dtype).name, bool(gram),
         (min(m, n), max(m, n)))
  return any((r.device_kind, r.dtype, r.gram, tuple(r.sides)) == key
             for r in MEASURED_FASTER)
