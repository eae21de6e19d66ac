"""Benchmark: the one prepared GPU/TPU check, four parts in one command.

Runs on an accelerator image as it is (jax, flax, optax; no ml_collections,
no install) and writes one JSON with the device, the versions, the date, the
arguments and every part's rows:

  PYTHONPATH=. python3 benchmarks/device.py [--quick] [--parts 1,2,3,4] \
      [--reps 3] [--steps 30] [--out runs/bench/device.json]

Part 1, Newton–Schulz: square (1024² ... 8192²) and GPT-shaped (768×3072 ...
4096×16384) matrices, float32 and bfloat16, one matrix and, for the
smaller shapes, a batch of 4 (``SHAPES``). Every method runs the same iteration,
5 steps of Jordan's quintic (``coeffs="muon"``, optax's): optax's
``orthogonalize_via_newton_schulz`` (``jax.vmap``-ed over a batch), orthax
``backend="xla"`` plain and Gram, orthax ``backend="pallas"`` plain and Gram
(Gram only on rectangular matrices, where it saves FLOPs). Columns:

* ``ms``: median time of the jitted call, after one warm-up (compile) call;
* ``TFLOP/s`` and ``%peak``: the plain or Gram iteration's matmul FLOPs
  (``orthogonalize.set_flops``) over the time, and that against the chip's
  dense bf16 peak (``kernels.peak_tflops``); the Pallas kernels skip about
  half of the symmetric products, so theirs is an effective figure;
* ``|s-1|``: worst ``|s - 1|`` over the output's singular values after
  dropping the lowest 10% (the measure of ``orthogonalize.quality``), from
  the float32 eigenvalues of the first matrix's small Gram matrix, on the
  device (a float64 SVD on the host would take minutes at 8192²); the
  inputs are Gaussian, whose smallest singular values no 5-step iteration
  lifts, hence the 10% dropped;
* ``vs xla``: ``||O - O_xla||_F / ||O_xla||_F`` against orthax's XLA plain
  output in the same dtype, ``vs f32`` against its float32 output: the
  rounding of the method (the test suite bounds both).

After part 1 it prints (and the JSON keeps, ``auto_table``) the rows of
:data:`orthax.polar.auto_backend.MEASURED_FASTER` this device earned: each
shape, dtype and path where the kernels beat orthax's XLA iteration by
``FASTER`` in every batch size; pasted there, ``backend="auto"`` takes the
kernels exactly there.

Part 2, one optimizer step (``jit(update + apply_updates)``, ``step.py``) on
GPT-2 small's and medium's parameter trees: every ready optimizer of orthax
(``READY``), ``optax.contrib.muon`` (orthax's routing, and its defaults) and
``optax.adamw``. ``ms``; ``state MB``: the optimizer state's size; ``temp
MB``: the step program's scratch memory, and ``peak MB`` all it holds at
once (parameters, state and gradients in, the new parameters and state out,
plus the scratch), both from XLA's compiled memory analysis: per program,
so independent of the order the optimizers run in (the device's own
``peak_bytes_in_use`` only grows over the run). ``orthax.muon_clip`` gets an empty
``max_logits``: this tree's attention has one fused ``c_attn`` kernel, no
query/key projection for its QK-clip to rescale.

Part 3, GPT-2 small of the example (``examples/gpt2_model.py``, width 768,
12 layers, 12 heads, context 1024, vocabulary 50304 padded; bfloat16
compute, float32 parameters) on random tokens, batch 8×1024, ``--steps``
steps of AdamW, orthax Muon and NorMuon: ``tokens/s`` from the median step
time (after the first, compiling, step); ``opt share``: 1 - (the median
time of the same jitted loss-and-gradient without the update) / (the full
step's), both measured in this run; ``loss``: the last step's, a check that
it trained.

Part 4, the kernels' tiles: bfloat16 Newton–Schulz on 4096² and 8192²
(plain) and 768×3072 and 1024×4096 (Gram) with each of ``TILE_CANDIDATES``
for every product, against the tile table's own choice (``default``) and
XLA: ``vs default`` is the default's time over the row's; a candidate that
wins is the evidence for a new row of ``orthax/kernels/platform.py``'s
``_TILE_TABLE``.

Each row that fails (a Pallas lowering error, out of memory) is kept with
its ``error`` and the run goes on; a combination that cannot fit the
device's memory, or that a part reaches after its time budget
(``BUDGET_S``: the whole run stays under 5 minutes), is a ``skipped`` row.
The JSON is written after every part. ``--quick``: tiny shapes, one
repetition, a 2-layer GPT for 3 steps, every part, no time budget (CPU; the
Pallas kernels run interpreted; the test suite runs it): its times are not
performance figures.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import math
import sys
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from optax.contrib import _muon as optax_muon

import orthax
import step
from harness import median_seconds, write_json
from kernels import INTERPRET_NOTICE, peak_tflops
from orthax.kernels import Tiles, pallas_ops
from orthax.polar.auto_backend import Measured
from orthogonalize import MUON_ABC, set_flops

ROOT = Path(__file__).resolve().parents[1]
READY = tuple(n for n in orthax.__all__
              if n not in ("muon", "normuon")  # already in step.optimizers
              and getattr(getattr(orthax, n), "__module__", "") in
              ("orthax.optimizers", "orthax.adaptive", "orthax.structured"))
# (shape, batch sizes): batches only of the smaller matrices (compile and
# run time). The targets (4096² and 8192²) come first, in case the
# time budget cuts the rest; --quick covers a square single matrix and a
# rectangular batch (Gram path and stacks).
SHAPES = {
    "full": [((4096, 4096), (1,)), ((8192, 8192), (1,)),
             ((768, 3072), (1, 4)), ((1024, 4096), (1, 4)),
             ((1024, 1024), (1, 4)), ((2048, 2048), (1, 4)),
             ((2048, 8192), (1,)), ((4096, 16384), (1,))],
    "quick": [((32, 32), (1,)), ((32, 96), (2,))],
}
# Seconds each part may start new rows for; rows after that are "skipped"
# (the whole run stays under 5 minutes on an H100, compiles included, and
# each part's JSON is written when the part ends). --quick: no limit.
BUDGET_S = {1: 110, 2: 70, 3: 50, 4: 50}
# Kernels' speed-up over XLA's iteration above which device.py proposes a
# row of orthax.polar.auto_backend.MEASURED_FASTER: medians of a few
# repetitions on a shared machine differ by a few percent run to run.
FASTER = 1.05
NS_STEPS = 5
# buffers one Newton-Schulz call holds at once, in matrices of the input's
# size (input, output, iterate, product, Gram-sized scratch, slack)
NS_BUFFERS = 8
GPT = {
    "full": dict(vocab_size=50257, padded_vocab_size=50304, context=1024,
                 width=768, num_layers=12, num_heads=12, batch=8),
    "quick": dict(vocab_size=256, padded_vocab_size=256, context=64,
                  width=64, num_layers=2, num_heads=2, batch=2),
}


def _error_row(base: dict, e: Exception) -> dict:
  return {**base, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}


def _past(deadline: float, base: dict, rows: list[dict]) -> bool:
  """Whether the part's time budget is spent; if so, ``base`` is a skipped
  row of ``rows``."""
  if time.monotonic() <= deadline:
    return False
  rows.append({**base, "skipped": "over the part's time budget"})
  return True


def _memory_limit() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return stats.get("bytes_limit") if stats else None


# Part 1: Newton-Schulz.


def ns_methods(batched: bool, rectangular: bool) -> dict:
  """name -> (function of the ``(batch,) m, n`` array, ``gram`` of its
  FLOP count)."""
  def optax_ns(x):
    ns = lambda m: optax_muon.orthogonalize_via_newton_schulz(
        m, jnp.asarray(MUON_ABC), NS_STEPS)
    return jax.vmap(ns)(x) if batched else ns(x)

  dims = orthax.MuonDimensionNumbers(1, 2) if batched else None

  def orthax_ns(backend, gram):
    tx = orthax.orthogonalize(coeffs="muon", backend=backend, gram=gram,
                              dimension_numbers=dims)
    return lambda x: tx.update(x, None)[0]

  # XLA plain first: the reference of the others
  methods = {"orthax xla plain": (orthax_ns("xla", False), False),
             "optax muon": (optax_ns, False),
             "orthax pallas plain": (orthax_ns("pallas", False), False)}
  if rectangular:
    methods["orthax xla gram"] = (orthax_ns("xla", True), True)
    methods["orthax pallas gram"] = (orthax_ns("pallas", True), True)
  return methods


def quality(out: jax.Array) -> float:
  """``orthogonalize.quality``'s measure of the first matrix, on the device:
  the singular values are the square roots of the small Gram matrix's
  eigenvalues (float32)."""
  o = out.reshape(-1, *out.shape[-2:])[0].astype(jnp.float32)
  gram = o.T @ o if o.shape[0] >= o.shape[1] else o @ o.T
  s = jnp.sort(jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(gram), 0.0)))
  return float(jnp.max(jnp.abs(s[int(0.1 * s.shape[0]):] - 1.0)))


def rel_diff(a: jax.Array, b: jax.Array) -> float:
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def newton_schulz(mode: str, reps: int, peak: float | None,
                  deadline: float) -> list[dict]:
  rows = []
  limit = _memory_limit()
  for (m, n), batches in SHAPES[mode]:
    for batch in batches:
      shape = (batch, m, n) if batch > 1 else (m, n)
      x32 = jax.random.normal(jax.random.key(m + n + batch), shape)
      reference = {}
      for dtype in (jnp.float32, jnp.bfloat16):
        x = x32.astype(dtype)
        for name, (fn, gram) in ns_methods(batch > 1, m != n).items():
          base = dict(part=1, method=name, shape=[m, n], batch=batch,
                      dtype=jnp.dtype(dtype).name)
          need = NS_BUFFERS * batch * m * n * 4
          if limit is not None and need > limit:
            rows.append({**base, "skipped": f"needs ~{need / 2**30:.1f} GiB "
                         f"of the device's {limit / 2**30:.1f}"})
            continue
          if _past(deadline, base, rows):
            continue
          try:
            fn = jax.jit(fn)
            t = median_seconds(fn, x, reps=reps)
            out = fn(x)
            if name == "orthax xla plain":
              reference[base["dtype"]] = out
            tflops = batch * set_flops([(m, n)], NS_STEPS, gram=gram) / t / 1e12
            rows.append({
                **base, "time_s": t, "tflops": tflops,
                "peak": None if peak is None else tflops / peak,
                "quality": quality(out),
                "vs_xla": rel_diff(out, reference[base["dtype"]]),
                "vs_f32": rel_diff(out, reference["float32"])})
            del out
          except Exception as e:  # one row per failure; the run goes on
            rows.append(_error_row(base, e))
  return rows


def auto_rows(rows: list[dict], date: str) -> list[Measured]:
  """Rows of ``MEASURED_FASTER`` for this device: each shape, dtype and path
  where orthax's kernels beat its XLA iteration by ``FASTER`` or more in
  every batch size measured (the smallest speed-up is kept)."""
  times = {}
  for r in rows:
    if r["part"] == 1 and "time_s" in r and r["method"].startswith("orthax"):
      _, backend, path = r["method"].split()
      key = (r["dtype"], path == "gram", tuple(sorted(r["shape"])), r["batch"])
      times.setdefault(key, {})[backend] = r["time_s"]
  speedups = {}
  for (dtype, gram, sides, _), t in times.items():
    if {"xla", "pallas"} <= set(t):
      speedups.setdefault((dtype, gram, sides), []).append(
          t["xla"] / t["pallas"])
  kind = jax.devices()[0].device_kind
  return [Measured(kind, dtype, gram, sides, round(min(s), 2), date)
          for (dtype, gram, sides), s in speedups.items() if min(s) >= FASTER]


# Part 4: the kernels' tiles.

# bfloat16 (the targets, and where the kernels are meant to win):
# (shape, gram); and the candidate tiles, the default's included.
TILE_CASES = {
    "full": [((4096, 4096), False), ((8192, 8192), False),
             ((768, 3072), True), ((1024, 4096), True)],
    "quick": [((32, 64), False), ((32, 32), False)],
}
TILE_CANDIDATES = {
    "full": [None, Tiles(64, 64), Tiles(128, 64),
             Tiles(128, 128), Tiles(256, 64)],
    "quick": [None, Tiles(32, 32)],
}


def tiles(mode: str, reps: int, deadline: float) -> list[dict]:
  """The Pallas iteration with each candidate tile (``None``: the table's
  choice per product, ``orthax.kernels.platform``) against XLA's, in
  bfloat16; ``vs default`` is the table's time over this one's."""
  rows = []
  for (m, n), gram in TILE_CASES[mode]:
    x = jax.random.normal(jax.random.key(m + n), (m, n), jnp.bfloat16)
    candidates = {"xla": "xla", **{
        "default" if t is None else f"{t.block}/{t.block_k}":
        pallas_ops(tiles=t) for t in TILE_CANDIDATES[mode]}}
    case = []
    for name, backend in candidates.items():
      base = dict(part=4, shape=[m, n], gram=gram, tiles=name)
      if _past(deadline, base, case):
        continue
      try:
        fn = jax.jit(lambda x, b=backend: orthax.polar.newton_schulz(
            x, np.asarray([MUON_ABC] * NS_STEPS), gram=gram, backend=b))
        case.append({**base, "time_s": median_seconds(fn, x, reps=reps)})
      except Exception as e:
        case.append(_error_row(base, e))
    default = next((r["time_s"] for r in case
                    if r["tiles"] == "default" and "time_s" in r), None)
    for r in case:
      if "time_s" in r and default is not None:
        r["vs_default"] = default / r["time_s"]
    rows += case
  return rows


# Part 2: one optimizer step.


def optimizers(params) -> dict[str, optax.GradientTransformation]:
  """``step.optimizers`` and every other ready optimizer of orthax."""
  return {**step.optimizers(params),
          **{f"orthax.{name}": getattr(orthax, name)(step.LR)
             for name in READY}}


def _megabytes(tree) -> float:
  return sum(x.nbytes for x in jax.tree.leaves(tree)) / 2**20


def optimizer_step(models: list[str], reps: int,
                   deadline: float) -> list[dict]:
  rows = []
  for model in models:
    try:
      params = step.gpt2_params(*step.MODELS[model])
      grads = jax.tree.map(
          lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
      txs = optimizers(params)
    except Exception as e:
      rows.append(_error_row(dict(part=2, model=model), e))
      continue
    count = sum(x.size for x in jax.tree.leaves(params))
    for name, tx in txs.items():
      base = dict(part=2, model=model, params=count, optimizer=name)
      if _past(deadline, base, rows):
        continue
      try:
        extra = {"max_logits": {}} if name == "orthax.muon_clip" else {}
        state = tx.init(params)
        # compiled once: timed, and its memory analysis read
        fn = step.jitted_step(tx, **extra).lower(params, state, grads).compile()
        memory = fn.memory_analysis()
        t = median_seconds(fn, params, state, grads, reps=reps)
        rows.append({**base, "time_s": t, "state_mb": _megabytes(state),
                     "temp_mb": memory.temp_size_in_bytes / 2**20,
                     "peak_mb": (memory.argument_size_in_bytes
                                 + memory.output_size_in_bytes
                                 - memory.alias_size_in_bytes
                                 + memory.temp_size_in_bytes) / 2**20})
        del state
      except Exception as e:
        rows.append(_error_row(base, e))
  return rows


# Part 3: training GPT-2 small of the example.


class _Config(dict):
  """``config.model`` without ml_collections: item and attribute access."""
  __getattr__ = dict.__getitem__


def training(mode: str, steps: int, reps: int, deadline: float,
             lr: float = 6e-4) -> list[dict]:
  sizes = dict(GPT[mode])
  batch = sizes.pop("batch")
  try:
    sys.path.insert(0, str(ROOT / "examples"))
    from gpt2_model import GPT as Model, _loss
    config = _Config(**sizes, mlp_ratio=4, tie_embeddings=True,
                     dtype="bfloat16")
    graphdef, params = nnx.split(Model(config, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(0), (steps, batch,
                                sizes["context"] + 1), 0, sizes["vocab_size"])
  except Exception as e:
    return [_error_row(dict(part=3), e)]
  loss_and_grads = jax.jit(jax.value_and_grad(
      lambda p, b: _loss(nnx.merge(graphdef, p), b)))
  txs = {"optax.adamw": optax.adamw(lr),
         "orthax.muon": orthax.muon(step.LR, adam_learning_rate=lr),
         "orthax.normuon": orthax.normuon(step.LR, adam_learning_rate=lr)}
  rows = []
  for name, tx in txs.items():
    base = dict(part=3, optimizer=name, batch=batch, context=sizes["context"],
                layers=sizes["num_layers"], steps=steps)
    if _past(deadline, base, rows):
      continue
    try:
      @jax.jit
      def train_step(p, state, b, tx=tx):
        loss, grads = loss_and_grads(p, b)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

      p, state, times = params, tx.init(params), []
      for i in range(steps):
        start = time.perf_counter()
        p, state, loss = jax.block_until_ready(train_step(p, state, tokens[i]))
        times.append(time.perf_counter() - start)
      t_step = float(np.median(times[1:] if steps > 1 else times))
      # the same program each time, timed next to each optimizer's steps:
      # the share compares two times taken under the same load
      t_grads = median_seconds(loss_and_grads, params, tokens[0], reps=reps)
      rows.append({**base, "step_s": t_step, "grads_s": t_grads,
                   "tokens_per_s": batch * sizes["context"] / t_step,
                   "optimizer_share": 1 - t_grads / t_step,
                   "loss": float(loss)})
    except Exception as e:
      rows.append(_error_row(base, e))
  return rows


# The command.

COLUMNS = {
    1: [("method", "{:20}"), ("shape", "{:>11}"), ("batch", "{:>5}"),
        ("dtype", "{:8}"), ("time_s", "{:>9}", 1e3, "ms"),
        ("tflops", "{:>8}", 1, "TFLOP/s"), ("peak", "{:>6}", 100, "%peak"),
        ("quality", "{:>7}", 1, "|s-1|"), ("vs_xla", "{:>8}"),
        ("vs_f32", "{:>8}")],
    2: [("model", "{:12}"), ("optimizer", "{:46}"),
        ("time_s", "{:>9}", 1e3, "ms"), ("state_mb", "{:>9}", 1, "state MB"),
        ("temp_mb", "{:>8}", 1, "temp MB"),
        ("peak_mb", "{:>8}", 1, "peak MB")],
    3: [("optimizer", "{:15}"), ("tokens_per_s", "{:>9}", 1, "tokens/s"),
        ("step_s", "{:>8}", 1e3, "step ms"), ("grads_s", "{:>9}", 1e3,
                                               "grads ms"),
        ("optimizer_share", "{:>9}", 100, "opt share"),
        ("loss", "{:>7}")],
    4: [("shape", "{:>11}"), ("gram", "{:5}"), ("tiles", "{:8}"),
        ("time_s", "{:>9}", 1e3, "ms"), ("vs_default", "{:>10}", 1,
                                         "vs default")],
}


def _cell(row: dict, key: str, fmt: str, scale: float = 1) -> str:
  value = row.get(key)
  if isinstance(value, float):
    value = f"{scale * value:.3g}"
  elif isinstance(value, list):
    value = "x".join(map(str, value))
  return fmt.format("-" if value is None else str(value))


def print_table(part: int, rows: list[dict]) -> None:
  columns = COLUMNS[part]
  header = " ".join(
      fmt.format(rest[1] if rest else key) for key, fmt, *rest in columns)
  print(f"\nPart {part}")
  print(header)
  print("-" * len(header))
  for r in rows:
    line = " ".join(_cell(r, key, fmt, *rest[:1]) for key, fmt, *rest in columns)
    note = r.get("error") or r.get("skipped")
    print(line if note is None else f"{line}  {note}")


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny shapes and model, one repetition (CPU ok)")
  parser.add_argument("--parts", default="1,2,3,4")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--out", type=Path, default=Path("runs/bench/device.json"))
  args = parser.parse_args(argv)
  parts = sorted({int(p) for p in args.parts.split(",")})
  if set(parts) - set(BUDGET_S):
    parser.error(f"--parts: choose from 1,2,3,4, got {args.parts!r}")
  device = jax.devices()[0]
  interpreted = jax.default_backend() not in ("gpu", "tpu")
  if interpreted and not args.quick:
    parser.error("no GPU or TPU: these sizes would take hours on CPU (and "
                 "the Pallas kernels run interpreted); run with --quick")
  mode = "quick" if args.quick else "full"
  reps = 1 if args.quick else args.reps
  peak = None if interpreted else peak_tflops(device)
  if interpreted:
    print(INTERPRET_NOTICE)
  print(f"{device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  now = datetime.datetime.now(datetime.timezone.utc)
  run = {1: lambda deadline: newton_schulz(mode, reps, peak, deadline),
         2: lambda deadline: optimizer_step(
             ["quick"] if args.quick else ["gpt2_small", "gpt2_medium"], reps,
             deadline),
         3: lambda deadline: training(mode, 3 if args.quick else args.steps,
                                      reps, deadline),
         4: lambda deadline: tiles(mode, reps, deadline)}
  rows, table = [], []
  for part in parts:
    deadline = time.monotonic() + (math.inf if args.quick else BUDGET_S[part])
    try:
      part_rows = run[part](deadline)
    except Exception as e:  # a part's own failure is a row too
      part_rows = [_error_row(dict(part=part), e)]
    print_table(part, part_rows)
    rows += part_rows
    if part == 1:
      table = auto_rows(rows, now.date().isoformat())
      print("\nRows for orthax.polar.auto_backend.MEASURED_FASTER "
            f"(kernels >= {FASTER}x XLA):")
      print("\n".join(f"    {r}," for r in table) or "    none")
    # written after every part: a run cut short keeps what it measured
    write_json(args.out, rows, device=device.device_kind,
               platform=jax.default_backend(), interpreted=interpreted,
               peak_tflops=peak,
               versions=dict(jax=jax.__version__,
                             jaxlib=importlib.metadata.version("jaxlib"),
                             optax=optax.__version__, flax=flax.__version__),
               date=now.isoformat(), args=vars(args) | {"out": str(args.out)},
               auto_table=[r._asdict() for r in table])
  return rows


if __name__ == "__main__":
  main()
