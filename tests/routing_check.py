"""Checks of orthax's routing: the routes, and independently the updates.

An expected route is :class:`Matrix` (the leaf's batch, reduction (fan_in)
and output (fan_out) axes) or :data:`ADAMW`. Expected tables are keyed like
``orthax.routing.by_path``: key names joined by ``'/'``, the ``.value`` of a
linen box or an NNX Variable dropped.

:func:`check_updates` does not ask ``orthax.route``: it builds a gradient
whose every expected matrix slice is well conditioned, runs one jitted step of
the ready optimizer with no routing argument, and reads the routing back from
the update of each leaf.
"""

from __future__ import annotations

import collections
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

import orthax
from orthax.polar import coefficients

Matrix = collections.namedtuple("Matrix", "batch reduction output")
ADAMW = "adamw"

U32 = 2.0**-24  # float32 unit roundoff
LR, ADAM_LR = 0.02, 3e-3  # distinct, so that a leaf's route shows in its step
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8  # orthax's AdamW defaults
# Singular values of each gradient slice, relative to its largest: spread out
# (see _well_conditioned) yet far inside every preset's design interval once
# divided by the Frobenius norm (>= 0.2 / (1.02 sqrt(k)) >= 2.8e-2 for the
# k <= 48 singular values of these models, against 3e-3 at most).
SPREAD = 0.2


def path_string(path) -> str:
  """``'a/b/kernel'`` for a key path, less a box's or Variable's ``.value``."""
  names = []
  for key in path:
    if isinstance(key, jax.tree_util.GetAttrKey):
      if key.name != "value":  # a linen box's or an NNX Variable's array
        names.append(key.name)
    elif isinstance(key, jax.tree_util.DictKey):
      names.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      names.append(str(key.idx))
    else:
      names.append(str(key))
  return "/".join(names)


def arrays_by_path(tree) -> dict:
  """``{path: array}`` for the arrays of ``tree`` (in boxes and Variables)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_string(p): x for p, x in leaves}


def check_routes(params, expected: dict, **route_kwargs) -> None:
  """Fails, listing every difference, unless ``orthax.route`` agrees."""
  got = orthax.routing.by_path(orthax.route(params, **route_kwargs))
  shapes = {p: np.shape(x) for p, x in arrays_by_path(params).items()}
  problems = []
  for path in sorted(set(expected) | set(got)):
    if path not in got:
      problems.append(f"{path}: expected {expected[path]}, missing from routes")
    elif path not in expected:
      problems.append(f"{path}: routed {got[path]}, missing from expected")
    elif _as_expected(got[path]) != _normal(expected[path]):
      problems.append(
          f"{path} {shapes.get(path)}: expected {expected[path]}, got "
          f"{_as_expected(got[path])} (rule {got[path].rule!r})")
  assert not problems, (f"{len(problems)} leaves routed differently:\n  "
                        + "\n  ".join(problems))


def _normal(route):
  # The order of the axes within a group only permutes the rows or columns
  # of the matrix, which changes neither its polar factor nor its scale.
  if route == ADAMW:
    return ADAMW
  return Matrix(*(tuple(sorted(axes)) for axes in route))


def _as_expected(route):
  if route.kind == "adamw":
    return ADAMW
  return _normal(Matrix(route.batch_axes, route.reduction_axes,
                        route.output_axes))


def _groups(shape, matrix: Matrix):
  """The permutation to (batch, reduction, output) and the three sizes."""
  order = (*matrix.batch, *matrix.reduction, *matrix.output)
  assert sorted(order) == list(range(len(shape))), (
      f"expected route {matrix} does not cover the axes of shape {shape}")
  size = lambda axes: math.prod(shape[a] for a in axes)
  return order, (size(matrix.batch), size(matrix.reduction),
                 size(matrix.output))


def to_slices(x, matrix: Matrix) -> np.ndarray:
  """``x`` as a float64 ``(batch, fan_in, fan_out)`` stack."""
  order, sizes = _groups(np.shape(x), matrix)
  return np.transpose(np.asarray(x, np.float64), order).reshape(sizes)


def from_slices(stack: np.ndarray, shape, matrix: Matrix) -> np.ndarray:
  """Inverse of :func:`to_slices`."""
  order, _ = _groups(shape, matrix)
  return np.transpose(stack.reshape([shape[a] for a in order]),
                      np.argsort(order))


def _well_conditioned(rng, n_in: int, n_out: int) -> np.ndarray:
  """``U diag(s) V^T`` with random singular vectors and ``s`` from 1 down to
  ``SPREAD``.

  The spread is what makes a wrong grouping visible. Were the singular
  values equal, the matrix would be its own polar factor (up to scale), and
  so would each block of its columns (one attention head of a tall
  ``(embed, heads * head_dim)`` matrix): orthogonalizing the heads apart
  would give the same update. With distinct singular values and random
  singular vectors, the polar factor of the whole matrix is not made of the
  polar factors of its blocks: the blocks' factors put side by side (heads
  as batch) or the whole matrix's factor cut into blocks (layers flattened
  into fan_in, seen per layer) have singular values spread outside the band,
  or the shape scale is wrong. One case stays hidden: blocks that are wide,
  ``head_dim >= embed``, have orthonormal rows, so side by side they are
  ``sqrt(heads)`` times orthonormal rows, exactly what the whole matrix's
  shape scale gives; the models here keep ``head_dim < embed``.
  """
  k = min(n_in, n_out)
  u, _ = np.linalg.qr(rng.standard_normal((n_in, k)))
  v, _ = np.linalg.qr(rng.standard_normal((n_out, k)))
  s = rng.permutation(np.geomspace(1.0, SPREAD, k))
  return (u * s) @ v.T


def gradients(params, expected: dict, seed: int = 0):
  """A gradient like ``params``: each expected matrix slice well conditioned,
  every other leaf standard normal, all float32."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    route = expected[path_string(path)]
    shape = np.shape(x)
    if route == ADAMW:
      g = rng.standard_normal(shape)
    else:
      _, (batch, n_in, n_out) = _groups(shape, route)
      stack = np.stack([_well_conditioned(rng, n_in, n_out)
                        for _ in range(batch)])
      g = from_slices(stack, shape, route)
    return jnp.asarray(g, jnp.float32)

  return jax.tree_util.tree_map_with_path(leaf, params)


