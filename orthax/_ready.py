"""The ready optimizers' shared machinery: AdamW for the other leaves, and one
table of the keyword arguments they share.

The ready optimizers share most of their keyword arguments: the momentum,
the Newton–Schulz iteration, the shape scale and decay, the routing and
AdamW's settings. Each shared argument is declared once, in the tables
below (:class:`_Arg`: name, default, annotation and the text of its
``Args:`` entry), and checked once, by the builder that consumes it
(:func:`_momentum`, :func:`_orthogonalize`, :func:`_decay` and
:func:`_with_adamw`, through the transforms they build). A method whose
published default differs from the table's gives its own (``defaults=`` of
:func:`_ready`). The decorator :func:`_ready` gives an optimizer the groups it
takes: its public signature is its own arguments followed by the groups'
(keyword-only, with the tables' defaults or the method's), its docstring's ``{shared_args}``
becomes their ``Args:`` entries, each call is bound against that signature
(an unknown or missing argument is a ``TypeError`` naming it), and the body
receives the groups' values as one namespace, ``shared``.

Why a table rather than writing each signature out: Muon's family will have
many members whose thirty-odd shared keywords would otherwise be repeated,
with their defaults and their documentation, in every one, and a default
changed in one place but not another is the kind of drift that nothing
catches. ``inspect.signature``, ``help()``, IPython and Sphinx read the
spliced signature (a test checks it and the docs); a static type checker
sees the decorator's wrapper, ``(*args, **kwargs)``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import re
import textwrap
import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from orthax._checks import check_flag, check_hyperparameter, check_same_shapes
from orthax import routing as routing_lib
from orthax.matrices import MatrixView, check_float
from orthax.routing import ADAMW, MATRIX
from orthax.transforms.momentum import momentum
from orthax.transforms.orthogonalize import orthogonalize
from orthax.transforms.shape import scale_by_shape
from orthax.transforms.weight_decay import (cautious_weight_decay,
                                            scale_by_multipliers)



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
    lr_multipliers: Any = None,
    state_entries: Callable[[MatrixView], int] | None = None,
    labels: tuple[str, str] = (MATRIX, ADAMW),
) -> optax.GradientTransformationExtraArgs:
  """Routes hidden matrices to ``make_matrices(dimension_numbers)`` and every
  other leaf to AdamW (NAdamW with ``adam_nesterov``), by
  :func:`orthax.route` on the params.

  The routes are decided from the params given to ``init``; ``update`` keeps
  them for the same leaves (paths and shapes) and decides afresh only for a
  tree ``init`` never saw (from the updates when it gets no params). The
  update first checks that every gradient has its parameter's shape; the
  AdamW moments of float16 leaves are kept in float32.

  ``lr_multipliers`` (:func:`orthax.scale_by_multipliers`) multiplies every
  leaf's final update, after the partition: the patterns see the whole tree
  (inside it, a pattern for matrices would match nothing among the AdamW
  leaves), and a factor after the learning rate gives the same step as one
  before it (``f * (lr * u)`` and ``lr * (f * u)`` differ by one rounding),
  decay included. ``None`` adds no stage, so the state is the partition's.

  ``labels`` name the partition's two branches in the state (matrices,
  AdamW): :func:`orthax.contrib.muon` uses optax's ``("muon", "adam")``.
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
      mu_dtype=mu_dtype,
      nesterov=check_flag(name, "adam_nesterov", adam_nesterov)))
  make_matrices(None)   # checks the matrix transforms' arguments now

  # The routes each init decided, by the leaves' paths and shapes: update
  # reuses them, so that what init saw (Flax boxes, logical axis names) still
  # counts when update is given plain arrays (MaxText-style: boxed params at
  # init, unboxed in the train step).
  decided: dict[tuple, list[routing_lib.Route]] = {}
  label = dict(zip((MATRIX, ADAMW), labels))

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
        {label[MATRIX]: make_matrices(treedef.unflatten(
            [r.dimension_numbers for r in routes])),
         label[ADAMW]: adamw},
        treedef.unflatten([label[r.kind] for r in routes]))
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

  routed_tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
  if lr_multipliers is None:
    return routed_tx
  return optax.chain(routed_tx, scale_by_multipliers(lr_multipliers))


