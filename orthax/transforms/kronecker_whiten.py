"""``orthax.kronecker_whiten``: FISMO's Kronecker-factored whitening around an
inner transform."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from orthax._checks import (check_hyperparameter, check_number,
                            check_same_shapes, check_state_leaf)
from orthax.matrices import DimensionNumbersSpec, map_matrices, matrix_views
from orthax.polar.newton_schulz import divide_by_max_abs

__all__ = ["KroneckerWhitenState", "kronecker_whiten"]

_TRANSFORM = "orthax.kronecker_whiten"
_SIDE_ORDERS = ("output_first", "input_first")


class KroneckerWhitenState(NamedTuple):
  """State of :func:`kronecker_whiten`.

  For each leaf, seen as a stack of ``batch`` matrices ``(fan_in,
  fan_out)``, in float32 (float64 for float64 params):

  Attributes:
    count: steps taken (int32 scalar, saturating at its maximum); the
      factors are refreshed at the steps where ``count % update_every`` is 0.
    input_factor: the fan_in side's factor, ``(batch, fan_in, fan_in)``,
      symmetric positive definite with trace ``fan_in`` (the identity at
      init).
    output_factor: the fan_out side's factor, ``(batch, fan_out, fan_out)``,
      trace ``fan_out``.
    input_root: ``input_factor^(-1/2)`` as of the last refresh.
    output_root: ``output_factor^(-1/2)`` as of the last refresh.
    inner_state: the state of the wrapped transform.
  """

  count: jax.Array
  input_factor: optax.Updates
  output_factor: optax.Updates
  input_root: optax.Updates
  output_root: optax.Updates
  inner_state: optax.OptState


def _trace(x: jax.Array) -> jax.Array:
  """Traces of a stack of square matrices, shaped to broadcast against it."""
  return jnp.trace(x, axis1=-2, axis2=-1)[..., None, None]


def _inverse_root(factor: jax.Array, eps: float) -> jax.Array:
  """``factor^(-1/2)`` of each symmetric matrix of a stack, by ``eigh``.

  Eigenvalues below ``max(eps, d u) * lambda_max`` are raised to it (``d``
  the side, ``u`` the unit roundoff of the dtype): a backward-stable ``eigh``
  gives each eigenvalue with an absolute error up to about ``d u
  lambda_max``, so smaller ones are not resolved (they may even come out
  negative). The factors have trace ``d``, so ``lambda_max >= 1`` and the
  floor is positive: the root is finite.
  """
  d = factor.shape[-1]
  unit_roundoff = jnp.finfo(factor.dtype).eps / 2
  values, vectors = jnp.linalg.eigh(factor)
  peak = jnp.max(values, axis=-1, keepdims=True, initial=0.0)
  values = jnp.maximum(values, peak * max(eps, d * unit_roundoff))
  return (vectors * jax.lax.rsqrt(values)[..., None, :]) @ jnp.matrix_transpose(vectors)


def _refresh(factor: jax.Array, gram: jax.Array, gamma, damping) -> jax.Array:
  """One factor's moving average (FISMO's steps 1-2, or 3-4).

  ``gram`` is the side's statistic ``G F^{-1} G^T`` of the other side's
  factor ``F``, up to a positive scalar: it is rescaled to the factor's
  trace ``d`` before the damping and the average, so that the gradient's
  scale cancels. The result is symmetrized and rescaled to trace ``d``; a
  zero average (a zero gradient with ``gamma = damping = 0``) keeps
  ``factor``.
  """
  d = factor.shape[-1]
  trace = _trace(gram)
  gram = d * gram / jnp.where(trace > 0, trace, jnp.ones_like(trace))
  eye = jnp.eye(d, dtype=factor.dtype)
  damped = gram + damping * (_trace(factor) / max(d, 1)) * eye
  mixed = gamma * factor + (1 - gamma) * damped
  trace = _trace(mixed)
  scaled = d * mixed / jnp.where(trace > 0, trace, jnp.ones_like(trace))
  return jnp.where(trace > 0, (scaled + jnp.matrix_transpose(scaled)) / 2, factor)


def _gauss_seidel(x, first, second, second_root, gamma, damping, eps):
  """Refreshes the factor of ``x``'s rows (``first``), from the old root of
  its columns' factor, then that of its columns (``second``) from the new
  ``first``. Returns ``(first, first_root, second, second_root)``."""
  whitened = x @ second_root                      # x second^(-1/2)
  first = _refresh(first, whitened @ jnp.matrix_transpose(whitened), gamma, damping)
  first_root = _inverse_root(first, eps)
  whitened = first_root @ x                       # first^(-1/2) x
  second = _refresh(second, jnp.matrix_transpose(whitened) @ whitened, gamma, damping)
  return first, first_root, second, _inverse_root(second, eps)


def kronecker_whiten(
    inner: optax.GradientTransformation,
    *,
    gamma: float = 0.95,
    damping: float = 0.01,
    eps: float = 0.0,
    update_every: int = 1,
    side_order: str = "output_first",
    dimension_numbers: DimensionNumbersSpec = None,
) -> optax.GradientTransformation:
  r"""FISMO: ``inner`` in the geometry of a Kronecker-factored Fisher metric.

  For each matrix ``G`` (``(fan_in, fan_out)``, :math:`m \times n`) the
  transform keeps two symmetric positive definite factors, :math:`A`
  (:math:`m \times m`, fan_in side) and :math:`B` (:math:`n \times n`,
  fan_out side), and returns

  .. math::
    A^{-1/2}\, \mathrm{inner}\big(A^{-1/2} G B^{-1/2}\big)\, B^{-1/2}.

  With ``inner = optax.chain(orthax.momentum(beta, nesterov=False),
  orthax.orthogonalize())`` this is FISMO's step :math:`\Delta W` (Xu et al.,
  Algorithm 1): the momentum is kept in the whitened space and its polar
  factor is mapped back by the same factors, the minimizer of
  :math:`\langle G, \Delta W \rangle` subject to
  :math:`\|A^{1/2} \Delta W B^{1/2}\|_2 \le 1` (for ``beta = 0``).

  At the steps where ``count % update_every == 0`` (the first included) the
  factors are refreshed from the raw gradient, Gauss–Seidel, the first
  side from the other's factor as of the last refresh, then the second side
  from the new first. In the paper's notation, on :math:`X` (the matrix with
  the first side's factor :math:`P` on its left, :math:`d_P \times d_Q`):

  .. math::
    S_t &= X Q_{t-1}^{-1} X^\top, \quad
    L_t = \frac{d_P}{\mathrm{tr}\, S_t} S_t
          + \mu \frac{\mathrm{tr}\, P_{t-1}}{d_P} I, \\
    \tilde P_t &= \gamma P_{t-1} + (1 - \gamma) L_t, \quad
    P_t = \mathrm{sym}\Big(\frac{d_P}{\mathrm{tr}\, \tilde P_t}
          \tilde P_t\Big),

  then the same for :math:`Q` with :math:`X^\top P_t^{-1} X`; ``P_0 = Q_0 =
  I``. Between refreshes the factors and their cached inverse roots are kept.
  ``side_order="output_first"`` takes :math:`X = G^\top` (PyTorch's ``(out,
  in)`` layout: :math:`P = B`, the fan_out side, is refreshed first);
  ``"input_first"`` takes :math:`X = G` (:math:`P = A`). Which one the paper
  means could not be confirmed: its code is not public, and the secondary
  sources write ``W`` as :math:`m \times n` without saying which side is the
  output. The two differ only in the Gauss–Seidel order; the whitening is
  the same.

  Departure from the published Algorithm 1: there, :math:`L_t =
  \frac{1}{d_Q} S_t + \mu I`, whose first term grows as the square of the
  gradient while :math:`\gamma P_{t-1}` and :math:`\mu I` (trace
  :math:`d_P`) do not, so the factors would move only for gradients of
  whitened RMS near 1, and multiplying the loss by a constant would change
  the steps. Here :math:`S_t` is rescaled to trace :math:`d_P` first: this
  is the published step for a gradient of that RMS, at any scale, so that
  the update of a gradient scaled by :math:`c` is the same as that of the
  gradient (both statistics are also taken on the matrix divided by its
  largest entry, so nothing overflows).

  The inverse roots come from ``eigh`` in the state's dtype, each eigenvalue
  raised to at least ``max(eps, d u) * lambda_max`` (``d`` the side, ``u``
  the unit roundoff: what ``eigh`` can resolve). The damping keeps the
  factors' eigenvalues above ``mu / (1 + mu)`` (their mean is 1), so the
  floor binds only where ``d u lambda_max`` exceeds that (in float32 with
  ``mu = 0.01``, ``d lambda_max`` over about 1.7e5).

  Cost: the state holds ``2 (m^2 + n^2)`` floats per matrix (factors and
  roots), and each refresh two ``eigh``, of ``m x m`` and ``n x n``, and six
  matrix products; every step four more products. Route matrices with a
  large side (embeddings, output heads) to another optimizer
  (:func:`orthax.fismo` sends them to AdamW), and amortize with
  ``update_every``.

  Everything is computed in float32 (float64 for float64 params); ``inner``
  receives the whitened gradients in the gradients' dtype and its output is
  returned in it. The whitened gradient is the gradient times the roots,
  whose gain is at most about ``1 / sqrt(mu)`` per side, so it is finite for
  any gradient below float32's largest value divided by that.

  Args:
    inner: the transform applied in the whitened space (for FISMO,
      ``optax.chain(orthax.momentum(beta, nesterov=False),
      orthax.orthogonalize(...))`` with the same ``dimension_numbers``).
    gamma: decay of the factors' moving average, in ``[0, 1]`` (1 keeps
      ``P = Q = I``: ``inner`` unchanged).
    damping: ``mu``, the identity added to each statistic relative to its
      mean eigenvalue, ``>= 0``.
    eps: relative floor of the factors' eigenvalues, ``>= 0`` (the
      resolution ``d u`` applies whatever it is).
    update_every: refresh the factors every this many steps, ``>= 1``.
    side_order: ``"output_first"`` or ``"input_first"``: which side's factor
      is refreshed first.
    dimension_numbers: as in :func:`orthax.orthogonalize`.

  Returns:
    An :class:`optax.GradientTransformation` with a
    :class:`KroneckerWhitenState`.

  Raises:
    ValueError: a hyperparameter out of range or an unknown ``side_order``
      (at construction); at update time, a leaf that is not a matrix, a
      gradient whose shape is not its parameter's, or a state leaf that is
      missing or not of the shape this leaf needs, named by its key path.
    TypeError: a hyperparameter that is not a real number (an integer for
      ``update_every``); a leaf that is not a supported float.

  Example:
    >>> import jax, jax.numpy as jnp, optax, orthax
    >>> from orthax.transforms.kronecker_whiten import kronecker_whiten
    >>> tx = kronecker_whiten(
    ...     optax.chain(orthax.momentum(0.95, nesterov=False),
    ...                 orthax.orthogonalize()), gamma=0.95, damping=0.01)
    >>> params = {'w': jnp.zeros((16, 32))}
    >>> g = {'w': jax.random.normal(jax.random.key(0), (16, 32))}
    >>> updates, state = tx.update(g, tx.init(params))

  References:
    C. Xu, W. Yan, Y.-J. A. Zhang, FISMO: Fisher-Structured
    Momentum-Orthogonalized Optimizer, 2026, arXiv:2601.21750 (Algorithm 1
    as restated by secondary sources; no official code was found)
  """
  if side_order not in _SIDE_ORDERS:
    raise ValueError(f"{_TRANSFORM}: unknown side_order {side_order!r}; "
                     f"expected one of {_SIDE_ORDERS}.")
  gamma = check_hyperparameter(_TRANSFORM, "gamma", gamma, low=0.0, high=1.0)
  damping = check_hyperparameter(_TRANSFORM, "damping", damping, low=0.0)
  eps = check_number(_TRANSFORM, "eps", eps, low=0.0)
  update_every = check_number(_TRANSFORM, "update_every", update_every,
                              low=1, integer=True)

  def factor_shapes(view):
    return ((view.batch, view.fan_in, view.fan_in),
            (view.batch, view.fan_out, view.fan_out))

  def init_leaf(view, p):
    dtype = jnp.promote_types(p.dtype, jnp.float32)
    return tuple(jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), shape)
                 for shape in factor_shapes(view))

  def init_fn(params):
    input_factor, output_factor = map_matrices(
        init_leaf, params, dimension_numbers=dimension_numbers,
        transform=_TRANSFORM, num_outputs=2)
    return KroneckerWhitenState(
        jnp.zeros([], jnp.int32), input_factor, output_factor, input_factor,
        output_factor, inner.init(params))

  def refresh_leaf(view, g, input_factor, output_factor, input_root,
                   output_root):
    input_shape, output_shape = factor_shapes(view)
    for name, leaf, shape in (("input_factor", input_factor, input_shape),
                              ("output_factor", output_factor, output_shape),
                              ("input_root", input_root, input_shape),
                              ("output_root", output_root, output_shape)):
      check_state_leaf(_TRANSFORM, f"{view.path} ({name})", leaf, shape)
    unit, _ = divide_by_max_abs(
        view.to_matrices(g).astype(input_factor.dtype), (1, 2))
    if side_order == "input_first":
      return _gauss_seidel(unit, input_factor, output_factor, output_root,
                           gamma, damping, eps)
    output_factor, output_root, input_factor, input_root = _gauss_seidel(
        jnp.matrix_transpose(unit), output_factor, input_factor, input_root, gamma,
        damping, eps)
    return input_factor, input_root, output_factor, output_root

  def refresh(updates, state):
    return map_matrices(
        refresh_leaf, updates, state.input_factor, state.output_factor,
        state.input_root, state.output_root,
        dimension_numbers=dimension_numbers, transform=_TRANSFORM,
        num_outputs=4)

  def sandwich(updates, input_root, output_root):
    """``A^{-1/2} X B^{-1/2}`` for every matrix ``X`` of ``updates``."""
    def leaf(view, x, left, right):
      y = left @ view.to_matrices(x).astype(left.dtype) @ right
      return view.from_matrices(y).astype(x.dtype)
    return map_matrices(leaf, updates, input_root, output_root,
                        dimension_numbers=dimension_numbers,
                        transform=_TRANSFORM)

  def update_fn(updates, state, params=None):
    check_same_shapes(_TRANSFORM, updates, params)
    matrix_views(updates, dimension_numbers, _TRANSFORM)  # named errors first
    check_state_leaf(_TRANSFORM, "count", state.count, ())
    kept = (state.input_factor, state.input_root, state.output_factor,
            state.output_root)
    if update_every == 1:
      fresh = refresh(updates, state)
    else:
      fresh = jax.lax.cond(state.count % update_every == 0, refresh,
                           lambda *_: kept, updates, state)
    input_factor, input_root, output_factor, output_root = fresh
    whitened = sandwich(updates, input_root, output_root)
    inner_updates, inner_state = inner.update(whitened, state.inner_state,
                                              params)
    out = sandwich(inner_updates, input_root, output_root)
    return out, KroneckerWhitenState(
        optax.safe_increment(state.count), input_factor, output_factor,
        input_root, output_root, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)