@functools.cache
def _rounding_growth(name: str) -> float:
  """Newton–Schulz's float32 error in a singular value, in units of ``m u``.

  ``preset.band`` holds in exact arithmetic for inputs in ``preset.interval``
  (our gradients, after the momentum's rounding and the normalization's, are
  still deep inside it, see SPREAD): only the rounding of the iteration
  itself moves the result. A step on the normalized wide ``X`` (``k x N``)
  forms ``A = X X^T``, ``A^2`` and ``(bA + cA^2) X`` and adds ``aX``: to first
  order (an inner product of length ``m`` in float32 is off by at most
  ``m u`` of its terms' magnitudes) it moves a singular value ``x`` by at
  most ``m u (|a| x + |b| x^3 + |c| x^5)``, and each later step multiplies
  that by ``|p'|`` at the point the value has reached. Returns the sum over
  the steps, maximized over the design interval (in float64).
  """
  preset = coefficients.get_preset(name)
  x = np.geomspace(*preset.interval, 100_001)
  total = np.zeros_like(x)
  for a, b, c in preset.coeffs:
    # errors made before this step are carried through it by |p'(x)|
    total = total * np.abs(a + 3 * b * x**2 + 5 * c * x**4)
    total += np.abs(a) * x + np.abs(b) * x**3 + np.abs(c) * x**5
    x = a * x + b * x**3 + c * x**5
  return float(total.max())


def _band(name: str, n_in: int, n_out: int, normuon: bool):
  """The preset's band, widened by what float32 rounding can add."""
  preset = coefficients.get_preset(name)
  k, n = min(n_in, n_out), max(n_in, n_out)
  # The products' inner lengths: N for A, 2N for A^2 (A's error twice), k
  # for A^2 itself and for (bA + cA^2) X, plus ~4 additions and scalings.
  tol = (2 * n + 2 * k + 4) * U32 * _rounding_growth(name)
  # The shape scale and learning rate: 3u per entry, so at most
  # 3u ||X||_F <= 3u sqrt(k) hi in the spectral norm.
  tol += 3 * U32 * math.sqrt(k) * preset.band[1]
  if normuon:
    # Its norm-keeping ratio: two float32 sums of n_in n_out squares.
    tol += 2 * n_in * n_out * U32 * preset.band[1]
  return preset.band[0] - tol, preset.band[1] + tol


def _adam_tolerance() -> float:
  """Relative error of float32 AdamW's first step ``g / (|g| + eps)``.

  Bias-corrected, ``m = (1 - b1) g / (1 - b1^1)`` and ``v = (1 - b2) g^2 /
  (1 - b2^1)``; the numerators use ``1 - b`` rounded once (``u``) but the
  corrections ``1 - fl32(b)``, off by up to ``u b / (1 - b)`` relative. So
  ``m`` is within ``u b1 / (1 - b1) + 3u`` of ``g``, ``v`` within
  ``u b2 / (1 - b2) + 4u`` of ``g^2`` (halved by the square root, plus ``u``);
  ``+ eps``, the division and ``* lr`` (with ``lr`` rounded) add ``4u``.
  """
  return U32 * (ADAM_B1 / (1 - ADAM_B1) + ADAM_B2 / (2 * (1 - ADAM_B2)) + 12)


