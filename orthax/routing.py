"""Which leaves are hidden matrices, and how: the one place that decides.

For every leaf of a model, :func:`route` decides whether it is a hidden
matrix (orthogonalized) or goes to AdamW, and for a matrix which axes are
batch axes (each index its own matrix), which are reduced (``fan_in``) and
which are output (``fan_out``). The ready optimizers (:func:`orthax.muon`,
:func:`orthax.normuon`, :func:`orthax.pion`) call it on the params they are
given, so that most models need no configuration; :func:`describe` prints
what it decided, leaf by leaf, with the rule that decided it.

What the model says comes before what its names suggest. For each leaf, the
first of these that applies decides:

1. **Your routing**: ``routing`` (a tree or a callable, see
   :data:`RoutingSpec`) and then ``overrides`` (path patterns), where they
   give the leaf anything but ``"auto"``.
2. **The module** (Flax NNX, when the model is given): ``Linear``,
   ``LinearGeneral`` (its ``in_features``, ``out_features`` and
   ``batch_axis``), ``Conv``/``ConvTranspose`` (spatial and input axes
   reduced), ``Einsum`` (from its equation), ``Embed`` and the norms (AdamW).
   Axes beyond what the module declares are stacked axes (``nnx.vmap``,
   ``nnx.scan``) and so batch axes.
3. **Logical axis names** (``nn.with_logical_partitioning``, NNX
   ``sharding_names``/``out_sharding``), in MaxText's vocabulary: ``layers``,
   ``exp`` and ``stage`` axes are batch axes; a ``vocab`` axis makes an
   embedding or a head (AdamW); ``embed`` on one side and the rest on the
   other (heads and head dims together) give fan_in and fan_out.
4. **The tree's structure**: leaves that are 1-D once their stacked axes are
   removed (biases, norm scales) are AdamW; the leading axis of every leaf of
   a subtree whose leaves all share it and which holds a stacked (2-D) bias or
   scale is a layer axis (``nn.scan``); a 3-D-or-more parameter of a module
   named for experts is an expert stack; a sibling ``bias`` gives a kernel's
   output axes (its shape is the kernel's trailing, or for Hugging Face's
   ``FlaxConv1D`` leading, axes); when every 2-D kernel whose bias decides
   says ``(out, in)``, the model stores its kernels that way and the square
   ones follow; conv kernels reduce every axis but the last; attention
   in-projections (``query``, ``q_proj``, ...) reduce their first axis and
   out-projections (``out``, ``o_proj``, ...) all but their last; failing
   that, the model width (the size of its norm scales and embedding features)
   on one side of a 3-D kernel fixes that side.
5. **Names and shapes of heads and embeddings** (AdamW): a leaf named for an
   embedding (``embedding``, ``wte``, ``tok_emb``, ...) or an output head
   (``head``, ``lm_head``, ``logits*``, ``logitdense``, ``output_layer``,
   ``classifier``, ``unembed``, ...); a matrix with an axis of the
   vocabulary's size (the rows of an embedding table) and one of the model
   width, whose vocabulary axis feeds no other matrix; the last of a numbered
   family of layers (``Dense_1`` after ``Dense_0``, ``linear2`` after
   ``linear1``) whose output feeds no other matrix: a classifier's output.
6. What is left: a leaf with two core axes is a ``(fan_in, fan_out)`` matrix;
   one with more axes that no rule explains is **unrecognized**: it goes to
   AdamW, and the ready optimizers warn, naming it, at init.

Every leaf must be float16, bfloat16, float32 or float64 (integer counters,
masks and float8 leaves are neither matrices nor something AdamW can update),
and the optimizers raise an error naming any other.

**optax's dimension numbers.** In ``optax.contrib.muon``'s
``muon_weight_dimension_numbers`` a ``None`` leaf means AdamW, while in the
``dimension_numbers`` of orthax's matrix transforms (which only ever see
matrices) it means "2-D". The ready optimizers take neither: their
``routing`` rejects ``None`` and says why, and :func:`from_optax` turns an
optax spec (tree, callable or ``None``) into a routing with exactly optax's
meaning.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
import re
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from optax.contrib import MuonDimensionNumbers

from orthax._tree import broadcast_prefix
from orthax.matrices import MatrixView, _axes, check_float
from orthax.transforms.shape import shape_factor

__all__ = [
    "ADAMW",
    "AUTO",
    "MATRIX",
    "Route",
    "RoutingSpec",
    "by_path",
    "by_pattern",
    "describe",
    "dimension_numbers",
    "from_optax",
    "labels",
    "route",
]

MATRIX = "matrix"
ADAMW = "adamw"
AUTO = "auto"

RoutingSpec = Any
"""A routing: ``None`` (every leaf decided by the rules), a tree that is a
prefix of the params whose leaves are ``"auto"``, ``"matrix"``, ``"adamw"``,
``True``/``False`` (``True`` meaning matrix), a ``MuonDimensionNumbers``
(a matrix with those reduction and output axes, the others batch axes) or a
:class:`Route` (what :func:`route` returns, to pin its decisions), or a
callable that takes the params and returns such a tree. ``"matrix"`` keeps
the axes the rules find (2-D: ``(0, 1)``)."""


@dataclasses.dataclass(frozen=True)
class Route:
  """How one leaf is updated.

  Attributes:
    kind: ``"matrix"`` (orthogonalized) or ``"adamw"``.
    batch_axes, reduction_axes, output_axes: the axes of a matrix by role
      (all empty for AdamW): each index of the batch axes is its own
      ``(fan_in, fan_out)`` matrix.
    rule: what decided, in words (shown by :func:`describe`).
  """

  kind: str
  batch_axes: tuple[int, ...] = ()
  reduction_axes: tuple[int, ...] = ()
  output_axes: tuple[int, ...] = ()
  rule: str = ""

  @property
  def dimension_numbers(self) -> MuonDimensionNumbers | None:
    """The matrix's axes as optax's class; ``None`` for AdamW."""
    if self.kind != MATRIX:
      return None
    return MuonDimensionNumbers(self.reduction_axes, self.output_axes)

  def view(self, path: str, shape: tuple[int, ...]) -> MatrixView:
    """The leaf seen as a stack of matrices (a matrix route only)."""
    return MatrixView(path, tuple(shape), self.batch_axes,
                      self.reduction_axes, self.output_axes)

  @property
  def unrecognized(self) -> bool:
    return self.rule.startswith("unrecognized")


def _adamw(rule: str) -> Route:
  return Route(ADAMW, rule=rule)


def _matrix(ndim: int, reduction, output, rule: str) -> Route:
  reduction, output = tuple(sorted(reduction)), tuple(sorted(output))
  batch = tuple(a for a in range(ndim) if a not in reduction + output)
  return Route(MATRIX, batch, reduction, output, rule)


# --------------------------------------------------------------------------
# The leaves as the rules see them.


@dataclasses.dataclass
class _Leaf:
  path: tuple[str, ...]     # key names, NNX's trailing "value" dropped
  shape: tuple[int, ...]
  logical: tuple[Any, ...] | None   # axis names from the box, if any
  module: Any               # the NNX module that owns the leaf, if known
  stack_axes: tuple[int, ...] = ()   # axes found to be layer/expert stacks
  stacks: tuple[str, ...] = ()   # what they are, for the rule's words
  known: bool = False       # decided by its module or its logical names

  @property
  def name(self) -> str:
    return self.path[-1].lower() if self.path else ""

  @property
  def owner(self) -> str:
    return self.path[-2].lower() if len(self.path) > 1 else ""

  @property
  def core_axes(self) -> tuple[int, ...]:
    """The axes that are not stack axes."""
    return tuple(a for a in range(len(self.shape))
                 if a not in self.stack_axes)

  @property
  def core(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.core_axes)

  @property
  def note(self) -> str:
    return f" (stacked: {', '.join(self.stacks)})" if self.stacks else ""

  def stack(self, what: str, axis: int) -> None:
    self.stack_axes += (axis,)
    self.stacks += (what,)


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _names(kp) -> tuple[str, ...]:
  names = [_key_name(k) for k in kp]
  while names and names[-1] in ("value", "raw_value"):
    names.pop()
  return tuple(names)


def path_of(kp) -> str:
  """A key path as the ``'a/b/kernel'`` string the routing tables use."""
  return "/".join(_names(kp))


@functools.cache
def _box_types() -> tuple[type, ...]:
  """Flax's metadata boxes (linen ``Partitioned``, NNX ``Variable``)."""
  types = []
  try:
    from flax.core import meta
    types.append(meta.AxisMetadata)
  except ImportError:  # flax is optional for orthax itself
    pass
  try:
    from flax import nnx
    types.append(nnx.Variable)
  except ImportError:
    pass
  return tuple(types)


