"""Benchmark: orthogonalization on the Pallas kernels against XLA, as ratios.

For each matrix shape (one GPT-2 small or medium layer's hidden matrices,
4096², 8192²) and each path (the plain iteration; the Gram one on rectangular
matrices), times one jitted bf16 ``orthax.orthogonalize`` with
``backend="xla"`` and with ``backend="pallas"`` in the same process, and
reports:

* ``pallas/xla``: the time ratio (below 1: the kernels win);
* ``% peak``: each backend's throughput as a fraction of the device's dense
  bf16 matmul peak, at the FLOPs XLA performs for that path
  (:func:`orthax.polar.newton_schulz.newton_schulz_flops`); the symmetric
  kernels skip about half of the ``m×m`` products' FLOPs, so theirs is an
  effective figure;
* ``rel diff``: ``||pallas - xla||_F / ||xla||_F``, a correctness check.

Prints a table and writes JSON. On CPU the kernels are interpreted: only
``--quick`` (tiny shapes, one repetition; the test suite runs it) is allowed
there, and its times are not performance figures.

  python benchmarks/kernels.py [--quick] [--sets small,medium,square] \
      [--reps 10] [--peak-tflops 989] [--out runs/bench/kernels.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import orthax
from orthax.polar.newton_schulz import newton_schulz_flops

from harness import chosen_sets, median_seconds, write_json
from orthogonalize import decaying_gradients

SETS = {
    "small": [(768, 2304), (768, 768), (768, 3072), (3072, 768)],
    "medium": [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024)],
    "square": [(4096, 4096), (8192, 8192)],
    "quick": [(32, 96), (48, 48)],
}
STEPS = 5  # the Polar Express preset's
# Dense bf16 matmul peak, TFLOP/s, from the vendors' datasheets (without
# sparsity), matched against jax's device_kind in this order.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H200", 989.0), ("A100", 312.0), ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5", 459.0),
    ("TPU v6 lite", 918.0), ("TPU v6e", 918.0),
)
INTERPRET_NOTICE = ("No GPU or TPU: the Pallas kernels ran in interpret mode on "
                    "CPU. These times are not performance figures; they only "
                    "show that the benchmark runs.")


def peak_tflops(device) -> float | None:
  for name, peak in PEAK_TFLOPS:
    if name in device.device_kind:
      return peak
  return None


def run(set_names, reps: int, peak: float | None) -> list[dict]:
  rows = []
  for name in set_names:
    grads = decaying_gradients(SETS[name])
    for key, x in grads.items():
      m, n = x.shape
      x = {"w": x.astype(jnp.bfloat16)}
      for path, gram in (("plain", False), ("gram", True)):
        if gram and m == n:
          continue  # the Gram path costs more FLOPs on a square matrix
        out, times = {}, {}
        for backend in ("xla", "pallas"):
          tx = orthax.orthogonalize(backend=backend, gram=gram)
          fn = jax.jit(lambda t, tx=tx: tx.update(t, None)[0])
          times[backend] = median_seconds(fn, x, reps=reps)
          out[backend] = np.asarray(fn(x)["w"], np.float64)
        flops = newton_schulz_flops(m, n, STEPS, gram=gram)
        frac = lambda t: None if peak is None else flops / t / (peak * 1e12)
        rows.append(dict(
            set=name, shape=[m, n], path=path, xla_s=times["xla"],
            pallas_s=times["pallas"],
            pallas_vs_xla=times["pallas"] / times["xla"],
            xla_peak=frac(times["xla"]), pallas_peak=frac(times["pallas"]),
            rel_diff=float(np.linalg.norm(out["pallas"] - out["xla"])
                           / np.linalg.norm(out["xla"]))))
  return rows


def print_table(rows) -> None:
  header = (f"{'set':7} {'shape':>11} {'path':6} {'xla ms':>9} "
            f"{'pallas ms':>10} {'pallas/xla':>11} {'xla %peak':>10} "
            f"{'pallas %peak':>13} {'rel diff':>9}")
  print(header)
  print("-" * len(header))
  pct = lambda f: "-" if f is None else f"{100 * f:.1f}"
  for r in rows:
    shape = "x".join(map(str, r["shape"]))
    print(f"{r['set']:7} {shape:>11} {r['path']:6} {1e3 * r['xla_s']:9.3f} "
          f"{1e3 * r['pallas_s']:10.3f} {r['pallas_vs_xla']:11.2f} "
          f"{pct(r['xla_peak']):>10} {pct(r['pallas_peak']):>13} "
          f"{r['rel_diff']:9.2e}")


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny shapes, one repetition (smoke test; CPU ok)")
  parser.add_argument("--sets", default="small,medium,square")
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="dense bf16 peak of the device (default: from "
                      "its device_kind where known)")
  parser.add_argument("--out", type=Path,
                      default=Path("runs/bench/kernels.json"))
  args = parser.parse_args(argv)
  sets = chosen_sets(parser, args, SETS)
  device = jax.devices()[0]
  interpreted = jax.default_backend() not in ("gpu", "tpu")
  if interpreted and not args.quick:
    parser.error("no GPU or TPU: the kernels would be interpreted, far too "
                 "slowly for these shapes; run with --quick")
  peak = None if interpreted else (args.peak_tflops or peak_tflops(device))
  if interpreted:
    print(INTERPRET_NOTICE)
  rows = run(sets, 1 if args.quick else args.reps, peak)
  print_table(rows)
  if interpreted:
    print(INTERPRET_NOTICE)
  write_json(args.out, rows, device=device.device_kind,
             platform=jax.default_backend(), interpreted=interpreted,
             peak_tflops=peak)
  return rows


if __name__ == "__main__":
  main()
