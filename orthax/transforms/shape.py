"""``orthax.scale_by_shape``: the update scale that depends on a matrix's shape."""

from __future__ import annotations

import math

import optax

from orthax._checks import check_hyperparameter
from orthax.matrices import DimensionNumbersSpec, MatrixView, map_matrices

__all__ = ["scale_by_shape", "shape_factor"]

_MODES = ("muon", "rms", "spectral")


def shape_factor(view: MatrixView, mode: str = "muon",
                 rms: float = 0.2) -> float:
  """The factor :func:`scale_by_shape` multiplies ``view``'s matrices by."""
  # max(fan_in, 1): an empty leaf's factor multiplies nothing
  if mode == "muon":
    return math.sqrt(max(1.0, view.fan_out / max(view.fan_in, 1)))
  if mode == "spectral":
    return math.sqrt(view.fan_out / max(view.fan_in, 1))
  return rms * math.sqrt(max(view.fan_in, view.fan_out))


def scale_by_shape(
    mode: str = "muon", *, rms: float = 0.2,
    dimension_numbers: DimensionNumbersSpec = None,
) -> optax.GradientTransformation:
  r"""Scales each orthogonalized matrix by a factor of its shape.

  An orthogonal ``(fan_in, fan_out)`` matrix has entries of RMS
  ``1 / sqrt(max(fan_in, fan_out))``. Two conventions fix the step size:

  * ``"muon"``: :math:`\sqrt{\max(1, \text{fan\_out} / \text{fan\_in})}`
    (Jordan's Muon): the update's spectral norm relative to the RMS→RMS
    operator norm is the same for every shape;
  * ``"rms"``: :math:`\text{rms} \cdot \sqrt{\max(\text{fan\_in},
    \text{fan\_out})}` (Moonlight): the update's entries have RMS ``rms``
    (0.2 matches AdamW's typical update RMS), so AdamW's learning rate and
    weight decay carry over;
  * ``"spectral"``: :math:`\sqrt{\text{fan\_out} / \text{fan\_in}}`
    (Dion's, ``microsoft/dion``): ``"muon"`` without the floor at 1, so a
    tall matrix's update is scaled down, to the same RMS→RMS operator norm
    for every shape.

  Args:
    mode: ``"muon"``, ``"rms"`` or ``"spectral"``.
    rms: the target RMS in ``"rms"`` mode, ``> 0``.
    dimension_numbers: as in :func:`orthax.orthogonalize`; fan_in and fan_out
      are the products of the reduction and output axes.

  Returns:
    A stateless :class:`optax.GradientTransformation`. A leaf with a side of
    0 is returned empty.

  Raises:
    ValueError: unknown ``mode``, or ``rms <= 0`` (at construction).
    TypeError: ``rms`` is not a real number.

  Example:
    >>> import jax.numpy as jnp, optax, orthax
    >>> tx = optax.chain(orthax.orthogonalize(), orthax.scale_by_shape("rms"))
    >>> updates, _ = tx.update({'w': jnp.eye(4, 16)}, tx.init(None))

  References:
    K. Jordan et al., Muon: An optimizer for hidden layers in neural networks,
    2024.

    J. Liu et al., Muon is Scalable for LLM Training, 2025, arXiv:2502.16982

    K. Ahn et al., Dion: Distributed Orthonormalized Updates, 2025,
    arXiv:2504.05295
  """
  if mode not in _MODES:
    raise ValueError(f"Unknown scale_by_shape mode {mode!r}; expected one of "
                     f"{_MODES}.")
  rms = check_hyperparameter("orthax.scale_by_shape", "rms", rms, low=0.0,
                             low_open=True)

  def update_fn(updates, state, params=None):
    del params
    out = map_matrices(
        lambda view, u: (u * shape_factor(view, mode, rms)).astype(u.dtype),
                       updates, dimension_numbers=dimension_numbers,
                       transform="orthax.scale_by_shape")
    return out, state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)
