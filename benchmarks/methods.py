"""Benchmark: train_gpt2.py's optimizers on configs/tiny.py, over seeds.

Each method (default: all of ``train_gpt2.OPTIMIZERS``) trains the tiny
byte-level GPT of ``configs/tiny.py`` with its own settings from
``config.optimizer.<method>`` (the swept learning rates: nothing here
overrides them) for ``--steps`` steps (default: the config's; the whole
schedule, warmup and decay, scales with it) on each of ``--seeds`` seeds
(0, 1, ...: the seed draws the initialization and the batches). Every run
goes through ``train_gpt2.train`` in this process, on data loaded once.

The runs are interleaved by seed: seed 0 of every method, then seed 1 of
every method, and so on, so that a change of load on the machine during the
benchmark hits all methods alike instead of whichever ran last.

  python benchmarks/methods.py [--quick] [--methods adamw,muon,...]
      [--steps 300] [--seeds 3] [--config configs/tiny.py]
      [--out runs/bench/methods.json] [--plot runs/bench/methods.png]

Reading the table, one row per method:

* ``val loss``: the validation loss at the last step (nats/byte), mean over
  the seeds ± half its range, (max - min) / 2;
* ``- muon``: that mean minus Muon's (negative: better than Muon);
* ``s/step``: the median over seeds of ``train``'s seconds per step: the
  training steps after the first (which compiles), evaluation excluded, but
  the host's batch assembly and the per-step fetch of the loss included
  (``log_every`` is 1 in the tiny config, so steps do not overlap);
* ``vs muon``: that time over Muon's. This machine is shared and noisy:
  compare the ratios, not the absolute times.

A run that diverges (``train_gpt2.DivergenceError``) is kept as a row with
its error; the method's figures are over its other seeds, and the table
says how many diverged.

Writes JSON (the arguments, the config, the environment, one row per run
with its validation curve and its wall time, compile and evaluation
included, and the per-method summary) and a plot of the validation loss
against step: per method the mean over seeds, with a band from the lowest
to the highest seed. ``--quick``: AdamW and Muon, one seed, 5 steps of a
one-layer model on batches of 8, mostly compile time (the test suite runs
it). The measured figures go to BUILD.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness import write_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import train_gpt2  # noqa: E402

BASELINE = "muon"
# --quick: what it runs unless told otherwise, and the config fields it sets
QUICK = dict(methods="adamw,muon", seeds=1, steps=5)
QUICK_FIELDS = {"eval_every": 2, "eval_batches": 2, "batch_size": 8,
                "model.num_layers": 1}


def one_run(config, name: str, data, mesh) -> dict:
  """Trains ``name`` with ``config`` (its seed): the row of one run."""
  start = time.perf_counter()
  row = dict(method=name, seed=config.seed)
  try:
    result = train_gpt2.train(config, name, data, mesh=mesh)
  except train_gpt2.DivergenceError as e:
    return row | dict(diverged=str(e), wall_s=time.perf_counter() - start)
  return row | dict(
      diverged=None, wall_s=time.perf_counter() - start,
      final_val_loss=result["final_val_loss"],
      final_val_step=result["final_val_step"],
      final_train_loss=result["final_train_loss"],
      seconds_per_step=result["seconds_per_step"],
      eval_steps=result["eval_steps"], val_loss=result["val_loss"])


def run_all(config, names: tuple[str, ...], seeds: int) -> list[dict]:
  """Every method on every seed, interleaved by seed, on shared data."""
  data = train_gpt2.load_data(config)
  mesh = train_gpt2.make_mesh(config.mesh.data)
  rows = []
  with tempfile.TemporaryDirectory() as workdir:  # metrics.jsonl, unread
    for seed in range(seeds):
      for name in names:
        config.seed = seed
        config.workdir = str(Path(workdir) / f"seed{seed}")
        row = one_run(config, name, data, mesh)
        rows.append(row)
        done = (f"diverged: {row['diverged']}" if row["diverged"] else
                f"val loss {row['final_val_loss']:.4f}")
        print(f"seed {seed} {name}: {done} ({row['wall_s']:.0f} s)",
              flush=True)
  return rows


def summarize(rows: list[dict], names: tuple[str, ...]) -> list[dict]:
  """Per method: the mean final validation loss and its half range over
  the seeds that finished, the median seconds per step, and both against
  Muon's (``None`` without Muon or where no seed finished)."""
  summary = []
  for name in names:
    runs = [r for r in rows if r["method"] == name]
    done = [r for r in runs if not r["diverged"]]
    losses = [r["final_val_loss"] for r in done]
    times = [r["seconds_per_step"] for r in done
             if r["seconds_per_step"] is not None]
    summary.append(dict(
        method=name, seeds=len(runs), diverged=len(runs) - len(done),
        val_loss_mean=statistics.fmean(losses) if losses else None,
        val_loss_half_range=(max(losses) - min(losses)) / 2 if losses
        else None,
        seconds_per_step=statistics.median(times) if times else None))
  base = next((s for s in summary if s["method"] == BASELINE), {})
  relative = lambda a, b, op: None if a is None or b is None else op(a, b)
  for s in summary:
    s["val_loss_minus_muon"] = relative(
        s["val_loss_mean"], base.get("val_loss_mean"), lambda a, b: a - b)
    s["time_vs_muon"] = relative(
        s["seconds_per_step"], base.get("seconds_per_step"),
        lambda a, b: a / b)
  return summary


