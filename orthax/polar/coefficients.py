"""Named Newton–Schulz coefficient presets, each with its source.

One Newton–Schulz step maps every singular value ``s`` of the (normalized)
matrix through the odd quintic ``p(s) = a s + b s^3 + c s^5``; a preset is the
list of ``(a, b, c)`` for each step, plus the margin by which the input's
Frobenius norm is inflated before the first step (a margin above 1 keeps the
largest singular value safely inside the region where the polynomials were
designed, which matters in low precision).

Presets are data: each one carries its citation, and ``tests/test_coefficients.py``
checks the singular-value map each source claims.

Coefficients may also depend on the matrix's shape (:func:`by_shape`, and the
preset ``"root"`` in :data:`SHAPE_PRESETS`): ROOT fits one quintic per shape.
"""

from __future__ import annotations

import dataclasses
import numbers
import types
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "CONVERGENT_QUINTIC",
    "CoefficientPreset",
    "PRESETS",
    "SHAPE_PRESETS",
    "ShapeCoefficients",
    "by_shape",
    "get_preset",
    "resolve_coefficients",
    "shape_coefficients",
    "shape_key",
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
        f"{sorted(PRESETS)}, keyed by shape (orthax.orthogonalize only): "
        f"{sorted(SHAPE_PRESETS)}, and 'svd' for the exact polar factor."
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


# ---------------------------------------------------------------------------
# Coefficients keyed by matrix shape
# ---------------------------------------------------------------------------


def shape_key(shape) -> tuple[int, int]:
  """``(short side, long side)`` of a matrix shape: the key of a shape table,
  the same for a matrix and its transpose."""
  rows, cols = shape
  return (min(rows, cols), max(rows, cols))


@dataclasses.dataclass(frozen=True, eq=False)
class ShapeCoefficients:
  """Newton–Schulz coefficients chosen by the shape of each matrix.

  Built by :func:`by_shape` (or a preset of :data:`SHAPE_PRESETS`) and given
  to :func:`orthax.orthogonalize` as ``coeffs``.

  Attributes:
    table: read-only ``{(short, long): coefficients}``: a matrix whose sides
      are ``short`` and ``long``, in either orientation, runs these
      coefficients; each is a preset name of :data:`PRESETS`, one ``(a, b,
      c)`` triple or a ``(steps, 3)`` array (float64, read-only), read as
      ``orthogonalize``'s ``coeffs`` is.
    default: the coefficients of every shape not in ``table``, likewise.
    warn: whether :func:`orthax.orthogonalize` warns about the shapes that
      run ``default`` (once per trace).
    name: the preset's name; ``None`` for a :func:`by_shape` table.
    source: where the numbers come from.
  """

  table: Mapping[tuple[int, int], Any]
  default: Any
  warn: bool = True
  name: str | None = None
  source: str = ""


def _shape_entry(key: Any) -> tuple[int, int]:
  ok = (isinstance(key, tuple) and len(key) == 2 and all(
      isinstance(k, numbers.Integral) and not isinstance(k, (bool, np.bool_))
      and k >= 1 for k in key))
  if not ok:
    raise ValueError(
        f"orthax.polar.by_shape: a key must be a matrix shape, a pair of "
        f"positive integers (rows, cols), got {key!r}.")
  return shape_key((int(key[0]), int(key[1])))


def _coefficient_entry(coeffs: Any, what: str) -> Any:
  """``coeffs`` checked as one table's coefficients; arrays made read-only
  float64 copies."""
  if isinstance(coeffs, ShapeCoefficients) or (
      isinstance(coeffs, str) and coeffs == "svd"):
    raise ValueError(
        f"orthax.polar.by_shape: {what} must be Newton-Schulz coefficients "
        "(a preset name, one (a, b, c) triple or a (steps, 3) array), got "
        f"{coeffs!r}; a table cannot hold 'svd' or another table.")
  # raises for a bad shape or name (a table's name too: get_preset knows
  # only PRESETS)
  resolve_coefficients(coeffs, None)
  if isinstance(coeffs, str):
    return coeffs
  out = np.array(coeffs, dtype=np.float64)
  out.flags.writeable = False
  return out


