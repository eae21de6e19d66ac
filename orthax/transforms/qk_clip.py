"""``orthax.qk_clip``: MuonClip's per-head rescaling of queries and keys."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from orthax._checks import check_hyperparameter, check_number, check_same_shape
from orthax.matrices import check_float
from orthax.routing import path_of

__all__ = ["QKClipState", "qk_clip"]

_TRANSFORM = "orthax.qk_clip"
_ROLES = ("q", "k", "q_rope", "k_rope")
# The projections found by name when roles=None: Flax's attention modules
# (query, key), Hugging Face's (q_proj, k_proj), LLaMA's (wq, wk), and the
# rotary parts of an MLA layer stored as their own projections.
_NAMES = {"query": "q", "q_proj": "q", "wq": "q", "q": "q",
          "key": "k", "k_proj": "k", "wk": "k", "k": "k",
          "q_rope": "q_rope", "k_rope": "k_rope"}


class QKClipState(NamedTuple):
  """State of :func:`qk_clip`.

  Attributes:
    clipped_heads: the number of query heads (over every attention module
      and stacked slice) whose max logit was above the threshold at the last
      update, int32: a metric; the update does not read it.
  """

  clipped_heads: jax.Array


@dataclasses.dataclass(frozen=True)
class _Leaf:
  """A query or key parameter: its index among the params' leaves, key path
  (``jax.tree_util.keystr``), role and attention module (names)."""

  index: int
  path: str
  role: str
  module: tuple[str, ...]


def _split(kp) -> tuple[str, ...]:
  path = path_of(kp)
  return tuple(path.split("/")) if path else ()


def _check_roles(roles: Any) -> None:
  """Raises unless ``roles`` is ``None`` or a mapping to known roles."""
  if roles is not None and not isinstance(roles, Mapping):
    raise TypeError(
        f"{_TRANSFORM}: roles must be None (find the projections by name) or "
        "a mapping from path patterns of the projections ('h/*/attn/query') "
        f"to roles {_ROLES} (or None); got {type(roles).__name__}.")
  for pattern, role in (roles or {}).items():
    if role is not None and role not in _ROLES:
      raise ValueError(f"{_TRANSFORM}: roles[{pattern!r}] is {role!r}; "
                       f"expected one of {_ROLES} or None.")


def _find_roles(params_kps: list, roles: Mapping[str, Any] | None
                ) -> list[_Leaf]:
  """Each leaf under a query or key projection, with its role and module.

  The projection is the deepest node of the leaf's path (the leaf itself
  included) that ``roles`` names: a key of ``_NAMES`` when ``roles`` is
  ``None``, else the last pattern of ``roles`` that matches the node's
  ``'a/b/query'`` path; its parent is the attention module.
  """
  used = set()

  def role_of(names):
    for depth in range(len(names), 0, -1):
      if roles is None:
        if names[depth - 1] in _NAMES:
          return _NAMES[names[depth - 1]], names[:depth - 1]
        continue
      node = "/".join(names[:depth])
      hits = [p for p in roles if fnmatch.fnmatchcase(node, p)]
      if hits:
        used.add(hits[-1])
        return roles[hits[-1]], names[:depth - 1]
    return None, None

  found = []
  for i, kp in enumerate(params_kps):
    role, module = role_of(_split(kp))
    if role is not None:
      found.append(_Leaf(i, jax.tree_util.keystr(kp), role, module))
  unused = [p for p in (roles or {}) if p not in used]
  if unused:
    raise ValueError(
        f"{_TRANSFORM}: roles pattern {unused[0]!r} matches no projection; "
        "paths look like " + ", ".join(
            path_of(kp) for kp in params_kps[:6]))
  return found


def _module_logits(leaves: list[_Leaf], max_logits: Any
                   ) -> dict[tuple[str, ...], jax.Array]:
  """Each attention module's per-head max logits: the max over the entries
  of ``max_logits`` under the module's path (each entry belongs to the
  deepest module above it)."""
  modules = {leaf.module for leaf in leaves}
  entries: dict[tuple[str, ...], list] = {m: [] for m in modules}
  for kp, s in jax.tree_util.tree_leaves_with_path(max_logits):
    names = _split(kp)
    owners = [m for m in modules if names[:len(m)] == m]
    where = f"max_logits{jax.tree_util.keystr(kp)}"
    if not owners:
      raise ValueError(
          f"{_TRANSFORM}: {where} (shape {jnp.shape(s)}) is under no "
          "attention module whose query and key projections were found (the "
          "modules: " + (", ".join("/".join(m) or "(the root)"
                                   for m in sorted(modules)) or "none") +
          "); its heads would go unclipped. Name the projections with "
          "roles=.")
    check_float(where, s, _TRANSFORM)
    if jnp.ndim(s) < 1:
      raise ValueError(f"{_TRANSFORM}: {where} is a scalar; expected one max "
                       "logit per head, shape (..., heads).")
    entries[max(owners, key=len)].append((where, s))
  out = {}
  for m in modules:
    first = next(leaf.path for leaf in leaves if leaf.module == m)
    if not entries[m]:
      raise ValueError(
          f"{_TRANSFORM}: no max_logits for the attention module "
          f"'{'/'.join(m) or '(the root)'}' of leaf {first}: pass its per-head "
          "max logits under that path (e.g. sown by the module).")
    shapes = {jnp.shape(s) for _, s in entries[m]}
    if len(shapes) > 1:
      raise ValueError(
          f"{_TRANSFORM}: the max_logits of module '{'/'.join(m)}' have "
          f"different shapes: " + ", ".join(
              f"{w} {jnp.shape(s)}" for w, s in entries[m]))
    out[m] = jnp.stack([s for _, s in entries[m]]).max(axis=0)
  return out


def _head_extent(leaf: _Leaf, u: jax.Array, s: jax.Array,
                 head_axis: int) -> tuple[int, int]:
  """``(axis, size)``: the leaf's head axis and its length, after checking
  that the leaf's leading axes are the max logits' stacked ones."""
  shape, stack = jnp.shape(u), jnp.shape(s)[:-1]
  where = f"{_TRANSFORM}: leaf {leaf.path} ({leaf.role}) of shape {shape}"
  if not -len(shape) <= head_axis < len(shape):
    raise ValueError(f"{where} has no axis head_axis={head_axis}.")
  axis = head_axis % len(shape)
  if axis < len(stack) or shape[:len(stack)] != stack:
    raise ValueError(
        f"{where}: its module's max_logits have shape {jnp.shape(s)}, so the "
        f"leaf must start with the stacked axes {stack} before its head axis "
        f"{axis}.")
  return axis, shape[axis]


def _exponents(leaves: list[_Leaf], updates: list, s: jax.Array,
               head_axis: int, alpha: float) -> dict[int, tuple[int, float]]:
  """``{leaf index: (head axis, exponent)}`` for the module's leaves that
  move; checks the head counts and tells MHA from grouped keys (GQA/MQA)."""
  heads = jnp.shape(s)[-1]
  extents = {}
  for leaf in leaves:
    extents[leaf.index] = _head_extent(leaf, updates[leaf.index], s, head_axis)
    if leaf.role in ("q", "q_rope") and extents[leaf.index][1] % heads:
      raise ValueError(
          f"{_TRANSFORM}: leaf {leaf.path} (q) of shape "
          f"{jnp.shape(updates[leaf.index])} has {extents[leaf.index][1]} "
          f"entries on its head axis {extents[leaf.index][0]}, not a multiple "
          f"of the {heads} heads of its max_logits.")

  def extent(role):
    sizes = {extents[l.index][1] for l in leaves if l.role == role}
    if len(sizes) != 1:
      module = "/".join(leaves[0].module) or "(the root)"
      raise ValueError(
          f"{_TRANSFORM}: attention module '{module}' needs {role} leaves of "
          f"one head-axis length (head_axis={head_axis}); found "
          f"{sorted(sizes)}: " + ", ".join(
              f"{l.path} {jnp.shape(updates[l.index])}" for l in leaves))
    return sizes.pop()

  q_size, k_size = extent("q"), extent("k")
  group = q_size // k_size if q_size % k_size == 0 else 0
  if not group or heads % group:
    k = next(l for l in leaves if l.role == "k")
    raise ValueError(
        f"{_TRANSFORM}: leaf {k.path} (k) of shape "
        f"{jnp.shape(updates[k.index])} has {k_size} entries on its head axis "
        f"against {q_size} for the queries: expected the {heads} query heads' "
        "length divided by a whole number of queries per key head.")
  # Grouped keys are shared by several query heads: only the queries move
  # (alpha = 1), as MLA's shared rotary key.
  power = {"q": 1.0 if group > 1 else alpha,
           "k": 0.0 if group > 1 else 1.0 - alpha,
           "q_rope": 1.0, "k_rope": 0.0}
  return {l.index: (extents[l.index][0], power[l.role])
          for l in leaves if power[l.role]}


def _clip_leaf(u: jax.Array, w: jax.Array, clipped: jax.Array,
               factor: jax.Array, axis: int) -> jax.Array:
  """``u + (factor - 1) (w + u)`` on the heads ``clipped`` (per head, the
  stacked axes first), ``u`` itself elsewhere."""
  acc = jnp.promote_types(u.dtype, jnp.float32)
  stack, heads = clipped.ndim - 1, clipped.shape[-1]
  width = u.shape[axis] // heads      # entries per head on the head axis

  def spread(x):  # (*stack, heads) -> broadcastable against u
    x = jnp.repeat(x, width, axis=-1)
    return x.reshape(x.shape[:-1] + (1,) * (axis - stack) + x.shape[-1:] +
                     (1,) * (u.ndim - axis - 1))

  u32, w32 = u.astype(acc), w.astype(acc)
  moved = u32 + (spread(factor).astype(acc) - 1) * (w32 + u32)
  return jnp.where(spread(clipped), moved.astype(u.dtype), u)


def qk_clip(threshold: float = 100.0, *, alpha: float = 0.5,
            roles: Mapping[str, Any] | None = None,
            head_axis: int = -1) -> optax.GradientTransformationExtraArgs:
  r"""MuonClip's QK-clip: rescales the query and key weights of every
  attention head whose max logit exceeded ``threshold``.

  ``update(updates, state, params, *, max_logits)`` takes the per-head
  maxima ``S_h = max_{batch, i, j} q_i^h . k_j^h / sqrt(d)`` that the model
  recorded in the forward pass at ``params``. For each head with ``S_h >
  threshold``, ``gamma_h = threshold / S_h``, and the head's query weights
  end the step at ``gamma_h^alpha (W + u)`` and its key weights at
  ``gamma_h^(1 - alpha) (W + u)`` (``W + u`` the weights the other stages'
  update ``u`` gives): the transform returns

  .. math::
    u' = u + (\gamma_h^e - 1)(W + u)

  per head, so that :func:`optax.apply_updates` gives ``gamma_h^e (W +
  u)``. The logits of the clipped heads, ``q . k``, scale by ``gamma_h``:
  had ``u`` been zero, they would land on ``threshold``. Every other head's
  update is returned unchanged, bit for bit. Put it last in the chain,
  after the weight decay and the learning rate (it clips the post-update
  weights, as Kimi K2's Algorithm 1).

  Roles and exponents, per attention module:

  * ``"q"``, ``"k"``: ``gamma^alpha`` and ``gamma^(1 - alpha)``. Where the
    key projection has fewer heads than the query one (grouped-query or
    multi-query attention: query head ``h`` uses key head ``h // (H / K)``,
    as :func:`jax.nn.dot_product_attention`), a key head is shared by
    several query heads: the queries take all of ``gamma`` and the keys do
    not move.
  * ``"q_rope"``, ``"k_rope"`` (MLA, the rotary parts stored as their own
    projections, ``"q"``/``"k"`` being the compressed ``q_c``/``k_c``):
    ``q_rope`` takes ``gamma``, the key's rotary part, shared by all
    heads, does not move. The logit ``q_c . k_c + q_r . k_r`` scales by
    ``gamma`` (with ``alpha = 1/2``, Kimi's ``sqrt(gamma)`` on ``q_c`` and
    ``k_c``).

  Every parameter under a projection (its kernel and its bias) scales with
  it. A projection is found by the name of a node of its leaves' paths
  (``roles=None``: ``query``/``q_proj``/``wq``/``q`` for queries,
  ``key``/``k_proj``/``wk``/``k`` for keys, ``q_rope``, ``k_rope``; the
  deepest such node) or by ``roles``' patterns; its parent node is the
  attention module, whose max logits are the entries of ``max_logits``
  under the same path (e.g. ``nnx.capture(model, nnx.Intermediate)``'s
  state of a module that sowed them, ``{'h': {0: {'attn': {'max_logits':
  (S,)}}}}`` for params ``{'h': {0: {'attn': {'query': {'kernel': ...},
  ...}}}}``). Several entries under one module (a module called twice)
  count by their maximum. Each entry has shape ``(*stack, H)``: ``H`` the
  query heads and ``stack`` the leading axes of the module's leaves (the
  layers of an ``nnx.scan``, say), one ``gamma`` per stacked slice.

  Heads lie along ``head_axis`` of each query and key leaf: the default
  ``-1`` fits an ``nnx.Linear`` projection ``(d_model, H * d_head)`` with
  each head a contiguous block of ``d_head`` columns (and its bias ``(H *
  d_head,)``); ``-2`` fits Flax's ``MultiHeadDotProductAttention`` and
  ``nnx.MultiHeadAttention``, kernel ``(d_model, H, d_head)`` and bias
  ``(H, d_head)``. An axis of ``H`` or ``H * c`` entries holds the heads
  in order, each ``c`` contiguous entries.

  Args:
    threshold: ``tau > 0``, the largest max logit a head may keep (Kimi K2:
      100).
    alpha: the share of ``gamma``'s exponent that the queries take, in
      ``[0, 1]`` (the keys take ``1 - alpha``; 1/2 in Kimi K2).
    roles: ``None`` to find the projections by name, or a mapping from
      :mod:`fnmatch` patterns over the projections' ``'a/b/query'`` paths
      (``*`` crosses ``/``) to a role of ``("q", "k", "q_rope", "k_rope")``
      or ``None`` (not a projection); the last pattern matching the deepest
      node wins, and a pattern that matches nothing is an error.
    head_axis: the heads' axis of every query and key leaf (negative counts
      from the end).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`QKClipState`; ``update`` needs ``params`` and ``max_logits``.

  Raises:
    ValueError: ``threshold <= 0`` or ``alpha`` outside ``[0, 1]`` (at
      construction); at update time, no params or no ``max_logits``, an
      update whose shape is not its parameter's, a query or key leaf whose
      module has no entry in ``max_logits``, an entry under no module with
      both projections found (its heads would go unclipped), or a leaf whose
      head axis does not hold the heads of its entry, each named by its key
      path with its shape and what was expected.
    TypeError: ``roles`` that is not a mapping; a hyperparameter that is not
      a real number; a query, key or max-logit leaf that is not a supported
      float.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from orthax.transforms.qk_clip import qk_clip
    >>> params = {'attn': {'query': {'kernel': jnp.ones((8, 8))},
    ...                    'key': {'kernel': jnp.ones((8, 8))}}}
    >>> tx = optax.chain(optax.sgd(0.1), qk_clip(threshold=10.0))
    >>> grads = jax.tree.map(jnp.zeros_like, params)
    >>> logits = {'attn': {'max_logits': jnp.array([40.0, 5.0])}}  # 2 heads
    >>> updates, state = tx.update(grads, tx.init(params), params,
    ...                            max_logits=logits)
    >>> new = optax.apply_updates(params, updates)  # head 0: sqrt(1/4) W

  References:
    Kimi Team, Kimi K2: Open Agentic Intelligence, 2025, arXiv:2507.20534
    (Section 2.1, Algorithm 1); J. Su, QK-Clip, 2025,
    https://kexue.fm/archives/11126
  """
  threshold = check_hyperparameter(_TRANSFORM, "threshold", threshold, low=0.0,
                                   low_open=True)
  alpha = check_hyperparameter(_TRANSFORM, "alpha", alpha, low=0.0, high=1.0)
  head_axis = check_number(_TRANSFORM, "head_axis", head_axis, integer=True)
  _check_roles(roles)

  def init_fn(params):
    del params
    return QKClipState(clipped_heads=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, *, max_logits=None,
                **extra_args):
    del state, extra_args
    if params is None or max_logits is None:
      raise ValueError(
          f"{_TRANSFORM} needs the params and the per-head max logits of the "
          "forward pass at them: update(updates, state, params, "
          "max_logits=...).")
    kps_u, treedef = jax.tree_util.tree_flatten_with_path(updates)
    flat_w = treedef.flatten_up_to(params)
    leaves = _find_roles([kp for kp, _ in kps_u], roles)
    if not leaves:
      _module_logits(leaves, max_logits)   # an entry there is an error
      return updates, QKClipState(clipped_heads=jnp.zeros((), jnp.int32))
    flat_u = [u for _, u in kps_u]
    for leaf in leaves:
      check_float(leaf.path, flat_u[leaf.index], _TRANSFORM)
      check_same_shape(_TRANSFORM, leaf.path, flat_u[leaf.index],
                       flat_w[leaf.index])
    clipped_heads = jnp.zeros((), jnp.int32)
    for module, s in _module_logits(leaves, max_logits).items():
      mine = [l for l in leaves if l.module == module]
      moving = _exponents(mine, flat_u, s, head_axis, alpha)
      acc = jnp.promote_types(
          jnp.result_type(*(flat_w[i] for i in moving), s), jnp.float32)
      s = s.astype(acc)
      clipped = s > threshold
      clipped_heads += jnp.sum(clipped, dtype=jnp.int32)
      gamma = threshold / jnp.where(clipped, s, jnp.ones_like(s))
      for i, (axis, power) in moving.items():
        flat_u[i] = _clip_leaf(flat_u[i], flat_w[i], clipped,
                               gamma ** power, axis)
    return (treedef.unflatten(flat_u),
            QKClipState(clipped_heads=clipped_heads))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
