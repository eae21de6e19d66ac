"""``orthax.cautious_weight_decay`` and ``orthax.scale_by_multipliers``: the
per-leaf steps that come between the update direction and the learning rate."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from orthax._checks import (check_hyperparameter, check_number,
                            check_same_shapes, check_state_leaf)
from orthax._tree import broadcast_prefix
from orthax.routing import by_pattern, path_of

__all__ = ["CautiousWeightDecayState", "cautious_weight_decay",
           "scale_by_multipliers"]

_CWD = "orthax.cautious_weight_decay"
_MUL = "orthax.scale_by_multipliers"


class CautiousWeightDecayState(NamedTuple):
  """State of :func:`cautious_weight_decay` when its rate is a schedule.

  Attributes:
    count: steps taken (int32 scalar, saturating at its maximum): the
      schedule's argument.
  """

  count: jax.Array


def _wide(x: jax.Array) -> jax.Array:
  """``x`` in float32, or float64 when it is already wider."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _decay_leaf(u: jax.Array, p: jax.Array, rate) -> jax.Array:
  """``u + rate * p`` where ``u`` and ``p`` agree in sign (a zero agrees with
  both), computed in float32 (or wider) and rounded once to ``u``'s dtype."""
  # The signs, not the product u * p: in float32 the product of two tiny
  # numbers of opposite sign underflows to -0.0, which passes ``>= 0``.
  agree = jnp.sign(u) * jnp.sign(p) >= 0
  out = _wide(u) + jnp.where(agree, rate * _wide(p), 0.0)
  return out.astype(u.dtype)


def cautious_weight_decay(
    weight_decay: optax.ScalarOrSchedule = 0.0, mask: Any = None,
) -> optax.GradientTransformation:
  r"""Decoupled weight decay applied only where it agrees with the update.

  With :math:`u` the incoming update (the descent direction, before the
  learning rate: the parameters move by :math:`-\eta u`) and :math:`p` the
  parameters, each entry becomes

  .. math::
    u + \lambda \, \mathbb{1}[u \, p \ge 0] \, p,

  so that after :func:`optax.scale_by_learning_rate` the step is
  :math:`p \leftarrow p - \eta (u + \lambda \mathbb{1}[u p \ge 0] p)`.
  Decay is applied where the update already shrinks the weight (same sign)
  and withheld where the update grows it, so it never fights the optimizer;
  nothing is rescaled. A zero on either side counts as agreement (the rule
  is ``>= 0``, as in the paper and in modded-nanogpt's Muon/NorMuon step): a
  weight whose update is exactly zero is decayed; a zero weight has nothing
  to decay. The signs are compared directly, so tiny entries whose product
  would underflow in float32 are still told apart.

  A drop-in for :func:`optax.add_decayed_weights` in a chain::

    optax.chain(..., orthax.cautious_weight_decay(wd),
                optax.scale_by_learning_rate(lr))

  Placed before :func:`orthax.scale_by_multipliers`, a leaf's multiplier
  scales its decay as well as its update (as modded-nanogpt's per-parameter
  ``lr_mul`` does). modded-nanogpt also ties its decay rate to the learning
  rate schedule; give ``weight_decay`` a schedule for that (or wrap this
  transform in :func:`optax.inject_hyperparams`).

  The sum is computed in float32 (float64 for float64 leaves) and rounded
  once to the update's dtype, so bfloat16/float16 updates stay so.

  Args:
    weight_decay: the rate :math:`\lambda`, ``>= 0``, or a schedule (a
      function of the step count, starting at 0, whose values are not
      checked).
    mask: as in :func:`optax.add_decayed_weights`: a tree with the params'
      structure (or a prefix of it) with boolean leaves, or a callable
      returning one from the params; ``False`` leaves are not decayed.

  Returns:
    An :class:`optax.GradientTransformation` whose ``update`` needs the
    params. Its state is :class:`optax.EmptyState` for a constant rate, a
    :class:`CautiousWeightDecayState` for a schedule (inside
    :class:`optax.MaskedState` with a ``mask``).

  Raises:
    ValueError: ``weight_decay < 0`` or not finite (at construction);
      ``update`` without params, or an update whose shape differs from its
      parameter's (naming the leaf).
    TypeError: ``weight_decay`` is neither a real number nor a callable.

  Example:
    >>> import jax.numpy as jnp, optax, orthax
    >>> tx = orthax.cautious_weight_decay(0.5)
    >>> params = {'w': jnp.array([1.0, -1.0, 2.0])}
    >>> u, _ = tx.update({'w': jnp.array([1.0, 1.0, 0.0])}, tx.init(params),
    ...                  params)
    >>> u['w']
    Array([1.5, 1. , 1. ], dtype=float32)

    Under :func:`optax.inject_hyperparams`, name a callable ``mask`` in
    ``static_args`` (otherwise it is taken for a schedule)::

      optax.inject_hyperparams(orthax.cautious_weight_decay,
                               static_args="mask")(0.1, mask=fn)

  References:
    L. Chen, J. Li, K. Liang, B. Su, C. Xie, N. W. Pierse, C. Liang, N. Lao,
    Q. Liu, Cautious Weight Decay, 2025, arXiv:2510.12402 (Algorithm 1).

    K. Jordan et al., modded-nanogpt, 2024-2026,
    https://github.com/KellerJordan/modded-nanogpt (``train_gpt.py``,
    ``NorMuonAndAdam``; record 2025-11-10_CautiousWD).
  """
  scheduled = callable(weight_decay)
  if not scheduled:
    weight_decay = check_hyperparameter(_CWD, "weight_decay", weight_decay,
                                        low=0.0)

  def init_fn(params):
    del params
    if scheduled:
      return CautiousWeightDecayState(jnp.zeros([], jnp.int32))
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          f"{_CWD} needs the params: call update(updates, state, params); "
          "it decays the weights themselves.")
    check_same_shapes(_CWD, updates, params)
    if scheduled:
      check_state_leaf(_CWD, "count", state.count, ())
      rate = weight_decay(state.count)
      state = CautiousWeightDecayState(optax.safe_increment(state.count))
    else:
      rate = weight_decay
    out = jax.tree.map(lambda u, p: _decay_leaf(u, p, rate), updates, params)
    return out, state

  tx = optax.GradientTransformation(init_fn, update_fn)
  return tx if mask is None else optax.masked(tx, mask)


