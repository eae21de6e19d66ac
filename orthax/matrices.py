"""How a parameter leaf is seen as a stack of matrices.

Every matrix transform in orthax works on leaves viewed as ``(batch, fan_in,
fan_out)``: a 2-D leaf ``(fan_in, fan_out)`` is one matrix (``x @ W = y``), a
leaf with more axes needs dimension numbers that say which axes are reduced
(fan_in) and which are output (fan_out); every other axis is a batch axis.

Dimension numbers use optax's own class, :class:`optax.contrib.MuonDimensionNumbers`
(re-exported as ``orthax.MuonDimensionNumbers``). A spec may be given as

* ``None``: every leaf must be 2-D;
* one ``MuonDimensionNumbers``: the same spec for every leaf;
* a tree that is a prefix of the updates, with ``MuonDimensionNumbers`` or
  ``None`` (meaning "2-D default") at its leaves;
* a callable that takes the updates (or params: only shapes matter) and
  returns such a tree.

These transforms see only matrices, so a ``None`` leaf means "2-D" here,
where in ``optax.contrib.muon``'s ``muon_weight_dimension_numbers`` it means
"not a matrix, AdamW". An optax spec tree routed through ``optax.partition``
(which hands these transforms only the matrices) works here unchanged; for
the ready optimizers convert it with :func:`orthax.routing.from_optax`.
``orthax.routing.dimension_numbers(orthax.route(params))`` builds a spec
valid in both places.

This module is the one place that resolves specs, validates leaves and
reshapes them, and its errors name the leaf by its key path.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from optax.contrib import MuonDimensionNumbers

from orthax._tree import broadcast_prefix, map_with_path

DimensionNumbersSpec = (
    MuonDimensionNumbers | Any | Callable[[Any], Any] | None
)

__all__ = [
    "DimensionNumbersSpec",
    "MatrixView",
    "MuonDimensionNumbers",
    "check_float",
    "map_matrices",
    "matrix_views",
    "resolve_dimension_numbers",
]


def _is_spec_leaf(x: Any) -> bool:
  return x is None or isinstance(x, MuonDimensionNumbers)


def resolve_dimension_numbers(
    spec: DimensionNumbersSpec, tree: Any
) -> list[MuonDimensionNumbers | None]:
  """Returns one spec (or ``None``) per leaf of ``tree``, in leaf order.

  Args:
    spec: dimension numbers as described in the module docstring.
    tree: the updates (or params) the spec describes.

  Returns:
    A list aligned with ``jax.tree.leaves(tree)``.

  Raises:
    ValueError: if a tree spec does not match the structure of ``tree``.
  """
  if callable(spec) and not isinstance(spec, MuonDimensionNumbers):
    spec = spec(tree)
  if _is_spec_leaf(spec):
    return [spec] * len(jax.tree.leaves(tree))
  return broadcast_prefix(
      spec, tree, is_leaf=_is_spec_leaf,
      what="dimension_numbers must be None, a MuonDimensionNumbers, or a tree "
      "that is a prefix of the updates with MuonDimensionNumbers or None at "
      "its leaves; its structure does not match the updates")


def _axis(a: Any) -> bool:
  """Whether ``a`` is an axis index: a Python or NumPy integer, not a bool."""
  return isinstance(a, numbers.Integral) and not isinstance(a, (bool, np.bool_))


def _axes(axis: Any, ndim: int, what: str, where: str,
          shape: tuple[int, ...]) -> tuple[int, ...]:
  if _axis(axis):
    axes = (int(axis),)
  elif isinstance(axis, (tuple, list)) and all(_axis(a) for a in axis):
    axes = tuple(int(a) for a in axis)
  else:
    raise TypeError(
        f"{where}: {what}={axis!r} must be an integer axis or a tuple of them "
        f"(Python or NumPy integers), for a leaf of shape {shape}.")
  if not axes:
    raise ValueError(f"{where}: {what} is empty for a leaf of shape {shape}.")
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
          f"{where}: {what}={axis!r} is out of range for a leaf of shape "
          f"{shape} (ndim {ndim}).")
  normalized = tuple(a % ndim for a in axes)
  if len(set(normalized)) != len(normalized):
    raise ValueError(
        f"{where}: {what}={axis!r} repeats an axis (leaf shape {shape}).")
  return normalized


# The dtypes every transform computes in; float8 formats have no implicit
# promotion to float32 and too few bits for the iteration or the moments.
_FLOATS = tuple(map(jnp.dtype, (jnp.float16, jnp.bfloat16, jnp.float32,
                                jnp.float64)))


def check_float(path: str, leaf: Any, transform: str) -> None:
  """Raises a ``TypeError`` naming the leaf unless its dtype is supported.

  Supported: float16, bfloat16, float32 and float64 (integers, bools,
  complex numbers and float8 formats are not).
  """
  dtype = jnp.result_type(leaf)
  if dtype not in _FLOATS:
    raise TypeError(
        f"{transform}: leaf {path or '(the root)'} has dtype {dtype} (shape "
        f"{jnp.shape(leaf)}); expected one of float32, bfloat16, float16 or "
        "float64.")


@dataclasses.dataclass(frozen=True)
class MatrixView:
  """A leaf seen as a stack of ``(fan_in, fan_out)`` matrices.

  Attributes:
    path: the leaf's key path, as ``jax.tree_util.keystr`` writes it.
    shape: the leaf's shape.
    batch_axes, reduction_axes, output_axes: the leaf's axes by role.
  """

  path: str
  shape: tuple[int, ...]
  batch_axes: tuple[int, ...]
  reduction_axes: tuple[int, ...]
  output_axes: tuple[int, ...]

  @property
  def fan_in(self) -> int:
    return math.prod(self.shape[a] for a in self.reduction_axes)

  @property
  def fan_out(self) -> int:
    return math.prod(self.shape[a] for a in self.output_axes)

  @property
  def batch(self) -> int:
    return math.prod(self.shape[a] for a in self.batch_axes)

  @property
  def _perm(self) -> tuple[int, ...]:
    return self.batch_axes + self.reduction_axes + self.output_axes

  def to_matrices(self, x: jax.Array) -> jax.Array:
    """``x`` (the leaf's shape) -> ``(batch, fan_in, fan_out)``."""
    return jnp.transpose(x, self._perm).reshape(
        self.batch, self.fan_in, self.fan_out)

  def from_matrices(self, x: jax.Array) -> jax.Array:
    """Inverse of :meth:`to_matrices`."""
    perm = self._perm
    x = x.reshape(tuple(self.shape[a] for a in perm))
    return jnp.transpose(x, tuple(perm.index(i) for i in range(len(perm))))


def _view(path: str, leaf: Any, spec: MuonDimensionNumbers | None,
          transform: str) -> MatrixView:
  shape = tuple(jnp.shape(leaf))
  ndim = len(shape)
  where = f"{transform}: leaf {path}"
  if spec is None:
    if ndim != 2:
      raise ValueError(
          f"{where} has shape {shape}; expected a 2-D (fan_in, fan_out) "
          "matrix. Leaves with more than two axes need dimension_numbers="
          "MuonDimensionNumbers(reduction_axis, output_axis); 0-D and 1-D "
          "leaves (biases, norm scales) are not matrices: route them to "
          "another optimizer (orthax.muon does this for you).")
    spec = MuonDimensionNumbers(0, 1)
  if ndim < 2:
    raise ValueError(
        f"{where} has shape {shape}; a matrix transform needs at least 2 axes "
        f"(dimension numbers {spec}).")
  red = _axes(spec.reduction_axis, ndim, "reduction_axis", where, shape)
  out = _axes(spec.output_axis, ndim, "output_axis", where, shape)
  if set(red) & set(out):
    raise ValueError(
        f"{where}: reduction axes {red} and output axes {out} overlap "
        f"(leaf shape {shape}, dimension numbers {spec}).")
  batch = tuple(a for a in range(ndim) if a not in red and a not in out)
  return MatrixView(path, shape, batch, red, out)


def matrix_views(tree: Any, dimension_numbers: DimensionNumbersSpec,
                 transform: str) -> list[MatrixView]:
  """Validates every leaf of ``tree`` and returns its matrix view.

  Args:
    tree: updates (or params).
    dimension_numbers: the spec, as in the module docstring.
    transform: the public name used in error messages.

  Returns:
    One :class:`MatrixView` per leaf, in ``jax.tree.leaves`` order.
  """
  specs = iter(resolve_dimension_numbers(dimension_numbers, tree))
  single = isinstance(dimension_numbers, MuonDimensionNumbers)

  def view(path, leaf):
    check_float(path, leaf, transform)
    try:
      return _view(path, leaf, next(specs), transform)
    except ValueError as e:
      if not single:
        raise
      raise ValueError(
          f"{e} The one MuonDimensionNumbers given is applied to every "
          "leaf; give one per leaf instead: a tree (a prefix of the "
          "updates), a callable on the updates, or "
          "orthax.routing.dimension_numbers(orthax.route(params)), which "
          "finds every leaf's axes.") from None

  return jax.tree.leaves(map_with_path(view, tree),
                         is_leaf=lambda x: isinstance(x, MatrixView))


def map_matrices(fn: Callable[..., Any], tree: Any, *rest: Any,
                 dimension_numbers: DimensionNumbersSpec, transform: str,
                 num_outputs: int = 1) -> Any:
  """Applies ``fn(view, leaf, *rest_leaves)`` to every leaf of ``tree``.

  Every leaf is validated first (float dtype, a matrix under its dimension
  numbers); see :func:`orthax._tree.map_with_path` for ``rest`` and
  ``num_outputs``.
  """
  views = iter(matrix_views(tree, dimension_numbers, transform))
  return map_with_path(lambda _, x, *rs: fn(next(views), x, *rs), tree, *rest,
                       num_outputs=num_outputs)
