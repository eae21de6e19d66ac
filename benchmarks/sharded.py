"""Benchmark: sharded orthogonalization on 8 simulated devices, from the compiled programs.

GPT-2's hidden matrices (small: 12 layers of qkv 768×2304, proj 768×768,
MLP 768×3072 and 3072×768), FSDP-sharded along their fan_in over an 8-device
mesh, orthogonalized three ways:

* ``orthax``: ``orthax.orthogonalize(mesh=..., mesh_axis="fsdp")``: every
  device orthogonalizes whole matrices for its share, two ``all_to_all``s;
* ``replicate``: gather every matrix on every device, then orthogonalize
  (orthax's unsharded iteration): every device does all the work;
* ``xla optax``: optax's Newton–Schulz (its default: Jordan's triple, 5
  unrolled steps) under ``jit`` with the same shardings and ``Auto`` axes,
  partitioned by XLA.

From each compiled program's per-device HLO text (:func:`hlo_costs`): the
matmul FLOPs one device executes, against the even share (all the matrices'
FLOPs / devices, by each method's own count: orthax's Gram path does fewer
than optax's iteration), and the bytes of every collective (each one's result
on one device, summed), as a ratio to XLA's partitioning of optax's
iteration. orthax's program also runs, for its largest entry error against
the same iteration in float64. None of these programs is timed: 8 simulated
devices on 2 cores say nothing about speed.

Dion's rows (:func:`dion_rows`, rank fractions 1/4 and 1/16; ``--quick``
only 1/4: the other is the same program at a lower rank) give the collective
bytes of its low-rank step on the same sharded matrices, as ratios to
orthax's sharded Muon and to XLA's optax.

Then the compile time of an MoE expert stack ``(E, 32, 64)``, sharded along
fan_in, for growing ``E`` (:func:`compile_scaling`), sharded against
unsharded, with the size of each compiled program: the sharded program must
not grow with the number of matrices. Prints tables and writes JSON (the
compile figures under ``"compile"``).

  python benchmarks/sharded.py [--quick] [--out runs/bench/sharded.json]

The script asks XLA for 8 host devices itself (it must run in a fresh
process).
"""

from __future__ import annotations

import os

DEVICES = 8
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  # read when JAX starts its CPU backend: too late if it already has
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={DEVICES}")

import argparse  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402
from optax.contrib import _muon as optax_muon  # noqa: E402

import orthax  # noqa: E402
from harness import write_json  # noqa: E402
from orthax.polar import PRESETS  # noqa: E402
from orthax.polar.newton_schulz import newton_schulz_flops  # noqa: E402
from orthogonalize import SETS  # noqa: E402

MODELS = {"gpt2_small": ("small", 12), "quick": ("quick", 3)}  # layer, layers
EXPERTS = {"full": (16, 256, 1024, 2048, 4096), "quick": (16, 256)}
COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter",
               "collective-permute")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4,
          "pred": 1, "s8": 1, "u8": 1}


def hidden_matrices(layer: str, layers: int, seed: int = 0) -> dict:
  """``layers`` copies of ``benchmarks/orthogonalize.py``'s layer set
  (qkv, proj, MLP up, MLP down), random normal."""
  rng = np.random.default_rng(seed)
  return {f"h{l}_{i}": jnp.asarray(rng.normal(size=s), jnp.float32)
          for l in range(layers) for i, s in enumerate(SETS[layer])}


def _dims(shape: str) -> list[int]:
  return [int(d) for d in shape.split(",") if d]


def _line_cost(line: str, shapes: dict[str, str]) -> dict[str, float]:
  """Matmul FLOPs and collective bytes of one HLO instruction."""
  cost = {}
  dot = re.search(r"= \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), .*"
                  r"lhs_contracting_dims=\{([\d,]*)\}", line)
  if dot:  # 2 * prod(result) * prod(contracted lhs dims)
    out, lhs, contract = dot.groups()
    k = np.prod([_dims(shapes[lhs])[int(d)] for d in _dims(contract)])
    cost["flops"] = 2.0 * np.prod(_dims(out)) * k
  for op in COLLECTIVES:  # the result's bytes on this device
    match = re.search(rf"= (.*?) {op}(?:-start)?\(", line)
    if match:
      cost[op] = float(sum(
          np.prod(_dims(dims)) * _BYTES.get(dtype, 4)
          for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]",
                                        match.group(1))))
  return cost


