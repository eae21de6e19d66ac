"""Sharded orthogonalization: every device takes whole matrices for its share.

Under FSDP every device holds a slice of every matrix, and Newton–Schulz needs
whole matrices. Instead of gathering every matrix everywhere (which repeats
all the FLOPs on every device) or letting XLA partition the iteration (which
puts collectives inside every step), :func:`sharded_polar` runs inside one
``jax.shard_map``:

1. Each device cuts its slice of every matrix into a send buffer, one chunk
   per destination device, and one ``all_to_all`` hands every device the
   slices, from all devices, of the matrices it was assigned: whole matrices.
2. Each device orthogonalizes its matrices with the same ``polar`` function as
   the unsharded path (one stacked call per slot shape).
3. The reverse ``all_to_all`` sends every slice of the results home.

Two collectives per dtype, whatever the number of matrices or steps.

The assignment is a static :class:`Plan` of *slots*. SPMD means every device
runs the same program, so every device gets the same list of slot shapes.
Each shape group fills ``len // devices`` full layers of slots; the leftovers
(12 layers on 8 devices leave 4) share extra layers, largest cost first, and a
smaller matrix may sit zero-padded in a larger slot (the polar factor of
``[[A, 0], [0, 0]]`` is ``[[polar(A), 0], [0, 0]]``, and Frobenius
normalization and every Newton–Schulz step keep the zeros), so the padding
waste is one partial layer of the largest leftover shape rather than one per
shape group.

Leaves that are not sharded over the axis along a matrix axis (replicated,
sharded along a batch axis, or not divisible) are orthogonalized where they
are, with no collective.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, PartitionSpec as P

from orthax.matrices import MatrixView
from orthax.polar.newton_schulz import newton_schulz_flops

__all__ = ["Plan", "make_plan", "resolve_mesh", "sharded_polar"]


def resolve_mesh(mesh, mesh_axis: str | None):
  """The mesh and axis to shard over, or ``None`` for the unsharded path.

  Neither given: the unsharded path, even under ``jax.set_mesh`` (a mesh set
  for the model does not by itself opt in). ``mesh_axis`` alone takes the
  mesh set with ``jax.set_mesh``. With a mesh, ``mesh_axis`` must name one of
  its axes; ``None`` is allowed only for a one-axis mesh. An axis of size 1
  means nothing to share: unsharded path.
  """
  if mesh is None:
    if mesh_axis is None:
      return None
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
      raise ValueError(
          f"orthax.orthogonalize: mesh_axis={mesh_axis!r} but no mesh was "
          "given and none is set with jax.set_mesh.")
  if mesh_axis is None:
    if len(mesh.axis_names) != 1:
      raise ValueError(
          "orthax.orthogonalize: mesh_axis is required with a mesh of several "
          f"axes {tuple(mesh.axis_names)}: name the axis that shards the "
          "parameters (FSDP).")
    mesh_axis = mesh.axis_names[0]
  if mesh_axis not in mesh.axis_names:
    raise ValueError(
        f"orthax.orthogonalize: mesh_axis={mesh_axis!r} is not an axis of the "
        f"mesh {dict(mesh.shape)}.")
  if mesh.shape[mesh_axis] == 1:
    return None
  return mesh, mesh_axis


# ---------------------------------------------------------------------------
# Static plan
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Kind:
  """How one leaf's matrices are cut: the recipe shared by its slices.

  ``view``: the leaf's global matrix view; ``dim``: its axis sharded over
  the mesh axis (a fan_in or fan_out axis).
  """

  view: MatrixView
  dim: int

  @property
  def mat_axes(self) -> tuple[int, ...]:
    return self.view.reduction_axes + self.view.output_axes

  @property
  def order(self) -> tuple[int, ...]:
    """The matrix axes, the sharded one first: slices are contiguous."""
    return (self.dim,) + tuple(a for a in self.mat_axes if a != self.dim)

  @property
  def dims(self) -> tuple[int, ...]:
    return tuple(self.view.shape[a] for a in self.order)

  @property
  def wide(self) -> tuple[int, int]:
    """``(m, n)`` of the wide orientation."""
    return tuple(sorted((self.view.fan_in, self.view.fan_out)))

  @property
  def tall(self) -> bool:
    return self.view.fan_in > self.view.fan_out

  def size(self, devices: int) -> int:  # elements of one device's slice
    return math.prod(self.dims) // devices


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which device orthogonalizes which matrix, in which slot.

  Attributes:
    devices: size of the mesh axis.
    slot_shapes: wide ``(m, n)`` of each slot, the same list on every device.
    regions: elements of each slot's slice in a send chunk (the largest
      matrix that any device puts there).
    assignment: ``assignment[j][t]`` = ``(leaf, batch index)`` of the matrix
      in device ``j``'s slot ``t``, or ``None`` (padding).
    flops_per_device: matmul FLOPs each device spends.
    flops_total: matmul FLOPs of all the matrices, unpadded.
  """

  devices: int
  slot_shapes: tuple[tuple[int, int], ...]
  regions: tuple[int, ...]
  assignment: tuple[tuple[tuple[int, int] | None, ...], ...]
  flops_per_device: int
  flops_total: int

  @property
  def balance(self) -> float:
    """Per-device FLOPs / (total / devices): 1 is perfect."""
    return self.flops_per_device * self.devices / max(self.flops_total, 1)


