"""``orthax.momentum``: Muon's momentum, applied before orthogonalization."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from orthax._checks import check_flag, check_hyperparameter, check_state_leaf
from orthax._tree import map_with_path
from orthax.matrices import check_float

__all__ = ["MomentumState", "momentum"]


class MomentumState(NamedTuple):
  """State of :func:`momentum`.

  The fields are in the order of ``optax.contrib.MuonState`` (``count``,
  ``mu``), so code that reads optax's Muon state by position reads this one
  alike (:func:`orthax.contrib.muon`).

  Attributes:
    count: steps taken (int32 scalar, saturating at its maximum) with
      ``bias_correction``; ``None`` without it (the state is then ``mu``
      alone).
    mu: the exponential moving average of the gradients, like the params.
  """

  count: jax.Array | None
  mu: optax.Updates


def momentum(beta: float = 0.95, *, nesterov: bool = True,
             bias_correction: bool = False,
             mu_dtype=None) -> optax.GradientTransformation:
  r"""Muon's momentum: an exponential moving average of the gradients.

  At step :math:`t = 1, 2, \dots` the average is

  .. math::
    m_t = \beta m_{t-1} + (1 - \beta) g_t, \qquad m_0 = 0,

  and the update is, by default (Jordan's Muon, no bias correction),

  .. math::
    u_t = \beta m_t + (1 - \beta) g_t \ \text{(Nesterov)}, \qquad
    u_t = m_t \ \text{(otherwise)};

  with ``bias_correction=True`` (``optax.contrib.scale_by_muon``'s form),

  .. math::
    u_t = \beta \frac{m_t}{1 - \beta^{t+1}}
      + (1 - \beta) \frac{g_t}{1 - \beta^t} \ \text{(Nesterov)}, \qquad
    u_t = \frac{m_t}{1 - \beta^t} \ \text{(otherwise)}.

  The corrected Nesterov form is Dozat's NAdam look-ahead: the average is
  corrected as at the next step, the gradient as at this one, so the first
  update is :math:`(1 + \beta / (1 + \beta)) g_1` rather than
  :math:`(1 - \beta^2) g_1`. Without Nesterov the correction is one positive
  factor per step, which :func:`orthax.orthogonalize` discards; with it the
  two terms are weighted differently, so the direction of the first steps
  changes too. ``bias_correction=True`` gives optax's numbers: bit for bit
  (outside ``jit``) with float32 gradients and average; optax computes in
  the gradients' dtype and multiplies a bfloat16 average by ``beta`` in
  bfloat16, orthax in float32, so those cases differ by that rounding.

  Orthogonalization that follows discards the overall scale, so the first
  steps need no correction; the default keeps Jordan's form. Applied
  *before* :func:`orthax.orthogonalize`, the average filters gradient noise
  out of the spectrum that the polar factor then flattens.

  Works on leaves of any shape (empty ones included) and of dtype float16,
  bfloat16, float32 or float64; the average is computed in float32 (or
  float64) and stored in ``mu_dtype``. NaN or Inf in a gradient propagates
  into the state (as in every optax moment); wrap the chain in
  :func:`optax.apply_if_finite` to skip such steps.

  Args:
    beta: decay rate of the average, in ``[0, 1)`` (at 1 the average would
      never move from 0).
    nesterov: output ``beta * m_t + (1 - beta) * g_t`` (Nesterov look-ahead)
      rather than ``m_t``.
    bias_correction: divide by ``1 - beta**t`` as optax's Muon does (the
      average by ``1 - beta**(t + 1)`` under Nesterov; equations above);
      the state then holds the step count ``t``.
    mu_dtype: dtype of the stored average; ``None`` uses each param's dtype
      (as given to ``init``). The update is returned in the gradient's dtype.

  Returns:
    An :class:`optax.GradientTransformation`.

  Raises:
    ValueError: ``beta`` outside ``[0, 1)`` (at construction); at update
      time, a state leaf that is missing or whose shape is not its
      gradient's (a state restored from another optimizer's checkpoint).
    TypeError: ``nesterov`` or ``bias_correction`` not a bool; a leaf that is
      not a supported float.

  Example:
    >>> import jax.numpy as jnp, optax, orthax
    >>> tx = optax.chain(orthax.momentum(0.95), orthax.orthogonalize())
    >>> params = {'w': jnp.ones((4, 8))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state)
    >>> like_optax = orthax.momentum(0.95, bias_correction=True)

  References:
    K. Jordan et al., Muon: An optimizer for hidden layers in neural networks,
    2024, https://kellerjordan.github.io/posts/muon/

    T. Dozat, Incorporating Nesterov Momentum into Adam, ICLR workshop, 2016
  """
  transform = "orthax.momentum"
  beta = check_hyperparameter(transform, "beta", beta, low=0.0, high=1.0,
                              high_open=True)
  nesterov = check_flag(transform, "nesterov", nesterov)
  bias_correction = check_flag(transform, "bias_correction", bias_correction)
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

  def init_fn(params):
    map_with_path(lambda path, x: check_float(path, x, transform), params)
    count = jnp.zeros([], jnp.int32) if bias_correction else None
    return MomentumState(mu=optax.tree.zeros_like(params, dtype=mu_dtype),
                         count=count)

  def corrected(x, steps):
    """``x / (1 - beta**steps)`` by optax's own function (so its float32
    result); ``x`` when ``steps`` is ``None`` (no bias correction)."""
    return x if steps is None else optax.tree.bias_correction(x, beta, steps)

  def update_fn(updates, state, params=None):
    del params
    count, mu_steps = None, None
    if bias_correction:
      check_state_leaf(transform, "count", state.count, ())
      count = optax.safe_increment(state.count)
      # Nesterov corrects the average as at the next step (NAdam)
      mu_steps = optax.safe_increment(count) if nesterov else count

    def average(path, g, m):
      check_float(path, g, transform)
      check_state_leaf(transform, path, m, jnp.shape(g))
      acc = jnp.promote_types(jnp.promote_types(g.dtype, m.dtype), jnp.float32)
      g_acc = g.astype(acc)
      return g_acc, beta * m.astype(acc) + (1 - beta) * g_acc

    grads, mu = map_with_path(average, updates, state.mu, num_outputs=2)
    # corrected tree by tree, as optax does: XLA may divide the leaves of one
    # call by a shared reciprocal, so only the same calls round the same way
    u = corrected(mu, mu_steps)
    if nesterov:
      u = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, u,
                       corrected(grads, count))
    cast = lambda x, like: x.astype(like.dtype)
    return (jax.tree.map(cast, u, updates),
            MomentumState(mu=jax.tree.map(cast, mu, state.mu), count=count))

  return optax.GradientTransformation(init_fn, update_fn)
