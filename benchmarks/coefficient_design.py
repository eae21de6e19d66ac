"""Benchmark: Polar Express coefficients designed for each preconditioning.

Newton–Schulz maps every singular value ``s`` of the scaled input through a
composition of odd quintics ``p(s) = a s + b s^3 + c s^5``. Amsel et al.
(2025) choose them greedily: for step ``t`` on the current interval
``[l_t, u_t]``, ``p_t`` minimizes ``max |1 - p_t(s)|`` over the interval, and
the next interval is the image ``[min p_t, max p_t]``; the greedy composition
is the best one for the whole interval. This script

1. measures, in float64, where each preconditioning of
   :func:`orthax.polar.newton_schulz.precondition` puts the singular values
   that the benchmark's quality keeps (``benchmarks/orthogonalize.py``: all
   but the lowest 10%), on the benchmark's gradients (``s_i ∝ 1/(1+i)``, the
   GPT-2 small and medium layer shapes) and on Gaussian ones;
2. designs 4- and 5-step tables on an interval chosen from those landings
   (the greedy step is a linear program over a dense grid; the image of each
   step is exact, from the quintic's critical points), with the paper's two
   safety measures: the *cushion* (each step is designed on
   ``[max(l, κ u), u]``, ``κ = 0.02407``, then scaled so that its image of
   ``[l, u]`` is centred on 1: no step spends its whole slope on the lowest
   values) and the *safety factor* (every step but the last takes its input
   divided by 1.01, so values that rounding pushes up to 1% past ``u`` stay
   where the step was designed);
3. reports what each design reaches: the band on its interval, and in
   float64 on the benchmark's gradients the quality (worst ``|s - 1|`` over
   the kept singular values) and the relative distance to the exact polar
   factor, next to the default (Polar Express, 5 steps, Frobenius, 1.02);
4. for each decaying spectrum, the smallest ``l`` (with ``u = 1``) from
   which 4 steps reach the default's quality there, to compare with the
   landings.

Prints tables and writes JSON. ``--quick`` uses tiny shapes and a coarser
grid (the test suite runs it).

  python benchmarks/coefficient_design.py [--quick] \
      [--out runs/bench/coefficient_design.json]

References:
  N. Amsel, D. Persson, C. Musco, R. M. Gower, The Polar Express: Optimal
  Matrix Sign Methods and Their Application to the Muon Algorithm, 2025,
  arXiv:2505.16932
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np
from scipy.optimize import brentq, linprog

from harness import chosen_sets, write_json
from orthax.polar import PRESETS, newton_schulz
from orthax.polar.newton_schulz import precondition
from orthogonalize import (SETS, decaying_gradients, polar_factors, quality,
                           vs_polar)

CUSHION = 0.02407327424182761
SAFETY = 1.01
KEPT = 0.1  # the benchmark's quality drops the lowest 10% of singular values
# preconditioning -> the margin its design uses: the Frobenius default keeps
# Polar Express's 1.02; AOL and Schatten-4 bound the spectral norm by 1 on
# their own and the safety factor covers rounding, so no margin.
MARGINS = {"frobenius": PRESETS["polar_express"].norm_margin,
           "schatten": 1.0, "aol": 1.0, "spectral": 1.0}


def _powers(s):
  s = np.asarray(s, np.float64)
  return np.stack([s, s**3, s**5], axis=-1)


def minimax_quintic(lo: float, hi: float, points: int) -> np.ndarray:
  """``(a, b, c)`` minimizing ``max |1 - p(s)|`` on a grid of ``[lo, hi]``.

  The linear program in ``(a, b, c, E)``: minimize ``E`` subject to
  ``-E <= 1 - p(s_i) <= E`` at every grid point; the grid is log-spaced
  (the low end, where ``p`` is steep) joined with an even one (the top).
  """
  grid = np.union1d(np.geomspace(lo, hi, points), np.linspace(lo, hi, points))
  v = _powers(grid)
  ones = np.ones((len(grid), 1))
  a_ub = np.block([[-v, -ones], [v, -ones]])
  b_ub = np.concatenate([-np.ones(len(grid)), np.ones(len(grid))])
  res = linprog([0, 0, 0, 1], A_ub=a_ub, b_ub=b_ub,
                bounds=[(None, None)] * 3 + [(0, None)], method="highs")
  if not res.success:
    raise RuntimeError(f"minimax LP on [{lo}, {hi}] failed: {res.message}")
  return res.x[:3]


def image(abc, lo: float, hi: float) -> tuple[float, float]:
  """Exact ``[min p, max p]`` over ``[lo, hi]``: the ends and the zeros of
  ``p'(s) = a + 3 b s^2 + 5 c s^4`` inside."""
  a, b, c = abc
  candidates = [lo, hi]
  for root in np.roots([5 * c, 3 * b, a]):
    if abs(root.imag) <= 1e-12 * abs(root) and root.real > 0:
      s = np.sqrt(root.real)
      if lo < s < hi:
        candidates.append(s)
  values = _powers(candidates) @ np.asarray(abc)
  return float(values.min()), float(values.max())


