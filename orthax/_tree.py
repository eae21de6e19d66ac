"""Tree helpers shared by the transforms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

__all__ = ["broadcast_prefix", "map_with_path"]


def map_with_path(fn: Callable[..., Any], tree: Any, *rest: Any,
                  num_outputs: int = 1) -> Any:
  """Applies ``fn(path, leaf, *rest_leaves)`` to every leaf of ``tree``.

  Args:
    fn: called with the leaf's key path (``jax.tree_util.keystr``), the leaf
      and the matching leaves of ``rest``.
    tree: the tree whose leaves drive the map.
    *rest: trees with the structure of ``tree`` (e.g. optimizer state).
    num_outputs: when above 1, ``fn`` returns that many values and the result
      is a tuple of that many trees, each structured like ``tree``.

  Returns:
    A tree like ``tree``, or a tuple of ``num_outputs`` such trees.
  """
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  rest_leaves = [treedef.flatten_up_to(r) for r in rest]
  outs = [fn(jax.tree_util.keystr(kp), x, *rs)
          for (kp, x), *rs in zip(leaves_with_path, *rest_leaves)]
  if num_outputs == 1:
    return treedef.unflatten(outs)
  columns = list(zip(*outs)) if outs else [()] * num_outputs
  return tuple(treedef.unflatten(list(c)) for c in columns)


class _Box:
  """Holds a value so that it is a tree leaf (``None`` and NamedTuples such
  as ``MuonDimensionNumbers`` are not)."""

  __slots__ = ("value",)

  def __init__(self, value: Any):
    self.value = value


def broadcast_prefix(prefix: Any, tree: Any, *,
                     is_leaf: Callable[[Any], bool], what: str) -> list[Any]:
  """One value of ``prefix`` per leaf of ``tree``, in leaf order.

  Args:
    prefix: a tree that is a prefix of ``tree``: each of its leaves (as
      ``is_leaf`` says) stands for the whole subtree of ``tree`` below it.
    tree: the full tree.
    is_leaf: which nodes of ``prefix`` are its leaves.
    what: the start of the error message on a mismatch (JAX's account of
      where the structures differ follows it).

  Raises:
    ValueError: ``prefix`` is not a prefix of ``tree``.
  """
  # Box first: a NamedTuple value is itself a pytree node, so on a mismatch
  # JAX's error would walk into it and blame the wrong key path.
  boxed = jax.tree.map(_Box, prefix, is_leaf=is_leaf)
  try:
    full = jax.tree.map(lambda b, sub: jax.tree.map(lambda _: b, sub),
                        boxed, tree)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{what}: {e}") from e
  return [b.value for b in jax.tree.leaves(
      full, is_leaf=lambda x: isinstance(x, _Box))]
