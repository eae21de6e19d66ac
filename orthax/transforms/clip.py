"""``orthax.clip_to_quantile``: ROOT's outlier clipping, per matrix."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from orthax._checks import check_hyperparameter, check_number
from orthax.matrices import DimensionNumbersSpec, MatrixView, map_matrices
from orthax.sharded import replicated

__all__ = ["clip_to_quantile"]

_MODES = ("clip", "outliers")
_NAME = "orthax.clip_to_quantile"


def _threshold(sorted_abs: jax.Array, quantile: float, eps) -> jax.Array:
  """``tau`` per row of ``sorted_abs`` (each row ascending): the
  ``quantile`` by linear interpolation between order statistics (NumPy's
  default ``method="linear"``), plus ``eps`` times the row's largest entry.

  The position ``quantile * (n - 1)`` is taken in Python float64, so the
  order statistics are the ones NumPy picks at any ``n`` (``jnp.quantile``
  forms it in the input's precision, inexact in float32 beyond ``n = 2^24``,
  which ROOT's ``(2048, 16384)`` matrices exceed).
  """
  n = sorted_abs.shape[-1]
  position = quantile * (n - 1)
  low = math.floor(position)
  high = min(low + 1, n - 1)
  lo, hi = sorted_abs[..., low], sorted_abs[..., high]
  return lo + (position - low) * (hi - lo) + eps * sorted_abs[..., -1]


def clip_to_quantile(
    quantile: float = 0.9, *, eps: float = 1e-9, mode: str = "clip",
    dimension_numbers: DimensionNumbersSpec = None,
) -> optax.GradientTransformation:
  r"""Clips each matrix's entries at a quantile of their magnitudes (ROOT).

  For each matrix ``X`` (each batch slice of a leaf under its dimension
  numbers) the threshold is

  .. math::
    \tau = Q_q(|X|) + \epsilon \max_{ij} |X_{ij}|,

  with :math:`Q_q` the ``q``-quantile of the ``N`` magnitudes by linear
  interpolation between order statistics (NumPy's ``"linear"`` method, the
  one ROOT's code uses: position ``q (N - 1)`` in the sorted magnitudes), and
  the update is

  * ``"clip"``: :math:`\mathrm{clip}(X, -\tau, \tau)`, ROOT's
    :math:`B = X - T_\tau(X)`: the bulk of the entries kept, the largest
    ``1 - q`` (about 10% at the default) cut down to ``±tau``;
  * ``"outliers"``: the soft threshold :math:`T_\tau(X) = \mathrm{sign}(X)
    \max(|X| - \tau, 0)`, what ``"clip"`` removes (ROOT's ablation).

  The two modes sum to ``X``. ROOT applies ``"clip"`` to its momentum before
  orthogonalizing: ``optax.chain(orthax.momentum(0.95),
  orthax.clip_to_quantile(0.9), orthax.orthogonalize(coeffs="root"),
  orthax.scale_by_shape("rms", rms=0.2), ...)``.

  ``eps`` is relative to the matrix's largest magnitude, so the result is
  positively homogeneous: ``c X`` (``c > 0``) gives ``c`` times the result of
  ``X`` (up to rounding), at any scale, which is what lets ``orthax.momentum``'s average
  (``1 - beta`` times ROOT's sum) give ROOT's update. ROOT's code adds an
  absolute ``1e-9``; for entries far above ``1e-9`` both are the quantile to
  working precision. ``eps`` keeps ``tau > 0`` where more than a fraction
  ``q`` of the entries are zero: the non-zero entries are then clipped to
  ``±eps max|X|`` (their signs) instead of to zero. A zero matrix stays zero.

  The quantile sorts the ``N`` magnitudes of every matrix (``O(N log N)``;
  under a mesh, each device sorts the whole matrix's, gathered);
  ``bfloat16`` and ``float16`` leaves are computed in float32 and returned in
  their dtype. NaN in a matrix makes its result NaN; Inf makes ``tau``
  infinite, so nothing is clipped.

  Args:
    quantile: ``q``, in ``(0, 1]``; a Python or NumPy number (it picks the
      order statistics when the update is traced: list it in
      ``optax.inject_hyperparams``' ``static_args``). ``1`` clips nothing
      (``"outliers"`` is then zero).
    eps: ``> 0``, relative to the largest magnitude (see above).
    mode: ``"clip"`` or ``"outliers"``.
    dimension_numbers: as in :func:`orthax.orthogonalize`: which axes of a
      leaf are its matrices' (the quantile is taken per matrix); ``None``:
      every leaf is a 2-D matrix.

  Returns:
    A stateless :class:`optax.GradientTransformation`. A leaf with a side
    of 0 is returned as it is.

  Raises:
    ValueError: ``quantile`` outside ``(0, 1]``, ``eps <= 0``, unknown
      ``mode`` (at construction); at update time, a leaf that is not a matrix
      under its dimension numbers (the message names its key path and shape).
    TypeError: ``quantile`` or ``eps`` not a real number; at update time, a
      leaf whose dtype is not float16, bfloat16, float32 or float64.

  Example:
    >>> import jax, optax, orthax
    >>> tx = optax.chain(orthax.momentum(0.95), orthax.clip_to_quantile(0.9),
    ...                  orthax.orthogonalize())
    >>> g = {'w': jax.random.normal(jax.random.key(0), (32, 48))}
    >>> updates, _ = tx.update(g, tx.init(g))

  References:
    W. He, K. Han, H. Zhou, H. Chen, Z. Liu, X. Chen, Y. Wang, ROOT: Robust
    Orthogonalized Optimizer for Neural Network Training, 2025,
    arXiv:2511.20626; code: github.com/huawei-noah/noah-research (ROOT/)
  """
  quantile = check_number(_NAME, "quantile", quantile, low=0.0, low_open=True,
                          high=1.0)
  eps = check_hyperparameter(_NAME, "eps", eps, low=0.0, low_open=True)
  if mode not in _MODES:
    raise ValueError(f"{_NAME}: unknown mode {mode!r}; expected one of "
                     f"{_MODES}.")

  def clip(view: MatrixView, x: jax.Array) -> jax.Array:
    if not math.prod(view.shape):
      return x
    m = view.to_matrices(x.astype(jnp.promote_types(x.dtype, jnp.float32)))
    # Sorted whole: an Explicit-sharded matrix (FSDP under jax.make_mesh)
    # cannot be sorted along its sharded axis, so its magnitudes are
    # gathered first (replicated does nothing to unsharded leaves).
    (tau,) = replicated(
        lambda flat: [_threshold(jnp.sort(flat[0], axis=-1), quantile, eps)],
        [jnp.abs(m).reshape(view.batch, -1)], like=[None])
    tau = tau[:, None, None]
    kept = jnp.clip(m, -tau, tau)
    out = kept if mode == "clip" else m - kept
    return view.from_matrices(out).astype(x.dtype)

  def update_fn(updates, state, params=None):
    del params
    return map_matrices(clip, updates, dimension_numbers=dimension_numbers,
                        transform=_NAME), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)
