"""``orthax.spectrum_preserving_rotate``: Pion's two-sided orthogonal update."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from orthax._checks import (check_hyperparameter, check_number,
                            check_same_shape, check_state_leaf)
from orthax.matrices import (DimensionNumbersSpec, MatrixView, map_matrices,
                             matrix_views)
from orthax.polar.reference import singular_values
from orthax.sharded import place_state, replicated, resolve_mesh, sharded_map

__all__ = ["RotateState", "rotate_matrices", "spectrum_preserving_rotate",
           "spectrum_drift"]

_EXPMS = ("cayley", "exact", "taylor2")
_SIDES = ("both", "left", "right", "smaller")
_TRANSFORM = "orthax.spectrum_preserving_rotate"


class RotateState(NamedTuple):
  """State of :func:`spectrum_preserving_rotate`.

  Attributes:
    count: steps taken (int32), for learning-rate schedules and restores.
    mu_left, nu_left: per leaf, Adam moments of the left (fan_in) side's
      skew gradient, shape ``(batch, fan_in, fan_in)``; ``None`` where that
      side is not rotated (and for a matrix with no entries).
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


def _swap(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def _keep(x: jax.Array) -> jax.Array:
  return x


def _safe_div(x: jax.Array, y: jax.Array) -> jax.Array:
  """``x / y`` where ``y > 0``, else 0 (a zero gradient stays a zero step)."""
  ok = y > 0
  return jnp.where(ok, x / jnp.where(ok, y, 1), 0)


def _frobenius(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True))


# Products whose rounding reaches the spectrum: E W - W and the first-order
# step it shares a product with. TF32 (a GPU's default for float32) would
# round them to 2^-11 and walk the singular values by 1e-3 in 2000 steps.
_matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
_MAX_TERMS = 30  # (2^k / k! < 2^-53 of ||x|| by then, for ||y||_2 <= 2)


def _expm_increment(a: jax.Array, h: jax.Array, x: jax.Array) -> jax.Array:
  """``e^{h a} x - x`` for a stack of skew ``a``, by the series on ``x``.

  ``h a`` is split into ``s`` equal substeps of Frobenius norm (a bound on
  the spectral norm) at most 2, and each substep's ``e^y z - z = y z +
  y^2 z / 2 + ...`` is summed term by term on the block ``z`` (products of
  ``a`` with an ``m × n`` block, never ``a`` with itself) until a term falls
  below the dtype's epsilon of the sum.
  """
  eps = jnp.finfo(x.dtype).eps
  theta = jnp.max(h * _frobenius(a))
  substeps = jnp.ceil(jnp.clip(theta / 2, 1, 2.0**16))  # NaN: 1
  substeps = jnp.where(jnp.isfinite(substeps), substeps, 1)
  y = (h / substeps) * a

  def series(z):
    def more(carry):
      k, term, total = carry
      big = _frobenius(term) > eps * _frobenius(total)
      return (k < _MAX_TERMS) & jnp.any(big)

    def add(carry):
      k, term, total = carry
      term = _matmul(y, term) / (k + 1)
      return k + 1, term, total + term

    first = _matmul(y, z)
    return jax.lax.while_loop(more, add, (1, first, first))[2]

  return jax.lax.fori_loop(0, substeps.astype(jnp.int32),
                           lambda _, d: d + series(x + d), jnp.zeros_like(x))


def _increment(a: jax.Array, h: jax.Array, x: jax.Array,
               expm: str) -> jax.Array:
  """``E(h a) @ x - x`` for a stack of skew ``a``.

  Computed as the increment itself (never ``E`` then ``E x - x``), so that
  rounding errors are relative to the step, about ``h ||a|| ||x||``, not to
  ``x``: an error of ``u ||x||`` per step (a ``solve`` forming ``E`` rounds
  with a slight bias) accumulates, step after step, in the singular values.
  """
  if expm == "taylor2":
    ax = _matmul(a, x)
    return h * ax + (0.5 * h * h) * _matmul(a, ax)
  if expm == "cayley":  # E - I = (I - ha/2)^{-1} h a
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    return jnp.linalg.solve(eye - (0.5 * h) * a, h * _matmul(a, x))
  return _expm_increment(a, h, x)


