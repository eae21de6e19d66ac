"""Tree helpers shared by the transforms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

__all__ = ["map_with_path"]


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
