"""Named Newton–Schulz coefficient presets, each with its source.

One Newton–Schulz step maps every singular value ``s`` of the (normalized)
matrix through the odd quintic ``p(s) = a s + b s^3 + c s^5``; a preset is the
list of ``(a, b, c)`` for each step, plus the margin by which the input's
Frobenius norm is inflated before the first step (a margin above 1 keeps the
largest singular value safely inside the region where the polynomials were
designed, which matters in low precision).

Presets are data: each one carries its citation, and ``tests/test_coefficients.py``
checks the singular-value map each source claims.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "CONVERGENT_QUINTIC",
    "CoefficientPreset",
    "PRESETS",
    "get_preset",
    "resolve_coefficients",
]

# p(s) = (15 s - 10 s^3 + 3 s^5) / 8: p(1) = 1, p'(1) = p''(1) = 0, the
# degree-5 member of the classical Newton–Schulz family (Higham, Functions of
# Matrices, 2008, ch. 8).
CONVERGENT_QUINTIC = np.array([15 / 8, -10 / 8, 3 / 8])


@dataclasses.dataclass(frozen=True)
class CoefficientPreset:
  """A named list of per-step quintic coefficients.

  Attributes:
    name: the preset's name, as passed to ``orthax.orthogonalize(coeffs=...)``.
    coeffs: float64 array of shape ``(steps, 3)``: ``(a, b, c)`` per step.
    norm_margin: the input is divided by ``norm_margin * ||X||_F + eps``.
    source: where the numbers come from.
    interval: ``(lo, 1)``: normalized input singular values the preset is
      made for.
    band: ``(lo, hi)``: where the composed steps map every value of
      ``interval`` (checked in float64 by ``tests/test_coefficients.py``).
    preconditioning: how the input is scaled before the first step
      (:func:`orthax.polar.newton_schulz`'s ``preconditioning``); the
      interval is in units of that scaling.
  """

  name: str
  coeffs: np.ndarray
  norm_margin: float
  source: str
  interval: tuple[float, float]
  band: tuple[float, float]
  preconditioning: str = "frobenius"

  @property
  def steps(self) -> int:
    return self.coeffs.shape[0]


_MUON = CoefficientPreset(
    name="muon",
    coeffs=np.array([(3.4445, -4.7750, 2.0315)] * 5),
    norm_margin=1.0,
    source=(
        "K. Jordan et al., 'Muon: An optimizer for hidden layers in neural "
        "networks' (2024), github.com/KellerJordan/Muon: one quintic applied "
        "5 times, tuned for the largest slope at 0 while keeping the output "
        "singular values in about [0.7, 1.2]."),
    interval=(3e-3, 1.0),
    band=(0.68, 1.21),
)

_POLAR_EXPRESS = CoefficientPreset(
    name="polar_express",
    coeffs=np.array([
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ]),
    norm_margin=1.02,
    source=(
        "N. Amsel, D. Persson, C. Musco, R. M. Gower, 'The Polar Express: "
        "Optimal Matrix Sign Methods and Their Application to the Muon "
        "Algorithm' (2025), arXiv:2505.16932: per-step minimax-optimal "
        "quintics for singular values in [1e-3, 1], with the safety scaling "
        "of the authors' code; the 5-step list as used in public Muon code "
        "(modded-nanogpt), input normalized by 1.02 * ||X||_F."),
    interval=(1e-3, 1.0),
    band=(0.85, 1.15),
)

_YOU = CoefficientPreset(
    name="you",
    coeffs=np.array([
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ]),
    norm_margin=1.0,
    source=(
        "J. You's per-step quintics (2025), used by Dion (K. Ahn et al., "
        "'Dion: Distributed Orthonormalized Updates', arXiv:2504.05295, "
        "github.com/microsoft/dion) and optax's 'dion' preset."),
    interval=(3e-3, 1.0),
    band=(0.97, 1.15),
)

PRESETS: dict[str, CoefficientPreset] = {
    p.name: p for p in (_MUON, _POLAR_EXPRESS, _YOU)
}


def get_preset(name: str) -> CoefficientPreset:
  """Returns the preset called ``name`` or raises a ``ValueError`` listing them."""
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(
        f"Unknown Newton-Schulz coefficient preset {name!r}; known presets: "
        f"{sorted(PRESETS)} (and 'svd' for the exact polar factor)."
    ) from None


def resolve_coefficients(coeffs, steps: int | None) -> tuple[np.ndarray, float]:
  """Turns a preset name or explicit coefficients into a ``(steps, 3)`` table.

  Args:
    coeffs: a preset name, one ``(a, b, c)`` triple (applied at every step), or
      an array of shape ``(k, 3)`` (one triple per step).
    steps: number of steps. ``None`` keeps the preset's (or table's) own count;
      a single triple then runs 5 steps (and is repeated ``steps`` times
      otherwise). With a per-step table, fewer steps take the first rows (each
      row of a greedy per-step design such as Polar Express is optimal given
      the rows before it) and more steps append the classical Newton–Schulz
      quintic :data:`CONVERGENT_QUINTIC`, which has 1 as a super-attracting
      fixed point (the tuned rows do not: their last polynomial maps 1 to
      about 1.06), so extra steps converge to the exact polar factor.

  Returns:
    ``(table, norm_margin)``: a float64 array of shape ``(steps, 3)`` and the
    normalization margin (1.0 for explicit coefficients).
  """
  if isinstance(coeffs, str):
    preset = get_preset(coeffs)
    table, margin = preset.coeffs, preset.norm_margin
  else:
    table = np.asarray(coeffs, dtype=np.float64)
    margin = 1.0
    if table.shape == (3,):
      table = table[None, :].repeat(5 if steps is None else steps, axis=0)
    elif table.ndim != 2 or table.shape[-1] != 3 or table.shape[0] == 0:
      raise ValueError(
          "Newton-Schulz coefficients must be a preset name, one (a, b, c) "
          f"triple or an array of shape (steps, 3); got shape {table.shape}.")
    if not np.all(np.isfinite(table)):
      raise ValueError(f"Newton-Schulz coefficients must be finite: {table}")
  if steps is not None:
    if steps < 1:
      raise ValueError(f"steps must be a positive integer, got {steps}.")
    if steps <= table.shape[0]:
      table = table[:steps]
    else:
      extra = np.repeat(CONVERGENT_QUINTIC[None, :], steps - table.shape[0],
                        axis=0)
      table = np.concatenate([table, extra])
  return table, margin
