"""``orthax.norm_adaptive``: NAMO's and NAMO-D's norm-adaptive step size."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from orthax._checks import (check_flag, check_hyperparameter,
                            check_same_shapes, check_state_leaf)
from orthax._tree import broadcast_prefix
from orthax.matrices import DimensionNumbersSpec, map_matrices, matrix_views
from orthax.polar.newton_schulz import divide_by_max_abs
from orthax.transforms.shape import _MODES, shape_factor

__all__ = ["NormAdaptiveState", "norm_adaptive"]

_TRANSFORM = "orthax.norm_adaptive"
# statistic per ...: the axes of the (batch, fan_in, fan_out) stack it spans
_GRANULARITIES = {"matrix": (1, 2), "input": (2,)}


class NormAdaptiveState(NamedTuple):
  """State of :func:`norm_adaptive`.

  Attributes:
    count: steps taken (int32 scalar, saturating at its maximum): the bias
      correction's ``t - 1`` and the learning-rate schedule's argument.
    grad_rms: per leaf, ``sqrt(v_t / n)``: the root of NAMO's moving average
      ``v_t`` of squared gradient norms, divided by the ``n`` entries each
      norm is taken over, in float32 (float64 for float64 params). Shape
      ``(batch,)`` with ``granularity="matrix"`` (one per matrix, ``n =
      fan_in * fan_out``) or ``(batch, fan_in)`` with ``"input"`` (one per
      input row, ``n = fan_out``). The root of a mean is stored rather than
      ``v_t`` so that it cannot overflow (it is at most the largest gradient
      entry seen).
    momentum_state: the state of the wrapped momentum transform.
    direction_state: the state of the wrapped direction transform.
  """

  count: jax.Array
  grad_rms: optax.Updates
  momentum_state: optax.OptState
  direction_state: optax.OptState


def _rms(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """Root mean square of ``x`` over ``axes`` (removed), without forming a
  square of ``x`` itself: entries are divided by their peak first."""
  unit, peak = divide_by_max_abs(x, axes)
  count = max(math.prod(x.shape[a] for a in axes), 1)
  mean = jnp.sum(jnp.square(unit), axis=axes) / count
  return jnp.squeeze(peak, axes) * jnp.sqrt(mean)


def _clamp_to_mean(c: jax.Array, kappa) -> jax.Array:
  """NAMO-D's clamp: each row's factor into ``[kappa m, m / kappa]``, ``m``
  the mean over the matrix's rows (kept as is where ``m`` is 0: then every
  factor is 0)."""
  mean = jnp.mean(c, axis=-1, keepdims=True)
  return jnp.where(mean > 0, jnp.clip(c, kappa * mean, mean / kappa), c)


def _decay_mask(mask: Any, params: Any) -> list[bool]:
  """One bool per leaf of ``params`` from an optax-style ``mask``."""
  if mask is None:
    return [True] * len(jax.tree.leaves(params))
  tree = mask(params) if callable(mask) else mask
  flags = broadcast_prefix(
      tree, params, is_leaf=lambda x: isinstance(x, (bool, np.bool_)),
      what=f"{_TRANSFORM}: weight_decay_mask must be a tree of bools that is "
      "a prefix of the params (or a callable returning one)")
  for (path, _), flag in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                             flags):
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(
          f"{_TRANSFORM}: weight_decay_mask gives leaf "
          f"{jax.tree_util.keystr(path)} the value {flag!r}; expected a bool.")
  return [bool(f) for f in flags]


def norm_adaptive(
    momentum: optax.GradientTransformation,
    direction: optax.GradientTransformation,
    *,
    beta1: float,
    beta2: float = 0.99,
    eps: float = 1e-8,
    granularity: str = "matrix",
    clamp: float | None = None,
    bias_correction: bool = True,
    shape_scale: str = "rms",
    shape_rms: float = 0.2,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    learning_rate: optax.ScalarOrSchedule | None = None,
    dimension_numbers: DimensionNumbersSpec = None,
) -> optax.GradientTransformation:
  r"""NAMO / NAMO-D: a direction scaled by momentum norm over gradient norm.

  Wraps a ``momentum`` (e.g. :func:`orthax.momentum`) and a ``direction``
  applied to its output (e.g. :func:`orthax.orthogonalize`). For each matrix
  with gradient :math:`G_t`, momentum output :math:`\tilde M_t`, direction
  :math:`D_t`, weights :math:`W` and step :math:`t = 1, 2, \dots`:

  .. math::
    v_t = \beta_2 v_{t-1} + (1 - \beta_2) \|G_t\|^2, \qquad
    c_t = \frac{\|\tilde M_t\|}{\sqrt{v_t} + \epsilon}
      \cdot \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t + 10^{-12}},

  with one :math:`v` and :math:`c` per matrix (``granularity="matrix"``,
  NAMO, Frobenius norms) or per input row :math:`i` of the ``(fan_in,
  fan_out)`` matrix (``"input"``, NAMO-D: the norms of the rows
  :math:`G_t[i, :]`, :math:`\tilde M_t[i, :]`; the official code's
  column-wise statistics in torch's ``(out, in)`` layout). ``v`` is taken
  from the raw gradient, before the momentum. With ``clamp=kappa``
  (NAMO-D), each row's :math:`c_i` is clipped to
  :math:`[\kappa \bar c, \bar c / \kappa]`, :math:`\bar c` the mean over the
  matrix's rows. With ``s`` the shape factor
  (:func:`orthax.scale_by_shape`'s, ``0.2 sqrt(max(fan_in, fan_out))`` by
  default) and :math:`\lambda` the ``weight_decay``, the output is

  * with ``learning_rate=eta`` (the official update, caps included): the
    additive update :math:`W_{new} - W` of the official step
    :math:`W \leftarrow W \max(0, 1 - \lambda \min(\eta c, 1)) -
    \min(\eta c s, 1) D`, i.e.

    .. math::
      -\left(\min(\eta c s, 1)\, D + \min(\lambda \min(\eta c, 1), 1)\, W
      \right)

    (row by row for NAMO-D), to be applied with :func:`optax.apply_updates`;
  * with ``learning_rate=None``: the uncapped :math:`c (s D + \lambda W)`, to
    be followed by :func:`optax.scale_by_learning_rate`. The two agree
    wherever the caps do not bind (at published learning rates they never
    do: NAMO's first step is :math:`\eta (1 + \beta_1)` with Nesterov); the
    caps need ``learning_rate`` here.

  The weight decay is scaled by the adaptive factor :math:`c` (not by
  :math:`\eta` alone), as in the official code, so a zero gradient, whose
  :math:`c` is 0, gives a zero update: no decay either. The shape factor
  multiplies the direction only, not the decay. The official NAMO (not
  NAMO-D) multiplies ``W`` by :math:`1 - \lambda \min(\eta c, 1)` without the
  floor at 0; the two differ only for ``weight_decay > 1``, where the
  official factor would flip the weights' sign; this transform keeps the
  floor for both.

  Construction for the paper's optimizers (``dims``: the leaves' dimension
  numbers, given to every part)::

    namo = orthax.norm_adaptive(
        orthax.momentum(0.95, nesterov=True),
        orthax.orthogonalize(coeffs="muon", dimension_numbers=dims),
        beta1=0.95, weight_decay=0.1, learning_rate=0.012,
        dimension_numbers=dims)
    namo_d = orthax.norm_adaptive(..., granularity="input", clamp=0.75, ...)

  ``beta1`` enters only the bias correction; it must be the momentum's own
  decay (the wrapped transform is opaque, so it cannot be read from it).
  The ``direction`` must not scale by the shape or decay the weights
  itself: this transform does both, so that it can cap them.

  Other differences from the official code (github.com/minxin-zhg/namo,
  ``src/namo.py``), none of them in the update rule: the norms are taken on
  entries divided by their largest magnitude, and the state keeps
  ``sqrt(v_t / n)`` (``n`` entries per norm; the official code keeps
  ``v_t``), so finite gradients up to float32's largest value give a finite
  state and update; the official Newton–Schulz runs in bfloat16 (choose
  with :func:`orthax.orthogonalize`'s ``compute_dtype``) and adds its
  ``1e-7`` to the norm (orthax's ``eps`` is relative); the shape factor of a
  leaf with more than two axes uses its ``fan_in`` and ``fan_out`` (the
  official code the first two axes of a torch convolution weight).

  Everything is computed in float32 (float64 for float64 params) and
  returned in the gradients' dtype.

  Args:
    momentum: the transform applied to the gradients (e.g.
      ``orthax.momentum(0.95, nesterov=True)``).
    direction: the transform applied to the momentum's output (e.g.
      ``orthax.orthogonalize(coeffs="muon")``), with the same
      ``dimension_numbers``.
    beta1: the momentum's decay, in ``[0, 1)``, for the bias correction.
    beta2: decay of the moving average of squared gradient norms, in
      ``[0, 1)``.
    eps: added to ``sqrt(v_t)``, ``>= 0`` (absolute, as in the official
      code); with 0, a zero gradient still gives a zero update.
    granularity: ``"matrix"`` (NAMO) or ``"input"`` (NAMO-D).
    clamp: NAMO-D's ``kappa`` in ``(0, 1]`` (only with ``"input"``);
      ``None``: no clamp. ``1`` gives every row the mean factor.
    bias_correction: multiply by ``sqrt(1 - beta2**t) / (1 - beta1**t +
      1e-12)`` as the official code does.
    shape_scale, shape_rms: the shape factor, as ``mode`` and ``rms`` of
      :func:`orthax.scale_by_shape` (``"rms"`` with 0.2: the official
      ``scale_coeff``).
    weight_decay: :math:`\lambda`, ``>= 0``.
    weight_decay_mask: as in :func:`optax.add_decayed_weights`: a tree of
      bools (the params' structure or a prefix of it) or a callable
      returning one from the params; ``False`` leaves are not decayed.
    learning_rate: ``None``, a float or an optax schedule (of the step
      count, starting at 0, as :func:`optax.scale_by_learning_rate`).
    dimension_numbers: as in :func:`orthax.orthogonalize`.

  Returns:
    An :class:`optax.GradientTransformation` with a
    :class:`NormAdaptiveState`. Its ``update`` needs the params when
    ``weight_decay`` is not 0.

  Raises:
    ValueError: a hyperparameter out of range, an unknown ``granularity`` or
      ``shape_scale``, ``clamp`` without ``granularity="input"`` (at
      construction); at update time, no params with ``weight_decay``, a
      leaf that is not a matrix, a gradient whose shape is not its
      parameter's, or a state leaf that is missing or not of the shape this
      leaf needs (a state of another configuration), named by key path.
    TypeError: a hyperparameter that is not a real number, a leaf that is
      not a supported float, a mask leaf that is not a bool.

  Example:
    >>> import jax, jax.numpy as jnp, optax, orthax
    >>> tx = orthax.norm_adaptive(
    ...     orthax.momentum(0.95), orthax.orthogonalize(coeffs="muon"),
    ...     beta1=0.95, weight_decay=0.1, learning_rate=0.01)
    >>> params = {'w': jnp.ones((16, 32))}
    >>> g = {'w': jax.random.normal(jax.random.key(0), (16, 32))}
    >>> updates, state = tx.update(g, tx.init(params), params)
    >>> params = optax.apply_updates(params, updates)

  References:
    M. Zhang, Y. Liu, H. Schaeffer, Adam Improves Muon: Adaptive Moment
    Estimation with Orthogonalized Momentum, 2026, arXiv:2602.17080,
    github.com/minxin-zhg/namo
  """
  if granularity not in _GRANULARITIES:
    raise ValueError(f"{_TRANSFORM}: unknown granularity {granularity!r}; "
                     f"expected one of {tuple(_GRANULARITIES)}.")
  if shape_scale not in _MODES:
    raise ValueError(f"{_TRANSFORM}: unknown shape_scale {shape_scale!r}; "
                     f"expected one of {_MODES}.")
  unit = dict(low=0.0, high=1.0, high_open=True)
  beta1 = check_hyperparameter(_TRANSFORM, "beta1", beta1, **unit)
  beta2 = check_hyperparameter(_TRANSFORM, "beta2", beta2, **unit)
  eps = check_hyperparameter(_TRANSFORM, "eps", eps, low=0.0)
  shape_rms = check_hyperparameter(_TRANSFORM, "shape_rms", shape_rms,
                                   low=0.0, low_open=True)
  weight_decay = check_hyperparameter(_TRANSFORM, "weight_decay",
                                      weight_decay, low=0.0)
  if clamp is not None:
    if granularity != "input":
      raise ValueError(f"{_TRANSFORM}: clamp acts on the rows' factors of "
                       "granularity='input' (NAMO-D); with "
                       f"{granularity!r} there is one factor per matrix.")
    clamp = check_hyperparameter(_TRANSFORM, "clamp", clamp, low=0.0,
                                 high=1.0, low_open=True)
  bias_correction = check_flag(_TRANSFORM, "bias_correction",
                               bias_correction)
  if learning_rate is not None and not callable(learning_rate):
    check_hyperparameter(_TRANSFORM, "learning_rate", learning_rate, low=0.0)
  schedule: Callable[[jax.Array], Any] | None = (
      None if learning_rate is None else learning_rate
      if callable(learning_rate) else lambda _: learning_rate)
  axes = _GRANULARITIES[granularity]
  decays = isinstance(weight_decay, jax.Array) or weight_decay > 0

  def state_shape(view):
    return (view.batch,) if granularity == "matrix" else (view.batch,
                                                          view.fan_in)

  def init_fn(params):
    grad_rms = map_matrices(
        lambda view, p: jnp.zeros(state_shape(view),
                                  jnp.promote_types(p.dtype, jnp.float32)),
        params, dimension_numbers=dimension_numbers, transform=_TRANSFORM)
    return NormAdaptiveState(jnp.zeros([], jnp.int32), grad_rms,
                             momentum.init(params), direction.init(params))

  def update_leaf(view, g, m, d, w, rms, decayed, count, lr):
    check_state_leaf(_TRANSFORM, view.path, rms, state_shape(view))
    dtype = g.dtype
    acc = rms.dtype
    g, m = view.to_matrices(g).astype(acc), view.to_matrices(m).astype(acc)
    entries = max(math.prod(g.shape[a] for a in axes), 1)
    # sqrt(beta2 * v + (1 - beta2) * step**2), without forming a square
    rms = jnp.hypot(jnp.sqrt(beta2) * rms, jnp.sqrt(1 - beta2) * _rms(g, axes))
    # ||M|| / (sqrt(v) + eps), both norms divided by sqrt(entries); denom is
    # 0 only with eps = 0 before any nonzero gradient (M is 0 then too)
    denom = rms + eps / math.sqrt(entries)
    ratio = _rms(m, axes) / jnp.where(denom > 0, denom, jnp.ones_like(denom))
    if bias_correction:
      t = count.astype(acc)
      ratio = ratio * (jnp.sqrt(1 - beta2**t) / (1 - beta1**t + 1e-12))
    if clamp is not None:
      ratio = _clamp_to_mean(ratio, clamp)
    c = ratio.reshape(ratio.shape + (1,) * (3 - ratio.ndim))
    s = shape_factor(view, shape_scale, shape_rms)
    if lr is None:
      d_coef, w_coef = c * s, c * weight_decay
    else:
      rate = lr * c
      d_coef = -jnp.minimum(rate * s, 1)
      w_coef = -jnp.minimum(weight_decay * jnp.minimum(rate, 1), 1)
    out = d_coef * view.to_matrices(d).astype(acc)
    if decays and decayed:
      out = out + w_coef * view.to_matrices(w).astype(acc)
    return view.from_matrices(out).astype(dtype), rms

  def update_fn(updates, state, params=None):
    if decays and params is None:
      raise ValueError(
          f"{_TRANSFORM} needs the params with weight_decay: call "
          "update(grads, state, params).")
    check_same_shapes(_TRANSFORM, updates, params)
    matrix_views(updates, dimension_numbers, _TRANSFORM)  # named errors first
    check_state_leaf(_TRANSFORM, "count", state.count, ())
    count = optax.safe_increment(state.count)
    lr = None if schedule is None else schedule(state.count)
    m, momentum_state = momentum.update(updates, state.momentum_state, params)
    d, direction_state = direction.update(m, state.direction_state, params)
    treedef = jax.tree.structure(updates)
    weights = updates if params is None else params  # read only if decays
    decayed = treedef.unflatten(_decay_mask(weight_decay_mask, weights)
                                if decays else [False] * treedef.num_leaves)
    out, grad_rms = map_matrices(
        lambda view, *leaves: update_leaf(view, *leaves, count, lr), updates,
        m, d, weights, state.grad_rms, decayed,
        dimension_numbers=dimension_numbers, transform=_TRANSFORM,
        num_outputs=2)
    return out, NormAdaptiveState(count, grad_rms, momentum_state,
                                  direction_state)

  return optax.GradientTransformation(init_fn, update_fn)