@dataclasses.dataclass(frozen=True)
class _Arg:
  """A keyword argument that several ready optimizers take.

  Attributes:
    name: the keyword.
    default: its default, the same in every optimizer that takes it
      unless the method's published one differs (``_ready(defaults=)``).
    annotation: its type, as the signature shows it.
    doc: its ``Args:`` entry, without the name.
  """

  name: str
  default: Any
  annotation: str
  doc: str


_BETA, _NESTEROV, _BIAS_CORRECTION, _MU_DTYPE = (
    _Arg("beta", 0.95, "float",
         "decay of the momentum, in ``[0, 1)`` (:func:`orthax.momentum`)."),
    _Arg("nesterov", True, "bool",
         "Nesterov momentum: the update is ``beta * m + (1 - beta) * g`` "
         "rather than the average ``m``."),
    _Arg("bias_correction", False, "bool",
         "divide the momentum by ``1 - beta**t`` (NAdam's form under "
         "Nesterov) as ``optax.contrib.muon`` does; the default keeps "
         "Jordan's uncorrected momentum. The orthogonalization discards a "
         "common factor, so this changes the first steps' direction only "
         "under Nesterov (:func:`orthax.momentum`)."),
    _Arg("mu_dtype", None, "Any",
         "dtype of the momentum (and of AdamW's first moment, as in "
         "``optax.contrib.muon``); ``None`` follows the params, except that "
         "the AdamW moments of float16 params are float32 (in float16 they "
         "underflow and the first step divides by zero)."),
)

_MOMENTUM_ARGS = (_BETA, _NESTEROV, _BIAS_CORRECTION, _MU_DTYPE)

_POLAR_ARGS = (
    _Arg("coeffs", "polar_express", "str | Any",
         "Newton–Schulz preset or coefficients (:func:`orthax.orthogonalize`); "
         "``\"muon\"`` gives Jordan's original quintic."),
    _Arg("steps", None, "int | None",
         "Newton–Schulz steps; ``None`` keeps the preset's."),
    _Arg("preconditioning", None, "str | None",
         "how each matrix is scaled before the first step: ``\"frobenius\"``, "
         "``\"spectral\"``, ``\"schatten\"`` or ``\"aol\"`` "
         "(:func:`orthax.polar.precondition`); ``None`` keeps the preset's."),
    _Arg("norm_margin", None, "float | None",
         "factor on that norm, ``> 0``; ``None`` keeps the preset's (1.02 for "
         "``\"polar_express\"``, 1.0 for explicit coefficients)."),
    _Arg("adaptive", False, "bool | str",
         "multiply each orthogonalized matrix ``O`` by ``<M, O>``, the dual "
         "norm of its input ``M``: ``True`` per matrix, ``\"leaf\"`` once per "
         "leaf (``optax.contrib.muon``'s ``adaptive=True``), ``False`` not at "
         "all."),
    _Arg("gram", "auto", "bool | str",
         "Gram Newton–Schulz: ``\"auto\"`` (where it saves FLOPs), ``True`` or "
         "``False`` (:func:`orthax.orthogonalize`)."),
    _Arg("mesh", None, "jax.sharding.Mesh | jax.sharding.AbstractMesh | None",
         "sharded orthogonalization, each device whole matrices for its "
         "share of the FSDP-sharded parameters (:func:`orthax.orthogonalize`)."),
    _Arg("mesh_axis", None, "str | None",
         "the mesh axis that shards the parameters (FSDP)."),
    _Arg("eps", 1e-7, "float",
         "Newton–Schulz normalization epsilon, ``>= 0``, relative to the "
         "largest entry (:func:`orthax.polar.frobenius_normalize`): the update "
         "does not depend on the gradient's scale."),
    _Arg("compute_dtype", None, "Any",
         "dtype of the iteration (e.g. ``jnp.bfloat16``)."),
)

