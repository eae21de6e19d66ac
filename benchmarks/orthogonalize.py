"""Benchmark: orthax.orthogonalize against optax's Newton–Schulz, as ratios.

For each matrix set (the hidden matrices of one GPT-2 small or medium layer)
and each orthax method/preset, times one jitted orthogonalization of the
whole set and reports, in the same process:

* ``vs optax default``: time / optax's default path (Jordan's quintic as one
  ``(3,)`` triple, 5 unrolled steps);
* ``vs optax scan``: time / optax's ``lax.scan`` path (the same coefficients
  given per step, shape ``(5, 3)``);
* ``vs matmul``: time / a square matmul of the same FLOPs as the plain
  5-step Newton–Schulz iteration (the machine's limit for it; ``-`` for
  SVD); Gram Newton–Schulz does fewer FLOPs, so it can go below 1;
* ``flops``: the method's matmul FLOPs / the plain iteration's (counted by
  :func:`orthax.polar.newton_schulz.newton_schulz_flops`, which the tests
  check against the traced program);
* ``quality``: worst ``|s - 1|`` over the singular values of the output after
  dropping the lowest 10%, on gradients with a decaying spectrum
  (``s_i ∝ 1 / (1 + i)``, as real gradients have);
* ``vs polar``: worst relative Frobenius distance ``||O - U V^T|| / ||U V^T||``
  of the output to the exact polar factor of the input (float64 SVD). The
  ``"aol"`` preconditioning orthogonalizes ``D G`` (a row scaling), not
  ``G``: its singular values can be close to 1 while its singular vectors
  are not ``G``'s, which ``quality`` cannot see and this column does.

Prints a table and writes JSON. Absolute times on shared CPUs mean little;
the ratios are taken within one run. ``--quick`` uses tiny shapes and one
repetition (the test suite runs it).

  python benchmarks/orthogonalize.py [--quick] [--sets small,medium] \
      [--out runs/bench/orthogonalize.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from optax.contrib import _muon as optax_muon

import orthax
from harness import chosen_sets, median_seconds, write_json
from orthax.polar import PRESETS
from orthax.polar.newton_schulz import newton_schulz_flops

# (fan_in, fan_out) of one transformer layer's hidden matrices: qkv, proj,
# MLP up, MLP down.
SETS = {
    "small": [(768, 2304), (768, 768), (768, 3072), (3072, 768)],
    "medium": [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024)],
    "quick": [(32, 96), (32, 32), (32, 128), (128, 32)],
}
# name -> orthax.orthogonalize keywords. "default" is orthogonalize()'s
# default (Polar Express, Gram Newton-Schulz where it saves FLOPs).
METHODS = {
    "default": {},
    "default, no restart": dict(gram_restart=None),
    "muon": dict(coeffs="muon", gram=False),
    "muon, gram auto": dict(coeffs="muon"),
    "polar_express, plain": dict(gram=False),
    "you, plain": dict(coeffs="you", gram=False),
    "aol": dict(preconditioning="aol"),
    "schatten": dict(preconditioning="schatten"),
    # the time a 4-step table would take (Polar Express's first 4 rows; no
    # 4-step table reaches the default's quality: coefficient_design.py)
    "aol, 4 steps": dict(preconditioning="aol", steps=4),
    "svd": dict(coeffs="svd"),
}
MUON_ABC = PRESETS["muon"].coeffs[0]


def set_flops(shapes, steps: int = 5, gram=False, gram_restart=2) -> float:
  """Matmul FLOPs of ``steps`` Newton–Schulz steps on every matrix of a set."""
  return float(sum(
      newton_schulz_flops(fi, fo, steps, gram=gram, gram_restart=gram_restart)
      for fi, fo in shapes))


def decaying_gradients(shapes, seed: int = 0,
                       dtype=jnp.float32) -> dict[str, jax.Array]:
  """One matrix per shape, random singular vectors, ``s_i = 1 / (1 + i)``."""
  rng = np.random.default_rng(seed)
  out = {}
  for i, (fi, fo) in enumerate(shapes):
    k = min(fi, fo)
    u, _ = np.linalg.qr(rng.normal(size=(fi, k)))
    v, _ = np.linalg.qr(rng.normal(size=(fo, k)))
    s = 1.0 / (1.0 + np.arange(k))
    out[f"m{i}_{fi}x{fo}"] = jnp.asarray((u * s) @ v.T, dtype)
  return out


def polar_factors(tree):
  """The exact polar factor ``U V^T`` of every leaf, by a float64 SVD."""
  def polar(x):
    u, _, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
    return u @ vt
  return jax.tree.map(polar, tree)


def quality(tree) -> float:
  worst = 0.0
  for x in jax.tree.leaves(tree):
    s = np.sort(np.linalg.svd(np.asarray(x, np.float64), compute_uv=False))
    kept = s[int(0.1 * len(s)):]
    worst = max(worst, float(np.max(np.abs(kept - 1.0))))
  return worst


def vs_polar(tree, polar) -> float:
  """Worst relative Frobenius distance of ``tree`` to ``polar`` (leafwise)."""
  return max(
      float(np.linalg.norm(np.asarray(x, np.float64) - p) / np.linalg.norm(p))
      for x, p in zip(jax.tree.leaves(tree), jax.tree.leaves(polar)))


def _accuracy(out, polar) -> dict:
  return dict(quality=quality(out), vs_polar=vs_polar(out, polar))


def run(set_names, reps: int) -> list[dict]:
  rows = []
  for name in set_names:
    shapes = SETS[name]
    grads = decaying_gradients(shapes)
    polar = polar_factors(grads)
    optax_default = jax.jit(lambda t: jax.tree.map(
        lambda x: optax_muon.orthogonalize_via_newton_schulz(
            x, jnp.asarray(MUON_ABC), 5), t))
    optax_scan = jax.jit(lambda t: jax.tree.map(
        lambda x: optax_muon.orthogonalize_via_newton_schulz(
            x, jnp.asarray(PRESETS["muon"].coeffs), 5), t))
    flops = set_flops(shapes)
    k = int(round((flops / 2) ** (1 / 3)))
    square = jnp.ones((k, k), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    t_default = median_seconds(optax_default, grads, reps=reps)
    t_scan = median_seconds(optax_scan, grads, reps=reps)
    t_matmul = median_seconds(matmul, square, reps=reps)
    rows.append(dict(set=name, method="optax default", time_s=t_default,
                     vs_optax_default=1.0, vs_optax_scan=t_default / t_scan,
                     vs_matmul=t_default / t_matmul, flops=1.0,
                     **_accuracy(optax_default(grads), polar)))
    rows.append(dict(set=name, method="optax scan", time_s=t_scan,
                     vs_optax_default=t_scan / t_default, vs_optax_scan=1.0,
                     vs_matmul=t_scan / t_matmul, flops=1.0,
                     **_accuracy(optax_scan(grads), polar)))
    for method, kw in METHODS.items():
      tx = orthax.orthogonalize(**kw)
      fn = jax.jit(lambda t, tx=tx: tx.update(t, None)[0])
      t = median_seconds(fn, grads, reps=reps)
      svd = kw.get("coeffs") == "svd"
      rows.append(dict(
          set=name, method=f"orthax {method}", time_s=t,
          vs_optax_default=t / t_default, vs_optax_scan=t / t_scan,
          vs_matmul=None if svd else t / t_matmul,
          flops=None if svd else set_flops(
              shapes, kw.get("steps", 5), gram=kw.get("gram", "auto"),
              gram_restart=kw.get("gram_restart", 2)) / flops,
          **_accuracy(fn(grads), polar)))
  return rows


def print_table(rows) -> None:
  header = (f"{'set':8} {'method':28} {'time s':>9} {'vs optax default':>17} "
            f"{'vs optax scan':>14} {'vs matmul':>10} {'flops':>6} "
            f"{'quality':>8} {'vs polar':>9}")
  print(header)
  print("-" * len(header))
  for r in rows:
    vm = "-" if r["vs_matmul"] is None else f"{r['vs_matmul']:.2f}"
    fl = "-" if r["flops"] is None else f"{r['flops']:.2f}"
    print(f"{r['set']:8} {r['method']:28} {r['time_s']:9.4f} "
          f"{r['vs_optax_default']:17.2f} {r['vs_optax_scan']:14.2f} "
          f"{vm:>10} {fl:>6} {r['quality']:8.3f} {r['vs_polar']:9.3f}")


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny shapes, one repetition (smoke test)")
  parser.add_argument("--sets", default="small,medium")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--out", type=Path,
                      default=Path("runs/bench/orthogonalize.json"))
  args = parser.parse_args(argv)
  sets = chosen_sets(parser, args, SETS)
  rows = run(sets, 1 if args.quick else args.reps)
  print_table(rows)
  write_json(args.out, rows)
  return rows


if __name__ == "__main__":
  main()
