"""Argument and state checks shared by the transforms.

Hyperparameters are checked when a transform is built (a ``ValueError`` or
``TypeError`` naming the argument and the transform), state leaves when it is
updated (a state that does not match the optimizer, e.g. a checkpoint of
another configuration, is named, never silently used).
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from orthax._tree import map_with_path

__all__ = ["check_flag", "check_hyperparameter", "check_number",
           "check_same_shape", "check_same_shapes", "check_state_leaf"]


def check_number(transform: str, name: str, value: Any, *,
                 low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False,
                 integer: bool = False) -> float | int:
  """``value`` as a Python number, after checking its type and range.

  Python and NumPy numbers are accepted (``np.float32(0.9)``, ``np.int64(2)``);
  bools, ``None``, strings and arrays of more than one element are not.

  Args:
    transform: the public name used in messages (``"orthax.momentum"``).
    name: the argument's name.
    value: the value given.
    low, high: the bounds of the allowed interval (``None``: unbounded).
    low_open, high_open: exclude the bound itself.
    integer: require an integer.

  Returns:
    ``float(value)`` (``int(value)`` when ``integer``).

  Raises:
    TypeError: not a real number (or not an integer when ``integer``).
    ValueError: outside the interval, or not finite.
  """
  kind = numbers.Integral if integer else numbers.Real
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, kind):
    what = "an integer" if integer else "a real number"
    raise TypeError(f"{transform}: {name} must be {what}, got {value!r} "
                    f"({type(value).__name__}).")
  out = int(value) if integer else float(value)
  if not np.isfinite(out):
    raise ValueError(f"{transform}: {name} must be finite, got {value!r}.")
  too_low = low is not None and (out <= low if low_open else out < low)
  too_high = high is not None and (out >= high if high_open else out > high)
  if too_low or too_high:
    lo = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
    raise ValueError(f"{transform}: {name} must be in {lo}, {hi}, got "
                     f"{value!r}.")
  return out


def check_flag(transform: str, name: str, value: Any) -> bool:
  """``value`` as a Python bool; ``bool`` and ``np.bool_`` only."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{transform}: {name} must be a bool, got {value!r} "
                    f"({type(value).__name__}).")
  return bool(value)


def check_state_leaf(transform: str, path: str, leaf: Any,
                     shape: tuple[int, ...] | None = None) -> None:
  """Raises unless ``leaf`` is an array (of ``shape``, when given).

  A state restored from a checkpoint of another optimizer (a leaf that moved
  between label groups, another ``restore_every``) holds ``None`` or arrays
  of other shapes where this optimizer keeps its statistics.
  """
  ok = leaf is not None and hasattr(leaf, "shape") and hasattr(leaf, "dtype")
  if ok and shape is not None:
    ok = tuple(leaf.shape) == tuple(shape)
  if not ok:
    got = (f"an array of shape {tuple(leaf.shape)}" if hasattr(leaf, "shape")
           else repr(leaf))
    want = "an array" if shape is None else f"an array of shape {tuple(shape)}"
    raise ValueError(
        f"{transform}: the state for leaf {path} is {got}; expected {want}. "
        "The optimizer state does not match this optimizer: it was probably "
        "restored from a checkpoint of another configuration (other labels, "
        "restore_every, sides or dimension numbers). Initialize the state "
        "with this optimizer's init, or restore with the same configuration.")


def check_same_shape(transform: str, path: str, grad: Any, param: Any, *,
                     names: tuple[str, str] = ("gradient", "parameter")
                     ) -> None:
  """Raises unless the gradient and the parameter of a leaf have one shape.

  ``names`` says what the two arrays are in the message (another pair of
  trees, e.g. current and initial parameters).
  """
  if jnp.shape(grad) != jnp.shape(param):
    raise ValueError(
        f"{transform}: leaf {path} has a {names[0]} of shape "
        f"{tuple(jnp.shape(grad))} but its {names[1]} has shape "
        f"{tuple(jnp.shape(param))}; they must match (are the {names[0]}s of "
        "another model or of a different parameter tree?).")


def check_same_shapes(transform: str, updates: Any, params: Any) -> None:
  """:func:`check_same_shape` for every leaf of ``updates`` and ``params``
  (nothing to check when ``params`` is ``None``)."""
  if params is not None:
    map_with_path(lambda path, g, p: check_same_shape(transform, path, g, p),
                  updates, params)


def check_hyperparameter(transform: str, name: str, value: Any,
                         **bounds: Any) -> Any:
  """:func:`check_number`, except that a scalar JAX array passes unchecked.

  ``optax.inject_hyperparams`` calls the factory with the hyperparameters it
  was given as arrays (tracers under ``jit``), whose value cannot be checked
  when the transform is built.
  """
  if isinstance(value, jax.Array) and value.ndim == 0:
    return value
  return check_number(transform, name, value, **bounds)