_SHAPE_ARGS = (
    _Arg("shape_scale", "muon", "str",
         "``\"muon\"`` or ``\"rms\"`` (:func:`orthax.scale_by_shape`)."),
    _Arg("shape_rms", 0.2, "float",
         "the entries' RMS that ``shape_scale=\"rms\"`` gives, ``> 0`` "
         "(``optax.contrib.muon``'s ``consistent_rms``); unused by "
         "``\"muon\"``."),
)

_WEIGHT_DECAY, _WEIGHT_DECAY_MASK, _CAUTIOUS_WEIGHT_DECAY = (
    _Arg("weight_decay", 0.01, "float",
         "decoupled weight decay of the hidden matrices, ``>= 0``, multiplied "
         "by the learning rate (optax's convention)."),
    _Arg("weight_decay_mask", None, "Any",
         "optax mask (tree or callable) restricting it."),
    _Arg("cautious_weight_decay", False, "bool",
         "decay only the entries where the update and the weight agree in "
         "sign (:func:`orthax.cautious_weight_decay`, as in modded-nanogpt's "
         "record runs) rather than all (:func:`optax.add_decayed_weights`)."),
)
_DECAY_ARGS = (_WEIGHT_DECAY, _WEIGHT_DECAY_MASK, _CAUTIOUS_WEIGHT_DECAY)

_MULTIPLIER_ARGS = (
    _Arg("lr_multipliers", None, "Any",
         "per-leaf factors on the step, hidden matrices and AdamW leaves "
         "alike: path patterns, a prefix tree or a callable "
         "(:func:`orthax.scale_by_multipliers`). Each leaf's final update, "
         "its decay included, is multiplied by its factor, the same as "
         "multiplying its learning rate; ``None``: 1 everywhere."),
)

_DESCENT_ARGS = _SHAPE_ARGS + _DECAY_ARGS + _MULTIPLIER_ARGS

_ROUTING_ARGS = (
    _Arg("model", None, "Any",
         "the Flax NNX module that owns the params, if you have one: its "
         "modules' declared features decide the matrices' axes "
         "(:func:`orthax.route`). Not needed for linen or plain trees."),
    _Arg("routing", None, "routing_lib.RoutingSpec",
         "which leaves are matrices and their axes, where the rules "
         "(:mod:`orthax.routing`) should not decide: a tree (a prefix of the "
         "params) of ``\"auto\"``/``\"matrix\"``/``\"adamw\"``/"
         "``MuonDimensionNumbers``, or a callable returning one; ``None`` lets "
         "the rules decide every leaf. An ``optax.contrib.muon`` spec, where "
         "``None`` means AdamW, goes through :func:`orthax.routing.from_optax`. "
         "See :func:`orthax.describe`."),
    _Arg("overrides", None, "Mapping[str, Any] | None",
         "``{path pattern: route}`` on top of the rules and ``routing``, e.g. "
         "``{'*/lm_head/*': 'adamw'}``."),
)

_ADAMW_ARGS = (
    _Arg("adam_learning_rate", None, "optax.ScalarOrSchedule | None",
         "AdamW's learning rate (float or schedule) for the other leaves; "
         "``None`` uses ``learning_rate``, as optax's Muon does."),
    _Arg("adam_b1", 0.9, "float", "AdamW's first-moment decay, in ``[0, 1)``."),
    _Arg("adam_b2", 0.999, "float",
         "AdamW's second-moment decay, in ``[0, 1)``."),
    _Arg("adam_eps", 1e-8, "float",
         "AdamW's epsilon, ``> 0`` (with 0 a zero gradient would give "
         "``0 / 0``)."),
    _Arg("adam_eps_root", 0.0, "float",
         "AdamW's epsilon inside the square root, ``>= 0`` (optax's "
         "``eps_root``)."),
    _Arg("adam_weight_decay", 0.0, "float",
         "AdamW's decoupled weight decay, ``>= 0`` (0 by default: the usual "
         "choice for embeddings, norms and biases)."),
    _Arg("adam_nesterov", False, "bool",
         "NAdamW (:func:`optax.adamw` with ``nesterov=True``, what "
         "``optax.contrib.muon`` gives these leaves) rather than AdamW."),
)

