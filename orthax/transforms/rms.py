"""orthax.scale_to_rms and orthax.cosh_rms_normalize: per-matrix rescalings.

Both are stateless and act on every matrix of a leaf (each batch slice under
its dimension numbers) on its own: AdaMuon's final RMS alignment, and AuON's
hyperbolic-cosine normalization (alone, or after Newton–Schulz in
Hybrid-AuON).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from orthax._checks import check_flag, check_hyperparameter
from orthax.matrices import DimensionNumbersSpec, MatrixView, map_matrices
from orthax.polar.newton_schulz import frobenius_normalize

__all__ = ["cosh_rms_normalize", "scale_to_rms"]

# exp(-_ARG_CAP / 3) is 0 in float32 and float64: a cosh argument clipped to
# it (gamma * G may overflow to inf) gives 1/r its rounded value, 0, rather
# than exp(inf - inf) = NaN.
_ARG_CAP = 1e4


def _matrix_map(transform: str, fn, dimension_numbers: DimensionNumbersSpec):
  """A stateless ``update_fn`` applying ``fn(view, matrices)`` per leaf.

  ``matrices`` is the leaf as ``(batch, fan_in, fan_out)`` in float32
  (float64 for float64 leaves); ``fn``'s result is cast back to the leaf's
  dtype and shape.
  """

  def update_leaf(view: MatrixView, u: jax.Array) -> jax.Array:
    acc = jnp.promote_types(u.dtype, jnp.float32)
    out = fn(view, view.to_matrices(u).astype(acc))
    return view.from_matrices(out).astype(u.dtype)

  def update_fn(updates, state, params=None):
    del params
    out = map_matrices(update_leaf, updates,
                       dimension_numbers=dimension_numbers, transform=transform)
    return out, state

  return update_fn


def scale_to_rms(
    target: float = 0.2, *, eps: float = 0.0,
    dimension_numbers: DimensionNumbersSpec = None,
) -> optax.GradientTransformation:
  r"""Rescales each matrix so that its entries have RMS ``target``.

  For each ``(fan_in, fan_out)`` matrix ``X`` of ``N = fan_in * fan_out``
  entries,

  .. math::
    \text{out} = \text{target} \cdot \sqrt{N} \,
      \frac{X}{\|X\|_F + \epsilon \max_{ij} |X_{ij}|},

  so with ``eps = 0`` (the default) :math:`\sqrt{\mathrm{mean}(\text{out}^2)}
  = \text{target}` exactly, up to rounding. This is AdaMuon's last step
  (with ``target = 0.2``): after the elementwise second-moment division
  (``optax.scale_by_rms``) the update's scale is no longer the polar factor's,
  and this restores AdamW's typical update RMS so that AdamW's learning rate
  and weight decay carry over. Unlike :func:`orthax.scale_by_shape` ``"rms"``
  (which assumes an orthogonal input), the factor depends on the input's own
  norm.

  ``eps`` is relative, as in :func:`orthax.orthogonalize`: it is measured in
  units of the matrix's largest magnitude, so the map is invariant to the
  input's scale and changes the output by a factor within ``eps`` of 1
  (:math:`\max|X| \le \|X\|_F`). AdaMuon's official code divides by
  :math:`\|\hat O\|_F + 10^{-8}` (absolute); there :math:`\hat O`'s entries
  are of order 1 (:math:`\|\hat O\|_F \ge \max|\hat O| \approx 1`), so that
  absolute ``1e-8`` changes the update by a factor within ``1e-8`` of 1,
  below float32's resolution: ``eps = 0`` reproduces it.

  Scale safety: the norm is taken of the matrix divided by its largest
  magnitude (:func:`orthax.polar.frobenius_normalize`), so no square
  overflows or underflows for any finite input; a zero matrix stays zero
  (for every ``eps >= 0``), and a leaf with a side of 0 gives an empty
  update. Leaves of dtype float16 or bfloat16 are computed in float32 and
  returned in their dtype.

  Args:
    target: the RMS of every output matrix's entries, ``> 0``.
    eps: added to the Frobenius norm, in units of the matrix's largest
      magnitude, ``>= 0``.
    dimension_numbers: as in :func:`orthax.orthogonalize`; each batch slice
      of a leaf is one matrix (its own norm), and ``N`` is the product of the
      reduction and output axes' sizes.

  Returns:
    A stateless :class:`optax.GradientTransformation`.

  Raises:
    ValueError: ``target <= 0`` or ``eps < 0`` (at construction); at update
      time, a leaf that is not a matrix under its dimension numbers, named by
      its key path.
    TypeError: a hyperparameter that is not a real number; a leaf that is not
      a supported float.

  Example:
    >>> import jax, jax.numpy as jnp, optax, orthax
    >>> tx = optax.chain(
    ...     orthax.momentum(0.95), orthax.orthogonalize(coeffs="muon"),
    ...     optax.scale_by_rms(decay=0.999, eps=1e-8, eps_in_sqrt=False,
    ...                        bias_correction=True),
    ...     orthax.scale_to_rms(0.2))
    >>> params = {'w': jnp.zeros((12, 12))}
    >>> g = {'w': jax.random.normal(jax.random.key(0), (12, 12))}
    >>> updates, state = tx.update(g, tx.init(params))

  References:
    C. Si, D. Zhang, W. Shen, AdaMuon: Adaptive Muon Optimizer, 2025,
    arXiv:2507.11005, github.com/Chongjie-Si/AdaMuon
  """
  transform = "orthax.scale_to_rms"
  target = check_hyperparameter(transform, "target", target, low=0.0,
                                low_open=True)
  eps = check_hyperparameter(transform, "eps", eps, low=0.0)

  def rescale(view, x):
    factor = target * math.sqrt(view.fan_in * view.fan_out)
    return frobenius_normalize(x, eps=eps) * factor

  return optax.GradientTransformation(
      optax.init_empty_state,
      _matrix_map(transform, rescale, dimension_numbers))


def _divide_by_cosh_rms(z: jax.Array, y: jax.Array, gamma, eps) -> jax.Array:
  r"""``z / (r + eps)`` with ``r = sqrt(mean(cosh(gamma * y)**2))`` per
  matrix (the last two axes).

  With :math:`a = \gamma |y|`, :math:`\cosh^2 = 1 + \sinh^2` and
  :math:`\sinh a = e^{a} (1 - e^{-2a}) / 2`, the mean is
  :math:`r^2 = 1 + e^{2t} w` where :math:`t = \max a` and
  :math:`w = \mathrm{mean}(e^{2(a - t)} ((1 - e^{-2a}) / 2)^2) \in [0, 1/4]`,
  so :math:`1/r = e^{-t} / q` with :math:`q = \sqrt{e^{-2t} + w}`. No term
  exceeds 1, so nothing overflows; ``r - 1`` (of order ``1/N``) is never
  formed as a difference of two numbers near 1; ``w > 0`` whenever ``t >
  0``, so ``q > 0``. ``1/r`` itself may be below float32's range while
  ``z / r`` is not (large ``z``), so it is applied as three factors
  :math:`(1/r)^{1/3} = e^{-t/3} / q^{1/3} \le 1`: the partial products
  shrink from ``z`` to the result, and a factor underflows only where
  ``1/r < 10^{-113}``, which no finite float32 ``z`` survives. An empty
  matrix gives an empty result.
  """
  a = jnp.minimum(gamma * jnp.abs(y), _ARG_CAP)
  top = jnp.max(a, axis=(-2, -1), keepdims=True, initial=0.0)
  half = -0.5 * jnp.expm1(-2 * a)
  count = max(y.shape[-2] * y.shape[-1], 1)
  w = jnp.sum(jnp.exp(2 * (a - top)) * jnp.square(half), axis=(-2, -1),
              keepdims=True) / count
  q = jnp.sqrt(jnp.exp(-2 * top) + w)
  root = jnp.exp(-top / 3) / jnp.cbrt(q)
  # r / (r + eps) = q / (q + eps e^{-t}), in (0, 1]
  return z * root * root * (root * q / (q + eps * jnp.exp(-top)))


def cosh_rms_normalize(
    gamma: float = 1.0, *, normalize_input: bool = True,
    normalize_output: bool = True, eps_norm: float = 1e-7, eps: float = 1e-8,
    dimension_numbers: DimensionNumbersSpec = None,
) -> optax.GradientTransformation:
  r"""AuON: divides each matrix by the RMS of the cosh of its entries.

  For each ``(fan_in, fan_out)`` matrix ``G`` of ``N`` entries:

  .. math::
    X = \frac{G}{\|G\|_F + \epsilon_{\text{norm}} \max_{ij}|G_{ij}|}, \quad
    r = \sqrt{\mathrm{mean}_{ij} \cosh^2(\gamma Y_{ij})}, \quad
    \text{out} = \frac{Z}{r + \epsilon},

  with ``Y = X`` if ``normalize_input`` else ``G``, and ``Z = X`` if
  ``normalize_output`` else ``G``. The flags express the published
  variants exactly:

  ============================  =====  ===============  ================
  variant                       gamma  normalize_input  normalize_output
  ============================  =====  ===============  ================
  AuON, paper v1 (the default)  1.0    True             True
  AuON, package ``AuON``        1.5    True             False
  Hybrid-AuON, paper §3.2       1.0    False            False
  Hybrid-AuON, package          1.5    True             False
  ============================  =====  ===============  ================

  AuON applies it to Nesterov momentum (:func:`orthax.momentum`), the paper
  followed by :func:`orthax.scale_by_shape` ``"muon"``; Hybrid-AuON to the
  output of :func:`orthax.orthogonalize` ``(coeffs="muon")`` with one step
  (paper) or five (package). The paper prints Hybrid's rms as
  :math:`\frac1N\|\cosh X_1\|_F^2`, without the square root of its own §3.1;
  the row above reads it as §3.1's rms of the one-step iterate (not
  renormalized, hence ``normalize_input=False``).

  **What the factor does.** With ``normalize_input`` the argument has
  :math:`\|X\|_F = 1`, so :math:`|X_{ij}| \le 1`, and since
  :math:`\sinh^2(\gamma x)/x^2` increases with :math:`|x|`,

  .. math::
    1 + \gamma^2 / N \;\le\; r^2 = 1 + \mathrm{mean}\,\sinh^2(\gamma X)
    \;\le\; 1 + \sinh^2(\gamma) / N.

  So ``r = 1 + O(1/N)`` (measured in float64 on Gaussian matrices with
  ``gamma = 1``: ``r - 1`` = 2.1e-7 at 768×3072, 1.9e-6 at 512×512, 0.016
  at 4×8): on hidden-size matrices the transform is Frobenius normalization
  (``normalize_output``) or the identity (otherwise) to within a few parts
  in a million, a few float32 ulps. The paper variant is then
  Frobenius-normalized Nesterov momentum, and the package variant SGD with
  Nesterov momentum. Without ``normalize_input`` the factor depends on
  ``G``'s scale; after one of Jordan's quintics from a unit-norm matrix (the
  paper's Hybrid) :math:`\|X_1\|_F \le 3.4445` (the quintic's slope at 0
  is its largest ratio :math:`f(\sigma)/\sigma` on [0, 1]) and every entry
  is at most :math:`\|X_1\|_2 \le 1.21`, so again ``r = 1 + O(1/N)``:
  Hybrid is one Newton–Schulz step (paper) or Muon without its shape factor
  (package, whose ``r`` is that of the normalized iterate), to within
  ``O(1/N)``.

  **Where orthax departs from the sources.** ``eps_norm`` is relative (in
  units of the matrix's largest magnitude, as in :func:`orthax.orthogonalize`;
  the official code adds ``1e-7`` to the norm): the normalized matrix is then
  invariant to ``G``'s scale, and differs from the official one by a factor
  within ``1e-7`` of 1 for any ``G`` of norm at least 1. The official code
  normalizes a whole tensor at once; here each matrix of a stacked leaf
  (scan layers, experts) is normalized on its own.

  Scale safety: norms are taken of the matrix divided by its largest
  magnitude, and ``r`` as :math:`r^2 = 1 + \mathrm{mean}\,\sinh^2` with the
  ``sinh`` terms scaled by the largest argument, never forming ``cosh`` or
  ``r`` themselves: a finite input never gives NaN or Inf, and without
  ``normalize_input`` a ``G`` whose ``cosh(gamma * G)**2`` overflows float32
  (entries above about 44 / gamma) still gets its output, which is 0 only
  where the exact one is below float32's normal range. A zero matrix gives
  zero; a leaf with a side of 0 an empty update. float16 and bfloat16
  leaves are computed in float32 and returned in their dtype.

  Args:
    gamma: the cosh argument's scale, ``>= 0`` (0 gives ``r = 1``).
    normalize_input: take ``r`` of the Frobenius-normalized matrix ``X``
      (otherwise of ``G`` itself).
    normalize_output: divide ``X`` by ``r`` (otherwise ``G``).
    eps_norm: added to ``||G||_F``, in units of ``max |G|``, ``>= 0``.
    eps: added to ``r`` (which is at least 1), ``>= 0``.
    dimension_numbers: as in :func:`orthax.orthogonalize`; each batch slice
      of a leaf is one matrix (its own ``X`` and ``r``).

  Returns:
    A stateless :class:`optax.GradientTransformation`.

  Raises:
    ValueError: ``gamma``, ``eps_norm`` or ``eps`` negative (at
      construction); at update time, a leaf that is not a matrix under its
      dimension numbers, named by its key path.
    TypeError: a hyperparameter that is not a real number, a flag that is
      not a bool; a leaf that is not a supported float.

  Example:
    >>> import jax, jax.numpy as jnp, optax, orthax
    >>> auon = optax.chain(orthax.momentum(0.95), orthax.cosh_rms_normalize(),
    ...                    orthax.scale_by_shape("muon"))
    >>> hybrid = optax.chain(
    ...     orthax.momentum(0.95), orthax.orthogonalize(coeffs="muon"),
    ...     orthax.cosh_rms_normalize(1.5, normalize_output=False))
    >>> params = {'w': jnp.zeros((12, 12))}
    >>> g = {'w': jax.random.normal(jax.random.key(0), (12, 12))}
    >>> updates, state = auon.update(g, auon.init(params))

  References:
    D. Maity, AuON: A Linear-time Alternative to Orthogonal Momentum Updates,
    2025, arXiv:2509.24320, github.com/ryyzn9/AuON
  """
  transform = "orthax.cosh_rms_normalize"
  gamma = check_hyperparameter(transform, "gamma", gamma, low=0.0)
  normalize_input = check_flag(transform, "normalize_input", normalize_input)
  normalize_output = check_flag(transform, "normalize_output",
                                normalize_output)
  eps_norm = check_hyperparameter(transform, "eps_norm", eps_norm, low=0.0)
  eps = check_hyperparameter(transform, "eps", eps, low=0.0)

  def normalize(view, g):
    del view
    x = (frobenius_normalize(g, eps=eps_norm)
         if normalize_input or normalize_output else None)
    return _divide_by_cosh_rms(x if normalize_output else g,
                               x if normalize_input else g, gamma, eps)

  return optax.GradientTransformation(
      optax.init_empty_state, _matrix_map(transform, normalize,
                                          dimension_numbers))