def _with_spectrum(x: jax.Array, spectrum: jax.Array) -> jax.Array:
  u, _, vt = jnp.linalg.svd(x, full_matrices=False)
  return (u * spectrum[:, None, :].astype(x.dtype)) @ vt


def rotate_matrices(
    w: jax.Array, g: jax.Array, moments: tuple[Any, Any, Any, Any],
    spectrum: jax.Array | None, restore: jax.Array | bool, *,
    learning_rate: jax.Array | float, b1: float, b2: float, eps: float,
    rms_scale: float, max_angle: float | None, expm: str,
) -> tuple[jax.Array, tuple[Any, Any, Any, Any]]:
  """One Pion step on a stack of matrices (the math of every leaf).

  Args:
    w, g: the weights and their gradients, ``(batch, fan_in, fan_out)``.
    moments: ``(mu_left, nu_left, mu_right, nu_right)``, ``(batch, fan_in,
      fan_in)`` and ``(batch, fan_out, fan_out)``; a side whose first moment
      is ``None`` is not rotated.
    spectrum: the singular values ``(batch, min(fan_in, fan_out))`` to put
      back when ``restore`` is true, or ``None``.
    restore: scalar bool, used only with ``spectrum``.
    learning_rate, b1, b2, eps, rms_scale, max_angle, expm: as in
      :func:`spectrum_preserving_rotate`.

  Returns:
    ``W_new - W`` in ``w``'s dtype, and the new moments (in their dtypes;
    ``None`` where given ``None``).
  """
  acc = jnp.promote_types(w.dtype, jnp.float32)
  x, gx = w.astype(acc), g.astype(acc)
  # Each side as "left" of an oriented problem: the right side of W is the
  # left side of W^T, with generator A_r^T (E(h A)^T = E(h A^T) for all maps).
  generators, new_moments = [], []
  for side, (mu, nu) in (("left", moments[:2]), ("right", moments[2:])):
    if mu is None:
      new_moments += [mu, nu]
      continue
    p = gx @ _swap(x) if side == "left" else _swap(x) @ gx
    skew = p - _swap(p)  # g W^T - W g^T (W^T g - g^T W): exactly skew
    mu_new = b1 * mu.astype(acc) + (1 - b1) * skew
    nu_new = b2 * nu.astype(acc) + (1 - b2) * skew * skew
    a = -_safe_div(mu_new, jnp.sqrt(nu_new) + eps)
    generators.append((a, _keep) if side == "left" else (_swap(a), _swap))
    new_moments += [mu_new.astype(mu.dtype), nu_new.astype(nu.dtype)]
  first = jnp.zeros_like(x)  # A_l W + W A_r
  for a, orient in generators:
    first = first + orient(_matmul(a, orient(x)))
  step = learning_rate * rms_scale * math.sqrt(x.shape[-2] * x.shape[-1])
  if max_angle is not None:
    step = jnp.minimum(step, max_angle * _frobenius(x))
  h = _safe_div(step, _frobenius(first) + eps)
  delta = jnp.zeros_like(x)  # E_l W E_r - W
  for a, orient in generators:
    delta = delta + orient(_increment(a, h, orient(x + delta), expm))
  if spectrum is not None:
    delta = jax.lax.cond(restore, lambda d: _with_spectrum(x + d, spectrum) - x,
                         lambda d: d, delta)
  return delta.astype(w.dtype), tuple(new_moments)


def _rotates(side: str, sides: str, view: MatrixView) -> bool:
  if view.batch * view.fan_in * view.fan_out == 0:
    return False  # no entries, nothing to rotate
  if sides == "both":
    return True
  if sides == "smaller":
    return side == ("left" if view.fan_in <= view.fan_out else "right")
  return side == sides


def _state_shapes(view: MatrixView, sides: str, restore_every: int | None):
  """Shapes of a leaf's ``mu_l, nu_l, mu_r, nu_r, spectrum`` (None: kept as
  None, an empty subtree: checkpointers such as orbax refuse zero-size
  arrays)."""
  b, m, n = view.batch, view.fan_in, view.fan_out
  left = (b, m, m) if _rotates("left", sides, view) else None
  right = (b, n, n) if _rotates("right", sides, view) else None
  spectrum = (b, min(m, n)) if restore_every and b * m * n else None
  return left, left, right, right, spectrum