_RAISES_DOC = """
  Raises:
    ValueError: a hyperparameter out of its range (at construction); at
      update time, a gradient whose shape is not its parameter's, a hidden
      matrix that is not a matrix under its dimension numbers, or a state
      that does not match this optimizer (e.g. restored from a checkpoint of
      another configuration), each named by its key path; an
      ``lr_multipliers`` pattern that matches no leaf (at init).
    TypeError: an unknown keyword; a leaf whose dtype is not float16,
      bfloat16, float32 or float64, named by its key path; a hyperparameter
      of the wrong type.
"""

# ``{returns}``: the Returns and Raises sections of a ready optimizer that is
# one ``optax.partition``.
_RETURNS_DOC = """  Returns:
    An :class:`optax.GradientTransformation` (an ``optax.partition``).
""" + _RAISES_DOC

# ``{example: CALL}``: ``orthax.CALL`` built and applied to a small tree of
# one matrix and one bias.
_EXAMPLE = re.compile(r"\{example: ([^{}\n]+)\}")
_EXAMPLE_DOC = """>>> import jax, jax.numpy as jnp, orthax
    >>> params = {{'w': jax.random.normal(jax.random.key(0), (16, 64)),
    ...           'b': jnp.zeros(64)}}
    >>> opt = orthax.{call}
    >>> updates, state = opt.update(params, opt.init(params), params)"""


def _args_doc(args: tuple[_Arg, ...]) -> str:
  """The ``Args:`` entries of ``args``, each on its own wrapped lines."""
  return "".join(
      "\n" + textwrap.fill(f"{a.name}: {a.doc}", width=79,
                           initial_indent=" " * 4, subsequent_indent=" " * 6,
                           break_on_hyphens=False)
      for a in args)


def _ready(*groups: tuple[_Arg, ...], defaults: Mapping[str, Any] | None = None):
  """Decorator: the ready optimizer ``body`` takes the arguments of
  ``groups`` as well as its own.

  ``body`` declares its own arguments and a keyword ``shared``; its docstring
  marks with ``{shared_args}`` where the groups' ``Args:`` entries go (and
  may mark ``{raises}``, ``{returns}`` for the Returns and Raises sections of
  one ``optax.partition``, and ``{example: CALL}`` for the usual example of
  ``orthax.CALL``). The result has the public signature (``body``'s
  arguments but ``shared``, then the groups' as keyword-only ones with their
  defaults, or with ``defaults[name]`` where the method publishes its own),
  binds each call against it and calls ``body`` with the groups' values in a
  namespace (``shared.beta``, ...).
  """
  table = tuple(a for group in groups for a in group)
  defaults = dict(defaults or {})
  unknown = set(defaults) - {a.name for a in table}
  if unknown:
    raise ValueError(f"defaults for keywords outside the groups: {unknown}")

  def decorate(body):
    name = f"orthax.{body.__name__}"
    own = inspect.signature(body)
    signature = own.replace(parameters=[
        *(p for p in own.parameters.values() if p.name != "shared"),
        *(inspect.Parameter(a.name, inspect.Parameter.KEYWORD_ONLY,
                            default=defaults.get(a.name, a.default),
                            annotation=a.annotation)
          for a in table)])

    @functools.wraps(body)
    def ready(*args, **kwargs):
      try:
        bound = signature.bind(*args, **kwargs)
      except TypeError as e:
        raise TypeError(f"{name}: {e}") from None
      bound.apply_defaults()
      values = dict(bound.arguments)
      shared = types.SimpleNamespace(
          **{a.name: values.pop(a.name) for a in table})
      return body(**values, shared=shared)

    ready.__signature__ = signature
    doc = (body.__doc__.replace("{shared_args}", _args_doc(table))
           .replace("{returns}", _RETURNS_DOC).replace("{raises}", _RAISES_DOC))
    ready.__doc__ = _EXAMPLE.sub(
        lambda m: _EXAMPLE_DOC.format(call=m.group(1)), doc)
    return ready

  return decorate