def _is_box(x) -> bool:
  return isinstance(x, _box_types())


def _unbox(x) -> tuple[Any, tuple[Any, ...] | None]:
  """``(array, logical axis names or None)`` of a leaf or a Flax box."""
  names = None
  if hasattr(x, "get_metadata"):          # NNX Variable
    meta = x.get_metadata()
    for key in ("sharding_names", "out_sharding", "sharding"):
      if meta.get(key) is not None:
        names = tuple(meta[key])
        break
    x = x.get_value() if hasattr(x, "get_value") else x.value
  elif hasattr(x, "names") and hasattr(x, "value"):   # linen Partitioned
    names, x = tuple(x.names), x.value
  if names is not None and not any(
      isinstance(n, str) and n in _KNOWN_AXES for n in names):
    names = None   # mesh axis names ("fsdp", "tensor"), not roles
  return x, names


def _flatten(tree) -> tuple[list, Any]:
  """Leaves (Flax boxes kept whole) with their paths, and the treedef."""
  return jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)


# --------------------------------------------------------------------------
# Vocabularies.

_VECTOR_NAMES = frozenset({"bias", "scale", "b", "gamma", "beta", "g",
                           "offset", "dt_bias", "a_log"})
_NORM_MARKS = ("norm", "ln_", "rms")
_EMBED_NAMES = frozenset({"wte", "wpe", "emb", "tok_emb", "pos_emb",
                          "tok_embeddings", "token_emb", "position_emb"})
