"""Ready optimizers: orthogonalized updates for hidden matrices, AdamW for the rest."""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from orthax._checks import check_hyperparameter, check_same_shapes
from orthax import routing as routing_lib
from orthax.matrices import MatrixView, check_float
from orthax.routing import ADAMW, MATRIX
from orthax.transforms.momentum import momentum
from orthax.transforms.neuron_normalize import neuron_normalize
from orthax.transforms.orthogonalize import orthogonalize
from orthax.transforms.rotate import spectrum_preserving_rotate, state_entries
from orthax.transforms.shape import scale_by_shape

__all__ = ["muon", "normuon", "pion"]


def _descent(matrix_tx: optax.GradientTransformation, *,
             learning_rate: optax.ScalarOrSchedule, weight_decay: float,
             weight_decay_mask: Any, name: str) -> optax.GradientTransformation:
  """``matrix_tx`` followed by decoupled weight decay and the step size."""
  weight_decay = check_hyperparameter(name, "weight_decay", weight_decay,
                                      low=0.0)
  return optax.chain(
      matrix_tx,
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def _float16_in_float32(
    inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """``inner`` on float32 copies of the float16 leaves, its state included.

  Adam's moments underflow in float16: ``(1 - b2) g**2`` is below float16's
  smallest subnormal (6e-8) for ``|g| < 8e-3`` and ``eps = 1e-8`` rounds to 0,
  so the first step divides by zero. The updates of float16 gradients are
  returned in float16.
  """

  def half(x):
    return jnp.result_type(x) == jnp.float16

  def widen(tree):
    return jax.tree.map(
        lambda x: jnp.asarray(x, jnp.float32) if half(x) else x, tree)

  def init_fn(params):
    return inner.init(widen(params))

  def update_fn(updates, state, params=None):
    out, state = inner.update(widen(updates), state,
                              None if params is None else widen(params))
    narrow = lambda u, g: u.astype(jnp.float16) if half(g) else u
    return jax.tree.map(narrow, out, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


# A matrix whose state is this many times its size is worth a warning: Pion
# holds 2 (m^2 + n^2) entries for m n, 8.5 times at a 1:4 MLP, 131 times at
# GPT-2's (768, 50257) head.
_LARGE_STATE = 16


def _report(name: str, routes, paths, shapes, state_entries) -> None:
  """At init: a one-line summary in the ``orthax`` log, and warnings for
  leaves no rule recognized and for matrices whose state dwarfs them."""
  logging.getLogger("orthax").info("%s: %s", name,
                                   routing_lib.summary(routes, shapes))
  routing_lib.warn_unrecognized(name, routes, paths, shapes)
  if state_entries is None:
    return
  large = []
  for r, p, s in zip(routes, paths, shapes):
    if r.kind == MATRIX and math.prod(s):
      ratio = state_entries(r.view(p, s)) / math.prod(s)
      if ratio > _LARGE_STATE:
        large.append(f"{p} {s} ({ratio:.0f}x)")
  if large:
    warnings.warn(
        f"{name}: the optimizer state of {len(large)} matrices is more than "
        f"{_LARGE_STATE} times their size: {', '.join(large)}. If one is an "
        "embedding or an output head, route it to AdamW (overrides=).",
        stacklevel=3)


def _with_adamw(
    make_matrices: Callable[[Any], optax.GradientTransformation], *,
    name: str, learning_rate: optax.ScalarOrSchedule,
    model: Any, routing: routing_lib.RoutingSpec,
    overrides: Mapping[str, Any] | None,
    adam_learning_rate: optax.ScalarOrSchedule | None,
    adam_b1: float, adam_b2: float, adam_eps: float,
    adam_weight_decay: float, mu_dtype,
    adam_eps_root: float = 0.0, adam_nesterov: bool = False,
    state_entries: Callable[[MatrixView], int] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Routes hidden matrices to ``make_matrices(dimension_numbers)`` and every
  other leaf to AdamW, by :func:`orthax.route` on the params.

  The routes are decided from the params given to ``init``; ``update`` keeps
  them for the same leaves (paths and shapes) and decides afresh only for a
  tree ``init`` never saw (from the updates when it gets no params). The
  update first checks that every gradient has its parameter's shape; the
  AdamW moments of float16 leaves are kept in float32.
  """
  check = functools.partial(check_hyperparameter, name)
  adamw = _float16_in_float32(optax.adamw(
      learning_rate if adam_learning_rate is None else adam_learning_rate,
      b1=check("adam_b1", adam_b1, low=0.0, high=1.0, high_open=True),
      b2=check("adam_b2", adam_b2, low=0.0, high=1.0, high_open=True),
      # eps = 0 would make a zero gradient 0 / 0
      eps=check("adam_eps", adam_eps, low=0.0, low_open=True),
      eps_root=check("adam_eps_root", adam_eps_root, low=0.0),
      weight_decay=check("adam_weight_decay", adam_weight_decay, low=0.0),
      mu_dtype=mu_dtype, nesterov=bool(adam_nesterov)))
  make_matrices(None)   # checks the matrix transforms' arguments now

  # The routes each init decided, by the leaves' paths and shapes: update
  # reuses them, so that what init saw (Flax boxes, logical axis names) still
  # counts when update is given plain arrays (MaxText-style: boxed params at
  # init, unboxed in the train step).
  decided: dict[tuple, list[routing_lib.Route]] = {}

  def routed(tree, *, at_init: bool):
    routes, paths, shapes, treedef = routing_lib.routes_flat(
        tree, model=model, routing=routing, overrides=overrides,
        transform=name)
    key = (tuple(paths), tuple(shapes))
    if at_init:
      decided[key] = routes
    else:
      routes = decided.get(key, routes)
    inner = optax.partition(
        {MATRIX: make_matrices(treedef.unflatten(
            [r.dimension_numbers for r in routes])),
         ADAMW: adamw},
        treedef.unflatten([r.kind for r in routes]))
    return inner, (routes, paths, shapes)

  def init_fn(params):
    inner, info = routed(params, at_init=True)
    _report(name, *info, state_entries)
    return inner.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    check_same_shapes(name, updates, params)
    for kp, g in jax.tree_util.tree_leaves_with_path(updates):
      check_float(jax.tree_util.keystr(kp), g, name)
    inner, _ = routed(updates if params is None else params, at_init=False)
    return inner.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_SHARED_ARGS_DOC = """
    beta: momentum decay (:func:`orthax.momentum`).
    nesterov: Nesterov momentum.
    mu_dtype: dtype of the momentum (and of AdamW's first moment, as in
      ``optax.contrib.muon``); ``None`` follows the params, except that the
      AdamW moments of float16 params are float32 (in float16 they underflow
      and the first step divides by zero).
    coeffs: Newton–Schulz preset or coefficients (:func:`orthax.orthogonalize`);
      ``"muon"`` gives Jordan's original quintic.
    steps: Newton–Schulz steps; ``None`` keeps the preset's.
    gram: Gram Newton–Schulz: ``"auto"`` (where it saves FLOPs), ``True`` or
      ``False`` (:func:`orthax.orthogonalize`).
    mesh, mesh_axis: sharded orthogonalization, each device whole matrices
      for its share of the FSDP-sharded parameters
      (:func:`orthax.orthogonalize`).
    eps: Newton–Schulz normalization epsilon, ``>= 0``, relative to the
      largest entry (:func:`orthax.polar.frobenius_normalize`): the update
      does not depend on the gradient's scale.
    compute_dtype: dtype of the iteration (e.g. ``jnp.bfloat16``).
    shape_scale: ``"muon"`` or ``"rms"`` (:func:`orthax.scale_by_shape`).
    weight_decay: decoupled weight decay of the hidden matrices, ``>= 0``,
      multiplied by the learning rate (optax's convention).
    weight_decay_mask: optax mask (tree or callable) restricting it.
{routing_args}
    adam_learning_rate: AdamW's learning rate (float or schedule) for the
      other leaves; ``None`` uses ``learning_rate``, as optax's Muon does.
    adam_b1, adam_b2, adam_eps: AdamW's moment decays, in ``[0, 1)``, and
      epsilon, ``> 0`` (with 0 a zero gradient would give ``0 / 0``).
    adam_weight_decay: AdamW's decoupled weight decay, ``>= 0`` (0 by
      default: the usual choice for embeddings, norms and biases)."""

_ROUTING_ARGS_DOC = """    model: the Flax NNX module that owns the params, if you have one: its
      modules' declared features decide the matrices' axes
      (:func:`orthax.route`). Not needed for linen or plain trees.
    routing: which leaves are matrices and their axes, where the rules
      (:mod:`orthax.routing`) should not decide: a tree (a prefix of the
      params) of ``"auto"``/``"matrix"``/``"adamw"``/``MuonDimensionNumbers``,
      or a callable returning one; ``None`` lets the rules decide every leaf.
      An ``optax.contrib.muon`` spec, where ``None`` means AdamW, goes
      through :func:`orthax.routing.from_optax`. See :func:`orthax.describe`.
    overrides: ``{path pattern: route}`` on top of the rules and
      ``routing``, e.g. ``{'*/lm_head/*': 'adamw'}``."""

_RAISES_DOC = """
  Raises:
    ValueError: a hyperparameter out of its range (at construction); at
      update time, a gradient whose shape is not its parameter's, a hidden
      matrix that is not a matrix under its dimension numbers, or a state
      that does not match this optimizer (e.g. restored from a checkpoint of
      another configuration), each named by its key path.
    TypeError: a leaf whose dtype is not float16, bfloat16, float32 or
      float64, named by its key path; a hyperparameter of the wrong type.
"""


def _shared_docs(fn):
  """Fills the ``{shared_args}`` and ``{raises}`` marks of ``fn``'s docstring.

  (A docstring must be one literal: one built with ``+`` is no docstring.)
  """
  fn.__doc__ = (fn.__doc__.replace("{shared_args}", _SHARED_ARGS_DOC)
                .replace("{routing_args}", _ROUTING_ARGS_DOC)
                .replace("{raises}", _RAISES_DOC))
  return fn


@_shared_docs
def muon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    beta: float = 0.95,
    nesterov: bool = True,
    mu_dtype=None,
    coeffs: str | Any = "polar_express",
    steps: int | None = None,
    gram: bool | str = "auto",
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    mesh_axis: str | None = None,
    eps: float = 1e-7,
    compute_dtype=None,
    shape_scale: str = "muon",
    weight_decay: float = 0.01,
    weight_decay_mask: Any = None,
    model: Any = None,
    routing: routing_lib.RoutingSpec = None,
    overrides: Mapping[str, Any] | None = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps: float = 1e-8,
    adam_weight_decay: float = 0.0,
) -> optax.GradientTransformation:
  """Muon: orthogonalized momentum for hidden matrices, AdamW for the rest.

  Hidden matrices get ``momentum -> orthogonalize -> scale_by_shape ->
  add_decayed_weights -> scale_by_learning_rate``; every other leaf gets
  :func:`optax.adamw`. Which leaves are hidden matrices, and their batch,
  reduction and output axes, :func:`orthax.route` decides from the params
  (Flax metadata, structure, names: embeddings, heads, norms and biases go
  to AdamW; scanned layers and experts are stacks of matrices; conv kernels
  are ``(kh kw in, out)`` matrices); :func:`orthax.describe` shows it.
  Unlike ``optax.contrib.muon``, the momentum has no bias correction (as in
  Jordan's reference code).

  Args:
    learning_rate: step size of the hidden matrices, a float or an optax
      schedule (0.02 is the usual Muon value with ``shape_scale="muon"``).{shared_args}

  Returns:
    An :class:`optax.GradientTransformation` whose state is an
    ``optax.partition``'s.
{raises}
  Example:
    >>> import jax.numpy as jnp, optax, orthax
    >>> params = {'embedding': jnp.zeros((100, 16)), 'w': jnp.zeros((16, 64)),
    ...           'b': jnp.zeros(64)}
    >>> opt = orthax.muon(learning_rate=0.02, adam_learning_rate=3e-3)
    >>> state = opt.init(params)
    >>> updates, state = opt.update(params, state, params)

  References:
    K. Jordan et al., Muon: An optimizer for hidden layers in neural networks,
    2024, https://kellerjordan.github.io/posts/muon/
  """
  name = "orthax.muon"
  return _with_adamw(
      lambda dims: _descent(optax.chain(
          momentum(beta, nesterov=nesterov, mu_dtype=mu_dtype),
          orthogonalize(coeffs=coeffs, steps=steps, eps=eps,
                        compute_dtype=compute_dtype, gram=gram,
                        mesh=mesh, mesh_axis=mesh_axis,
                        dimension_numbers=dims),
          scale_by_shape(shape_scale, dimension_numbers=dims),
      ), learning_rate=learning_rate, weight_decay=weight_decay,
          weight_decay_mask=weight_decay_mask, name=name),
      name=name, learning_rate=learning_rate, model=model, routing=routing,
      overrides=overrides,
      adam_learning_rate=adam_learning_rate, adam_b1=adam_b1, adam_b2=adam_b2,
      adam_eps=adam_eps, adam_weight_decay=adam_weight_decay,
      mu_dtype=mu_dtype)


@_shared_docs
def normuon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    beta: float = 0.95,
    beta2: float = 0.95,
    neuron_eps: float = 1e-10,
    neuron_axis: str = "output",
    nesterov: bool = True,
    mu_dtype=None,
    coeffs: str | Any = "polar_express",
    steps: int | None = None,
    gram: bool | str = "auto",
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    mesh_axis: str | None = None,
    eps: float = 1e-7,
    compute_dtype=None,
    shape_scale: str = "muon",
    weight_decay: float = 0.01,
    weight_decay_mask: Any = None,
    model: Any = None,
    routing: routing_lib.RoutingSpec = None,
    overrides: Mapping[str, Any] | None = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps: float = 1e-8,
    adam_weight_decay: float = 0.0,
) -> optax.GradientTransformation:
  """NorMuon: Muon with per-neuron normalization, AdamW for the rest.

  Hidden matrices get ``momentum -> orthogonalize -> neuron_normalize ->
  scale_by_shape -> add_decayed_weights -> scale_by_learning_rate``; every
  other leaf gets :func:`optax.adamw` (see :func:`orthax.muon`).

  Args:
    learning_rate: step size of the hidden matrices, a float or an optax
      schedule.
    beta2: decay of the per-neuron second moment
      (:func:`orthax.neuron_normalize`).
    neuron_eps: epsilon added to its square root.
    neuron_axis: ``"output"``, ``"input"`` or ``"larger"``.{shared_args}

  Returns:
    An :class:`optax.GradientTransformation` whose state is an
    ``optax.partition``'s.
{raises}
  Example:
    >>> import jax.numpy as jnp, orthax
    >>> params = {'w': jnp.zeros((16, 64)), 'b': jnp.zeros(64)}
    >>> opt = orthax.normuon(learning_rate=0.02)
    >>> updates, state = opt.update(params, opt.init(params), params)

  References:
    Z. Li et al., NorMuon: Making Muon more efficient and scalable, 2025,
    arXiv:2510.05491
  """
  name = "orthax.normuon"
  return _with_adamw(
      lambda dims: _descent(optax.chain(
          momentum(beta, nesterov=nesterov, mu_dtype=mu_dtype),
          orthogonalize(coeffs=coeffs, steps=steps, eps=eps,
                        compute_dtype=compute_dtype, gram=gram,
                        mesh=mesh, mesh_axis=mesh_axis,
                        dimension_numbers=dims),
          neuron_normalize(beta2, neuron_eps, axis=neuron_axis,
                           dimension_numbers=dims),
          scale_by_shape(shape_scale, dimension_numbers=dims),
      ), learning_rate=learning_rate, weight_decay=weight_decay,
          weight_decay_mask=weight_decay_mask, name=name),
      name=name, learning_rate=learning_rate, model=model, routing=routing,
      overrides=overrides,
      adam_learning_rate=adam_learning_rate, adam_b1=adam_b1, adam_b2=adam_b2,
      adam_eps=adam_eps, adam_weight_decay=adam_weight_decay,
      mu_dtype=mu_dtype)


@_shared_docs
def pion(
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
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    mesh_axis: str | None = None,
    model: Any = None,
    routing: routing_lib.RoutingSpec = None,
    overrides: Mapping[str, Any] | None = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps: float = 1e-8,
    adam_weight_decay: float = 0.0,
) -> optax.GradientTransformation:
  """Pion: spectrum-preserving rotations for hidden matrices, AdamW for the rest.

  Hidden matrices (routed as by :func:`orthax.muon`) are updated by
  :func:`orthax.spectrum_preserving_rotate` (no weight decay: it would change
  the spectrum that Pion keeps); every other leaf by :func:`optax.adamw`.
  ``update`` needs the params.

  Args:
    learning_rate: Pion's step size (float or schedule); the first-order
      update of each matrix has RMS ``learning_rate * rms_scale``, at most
      ``max_angle * RMS(W)`` (a turn of ``W`` by ``max_angle`` radians).
    b1, b2, eps, rms_scale, max_angle, expm, sides, moments_dtype,
      restore_every: see :func:`orthax.spectrum_preserving_rotate`. The
      default map, ``"cayley"``, keeps every singular value to rounding
      (under 1e-6 relative to the largest after 2000 float32 steps, at any
      weight scale); the paper's ``"taylor2"`` grows them by up to
      about ``(lr * rms_scale / RMS(W))^4 / 8`` per step, 34% over 2000
      steps at lr 0.02 for GPT-2's init std 0.02. Moments are float32 for
      16-bit params.
    mesh, mesh_axis: sharded rotation, each device whole matrices for its
      share of the FSDP-sharded parameters, with one exchange each way
      (:func:`orthax.spectrum_preserving_rotate`).
{routing_args}
    adam_learning_rate: AdamW's learning rate; ``None`` uses
      ``learning_rate``.
    adam_b1, adam_b2, adam_eps, adam_weight_decay: AdamW's settings.

  Returns:
    An :class:`optax.GradientTransformation` (an ``optax.partition``).

  Example:
    >>> import jax, jax.numpy as jnp, orthax
    >>> params = {'w': jax.random.normal(jax.random.key(0), (16, 64)),
    ...           'b': jnp.zeros(64)}
    >>> opt = orthax.pion(learning_rate=0.02, adam_learning_rate=3e-3)
    >>> updates, state = opt.update(params, opt.init(params), params)

  References:
    Shi, Li, Qiu, Wen, Buchholz, Liu, Pion: a spectrum-preserving optimizer
    based on orthogonal equivalence transformation, 2026, arXiv:2605.12492
  """
  return _with_adamw(
      lambda dims: spectrum_preserving_rotate(
          learning_rate, b1=b1, b2=b2, eps=eps, rms_scale=rms_scale,
          max_angle=max_angle, expm=expm, sides=sides,
          moments_dtype=moments_dtype,
          restore_every=restore_every, dimension_numbers=dims,
          mesh=mesh, mesh_axis=mesh_axis),
      name="orthax.pion", learning_rate=learning_rate, model=model,
      routing=routing, overrides=overrides,
      state_entries=functools.partial(state_entries, sides=sides,
                                      restore_every=restore_every),
      adam_learning_rate=adam_learning_rate,
      adam_b1=adam_b1, adam_b2=adam_b2, adam_eps=adam_eps,
      adam_weight_decay=adam_weight_decay, mu_dtype=None)
