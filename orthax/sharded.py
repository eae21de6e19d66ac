"""Sharded matrix updates: every device takes whole matrices for its share.

Under FSDP every device holds a slice of every matrix, and Newton–Schulz (or
Pion's rotation) needs whole matrices. Instead of gathering every matrix
everywhere (which repeats all the FLOPs on every device) or letting XLA
partition the iteration (which puts collectives inside every step),
:func:`sharded_map` runs inside one ``jax.shard_map``:

1. Each device cuts its slice of every matrix into a send buffer, one chunk
   per destination device, and one ``all_to_all`` hands every device the
   slices, from all devices, of the matrices it was assigned: whole matrices.
2. Each device computes its matrices with the same function as the unsharded
   path (one stacked call per slot shape).
3. The reverse ``all_to_all`` sends every slice of the results home.

Two collectives per dtype, whatever the number of matrices or steps. A matrix
may travel with several *parts* that its owner needs together (Pion sends the
gradient, the weights and the moments of both sides).

The assignment is a static :class:`Plan` of *slots*. SPMD means every device
runs the same program, so every device gets the same list of slot shapes.
Matrices are grouped by how they are cut (their parts' shapes, sharded axes
and axis orders): each group fills ``len // devices`` full layers of slots,
where matrix ``f * devices + j`` goes to device ``j``, so that a group's send
buffer and its whole matrices are one reshape and transpose of all its
slices, whatever their number. The leftovers (12 layers on 8 devices leave 4)
share extra layers, largest cost first, one matrix at a time. With padding
allowed (Newton–Schulz) a smaller matrix may sit zero-padded in a larger slot
(the polar factor of ``[[A, 0], [0, 0]]`` is ``[[polar(A), 0], [0, 0]]``, and
Frobenius normalization and every Newton–Schulz step keep the zeros), so the
padding waste is one partial layer of the largest leftover shape rather than
one per shape group.

Leaves that are not sharded over the axis along a matrix axis (replicated,
sharded along a batch axis, or not divisible) are computed where they are,
with no collective (a leaf of several parts only if they are all sharded
along their first batch axis; else it is gathered whole).

Under ``Explicit`` mesh axes the leaves' layout is read from their types, and
:func:`resolve_mesh` finds the axis there when none is given; other axes
(e.g. tensor parallel) are gathered first. The results return in the
leaves' own shardings.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from orthax.matrices import MatrixView
from orthax.polar.newton_schulz import newton_schulz_flops

__all__ = ["Plan", "make_plan", "place_state", "replicated", "resolve_mesh",
           "sharded_map", "sharded_polar"]

# The whole shape of each part of a matrix, (rows, cols) or None for a part
# that the matrix does not carry: what a slot must hold.
Signature = tuple


def _explicit_sharding(x) -> NamedSharding | None:
  """The leaf's sharding when its type names mesh axes (Explicit axes).

  A concrete array's own, whose mesh has devices (outside ``jit`` new arrays
  can be put there); a tracer's type, whose mesh is abstract.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if spec is None or all(entry is None for entry in spec):
    return None
  if not isinstance(x, jax.core.Tracer) and isinstance(
      getattr(x, "sharding", None), NamedSharding):
    return x.sharding
  return sharding