_HEAD_NAMES = frozenset({"head", "lm_head", "logitdense", "logits_dense",
                         "output_layer", "output", "classifier", "unembed",
                         "unembedding", "readout", "score", "decoder_head"})
_HEAD_PREFIXES = ("logit", "unembed", "classifier")
_IN_PROJ = frozenset({"query", "key", "value", "q", "k", "v", "qkv",
                      "q_proj", "k_proj", "v_proj", "qkv_proj", "wq", "wk",
                      "wv", "wqkv", "wq_b", "wkv_b", "c_attn", "in_proj"})
_OUT_PROJ = frozenset({"out", "o", "o_proj", "out_proj", "wo", "attn_out",
                       "proj", "c_proj", "dense_out"})
_EXPERT_MARKS = ("expert", "moe")
_CONV_MARK = "conv"
# logical axis names (MaxText's, and Flax examples')
_STACK_AXES = frozenset({"layers", "layer", "stage", "exp", "experts",
                         "expert", "num_layers", "blocks"})
_EMBED_AXES = frozenset({"embed", "embed_no_exp", "emb", "hidden",
                         "embed_tensor", "d_model", "model"})
_HEAD_AXES = frozenset({"heads", "q_heads", "kv_heads", "kv", "kv_head_dim",
                        "head_dim", "qkv", "num_heads"})
_VOCAB_AXES = frozenset({"vocab"})
_KNOWN_AXES = (_STACK_AXES | _EMBED_AXES | _HEAD_AXES | _VOCAB_AXES
               | frozenset({"mlp", "q_lora", "kv_lora", "norm", "mlp_no_fsdp",
                            "mlp_moe",
                            "conv", "conv_in", "conv_out"}))


def _is_vector_name(leaf: _Leaf) -> bool:
  return (leaf.name in _VECTOR_NAMES or leaf.owner == "ln"
          or any(m in leaf.owner for m in _NORM_MARKS))


def _is_embedding_name(n: str) -> bool:
  return ("embed" in n and "unembed" not in n) or n in _EMBED_NAMES or (
      n.endswith("_emb"))


def _is_head_name(n: str) -> bool:
  return (n in _HEAD_NAMES or n.endswith("_head")
          or n.startswith(_HEAD_PREFIXES))


def _named_embedding_or_head(leaf: _Leaf) -> str | None:
  for n in (leaf.name, leaf.owner):
    if _is_embedding_name(n):
      return f"name: embedding ({n!r})"
    if _is_head_name(n):
      return f"name: output head ({n!r})"
  return None


# --------------------------------------------------------------------------
# Rule 2: NNX modules.


def _module_route(leaf: _Leaf) -> Route | None:
  mod = leaf.module
  if mod is None:
    return None
  kind = type(mod).__name__
  ndim = len(leaf.shape)
  if kind in ("Embed",):
    return _adamw("nnx Embed")
  if "Norm" in kind:
    return _adamw(f"nnx {kind}")
  if leaf.name != "kernel":
    if leaf.name in _VECTOR_NAMES:
      return _adamw(f"nnx {kind} {leaf.name}")
    return None
  if kind == "Linear":
    declared = 2
    red, out = (0,), (1,)
  elif kind == "LinearGeneral":
    nb, ni = len(mod.batch_axis), len(mod.in_features)
    declared = nb + ni + len(mod.out_features)
    red = tuple(range(nb, nb + ni))
    out = tuple(range(nb + ni, declared))
  elif kind in ("Conv", "ConvTranspose"):
    declared = len(mod.kernel_shape) if hasattr(mod, "kernel_shape") else ndim
    red, out = tuple(range(declared - 1)), (declared - 1,)
  elif kind == "Einsum":
    return _einsum_route(leaf, mod.einsum_str)
  else:
    return None
  extra = ndim - declared
  if extra < 0:
    return None
  red = tuple(a + extra for a in red)
  out = tuple(a + extra for a in out)
  stacked = " (stacked)" if extra else ""
  return _matrix(ndim, red, out, f"nnx {kind}{stacked}")


def _einsum_route(leaf: _Leaf, equation: str) -> Route | None:
  """Axes of an ``nnx.Einsum`` kernel from its equation: letters shared with
  the input only are reduced, with the output only are output, with both are
  batch."""
  eq = equation.replace(" ", "")
  match = re.fullmatch(r"([\w.]+),([\w.]+)->([\w.]+)", eq)
  if match is None:
    return None
  x, w, y = (s.replace("...", "") for s in match.groups())
  if len(w) != len(leaf.shape):
    return None
  red = tuple(i for i, c in enumerate(w) if c in x and c not in y)
  out = tuple(i for i, c in enumerate(w) if c in y and c not in x)
  if not red or not out:
    return None
  return _matrix(len(w), red, out, f"nnx Einsum {equation!r}")


# --------------------------------------------------------------------------
# Rule 3: logical axis names.


