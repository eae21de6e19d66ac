"""``orthax.block_stochastic_rotate``: POET-X's block-stochastic rotations,
as an optimizer."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from orthax._checks import (check_hyperparameter, check_number,
                            check_same_shape, check_state_leaf)
from orthax.matrices import DimensionNumbersSpec, MatrixView, matrix_views

__all__ = ["BlockRotateState", "block_stochastic_rotate", "cayley_neumann",
           "effective_weights", "generator_blocks", "random_permutations",
           "side_blocks"]

_NEUMANN = ("triton", "torch")
_TRANSFORM = "orthax.block_stochastic_rotate"
# The generators act on the weights through products of b terms: TF32 (a
# GPU's default for float32) would round them to 2^-11.
_matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
_einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


class BlockRotateState(NamedTuple):
  """State of :func:`block_stochastic_rotate`.

  Each matrix has two sides, ``left`` (its ``fan_in`` rows) and ``right``
  (its ``fan_out`` columns); the per-side entries are ``(left, right)``
  pairs, ``None`` for a side that is not rotated (a side of size 1, or a
  matrix with no entries).

  Attributes:
    count: steps taken (int32), for learning-rate schedules and merges.
    key: the PRNG key (``uint32[2]``) that draws the next merge's
      permutations.
    base: per leaf, ``W0``: the weights at the last merge, in the leaf's
      shape, float32 (float64 for float64 params); ``None`` for a leaf with
      no entries.
    theta: per leaf, each side's generators: ``(batch, blocks, b (b - 1) /
      2)``, the strict upper triangles (row-major) of the side's skew ``b×b``
      blocks.
    mu: per leaf and side, Adam's first moment of ``theta``'s gradient.
    rms: per leaf and side, the square root of Adam's second moment (kept
      as a root so that no square of a gradient overflows or underflows).
    perms: per leaf and side, the permutation (int32, ``(batch, side)``)
      that groups the side's indices into blocks.
  """

  count: jax.Array
  key: jax.Array
  base: optax.Params
  theta: optax.Updates
  mu: optax.Updates
  rms: optax.Updates
  perms: optax.Updates


def side_blocks(size: int, block_size: int | None) -> int:
  """The block size that one side of ``size`` indices uses.

  The largest divisor of ``size`` not above ``block_size`` (``size`` itself
  when it is at most ``block_size``, or for ``None``); 1 where no divisor
  from 2 to ``block_size`` exists.
  """
  if block_size is None or size <= block_size:
    return size
  return max(d for d in range(1, block_size + 1) if size % d == 0)


def _layout(view: MatrixView, block_size: int | None
            ) -> tuple[int | None, int | None]:
  """Each side's block size, ``None`` where the side is not rotated."""
  if view.batch * view.fan_in * view.fan_out == 0:
    return None, None
  blocks = []
  for name, size in (("fan_in", view.fan_in), ("fan_out", view.fan_out)):
    b = side_blocks(size, block_size)
    if size > 1 and b == 1:
      raise ValueError(
          f"{_TRANSFORM}: leaf {view.path} of shape {view.shape} has a "
          f"{name} side of {size}, which no block size from 2 to "
          f"{block_size} divides; expected a block_size with a divisor of "
          f"{size} at or below it, block_size=None (one block per side), or "
          "the leaf routed to another optimizer.")
    blocks.append(b if b > 1 else None)
  return tuple(blocks)


