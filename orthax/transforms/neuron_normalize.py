"""``orthax.neuron_normalize``: NorMuon's per-neuron second-moment normalization."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import optax

from orthax._checks import (check_hyperparameter, check_same_shapes,
                            check_state_leaf)
from orthax.matrices import DimensionNumbersSpec, MatrixView, map_matrices
from orthax.polar.newton_schulz import divide_by_max_abs

__all__ = ["NeuronNormalizeState", "neuron_normalize"]

_AXES = ("output", "input", "larger")


class NeuronNormalizeState(NamedTuple):
  """State of :func:`neuron_normalize`.

  Attributes:
    rms: per leaf, ``sqrt(v_t)``: the square root of the moving average of
      the mean square of each neuron's update, in float32 (float64 for
      float64 params), of shape ``(batch, fan_out)`` (``axis="output"``) or
      ``(batch, fan_in)`` (``axis="input"``), where ``batch`` is the product
      of the leaf's batch axes (1 for a 2-D leaf). The root is stored rather
      than ``v_t`` itself so that updates up to float32's largest value keep
      a finite state (``v_t`` overflows above about 1.8e19).
  """

  rms: optax.Updates


def _neuron_axis(view: MatrixView, axis: str) -> int:
  """Axis of the ``(batch, fan_in, fan_out)`` stack that indexes the neurons."""
  if axis == "output" or (axis == "larger" and view.fan_out >= view.fan_in):
    return 2
  return 1


def _root_sum_squares(unit, axis):
  """``sqrt(sum(unit**2))`` over ``axis``, for entries in ``[-1, 1]``."""
  return jnp.sqrt(jnp.sum(jnp.square(unit), axis=axis))


def neuron_normalize(
    beta2: float = 0.95, eps: float = 1e-10, *, axis: str = "output",
    dimension_numbers: DimensionNumbersSpec = None,
) -> optax.GradientTransformation:
  r"""NorMuon: normalizes each neuron of an orthogonalized update.

  Orthogonalization equalizes a matrix's singular values but not its rows or
  columns: some neurons still receive much larger updates than others. For
  each matrix ``O`` (an output of :func:`orthax.orthogonalize`):

  .. math::
    n = \|O\|_F, \quad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2)\,\mathrm{mean}_{\text{fan\_in}}(O^2),
    \quad O' = \frac{O}{\sqrt{v_t} + \epsilon}, \quad
    \text{out} = O' \frac{n}{\|O'\|_F},

  with one statistic per output neuron (per column of the ``(fan_in,
  fan_out)`` matrix), ``v_0 = 0`` and no bias correction (the final rescale
  makes the update's scale independent of ``v``'s). The Frobenius norm of the
  update is kept, so :func:`orthax.scale_by_shape` and the learning rate mean
  what they mean for Muon.

  Every sum of squares is taken on the matrix divided by its largest
  magnitude, and the state keeps ``sqrt(v_t)``, so no square overflows or
  underflows: an update scaled by ``c`` gives the output scaled by ``c`` (up
  to the ``eps`` term), for any finite float32 update. A zero update stays
  zero (for every ``eps >= 0``), and a leaf with a side of 0 gives an empty
  update and a finite state.

  Args:
    beta2: decay of the moving average of squares, in ``[0, 1)``.
    eps: added to ``sqrt(v)``, ``>= 0``.
    axis: which neurons get a statistic: ``"output"`` (one per fan_out index,
      the paper's rule), ``"input"`` (one per fan_in index), or ``"larger"``
      (one per index of the larger of fan_in and fan_out, the mean taken over
      the smaller; fan_out on ties), as later public NorMuon code does.
    dimension_numbers: as in :func:`orthax.orthogonalize`.

  Returns:
    An :class:`optax.GradientTransformation` whose state holds one float32
    (or float64) vector per matrix (``fan_out`` or ``fan_in`` entries per
    batch slice).

  Raises:
    ValueError: unknown ``axis``, ``beta2`` outside ``[0, 1)`` or ``eps < 0``
      (at construction); at update time, a leaf that is not a matrix, an
      update whose shape is not its parameter's (when the params are given:
      the state alone cannot tell another size of the axis it averages over),
      or a state leaf that is missing or not of the shape this leaf needs (a
      state of another optimizer or another model), named by its key path.
    TypeError: a hyperparameter that is not a real number; a leaf that is not
      a supported float.

  Example:
    >>> import jax, jax.numpy as jnp, optax, orthax
    >>> tx = optax.chain(orthax.momentum(), orthax.orthogonalize(),
    ...                  orthax.neuron_normalize(), orthax.scale_by_shape())
    >>> params = {'w': jnp.zeros((32, 64))}
    >>> g = {'w': jax.random.normal(jax.random.key(0), (32, 64))}
    >>> updates, state = tx.update(g, tx.init(params))

  References:
    Z. Li et al., NorMuon: Making Muon more efficient and scalable, 2025,
    arXiv:2510.05491, github.com/zichongli5/NorMuon
  """
  if axis not in _AXES:
    raise ValueError(f"Unknown neuron_normalize axis {axis!r}; expected one of "
                     f"{_AXES}.")
  transform = "orthax.neuron_normalize"
  beta2 = check_hyperparameter(transform, "beta2", beta2, low=0.0, high=1.0,
                               high_open=True)
  eps = check_hyperparameter(transform, "eps", eps, low=0.0)

  def state_shape(view):
    neurons = view.fan_out if _neuron_axis(view, axis) == 2 else view.fan_in
    return (view.batch, neurons)

  def init_leaf(view, p):
    return jnp.zeros(state_shape(view), jnp.promote_types(p.dtype, jnp.float32))

  def init_fn(params):
    return NeuronNormalizeState(rms=map_matrices(
        init_leaf, params, dimension_numbers=dimension_numbers,
        transform=transform))

  def update_leaf(view, u, rms):
    check_state_leaf(transform, view.path, rms, state_shape(view))
    o = view.to_matrices(u).astype(rms.dtype)
    reduce = 3 - _neuron_axis(view, axis)  # the other axis of the matrices
    unit, peak = divide_by_max_abs(o, (1, 2))
    # This step's RMS per neuron; the mean over an empty side is 0.
    count = max(o.shape[reduce], 1)
    step = peak[:, 0] * _root_sum_squares(unit, reduce) / math.sqrt(count)
    # sqrt(beta2 * v + (1 - beta2) * step**2), without forming a square
    rms = jnp.hypot(jnp.sqrt(beta2) * rms, jnp.sqrt(1 - beta2) * step)
    denom = jnp.expand_dims(rms, reduce) + eps
    # denom is 0 only where a neuron's entries are all 0 (and eps is 0)
    scaled = o / jnp.where(denom == 0, jnp.ones_like(denom), denom)
    # Keep ||O||_F: ||O|| / ||O'||, each norm in units of its own peak.
    scaled_unit, scaled_peak = divide_by_max_abs(scaled, (1, 2))
    norm = _root_sum_squares(unit, (1, 2))[:, None, None]
    scaled_norm = _root_sum_squares(scaled_unit, (1, 2))[:, None, None]
    # A zero matrix stays zero: guard the ratio, not the result.
    ratio = (peak / scaled_peak) * (norm / jnp.where(
        scaled_norm > 0, scaled_norm, jnp.ones_like(scaled_norm)))
    out = view.from_matrices(scaled * ratio).astype(u.dtype)
    return out, rms

  def update_fn(updates, state, params=None):
    # The state holds one entry per neuron, so it cannot tell another fan_in
    # (or, with axis="input", fan_out): the params can.
    check_same_shapes(transform, updates, params)
    out, rms = map_matrices(update_leaf, updates, state.rms,
                            dimension_numbers=dimension_numbers,
                            transform=transform, num_outputs=2)
    return out, NeuronNormalizeState(rms=rms)

  return optax.GradientTransformation(init_fn, update_fn)
