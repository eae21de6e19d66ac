"""``orthax.spectrum_preserving_rotate``: Pion's two-sided orthogonal update."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from orthax.matrices import DimensionNumbersSpec, MatrixView, map_matrices
from orthax.polar.reference import singular_values

__all__ = ["RotateState", "spectrum_preserving_rotate", "spectrum_drift"]

_EXPMS = ("taylor2", "cayley", "exact")
_SIDES = ("both", "left", "right", "smaller")


class RotateState(NamedTuple):
  """State of :func:`spectrum_preserving_rotate`.

  Attributes:
    count: steps taken (int32), for learning-rate schedules and restores.
    mu_left, nu_left: per leaf, Adam moments of the left (fan_in) side's
      skew gradient, shape ``(batch, fan_in, fan_in)``; ``None`` where that
      side is not rotated.
    mu_right, nu_right: the same for the right (fan_out) side.
    spectrum: per leaf, the initial singular values ``(batch, min(fan_in,
      fan_out))`` when ``restore_every`` is set, else ``None``.
  """

  count: jax.Array
  mu_left: optax.Updates
  nu_left: optax.Updates
  mu_right: optax.Updates
  nu_right: optax.Updates
  spectrum: optax.Updates


def _skew_exp(a: jax.Array, h: jax.Array, expm: str) -> jax.Array:
  """An orthogonal(ish) matrix from the skew-symmetric ``h * a`` (batched)."""
  eye = jnp.eye(a.shape[-1], dtype=a.dtype)
  ha = h * a
  if expm == "taylor2":
    return eye + ha + 0.5 * (ha @ ha)
  if expm == "cayley":
    return jnp.linalg.solve(eye - 0.5 * ha, eye + 0.5 * ha)
  return jax.vmap(jax.scipy.linalg.expm)(ha)


def _uses(side: str, sides: str, view: MatrixView) -> bool:
  if sides == "both":
    return True
  if sides == "smaller":
    smaller = "left" if view.fan_in <= view.fan_out else "right"
    return side == smaller
  return side == sides


def spectrum_preserving_rotate(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    rms_scale: float = 0.2,
    expm: str = "taylor2",
    sides: str = "both",
    moments_dtype=None,
    restore_every: int | None = None,
    dimension_numbers: DimensionNumbersSpec = None,
) -> optax.GradientTransformation:
  r"""Pion: rotates each weight matrix on both sides, keeping its singular values.

  For a ``(fan_in, fan_out) = (m, n)`` matrix ``W`` with gradient ``g``, the
  gradient is projected onto each side's Lie algebra of skew-symmetric
  matrices, ``G_l = g W^T - W g^T`` (m×m) and ``G_r = W^T g - g^T W`` (n×n);
  each gets Adam moments (elementwise, no bias correction),
  ``A_s = -m_s / (sqrt(v_s) + eps)`` (still skew), and

  .. math::
    \alpha = \frac{\text{rms\_scale}\sqrt{mn}}{\|A_l W + W A_r\|_F + \epsilon},
    \quad h = \text{lr}\cdot\alpha, \quad
    W \leftarrow E(h A_l)\, W\, E(h A_r),

  so that the first-order change ``h (A_l W + W A_r)`` has RMS
  ``lr * rms_scale`` whatever the width. The transform returns the additive
  update ``W_new - W`` (use :func:`optax.apply_updates`); it needs ``params``.

  ``E`` is the rotation built from a skew matrix: ``"taylor2"`` (the paper's
  default) ``I + hA + (hA)^2/2`` is orthogonal to fourth order
  (``E^T E = I + (hA)^4/4``), so singular values creep slowly;
  ``"cayley"`` ``(I - hA/2)^{-1}(I + hA/2)`` and ``"exact"``
  (``jax.scipy.linalg.expm``) are orthogonal up to rounding. Measured drift
  (max relative change of any singular value, float32, 48×96, 300 steps at
  lr 0.02 with random gradients): taylor2 3.7e-5, cayley 6.1e-6, exact
  5.4e-6 (``tests/test_rotate.py`` bounds them). ``restore_every=k``
  resets the singular values to the initial ones every ``k`` steps (an SVD
  per matrix; the initial values are kept in the state).

  Memory: the moments are ``2 (m² + n²)`` numbers per matrix (with
  ``sides="both"``) against ``m n`` weights. For GPT-2 small's hidden
  matrices (12 layers of 768×2304, 768×768, 768×3072, 3072×768: 84.9M
  weights) the two moments hold, by ``sides``: ``"both"`` 651M entries
  (7.7× the weights), ``"left"`` 269M, ``"right"`` 382M, ``"smaller"``
  (only the 768 side of each) 56.6M (0.67×); ``moments_dtype=jnp.bfloat16``
  halves the bytes of any of them.

  Args:
    learning_rate: float or optax schedule (of the step count).
    b1, b2: decay of the first and second moments.
    eps: added to ``sqrt(v)`` and to the norm in ``alpha``.
    rms_scale: target RMS of the first-order update per unit learning rate.
    expm: ``"taylor2"``, ``"cayley"`` or ``"exact"``.
    sides: ``"both"``, ``"left"`` (fan_in side only), ``"right"`` (fan_out
      side only) or ``"smaller"`` (whichever side is smaller, per matrix).
    moments_dtype: dtype of the moments; ``None`` follows the params.
    restore_every: if set, every that many steps the updated matrix's
      singular values are reset to the initial ones.
    dimension_numbers: as in :func:`orthax.orthogonalize`.

  Returns:
    An :class:`optax.GradientTransformation`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, orthax
    >>> tx = orthax.spectrum_preserving_rotate(0.02)
    >>> params = {'w': jax.random.normal(jax.random.key(0), (16, 32))}
    >>> g = {'w': jax.random.normal(jax.random.key(1), (16, 32))}
    >>> updates, state = tx.update(g, tx.init(params), params)
    >>> new = optax.apply_updates(params, updates)

  References:
    Shi, Li, Qiu, Wen, Buchholz, Liu, Pion: a spectrum-preserving optimizer
    based on orthogonal equivalence transformation, 2026, arXiv:2605.12492
  """
  if expm not in _EXPMS:
    raise ValueError(f"Unknown expm {expm!r}; expected one of {_EXPMS}.")
  if sides not in _SIDES:
    raise ValueError(f"Unknown sides {sides!r}; expected one of {_SIDES}.")
  if restore_every is not None and restore_every < 1:
    raise ValueError(f"restore_every must be positive, got {restore_every}.")
  transform = "orthax.spectrum_preserving_rotate"
  schedule = learning_rate if callable(learning_rate) else (
      lambda _: learning_rate)

  def init_leaf(view, p):
    # None (an empty subtree) where a side or the spectrum is not kept:
    # checkpointers such as orbax refuse zero-size arrays.
    dtype = p.dtype if moments_dtype is None else jnp.dtype(moments_dtype)
    left = (jnp.zeros((view.batch, view.fan_in, view.fan_in), dtype)
            if _uses("left", sides, view) else None)
    right = (jnp.zeros((view.batch, view.fan_out, view.fan_out), dtype)
             if _uses("right", sides, view) else None)
    spectrum = singular_values(view.to_matrices(p)) if restore_every else None
    return left, left, right, right, spectrum

  def init_fn(params):
    mu_l, nu_l, mu_r, nu_r, spec = map_matrices(
        init_leaf, params, dimension_numbers=dimension_numbers,
        transform=transform, num_outputs=5)
    return RotateState(jnp.zeros([], jnp.int32), mu_l, nu_l, mu_r, nu_r, spec)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          f"{transform} needs the params: call update(grads, state, params); "
          "it rotates the weights themselves.")
    count = optax.safe_increment(state.count)
    lr = schedule(state.count)

    def leaf(view, g, p, mu_l, nu_l, mu_r, nu_r, s0):
      acc = jnp.promote_types(p.dtype, jnp.float32)
      w = view.to_matrices(p).astype(acc)
      g = view.to_matrices(g).astype(acc)
      wt, gt = jnp.swapaxes(w, -1, -2), jnp.swapaxes(g, -1, -2)
      first = jnp.zeros_like(w)
      rot = {}
      moments = []
      for side, mu, nu, grad in (
          ("left", mu_l, nu_l, lambda: g @ wt - w @ gt),
          ("right", mu_r, nu_r, lambda: wt @ g - gt @ w)):
        if not _uses(side, sides, view):
          moments += [mu, nu]
          continue
        gs = grad()
        mu_new = b1 * mu.astype(acc) + (1 - b1) * gs
        nu_new = b2 * nu.astype(acc) + (1 - b2) * gs * gs
        a = -mu_new / (jnp.sqrt(nu_new) + eps)
        rot[side] = a
        first = first + (a @ w if side == "left" else w @ a)
        moments += [mu_new.astype(mu.dtype), nu_new.astype(nu.dtype)]
      norm = jnp.sqrt(jnp.sum(first * first, axis=(-2, -1), keepdims=True))
      h = lr * rms_scale * jnp.sqrt(float(view.fan_in * view.fan_out)) / (
          norm + eps)
      new = w
      if "left" in rot:
        new = _skew_exp(rot["left"], h, expm) @ new
      if "right" in rot:
        new = new @ _skew_exp(rot["right"], h, expm)
      if restore_every:
        def restore(x):
          u, _, vt = jnp.linalg.svd(x, full_matrices=False)
          return (u * s0[:, None, :].astype(acc)) @ vt
        new = jax.lax.cond(count % restore_every == 0, restore, lambda x: x,
                           new)
      out = view.from_matrices(new - w).astype(p.dtype)
      return (out, *moments)

    out, mu_l, nu_l, mu_r, nu_r = map_matrices(
        leaf, updates, params, state.mu_left, state.nu_left, state.mu_right,
        state.nu_right, state.spectrum, dimension_numbers=dimension_numbers,
        transform=transform, num_outputs=5)
    return out, RotateState(count, mu_l, nu_l, mu_r, nu_r, state.spectrum)

  return optax.GradientTransformation(init_fn, update_fn)


def spectrum_drift(params: Any, initial_params: Any, *,
                   dimension_numbers: DimensionNumbersSpec = None) -> Any:
  """Per matrix, the largest relative change of a singular value.

  ``max_i |s_i - s0_i| / max(s0_i, tiny)`` over the singular values of each
  matrix (and of each batch slice), for watching Pion's spectrum during
  training.

  Args:
    params: current parameters (matrix leaves only, or a sub-tree of them).
    initial_params: the parameters the spectrum should match.
    dimension_numbers: as in :func:`orthax.orthogonalize`.

  Returns:
    A tree like ``params`` of float32 scalars.
  """

  def leaf(view, p, p0):
    s = singular_values(view.to_matrices(p))
    s0 = singular_values(view.to_matrices(p0))
    tiny = jnp.finfo(s0.dtype).tiny
    return jnp.max(jnp.abs(s - s0) / jnp.maximum(s0, tiny))

  return map_matrices(leaf, params, initial_params,
                      dimension_numbers=dimension_numbers,
                      transform="orthax.spectrum_drift")