def _side_shapes(view: MatrixView, blocks) -> tuple[Any, Any]:
  """Per side, the shapes of its generators and of its permutation."""
  theta, perm = [], []
  for size, b in zip((view.fan_in, view.fan_out), blocks):
    theta.append(None if b is None else (view.batch, size // b,
                                         b * (b - 1) // 2))
    perm.append(None if b is None else (view.batch, size))
  return tuple(theta), tuple(perm)


def _swap(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def cayley_neumann(q: jax.Array, *, neumann: str = "triton") -> jax.Array:
  """POET's Cayley–Neumann map of a stack of skew matrices ``q``.

  Both forms approximate the Cayley transform ``(I + Q)(I - Q)^{-1} = I +
  2Q + 2Q^2 + 2Q^3 + ...``:

  * ``"triton"``: ``I + 2Q + 2Q^2 + 2Q^3 + Q^4 = (I + Q)(I + Q + Q^2 +
    Q^3)``, the official GPU kernel's. It equals ``Cayley(Q) (I - Q^4)``,
    so it is off Cayley by at most ``||Q||_2^4`` and its singular values
    are ``1 - lambda^4`` for the eigenvalues ``±i lambda`` of ``Q``.
  * ``"torch"``: ``I + 2Q + 2Q^2 + 2Q^3 + 2Q^4``, the official PyTorch
    fallback's, the series cut after ``Q^4``: it equals ``Cayley(Q) -
    2 Q^5 (I - Q)^{-1}``, off Cayley by at most ``2 ||Q||_2^5``.

  Args:
    q: skew-symmetric matrices, ``(..., b, b)``.
    neumann: ``"triton"`` or ``"torch"``.

  Returns:
    The maps, in ``q``'s shape and dtype.
  """
  q2 = _matmul(q, q)
  q3 = _matmul(q2, q)
  q4 = _matmul(q2, q2)
  eye = jnp.eye(q.shape[-1], dtype=q.dtype)
  return eye + 2 * (q + q2 + q3) + (1 if neumann == "triton" else 2) * q4


def generator_blocks(theta: jax.Array, block: int, *,
                     neumann: str = "triton") -> jax.Array:
  """The rotation blocks ``CN(Q)`` of packed generators.

  Args:
    theta: ``(..., block (block - 1) / 2)``, the strict upper triangles
      (row-major, as ``numpy.triu_indices``) of skew ``block×block``
      matrices ``Q``.
    block: the blocks' size.
    neumann: the map, as in :func:`cayley_neumann`.

  Returns:
    ``(..., block, block)``.
  """
  rows, cols = np.triu_indices(block, 1)
  upper = jnp.zeros((*theta.shape[:-1], block, block), theta.dtype)
  upper = upper.at[..., rows, cols].set(theta)
  return cayley_neumann(upper - _swap(upper), neumann=neumann)


def _gather_rows(x: jax.Array, order: jax.Array) -> jax.Array:
  """``x[:, order]`` for each batch slice of ``x`` ``(batch, s, n)``."""
  return jnp.take_along_axis(x, order[:, :, None], axis=1)


class _Side(NamedTuple):
  """One side's rotation ``S^T diag(blocks) S``, as the left rotation of
  the matrix oriented with that side first: ``S`` picks the rows in the
  order ``perm`` (``(S x)_i = x_{perm_i}``), ``inverse`` undoes it."""

  blocks: jax.Array
  perm: jax.Array
  inverse: jax.Array


def _orient(index: int) -> Callable[[jax.Array], jax.Array]:
  """Side 0 (fan_in, the rows) as it is; side 1 (fan_out) transposed."""
  return (lambda x: x) if index == 0 else _swap


def _sides(theta, perms, inverses, neumann):
  """Each side's :class:`_Side` (``None`` where not rotated) and the
  pullback from its blocks to its generators."""
  out = []
  for index, (t, p, inv) in enumerate(zip(theta, perms, inverses)):
    if t is None:
      out.append((None, None))
      continue
    b = p.shape[-1] // t.shape[-2]
    blocks, pullback = jax.vjp(
        lambda t, b=b: generator_blocks(t, b, neumann=neumann), t)
    out.append((_Side(_orient(index)(blocks), p, inv), pullback))
  return out


def _rotate(index: int, x: jax.Array, side: _Side | None) -> jax.Array:
  """``R x`` (side 0) or ``x P`` (side 1) for a stack ``x`` ``(batch, m,
  n)``; ``P^T = S^T diag(C^T) S`` is a left rotation of ``x^T``."""
  if side is None:
    return x
  o = _orient(index)
  y = o(x)
  batch, s, n = y.shape
  k, b = side.blocks.shape[1:3]
  grouped = _gather_rows(y, side.perm).reshape(batch, k, b, n)
  turned = _einsum("zkij,zkjn->zkin", side.blocks, grouped)
  return o(_gather_rows(turned.reshape(batch, s, n), side.inverse))


def effective_weights(base: jax.Array, theta: tuple[Any, Any],
                      perms: tuple[Any, Any], *,
                      neumann: str = "triton") -> jax.Array:
  """``R W0 P`` for a stack ``base`` ``(batch, m, n)`` of ``W0``.

  Args:
    base: the matrices ``W0``.
    theta: the (left, right) generators, ``(batch, blocks, b (b - 1) / 2)``
      each, as :class:`BlockRotateState` holds them (``None``: that side is
      the identity).
    perms: the (left, right) permutations, ``(batch, m)`` and ``(batch,
      n)``.
    neumann: the map, as in :func:`cayley_neumann`.

  Returns:
    The effective weights, in ``base``'s shape and dtype.
  """
  inverses = [None if p is None else jnp.argsort(p, axis=-1) for p in perms]
  (left, _), (right, _) = _sides(theta, perms, inverses, neumann)
  return _rotate(1, _rotate(0, base, left), right)


def _blocks_cotangent(index: int, g: jax.Array, other: jax.Array,
                      side: _Side) -> jax.Array:
  """``dL/dG`` for ``L = <g, R x>`` with ``x = other`` (the matrix with the
  other side's rotation applied): ``(S g)_k (S x)_k^T`` for each block
  ``k``; transposed for side 1 (the blocks of ``P`` rather than
  ``P^T``)."""
  o = _orient(index)
  batch, s, n = o(g).shape
  k, b = side.blocks.shape[1:3]
  grouped = lambda y: _gather_rows(o(y), side.perm).reshape(batch, k, b, n)
  return o(_einsum("zkin,zkjn->zkij", grouped(g), grouped(other)))


@functools.partial(jax.jit, static_argnums=1)
def random_permutations(key: jax.Array, shapes) -> list[tuple[Any, Any]]:
  """Random permutations of matrices' sides, all drawn at once.

  Each is the order of random 32-bit integers (ties, which the stable sort
  keeps in index order, have probability ``side^2 / 2^33``).

  Args:
    key: a PRNG key.
    shapes: per leaf, a pair (left, right) of shapes ``(batch, side)`` or
      ``None`` (static: a tuple of tuples).

  Returns:
    Per leaf, the pair of int32 permutations of each batch slice's side
    (``None`` where the shape is ``None``).
  """
  total = sum(math.prod(s) for pair in shapes for s in pair if s is not None)
  bits = jax.random.bits(key, (total,), jnp.uint32)
  out, start = [], 0
  for pair in shapes:
    sides = []
    for s in pair:
      if s is not None:
        piece = bits[start:start + math.prod(s)].reshape(s)
        s = jnp.argsort(piece, axis=-1).astype(jnp.int32)
        start += piece.size
      sides.append(s)
    out.append(tuple(sides))
  return out


def _safe_div(x: jax.Array, y: jax.Array) -> jax.Array:
  """``x / y`` where ``y > 0``, else 0 (a zero gradient stays a zero step)."""
  ok = y > 0
  return jnp.where(ok, x / jnp.where(ok, y, 1), 0)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"{_TRANSFORM}: unknown {name} {value!r}; expected one "
                     f"of {choices}.")
  return value


def block_stochastic_rotate(
    learning_rate: optax.ScalarOrSchedule,
    *,
    block_size: int | None = 256,
    merge_every: int = 200,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    lr_scale: float = 0.5,
    neumann: str = "triton",
    seed: int = 0,
    dimension_numbers: DimensionNumbersSpec = None,
) -> optax.GradientTransformation:
  r"""POET-X: trains each weight matrix as block-stochastic rotations of a
  frozen copy, in optimizer form.

  POET reparameterizes a ``(fan_in, fan_out) = (m, n)`` matrix as ``W = R
  W_0 P`` with ``W_0`` frozen and ``R`` (m×m), ``P`` (n×n) orthogonal, so
  training never changes ``W``'s singular values. POET-BS, the form of the
  official code, makes each side block-diagonal after a random permutation,
  ``R = S^T \mathrm{diag}(G_1, \dots, G_{m/b})\, S``, each ``b×b`` block
  ``G_k = CN(Q_k)`` the Cayley–Neumann map (:func:`cayley_neumann`) of a
  skew ``Q_k`` whose ``b (b - 1) / 2`` upper entries are trained, from zero
  (``R = P = I``). This transform keeps ``W_0``, the generators ``theta``
  and the permutations in its state and, for the gradient ``g`` of ``W``:

  1. ``d theta = (dW/d theta)^T g`` at ``W_eff = R(theta) W_0 P(theta)``:
     ``dL/dR = g (W_0 P)^T`` and ``dL/dP = (R W_0)^T g``, taken block by
     block on the permuted rows and columns, then through the map (by
     ``jax.vjp``) to the generators;
  2. an Adam step on ``theta``, as the official ``POETAdamW``: ``mu <- b1 mu
     + (1 - b1) d theta``, ``v <- b2 v + (1 - b2) d theta^2``, ``theta <-
     theta - lr lr_scale sqrt(1 - b2^t) / (1 - b1^t) mu / (sqrt(v) + eps)``,
     with ``t`` counted from the last merge (eps is added to the
     uncorrected ``sqrt(v)``, not to optax's bias-corrected one);
  3. ``W_new = R(theta) W_0 P(theta)`` and the update ``W_new - W`` (use
     :func:`optax.apply_updates`);
  4. every ``merge_every`` steps, a merge: ``W_0 <- W_new``, ``theta <-
     0``, the moments and ``t`` reset, new random permutations. ``W_new``
     itself does not change, so the update at the merge step is the
     un-merged one.

  This is the official training loop's order (``optimizer.step()``, then
  ``merge_if_needed`` after every ``merge_interval``-th step, then the
  moments' reset at the next step). The transform owns the matrices it
  updates: each step sets ``W`` to ``R W_0 P``, so anything else added to
  them (weight decay, another transform's update) is overwritten.

  Each side's blocks have the largest size that divides it and is at most
  ``block_size`` (:func:`side_blocks`): ``block_size`` itself where it
  divides the side, as the official code requires, one block for a side of
  at most ``block_size`` (small models), and an error naming the leaf where
  no size from 2 to ``block_size`` divides it (a prime side larger than
  ``block_size``). ``block_size=None`` rotates each side as one block. A
  side of 1 is not rotated.

  Map: the default ``"triton"`` is what the official code runs on a GPU,
  where its results were obtained; the PyTorch fallback ``"torch"`` is the
  more accurate truncation (its error is ``O(||Q||^5)`` against
  ``O(||Q||^4)``, and its blocks' singular values stay within ``O(||Q||^6)``
  of 1 against ``O(||Q||^4)``). Neither is exactly orthogonal: within a
  merge window the singular values of ``W`` move by the map's error (both
  maps shrink them slightly, never grow them for ``||Q||_2 < 1``), and
  each merge makes that change part of ``W_0``. Measured
  (:func:`orthax.spectrum_drift`: the largest change of a singular value
  over the largest initial one; float32, 128×512 Gaussian ``W`` of std 1
  or 0.02 alike, blocks of 64, the official lr 5e-4 and merges every 200
  steps, 1000 steps, CPU) with Gaussian gradients, which move ``W`` by 21%
  of its norm, and with one fixed gradient, which moves it by 130% (the
  generators grow for 200 steps in one direction)::

    gradients   random    fixed
    triton      2.3e-5    0.066
    torch       1.9e-6    0.022

  Memory: the state holds ``W_0`` (``m n`` numbers, float32 for 16-bit
  params), ``theta`` and its two moments (``3 (m (b_l - 1) + n (b_r - 1)) /
  2``) and the permutations (``m + n`` int32) per matrix. For a 768×3072
  matrix at ``b = 256``, 2.36M + 1.47M numbers, against AdamW's 4.72M. The
  reparameterized POET-X keeps ``W_0`` in place of ``W`` and needs neither
  the copy nor the gradient of ``W``, only ``theta``'s: this form costs
  one more ``m×n`` buffer (and the ``m×n`` gradient) for the same math.

  Args:
    learning_rate: POET's ``poet_lr`` (float or optax schedule of the step
      count); the Adam step on ``theta`` is ``learning_rate * lr_scale``.
    block_size: the largest block size (``>= 2``), or ``None`` for one block
      per side.
    merge_every: steps between merges (``>= 1``).
    b1, b2: Adam's moment decays, in ``[0, 1)``.
    eps: added to ``sqrt(v)``, ``>= 0``; with 0, a zero gradient still gives
      a zero step.
    lr_scale: POET's ``poet_scale``, ``> 0``.
    neumann: ``"triton"`` or ``"torch"`` (:func:`cayley_neumann`).
    seed: seeds the permutations (an integer).
    dimension_numbers: as in :func:`orthax.orthogonalize`; a stacked leaf
      gets its own generators and permutations for each matrix.

  Returns:
    An :class:`optax.GradientTransformation` whose update needs the params.

  Raises:
    ValueError: a hyperparameter out of its range or an unknown ``neumann``
      (at construction); at init or update, a side that no block size from
      2 to ``block_size`` divides; at update, no params, a gradient whose
      shape is not its parameter's, or a state that does not match this
      configuration (another ``block_size`` or model), named by its key
      path.
    TypeError: a hyperparameter of the wrong type; a leaf that is not a
      supported float.

  Example:
    >>> import jax, jax.numpy as jnp, optax, orthax
    >>> from orthax.transforms.block_rotate import block_stochastic_rotate
    >>> tx = block_stochastic_rotate(5e-4, block_size=8)
    >>> params = {'w': jax.random.normal(jax.random.key(0), (16, 32))}
    >>> g = {'w': jax.random.normal(jax.random.key(1), (16, 32))}
    >>> updates, state = tx.update(g, tx.init(params), params)
    >>> new = optax.apply_updates(params, updates)

  References:
    Qiu, Buchholz, Xiao, Dax, Schölkopf, Liu, Reparameterized LLM Training
    via Orthogonal Equivalence Transformation, NeurIPS 2025,
    arXiv:2506.08001; Qiu, Liu, Weller, Shi, Liu, POET-X: Memory-efficient
    LLM Training by Scaling Orthogonal Transformation, ICML 2026,
    arXiv:2603.05500; github.com/Sphere-AI-Lab/poet (``poet_torch``)
  """
  if not callable(learning_rate):
    check_hyperparameter(_TRANSFORM, "learning_rate", learning_rate, low=0.0)
  if block_size is not None:
    block_size = check_number(_TRANSFORM, "block_size", block_size, low=2,
                              integer=True)
  merge_every = check_number(_TRANSFORM, "merge_every", merge_every, low=1,
                             integer=True)
  unit = dict(low=0.0, high=1.0, high_open=True)
  b1 = check_hyperparameter(_TRANSFORM, "b1", b1, **unit)
  b2 = check_hyperparameter(_TRANSFORM, "b2", b2, **unit)
  eps = check_hyperparameter(_TRANSFORM, "eps", eps, low=0.0)
  lr_scale = check_hyperparameter(_TRANSFORM, "lr_scale", lr_scale, low=0.0,
                                  low_open=True)
  neumann = _check_choice("neumann", neumann, _NEUMANN)
  seed = check_number(_TRANSFORM, "seed", seed, integer=True)
  schedule: Callable[[jax.Array], Any] = (
      learning_rate if callable(learning_rate) else lambda _: learning_rate)

  def init_fn(params):
    views = matrix_views(params, dimension_numbers, _TRANSFORM)
    leaves, treedef = jax.tree.flatten(params)
    key, now = jax.random.split(jax.random.PRNGKey(seed))
    base, theta, perm_shapes = [], [], []
    for view, p in zip(views, leaves):
      theta_shapes, perm_shape = _side_shapes(view, _layout(view, block_size))
      dtype = jnp.promote_types(p.dtype, jnp.float32)
      base.append(jnp.asarray(p, dtype) if p.size else None)
      theta.append(tuple(None if s is None else jnp.zeros(s, dtype)
                         for s in theta_shapes))
      perm_shapes.append(perm_shape)
    perms = random_permutations(now, tuple(perm_shapes))
    zeros = lambda: treedef.unflatten(
        [jax.tree.map(jnp.zeros_like, t) for t in theta])
    return BlockRotateState(
        jnp.zeros([], jnp.int32), key, treedef.unflatten(base),
        treedef.unflatten(theta), zeros(), zeros(), treedef.unflatten(perms))

  def update_leaf(view, g, w, base, theta, mu, rms, perms, *, lr, t, merge):
    """One leaf: the update and its new ``(base, theta, mu, rms)``."""
    if base is None:  # no entries
      return jnp.zeros_like(g), (base, theta, mu, rms)
    w0 = view.to_matrices(base)
    inverses = [None if p is None else jnp.argsort(p, axis=-1) for p in perms]
    (left, left_pullback), (right, right_pullback) = _sides(
        theta, perms, inverses, neumann)
    # dL/dR at W = R W0 P is g (W0 P)^T, dL/dP is (R W0)^T g; then through
    # the blocks and the map to the generators
    gx = view.to_matrices(g).astype(base.dtype)
    grad = tuple(None if side is None else pullback(_blocks_cotangent(
        index, gx, _rotate(1 - index, w0, other), side))[0]
                 for index, (side, pullback, other) in enumerate(
                     ((left, left_pullback, right),
                      (right, right_pullback, left))))
    mu = jax.tree.map(lambda m, d: b1 * m + (1 - b1) * d, mu, grad)
    # sqrt(b2 v + (1 - b2) d^2), without forming a square
    rms = jax.tree.map(lambda r, d: jnp.hypot(math.sqrt(b2) * r,
                                              math.sqrt(1 - b2) * d), rms, grad)
    t = t.astype(base.dtype)
    step = lr * lr_scale * jnp.sqrt(1 - b2**t) / (1 - b1**t)
    theta = jax.tree.map(lambda th, m, r: th - step * _safe_div(m, r + eps),
                         theta, mu, rms)
    w_new = view.from_matrices(effective_weights(w0, theta, perms,
                                                 neumann=neumann))
    update = (w_new - w.astype(base.dtype)).astype(w.dtype)
    reset = lambda x: jnp.where(merge, jnp.zeros_like(x), x)
    return update, (jnp.where(merge, w_new, base), jax.tree.map(reset, theta),
                    jax.tree.map(reset, mu), jax.tree.map(reset, rms))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          f"{_TRANSFORM} needs the params: call update(grads, state, params); "
          "it sets the weights to rotations of their last merged value.")
    check_state_leaf(_TRANSFORM, "count", state.count, ())
    check_state_leaf(_TRANSFORM, "key", state.key, (2,))
    count = optax.safe_increment(state.count)
    merge = count % merge_every == 0
    key, now = jax.random.split(state.key)
    scalars = dict(lr=schedule(state.count), merge=merge,
                   t=(count - 1) % merge_every + 1)
    views = matrix_views(updates, dimension_numbers, _TRANSFORM)
    grads, treedef = jax.tree.flatten(updates)
    weights, base, *sides = [treedef.flatten_up_to(x) for x in (
        params, state.base, state.theta, state.mu, state.rms, state.perms)]
    results, perm_shapes = [], []
    for view, g, w, b, *parts in zip(views, grads, weights, base, *sides):
      check_same_shape(_TRANSFORM, view.path, g, w)
      theta_shapes, perm_shape = _side_shapes(view, _layout(view, block_size))
      perm_shapes.append(perm_shape)
      if view.batch * view.fan_in * view.fan_out:
        check_state_leaf(_TRANSFORM, f"{view.path} (base)", b, view.shape)
      for name, part, shapes in zip(("theta", "mu", "rms", "perms"), parts, (
          theta_shapes, theta_shapes, theta_shapes, perm_shape)):
        for side, x, shape in zip(("left", "right"), part, shapes):
          if shape is not None:
            check_state_leaf(_TRANSFORM, f"{view.path} ({name}, {side})", x,
                             shape)
      results.append(update_leaf(view, g, w, b, *parts, **scalars))
    perms = jax.lax.cond(
        merge, lambda: random_permutations(now, tuple(perm_shapes)),
        lambda: sides[-1])
    out = treedef.unflatten([r[0] for r in results])
    new = [treedef.unflatten([r[1][k] for r in results]) for k in range(4)]
    return out, BlockRotateState(count, jnp.where(merge, key, state.key),
                                 *new, treedef.unflatten(perms))

  return optax.GradientTransformation(init_fn, update_fn)