def _check_matrix(update, route, coeffs: str, normuon: bool) -> list[str]:
  stack = to_slices(update, route)
  _, n_in, n_out = stack.shape
  stack = stack / (-LR * math.sqrt(max(1.0, n_out / n_in)))
  lo, hi = _band(coeffs, n_in, n_out, normuon)
  if normuon:
    # NorMuon rescales columns, so its singular values leave the band, but it
    # keeps each slice's Frobenius norm: the RMS of the singular values.
    what = "singular-value RMS"
    values = np.linalg.norm(stack, axis=(1, 2)) / math.sqrt(min(n_in, n_out))
  else:
    what = "singular values"
    values = np.linalg.svd(stack, compute_uv=False)
  problems = []
  if values.size and not (values.min() >= lo and values.max() <= hi):
    problems.append(
        f"{what} of the update / (-lr * shape scale) in [{values.min():.4f}, "
        f"{values.max():.4f}], outside the band [{lo:.4f}, {hi:.4f}]")
  if normuon and stack.size:
    # First step: v_1 = (1 - beta2) * step^2 exactly (v_0 = 0), so each output
    # neuron (column) is divided by its own RMS and then the slice by one
    # factor: every column has the same norm. With neuron_eps = 0 the spread
    # is rounding only: the column's sum of squares over n_in entries (n_in u,
    # halved by the root), ~10 elementwise operations between it and the
    # update, and the measured norm's own entries (u each): (n_in + 32) u.
    norms = np.linalg.norm(stack, axis=1)
    spread = float(np.max(norms.max(1) / norms.min(1) - 1))
    if not spread <= (n_in + 32) * U32:
      problems.append(
          f"output-neuron (column) norms differ by {spread:.2e} relative, "
          "not equal as NorMuon makes them (its neurons are another axis)")
  return problems


def _check_adamw(update, grad) -> list[str]:
  g = np.asarray(grad, np.float64)
  want = -ADAM_LR * g / (np.abs(g) + ADAM_EPS)
  error = np.max(np.abs(np.asarray(update, np.float64) - want) / np.abs(want),
                 initial=0.0)
  if not error <= _adam_tolerance():
    return [f"not AdamW's first step (-adam_lr * g / (|g| + eps)): relative "
            f"error {error:.2e}"]
  return []


def verify_updates(updates, grads, expected: dict, *,
                   optimizer: str = "muon", coeffs: str = "polar_express"):
  """Fails, listing every leaf whose first-step update is not its expected
  route's: ``updates`` of :func:`gradients` ``grads``, by an optimizer made
  with :func:`step_kwargs`."""
  got, grads = arrays_by_path(updates), arrays_by_path(grads)
  assert set(got) == set(expected), (
      f"update paths differ: only updates {sorted(set(got) - set(expected))},"
      f" only expected {sorted(set(expected) - set(got))}")
  problems = []
  for path, route in sorted(expected.items()):
    if route == ADAMW:
      reasons = _check_adamw(got[path], grads[path])
    else:
      reasons = _check_matrix(got[path], route, coeffs,
                              optimizer == "normuon")
    if reasons:
      problems.append(f"{path} {np.shape(got[path])} as {route}: "
                      + "; ".join(reasons))
  assert not problems, (f"{len(problems)} leaves updated unlike their "
                        "expected route:\n  " + "\n  ".join(problems))


def step_kwargs(optimizer: str, **optimizer_kwargs) -> dict:
  """The ready optimizer's arguments for :func:`verify_updates`: no routing
  argument, no weight decay; the plain Newton–Schulz iteration (whose error
  :func:`_newton_schulz_tolerance` bounds; the path does not change the
  routing); for NorMuon ``neuron_eps = 0`` (exactly equal columns)."""
  kwargs = dict(learning_rate=LR, adam_learning_rate=ADAM_LR,
                weight_decay=0.0, gram=False)
  if optimizer == "normuon":
    kwargs["neuron_eps"] = 0.0
  return {**kwargs, **optimizer_kwargs}


def check_updates(params, expected: dict, *, optimizer: str = "muon",
                  **optimizer_kwargs) -> None:
  """Runs one jitted step of ``orthax.<optimizer>`` and checks every leaf's
  update against its expected route (see :func:`verify_updates`)."""
  opt = getattr(orthax, optimizer)(**step_kwargs(optimizer,
                                                 **optimizer_kwargs))
  grads = gradients(params, expected)
  updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
  verify_updates(updates, grads, expected, optimizer=optimizer,
                 coeffs=optimizer_kwargs.get("coeffs", "polar_express"))