def hlo_costs(hlo: str) -> dict[str, float]:
  """Matmul FLOPs and bytes of each collective a compiled (per-device) module
  executes.

  Summed over the call graph from the entry computation, a while loop's body
  times its known trip count. Read from the text because ``cost_analysis()``
  counts a loop body once and misses dots that XLA:CPU hands to library
  fusions.
  """
  shapes = dict(re.findall(r"%([\w.\-]+) = \w+\[([\d,]*)\]", hlo))
  bodies, entry, name = {}, None, None
  for line in hlo.splitlines():
    head = re.match(r"(ENTRY )?%([\w.\-]+) .*\{$", line)
    if head:
      name = head.group(2)
      entry = name if head.group(1) else entry
      bodies[name] = []
    elif line.startswith("}"):
      name = None
    elif name is not None:
      bodies[name].append(line)

  def walk(comp: str) -> dict[str, float]:
    total = dict.fromkeys(("flops",) + COLLECTIVES, 0.0)
    for line in bodies[comp]:
      for key, value in _line_cost(line, shapes).items():
        total[key] += value
      times = 1
      if " while(" in line:
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        if not trip:
          raise ValueError(f"a while loop without a known trip count: {line}")
        times = int(trip.group(1))
      for role, callee in re.findall(
          r"(calls|body|to_apply|condition)=%([\w.\-]+)", line):
        for key, value in walk(callee).items():
          total[key] += (times if role == "body" else 1) * value
    return total

  return walk(entry)


def run(model: str) -> list[dict]:
  tree = hidden_matrices(*MODELS[model])
  fsdp = {k: P("fsdp", None) for k in tree}
  explicit = jax.make_mesh((DEVICES,), ("fsdp",),
                           axis_types=(AxisType.Explicit,))
  auto = jax.make_mesh((DEVICES,), ("fsdp",), axis_types=(AxisType.Auto,))
  totals = {  # all the matrices' FLOPs, unsharded, by each method's count
      gram: sum(newton_schulz_flops(*x.shape, 5, gram=gram)
                for x in tree.values()) for gram in ("auto", False)}
  with jax.enable_x64(True):  # the same iteration in float64
    want = orthax.orthogonalize().update(
        {k: jnp.asarray(x, jnp.float64) for k, x in tree.items()}, None)[0]
    want = {k: np.asarray(x) for k, x in want.items()}
  optax_abc = jnp.asarray(PRESETS["muon"].coeffs[0])

  def put(mesh):
    return {k: jax.device_put(x, NamedSharding(mesh, fsdp[k]))
            for k, x in tree.items()}

  tx = orthax.orthogonalize(mesh=explicit, mesh_axis="fsdp")
  plain = orthax.orthogonalize()

  def replicate(t):
    whole = {k: jax.sharding.reshard(x, P()) for k, x in t.items()}
    out = plain.update(whole, None)[0]
    return {k: jax.sharding.reshard(x, fsdp[k]) for k, x in out.items()}

  variants = {
      "orthax": (explicit, lambda t: tx.update(t, None)[0], want, "auto"),
      "replicate": (explicit, replicate, None, "auto"),
      "xla optax": (auto, lambda t: jax.tree.map(
          lambda x: optax_muon.orthogonalize_via_newton_schulz(
              x, optax_abc, 5), t), None, False),
  }
  rows = []
  for name, (mesh, fn, reference, count) in variants.items():
    args = put(mesh)
    with jax.set_mesh(mesh):
      jitted = jax.jit(fn, out_shardings={k: NamedSharding(mesh, s)
                                          for k, s in fsdp.items()})
      compiled = jitted.lower(args).compile()
      # only orthax's program runs (for its error): the others are compiled
      # for their FLOPs and collectives, not timed
      out = None if reference is None else compiled(args)
    err = None if reference is None else max(
        float(np.max(np.abs(np.asarray(out[k], np.float64) - reference[k])))
        for k in tree)
    costs = hlo_costs(compiled.as_text())
    coll = {op: costs[op] for op in COLLECTIVES}
    rows.append(dict(model=model, method=name,
                     flops_per_device=costs["flops"],
                     even_share=totals[count] / DEVICES,
                     collective_bytes=sum(coll.values()),
                     collectives=coll, max_abs_err_vs_float64=err))
  base = rows[-1]["collective_bytes"]
  for r in rows:
    r["flops_vs_even_share"] = r["flops_per_device"] / r["even_share"]
    r["bytes_vs_xla_optax"] = r["collective_bytes"] / base if base else None
  return rows


# Dion's rank fractions: the README's 1/4 (near full rank at 3B) and 1/16.
DION_FRACTIONS = (0.25, 1 / 16)


def dion_rows(model: str, rows: list[dict],
              fractions: tuple[float, ...] = DION_FRACTIONS) -> list[dict]:
  """Dion (``orthax.scale_by_dion``) on the same FSDP-sharded
  matrices under ``Explicit`` axes, for each rank fraction of ``fractions``:
  its collective bytes (only the low-rank factors should move) as ratios to
  orthax's whole-matrix sharded orthogonalization (``rows``' ``"orthax"``,
  Muon's collectives) and to XLA's optax. The even share is the unsharded
  program's matmul FLOPs over the devices (QR runs in LAPACK, uncounted)."""
  tree = hidden_matrices(*MODELS[model])
  mesh = jax.make_mesh((DEVICES,), ("fsdp",), axis_types=(AxisType.Explicit,))
  args = {k: jax.device_put(x, NamedSharding(mesh, P("fsdp", None)))
          for k, x in tree.items()}
  muon = next(r for r in rows if r["method"] == "orthax")["collective_bytes"]
  xla = next(r for r in rows if r["method"] == "xla optax")["collective_bytes"]
  out = []
  for fraction in fractions:
    tx = orthax.scale_by_dion(fraction)
    plain = jax.jit(tx.update).lower(tree, tx.init(tree)).compile()
    with jax.set_mesh(mesh):
      state = tx.init(args)
      compiled = jax.jit(tx.update).lower(args, state).compile()
    costs = hlo_costs(compiled.as_text())
    coll = {op: costs[op] for op in COLLECTIVES}
    total = sum(coll.values())
    even = hlo_costs(plain.as_text())["flops"] / DEVICES
    out.append(dict(model=model, method=f"dion r/{round(1 / fraction)}",
                    flops_per_device=costs["flops"], even_share=even,
                    flops_vs_even_share=costs["flops"] / even,
                    collective_bytes=total, collectives=coll,
                    max_abs_err_vs_float64=None,
                    bytes_vs_xla_optax=total / xla if xla else None,
                    bytes_vs_orthax_muon=total / muon if muon else None))
  return out