def _logical_route(leaf: _Leaf) -> Route | None:
  names = leaf.logical
  if names is None or len(names) != len(leaf.shape):
    return None
  flat = [n if isinstance(n, str) else None for n in names]
  where = f"logical axes {tuple(names)}"
  if any(n in _VOCAB_AXES for n in flat):
    return _adamw(f"{where}: embedding or head (vocab)")
  core = [i for i, n in enumerate(flat) if n not in _STACK_AXES]
  if len(core) < 2:
    return _adamw(f"{where}: vector")
  if leaf.name in _VECTOR_NAMES:
    return _adamw(f"{where}: {leaf.name}")
  ndim = len(flat)
  embed = [i for i in core if flat[i] in _EMBED_AXES]
  if len(core) == 2:
    return _matrix(ndim, (core[0],), (core[1],), where)
  if embed == [core[0]]:
    return _matrix(ndim, (core[0],), core[1:], where)
  if embed == [core[-1]]:
    return _matrix(ndim, core[:-1], (core[-1],), where)
  heads = [i for i in core if flat[i] in _HEAD_AXES]
  if heads and heads == core[-len(heads):] and len(heads) < len(core):
    return _matrix(ndim, core[:-len(heads)], heads, where)
  if heads and heads == core[:len(heads)] and len(heads) < len(core):
    return _matrix(ndim, heads, core[len(heads):], where)
  return None


# --------------------------------------------------------------------------
# Rule 4: structure.


def _find_stacks(leaves: list[_Leaf]) -> None:
  """Marks the layer axis of scanned subtrees as a stack axis (``nn.scan``).

  A subtree is a stack when all its leaves (two or more) share their size at
  one position, 0 (``nn.scan``'s default) or 1 (MaxText's
  ``param_scan_axis``), and one of them is a bias or a norm scale with two
  axes: unstacked biases and scales have one (a DenseGeneral bias ``(heads,
  head_dim)`` does not share its kernel's leading size). Where both
  positions qualify, a size equal to the model width is no layer axis, and
  then position 0 wins. The largest such subtree counts, so that a whole
  scanned block is found at once.
  """
  widths = Counter(_width_evidence(leaves))
  width = widths.most_common(1)[0][0] if widths else None
  groups: dict[tuple[str, ...], list[int]] = {}
  for i, leaf in enumerate(leaves):
    for depth in range(len(leaf.path) - 1):
      groups.setdefault(leaf.path[:depth], []).append(i)
  for prefix in sorted(groups, key=len):
    members = [leaves[i] for i in groups[prefix]]
    if len(members) < 2 or any(m.stack_axes or m.known or len(m.shape) < 2
                                for m in members):
      continue
    if not any(_is_vector_name(m) and len(m.shape) == 2 for m in members):
      continue
    shared = [p for p in (0, 1) if len({m.shape[p] for m in members}) == 1]
    if len(shared) > 1:
      shared = [p for p in shared if members[0].shape[p] != width] or shared
    if shared:
      for m in members:
        m.stack("layers", shared[0])


def _expert_stack(leaf: _Leaf) -> bool:
  return len(leaf.core) >= 3 and not _is_vector_name(leaf) and any(
      mark in n.lower() for n in leaf.path[-3:] for mark in _EXPERT_MARKS)


def _siblings(leaves: list[_Leaf]) -> dict[tuple[str, ...], dict[str, _Leaf]]:
  out: dict[tuple[str, ...], dict[str, _Leaf]] = {}
  for leaf in leaves:
    out.setdefault(leaf.path[:-1], {})[leaf.name] = leaf
  return out


def _bias_side(kernel: _Leaf, bias: _Leaf | None) -> str | None:
  """``"last"`` or ``"first"``: which end of the kernel's core axes its
  sibling bias matches (``None`` if neither or both)."""
  if bias is None or len(bias.stack_axes) != len(kernel.stack_axes):
    return None
  k, b = kernel.core, bias.core
  if not b or len(b) >= len(k):
    return None
  last, first = k[-len(b):] == b, k[:len(b)] == b
  if last and not first:
    return "last"
  if first and not last:
    return "first"
  return None


@dataclasses.dataclass
class _Model:
  """What the whole tree says: width, vocabulary, stored orientation."""
  width: int | None
  vocab: set[int]
  sizes: Counter    # how many matrix axes (heads, embeddings aside) have each size
  out_in: bool


def _embedding_tables(leaves: list[_Leaf]) -> list[_Leaf]:
  return [leaf for leaf in leaves if len(leaf.core) == 2 and (
      _is_embedding_name(leaf.name) or _is_embedding_name(leaf.owner))]


def _width_evidence(leaves: list[_Leaf]) -> list[int]:
  """Sizes that say the model width: norm scales, embedding features."""
  return ([leaf.core[0] for leaf in leaves
           if len(leaf.core) == 1 and leaf.name == "scale"]
          + [leaf.core[1] for leaf in _embedding_tables(leaves)])


def _model_facts(leaves: list[_Leaf], sibs) -> _Model:
  widths = Counter(_width_evidence(leaves))
  vocab = {leaf.core[0] for leaf in _embedding_tables(leaves)}
  votes = Counter()
  sizes = Counter()
  for leaf in leaves:
    if (len(leaf.core) < 2 or _is_vector_name(leaf)
        or _named_embedding_or_head(leaf)):
      continue
    side = _bias_side(leaf, sibs[leaf.path[:-1]].get("bias"))
    if len(leaf.core) == 2 and side:
      votes[side] += 1
    sizes.update(leaf.core)
  width = widths.most_common(1)[0][0] if widths else None
  return _Model(width, vocab, sizes,
                out_in=votes["first"] > 0 and votes["last"] == 0)


