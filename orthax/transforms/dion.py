"""``orthax.scale_by_dion``: Dion's low-rank orthonormal update with error
feedback."""

from __future__ import annotations

import functools
import math
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from orthax._checks import (check_hyperparameter, check_number,
                            check_same_shapes, check_state_leaf)
from orthax.matrices import DimensionNumbersSpec, MatrixView, map_matrices
from orthax.polar.newton_schulz import divide_by_max_abs

__all__ = ["DionState", "dion_rank", "scale_by_dion"]

_TRANSFORM = "orthax.scale_by_dion"

# Full float32 products: a GPU's default TF32 would round the power
# iteration and the error feedback to 2^-11.
_einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


class DionState(NamedTuple):
  """State of :func:`scale_by_dion`.

  Attributes:
    buffer: per leaf, the error-feedback buffer ``M`` (the leaf's shape), in
      float32 (float64 for float64 leaves), whatever the leaf's dtype: it
      accumulates gradients over many steps, and bfloat16's 8 bits would
      drop a gradient smaller than 2^-8 of the buffer.
    factor: per leaf, the right factor ``Q`` of shape ``(batch, fan_in,
      rank)`` (``batch`` the product of the leaf's batch axes, 1 for a 2-D
      leaf), in the buffer's dtype. After ``init`` it holds ``Q_0``, entries
      drawn from ``N(0, 1)``; after each update, the column-normalized
      ``B P``.
  """

  buffer: optax.Updates
  factor: optax.Updates


def dion_rank(view: MatrixView, rank_fraction: float = 1.0,
              rank: int | None = None) -> int:
  """The rank of the factors :func:`scale_by_dion` keeps for ``view``'s
  matrices: ``min(rank, fan_in, fan_out)`` when ``rank`` is given, else
  ``ceil(rank_fraction * min(fan_in, fan_out))`` (0 for an empty matrix)."""
  side = min(view.fan_in, view.fan_out)
  if rank is not None:
    return min(rank, side)
  return min(math.ceil(rank_fraction * side), side)


def _q0(seed: int, view: MatrixView, rank: int, dtype) -> jax.Array:
  """``Q_0 ~ N(0, 1)``, ``(batch, fan_in, rank)``, from ``seed`` and the
  leaf's key path (so each leaf and each slice of a stack draws its own, and
  adding a leaf does not change the others')."""
  key = jax.random.fold_in(jax.random.key(seed),
                           zlib.crc32(view.path.encode()) & 0x7FFFFFFF)
  return jax.random.normal(key, (view.batch, view.fan_in, rank), dtype)


def _mesh_sharding(x) -> NamedSharding | None:
  """``x``'s sharding when its type names mesh axes (``Explicit`` axes)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if spec is None or all(entry is None for entry in spec):
    return None
  return sharding


def _splits_a_group(view: MatrixView, sharding: NamedSharding | None) -> bool:
  """Whether a mesh axis shards an axis of a batch, fan_in or fan_out that
  spans several of the leaf's axes (the reshape to matrices cannot keep
  such a layout under ``Explicit`` axes)."""
  if sharding is None:
    return False
  sharded = {a for a, entry in enumerate(sharding.spec) if entry is not None}
  return any(len(group) > 1 and sharded & set(group) for group in
             (view.batch_axes, view.reduction_axes, view.output_axes))


class _Layout:
  """Where the products' results live under ``Explicit`` mesh axes.

  ``b`` is the leaf as ``(batch, fan_in, fan_out)`` matrices; ``place(
  batch, rows, cols)`` is the sharding of a result whose three axes are
  sharded like ``b``'s ``"b"``, ``"m"``, ``"n"`` (or not, ``None``): the
  ``out_sharding`` JAX asks for where a product contracts a sharded axis.
  Without mesh axes in the types (no mesh, or ``Auto`` axes, where XLA
  partitions the products itself) every placement is ``None``.
  """

  def __init__(self, b: jax.Array):
    self.sharding = _mesh_sharding(b)

  def place(self, *axes: str | None) -> NamedSharding | None:
    if self.sharding is None:
      return None
    spec = dict(zip("bmn", self.sharding.spec))
    return NamedSharding(self.sharding.mesh,
                         P(*(None if a is None else spec[a] for a in axes)))

  def reshard(self, x: jax.Array, *axes: str | None) -> jax.Array:
    where = self.place(*axes)
    return x if where is None else jax.sharding.reshard(x, where)

  def auto(self, fn, x: jax.Array, *axes: str | None) -> jax.Array:
    """``fn(x)``, placed like ``axes``, computed with XLA placing its steps
    (``jnp.linalg.qr`` does not trace on a batch-sharded ``Explicit``
    input in JAX 0.10; where the input is already so placed, XLA moves
    nothing)."""
    where = self.place(*axes)
    if where is None:
      return fn(x)
    return jax.sharding.auto_axes(fn, out_sharding=where)(x)


def _like(x: jax.Array, like: jax.Array) -> jax.Array:
  """``x`` in ``like``'s sharding when that is an ``Explicit`` one."""
  sharding = _mesh_sharding(like)
  if sharding is None or _mesh_sharding(x) == sharding:
    return x
  return jax.sharding.reshard(x, sharding)