def make_plan(kinds: dict[int, _Kind], batches: dict[int, int], devices: int,
              *, steps: int = 5, gram="auto", gram_restart=2) -> Plan:
  """Packs the matrices of ``kinds`` (``batches[leaf]`` each) into slots.

  Full layers first (every device one slot of a shape, as long as a shape
  group has ``devices`` matrices left), then the leftovers: a layer of the
  most expensive leftover shape, filled with its leftovers and then with any
  smaller leftovers that fit, until none is left.
  """
  cost = lambda s: newton_schulz_flops(*s, steps, gram=gram,
                                      gram_restart=gram_restart)
  by_shape: dict[tuple[int, int], list[tuple[int, int]]] = {}
  for leaf, kind in kinds.items():
    by_shape.setdefault(kind.wide, []).extend(
        (leaf, b) for b in range(batches[leaf]))
  layers: list[tuple[tuple[int, int], list[tuple[int, int] | None]]] = []
  leftovers: dict[tuple[int, int], list[tuple[int, int]]] = {}
  for shape, mats in by_shape.items():
    full = len(mats) // devices * devices
    for start in range(0, full, devices):
      layers.append((shape, mats[start:start + devices]))
    if full < len(mats):
      leftovers[shape] = mats[full:]
  while leftovers:
    shape = max(leftovers, key=lambda s: (cost(s), s))
    layer: list[tuple[int, int] | None] = leftovers.pop(shape)
    for other in sorted(leftovers, key=lambda s: (-cost(s), s)):
      if other[0] <= shape[0] and other[1] <= shape[1]:
        room = devices - len(layer)
        layer.extend(leftovers[other][:room])
        leftovers[other] = leftovers[other][room:]
        if not leftovers[other]:
          del leftovers[other]
    layers.append((shape, layer + [None] * (devices - len(layer))))
  slot_shapes = tuple(shape for shape, _ in layers)
  regions = tuple(
      max((kinds[m[0]].size(devices) for m in layer if m is not None),
          default=0)
      for _, layer in layers)
  assignment = tuple(tuple(layer[j] for _, layer in layers)
                     for j in range(devices))
  total = sum(cost(kinds[leaf].wide) * batches[leaf] for leaf in kinds)
  return Plan(devices, slot_shapes, regions, assignment,
              sum(cost(s) for s in slot_shapes), total)


# ---------------------------------------------------------------------------
# Inside shard_map
# ---------------------------------------------------------------------------


def _matrix_axis_of(spec, axis: str) -> int | None:
  """The leaf axis sharded over ``axis`` in ``spec``, if any."""
  for dim, entry in enumerate(spec):
    names = entry if isinstance(entry, tuple) else (entry,)
    if axis in names:
      return dim
  return None


def _leaf_spec(x) -> Any:
  """The leaf's PartitionSpec as the tracer (or array) knows it."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  return getattr(sharding, "spec", None) or P()


def _slices(kind: _Kind, local: jax.Array, devices: int) -> jax.Array:
  """A leaf's local block -> ``(batch, elements)``: one flat slice a matrix."""
  v = kind.view
  x = jnp.transpose(local, v.batch_axes + kind.order)
  return x.reshape(v.batch, kind.size(devices))


