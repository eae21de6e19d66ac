"""``orthax.momentum``: Muon's momentum, applied before orthogonalization."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import optax

from orthax._checks import check_flag, check_hyperparameter, check_state_leaf
from orthax._tree import map_with_path
from orthax.matrices import check_float

__all__ = ["MomentumState", "momentum"]


class MomentumState(NamedTuple):
  """State of :func:`momentum`.

  Attributes:
    mu: the exponential moving average of the gradients, like the params.
  """

  mu: optax.Updates


def momentum(beta: float = 0.95, *, nesterov: bool = True,
             mu_dtype=None) -> optax.GradientTransformation:
  r"""Muon's momentum: an exponential moving average of the gradients.

  .. math::
    m_t = \beta m_{t-1} + (1 - \beta) g_t, \qquad
    u_t = \beta m_t + (1 - \beta) g_t \ \text{(Nesterov)}, \quad u_t = m_t
    \ \text{(otherwise)}.

  No bias correction: orthogonalization that follows discards the overall
  scale, so the first steps need none. Applied *before*
  :func:`orthax.orthogonalize`, the average filters gradient noise out of the
  spectrum that the polar factor then flattens.

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
    mu_dtype: dtype of the stored average; ``None`` uses each param's dtype
      (as given to ``init``). The update is returned in the gradient's dtype.

  Returns:
    An :class:`optax.GradientTransformation`.

  Raises:
    ValueError: ``beta`` outside ``[0, 1)`` (at construction); at update
      time, a state leaf that is missing or whose shape is not its
      gradient's (a state restored from another optimizer's checkpoint).
    TypeError: ``nesterov`` not a bool; a leaf that is not a supported float.

  Example:
    >>> import jax.numpy as jnp, optax, orthax
    >>> tx = optax.chain(orthax.momentum(0.95), orthax.orthogonalize())
    >>> params = {'w': jnp.ones((4, 8))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state)

  References:
    K. Jordan et al., Muon: An optimizer for hidden layers in neural networks,
    2024, https://kellerjordan.github.io/posts/muon/
  """
  transform = "orthax.momentum"
  beta = check_hyperparameter(transform, "beta", beta, low=0.0, high=1.0,
                              high_open=True)
  nesterov = check_flag(transform, "nesterov", nesterov)
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

  def init_fn(params):
    map_with_path(lambda path, x: check_float(path, x, transform), params)
    return MomentumState(mu=optax.tree.zeros_like(params, dtype=mu_dtype))

  def update_fn(updates, state, params=None):
    del params

    def leaf(path, g, m):
      check_float(path, g, transform)
      check_state_leaf(transform, path, m, jnp.shape(g))
      acc = jnp.promote_types(jnp.promote_types(g.dtype, m.dtype), jnp.float32)
      g32, m32 = g.astype(acc), m.astype(acc)
      m_new = beta * m32 + (1 - beta) * g32
      u = beta * m_new + (1 - beta) * g32 if nesterov else m_new
      return u.astype(g.dtype), m_new.astype(m.dtype)

    u, mu = map_with_path(leaf, updates, state.mu, num_outputs=2)
    return u, MomentumState(mu=mu)

  return optax.GradientTransformation(init_fn, update_fn)
