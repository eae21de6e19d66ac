"""``orthax.neuron_normalize``: NorMuon's per-neuron second-moment normalization."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import optax

from orthax.matrices import DimensionNumbersSpec, MatrixView, map_matrices

__all__ = ["NeuronNormalizeState", "neuron_normalize"]

_AXES = ("output", "input", "larger")


class NeuronNormalizeState(NamedTuple):
  """State of :func:`neuron_normalize`.

  Attributes:
    nu: per leaf, the moving average of the mean square of each neuron's
      update, in float32 (float64 for float64 params), of shape
      ``(batch, fan_out)`` (``axis="output"``) or ``(batch, fan_in)``
      (``axis="input"``), where ``batch`` is the product of
      the leaf's batch axes (1 for a 2-D leaf).
  """

  nu: optax.Updates


def _neuron_axis(view: MatrixView, axis: str) -> int:
  """Axis of the ``(batch, fan_in, fan_out)`` stack that indexes the neurons."""
  if axis == "output" or (axis == "larger" and view.fan_out >= view.fan_in):
    return 2
  return 1


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

  Args:
    beta2: decay of the moving average of squares.
    eps: added to ``sqrt(v)``.
    axis: which neurons get a statistic: ``"output"`` (one per fan_out index,
      the paper's rule), ``"input"`` (one per fan_in index), or ``"larger"``
      (one per index of the larger of fan_in and fan_out, the mean taken over
      the smaller; fan_out on ties), as later public NorMuon code does.
    dimension_numbers: as in :func:`orthax.orthogonalize`.

  Returns:
    An :class:`optax.GradientTransformation` whose state holds one float32
    (or float64) vector per matrix (``fan_out`` or ``fan_in`` entries per
    batch slice).

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

  def init_leaf(view, p):
    size = view.fan_out if _neuron_axis(view, axis) == 2 else view.fan_in
    return jnp.zeros((view.batch, size),
                     jnp.promote_types(p.dtype, jnp.float32))

  def init_fn(params):
    return NeuronNormalizeState(nu=map_matrices(
        init_leaf, params, dimension_numbers=dimension_numbers,
        transform=transform))

  def update_leaf(view, u, nu):
    o = view.to_matrices(u).astype(nu.dtype)
    neuron = _neuron_axis(view, axis)
    reduce = 3 - neuron  # the other matrix axis of (batch, fan_in, fan_out)
    nu = beta2 * nu + (1 - beta2) * jnp.mean(jnp.square(o), axis=reduce)
    scaled = o / (jnp.expand_dims(jnp.sqrt(nu), reduce) + eps)
    norm = jnp.sqrt(jnp.sum(jnp.square(o), axis=(1, 2), keepdims=True))
    scaled_norm = jnp.sqrt(jnp.sum(jnp.square(scaled), axis=(1, 2),
                                   keepdims=True))
    # A zero matrix stays zero: guard the ratio, not the result.
    ratio = norm / jnp.where(scaled_norm > 0, scaled_norm, 1.0)
    out = view.from_matrices(scaled * ratio).astype(u.dtype)
    return out, nu

  def update_fn(updates, state, params=None):
    del params
    out, nu = map_matrices(update_leaf, updates, state.nu,
                           dimension_numbers=dimension_numbers,
                           transform=transform, num_outputs=2)
    return out, NeuronNormalizeState(nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)