def _structure_route(leaf: _Leaf, sibs, model: _Model) -> Route | None:
  ndim = len(leaf.shape)
  core = leaf.core
  stacked = leaf.note
  if len(core) < 2:
    return _adamw(f"vector{stacked}")
  if _is_vector_name(leaf):
    return _adamw(f"name: {leaf.name} of {leaf.owner!r}" if leaf.owner
                  else f"name: {leaf.name}")
  c = len(core)
  axes = lambda *idx: tuple(leaf.core_axes[i] for i in idx)
  side = _bias_side(leaf, sibs[leaf.path[:-1]].get("bias"))
  if side:
    nb = len(sibs[leaf.path[:-1]]["bias"].core)
    if side == "last":
      return _matrix(ndim, axes(*range(c - nb)), axes(*range(c - nb, c)),
                     f"sibling bias: output axes last{stacked}")
    return _matrix(ndim, axes(*range(nb, c)), axes(*range(nb)),
                   f"sibling bias: output axes first, (out, in){stacked}")
  if c == 2:
    if model.out_in:
      return _matrix(ndim, axes(1), axes(0),
                     f"model stores kernels (out, in){stacked}")
    return _matrix(ndim, axes(0), axes(1), f"2-D{stacked}")
  names = {n.lower() for n in leaf.path[-2:]}
  if _CONV_MARK in leaf.owner or _CONV_MARK in leaf.name:
    return _matrix(ndim, axes(*range(c - 1)), axes(c - 1),
                   f"conv kernel{stacked}")
  if names & _IN_PROJ:
    return _matrix(ndim, axes(0), axes(*range(1, c)),
                   f"attention in-projection{stacked}")
  if names & _OUT_PROJ:
    return _matrix(ndim, axes(*range(c - 1)), axes(c - 1),
                   f"attention out-projection{stacked}")
  w = model.width
  if w is not None and (core[0] == w) != (core[-1] == w):
    if core[0] == w:
      return _matrix(ndim, axes(0), axes(*range(1, c)),
                     f"model width {w} first{stacked}")
    return _matrix(ndim, axes(*range(c - 1)), axes(c - 1),
                   f"model width {w} last{stacked}")
  return None


# --------------------------------------------------------------------------
# Rule 5: heads.

_NUMBERED = re.compile(r"^(.*?)_?(\d+)$")


def _head_route(leaf: _Leaf, route: Route, sibs, model: _Model,
                numbered_last: set[tuple[str, ...]]) -> Route | None:
  named = _named_embedding_or_head(leaf)
  if named:
    return _adamw(named)
  if leaf.logical is not None and route.rule.startswith("logical"):
    return None
  if len(leaf.core) != 2:
    return None
  fan_in, fan_out = (math.prod(leaf.shape[a] for a in axes)
                     for axes in (route.reduction_axes, route.output_axes))
  # a size feeds another matrix when some other matrix has an axis of it
  fed = lambda n: model.sizes[n] > leaf.core.count(n)
  vocab = [n for n in (fan_in, fan_out)
           if n in model.vocab and n != model.width]
  if vocab and model.width in (fan_in, fan_out) and not any(map(fed, vocab)):
    return _adamw("shape: projection to the vocabulary (embedding rows)")
  if leaf.path[:-1] in numbered_last and not fed(fan_out):
    return _adamw(f"structure: last of the numbered layers "
                  f"({leaf.owner!r}), its output feeds no other matrix")
  return None


def _numbered_last(leaves: list[_Leaf]) -> set[tuple[str, ...]]:
  """Owners that are the highest of a numbered family (``Dense_0``,
  ``Dense_1``; ``linear1``, ``linear2``) among their siblings."""
  families: dict[tuple, list[tuple[int, tuple[str, ...]]]] = {}
  for leaf in leaves:
    if len(leaf.path) < 2 or leaf.name != "kernel":
      continue
    m = _NUMBERED.match(leaf.path[-2])
    if m:
      key = (leaf.path[:-2], m.group(1).lower())
      families.setdefault(key, []).append((int(m.group(2)), leaf.path[:-1]))
  return {max(members)[1] for members in families.values()
          if len(members) > 1}


# --------------------------------------------------------------------------
# Putting it together.


def _auto_routes(leaves: list[_Leaf]) -> list[Route]:
  # what the model says first: modules, then logical names
  known = [_module_route(leaf) or _logical_route(leaf) for leaf in leaves]
  for leaf, route in zip(leaves, known):
    if route is not None:
      leaf.known = True
      leaf.stack_axes = route.batch_axes
    elif leaf.logical is not None:   # names too few for a route: their stacks
      for i, n in enumerate(leaf.logical):
        if n in _STACK_AXES:
          leaf.stack(n, i)
  _find_stacks(leaves)
  for leaf in leaves:
    if not leaf.known and _expert_stack(leaf):
      leaf.stack("experts", leaf.core_axes[0])
  sibs = _siblings(leaves)
  model = _model_facts(leaves, sibs)
  numbered_last = _numbered_last(leaves)
  routes = []
  for leaf, route in zip(leaves, known):
    route = route or _structure_route(leaf, sibs, model)
    if route is None:
      routes.append(_adamw(
          f"unrecognized: {len(leaf.core)} core axes and no rule gives their "
          "roles; routed to AdamW (give it with routing= or overrides=)"))
      continue
    if route.kind == MATRIX:
      route = _head_route(leaf, route, sibs, model, numbered_last) or route
    routes.append(route)
  return routes