def greedy_design(lo: float, hi: float, steps: int, *, safe: bool = True,
                  points: int = 4000) -> np.ndarray:
  """The greedy ``(steps, 3)`` table for ``[lo, hi]``.

  ``safe``: with the cushion and the safety factor (module docstring).
  """
  rows = []
  for t in range(steps):
    abc = minimax_quintic(max(lo, CUSHION * hi) if safe else lo, hi, points)
    if safe:
      abc = abc * 2 / sum(image(abc, lo, hi))  # centre the image on 1
      if t + 1 < steps:
        abc = abc / SAFETY ** np.array([1, 3, 5])
    rows.append(abc)
    lo, hi = image(abc, lo, hi)
  return np.array(rows)


def intervals(table, lo: float, hi: float) -> list[tuple[float, float]]:
  """``[l_t, u_t]`` after each step of ``table`` on ``[lo, hi]`` (exact)."""
  out = []
  for abc in table:
    lo, hi = image(abc, lo, hi)
    out.append((lo, hi))
  return out


def band(table, lo: float, hi: float) -> tuple[float, float]:
  """Where the composed steps of ``table`` map ``[lo, hi]``."""
  return intervals(table, lo, hi)[-1]


def gaussian_gradients(shapes, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {f"m{i}_{fi}x{fo}": rng.normal(size=(fi, fo))
          for i, (fi, fo) in enumerate(shapes)}


def spectra(set_names) -> dict[str, dict[str, np.ndarray]]:
  """name -> float64 gradients: the benchmark's decaying ones, Gaussian ones."""
  out = {}
  for name in set_names:
    with jax.enable_x64(True):
      grads = decaying_gradients(SETS[name], dtype=np.float64)
    out[f"decay {name}"] = {k: np.asarray(v) for k, v in grads.items()}
    out[f"gauss {name}"] = gaussian_gradients(SETS[name])
  return out


def landing(grads, kind: str) -> dict:
  """Kept interval ``[lo, hi]`` (and the overall minimum) after ``kind``."""
  lo, hi, low = np.inf, 0.0, np.inf
  with jax.enable_x64(True):
    for x in grads.values():
      wide = x if x.shape[0] <= x.shape[1] else x.T
      y, _ = precondition(wide, kind, margin=MARGINS[kind], eps=0.0)
      s = np.sort(np.linalg.svd(np.asarray(y), compute_uv=False))
      lo, hi = min(lo, s[int(KEPT * len(s))]), max(hi, s[-1])
      low = min(low, s[0])
  return dict(kept_lo=float(lo), hi=float(hi), lo=float(low),
              ratio=float(lo / hi))


def evaluate(grads, polar, table, kind: str) -> dict:
  """Float64 Newton–Schulz with ``table`` after ``kind``: the benchmark's
  quality and the distance to the exact polar factor."""
  with jax.enable_x64(True):
    out = {k: np.asarray(newton_schulz(x, table, norm_margin=MARGINS[kind],
                                       eps=0.0, preconditioning=kind,
                                       gram="auto"))
           for k, x in grads.items()}
  return dict(quality=quality(out), vs_polar=vs_polar(out, polar))


def lowest_interval(steps: int, target: float, points: int) -> float:
  """Smallest ``l`` whose safe greedy ``steps``-step design on ``[l, 1]``
  ends within ``target`` of 1 (its worst ``|s - 1|`` falls as ``l`` grows)."""
  def excess(log_l):
    table = greedy_design(np.exp(log_l), 1.0, steps, points=points)
    lo, hi = band(table, np.exp(log_l), 1.0)
    return max(1 - lo, hi - 1) - target
  return float(np.exp(brentq(excess, np.log(1e-4), np.log(0.5), xtol=1e-3)))


def _round_down(x: float) -> float:
  """``x`` rounded down to 2 significant digits."""
  unit = 10.0 ** (np.floor(np.log10(x)) - 1)
  return float(np.floor(x / unit) * unit)


def run(set_names, points: int) -> dict:
  grads = spectra(set_names)
  polar = {name: polar_factors(g) for name, g in grads.items()}
  landings = [dict(spectrum=name, preconditioning=kind, **landing(g, kind))
              for name, g in grads.items() for kind in MARGINS]

  # The design interval of each preconditioning: from the lowest kept value
  # over the decaying spectra (the hard ones; Gaussian spectra land higher),
  # rounded down to 2 digits, up to 1, the bound each guarantees.
  default = PRESETS["polar_express"]
  designs = {"polar_express (preset)": ("frobenius", default.interval, None)}
  for kind in ("frobenius", "schatten", "aol"):
    lo = _round_down(min(r["kept_lo"] for r in landings
                         if r["preconditioning"] == kind
                         and r["spectrum"].startswith("decay")))
    designs[f"{kind} greedy"] = (kind, (lo, 1.0), True)
    designs[f"{kind} greedy, unsafe"] = (kind, (lo, 1.0), False)

  rows = []
  for design, (kind, (lo, hi), safe) in designs.items():
    for steps in (4, 5):
      if safe is None:
        table = default.coeffs[:steps]
      else:
        table = greedy_design(lo, hi, steps, safe=safe, points=points)
      steps_intervals = intervals(table, lo, hi)
      b_lo, b_hi = steps_intervals[-1]
      row = dict(design=design, preconditioning=kind, interval=[lo, hi],
                 steps=steps, coeffs=table.tolist(),
                 intervals=[list(i) for i in steps_intervals],
                 band=[b_lo, b_hi], band_error=max(1 - b_lo, b_hi - 1),
                 spectra={})
      for name, g in grads.items():
        row["spectra"][name] = evaluate(g, polar[name], table, kind)
      rows.append(row)
  target = rows[1]["spectra"]  # the preset's 5 steps: the default
  need = [dict(spectrum=name, default_quality=target[name]["quality"],
               lowest_l=lowest_interval(4, target[name]["quality"], points))
          for name in target if name.startswith("decay")]
  return dict(landings=landings, default=target, rows=rows,
              four_steps_need=need)


def print_tables(result) -> None:
  print("Where the kept singular values land (float64):")
  print(f"{'spectrum':14} {'preconditioning':15} {'kept lo':>9} {'hi':>7} "
        f"{'kept lo/hi':>10} {'min':>9}")
  for r in result["landings"]:
    print(f"{r['spectrum']:14} {r['preconditioning']:15} {r['kept_lo']:9.2e} "
          f"{r['hi']:7.4f} {r['ratio']:10.2e} {r['lo']:9.2e}")
  names = list(result["default"])
  print("\nDesigns: band on the design interval; per spectrum, "
        "quality / vs polar (float64)")
  head = f"{'design':26} {'steps':>5} {'interval':>16} {'band':>16}"
  print(head + "".join(f" {n:>17}" for n in names))
  for r in result["rows"]:
    lo, hi = r["interval"]
    cells = "".join(f" {r['spectra'][n]['quality']:8.3f}/"
                    f"{r['spectra'][n]['vs_polar']:.3f}" for n in names)
    interval = f"[{lo:.2e}, {hi:g}]"
    image_band = "[{:.3f}, {:.3f}]".format(*r["band"])
    print(f"{r['design']:26} {r['steps']:5d} {interval:>16} "
          f"{image_band:>16}{cells}")
  print()
  for need in result["four_steps_need"]:
    print(f"{need['spectrum']}: the default reaches quality "
          f"{need['default_quality']:.3f}; 4 safe greedy steps reach it only "
          f"from l >= {need['lowest_l']:.2e} (u = 1).")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny shapes, a coarse grid (smoke test)")
  parser.add_argument("--sets", default="small,medium")
  parser.add_argument("--out", type=Path,
                      default=Path("runs/bench/coefficient_design.json"))
  args = parser.parse_args(argv)
  sets = chosen_sets(parser, args, SETS)
  result = run(sets, points=500 if args.quick else 4000)
  print_tables(result)
  write_json(args.out, result["rows"], landings=result["landings"],
             default=result["default"],
             four_steps_need=result["four_steps_need"])
  return result


if __name__ == "__main__":
  main()
