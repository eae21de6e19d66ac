"""``orthax.adaptive_rotate``: ARO's base optimizer in an adaptively rotated frame."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from orthax._checks import (check_hyperparameter, check_number,
                            check_same_shapes, check_state_leaf)
from orthax._tree import broadcast_prefix
from orthax.matrices import DimensionNumbersSpec, MatrixView, map_matrices
from orthax.polar.newton_schulz import divide_by_max_abs

__all__ = ["AdaptiveRotateState", "adaptive_rotate"]

_TRANSFORM = "orthax.adaptive_rotate"
_BASES = ("sinkhorn", "row_norm", "sign")
_SIDES = ("smaller", "input", "output")

# The rotation is recomputed from products with it every step: a GPU's
# default TF32 would round them to 2^-11.
_matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


class AdaptiveRotateState(NamedTuple):
  """State of :func:`adaptive_rotate`.

  Attributes:
    rotation: per leaf, the rotation ``R`` of each matrix's rotated side,
      shape ``(batch, s, s)`` with ``s`` that side's size (``fan_in`` or
      ``fan_out``), ``batch`` the product of the leaf's batch axes (1 for a
      2-D leaf); the identity at init. Its dtype is ``rotation_dtype``
      (float64 for float64 leaves). ``None`` for a leaf with no entries
      (checkpointers such as orbax refuse zero-size arrays).
  """

  rotation: optax.Updates


def _row_norms(y: jax.Array, axis: int, eps: float) -> jax.Array:
  """The L2 norms along ``axis`` (kept), clamped below at ``eps``."""
  return jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(y), axis=axis,
                                      keepdims=True)), eps)


def _sinkhorn(y: jax.Array, *, iters: int, eps: float) -> jax.Array:
  """Alternating L2 normalization of ``y`` ``(batch, s, k)``: each pass
  scales the rows to norm ``sqrt(k)``, then the columns to ``sqrt(s)``."""
  s, k = y.shape[-2:]
  for _ in range(iters):
    y = y * (math.sqrt(k) / _row_norms(y, -1, eps))
    y = y * (math.sqrt(s) / _row_norms(y, -2, eps))
  return y


def _row_norm(y: jax.Array, *, eps: float) -> jax.Array:
  """Each row of ``y`` ``(batch, s, k)`` scaled to norm ``sqrt(k)``."""
  return y * (math.sqrt(y.shape[-1]) / _row_norms(y, -1, eps))


def _base_fn(base: str | Callable[[jax.Array], jax.Array], iters: int,
             eps: float) -> Callable[[jax.Array], jax.Array]:
  if callable(base):
    return base
  if not isinstance(base, str) or base not in _BASES:
    raise ValueError(f"{_TRANSFORM}: unknown base {base!r}; expected one of "
                     f"{_BASES} or a callable.")
  if base == "sinkhorn":
    return functools.partial(_sinkhorn, iters=iters, eps=eps)
  if base == "row_norm":
    return functools.partial(_row_norm, eps=eps)
  return jnp.sign


def _sides(side: Any, updates: Any) -> list[str]:
  """One side per leaf of ``updates``, in leaf order, from a string, a tree
  (a prefix of the updates) of strings, or a callable returning one."""
  if callable(side):
    side = side(updates)
  if isinstance(side, str):
    return [side] * len(jax.tree.leaves(updates))
  return broadcast_prefix(
      side, updates, is_leaf=lambda x: isinstance(x, str),
      what=f"{_TRANSFORM}: side must be one of {_SIDES}, a tree that is a "
      "prefix of the updates with them at its leaves, or a callable "
      "returning one; its structure does not match the updates")


def _check_side(side: Any, where: str) -> None:
  if not isinstance(side, str) or side not in _SIDES:
    raise ValueError(f"{_TRANSFORM}: {where} side {side!r}; expected one of "
                     f"{_SIDES}.")


def _rotates_input(view: MatrixView, side: str) -> bool:
  """Whether the rotated side of ``view``'s matrices is fan_in."""
  _check_side(side, f"leaf {view.path} (shape {view.shape}) has")
  if side == "smaller":
    return view.fan_in <= view.fan_out
  return side == "input"


def _oriented(x: jax.Array, rotates_input: bool) -> jax.Array:
  """``(batch, fan_in, fan_out)`` with the rotated side first, or back."""
  return x if rotates_input else jnp.swapaxes(x, -1, -2)


def _rotation_shape(view: MatrixView, side: str) -> tuple[int, int, int] | None:
  if view.batch * view.fan_in * view.fan_out == 0:
    return None
  s = view.fan_in if _rotates_input(view, side) else view.fan_out
  return view.batch, s, s