def _module_index(model) -> dict[tuple[str, ...], Any]:
  """``path -> module`` for every Flax NNX module of ``model``."""
  from flax import nnx
  return {tuple(str(p) for p in path): node
          for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Module)}


def _as_tree(tree, model):
  """A model given as the tree: its ``nnx.Param`` state, and the model."""
  try:
    from flax import nnx
  except ImportError:
    return tree, model
  if isinstance(tree, nnx.Module):
    return nnx.state(tree, nnx.Param), tree if model is None else model
  return tree, model


def _user_value(path: str, shape, value, where: str) -> Any:
  """Checks one value of a routing tree or of overrides."""
  if isinstance(value, (bool, np.bool_)):
    return MATRIX if value else ADAMW
  if isinstance(value, (Route, MuonDimensionNumbers)) or value in (
      MATRIX, ADAMW, AUTO):
    return value
  if value is None:
    raise ValueError(
        f"{where}: leaf {path} (shape {shape}) is routed by None, which is "
        "ambiguous: in optax.contrib.muon's muon_weight_dimension_numbers "
        "None means AdamW, in orthax's matrix transforms it means 2-D. Use "
        f"{ADAMW!r}, {MATRIX!r} or {AUTO!r}, or convert an optax spec with "
        "orthax.routing.from_optax(spec).")
  raise ValueError(
      f"{where}: leaf {path} (shape {shape}) is routed by {value!r}; expected "
      f"{AUTO!r}, {MATRIX!r}, {ADAMW!r}, True/False or a "
      "MuonDimensionNumbers.")


def _is_routing_leaf(x) -> bool:
  return x is None or isinstance(
      x, (str, bool, np.bool_, MuonDimensionNumbers, Route))


def _routing_values(routing, tree, paths, shapes) -> list[Any]:
  if routing is None:
    return [AUTO] * len(paths)
  if callable(routing) and not isinstance(routing, MuonDimensionNumbers):
    routing = routing(tree)
  if _is_routing_leaf(routing):
    return [_user_value(p, s, routing, "routing")
            for p, s in zip(paths, shapes)]
  flat = broadcast_prefix(
      routing, tree, is_leaf=_is_routing_leaf,
      what="routing must be a tree that is a prefix of the params (with "
      "'auto', 'matrix', 'adamw', True/False or MuonDimensionNumbers at "
      "its leaves); its structure does not match the params")
  return [_user_value(p, s, v, "routing")
          for p, s, v in zip(paths, shapes, flat)]


def by_pattern(patterns: Mapping[str, Any], paths: list[str], *,
               what: str) -> list[tuple[int, str, Any]]:
  """``(leaf index, pattern, value)`` for every leaf each pattern matches.

  Patterns are :mod:`fnmatch` globs over ``'a/b/kernel'`` paths
  (:func:`path_of`), in the mapping's order (so a later pattern's value
  comes after an earlier one's for the same leaf).

  Args:
    patterns: ``{pattern: value}``.
    paths: the leaves' paths.
    what: the argument's name, for errors.

  Raises:
    TypeError: ``patterns`` is not a mapping.
    ValueError: a pattern that matches no leaf (a typo would otherwise
      change nothing, silently), with examples of the paths.
  """
  if not isinstance(patterns, Mapping):
    raise TypeError(
        f"{what} must be a mapping from path patterns ('*/lm_head/*', "
        f"'blocks/*/mlp/kernel') to values; got {type(patterns).__name__}.")
  hits = []
  for pattern, value in patterns.items():
    matched = [i for i, p in enumerate(paths)
               if fnmatch.fnmatchcase(p, pattern)]
    if not matched:
      shown = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
      raise ValueError(
          f"{what}: pattern {pattern!r} matches no leaf; paths look like "
          f"{shown}")
    hits += [(i, pattern, value) for i in matched]
  return hits


def _apply_overrides(overrides, paths, keys, shapes, values) -> list[Any]:
  if overrides is None:
    return values
  values = list(values)
  for i, pattern, value in by_pattern(overrides, paths, what="overrides"):
    values[i] = _user_value(keys[i], shapes[i], value,
                            f"overrides[{pattern!r}]")
  return values