def _unslice(kind: _Kind, flat: jax.Array, devices: int) -> jax.Array:
  """Inverse of :func:`_slices` for the leaf's local block."""
  v = kind.view
  local_dims = (kind.dims[0] // devices,) + kind.dims[1:]
  x = flat.reshape(tuple(v.shape[a] for a in v.batch_axes) + local_dims)
  perm = v.batch_axes + kind.order
  return jnp.transpose(x, tuple(perm.index(i) for i in range(len(perm))))


def _whole(kind: _Kind, pieces: jax.Array) -> jax.Array:
  """``(devices, elements)`` slices of one matrix -> the wide ``(m, n)`` matrix."""
  v = kind.view
  x = pieces[:, :kind.size(pieces.shape[0])].reshape(kind.dims)
  x = jnp.transpose(x, tuple(kind.order.index(a) for a in kind.mat_axes))
  x = x.reshape(v.fan_in, v.fan_out)
  return x.T if kind.tall else x


def _pieces(kind: _Kind, wide: jax.Array, devices: int, region: int) -> jax.Array:
  """Inverse of :func:`_whole`, padded to ``(devices, region)``."""
  v = kind.view
  x = wide.T if kind.tall else wide
  x = x.reshape(tuple(v.shape[a] for a in kind.mat_axes))
  x = jnp.transpose(x, tuple(kind.mat_axes.index(a) for a in kind.order))
  x = x.reshape(devices, kind.size(devices))
  return jnp.pad(x, ((0, 0), (0, region - x.shape[1])))


def _exchange(plan: Plan, kinds: dict[int, _Kind], slices: dict[int, jax.Array],
              axis: str, polar: Callable[[jax.Array], jax.Array],
              dtype) -> dict[int, jax.Array]:
  """The two all_to_alls and the local polar step, for one dtype."""
  devices = plan.devices
  offsets = np.cumsum((0,) + plan.regions)
  # Send: chunk j holds, slot by slot, this device's slice of device j's
  # matrices (static: every device holds a slice of every matrix).
  chunks = []
  for j in range(devices):
    parts = []
    for t, mat in enumerate(plan.assignment[j]):
      region = plan.regions[t]
      if mat is None:
        parts.append(jnp.zeros((region,), dtype))
      else:
        s = slices[mat[0]][mat[1]]
        parts.append(jnp.pad(s, (0, region - s.shape[0])))
    chunks.append(jnp.concatenate(parts))
  recv = jax.lax.all_to_all(jnp.stack(chunks), axis, 0, 0, tiled=True)
  # What sits in each slot depends on the device: build the slot from each
  # kind the plan puts there on some device, and pick by the device index.
  me = jax.lax.axis_index(axis)
  slot_values, slot_kinds = [], []
  for t, (m, n) in enumerate(plan.slot_shapes):
    region = recv[:, offsets[t]:offsets[t + 1]]
    table = [None if plan.assignment[j][t] is None
             else plan.assignment[j][t][0] for j in range(devices)]
    leaves = sorted({leaf for leaf in table if leaf is not None})
    which = jnp.asarray([-1 if leaf is None else leaves.index(leaf)
                         for leaf in table])[me]
    value = jnp.zeros((m, n), dtype)
    for k, leaf in enumerate(leaves):
      w = _whole(kinds[leaf], region)
      w = jnp.pad(w, ((0, m - w.shape[0]), (0, n - w.shape[1])))
      value = w if len(leaves) == 1 and None not in table else jnp.where(
          which == k, w, value)
    slot_values.append(value)
    slot_kinds.append((leaves, which))
  # Orthogonalize: one stacked call per slot shape. The barrier materializes
  # each stack row-major: XLA:CPU otherwise folds a slot's transpose into the
  # iteration's first bf16 dot, whose runtime kernel lacks that layout
  # ("Unsupported element type for DotThunk: BF16 x BF16 = F32").
  results: list[Any] = [None] * len(plan.slot_shapes)
  for shape in dict.fromkeys(plan.slot_shapes):
    idx = [t for t, s in enumerate(plan.slot_shapes) if s == shape]
    out = polar(jax.lax.optimization_barrier(
        jnp.stack([slot_values[t] for t in idx])))
    for i, t in enumerate(idx):
      results[t] = out[i]
  # Send back: cut each result into the slices of its own leaf's layout.
  back = []
  for t, (leaves, which) in enumerate(slot_kinds):
    region = plan.regions[t]
    piece = jnp.zeros((devices, region), dtype)
    for k, leaf in enumerate(leaves):
      m, n = kinds[leaf].wide
      p = _pieces(kinds[leaf], results[t][:m, :n], devices, region)
      piece = p if len(leaves) == 1 else jnp.where(which == k, p, piece)
    back.append(piece)
  home = jax.lax.all_to_all(jnp.concatenate(back, axis=1), axis, 0, 0,
                            tiled=True)
  # home[j] holds, slot by slot, this device's slices of device j's results.
  rows: dict[int, list[Any]] = {leaf: [None] * slices[leaf].shape[0]
                                for leaf in kinds}
  for j in range(devices):
    for t, mat in enumerate(plan.assignment[j]):
      if mat is not None:
        size = kinds[mat[0]].size(devices)
        rows[mat[0]][mat[1]] = home[j, offsets[t]:offsets[t] + size]
  return {leaf: jnp.stack(r) for leaf, r in rows.items()}


def sharded_polar(polar: Callable[[jax.Array], jax.Array],
                  local: Callable[[list[MatrixView], list[jax.Array]], list],
                  views: list[MatrixView], leaves: list[jax.Array], mesh,
                  axis: str, *, steps: int, gram, gram_restart) -> list:
  """Orthogonalizes every leaf, each device whole matrices for its share.

  Args:
    polar: ``(batch, m, n) -> (batch, m, n)`` on wide stacks (the unsharded
      path's function).
    local: ``(views, leaves) -> results`` for leaves computed where they are.
    views: the leaves' global matrix views.
    leaves: the updates, sharded over ``mesh``.
    mesh: a ``Mesh`` or ``AbstractMesh``.
    axis: the mesh axis that shards the parameters.
    steps, gram, gram_restart: the iteration's settings (for the plan's
      costs).

  Returns:
    The results, in the leaves' original shardings.
  """
  devices = mesh.shape[axis]
  explicit = mesh.axis_types[mesh.axis_names.index(axis)] == AxisType.Explicit
  in_specs, kinds, originals = [], {}, []
  for i, (view, x) in enumerate(zip(views, leaves)):
    spec = _leaf_spec(x)
    originals.append(spec)
    dim = _matrix_axis_of(spec, axis)
    if dim is None and not explicit:
      # Auto axes hide the layout while tracing: assume the common FSDP
      # layout, the largest matrix axis that divides evenly (the first of
      # equals); XLA reshards if it is not so.
      fits = [a for a in view.reduction_axes + view.output_axes
              if view.shape[a] % devices == 0]
      dim = max(fits, key=lambda a: view.shape[a], default=None)
    divisible = dim is not None and view.shape[dim] % devices == 0
    if divisible and dim not in view.batch_axes:
      kinds[i] = _Kind(view, dim)
    entries = [None] * len(view.shape)
    if divisible:
      entries[dim] = axis
    in_specs.append(P(*entries))
  if explicit:  # drop other axes (e.g. tensor parallel): whole matrices
    leaves = [x if tuple(s) == tuple(o) else jax.sharding.reshard(x, s)
              for x, s, o in zip(leaves, in_specs, originals)]

  def body(*blocks):
    out: list[Any] = list(blocks)
    rest = [i for i in range(len(blocks)) if i not in kinds]
    if rest:
      local_views = [dataclasses.replace(views[i], shape=blocks[i].shape)
                     for i in rest]
      for i, r in zip(rest, local(local_views, [blocks[i] for i in rest])):
        out[i] = r
    by_dtype: dict[Any, list[int]] = {}
    for i in kinds:
      by_dtype.setdefault(jnp.dtype(blocks[i].dtype), []).append(i)
    for dtype, members in by_dtype.items():
      group = {i: kinds[i] for i in members}
      plan = make_plan(group, {i: views[i].batch for i in members}, devices,
                       steps=steps, gram=gram, gram_restart=gram_restart)
      slices = {i: _slices(kinds[i], blocks[i], devices) for i in members}
      done = _exchange(plan, group, slices, axis, polar, dtype)
      for i in members:
        out[i] = _unslice(kinds[i], done[i], devices)
    return tuple(out)

  out = jax.shard_map(body, mesh=mesh, in_specs=tuple(in_specs),
                      out_specs=tuple(in_specs))(*leaves)
  if explicit:
    out = [y if tuple(s) == tuple(o) else jax.sharding.reshard(y, o)
           for y, s, o in zip(out, in_specs, originals)]
  return list(out)