def by_shape(table: Mapping[tuple[int, int], Any], *, default: Any = "muon",
             warn: bool = True) -> ShapeCoefficients:
  """Newton–Schulz coefficients keyed by matrix shape.

  For :func:`orthax.orthogonalize`'s ``coeffs``: every matrix runs the
  coefficients of its shape, ignoring orientation (a tall matrix is iterated
  through its transpose, so ``(m, n)`` and ``(n, m)`` are one key), and
  every shape not in ``table`` runs ``default``. That fallback is reported:
  ``orthogonalize`` warns (``UserWarning``), when it traces its update,
  naming each such shape and its leaves, unless ``warn=False``.

  Each entry is read as ``orthogonalize``'s ``coeffs`` is: one triple runs
  ``steps`` times (5 if ``steps`` is None), a preset name keeps its margin
  and preconditioning, a ``(k, 3)`` array its rows.

  Args:
    table: ``{(rows, cols): coefficients}``; each a preset name of
      :data:`PRESETS`, one ``(a, b, c)`` triple or a ``(k, 3)`` array.
    default: the coefficients of the other shapes, likewise (default
      ``"muon"``, Jordan's quintic).
    warn: warn about the shapes that run ``default``.

  Returns:
    A :class:`ShapeCoefficients`.

  Raises:
    ValueError: a key that is not a pair of positive integers, a shape given
      in both orientations, coefficients that are not a preset name, triple
      or ``(k, 3)`` array of finite numbers (``"svd"`` and nested tables
      included).
    TypeError: ``warn`` not a bool.

  Example:
    >>> import jax.numpy as jnp, orthax
    >>> coeffs = orthax.polar.by_shape({(64, 256): (3.0, -3.2, 1.2)},
    ...                                default="polar_express")
    >>> tx = orthax.orthogonalize(coeffs=coeffs)
    >>> out, _ = tx.update({'w': jnp.ones((256, 64))}, tx.init(None))
  """
  if not isinstance(table, Mapping):
    raise ValueError("orthax.polar.by_shape: table must be a mapping "
                     f"{{(rows, cols): coefficients}}, got {table!r}.")
  if not isinstance(warn, (bool, np.bool_)):
    raise TypeError(f"orthax.polar.by_shape: warn must be a bool, got "
                    f"{warn!r}.")
  entries: dict[tuple[int, int], Any] = {}
  for key, coeffs in table.items():
    shape = _shape_entry(key)
    if shape in entries:
      raise ValueError(
          f"orthax.polar.by_shape: shape {key!r} is given twice (as "
          f"{shape} and its transpose); a matrix and its transpose share "
          "coefficients: give one.")
    entries[shape] = _coefficient_entry(coeffs, f"the entry for {key!r}")
  return ShapeCoefficients(types.MappingProxyType(entries),
                           _coefficient_entry(default, "default"), bool(warn))


_ROOT = dataclasses.replace(
    by_shape({
        (2048, 2048): (3.4916, -4.8224, 2.1095),
        (2048, 16384): (3.1943, -3.8221, 1.5322),
        (2048, 3072): (3.4509, -4.5790, 1.9325),
        (2048, 8192): (2.9794, -3.6674, 1.6207),
    }, default=_MUON.coeffs[0]),
    name="root",
    source=(
        "W. He et al., 'ROOT: Robust Orthogonalized Optimizer for Neural "
        "Network Training' (2025), arXiv:2511.20626; github.com/huawei-noah/"
        "noah-research, ROOT/examples/example_train.py: one quintic per "
        "(short, long) matrix shape of its 2048-wide toy model, repeated at "
        "every step, after a Frobenius normalization with margin 1; Jordan's "
        "Muon quintic, repeated likewise, for every other shape (the script "
        "logs a warning). How the quintics were fitted is not public."),
)

# Coefficient tables keyed by shape, by name (orthax.orthogonalize's coeffs).
SHAPE_PRESETS: dict[str, ShapeCoefficients] = {_ROOT.name: _ROOT}


def shape_coefficients(coeffs: Any) -> ShapeCoefficients:
  """``coeffs`` (anything ``orthogonalize`` takes but ``"svd"``) as a table:
  itself, the preset of :data:`SHAPE_PRESETS` it names, or one table for all
  shapes (no entries, a ``default`` of ``coeffs`` and no warning)."""
  if isinstance(coeffs, ShapeCoefficients):
    return coeffs
  if isinstance(coeffs, str) and coeffs in SHAPE_PRESETS:
    return SHAPE_PRESETS[coeffs]
  return ShapeCoefficients(types.MappingProxyType({}),
                           _coefficient_entry(coeffs, "coeffs"), warn=False)