def format_table(summary: list[dict]) -> str:
  """The summary as text, one row per method ("-": no figure)."""
  cell = lambda value, spec: "-" if value is None else format(value, spec)
  header = (f"{'method':<12} {'val loss ± (max-min)/2':>23} {'- muon':>8} "
            f"{'s/step':>8} {'vs muon':>8}  diverged")
  lines = [header, "-" * len(header)]
  for s in summary:
    loss = ("-" if s["val_loss_mean"] is None else
            f"{s['val_loss_mean']:.4f} ± {s['val_loss_half_range']:.4f}")
    lines.append(
        f"{s['method']:<12} {loss:>23} "
        f"{cell(s['val_loss_minus_muon'], '+.4f'):>8} "
        f"{cell(s['seconds_per_step'], '.4f'):>8} "
        f"{cell(s['time_vs_muon'], '.2f'):>8}  "
        f"{s['diverged']}/{s['seeds']}")
  return "\n".join(lines)


def plot(rows: list[dict], names: tuple[str, ...], title: str) -> Figure:
  """Validation loss against step: per method the mean over its finished
  seeds, with a band from the lowest to the highest."""
  fig = Figure(figsize=(7, 4.5))
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  trained = []
  for name in names:
    done = [r for r in rows if r["method"] == name and not r["diverged"]]
    if not done:
      continue
    steps = done[0]["eval_steps"]  # the same on every seed: the config's
    losses = np.array([r["val_loss"] for r in done])
    line, = ax.plot(steps, losses.mean(0), marker=".", label=name)
    ax.fill_between(steps, losses.min(0), losses.max(0), alpha=0.2,
                    color=line.get_color(), lw=0)
    trained.append(losses[:, 1:])
  # Zoom past step 0 (the same loss for every method) to where they differ.
  if trained and trained[0].size:
    ax.set_ylim(min(t.min() for t in trained) - 0.05,
                max(t[:, 0].max() for t in trained) + 0.1)
  ax.set_xlabel("step")
  ax.set_ylabel("validation loss (nats/byte)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  return fig


def parse_args(argv):
  """The arguments, with the defaults filled in, the config they give and
  the methods' names; a bad choice stops with argparse's error."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help=f"{QUICK['methods']}, {QUICK['seeds']} seed, "
                      f"{QUICK['steps']} steps, a smaller model (smoke test)")
  parser.add_argument("--methods", help="comma-separated, from "
                      f"{','.join(train_gpt2.OPTIMIZERS)} (default: all)")
  parser.add_argument("--steps", type=int,
                      help="training steps (default: the config's)")
  parser.add_argument("--seeds", type=int, help="seeds 0 to N-1 (default 3)")
  parser.add_argument("--config", type=Path,
                      default=ROOT / "configs" / "tiny.py")
  parser.add_argument("--out", type=Path,
                      default=Path("runs/bench/methods.json"))
  parser.add_argument("--plot", type=Path,
                      help="the plot (default: --out with .png)")
  args = parser.parse_args(argv)
  config = train_gpt2.load_config(args.config)
  if args.quick:
    config.update_from_flattened_dict(QUICK_FIELDS)
  defaults = QUICK if args.quick else dict(
      methods=",".join(train_gpt2.OPTIMIZERS), seeds=3, steps=config.steps)
  for key, value in (defaults | dict(plot=args.out.with_suffix(".png"))
                     ).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.seeds < 1:
    parser.error(f"--seeds must be at least 1, got {args.seeds}")
  config.steps = args.steps
  try:
    names = train_gpt2.parse_optimizers(args.methods, "--methods")
    train_gpt2.check_config(config)
  except train_gpt2.ConfigError as e:
    parser.error(str(e))
  return args, config, names


def main(argv=None) -> dict:
  args, config, names = parse_args(argv)
  # what every run shares (run_all sets each run's seed and workdir)
  settings = {k: v for k, v in config.to_dict().items()
              if k not in ("seed", "workdir")}
  start = time.perf_counter()
  rows = run_all(config, names, args.seeds)
  wall_s = time.perf_counter() - start
  summary = summarize(rows, names)
  print(f"\n{args.steps} steps, {args.seeds} seed(s), {wall_s:.0f} s in all")
  print(format_table(summary))
  write_json(args.out, rows, summary=summary, wall_s=wall_s,
             cpus=os.cpu_count(), config=settings,
             args={k: str(v) if isinstance(v, Path) else v
                   for k, v in vars(args).items()})
  args.plot.parent.mkdir(parents=True, exist_ok=True)
  plot(rows, names, f"{args.config.name}, {args.steps} steps, mean of "
       f"{args.seeds} seed(s)").savefig(args.plot, dpi=120)
  print(f"wrote {args.plot}")
  return dict(rows=rows, summary=summary)


if __name__ == "__main__":
  main()
