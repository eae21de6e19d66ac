"""One orbax save and restore, the round trip the resume tests make."""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp


def orbax_round_trip(path, tree: Any, like: Any = None) -> Any:
  """Saves ``tree`` at ``path`` with orbax's ``StandardCheckpointer`` and
  restores it into the structure, shapes and dtypes of ``like`` (``tree``
  itself by default): what a resumed run reads back."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, tree)
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                        tree if like is None else like)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, target)