def _explicit(value, shape, path, auto: Route) -> Route:
  ndim = len(shape)
  if isinstance(value, Route):   # e.g. orthax.route(params) of another call
    axes = value.batch_axes + value.reduction_axes + value.output_axes
    if value.kind == MATRIX and sorted(axes) != list(range(ndim)):
      raise ValueError(f"routing: leaf {path} (shape {shape}) has a route "
                       f"for a leaf of other axes: {value}.")
    return value
  if value == ADAMW:
    return _adamw("your routing: adamw")
  if value == MATRIX:
    if auto.kind == MATRIX:
      return dataclasses.replace(auto, rule=f"your routing: matrix; axes by "
                                 f"{auto.rule}")
    if ndim == 2:
      return _matrix(2, (0,), (1,), "your routing: matrix (2-D)")
    raise ValueError(
        f"routing: leaf {path} (shape {shape}) is routed to 'matrix' but no "
        "rule finds its axes; give a MuonDimensionNumbers(reduction_axis, "
        "output_axis) for it instead.")
  where = f"routing: leaf {path}"
  red = _axes(value.reduction_axis, ndim, "reduction_axis", where, shape)
  out = _axes(value.output_axis, ndim, "output_axis", where, shape)
  if set(red) & set(out):
    raise ValueError(f"{where}: reduction axes {red} and output axes {out} "
                     f"overlap (leaf shape {shape}).")
  return _matrix(ndim, red, out, f"your routing: {value}")


def routes_flat(tree, *, model=None, routing: RoutingSpec = None,
                 overrides: Mapping[str, Any] | None = None,
                 transform: str = "orthax.route"):
  tree, model = _as_tree(tree, model)
  flat, treedef = _flatten(tree)
  modules = _module_index(model) if model is not None else {}
  leaves, arrays = [], []
  for kp, x in flat:
    array, logical = _unbox(x)
    path = _names(kp)
    check_float(jax.tree_util.keystr(kp), array, transform)
    arrays.append(array)
    leaves.append(_Leaf(path, tuple(jnp.shape(array)), logical,
                        modules.get(path[:-1])))
  paths = ["/".join(leaf.path) for leaf in leaves]
  keys = [jax.tree_util.keystr(kp) for kp, _ in flat]   # for errors
  shapes = [leaf.shape for leaf in leaves]
  auto = _auto_routes(leaves)
  values = _apply_overrides(overrides, paths, keys, shapes,
                            _routing_values(routing, tree, keys, shapes))
  try:
    routes = [a if v == AUTO else _explicit(v, s, k, a)
              for v, s, k, a in zip(values, shapes, keys, auto)]
  except ValueError as e:
    if not isinstance(routing, MuonDimensionNumbers):
      raise
    raise ValueError(
        f"{e} routing= applies the one MuonDimensionNumbers given to every "
        "leaf: give a tree of routes instead, or leave routing=None and fix "
        "single leaves with overrides=.") from None
  return routes, paths, shapes, treedef


def route(tree: Any, *, model: Any = None, routing: RoutingSpec = None,
          overrides: Mapping[str, Any] | None = None) -> Any:
  """Decides, for every leaf of ``tree``, matrix or AdamW and its axes.

  Args:
    tree: the params: arrays or ``jax.ShapeDtypeStruct``, a linen tree with
      boxed metadata (``nn.LogicallyPartitioned``), an ``nnx.State`` (its
      Variables' ``sharding_names`` are read), or a Flax NNX module itself.
    model: a Flax NNX module whose modules own the params (optional): their
      declared features decide the axes (rule 2 of the module docstring).
    routing: your routing (:data:`RoutingSpec`); ``"auto"`` leaves, or
      ``None`` for all, are decided by the rules.
    overrides: ``{pattern: route}`` applied on top, in order (the last
      pattern matching a leaf wins): patterns are :mod:`fnmatch` globs over
      the ``'a/b/kernel'`` paths that :func:`describe` shows, and routes are
      as in :data:`RoutingSpec`. A pattern that matches no leaf is an error.

  Returns:
    A tree like ``tree`` (Flax boxes and Variables as leaves: a prefix of the
    params) of :class:`Route`.

  Raises:
    ValueError: a routing or override that does not fit a leaf, named by
      its path.
    TypeError: a leaf that is not float16, bfloat16, float32 or float64.

  Example:
    >>> import jax.numpy as jnp, orthax
    >>> params = {'embedding': jnp.zeros((100, 16)),
    ...           'mlp': {'kernel': jnp.zeros((16, 64)), 'bias': jnp.zeros(64)}}
    >>> r = orthax.routing.by_path(orthax.route(params))
    >>> r['mlp/kernel'].kind, r['embedding'].kind
    ('matrix', 'adamw')
  """
  routes, _, _, treedef = routes_flat(tree, model=model, routing=routing,
                                       overrides=overrides)
  return treedef.unflatten(routes)


def by_path(routes: Any) -> dict[str, Route]:
  """``{'a/b/kernel': Route}`` from a tree of routes."""
  return {path_of(kp): r for kp, r in jax.tree_util.tree_leaves_with_path(
      routes, is_leaf=lambda x: isinstance(x, Route))}


def labels(routes: Any) -> Any:
  """``"matrix"``/``"adamw"`` per leaf, for :func:`optax.partition`."""
  return jax.tree.map(lambda r: r.kind, routes,
                      is_leaf=lambda x: isinstance(x, Route))


def dimension_numbers(routes: Any) -> Any:
  """``MuonDimensionNumbers`` per matrix, ``None`` per AdamW leaf.

  The tree is valid both for orthax's matrix transforms (which see only the
  matrices) and as ``optax.contrib.muon``'s
  ``muon_weight_dimension_numbers`` (where ``None`` means AdamW).
  """
  return jax.tree.map(lambda r: r.dimension_numbers, routes,
                      is_leaf=lambda x: isinstance(x, Route))