def _values(shared: types.SimpleNamespace,
            *groups: tuple[_Arg, ...]) -> dict[str, Any]:
  """The groups' values in ``shared``, as keyword arguments."""
  return {a.name: getattr(shared, a.name) for group in groups for a in group}


# Builders: each turns the values of one group into the transform that
# consumes them, so that every ready optimizer builds (and checks) a shared
# argument the same way.


def _momentum(shared: types.SimpleNamespace) -> optax.GradientTransformation:
  """:func:`orthax.momentum` from ``_MOMENTUM_ARGS``."""
  return momentum(shared.beta, nesterov=shared.nesterov,
                  bias_correction=shared.bias_correction,
                  mu_dtype=shared.mu_dtype)


def _orthogonalize(shared: types.SimpleNamespace, dims: Any,
                   **overrides: Any) -> optax.GradientTransformation:
  """:func:`orthax.orthogonalize` from ``_POLAR_ARGS`` (whose names are its
  keywords), with a method's own ``overrides`` of them, for matrices of
  dimension numbers ``dims``."""
  return orthogonalize(**{**_values(shared, _POLAR_ARGS), **overrides},
                       dimension_numbers=dims)


def _shape(shared: types.SimpleNamespace,
           dims: Any) -> optax.GradientTransformation:
  """:func:`orthax.scale_by_shape` from ``_SHAPE_ARGS``."""
  return scale_by_shape(shared.shape_scale, rms=shared.shape_rms,
                        dimension_numbers=dims)


def _decay(name: str,
           shared: types.SimpleNamespace) -> optax.GradientTransformation:
  """The hidden matrices' decoupled weight decay from ``_DECAY_ARGS``."""
  weight_decay = check_hyperparameter(name, "weight_decay",
                                      shared.weight_decay, low=0.0)
  decay = (cautious_weight_decay
           if check_flag(name, "cautious_weight_decay",
                         shared.cautious_weight_decay)
           else optax.add_decayed_weights)
  return decay(weight_decay, shared.weight_decay_mask)


def _routed(name: str, learning_rate: optax.ScalarOrSchedule,
            shared: types.SimpleNamespace,
            matrices: Callable[[Any], optax.GradientTransformation],
            ) -> optax.GradientTransformation:
  """Hidden matrices get ``matrices(dimension_numbers)``, the other leaves
  AdamW (:func:`_with_adamw`, from ``_ROUTING_ARGS`` and ``_ADAMW_ARGS``),
  then ``lr_multipliers`` every leaf."""
  return _with_adamw(matrices, name=name, learning_rate=learning_rate,
                     mu_dtype=shared.mu_dtype,
                     lr_multipliers=shared.lr_multipliers,
                     **_values(shared, _ROUTING_ARGS, _ADAMW_ARGS))


def _descent(name: str, learning_rate: optax.ScalarOrSchedule,
             shared: types.SimpleNamespace,
             direction: Callable[[Any], list[optax.GradientTransformation]],
             ) -> optax.GradientTransformation:
  """Muon's skeleton: hidden matrices get ``direction(dims) -> decay ->
  scale_by_learning_rate``, the other leaves AdamW (:func:`_routed`).

  ``direction`` returns the stages that turn a gradient into the step's
  direction (momentum, orthogonalization, normalizations, shape scale);
  they form a chain of their own, so that the state has the same structure
  whatever the stages.
  """
  decay = _decay(name, shared)
  return _routed(name, learning_rate, shared, lambda dims: optax.chain(
      optax.chain(*direction(dims)), decay,
      optax.scale_by_learning_rate(learning_rate)))
