"""The benchmark scripts run (quick mode) and report sane ratios; no timing asserts."""

from __future__ import annotations

import importlib.util
import json
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
  # the same iteration as optax's: the same quality
  assert abs(by["orthax muon"]["quality"] - by["optax scan"]["quality"]) < 1e-3
  assert by["orthax polar_express"]["quality"] < by["orthax muon"]["quality"]
  for r in rows:
    assert r["time_s"] > 0


def test_newton_schulz_flops():
  bench = _load("orthogonalize")
  # 5 steps on a 2x3 matrix: 5 * (4*2*2*3 + 2*2**3) = 5 * 64
  assert bench.newton_schulz_flops([(3, 2)]) == 5 * 64