def from_optax(spec: Any) -> RoutingSpec:
  """An ``optax.contrib.muon`` ``muon_weight_dimension_numbers`` as a routing.

  optax's meaning is kept exactly: ``None`` for the whole spec makes every
  2-D leaf a ``(0, 1)`` matrix and every other leaf AdamW; a single
  ``MuonDimensionNumbers`` applies to every leaf; in a tree (or what a
  callable returns), ``None`` means AdamW and a ``MuonDimensionNumbers`` a
  matrix with those axes.

  Args:
    spec: optax's ``muon_weight_dimension_numbers``.

  Returns:
    A :data:`RoutingSpec` for :func:`route` and the ready optimizers.

  Example:
    >>> import jax.numpy as jnp, orthax
    >>> params = {'w': jnp.zeros((4, 8, 16)), 'b': jnp.zeros(16)}
    >>> spec = {'w': orthax.MuonDimensionNumbers(1, 2), 'b': None}
    >>> r = orthax.routing.by_path(
    ...     orthax.route(params, routing=orthax.routing.from_optax(spec)))
    >>> r['w'].batch_axes, r['b'].kind
    ((0,), 'adamw')
  """
  def convert(tree):
    return jax.tree.map(lambda d: ADAMW if d is None else d, tree,
                        is_leaf=lambda x: x is None or isinstance(
                            x, MuonDimensionNumbers))

  if spec is None:
    return lambda params: jax.tree.map(
        lambda x: MuonDimensionNumbers(0, 1) if jnp.ndim(_unbox(x)[0]) == 2
        else ADAMW, params, is_leaf=_is_box)
  if isinstance(spec, MuonDimensionNumbers):
    return spec
  if callable(spec):
    return lambda params: convert(spec(params))
  return convert(spec)


def _grouping(view: MatrixView) -> str:
  batch = f"{view.batch} x " if view.batch_axes else ""
  return f"{batch}{view.fan_in}x{view.fan_out}"


def describe(tree: Any, *, model: Any = None, routing: RoutingSpec = None,
             overrides: Mapping[str, Any] | None = None,
             shape_scale: str = "muon", print_fn: Callable[[str], Any] | None
             = print) -> str:
  """Prints (and returns) how every leaf of ``tree`` is routed.

  One row per leaf: its path, shape, route, grouping (``batch x fan_in x
  fan_out`` of a matrix), the shape scale (:func:`orthax.scale_by_shape`'s
  factor under ``shape_scale``) and the rule that decided, then a count.

  Args:
    tree, model, routing, overrides: as in :func:`route`.
    shape_scale: ``"muon"`` or ``"rms"`` (with ``rms=0.2``), for the scale
      column.
    print_fn: where the table goes; ``None`` only returns it.

  Returns:
    The table, as a string.

  Example:
    >>> import jax.numpy as jnp, orthax
    >>> _ = orthax.describe({'w': jnp.zeros((16, 64)), 'b': jnp.zeros(64)})
    path  shape     route   grouping  scale  rule
    b     (64,)     adamw                    vector
    w     (16, 64)  matrix  16x64     2      2-D
    1 matrix (1,024 parameters), 1 AdamW (64); 0 unrecognized
  """
  routes, paths, shapes, _ = routes_flat(tree, model=model, routing=routing,
                                          overrides=overrides,
                                          transform="orthax.describe")
  rows = [("path", "shape", "route", "grouping", "scale", "rule")]
  for p, s, r in zip(paths, shapes, routes):
    view = r.view(p, s) if r.kind == MATRIX else None
    rows.append((p, str(s), r.kind, _grouping(view) if view else "",
                 f"{shape_factor(view, shape_scale):.3g}" if view else "",
                 r.rule))
  widths = [max(len(row[i]) for row in rows) for i in range(5)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  "
           + row[5] for row in rows]
  lines.append(summary(routes, shapes))
  text = "\n".join(lines)
  if print_fn is not None:
    print_fn(text)
  return text


def summary(routes: list[Route], shapes: list[tuple[int, ...]]) -> str:
  """One line: matrices and AdamW leaves, with parameter counts."""
  count = lambda kind: [math.prod(s) for r, s in zip(routes, shapes)
                        if r.kind == kind]
  m, a = count(MATRIX), count(ADAMW)
  bad = sum(r.unrecognized for r in routes)
  return (f"{len(m)} matri{'x' if len(m) == 1 else 'ces'} ({sum(m):,} "
          f"parameters), {len(a)} AdamW ({sum(a):,}); {bad} unrecognized")


def warn_unrecognized(transform: str, routes, paths, shapes) -> None:
  """A warning naming every leaf no rule recognized (sent to AdamW)."""
  bad = [f"{p} {s}" for r, p, s in zip(routes, paths, shapes)
         if r.unrecognized]
  if bad:
    warnings.warn(
        f"{transform}: no rule recognized the axes of {len(bad)} leaves with "
        f"more than two axes; they go to AdamW: {', '.join(bad)}. Route them "
        "with routing= or overrides= (see orthax.describe).", stacklevel=3)
