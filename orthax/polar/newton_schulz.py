"""The Newton–Schulz iteration: the one implementation of it in orthax.

Given ``X`` of shape ``(..., m, n)``, returns an approximation of its polar
factor ``U V^T`` (``X = U S V^T``): ``X`` is scaled so that its singular values
lie in ``(0, 1]`` and every step applies an odd quintic to them,

    A = X X^T;   B = b A + c A^2;   X <- a X + B X.

The Gram matrix is formed on the smaller side: a tall matrix (m > n) is
iterated through its transpose, so the products are ``min(m, n)``-sized.
Leading axes are batch axes (one matrix each); the transforms, kernels and
sharded path all call this function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from orthax.polar.auto_backend import uses_pallas

__all__ = ["BACKENDS", "MatmulOps", "PRECONDITIONINGS", "XLA_OPS",
           "divide_by_max_abs", "frobenius_normalize", "matmul_ops",
           "newton_schulz", "newton_schulz_flops", "precondition", "use_gram"]


def divide_by_max_abs(x: jax.Array, axis) -> tuple[jax.Array, jax.Array]:
  """``(x / peak, peak)`` with ``peak = max |x|`` over ``axis`` (kept).

  The quotient has entries in ``[-1, 1]``, so sums of its squares neither
  overflow nor underflow whatever the scale of ``x``. Where ``x`` is all zero
  (or empty) ``peak`` is 1, so zero stays zero; NaN and Inf propagate.
  """
  peak = jnp.max(jnp.abs(x), axis=axis, keepdims=True, initial=0.0)
  peak = jnp.where(peak == 0, jnp.ones_like(peak), peak)
  # Not x / peak: XLA computes it as x * (1 / peak), and above 2**126 the
  # reciprocal is subnormal and flushed to 0. Dividing by peak's power of
  # two exactly (ldexp) and then by its mantissa in [0.5, 1) gives the same
  # quotient at every scale.
  mantissa, exponent = jnp.frexp(peak)
  return jnp.ldexp(x, -exponent) / mantissa, peak


def frobenius_normalize(x: jax.Array, *, margin: float = 1.0,
                        eps: float = 1e-7) -> jax.Array:
  """Divides each matrix (last two axes) by ``margin * ||X||_F + eps * max|X|``.

  The result does not depend on the scale of ``X``: the matrix is first
  divided by its largest magnitude (:func:`divide_by_max_abs`), in float32
  (float64 for float64 input) whatever its dtype, so a finite matrix of any
  norm (above about 1.8e19 the square of the norm overflows float32) or a
  tiny one (below ``eps`` in norm, or subnormal) is normalized like the same
  matrix at unit scale. ``eps`` is relative: it changes the normalized matrix
  by a factor within ``eps / margin`` of 1 (``max|X| <= ||X||_F``). A zero
  matrix maps to zero for every ``eps >= 0``, with a zero derivative there
  (the map jumps at zero; NaN would poison every gradient it reaches).
  """
  acc = jnp.promote_types(x.dtype, jnp.float32)
  unit, _ = divide_by_max_abs(x.astype(acc), (-2, -1))
  square = jnp.sum(jnp.square(unit), axis=(-2, -1), keepdims=True)
  zero = square == 0  # otherwise square >= 1: unit has an entry of size 1
  # The branches that where() discards get a zero cotangent, and sqrt's
  # infinite slope at 0 would make that 0 * inf = NaN: they never see 0.
  one = jnp.ones_like(square)
  scale = margin * jnp.sqrt(jnp.where(zero, one, square)) + eps
  out = jnp.where(zero, jnp.zeros_like(unit), unit / jnp.where(zero, one, scale))
  return out.astype(x.dtype)


def _mm(p: jax.Array, q: jax.Array, acc) -> jax.Array:
  return jnp.matmul(p, q, preferred_element_type=acc)


class MatmulOps(NamedTuple):
  """The matrix products of one Newton–Schulz step, as a backend provides them.

  The iteration (normalization, transposition, step table, Gram segments and
  restart) is written once, in this module, on top of these four; ``XLA_OPS``
  runs them as XLA matmuls and :data:`orthax.kernels.PALLAS_OPS` as Pallas
  kernels. Every ``m×m`` matrix they exchange is symmetric.

  Attributes:
    gram: ``(x, acc) -> X X^T``, accumulated and returned in ``acc``.
    polynomial: ``(A, a, b, c, operand_dtype) -> a I + b A + c A^2`` in
      ``A.dtype``, with ``A^2`` taken on operands rounded to ``operand_dtype``;
      ``a=None`` drops the identity term.
    product: ``(P, Q) -> P Q`` for commuting symmetric ``P, Q``.
    apply: ``(P, x, a) -> a X + P X`` in ``x.dtype``, with ``P`` rounded to
      ``x.dtype`` and accumulation in ``P.dtype``; ``a=None`` gives ``P X``.
  """
  gram: Callable[..., jax.Array]
  polynomial: Callable[..., jax.Array]
  product: Callable[..., jax.Array]
  apply: Callable[..., jax.Array]


def _xla_gram(x: jax.Array, acc) -> jax.Array:
  return _mm(x, jnp.swapaxes(x, -1, -2), acc)


def _xla_polynomial(a_mat: jax.Array, a, b, c, operand_dtype) -> jax.Array:
  low = a_mat.astype(operand_dtype)
  square = c * _mm(low, low, a_mat.dtype)
  if a is None:
    return b * a_mat + square
  return a * jnp.eye(a_mat.shape[-1], dtype=a_mat.dtype) + b * a_mat + square


def _xla_product(p: jax.Array, q: jax.Array) -> jax.Array:
  return _mm(p, q, p.dtype)


def _xla_apply(p: jax.Array, x: jax.Array, a) -> jax.Array:
  acc = p.dtype
  out = _mm(p.astype(x.dtype), x, acc)
  if a is not None:
    out = a * x.astype(acc) + out
  return out.astype(x.dtype)


XLA_OPS = MatmulOps(gram=_xla_gram, polynomial=_xla_polynomial,
                    product=_xla_product, apply=_xla_apply)
BACKENDS = ("auto", "xla", "pallas")


def matmul_ops(backend: str | MatmulOps) -> MatmulOps:
  """The :class:`MatmulOps` of a backend name (or ``backend`` itself).

  ``"auto"`` is resolved per matrix by :func:`newton_schulz` first.
  """
  if isinstance(backend, MatmulOps):
    return backend
  if backend == "pallas":
    # Imported here: the kernels import this module, and XLA users never
    # load Pallas.
    from orthax.kernels import PALLAS_OPS  # pylint: disable=g-import-not-at-top
    return PALLAS_OPS
  if backend == "xla":
    return XLA_OPS
  raise ValueError(f"Unknown Newton-Schulz backend {backend!r}; expected one "
                   f"of {BACKENDS} or a MatmulOps.")


PRECONDITIONINGS = ("frobenius", "spectral", "schatten", "aol")


def _safe_inverse(norm: jax.Array, margin: float, eps: float) -> jax.Array:
  """``1 / (margin * norm + eps)``, and 0 where ``norm`` is 0 (any eps >= 0).

  ``norm`` is of a matrix (or row) already divided by its largest entry, so
  ``eps`` is relative to that entry, as in :func:`frobenius_normalize`.
  """
  zero = norm == 0
  return jnp.where(zero, jnp.zeros_like(norm),
                   1 / (margin * jnp.where(zero, jnp.ones_like(norm), norm)
                        + eps))


def _safe_sqrt(x: jax.Array) -> jax.Array:
  # sqrt's infinite slope at 0 would give 0 * inf = NaN in the branch where()
  # discards: the zeros never reach it.
  zero = x == 0
  return jnp.where(zero, jnp.zeros_like(x),
                   jnp.sqrt(jnp.where(zero, jnp.ones_like(x), x)))


def precondition(x: jax.Array, kind: str = "frobenius", *,
                 margin: float = 1.0, eps: float = 1e-7, dtype=None,
                 acc=None, ops: MatmulOps | None = None
                 ) -> tuple[jax.Array, jax.Array | None]:
  r"""Scales each wide matrix (last two axes, ``m <= n``) for Newton–Schulz.

  Every kind first divides the matrix by its largest entry (in float32, or
  float64 for float64 input: no overflow or underflow at any scale), then
  divides by ``margin * N + eps`` with ``N`` one of these norms, which all
  bound the spectral norm from above, so the singular values land in
  ``(0, 1/margin]``:

  * ``"frobenius"``: :math:`\|X\|_F` (:func:`frobenius_normalize`);
  * ``"spectral"``: :math:`\|X\|_2` itself, the tightest scalar, by an SVD
    (costly: a reference more than a method);
  * ``"schatten"``: :math:`\|X\|_{S_4} = \|X X^	op\|_F^{1/2}`, from the Gram
    matrix that the first step forms anyway (Grishina et al. 2025); between
    the two above, and above the smallest singular values of a flat spectrum
    by up to :math:`r^{1/4}` (rank ``r``) compared with Frobenius;
  * ``"aol"``: not a scalar but a row scaling, :math:`D X` with
    :math:`D_{ii} = (\sum_j |(X X^	op)_{ij}|)^{-1/2}` (the "almost
    orthogonal layer" bound of Prach & Lampert 2022, as used by Turbo-Muon,
    Boissin et al. 2025): :math:`\|D X\|_2 \le 1` always, and for nearly
    orthogonal rows :math:`D X` is nearly orthogonal. It changes the matrix,
    not only its scale: the iteration converges to the polar factor of
    :math:`D X`, not of :math:`X` (as in Turbo-Muon and optax).

  A zero matrix (or, for ``"aol"``, a zero row) maps to zero whatever ``eps``
  (``>= 0``), with a finite derivative.

  Args:
    x: ``(..., m, n)`` with ``m <= n``.
    kind: one of :data:`PRECONDITIONINGS`.
    margin: ``N`` is multiplied by it (room for rounding below 1).
    eps: relative regularizer, ``>= 0``.
    dtype: dtype of the returned matrix (the iteration's); ``None``: ``x``'s.
    acc: dtype of the returned Gram matrix; ``None``: float32 or wider.
    ops: the backend's products (for the Gram matrix); ``None``: XLA.

  Returns:
    ``(X, A)``: the scaled matrix in ``dtype``, and for ``"schatten"`` and
    ``"aol"`` its Gram matrix :math:`X X^\top` in ``acc`` (scaled from the
    one formed on the way, so the first step need not form it again), else
    ``None``.
  """
  dtype = x.dtype if dtype is None else jnp.dtype(dtype)
  acc = jnp.promote_types(dtype, jnp.float32) if acc is None else acc
  ops = XLA_OPS if ops is None else ops
  if kind == "frobenius":
    return frobenius_normalize(x, margin=margin, eps=eps).astype(dtype), None
  if kind not in PRECONDITIONINGS:
    raise ValueError(f"Unknown preconditioning {kind!r}; expected one of "
                     f"{PRECONDITIONINGS}.")
  unit, _ = divide_by_max_abs(
      x.astype(jnp.promote_types(x.dtype, jnp.float32)), (-2, -1))
  if kind == "spectral":
    if 0 in unit.shape[-2:]:
      return unit.astype(dtype), None
    norm = jnp.linalg.norm(unit, ord=2, axis=(-2, -1), keepdims=True)
    return (unit * _safe_inverse(norm, margin, eps)).astype(dtype), None
  low = unit.astype(dtype)
  a_mat = ops.gram(low, acc)
  if kind == "schatten":
    fourth = _safe_sqrt(jnp.sum(jnp.square(a_mat), axis=(-2, -1),
                                keepdims=True))   # ||X||_S4^2
    scale = _safe_inverse(_safe_sqrt(fourth), margin, eps)
    return (unit * scale).astype(dtype), a_mat * jnp.square(scale)
  row = _safe_inverse(_safe_sqrt(jnp.sum(jnp.abs(a_mat), axis=-1,
                                         keepdims=True)), margin, eps)
  return ((unit * row.astype(unit.dtype)).astype(dtype),
          a_mat * row * jnp.swapaxes(row, -1, -2))


def _step(ops: MatmulOps, x: jax.Array, abc: jax.Array,
          a_mat: jax.Array | None = None) -> jax.Array:
  """One step on operands of x's dtype, accumulated and combined in ``abc``'s.

  With bf16 operands the products accumulate in float32 and the coefficients
  stay float32 (rounding 3.4445 to bf16 would change the polynomial itself);
  only the matmul inputs are rounded to bf16. ``a_mat``: ``X X^T`` if the
  preconditioning already formed it.
  """
  if a_mat is None:
    a_mat = ops.gram(x, abc.dtype)
  poly = ops.polynomial(a_mat, None, abc[1], abc[2], x.dtype)
  return ops.apply(poly, x, abc[0])


def _scan_step(ops: MatmulOps, x: jax.Array,
               abc: jax.Array) -> tuple[jax.Array, None]:
  return _step(ops, x, abc), None


@functools.cache
def _scan_body(ops: MatmulOps):
  # One body per backend, made once: JAX reuses the traced and compiled scan
  # across calls only for the same function object (outside jit, a fresh
  # lambda recompiled it every call).
  return functools.partial(_scan_step, ops)


def _gram_segment(ops: MatmulOps, x: jax.Array, table: jax.Array,
                  a_mat: jax.Array | None = None) -> jax.Array:
  """Steps of ``table`` on a wide ``x``, iterated on its Gram matrix.

  Every step's ``X_k`` is ``Q_k X_0`` with ``Q_k`` a polynomial of
  ``G = X_0 X_0^T``, so all ``m×m`` matrices commute: with
  ``P = a I + b A + c A^2``, ``Q <- P Q`` and ``A = X_k X_k^T <- P (P A)``.
  The ``m×n`` matrix is touched twice (``G`` and ``Q X_0``) instead of twice
  per step. The first ``Q`` is ``P`` itself and the last step needs no new
  ``A``: ``8 m^3`` FLOPs per inner step, ``6`` and ``4`` at the ends.
  """
  acc = table.dtype
  if a_mat is None:
    a_mat = ops.gram(x, acc)
  q = None
  steps = table.shape[0]
  for k in range(steps):  # a few steps, unrolled to skip the end products
    a, b, c = table[k, 0], table[k, 1], table[k, 2]
    poly = ops.polynomial(a_mat, a, b, c, acc)
    q = poly if q is None else ops.product(poly, q)
    if k + 1 < steps:
      a_mat = ops.product(poly, ops.product(poly, a_mat))
  return ops.apply(q, x, None)


def newton_schulz_flops(m: int, n: int, steps: int, *,
                        gram: bool | str = False,
                        gram_restart: int | None = 2) -> int:
  """Matmul FLOPs of :func:`newton_schulz` on one ``m×n`` matrix.

  ``gram="auto"`` counts the path that :func:`use_gram` picks.

  The plain step costs ``4 s^2 l + 2 s^3`` (``s, l = min, max(m, n)``). A Gram
  segment of ``k`` steps costs ``4 s^2 l`` (``G`` and ``Q X_0``) plus
  ``8 s^3`` per step, less ``2 s^3`` at the first (``Q = P``) and ``4 s^3`` at
  the last (no new ``A``); a one-step segment is a plain step.
  """
  if gram == "auto":
    gram = use_gram(m, n, steps, gram, gram_restart)
  s, l = min(m, n), max(m, n)
  if not gram:
    return steps * (4 * s * s * l + 2 * s**3)
  cut = steps if gram_restart is None else min(gram_restart, steps)
  total = 0
  for k in (cut, steps - cut):
    if k:
      total += 4 * s * s * l + (8 * k - 6 if k > 1 else 2) * s**3
  return total


def use_gram(m: int, n: int, steps: int, gram: bool | str,
             gram_restart: int | None = 2) -> bool:
  """Resolves ``gram="auto"``: the Gram path where it takes fewer FLOPs.

  With 5 steps that is ``max/min > 1.5``, with or without the restart:
  GPT-2's attention and MLP projections (3× and 4×) yes, square matrices no.
  """
  if gram != "auto":
    return bool(gram)
  return (newton_schulz_flops(m, n, steps, gram=True, gram_restart=gram_restart)
          < newton_schulz_flops(m, n, steps))


def newton_schulz(x: jax.Array, coeffs: np.ndarray, *, norm_margin: float = 1.0,
                  eps: float = 1e-7, preconditioning: str = "frobenius",
                  compute_dtype=None,
                  gram: bool | str = False,
                  gram_restart: int | None = 2,
                  backend: str | MatmulOps = "xla") -> jax.Array:
  """Approximate polar factor of each matrix in ``x`` (last two axes).

  Args:
    x: array of shape ``(..., m, n)``, real floating dtype; a side may be 0
      (the result is then empty).
    coeffs: ``(steps, 3)`` table of ``(a, b, c)``, one row per step (see
      :mod:`orthax.polar.coefficients`).
    norm_margin: the input is divided by ``norm_margin * N + eps * max|X|``
      with ``N`` the preconditioning's norm (:func:`precondition`; the
      Frobenius norm by default, which bounds the spectral norm by 1; a
      margin above 1 leaves room for rounding).
    eps: a relative regularizer of that division, ``>= 0``; the result does
      not depend on the scale of ``x``, and an all-zero matrix maps to zero.
    preconditioning: ``"frobenius"``, ``"spectral"``, ``"schatten"`` or
      ``"aol"`` (:func:`precondition`); the last two reuse the first step's
      Gram matrix, so they cost no extra product.
    compute_dtype: dtype of the iteration (e.g. ``jnp.bfloat16``); ``None``
      uses ``x.dtype``. The result is returned in ``x.dtype``.
    gram: iterate on the ``min(m, n)`` Gram matrix (Gram Newton–Schulz,
      Dao-AILab 2025): ``True``, ``False`` or ``"auto"`` (only where it takes
      fewer FLOPs, see :func:`use_gram`). The same polynomial is applied; the
      ``m×m`` products run in float32 (or float64) whatever ``compute_dtype``.
    gram_restart: the Gram path restarts from ``X = Q X_0`` after this many
      steps (``None``: never). ``Q`` amplifies small singular values by up to
      the product of the steps' ``a`` (490 for Muon's quintic, 990 for Polar
      Express), and its rounding with them. Measured on 768×2304 with a
      decaying spectrum, Polar Express, relative error against float64:
      float32 6.3e-6 plain, 2.9e-5 Gram with the restart after 2 steps,
      1.6e-3 without; bf16 3.5e-2 plain, 3.2e-2 and 4.5e-2. Without the
      restart the Gram path saves ``4 s^2 l`` more FLOPs (GPT-2-small layer:
      0.63 instead of 0.72 of the plain FLOPs).
    backend: where the products run: ``"xla"``; ``"pallas"``, the fused
      kernels of :mod:`orthax.kernels` (interpreted on CPU; float32, bfloat16
      or float16 only); ``"auto"``, the kernels exactly where
      :data:`orthax.polar.auto_backend.MEASURED_FASTER` has them measured
      faster (this device kind, dtype, path and shape; none yet), XLA
      elsewhere; or a :class:`MatmulOps` (e.g.
      ``orthax.kernels.pallas_ops(tiles=...)``). Every backend runs this
      same iteration.

  Returns:
    An array like ``x`` whose singular values have been pushed towards 1 (the
    exact values depend on the coefficients) and whose singular vectors are
    those of ``x``.
  """
  out_dtype = x.dtype
  dtype = out_dtype if compute_dtype is None else jnp.dtype(compute_dtype)
  transposed = x.shape[-2] > x.shape[-1]
  if transposed:
    x = jnp.swapaxes(x, -1, -2)
  table = jnp.asarray(np.asarray(coeffs),
                      dtype=jnp.promote_types(dtype, jnp.float32))
  steps = table.shape[0]
  gram = use_gram(x.shape[-2], x.shape[-1], steps, gram, gram_restart)
  if backend == "auto":
    backend = ("pallas" if uses_pallas(*x.shape[-2:], dtype, gram)
               else "xla")
  ops = matmul_ops(backend)
  x, a_mat = precondition(x, preconditioning, margin=norm_margin, eps=eps,
                          dtype=dtype, acc=table.dtype, ops=ops)
  if gram:
    cut = steps if gram_restart is None else gram_restart
    for segment in (table[:cut], table[cut:]):
      if segment.shape[0]:
        x = _gram_segment(ops, x, segment, a_mat)
        a_mat = None
  else:
    if a_mat is not None:
      x = _step(ops, x, table[0], a_mat)
      table = table[1:]
    if table.shape[0]:
      # Unrolled: straight-line HLO, which XLA schedules, and costs
      # (cost_analysis counts a loop body once), as a whole.
      x, _ = jax.lax.scan(_scan_body(ops), x, table, unroll=True)
  if transposed:
    x = jnp.swapaxes(x, -1, -2)
  return x.astype(out_dtype)