def adaptive_rotate(
    base: str | Callable[[jax.Array], jax.Array] = "sinkhorn",
    *,
    sinkhorn_iters: int = 5,
    side: Any = "smaller",
    rotation_dtype: Any = jnp.float32,
    eps: float = 1e-8,
    dimension_numbers: DimensionNumbersSpec = None,
) -> optax.GradientTransformation:
  r"""ARO: a base optimizer applied in a rotated frame that adapts to it.

  Each matrix ``M`` (typically the momentum) is seen with its rotated side
  first, ``X = M`` (``side="input"``, ``s = fan_in``) or ``X = M^T``
  (``side="output"``, ``s = fan_out``), of shape ``s × k``. With ``f`` the
  base optimizer's map and ``R`` the ``s × s`` rotation of the previous step
  (the identity at the first):

  .. math::
    C = X\, f(R^\top X)^\top, \qquad R \leftarrow Q \text{ of }
    \mathrm{QR}(C), \qquad D = R\, f(R^\top X),

  and the output is ``D`` with the rotated side put back in place. ``C``'s
  Q-factor is the rotation under which ``f``, applied in the rotated frame,
  best aligns with ``X`` (a Procrustes step of the paper's maximization of
  ``<X, R f(R^T X)>``, with ``R`` frozen inside ``f``). Flipping the sign of
  a column of ``R`` flips the matching row of ``R^T X`` and of ``f`` (each
  base is odd in a row), so ``D`` does not depend on QR's sign convention.

  The bases ``f``, on ``Y`` of shape ``s × k``:

  * ``"sinkhorn"`` (the paper's recommendation and the default): ``sinkhorn_iters``
    passes of {scale each row to L2 norm ``sqrt(k)``, then each column to
    ``sqrt(s)``}, the square-root iterates of Sinkhorn's algorithm on the
    squared entries. After the last column pass every column has norm
    ``sqrt(s)``, so ``RMS(f) = 1`` and, ``R`` being orthogonal, ``RMS(D) =
    1``;
  * ``"row_norm"``: each row scaled to norm ``sqrt(k)`` (``RMS = 1``); with
    it and a fixed ``M`` the iteration converges to ``D = sqrt(k)
    polar(X)``: ARO then is Muon;
  * ``"sign"``: the entries' signs;
  * a callable, taking the rotated matrices ``(batch, s, k)`` and returning
    an array of that shape (it should be odd in each row for the sign
    invariance above).

  The norms are clamped below at ``eps``, as in Langford's code, but each
  matrix is first divided by its largest magnitude: the clamp is relative,
  and the output (like every base's) does not depend on the input's scale.

  **Which side.** ``side`` is ``"input"``, ``"output"``, ``"smaller"``
  (the default), a tree of them (a prefix of the updates) or a callable
  returning one. The paper rotates the residual stream's side (its design
  3): fan_in for Q, K, V and the MLP's up projection, fan_out for the
  attention output and the down projection. A transform sees only shapes,
  so ``"smaller"`` rotates the smaller side of each matrix, fan_in on ties:
  for a transformer's ``(d, 3d)``, ``(d, 4d)`` and ``(4d, d)`` matrices that
  is the residual stream, ``d``. A square matrix (a separate Q, K, V or the
  attention output, ``(d, d)``) rotates fan_in, which for the attention
  output is the heads' side; give a tree to choose otherwise. The smaller
  side is also the well-conditioned one: with ``s > k`` (or any ``M`` of
  rank ``r < s``), ``R^T X`` has ``s - r`` rows that are zero in exact
  arithmetic and rounding noise in floating point, which the row
  normalizations scale up to full size, so that part of ``D`` is set by the
  rounding: in float32 such rows (about ``10^{-7}`` of the largest) are
  above ``eps``, and Sinkhorn's later passes rescale even the rows the
  clamp held, so float32 and float64 then disagree by O(1) (in float64
  too, two implementations). Rotating the larger side also costs more
  state (for GPT-2's 768×3072 MLP, 9.4M entries on fan_out against 0.6M on
  fan_in). Langford's code rotates torch's rows, which is
  ``side="output"``: the larger side of an MLP's up projection.

  **Where orthax departs from the sources.** The clamp is relative (above).
  A matrix whose ``C`` is zero (a zero momentum) keeps its rotation, where
  Householder QR of a zero matrix would reset it to the identity; its output
  is zero either way. Each matrix of a stacked leaf (scan layers, experts)
  has its own rotation.

  Scale safety: every product is taken of the matrix divided by its largest
  magnitude (whose entries are in ``[-1, 1]``), so no finite input overflows
  or underflows; a zero matrix gives zero, a leaf with no entries an empty
  update. float16 and bfloat16 leaves are computed in ``rotation_dtype``
  (float32 by default) and returned in their dtype; the rotation stays in
  ``rotation_dtype``. The products use full float32 precision
  (``Precision.HIGHEST``, not a GPU's TF32). Cost per matrix and step: four
  ``s × s × k`` products and one ``s × s`` QR; state ``s^2`` per matrix.

  Args:
    base: ``"sinkhorn"``, ``"row_norm"``, ``"sign"`` or a callable.
    sinkhorn_iters: Sinkhorn passes, an integer ``>= 1`` (the paper's 5).
    side: the rotated side, as above.
    rotation_dtype: dtype of the rotation and of the computation,
      ``jnp.float32`` or ``jnp.float64``; a float64 leaf is computed in
      float64 whatever it is.
    eps: the norms' lower clamp, in units of the matrix's largest magnitude,
      ``> 0``.
    dimension_numbers: as in :func:`orthax.orthogonalize`; each batch slice
      of a leaf is one matrix with its own rotation.

  Returns:
    An :class:`optax.GradientTransformation` whose state is an
    :class:`AdaptiveRotateState`.

  Raises:
    ValueError: an unknown ``base`` or ``side``, ``sinkhorn_iters < 1``,
      ``eps <= 0`` or a ``rotation_dtype`` other than float32 or float64 (at
      construction); a ``side`` tree that does not match the updates; at
      update time, a leaf that is not a matrix under its dimension numbers,
      a gradient whose shape is not its parameter's (when the params are
      given), or a state leaf that is not the rotation this leaf needs (a
      checkpoint of another ``side``), named by its key path.
    TypeError: a hyperparameter of the wrong type; a leaf that is not a
      supported float.

  Example:
    >>> import jax, jax.numpy as jnp, optax, orthax
    >>> from orthax.transforms.adaptive_rotate import adaptive_rotate
    >>> tx = optax.chain(orthax.momentum(0.95, nesterov=False),
    ...                  adaptive_rotate(), orthax.scale_to_rms(0.2))
    >>> params = {'w': jnp.zeros((16, 64))}
    >>> g = {'w': jax.random.normal(jax.random.key(0), (16, 64))}
    >>> updates, state = tx.update(g, tx.init(params))

  References:
    W. Gong, J. Zazo, Q. Luo, X. Wang, J. Hensman, C. Ma, ARO: Adaptively
    Rotated Optimization, 2026, arXiv:2602.09006; J. Langford's
    implementation, github.com/microsoft/dion, branch dev/aro, dion/aro.py
  """
  iters = check_number(_TRANSFORM, "sinkhorn_iters", sinkhorn_iters, low=1,
                       integer=True)
  eps = check_hyperparameter(_TRANSFORM, "eps", eps, low=0.0, low_open=True)
  f = _base_fn(base, iters, eps)
  if jnp.dtype(rotation_dtype) not in (jnp.float32, jnp.float64):
    raise ValueError(f"{_TRANSFORM}: rotation_dtype must be float32 or "
                     f"float64, got {rotation_dtype!r}.")
  if isinstance(side, str):
    _check_side(side, "unknown")

  def dtype(leaf):
    return jnp.promote_types(leaf.dtype, rotation_dtype)

  def init_leaf(view, p, side):
    shape = _rotation_shape(view, side)
    if shape is None:
      return None
    return jnp.broadcast_to(jnp.eye(shape[1], dtype=dtype(p)), shape)

  def with_sides(fn, tree, *rest, num_outputs=1):
    treedef = jax.tree.structure(tree)
    sides = treedef.unflatten(_sides(side, tree))
    return map_matrices(fn, tree, sides, *rest, num_outputs=num_outputs,
                        dimension_numbers=dimension_numbers,
                        transform=_TRANSFORM)

  def init_fn(params):
    return AdaptiveRotateState(rotation=with_sides(init_leaf, params))

  def update_leaf(view, u, side, rotation):
    shape = _rotation_shape(view, side)
    if shape is None:
      return u, rotation
    check_state_leaf(_TRANSFORM, view.path, rotation, shape)
    into = _rotates_input(view, side)
    x = _oriented(view.to_matrices(u).astype(rotation.dtype), into)
    x, _ = divide_by_max_abs(x, (1, 2))
    cross = _matmul(x, jnp.swapaxes(f(_matmul(jnp.swapaxes(rotation, 1, 2),
                                              x)), 1, 2))
    q, _ = jnp.linalg.qr(cross)
    zero = jnp.all(cross == 0, axis=(1, 2), keepdims=True)
    rotation = jnp.where(zero, rotation, q)
    d = _matmul(rotation, f(_matmul(jnp.swapaxes(rotation, 1, 2), x)))
    return view.from_matrices(_oriented(d, into)).astype(u.dtype), rotation

  def update_fn(updates, state, params=None):
    check_same_shapes(_TRANSFORM, updates, params)
    out, rotation = with_sides(update_leaf, updates, state.rotation,
                               num_outputs=2)
    return out, AdaptiveRotateState(rotation=rotation)

  return optax.GradientTransformation(init_fn, update_fn)