def state_entries(view: MatrixView, *, sides: str = "both",
                  restore_every: int | None = None) -> int:
  """How many entries a leaf's state holds (its moments, its spectrum)."""
  return sum(math.prod(s) for s in _state_shapes(view, sides, restore_every)
             if s is not None)


def _part_views(view: MatrixView, parts) -> tuple:
  """How the sharded exchange sees a leaf's parts (W, g, the moments, the
  spectrum) as matrices: W and g through ``view``; a moment ``(batch, k,
  k)`` as the k×k matrices it holds; the spectrum ``(batch, k)`` as 1×k."""
  _, _, *moments, spectrum = parts
  square = lambda x: None if x is None else MatrixView(
      view.path, x.shape, (0,), (1,), (2,))
  row = None if spectrum is None else MatrixView(
      view.path, spectrum.shape, (0,), (), (1,))
  return (view, view, *map(square, moments), row)


def _rotation_flops(m: int, n: int) -> int:
  """Proportional to a step's FLOPs on one m×n matrix (the slot plan's
  cost): the m²n and mn² products (skew gradients, first-order step,
  increments) and the m³ and n³ solves or exponentials."""
  return m * n * (m + n) + m**3 + n**3


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"{_TRANSFORM}: unknown {name} {value!r}; expected one "
                     f"of {choices}.")
  return value


def _moments_dtype(moments_dtype, param_dtype):
  if moments_dtype is None:
    return jnp.promote_types(param_dtype, jnp.float32)
  return moments_dtype


