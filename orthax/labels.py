"""Which leaves are hidden matrices (orthogonalized) and which go to AdamW.

The default rule, applied to each leaf from its key path and shape:

1. a leaf whose own name or whose owner's name (the last two elements of its
   key path, after a trailing ``value`` that Flax NNX states add) names an
   embedding or an output head is AdamW's: a name containing ``"embed"``
   (``embedding``, ``token_embed``, ...), or equal to ``"wte"``, ``"wpe"``,
   ``"head"`` or ``"lm_head"``, or ending in ``"_head"`` (case-insensitive).
   Their rows are looked up or read out one token at a time, which is not the
   ``x @ W`` geometry Muon is built on. Only the last two names count, so the
   hidden layers of a module that merely lives under an ``*embed*`` parent
   (``patch_embedder/mlp/kernel``) stay matrices;
2. otherwise a 2-D leaf is a hidden matrix;
3. a leaf with more than two axes is a hidden matrix only if the optimizer's
   ``dimension_numbers`` give it a ``MuonDimensionNumbers``;
4. everything else (scalars, biases, norm scales) is AdamW's.

Every leaf must be float16, bfloat16, float32 or float64: a leaf of another
dtype (an integer counter, a bool mask, float8) is neither a matrix nor
something AdamW can update, and the optimizers raise an error naming it rather
than routing it anywhere.

Override it with ``label_fn``: a callable on the params (shapes and key paths
only: optax may call it on the updates) or a tree of the same structure, whose
leaves are ``"matrix"``/``"adamw"`` or ``True``/``False`` (``True`` meaning
matrix; ``np.bool_`` too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from orthax.matrices import (DimensionNumbersSpec, check_float,
                             resolve_dimension_numbers)

__all__ = ["ADAMW", "MATRIX", "LabelSpec", "default_labels", "resolve_labels"]

MATRIX = "matrix"
ADAMW = "adamw"

LabelSpec = Callable[[Any], Any] | Any | None

_HEAD_NAMES = frozenset({"wte", "wpe", "head", "lm_head"})


def _key_names(kp) -> list[str]:
  names = []
  for k in kp:
    for attr in ("key", "name"):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)).lower())
        break
  return names


def _is_embedding_or_head(kp) -> bool:
  names = _key_names(kp)
  while names and names[-1] in ("value", "raw_value"):
    names.pop()
  return any("embed" in n or n in _HEAD_NAMES or n.endswith("_head")
             for n in names[-2:])


def default_labels(params: Any,
                   dimension_numbers: DimensionNumbersSpec = None) -> Any:
  """Labels every leaf of ``params`` by the module's default rule.

  Args:
    params: the parameter tree (only shapes and key paths are read).
    dimension_numbers: the optimizer's dimension numbers (as in
      :func:`orthax.orthogonalize`); they make ndim>2 leaves matrices.

  Returns:
    A tree like ``params`` of ``"matrix"`` / ``"adamw"``.
  """
  specs = iter(resolve_dimension_numbers(dimension_numbers, params))
  leaves_with_path = jax.tree_util.tree_leaves_with_path(params)
  labels = []
  for kp, leaf in leaves_with_path:
    spec = next(specs)
    ndim = jnp.ndim(leaf)
    if _is_embedding_or_head(kp) or ndim < 2:
      labels.append(ADAMW)
    elif ndim == 2 or spec is not None:
      labels.append(MATRIX)
    else:
      labels.append(ADAMW)
  return jax.tree.unflatten(jax.tree.structure(params), labels)


def _check_label(path: str, shape: tuple[int, ...], label: Any) -> str:
  if isinstance(label, (bool, np.bool_)):
    return MATRIX if label else ADAMW
  if isinstance(label, str) and label in (MATRIX, ADAMW):
    return label
  raise ValueError(
      f"label for leaf {path} (shape {shape}) is {label!r}; expected "
      f"{MATRIX!r} or {ADAMW!r} "
      "(or True/False, True meaning matrix).")


def resolve_labels(label_fn: LabelSpec,
                   dimension_numbers: DimensionNumbersSpec) -> Callable[[Any], Any]:
  """Returns ``params -> labels`` for :func:`optax.partition`.

  The returned function raises a ``TypeError`` naming the first leaf whose
  dtype is not a supported float (see the module docstring).

  Args:
    label_fn: ``None`` for the default rule, a callable on the params, or a
      tree of labels.
    dimension_numbers: passed to the default rule.
  """

  def labels(params):
    for kp, x in jax.tree_util.tree_leaves_with_path(params):
      check_float(jax.tree_util.keystr(kp), x, "orthax.labels")
    if label_fn is None:
      return default_labels(params, dimension_numbers)
    tree = label_fn(params) if callable(label_fn) else label_fn
    treedef = jax.tree.structure(params)
    try:
      flat = treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
      raise ValueError(
          "label_fn must give one label per leaf of the params (a tree of the "
          f"same structure); it does not match: {e}") from e
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return treedef.unflatten([
        _check_label(jax.tree_util.keystr(kp), jnp.shape(x), l)
        for (kp, x), l in zip(leaves, flat)])

  return labels