def _orthonormal(x: jax.Array) -> jax.Array:
  """The Q factor of each ``(n, r)`` slice of ``x`` (``n >= r``), signed so
  that R's diagonal is ``>= 0``: the unique factor of a full-rank ``x``,
  whichever QR the platform runs. A rank-deficient ``x`` still gets
  orthonormal columns (Householder QR)."""
  q, r = jnp.linalg.qr(x)
  diagonal = jnp.diagonal(r, axis1=-2, axis2=-1)
  return q * jnp.where(diagonal < 0, -1, 1).astype(q.dtype)[..., None, :]


def _dion_matrices(b: jax.Array, q: jax.Array, *, mu: float,
                   eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One Dion step on a stack of buffers ``B_t = M_{t-1} + G_t``.

  Args:
    b: ``(batch, m, n)`` buffers (the gradient added).
    q: ``(batch, m, r)`` factors ``Q_{t-1}``.
    mu, eps: as in :func:`scale_by_dion`.

  Returns:
    The direction ``Q_t P_t^T``, the new buffer ``M_t`` and the new factor
    ``Q_t``, in ``b``'s dtype (``Q_t`` in ``q``'s sharding).
  """
  layout = _Layout(b)
  nonzero = jnp.any(b != 0, axis=(1, 2), keepdims=True)
  # Unit scale: the products and the column norms neither overflow nor
  # underflow, and eps is relative to the buffer's largest entry.
  unit, peak = divide_by_max_abs(b, (1, 2))
  q_in = layout.reshard(q.astype(b.dtype), "b", "m", None)
  # B^T Q (n × r) sums over fan_in: the one product of a sharded fan_in that
  # needs a reduction across devices, of n·r entries.
  x = _einsum("bmn,bmr->bnr", unit, q_in,
              out_sharding=layout.place("b", "n", None))
  # QR of the small factor, whole on every device that holds its slice.
  x = layout.reshard(x, "b", None, None)
  p = layout.auto(_orthonormal, x, "b", None, None)
  r = _einsum("bmn,bnr->bmr", unit, p, out_sharding=layout.place("b", "m", None))
  norms = jnp.sqrt(jnp.sum(jnp.square(r), axis=1, keepdims=True)) + eps
  # A zero column (eps = 0, B rank deficient) stays zero.
  q_new = r / jnp.where(norms > 0, norms, jnp.ones_like(norms))
  feedback = _einsum("bmr,bnr->bmn", r, p, out_sharding=layout.place(
      "b", "m", "n"))
  m_new = b - ((1 - mu) * peak) * feedback
  direction = _einsum("bmr,bnr->bmn", q_new, p,
                      out_sharding=layout.place("b", "m", "n"))
  # An all-zero buffer has no direction: keep Q (as the official code does),
  # so that the power iteration resumes from it.
  q_new = jnp.where(nonzero, _like(q_new, q), q.astype(b.dtype))
  return direction, m_new, q_new


def scale_by_dion(
    rank_fraction: float = 1.0,
    *,
    rank: int | None = None,
    mu: float = 0.95,
    eps: float = 1e-8,
    seed: int = 0,
    dimension_numbers: DimensionNumbersSpec = None,
) -> optax.GradientTransformation:
  r"""Dion: a low-rank orthonormal update by one power iteration, with
  error feedback.

  For each ``(fan_in, fan_out) = (m, n)`` matrix with gradient ``G_t``, a
  buffer ``M`` (zero at first) and a factor ``Q`` of ``r`` columns:

  .. math::
    B_t = M_{t-1} + G_t, \quad P_t = \mathrm{QR}(B_t^T Q_{t-1}), \quad
    R_t = B_t P_t, \\
    M_t = B_t - (1 - \mu) R_t P_t^T, \quad
    Q_t = R_t / (\|R_t[:, j]\|_2 + \epsilon\max|B_t|), \quad
    \text{out} = Q_t P_t^T.

  ``P_t`` (``n × r``) has orthonormal columns, ``Q_t`` (``m × r``) unit ones,
  so the update has at most ``r`` singular values, all near 1 once the
  power iteration has found ``B``'s leading singular vectors. What the rank
  ``r`` approximation leaves out stays in the buffer (``M_t``: the error
  feedback, which replaces momentum; do not chain this after
  :func:`orthax.momentum`), and so does ``mu`` of what it captures. With
  ``r = min(m, n)`` and ``mu = 0`` the buffer empties every step and the
  update converges to the polar factor of a fixed gradient, as Muon's does.

  The rank is ``ceil(rank_fraction * min(m, n))`` (``dion.py``'s rule),
  or ``min(rank, m, n)`` when ``rank`` is given (``dion_simple.py``'s).
  ``Q_0`` has ``N(0, 1)`` entries drawn from ``seed`` and the leaf's key
  path: every leaf and every slice of a stacked leaf (scan layers, experts)
  its own, the same in every run; :attr:`DionState.factor` holds it after
  ``init``.

  Follows ``dion_simple.py`` of the official code (``microsoft/dion@0a059a4``)
  in orthax's layout: its ``P = M Q`` of torch's ``(out, in)`` weight is
  ``B^T Q`` here, and its update ``P Q^T`` is ``Q P^T``. ``Q`` is on the
  fan_in side for every shape, as in ``dion_simple.py`` (``dion.py`` puts it
  on the smaller side): under FSDP sharding of fan_in, ``B^T Q`` is the one
  product that reduces across devices. It differs from the official code
  in three details: ``eps`` is relative to the buffer's largest entry (the
  products are taken on ``B / max|B|``), so the update does not depend on
  the gradient's scale (absolute in the official code, where a column of
  ``R`` of norm ``c`` is scaled by ``1 / (1 + 1e-8 / c)``: 1e-6 from 1 at
  ``c = 1e-2``); QR is Householder
  with R's diagonal made positive (``dion.py``'s default randomized
  Cholesky QR gives the same orthonormal factor up to its columns' signs,
  which do not change the update); the products run in full float32
  precision. The shape factor ``sqrt(fan_out / fan_in)`` of the official
  update is :func:`orthax.scale_by_shape` ``("spectral")``.

  Sharding: the math is written on whole leaves, so under ``jit`` with
  sharded leaves XLA partitions it, and under ``Explicit`` mesh axes the
  products name their results' shardings. With the leaf sharded along fan_in
  (FSDP), the devices exchange only the factors: ``B^T Q`` (``n × r``,
  reduced across devices), ``r`` column norms and the largest entry; ``R``,
  ``M`` and the update are computed where the rows are. The state is sharded
  like the leaf (the factor along fan_in). Under ``Explicit`` axes a leaf
  whose fan_in, fan_out or batch spans several axes, one of them sharded, is
  gathered first.

  A buffer that is all zero (zero gradients from the start) gives a zero
  update and keeps ``Q``; finite gradients never give NaN or Inf, whatever
  their scale. bfloat16 and float16 leaves are computed in float32 and their
  updates returned in their dtype.

  Args:
    rank_fraction: ``r / min(fan_in, fan_out)``, in ``(0, 1]``.
    rank: an explicit rank ``>= 1`` for every matrix (capped at ``min(fan_in,
      fan_out)``), overriding ``rank_fraction``; ``None`` uses the fraction.
    mu: the share of the captured low-rank part kept in the buffer, in
      ``[0, 1]`` (``mu = 1``: nothing is removed, the buffer is the sum of
      all gradients).
    eps: added to each column norm of ``R``, relative to ``max|B|``, ``>=
      0``.
    seed: the integer seed of ``Q_0``.
    dimension_numbers: as in :func:`orthax.orthogonalize`.

  Returns:
    An :class:`optax.GradientTransformation` whose state is a
    :class:`DionState`.

  Raises:
    ValueError: a hyperparameter out of its range (at construction); at
      update time, a leaf that is not a matrix, a gradient whose shape is
      not its parameter's, or a state leaf missing or of another shape (a
      checkpoint of another configuration), named by its key path.
    TypeError: a hyperparameter of the wrong type; a leaf that is not a
      supported float.

  Example:
    >>> import jax, jax.numpy as jnp, optax, orthax
    >>> from orthax.transforms.dion import scale_by_dion
    >>> tx = optax.chain(scale_by_dion(0.25), orthax.scale_by_shape("spectral"))
    >>> params = {'w': jnp.zeros((32, 64))}
    >>> g = {'w': jax.random.normal(jax.random.key(0), (32, 64))}
    >>> updates, state = tx.update(g, tx.init(params))

  References:
    K. Ahn, B. Xu, N. Abreu, Y. Fan, G. Magakyan, P. Sharma, Z. Zhan,
    J. Langford, Dion: Distributed Orthonormalized Updates, 2025,
    arXiv:2504.05295, github.com/microsoft/dion
  """
  rank_fraction = check_number(_TRANSFORM, "rank_fraction", rank_fraction,
                               low=0.0, high=1.0, low_open=True)
  if rank is not None:
    rank = check_number(_TRANSFORM, "rank", rank, low=1, integer=True)
  mu = check_hyperparameter(_TRANSFORM, "mu", mu, low=0.0, high=1.0)
  eps = check_hyperparameter(_TRANSFORM, "eps", eps, low=0.0)
  seed = check_number(_TRANSFORM, "seed", seed, low=0, integer=True)

  def state_dtype(x):
    return jnp.promote_types(jnp.result_type(x), jnp.float32)

  def matrices(view: MatrixView, x: jax.Array) -> jax.Array:
    """``x`` as ``(batch, fan_in, fan_out)``, gathered first where its
    ``Explicit`` layout cannot be kept (see :func:`_splits_a_group`)."""
    if _splits_a_group(view, _mesh_sharding(x)):
      x = jax.sharding.reshard(x, NamedSharding(_mesh_sharding(x).mesh, P()))
    return view.to_matrices(x)

  def init_leaf(view, p):
    dtype = state_dtype(p)
    q0 = _q0(seed, view, dion_rank(view, rank_fraction, rank), dtype)
    where = _Layout(jax.eval_shape(functools.partial(matrices, view), p))
    return jnp.zeros_like(p, dtype), where.reshard(q0, "b", "m", None)

  def init_fn(params):
    buffer, factor = map_matrices(init_leaf, params,
                                  dimension_numbers=dimension_numbers,
                                  transform=_TRANSFORM, num_outputs=2)
    return DionState(buffer=buffer, factor=factor)

  def update_leaf(view, g, m, q):
    r = dion_rank(view, rank_fraction, rank)
    check_state_leaf(_TRANSFORM, view.path, m, view.shape)
    check_state_leaf(_TRANSFORM, view.path, q, (view.batch, view.fan_in, r))
    b = m + g.astype(m.dtype)
    if r == 0:  # a side of 0: nothing to update
      return jnp.zeros_like(g), b, q
    direction, m_new, q_new = _dion_matrices(matrices(view, b), q, mu=mu,
                                             eps=eps)
    unmatrix = lambda x: _like(view.from_matrices(x), m)
    return (unmatrix(direction).astype(g.dtype), unmatrix(m_new),
            q_new.astype(q.dtype))

  def update_fn(updates, state, params=None):
    check_same_shapes(_TRANSFORM, updates, params)
    out, buffer, factor = map_matrices(
        update_leaf, updates, state.buffer, state.factor,
        dimension_numbers=dimension_numbers, transform=_TRANSFORM,
        num_outputs=3)
    return out, DionState(buffer=buffer, factor=factor)

  return optax.GradientTransformation(init_fn, update_fn)