def spectrum_preserving_rotate(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    rms_scale: float = 0.2,
    max_angle: float | None = 0.5,
    expm: str = "cayley",
    sides: str = "both",
    moments_dtype=None,
    restore_every: int | None = None,
    dimension_numbers: DimensionNumbersSpec = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    mesh_axis: str | None = None,
) -> optax.GradientTransformation:
  r"""Pion: rotates each weight matrix on both sides, keeping its singular values.

  For a ``(fan_in, fan_out) = (m, n)`` matrix ``W`` with gradient ``g``, the
  gradient is projected onto each side's Lie algebra of skew-symmetric
  matrices, ``G_l = g W^T - W g^T`` (m×m) and ``G_r = W^T g - g^T W`` (n×n);
  each gets Adam moments (elementwise, no bias correction),
  ``A_s = -m_s / (sqrt(v_s) + eps)`` (still skew), and

  .. math::
    h = \frac{\min(\text{lr}\cdot\text{rms\_scale}\sqrt{mn},\
        \text{max\_angle}\,\|W\|_F)}{\|A_l W + W A_r\|_F + \epsilon},
    \qquad W \leftarrow E(h A_l)\, W\, E(h A_r).

  The first-order change ``h (A_l W + W A_r)`` is orthogonal to ``W`` (a
  rotation keeps ``||W||_F``), so it turns ``W`` by the angle
  ``lr * rms_scale / RMS(W)`` with RMS ``lr * rms_scale``: the paper's step,
  whatever the width. Where that angle would pass ``max_angle`` (small
  weights, or a large learning rate) the step is clamped to it, and the
  first-order update has RMS ``max_angle * RMS(W)`` instead: in all,
  ``min(lr * rms_scale, max_angle * RMS(W))``. Without the clamp, weights of
  RMS 1e-3 at lr 0.02 would ask for a step four times their own size, which
  no rotation can make (it moves ``W`` by at most ``2 ||W||_F``). Pion never
  changes ``||W||_F``, so whether the clamp acts is set by the initial scale
  and the learning rate: at ``rms_scale=0.2`` and lr 0.02 it acts for init
  std below 0.008 (not at GPT-2's 0.02). The rotation moves ``W`` by the
  first-order amount up to a relative second-order term (Cayley at the
  clamp: 0.965 of it for 48×96 Gaussian matrices;
  ``tests/test_rotate.py::test_update_size_is_as_documented`` checks the
  derived bounds and prints the ratio with ``-s``). The transform returns
  the additive update ``W_new - W`` (use :func:`optax.apply_updates`); it
  needs ``params``.

  ``E`` is the rotation built from a skew matrix. ``"cayley"`` (the default)
  ``(I - hA/2)^{-1}(I + hA/2)`` and ``"exact"`` (``e^{hA}``) are orthogonal
  in exact arithmetic: the singular values move only by rounding, a random
  walk of about ``u = 6e-8`` (float32) of the largest one per step, at any
  weight scale. Both compute ``(E - I) W`` without forming ``E`` (Cayley:
  ``(I - hA/2)^{-1} (hA W)``, one LU per side; exact: the series ``hA W +
  (hA)^2 W / 2 + ...`` on ``W``, in substeps of ``||hA||_F <= 2``), so
  rounding is relative to the step, not to ``W`` (forming ``E`` by a float32
  solve rounded with a bias of about ``u/4`` per step, which grew the
  spectrum by 7e-5 over 2000 steps of unit-scale weights), and in full
  float32 precision (``Precision.HIGHEST``: a GPU's default TF32 products
  walked it by 1e-3 in 2000 steps).
  ``"taylor2"`` (the paper's map) ``I + hA + (hA)^2/2`` is orthogonal only
  to fourth order, ``E^T E = I + (hA)^4/4``: each step grows the singular
  values (never shrinks them) by up to ``(h ||A||_2)^4 / 8`` per side, and
  ``h ||A||_2`` is of the order of the turning angle
  ``lr * rms_scale / RMS(W)``. Its drift goes as the fourth power of the
  learning rate over the weights' scale: below rounding for unit-scale
  weights, large at the scales networks are initialized at. Measured
  (:func:`spectrum_drift`: the largest change of a singular value over the
  largest initial one; float32, 48×96 Gaussian ``W`` of std ``s``, 2000
  steps at lr 0.02 with Gaussian gradients, CPU; ``pytest
  tests/test_rotate.py -s -k "preserved or drift"`` prints them)::

    std s     1        0.02     0.005    0.001
    cayley    4.7e-7   4.7e-7   4.7e-7   6.9e-7
    exact     3.5e-7   2.6e-6   4.5e-6   3.8e-6
    taylor2   4.1e-7   0.34     16       82

  (On an H200 GPU, cayley and exact stay within 4e-6 to 9e-6.) Cost per
  step: ``"taylor2"`` two products of the ``(side × side)`` generator with
  ``W`` per side; ``"exact"`` one per term of its series (4 to 6 at the
  angles of real training, more at large ones); ``"cayley"`` one, plus an LU
  solve, which on a GPU is the slow part: for GPT-2-sized matrices several
  times taylor2's step (on CPU, under twice). The default pays that for
  staying orthogonal at any angle at a fixed cost.

  ``restore_every=k`` resets the singular values to the initial ones every
  ``k`` steps (an SVD per matrix; the initial values are kept in the state).

  Memory: the moments are ``2 (m² + n²)`` numbers per matrix (with
  ``sides="both"``) against ``m n`` weights. For GPT-2 small's hidden
  matrices (12 layers of 768×2304, 768×768, 768×3072, 3072×768: 84.9M
  weights) the two moments hold, by ``sides``: ``"both"`` 651M entries
  (7.7× the weights), ``"left"`` 269M, ``"right"`` 382M, ``"smaller"``
  (only the 768 side of each) 56.6M (0.67×); ``moments_dtype=jnp.bfloat16``
  halves the bytes of any of them.

  Args:
    learning_rate: float or optax schedule (of the step count).
    b1, b2: decay of the first and second moments, in ``[0, 1)``.
    eps: added to ``sqrt(v)`` and to the norm in ``h``, ``>= 0``; with 0, a
      zero gradient still gives a zero step.
    rms_scale: target RMS of the first-order update per unit learning rate
      (``> 0``).
    max_angle: the largest angle (radians, ``> 0``) by which a step turns a
      matrix, to first order; ``None``: no clamp (the paper's step).
    expm: ``"cayley"``, ``"exact"`` or ``"taylor2"``.
    sides: ``"both"``, ``"left"`` (fan_in side only), ``"right"`` (fan_out
      side only) or ``"smaller"`` (whichever side is smaller, per matrix).
    moments_dtype: dtype of the moments; ``None``: float32 for float32,
      bfloat16 and float16 params (16-bit moments underflow: ``(1 - b2)
      G^2`` of a small gradient is below float16's range), float64 for
      float64 params.
    restore_every: if set (a positive integer), every that many steps the
      updated matrix's singular values are reset to the initial ones.
    dimension_numbers: as in :func:`orthax.orthogonalize`.
    mesh, mesh_axis: the mesh and axis that shard the parameters (FSDP), as
      in :func:`orthax.orthogonalize`, whose exchange this uses: each device
      rotates whole matrices for its share of them, receiving each one's
      weights, gradient, moments (and spectrum) in one ``all_to_all`` and
      sending the update and new moments back in another; a slot holds
      matrices of one shape only (the step depends on the shape). Without
      them, the axis is read from the params' ``Explicit`` shardings, if
      any. ``init`` shards each matrix's moments and spectrum over that axis
      like its params (under ``Explicit`` axes); a leaf whose parts cannot
      all be cut along a matrix axis is rotated where it is (gathered whole
      unless all its parts are sharded along their first batch axis).

  Returns:
    An :class:`optax.GradientTransformation`. Its update checks that each
    gradient has its parameter's shape, and that the state holds what this
    configuration reads (a checkpoint of another ``sides`` or
    ``restore_every`` is named, not silently used).

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
  if not callable(learning_rate):
    check_hyperparameter(_TRANSFORM, "learning_rate", learning_rate)
  unit = dict(low=0.0, high=1.0, high_open=True)
  hyper = dict(
      b1=check_hyperparameter(_TRANSFORM, "b1", b1, **unit),
      b2=check_hyperparameter(_TRANSFORM, "b2", b2, **unit),
      eps=check_hyperparameter(_TRANSFORM, "eps", eps, low=0.0),
      rms_scale=check_hyperparameter(_TRANSFORM, "rms_scale", rms_scale,
                                     low=0.0, low_open=True),
      max_angle=None if max_angle is None else check_hyperparameter(
          _TRANSFORM, "max_angle", max_angle, low=0.0, low_open=True),
      expm=_check_choice("expm", expm, _EXPMS))
  sides = _check_choice("sides", sides, _SIDES)
  if restore_every is not None:
    restore_every = check_number(_TRANSFORM, "restore_every", restore_every,
                                 low=1, integer=True)
  if moments_dtype is not None:
    moments_dtype = jnp.dtype(moments_dtype)
    if not jnp.issubdtype(moments_dtype, jnp.floating):
      raise TypeError(f"{_TRANSFORM}: moments_dtype must be a floating dtype, "
                      f"got {moments_dtype}.")
  if mesh is not None:  # bad axis names fail here, not at update
    resolve_mesh(mesh, mesh_axis, transform=_TRANSFORM)
  schedule: Callable[[jax.Array], Any] = (
      learning_rate if callable(learning_rate) else lambda _: learning_rate)

  def init_leaf(view, p, sharding):
    *moments, spectrum = _state_shapes(view, sides, restore_every)
    dtype = _moments_dtype(moments_dtype, p.dtype)
    # A new array for each moment: one buffer in two leaves cannot be donated.
    moments = [None if s is None else jnp.zeros(s, dtype) for s in moments]
    if spectrum is not None:  # an SVD needs whole matrices
      spectrum, = replicated(
          lambda x: [singular_values(view.to_matrices(x[0]))], [p], [None])
    return tuple(None if x is None else place_state(x, view, p, sharding)
                 for x in (*moments, spectrum))

  def init_fn(params):
    sharding = resolve_mesh(
        mesh, mesh_axis, matrix_views(params, dimension_numbers, _TRANSFORM),
        jax.tree.leaves(params), transform=_TRANSFORM)
    mu_l, nu_l, mu_r, nu_r, spec = map_matrices(
        lambda view, p: init_leaf(view, p, sharding), params,
        dimension_numbers=dimension_numbers, transform=_TRANSFORM,
        num_outputs=5)
    return RotateState(jnp.zeros([], jnp.int32), mu_l, nu_l, mu_r, nu_r, spec)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          f"{_TRANSFORM} needs the params: call update(grads, state, params); "
          "it rotates the weights themselves.")
    check_state_leaf(_TRANSFORM, "count", state.count, ())
    count = optax.safe_increment(state.count)
    restore = count % restore_every == 0 if restore_every else False
    lr = schedule(state.count)

    def step(parts, lr, restore):  # stacks: W, g, the moments, the spectrum
      w, g, *moments, spectrum = parts
      delta, moments = rotate_matrices(
          w, g, tuple(moments), spectrum, restore, learning_rate=lr, **hyper)
      return [delta, *moments]

    def leaf(view, parts, *scalars):  # whole (or batch-local) matrices
      p, g, *rest = parts
      delta, *moments = step([view.to_matrices(p), view.to_matrices(g), *rest],
                             *scalars)
      return (view.from_matrices(delta), *moments)

    def stacked_step(parts, *scalars):  # the exchange's: spectra (b, 1, k)
      spectrum = parts[-1]
      return step([*parts[:-1], None if spectrum is None else spectrum[:, 0]],
                  *scalars)

    views = matrix_views(updates, dimension_numbers, _TRANSFORM)
    grads, treedef = jax.tree.flatten(updates)
    weights, *states = [treedef.flatten_up_to(t) for t in (
        params, state.mu_left, state.nu_left, state.mu_right, state.nu_right,
        state.spectrum)]
    leaves = []
    for view, g, p, *state_leaves in zip(views, grads, weights, *states):
      check_same_shape(_TRANSFORM, view.path, g, p)
      for name, x, shape in zip(RotateState._fields[1:], state_leaves,
                                _state_shapes(view, sides, restore_every)):
        if shape is not None:
          check_state_leaf(_TRANSFORM, f"{view.path} ({name})", x, shape)
      *moments, spectrum = state_leaves
      leaves.append((p, g, *moments, spectrum if restore_every else None))
    sharding = resolve_mesh(mesh, mesh_axis, views, weights,
                            transform=_TRANSFORM)
    if sharding is None:
      results = [replicated(lambda x, v=view: leaf(v, x, lr, restore),
                            list(parts), [parts[0], *parts[2:6]])
                 for view, parts in zip(views, leaves)]
    else:
      # the update takes W's layout; W, g and the moments travel together
      results = sharded_map(
          stacked_step, lambda vs, xs, *scalars: [
              leaf(v[0], x, *scalars) for v, x in zip(vs, xs)],
          [_part_views(v, x) for v, x in zip(views, leaves)], leaves,
          *sharding, outputs=(0, 2, 3, 4, 5), wide=False, pad=False,
          cost=lambda signature: _rotation_flops(*signature[0]),
          extras=(jnp.asarray(lr), jnp.asarray(restore)))
    out, mu_l, nu_l, mu_r, nu_r = [treedef.unflatten([r[k] for r in results])
                                   for k in range(5)]
    return out, RotateState(count, mu_l, nu_l, mu_r, nu_r, state.spectrum)

  return optax.GradientTransformation(init_fn, update_fn)


def spectrum_drift(params: Any, initial_params: Any, *,
                   dimension_numbers: DimensionNumbersSpec = None) -> Any:
  """Per matrix, the largest change of a singular value, relative to the
  largest initial one.

  ``max_i |s_i - s0_i| / s0_1`` over the (descending) singular values of
  each matrix and each batch slice, for watching Pion's spectrum during
  training. Relative to the largest value, not to each ``s0_i``: rounding
  moves every singular value by about ``u * s0_1``, which divided by a zero
  (or tiny) ``s0_i`` would be noise, not drift. An initial zero matrix is
  measured against the current largest value (1 if it has grown, 0 if it is
  still zero); a matrix with no entries gives 0.

  Args:
    params: current parameters (matrix leaves only, or a sub-tree of them).
    initial_params: the parameters the spectrum should match (same shapes).
    dimension_numbers: as in :func:`orthax.orthogonalize`.

  Returns:
    A tree like ``params`` of float32 (float64 for float64 leaves) scalars.
  """
  transform = "orthax.spectrum_drift"

  def leaf(view, p, p0):
    check_same_shape(transform, view.path, p, p0,
                     names=("current value", "initial value"))
    s = singular_values(view.to_matrices(p))
    s0 = singular_values(view.to_matrices(p0))
    top = jnp.max(s0, axis=-1, initial=0.0, keepdims=True)
    top = jnp.where(top > 0, top, jnp.max(s, axis=-1, initial=0.0,
                                          keepdims=True))
    return jnp.max(_safe_div(jnp.abs(s - s0), top), initial=0.0)

  return map_matrices(leaf, params, initial_params,
                      dimension_numbers=dimension_numbers, transform=transform)