def _check_factors(spec: Any, name: str) -> None:
  """Raises unless every leaf of ``spec`` is a finite number ``>= 0``.

  Only checks: rebuilding a mapping as a tree would sort its keys and lose
  the order that patterns are applied in.
  """
  for kp, factor in jax.tree_util.tree_leaves_with_path(spec):
    check_number(_MUL, f"{name}{jax.tree_util.keystr(kp)}", factor, low=0.0)


def _is_patterns(spec: Any, tree: Any) -> bool:
  """A flat mapping of numbers that is not a prefix of ``tree``'s structure.

  Such a mapping, when it is a prefix, names top-level entries: read as a
  tree it gives each the same factor as the pattern reading would, and also
  covers entries that are subtrees (which a pattern does not match).
  """
  if not isinstance(spec, Mapping) or not all(
      isinstance(v, numbers.Real) for v in spec.values()):
    return False
  try:
    jax.tree_util.tree_structure(spec).flatten_up_to(tree)
  except (ValueError, TypeError):
    return True
  return False


def _factors(spec: Any, tree: Any) -> Any:
  """The multiplier of each leaf of ``tree`` (a float), as a tree like it."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  if _is_patterns(spec, tree):
    factors = [1.0] * len(leaves)
    paths = [path_of(kp) for kp, _ in leaves]
    for i, _, factor in by_pattern(spec, paths, what=_MUL):
      factors[i] = float(factor)
    return treedef.unflatten(factors)
  factors = broadcast_prefix(
      spec, tree, is_leaf=lambda x: isinstance(x, numbers.Real),
      what=f"{_MUL}: multipliers must be a mapping of path patterns to "
      "numbers, a tree that is a prefix of the updates' tree with number "
      "leaves, or a callable returning one; its structure does not fit")
  return treedef.unflatten([float(f) for f in factors])


def scale_by_multipliers(
    multipliers: Mapping[str, float] | Any | Callable[[Any], Any],
) -> optax.GradientTransformation:
  r"""Multiplies each leaf's update by its own factor (per-leaf learning
  rates).

  For learning-rate multipliers per parameter group (modded-nanogpt's
  ``lr_mul``) or per layer (muP-style scales). ``multipliers`` is one of:

  * a mapping of path patterns to factors: :mod:`fnmatch` globs over
    ``'a/b/kernel'`` paths (as in :func:`orthax.describe`; ``*`` also
    crosses ``/``), in order, the last pattern that matches a leaf giving its
    factor; leaves no pattern matches keep 1; a pattern that matches no leaf
    is an error;
  * a tree that is a prefix of the updates' tree, with a factor at each of
    its leaves (applied to the whole subtree below it). A flat mapping whose
    keys are exactly the tree's top-level keys is read this way, which gives
    the same factors as the pattern reading wherever that reading matches;
  * a callable taking the params (the updates when ``update`` gets no
    params: they have the same structure) and returning either of the
    above.

  Factors are Python or NumPy numbers, finite and ``>= 0`` (0 freezes a
  leaf). Each update is multiplied in float32 (float64 for float64 leaves)
  and rounded once to its own dtype.

  Place it before :func:`optax.scale_by_learning_rate`; it composes with a
  learning-rate schedule there (each leaf's step is its factor times the
  scheduled rate) and with :func:`orthax.cautious_weight_decay` before it
  (the factor then scales the decay too)::

    optax.chain(..., orthax.scale_by_multipliers({'*/mlp/*': 2.0}),
                optax.scale_by_learning_rate(schedule))

  Args:
    multipliers: the factors, as above.

  Returns:
    A stateless :class:`optax.GradientTransformation`. ``init`` (given the
    params) and ``update`` check the patterns and factors against the tree.

  Raises:
    ValueError: a factor that is negative or not finite, naming its pattern
      or leaf (at construction for a mapping or tree, at ``init``/``update``
      for a callable's); a pattern that matches no leaf (with examples of
      the paths) or a tree that is not a prefix of the updates (at ``init``
      and ``update``).
    TypeError: a factor that is not a real number.

  Example:
    >>> import jax.numpy as jnp, orthax
    >>> tx = orthax.scale_by_multipliers({'blocks/*': 2.0, '*/mlp/*': 0.5})
    >>> g = {'blocks': {'attn': {'w': jnp.ones(2)}, 'mlp': {'w': jnp.ones(2)}},
    ...      'head': jnp.ones(2)}
    >>> u, _ = tx.update(g, tx.init(g))
    >>> [float(u['blocks']['attn']['w'][0]), float(u['blocks']['mlp']['w'][0]),
    ...  float(u['head'][0])]
    [2.0, 0.5, 1.0]

  References:
    K. Jordan et al., modded-nanogpt, 2024-2026,
    https://github.com/KellerJordan/modded-nanogpt (``train_gpt.py``: the
    ``lr_mul`` and ``per_matrix_lr_mul`` of each parameter).

    G. Yang et al., Tensor Programs V: Tuning Large Neural Networks via
    Zero-Shot Hyperparameter Transfer, 2022, arXiv:2203.03466
  """
  if not callable(multipliers):
    _check_factors(multipliers, "multipliers")

  def factors_of(tree, params):
    spec = multipliers
    if callable(spec):
      spec = spec(tree if params is None else params)
      _check_factors(spec, "multipliers(params)")
    return _factors(spec, tree)

  def init_fn(params):
    if params is not None:
      factors_of(params, params)
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    factors = factors_of(updates, params)
    out = jax.tree.map(lambda u, f: (_wide(u) * f).astype(u.dtype),
                       updates, factors)
    return out, state

  return optax.GradientTransformation(init_fn, update_fn)