def print_table(rows) -> None:
  header = (f"{'method':11} {'GFLOP/device':>13} {'vs even share':>14} "
            f"{'collective MB':>14} {'vs xla optax':>13} {'err f64':>9}")
  print(f"{rows[0]['model']}, {DEVICES} devices")
  print(header)
  print("-" * len(header))
  for r in rows:
    err = ("-" if r["max_abs_err_vs_float64"] is None
           else f"{r['max_abs_err_vs_float64']:.1e}")
    vs = "-" if r["bytes_vs_xla_optax"] is None else f"{r['bytes_vs_xla_optax']:.3f}"
    print(f"{r['method']:11} {r['flops_per_device'] / 1e9:13.2f} "
          f"{r['flops_vs_even_share']:14.3f} "
          f"{r['collective_bytes'] / 2**20:14.1f} {vs:>13} {err:>9}")


def _compile(tx, arg) -> tuple[float, int]:
  """Seconds to lower and compile ``tx.update`` under jit, and the compiled
  program's HLO lines."""
  start = time.perf_counter()
  compiled = jax.jit(lambda t: tx.update(t, None)[0]).lower(arg).compile()
  return time.perf_counter() - start, len(compiled.as_text().splitlines())


def compile_scaling(experts) -> list[dict]:
  """Compile time and program size of an ``(E, 32, 64)`` expert stack for
  each ``E``: sharded along fan_in over the devices (the axis read from the
  stack's ``Explicit`` sharding), and unsharded on one device."""
  mesh = jax.make_mesh((DEVICES,), ("fsdp",))
  dims = orthax.MuonDimensionNumbers(1, 2)
  tx = orthax.orthogonalize(dimension_numbers=dims)
  rows = []
  for e in experts:
    sharded = _compile(tx, jax.ShapeDtypeStruct(
        (e, 32, 64), jnp.float32,
        sharding=NamedSharding(mesh, P(None, "fsdp", None))))
    unsharded = _compile(tx, jax.ShapeDtypeStruct((e, 32, 64), jnp.float32))
    rows.append(dict(experts=e, sharded_s=sharded[0],
                     unsharded_s=unsharded[0], sharded_vs_unsharded=
                     sharded[0] / unsharded[0], sharded_hlo_lines=sharded[1],
                     unsharded_hlo_lines=unsharded[1]))
  return rows


def print_compile_table(rows) -> None:
  header = (f"{'experts':>8} {'sharded s':>10} {'unsharded s':>12} "
            f"{'ratio':>6} {'sharded HLO':>12} {'unsharded HLO':>14}")
  print(f"compile, (E, 32, 64) expert stack, {DEVICES} devices")
  print(header)
  print("-" * len(header))
  for r in rows:
    print(f"{r['experts']:8d} {r['sharded_s']:10.2f} {r['unsharded_s']:12.2f} "
          f"{r['sharded_vs_unsharded']:6.2f} {r['sharded_hlo_lines']:12d} "
          f"{r['unsharded_hlo_lines']:14d}")


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="3 layers of 32-wide matrices (smoke test)")
  parser.add_argument("--out", type=Path,
                      default=Path("runs/bench/sharded.json"))
  args = parser.parse_args(argv)
  if jax.device_count() < DEVICES:
    raise SystemExit(f"needs {DEVICES} devices; run it in a fresh process "
                     "(it sets XLA_FLAGS before JAX starts)")
  model = "quick" if args.quick else "gpt2_small"
  rows = run(model)
  rows += dion_rows(model, rows,
                    DION_FRACTIONS[:1] if args.quick else DION_FRACTIONS)
  print_table(rows)
  for r in rows:
    if "bytes_vs_orthax_muon" in r:
      print(f"{r['method']}: collective bytes {r['bytes_vs_orthax_muon']:.3f} "
            "of orthax's sharded Muon")
  compile_rows = compile_scaling(EXPERTS["quick" if args.quick else "full"])
  print_compile_table(compile_rows)
  write_json(args.out, rows, compile=compile_rows)
  return rows


if __name__ == "__main__":
  main()