def _names(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return entry if isinstance(entry, tuple) else (entry,)


def _detect(views: Sequence[MatrixView], leaves: Sequence[Any]):
  """The mesh axis the leaves' own (Explicit) shardings shard them over.

  The axis that shards matrix axes of the most elements (then: any axes of
  the most elements, then the larger axis); axes of size 1 shard nothing.
  ``None`` when no leaf is sharded.
  """
  scores: dict[str, tuple[int, int]] = {}
  mesh = None
  for view, x in zip(views, leaves):
    sharding = _explicit_sharding(x)
    if sharding is None:
      continue
    for dim, entry in enumerate(sharding.spec):
      for name in _names(entry):
        if sharding.mesh.shape[name] > 1:
          mesh = sharding.mesh
          matrix, total = scores.get(name, (0, 0))
          size = math.prod(view.shape)
          scores[name] = (matrix + size * (dim not in view.batch_axes),
                          total + size)
  if not scores:
    return None
  return mesh, max(scores, key=lambda name: scores[name] + (mesh.shape[name],))


def resolve_mesh(mesh, mesh_axis: str | None, views: Sequence[MatrixView] = (),
                 leaves: Sequence[Any] = (), *,
                 transform: str = "orthax.orthogonalize"):
  """The mesh and axis to shard over, or ``None`` for the unsharded path.

  Neither given: the axis that the leaves' own shardings use, when their
  types show it (``Explicit`` mesh axes; see :func:`_detect`); otherwise the
  unsharded path, even under ``jax.set_mesh``. ``mesh_axis`` alone takes the
  mesh set with ``jax.set_mesh``. With a mesh, ``mesh_axis`` must name one of
  its axes; ``None`` is allowed only for a one-axis mesh. An axis of size 1
  means nothing to share: unsharded path. ``transform`` names the caller in
  errors.
  """
  if mesh is None:
    if mesh_axis is None:
      return _detect(views, leaves)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
      raise ValueError(
          f"{transform}: mesh_axis={mesh_axis!r} but no mesh was "
          "given and none is set with jax.set_mesh.")
  if mesh_axis is None:
    if len(mesh.axis_names) != 1:
      raise ValueError(
          f"{transform}: mesh_axis is required with a mesh of several "
          f"axes {tuple(mesh.axis_names)}: name the axis that shards the "
          "parameters (FSDP).")
    mesh_axis = mesh.axis_names[0]
  if mesh_axis not in mesh.axis_names:
    raise ValueError(
        f"{transform}: mesh_axis={mesh_axis!r} is not an axis of the "
        f"mesh {dict(mesh.shape)}.")
  if mesh.shape[mesh_axis] == 1:
    return None
  return mesh, mesh_axis


def replicated(fn: Callable[[list], list], leaves: list,
               like: list | None = None) -> list:
  """``fn`` on the leaves gathered whole, its results sharded like ``like``.

  For the unsharded path: leaves whose types carry a sharding (``Explicit``
  axes) cannot be concatenated with other shardings or multiplied along a
  sharded axis, so they are resharded to replicated first, and each result
  goes back to the sharding of its entry of ``like`` (default: ``leaves``,
  one result each). Other leaves (and ``None`` entries) pass as they are;
  under ``Auto`` axes XLA places them.
  """
  sharding = lambda x: None if x is None else _explicit_sharding(x)
  whole = [x if sharding(x) is None else jax.sharding.reshard(
      x, NamedSharding(sharding(x).mesh, P())) for x in leaves]
  return [y if y is None or sharding(o) is None else
          jax.sharding.reshard(y, sharding(o))
          for y, o in zip(fn(whole), leaves if like is None else like)]


def place_state(x: jax.Array, view: MatrixView, param, sharding) -> jax.Array:
  """A per-matrix state leaf ``(batch, ...)`` of ``param``, sharded like it.

  Over the mesh axis of ``sharding`` (the ``(mesh, axis)`` of
  :func:`resolve_mesh`): along the state's first axis where ``param`` is
  sharded along its first batch axis, along its second where ``param`` is
  sharded along a matrix axis, if the axis divides it; else replicated. As
  it is without a sharded path or under ``Auto`` axes (XLA places it).
  """
  if sharding is None:
    return x
  mesh, axis = sharding
  if mesh.axis_types[mesh.axis_names.index(axis)] != AxisType.Explicit:
    return x
  devices = mesh.shape[axis]
  dim = _part_dim(view, param, axis, devices, True)
  if dim is not None:
    dim = (0 if view.batch_axes[:1] == (dim,) else
           1 if dim not in view.batch_axes else None)
  entries = [None] * x.ndim
  if dim is not None and x.shape[dim] % devices == 0:
    entries[dim] = axis
  return jax.sharding.reshard(x, NamedSharding(mesh, P(*entries)))


# ---------------------------------------------------------------------------
# How matrices are cut
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Cut:
  """How one part of a matrix is cut into per-device slices.

  Shared by every matrix of a group, whatever leaf it comes from.

  Attributes:
    dims: the part's matrix axes in slice order, the sharded one first, so
      that device ``i``'s slice is the ``i``-th contiguous block of the part
      flattened in this order.
    perm: the transpose from that order to (reduction axes, output axes).
    shape: the whole matrix, ``(rows, cols)``, as the computation sees it.
    transposed: whether that is the transpose of ``(fan_in, fan_out)``.
  """

  dims: tuple[int, ...]
  perm: tuple[int, ...]
  shape: tuple[int, int]
  transposed: bool

  def size(self, devices: int) -> int:
    """Elements of one device's slice."""
    return math.prod(self.dims) // devices

  def _axes(self, lead: int, perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(range(lead)) + tuple(lead + a for a in perm)

  def whole(self, pieces: jax.Array) -> jax.Array:
    """``(..., devices, size)`` slices -> ``(..., rows, cols)`` matrices."""
    lead = pieces.shape[:-2]
    x = pieces.reshape(lead + self.dims)
    x = jnp.transpose(x, self._axes(len(lead), self.perm))
    rows, cols = self.shape[::-1] if self.transposed else self.shape
    x = x.reshape(lead + (rows, cols))
    return jnp.swapaxes(x, -1, -2) if self.transposed else x

  def pieces(self, whole: jax.Array, devices: int) -> jax.Array:
    """Inverse of :meth:`whole`."""
    lead = whole.shape[:-2]
    x = jnp.swapaxes(whole, -1, -2) if self.transposed else whole
    x = x.reshape(lead + tuple(self.dims[a] for a in self.perm))
    inverse = tuple(self.perm.index(a) for a in range(len(self.perm)))
    x = jnp.transpose(x, self._axes(len(lead), inverse))
    return x.reshape(lead + (devices, self.size(devices)))


@dataclasses.dataclass(frozen=True)
class _Kind:
  """A leaf cut along its axis ``dim`` (a matrix axis) over the mesh axis.

  ``view``: the leaf's global matrix view; ``wide``: whether tall matrices
  are seen through their transpose.
  """

  view: MatrixView
  dim: int
  wide: bool = True

  @property
  def _order(self) -> tuple[int, ...]:
    """The matrix axes, the sharded one first: slices are contiguous."""
    mat_axes = self.view.reduction_axes + self.view.output_axes
    return (self.dim,) + tuple(a for a in mat_axes if a != self.dim)

  @property
  def cut(self) -> _Cut:
    v = self.view
    mat_axes = v.reduction_axes + v.output_axes
    transposed = self.wide and v.fan_in > v.fan_out
    shape = (v.fan_out, v.fan_in) if transposed else (v.fan_in, v.fan_out)
    return _Cut(tuple(v.shape[a] for a in self._order),
                tuple(self._order.index(a) for a in mat_axes), shape,
                transposed)

  def slices(self, local: jax.Array, devices: int) -> jax.Array:
    """The leaf's local block -> ``(batch, size)``: one slice a matrix."""
    x = jnp.transpose(local, self.view.batch_axes + self._order)
    return x.reshape(self.view.batch, self.cut.size(devices))

  def unslice(self, flat: jax.Array, devices: int) -> jax.Array:
    """Inverse of :meth:`slices`."""
    v, order = self.view, self.view.batch_axes + self._order
    local = tuple(v.shape[a] // (devices if a == self.dim else 1)
                  for a in order)
    x = flat.reshape(local)
    return jnp.transpose(x, tuple(order.index(a) for a in range(len(order))))


# ---------------------------------------------------------------------------
# Static plan
# ---------------------------------------------------------------------------


def _fits(small: Signature, large: Signature, pad: bool) -> bool:
  if not pad:
    return small == large
  return all((s is None) == (l is None) and (s is None or (
      s[0] <= l[0] and s[1] <= l[1])) for s, l in zip(small, large))


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which device computes which matrix, in which slot.

  Matrices are named ``(group, row)``: the ``row``-th matrix of a group of
  matrices cut alike.

  Attributes:
    devices: size of the mesh axis.
    full: full layers of each group: its matrix ``f * devices + j`` (``f <
      full[group]``) sits in device ``j``'s ``f``-th slot of the group.
    layers: the leftover layers, each ``(signature, occupants)``: the slot
      shape and, per device, the ``(group, row)`` it computes there or
      ``None`` (padding).
    flops_per_device: FLOPs (by the plan's cost) each device spends.
    flops_total: FLOPs of all the matrices, unpadded.
  """

  devices: int
  full: tuple[int, ...]
  layers: tuple[tuple[Signature, tuple[tuple[int, int] | None, ...]], ...]
  flops_per_device: int
  flops_total: int

  @property
  def balance(self) -> float:
    """Per-device FLOPs / (total / devices): 1 is perfect."""
    return self.flops_per_device * self.devices / max(self.flops_total, 1)


def make_plan(groups: Sequence[tuple[Signature, int]], devices: int, *,
              cost: Callable[[Signature], int], pad: bool) -> Plan:
  """Packs ``groups`` (each ``(signature, number of matrices)``) into slots.

  Full layers first (as long as a group has ``devices`` matrices left), then
  the leftovers: a layer of the most expensive leftover signature, filled
  with its leftovers and then (``pad``) with any smaller leftovers that fit,
  until none is left.
  """
  full = tuple(count // devices for _, count in groups)
  pending: dict[Signature, list[tuple[int, int]]] = {}
  for g, (signature, count) in enumerate(groups):
    pending.setdefault(signature, []).extend(
        (g, row) for row in range(full[g] * devices, count))
  pending = {s: mats for s, mats in pending.items() if mats}
  # by cost, then by shape (absent parts count as 0×0): a fixed order
  order = lambda s: (cost(s), tuple(x or (0, 0) for x in s))
  layers = []
  while pending:
    signature = max(pending, key=order)
    layer: list[tuple[int, int] | None] = []
    for other in sorted(pending, key=order, reverse=True):
      if _fits(other, signature, pad):
        room = devices - len(layer)
        layer.extend(pending[other][:room])
        pending[other] = pending[other][room:]
        if not pending[other]:
          del pending[other]
    layers.append((signature, tuple(layer + [None] * (devices - len(layer)))))
  total = sum(cost(s) * count for s, count in groups)
  per_device = (sum(cost(s) * f for (s, _), f in zip(groups, full)) +
                sum(cost(s) for s, _ in layers))
  return Plan(devices, full, tuple(layers), per_device, total)


# ---------------------------------------------------------------------------
# Inside shard_map
# ---------------------------------------------------------------------------


def _signature(cuts: tuple[_Cut | None, ...]) -> Signature:
  return tuple(c and c.shape for c in cuts)


def _sizes(cuts: tuple[_Cut | None, ...], devices: int) -> list[int]:
  return [0 if c is None else c.size(devices) for c in cuts]


def _join(parts: list[jax.Array | None], cuts, devices: int) -> jax.Array:
  """Whole parts ``(..., rows, cols)`` -> ``(..., devices, total size)``."""
  pieces = [c.pieces(x, devices) for x, c in zip(parts, cuts)
            if c is not None]
  return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-1)


def _split(block: jax.Array, cuts) -> list[jax.Array | None]:
  """``(..., devices, total size)`` -> whole parts ``(..., rows, cols)``."""
  devices, out, start = block.shape[-2], [], 0
  for c in cuts:
    if c is None:
      out.append(None)
      continue
    size = c.size(devices)
    out.append(c.whole(block[..., start:start + size]))
    start += size
  return out


def _pad_to(x: jax.Array | None, shape) -> jax.Array | None:
  if x is None:
    return None
  return jnp.pad(x, ((0, shape[0] - x.shape[0]), (0, shape[1] - x.shape[1])))


def _select(which: jax.Array, options: dict[int, Any], zero: Any) -> Any:
  """``options[which]`` (a tree), or ``zero`` for any other ``which``."""
  out = zero
  for k, value in options.items():
    out = jax.tree.map(lambda v, o, k=k: jnp.where(which == k, v, o), value,
                       out)
  return out


def _region(sizes: list[int], layer) -> int:
  """Elements of a leftover layer's slot in a chunk: its largest occupant."""
  return max(sizes[m[0]] for m in layer if m is not None)


def _occupants(layer, me: jax.Array):
  """The groups in a leftover layer, and which of them device ``me`` holds
  there (``None``: the same group on every device)."""
  groups = sorted({m[0] for m in layer if m is not None})
  table = [-1 if m is None else m[0] for m in layer]
  if len(groups) == 1 and -1 not in table:
    return groups, None
  return groups, jnp.asarray(table)[me]


def _pack_rows(plan: Plan, rows: list[jax.Array],
               sizes: list[int]) -> jax.Array:
  """Per-group rows -> the ``(devices, total)`` send buffer.

  Chunk ``j`` holds this device's slices of device ``j``'s matrices, slot
  by slot. In a full layer that is row ``f * devices + j`` of the group, for
  every ``f``: one reshape and transpose of the group's rows.
  """
  devices, chunks = plan.devices, []
  for g, f in enumerate(plan.full):
    if f:
      x = rows[g][:f * devices].reshape(f, devices, sizes[g])
      chunks.append(jnp.swapaxes(x, 0, 1).reshape(devices, f * sizes[g]))
  for _, layer in plan.layers:
    width = _region(sizes, layer)
    chunks.append(jnp.stack([
        jnp.zeros((width,), rows[0].dtype) if m is None else
        jnp.pad(rows[m[0]][m[1]], (0, width - sizes[m[0]])) for m in layer]))
  return jnp.concatenate(chunks, axis=1)


def _unpack_rows(plan: Plan, buffer: jax.Array,
                 sizes: list[int]) -> list[jax.Array]:
  """Inverse of :func:`_pack_rows`."""
  devices, start = plan.devices, 0
  rows: list[list[jax.Array]] = [[] for _ in plan.full]
  for g, f in enumerate(plan.full):
    if f:
      block = buffer[:, start:start + f * sizes[g]].reshape(devices, f, -1)
      rows[g].append(jnp.swapaxes(block, 0, 1).reshape(f * devices, -1))
      start += f * sizes[g]
  for _, layer in plan.layers:
    for j, m in enumerate(layer):  # leftover rows come in row order
      if m is not None:
        rows[m[0]].append(buffer[j, start:start + sizes[m[0]]][None])
    start += _region(sizes, layer)
  return [r[0] if len(r) == 1 else jnp.concatenate(r) for r in rows]


def _unpack_slots(plan: Plan, buffer: jax.Array, cuts, sizes: list[int],
                  me: jax.Array) -> list[tuple[Signature, list]]:
  """The received buffer -> whole matrices: per full group and leftover
  layer, its slot signature and the stack of each part."""
  devices, start, slots = plan.devices, 0, []
  for g, f in enumerate(plan.full):
    if f:
      block = buffer[:, start:start + f * sizes[g]].reshape(devices, f, -1)
      slots.append((_signature(cuts[g]),
                    _split(jnp.swapaxes(block, 0, 1), cuts[g])))
      start += f * sizes[g]
  for signature, layer in plan.layers:
    groups, which = _occupants(layer, me)
    options = {g: [_pad_to(x, s) for x, s in zip(
        _split(buffer[:, start:start + sizes[g]], cuts[g]), signature)]
               for g in groups}
    zero = [None if s is None else jnp.zeros(s, buffer.dtype)
            for s in signature]
    parts = (options[groups[0]] if which is None else
             _select(which, options, zero))
    slots.append((signature, [None if x is None else x[None] for x in parts]))
    start += _region(sizes, layer)
  return slots


def _pack_slots(plan: Plan, results: list[list], cuts, sizes: list[int],
                me: jax.Array) -> jax.Array:
  """Inverse of :func:`_unpack_slots`, for the results (``cuts``: those of
  the results' parts)."""
  devices, chunks = plan.devices, []
  results = iter(results)
  for g, f in enumerate(plan.full):
    if f:
      x = _join(next(results), cuts[g], devices)  # (f, devices, size)
      chunks.append(jnp.swapaxes(x, 0, 1).reshape(devices, f * sizes[g]))
  for _, layer in plan.layers:
    width, res = _region(sizes, layer), next(results)
    groups, which = _occupants(layer, me)
    options = {}
    for g in groups:  # the occupant's own shape: the top-left corner
      parts = [None if c is None else y[0, :c.shape[0], :c.shape[1]]
               for y, c in zip(res, cuts[g])]
      options[g] = jnp.pad(_join(parts, cuts[g], devices),
                           ((0, 0), (0, width - sizes[g])))
    chunks.append(options[groups[0]] if which is None else _select(
        which, options, jnp.zeros((devices, width), res[0].dtype)))
  return jnp.concatenate(chunks, axis=1)


def _compute_slots(slots: list[tuple[Signature, list]],
                   compute: Callable[[list], list], dtype) -> list[list]:
  """``compute`` once per slot signature, on all its stacks concatenated.

  The barrier materializes each stack row-major: XLA:CPU otherwise folds a
  slot's transpose into the iteration's first bf16 dot, whose runtime kernel
  lacks that layout ("Unsupported element type for DotThunk: BF16 x BF16 =
  F32").
  """
  results: list[Any] = [None] * len(slots)
  by_signature: dict[Signature, list[int]] = {}
  for i, (signature, _) in enumerate(slots):
    by_signature.setdefault(signature, []).append(i)
  for signature, members in by_signature.items():
    stacked = [None if shape is None else jax.lax.optimization_barrier(
        jnp.concatenate([slots[i][1][p] for i in members]))
               for p, shape in enumerate(signature)]
    out = [None if y is None else y.astype(dtype) for y in compute(stacked)]
    sizes = [next(x for x in slots[i][1] if x is not None).shape[0]
             for i in members]
    bounds = np.cumsum([0] + sizes)
    for i, lo, hi in zip(members, bounds[:-1], bounds[1:]):
      results[i] = [None if y is None else y[lo:hi] for y in out]
  return results


def _exchange(plan: Plan, cuts: list[tuple[_Cut | None, ...]],
              rows: list[jax.Array], outputs: tuple[int, ...], axis: str,
              compute: Callable[[list], list]) -> list[jax.Array]:
  """The two all_to_alls and the local computation, for one dtype.

  Args:
    plan: the slots.
    cuts: per group, the cut of each part (``None``: absent).
    rows: per group, ``(matrices, size)``: this device's slices of its
      matrices, the parts one after the other.
    outputs: per result part, the input part whose cut (and shape) it has.
    axis: the mesh axis.
    compute: the stacked computation, whole parts in, whole results out.

  Returns:
    Per group, ``(matrices, size)``: this device's slices of the results.
  """
  devices, me = plan.devices, jax.lax.axis_index(axis)
  out_cuts = [tuple(c[p] for p in outputs) for c in cuts]
  in_sizes = [sum(_sizes(c, devices)) for c in cuts]
  out_sizes = [sum(_sizes(c, devices)) for c in out_cuts]
  # recv[i] holds device i's slices of this device's matrices
  recv = jax.lax.all_to_all(_pack_rows(plan, rows, in_sizes), axis, 0, 0,
                            tiled=True)
  results = _compute_slots(_unpack_slots(plan, recv, cuts, in_sizes, me),
                           compute, rows[0].dtype)
  # home[j] holds this device's slices of device j's results
  home = jax.lax.all_to_all(
      _pack_slots(plan, results, out_cuts, out_sizes, me), axis, 0, 0,
      tiled=True)
  return _unpack_rows(plan, home, out_sizes)


def _part_dim(view: MatrixView, x, axis: str, devices: int,
              explicit: bool) -> int | None:
  """The axis of ``x`` sharded over ``axis``, if the mesh axis divides it."""
  sharding = _explicit_sharding(x)
  spec = () if sharding is None else sharding.spec
  dim = next((d for d, entry in enumerate(spec) if axis in _names(entry)),
             None)
  if dim is None and not explicit:
    # Auto axes hide the layout while tracing: assume the common FSDP
    # layout, the largest matrix axis that divides evenly (the first of
    # equals); XLA reshards if it is not so.
    fits = [a for a in view.reduction_axes + view.output_axes
            if view.shape[a] % devices == 0]
    dim = max(fits, key=lambda a: view.shape[a], default=None)
  return dim if dim is not None and view.shape[dim] % devices == 0 else None


def _leaf_layout(views, parts, axis: str, devices: int, explicit: bool,
                 wide: bool):
  """How a leaf's parts enter ``shard_map``: their kinds (``None``: the leaf
  is computed where it is) and their specs there."""
  dims = [None if x is None else _part_dim(v, x, axis, devices, explicit)
          for v, x in zip(views, parts)]
  present = [(v, d) for v, x, d in zip(views, parts, dims) if x is not None]
  kinds = None
  if all(d is not None and d not in v.batch_axes and math.prod(v.shape)
         for v, d in present):
    kinds = tuple(None if x is None else _Kind(v, d, wide)
                  for v, x, d in zip(views, parts, dims))
  elif len(present) > 1 and not all(v.batch_axes[:1] == (d,)
                                    for v, d in present):
    # parts computed where they are must hold the same matrices: each
    # sharded along its first batch axis, or all whole
    dims = [None] * len(dims)
  specs = tuple(None if x is None else P(*[axis if a == d else None
                                           for a in range(len(v.shape))])
                for v, x, d in zip(views, parts, dims))
  return kinds, specs


def _batch(kinds) -> int:
  return next(k for k in kinds if k is not None).view.batch


def _exchange_leaves(compute, kinds: list[tuple], blocks: list[tuple], dtype,
                     outputs: tuple[int, ...], axis: str, devices: int, *,
                     cost, pad: bool) -> list[tuple]:
  """Groups the leaves' matrices by how they are cut, plans the slots and
  runs one exchange (all parts in ``dtype``); results per leaf."""
  groups: dict[tuple, list[int]] = {}
  for n, ks in enumerate(kinds):
    groups.setdefault(tuple(k and k.cut for k in ks), []).append(n)
  cuts = list(groups)
  plan = make_plan([(_signature(c), sum(_batch(kinds[n]) for n in groups[c]))
                    for c in cuts], devices, cost=cost, pad=pad)
  rows = []
  for c in cuts:
    slices = [jnp.concatenate([k.slices(x.astype(dtype), devices)
                               for k, x in zip(kinds[n], blocks[n])
                               if k is not None], axis=1)
              for n in groups[c]]
    rows.append(jnp.concatenate(slices))
  results: list[Any] = [None] * len(kinds)
  for c, done in zip(cuts, _exchange(plan, cuts, rows, outputs, axis,
                                     compute)):
    start = 0
    for n in groups[c]:
      flat, col, parts = done[start:start + _batch(kinds[n])], 0, []
      for p in outputs:
        k, x = kinds[n][p], blocks[n][p]
        size = 0 if k is None else k.cut.size(devices)
        parts.append(None if k is None else k.unslice(
            flat[:, col:col + size], devices).astype(x.dtype))
        col += size
      results[n] = tuple(parts)
      start += _batch(kinds[n])
  return results


def _same(sharding: NamedSharding | None, spec, ndim: int) -> bool:
  """Whether a leaf typed with ``sharding`` already has ``spec``."""
  pad = lambda s: tuple(s) + (None,) * (ndim - len(s))
  return pad(P() if sharding is None else sharding.spec) == pad(spec)


def sharded_map(compute: Callable[[list], list],
                local: Callable[[list, list], list],
                views: list[tuple[MatrixView | None, ...]],
                leaves: list[tuple[Any, ...]], mesh, axis: str, *,
                outputs: tuple[int, ...], wide: bool, pad: bool,
                cost: Callable[[Signature], int],
                extras: tuple = ()) -> list[tuple]:
  """Computes every matrix leaf, each device whole matrices for its share.

  Args:
    compute: ``(parts, *extras) -> results`` on whole matrices: every part a
      ``(batch, rows, cols)`` stack (or ``None``), all of one slot
      signature; the results follow ``outputs``.
    local: ``(views, leaves, *extras) -> results`` for the leaves computed
      where they are (lists of per-leaf tuples, as here), with their local
      views.
    views: per leaf, the matrix view of each part (``None``: absent).
    leaves: per leaf, its parts, sharded over ``mesh``.
    mesh: a ``Mesh`` or ``AbstractMesh``.
    axis: the mesh axis that shards the parameters.
    outputs: per result part, the input part whose shape and sharding it
      takes.
    wide: tall matrices are computed through their transpose (so that they
      share slots with their transposes' shape).
    pad: a smaller matrix may fill a slot of a larger one, zero-padded.
    cost: FLOPs of one matrix of a signature (for the plan).
    extras: arrays that every device gets whole (e.g. a step size computed
      from the optimizer state: ``shard_map`` takes traced values as
      arguments, not from a closure).

  Returns:
    Per leaf, its results, in the shardings of their input parts.
  """
  devices = mesh.shape[axis]
  explicit = mesh.axis_types[mesh.axis_names.index(axis)] == AxisType.Explicit
  kinds, specs = zip(*[_leaf_layout(vs, xs, axis, devices, explicit, wide)
                       for vs, xs in zip(views, leaves)])
  pick = lambda per_leaf: [tuple(xs[p] for p in outputs) for xs in per_leaf]
  out_like, out_specs = pick(leaves), pick(specs)

  def flatten(per_leaf, like):
    """The entries of the parts that ``like`` has, in order."""
    return [v for vs, xs in zip(per_leaf, like) for v, x in zip(vs, xs)
            if x is not None]

  def regroup(flat, like):
    items = iter(flat)
    return [tuple(None if x is None else next(items) for x in xs)
            for xs in like]

  # Under Explicit axes, reshard what the types show otherwise: this drops
  # other axes (e.g. tensor parallel), so that every part is whole but for
  # the one axis; the results go back to the parts' own shardings. Always a
  # NamedSharding: a bare PartitionSpec needs jax.set_mesh.
  def move(x, spec):
    target = spec if explicit else P()
    original = _explicit_sharding(x)
    if _same(original, target, x.ndim):
      return x, original
    return jax.sharding.reshard(x, NamedSharding(mesh, target)), original

  moved = [move(x, s) for x, s in zip(flatten(leaves, leaves),
                                      flatten(specs, leaves))]
  originals = regroup([o for _, o in moved], leaves)

  def body(*args):
    blocks = regroup(args[len(extras):], leaves)
    extra = args[:len(extras)]
    out: list[Any] = [None] * len(blocks)
    rest = [i for i, k in enumerate(kinds) if k is None]
    if rest:
      local_views = [tuple(None if x is None else dataclasses.replace(
          v, shape=x.shape) for v, x in zip(views[i], blocks[i]))
                     for i in rest]
      for i, r in zip(rest, local(local_views, [blocks[i] for i in rest],
                                  *extra)):
        out[i] = tuple(r)
    by_dtype: dict[Any, list[int]] = {}
    for i, k in enumerate(kinds):
      if k is not None:
        dtype = jnp.result_type(*[x for x in blocks[i] if x is not None])
        by_dtype.setdefault(dtype, []).append(i)
    for dtype, members in by_dtype.items():
      done = _exchange_leaves(lambda parts: compute(parts, *extra),
                              [kinds[i] for i in members],
                              [blocks[i] for i in members], dtype, outputs,
                              axis, devices, cost=cost, pad=pad)
      for i, r in zip(members, done):
        out[i] = r
    return tuple(flatten(out, out_like))

  out = jax.shard_map(
      body, mesh=mesh,
      in_specs=(P(),) * len(extras) + tuple(flatten(specs, leaves)),
      out_specs=tuple(flatten(out_specs, out_like)))(
          *extras, *[x for x, _ in moved])
  home = []
  for y, s, o in zip(out, flatten(out_specs, out_like),
                     flatten(pick(originals), out_like)):
    if not _same(o, s if explicit else P(), y.ndim):
      y = jax.sharding.reshard(y, o or NamedSharding(mesh, P()))
    home.append(y)
  return regroup(home, out_like)


def sharded_polar(polar: Callable[[jax.Array], jax.Array],
                  local: Callable[[list[MatrixView], list[jax.Array]], list],
                  views: list[MatrixView], leaves: list[jax.Array], mesh,
                  axis: str, *, steps: int, gram, gram_restart,
                  pad: bool = True) -> list:
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
    pad: a smaller matrix may be zero-padded into a larger one's slot; not
      where ``polar`` depends on the matrices' shape (coefficients keyed by
      shape).

  Returns:
    The results, in the leaves' original shardings.
  """
  out = sharded_map(
      lambda parts: [polar(parts[0])],
      lambda vs, xs: [(y,) for y in local([v[0] for v in vs],
                                          [x[0] for x in xs])],
      [(v,) for v in views], [(x,) for x in leaves], mesh, axis,
      outputs=(0,), wide=True, pad=pad,
      cost=lambda s: newton_schulz_flops(*s[0], steps, gram=gram,
                                         gram_restart=gram_restart))
  return [y[0] for y in out]
