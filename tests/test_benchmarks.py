"""The benchmark scripts run (quick mode) and report sane ratios; no timing asserts."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
  spec = importlib.util.spec_from_file_location(f"bench_{name}", _BENCH / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def test_orthogonalize_benchmark_quick(tmp_path):
  bench = _load("orthogonalize")
  out = tmp_path / "o.json"
  rows = bench.main(["--quick", "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["rows"] == rows
  methods = [r["method"] for r in rows]
  assert methods == ["optax default", "optax scan"] + [
      f"orthax {m}" for m in bench.METHODS]
  by = {r["method"]: r for r in rows}
  # quality is a measurement, checked against what each method must reach
  assert by["orthax svd"]["quality"] < 1e-4
  # vs polar: a float32 SVD is backward stable (||dG|| <= c u ||G||, c ~ 100
  # for these 128-long reductions) and the polar factor moves by at most
  # 2 ||dG|| / s_min (s_min = 1/32 here): relative to ||U V^T||_F = sqrt(32),
  # 2 * 32 * 100 * 6e-8 * ||G||_F (1.27) / 5.66 = 8.6e-5.
  assert by["orthax svd"]["vs_polar"] < 1e-4
  # the same iteration as optax's: the same quality, on either path
  for m in ("orthax muon", "orthax muon, gram auto"):
    assert abs(by[m]["quality"] - by["optax scan"]["quality"]) < 1e-3
  # the default (Polar Express) is closer to orthogonal than optax's quintic,
  # and takes fewer FLOPs (Gram path on the rectangular matrices)
  assert by["orthax default"]["quality"] < by["optax scan"]["quality"] - 0.05
  assert by["orthax default"]["flops"] < 0.8
  assert by["orthax default, no restart"]["flops"] < by["orthax default"]["flops"]
  for r in rows:
    assert r["time_s"] > 0


def test_set_flops():
  bench = _load("orthogonalize")
  # 5 plain steps on a 2x3 matrix: 5 * (4*2*2*3 + 2*2**3) = 5 * 64
  assert bench.set_flops([(3, 2)]) == 5 * 64
  # Gram, restart after 2: two segments of 4*2*2*3 for G and Q X, plus
  # (8*2-6) and (8*3-6) times 2**3 for the 2- and 3-step segments
  assert bench.set_flops([(3, 2)], gram=True) == 2 * 48 + (10 + 18) * 8


def test_coefficient_design_quick(tmp_path):
  """benchmarks/coefficient_design.py --quick runs and writes its JSON, and
  its greedy design is the minimax one: each step's image is centred on 1,
  the design without the safety measures is never worse on its interval, and
  on Polar Express's interval it does at least as well as the published
  table."""
  from orthax.polar import PRESETS
  bench = _load("coefficient_design")
  out = tmp_path / "c.json"
  result = bench.main(["--quick", "--out", str(out)])
  assert json.loads(out.read_text())["rows"] == result["rows"]
  # The LP solves on a grid; between grid points (log spacing ratio
  # 1e3^(1/4000)) a quintic's extremum is missed by h^2 |p''| / 8 < 1e-6.
  lo, hi = bench.image(bench.minimax_quintic(0.01, 1.0, 4000), 0.01, 1.0)
  assert abs(lo + hi - 2) < 1e-4
  by = {(r["design"], r["steps"]): r for r in result["rows"]}
  for kind in ("frobenius", "schatten", "aol"):
    for steps in (4, 5):
      safe = by[f"{kind} greedy", steps]["band_error"]
      assert by[f"{kind} greedy, unsafe", steps]["band_error"] <= safe + 1e-4
  preset = PRESETS["polar_express"]
  table = bench.greedy_design(*preset.interval, 5)
  lo, hi = bench.band(table, *preset.interval)
  p_lo, p_hi = bench.band(preset.coeffs, *preset.interval)
  assert max(1 - lo, hi - 1) <= max(1 - p_lo, p_hi - 1)


def test_step_benchmark_quick(tmp_path):
  bench = _load("step")
  out = tmp_path / "s.json"
  rows = bench.main(["--quick", "--out", str(out)])
  assert json.loads(out.read_text())["rows"] == rows
  assert [r["optimizer"] for r in rows] == list(
      bench.optimizers(bench.gpt2_params(*bench.MODELS["quick"])))
  assert all(r["time_s"] > 0 for r in rows)


def test_step_benchmark_routes_like_orthax():
  """The fair optax baseline orthogonalizes exactly the leaves orthax does:
  every block kernel (4 per layer), as (fan_in, fan_out)."""
  import jax
  import orthax
  bench = _load("step")
  params = bench.gpt2_params(*bench.MODELS["quick"])
  theirs = jax.tree_util.tree_leaves_with_path(
      bench._same_routing(params),
      is_leaf=lambda x: x is None or isinstance(x, orthax.MuonDimensionNumbers))
  matrices = {orthax.routing.path_of(kp): d for kp, d in theirs
              if d is not None}
  assert all(k.endswith("kernel") and d == orthax.MuonDimensionNumbers((0,), (1,))
             for k, d in matrices.items())
  assert len(matrices) == 4 * bench.MODELS["quick"][3]


def test_methods_benchmark_quick(tmp_path, capsys):
  """benchmarks/methods.py --quick: AdamW and Muon train on one seed; the
  JSON holds a finite run per method, the summary against Muon and the
  environment; the table is printed and the plot written."""
  import math
  bench = _load("methods")
  out = tmp_path / "m.json"
  result = bench.main(["--quick", "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["rows"] == result["rows"]
  assert saved["summary"] == result["summary"]
  assert saved["args"]["methods"] == "adamw,muon" and saved["args"]["seeds"] == 1
  assert saved["jax"] and saved["devices"] and saved["wall_s"] > 0
  assert [(r["method"], r["seed"]) for r in saved["rows"]] == [
      ("adamw", 0), ("muon", 0)]
  for r in saved["rows"]:
    assert r["diverged"] is None
    assert r["eval_steps"] == [0, 2, 4, 5]
    assert all(math.isfinite(v) for v in r["val_loss"])
    assert r["final_val_loss"] == r["val_loss"][-1] < r["val_loss"][0]
    assert r["seconds_per_step"] > 0
  by = {s["method"]: s for s in saved["summary"]}
  assert by["muon"]["time_vs_muon"] == 1.0
  assert by["muon"]["val_loss_minus_muon"] == 0.0
  adamw = by["adamw"]
  assert adamw["val_loss_mean"] == saved["rows"][0]["final_val_loss"]
  assert adamw["val_loss_half_range"] == 0.0 and adamw["diverged"] == 0
  assert adamw["val_loss_minus_muon"] == (adamw["val_loss_mean"] -
                                          by["muon"]["val_loss_mean"])
  table = capsys.readouterr().out
  assert "val loss ± (max-min)/2" in table
  assert all(any(l.startswith(m) for l in table.splitlines())
             for m in ("adamw", "muon"))
  assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_kernels_benchmark_quick(tmp_path, capsys):
  """benchmarks/kernels.py --quick: both backends on every shape and path,
  the same results (bf16 bound of test_kernels.py), and on CPU the notice
  that interpreted times are not performance figures."""
  import jax
  bench = _load("kernels")
  out = tmp_path / "k.json"
  rows = bench.main(["--quick", "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["rows"] == rows
  assert [(tuple(r["shape"]), r["path"]) for r in rows] == [
      ((32, 96), "plain"), ((32, 96), "gram"), ((48, 48), "plain")]
  for r in rows:
    assert r["xla_s"] > 0 and r["pallas_s"] > 0
    assert r["pallas_vs_xla"] == r["pallas_s"] / r["xla_s"]
    assert r["rel_diff"] < 8 * 2.0**-8
  if jax.default_backend() not in ("gpu", "tpu"):
    assert saved["interpreted"] and saved["peak_tflops"] is None
    assert all(r["pallas_peak"] is None for r in rows)
    assert "not performance figures" in capsys.readouterr().out


def test_sharded_benchmark_quick(tmp_path):
  """benchmarks/sharded.py --quick in its own process (it needs 8 devices)."""
  import subprocess
  import test_sharded  # the module, not its tests: only the bound is used
  out = tmp_path / "sh.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  run = subprocess.run([sys.executable, str(_BENCH / "sharded.py"), "--quick",
                        "--out", str(out)], env=env, capture_output=True,
                       text=True, timeout=600)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  saved = json.loads(out.read_text())
  by = {r["method"]: r for r in saved["rows"]}
  # the FLOP count read from the HLO agrees with orthax's own: replicating
  # does all the work on each of the 8 devices
  assert abs(by["replicate"]["flops_vs_even_share"] - 8.0) < 1e-6
  assert by["orthax"]["flops_per_device"] < by["replicate"]["flops_per_device"] / 4
  assert by["orthax"]["collectives"]["all-to-all"] > 0
  assert sum(v for k, v in by["orthax"]["collectives"].items()
             if k != "all-to-all") == 0
  assert by["orthax"]["bytes_vs_xla_optax"] < 0.25
  # quick mode's one Dion row (rank 1/4) ran
  assert [r["method"] for r in saved["rows"]][3:] == ["dion r/4"]
  # float32 against the same iteration in float64: the bound derived in
  # tests/test_sharded.py
  assert by["orthax"]["max_abs_err_vs_float64"] <= test_sharded.F32_BOUND
  # the sharded program does not grow with the number of matrices (16 and
  # 256 experts); compile times are reported, not asserted
  lines = [r["sharded_hlo_lines"] for r in saved["compile"]]
  assert max(lines) <= 1.1 * min(lines), lines
