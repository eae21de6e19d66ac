"""What every benchmark script shares: timing and writing its JSON."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import jax


def median_seconds(fn, *args, reps: int) -> float:
  """Median wall time of ``fn(*args)`` over ``reps`` runs, after a warm-up
  call that compiles it."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def write_json(path: Path, rows: list[dict], **meta) -> None:
  """Writes ``rows`` with the JAX version, the devices and ``meta``."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(dict(
      jax=jax.__version__, devices=[str(d) for d in jax.devices()], **meta,
      rows=rows), indent=1))
  print(f"wrote {path}")


def chosen_sets(parser, args, known) -> list[str]:
  """The shape sets a benchmark runs: ``["quick"]`` under ``--quick``, else
  the comma-separated ``--sets``, each checked against ``known`` (an unknown
  name stops with argparse's error, listing the known ones)."""
  sets = ["quick"] if args.quick else args.sets.split(",")
  unknown = sorted(set(sets) - set(known))
  if unknown:
    parser.error(f"unknown sets {unknown}; choose from {sorted(known)}")
  return sets
