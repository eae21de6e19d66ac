"""benchmarks/device.py --quick: every part runs on CPU, its JSON has the
device, the versions and each part's rows, every Newton–Schulz method matches
orthax's XLA iteration, and every ready optimizer has a step row. No timing
asserts."""

from __future__ import annotations

import json

import jax

import orthax
from orthax.polar import auto_backend
from test_benchmarks import _load
from test_optimizer_options import READY

# Relative Frobenius distance of a float32 method's output to orthax's XLA
# plain float32 output. Both run 5 steps of the same quintic; they differ
# only in rounding (summation order, Gram vs plain products, optax's absolute
# eps vs orthax's relative one: 1e-8 against ||G||_F ~ 30, i.e. 3e-10).
# Each step rounds 3 matmul results, each within n u of their value, n <= 96
# the longest reduction here, u = 2^-24: 3 * 96 * 6e-8 = 1.7e-5 per step.
# An error in the iterate propagates through the next steps with at most the
# quintic's relative sensitivity s p'(s) / p(s), <= 2.6 where singular
# values go (s <= 1.13, p(s) = 3.4445 s - 4.775 s^3 + 2.0315 s^5), so the
# 5 steps' errors add up to at most 1.7e-5 * (1 + 2.6 + ... + 2.6^4) =
# 1.7e-5 * 74 = 1.3e-3.
F32_BOUND = 1.3e-3
# A bfloat16 method against the float32 XLA output: bfloat16 keeps 8
# significant bits, u = 2^-8 = 3.9e-3 per rounding. The iterations round
# operands or results to bfloat16 at most 6 times a step (X, A = X X^T, A^2,
# B, B X, the sum; the Gram path's R and Q likewise), 30 roundings over 5
# steps. Roundings of independent elements are random: they add in
# quadrature per step (sqrt(6) u = 9.6e-3), and the steps' errors compound
# with the sensitivity above (x 74 at worst, first order): 0.7, useless.
# The iteration damps what lies along singular values near 1 (|p'(1)| =
# 0.72), where the output's norm is; the relative sensitivity exceeds 1.5
# only for s > 1.05, which the quintic leaves after one step (p(1.05) =
# 0.79). Taking the damped bound, each rounding counts at most once more:
# 2 * 30 * u = 0.23. A method with a wrong coefficient, transpose or
# normalization is off by O(1).
BF16_BOUND = 0.23


def _quick(tmp_path, part):
  bench = _load("device")
  out = tmp_path / "device.json"
  rows = bench.main(["--quick", "--parts", str(part), "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["rows"] == rows
  assert saved["device"] and saved["platform"] == "cpu"
  assert saved["interpreted"] and saved["peak_tflops"] is None
  assert set(saved["versions"]) == {"jax", "jaxlib", "optax", "flax"}
  assert saved["date"] and saved["args"]["quick"]
  assert not [r for r in rows if "error" in r or "skipped" in r]
  assert {r["part"] for r in rows} == {part}
  return bench, rows, saved


# One test per part: pytest-xdist can run them on both workers.
def test_newton_schulz_part(tmp_path):
  bench, ns, saved = _quick(tmp_path, 1)
  methods = {"optax muon", "orthax xla plain", "orthax xla gram",
             "orthax pallas plain", "orthax pallas gram"}
  assert {r["method"] for r in ns} == methods
  assert {r["dtype"] for r in ns} == {"float32", "bfloat16"}
  assert {(tuple(r["shape"]), r["batch"]) for r in ns} == {
      (shape, b) for shape, batches in bench.SHAPES["quick"] for b in batches}
  for r in ns:
    assert r["time_s"] > 0 and r["tflops"] > 0
    # 5 muon quintics leave singular values in [0.68, 1.13]
    assert r["quality"] < 0.35, r
    if r["dtype"] == "float32":
      assert r["vs_xla"] <= F32_BOUND, r
    else:
      assert r["vs_f32"] <= BF16_BOUND, r
  # the kernels run interpreted here: never faster than XLA, no row proposed
  assert saved["auto_table"] == []


def test_auto_rows_are_where_the_kernels_won_every_batch():
  """``auto_rows`` proposes a shape, dtype and path only where the kernels'
  time beat XLA's by FASTER in every batch size, with the smallest speed-up;
  either orientation is one row."""
  bench = _load("device")
  def row(method, shape, batch, t, dtype="bfloat16"):
    return dict(part=1, method=method, shape=shape, batch=batch,
                dtype=dtype, time_s=t)
  rows = [row("orthax xla plain", [64, 32], 1, 2.0),
          row("orthax pallas plain", [64, 32], 1, 1.0),
          row("orthax xla plain", [64, 32], 4, 3.0),
          row("orthax pallas plain", [64, 32], 4, 2.0),   # 1.5x: kept
          row("orthax xla gram", [64, 32], 1, 1.0),
          row("orthax pallas gram", [64, 32], 1, 0.99),   # < FASTER
          row("orthax xla plain", [32, 32], 1, 1.0, "float32"),
          row("orthax pallas plain", [32, 32], 1, 0.5, "float32"),
          row("orthax xla plain", [32, 32], 4, 1.0, "float32"),
          row("orthax pallas plain", [32, 32], 4, 1.2, "float32"),  # lost
          row("optax muon", [16, 16], 1, 9.0),
          row("orthax pallas plain", [16, 16], 1, 1.0),    # no XLA row
          dict(part=1, method="orthax xla plain", shape=[8, 8], batch=1,
               dtype="float32", error="boom")]
  table = bench.auto_rows(rows, "2026-11-27")
  kind = jax.devices()[0].device_kind
  assert table == [auto_backend.Measured(
      kind, "bfloat16", False, (32, 64), 1.5, "2026-11-27")]


def test_optimizer_step_part(tmp_path):
  _, steps, _ = _quick(tmp_path, 2)
  expected = {f"orthax.{name}" for name in READY} | {
      "optax.contrib.muon (same routing)", "optax.adamw"}
  assert expected <= {r["optimizer"] for r in steps}
  for r in steps:
    assert r["time_s"] > 0 and r["state_mb"] > 0 and r["temp_mb"] >= 0
    # parameters and gradients in, parameters out, at least
    assert r["peak_mb"] >= r["state_mb"], r


def test_training_part(tmp_path):
  _, train, _ = _quick(tmp_path, 3)
  assert {r["optimizer"] for r in train} == {"optax.adamw", "orthax.muon",
                                             "orthax.normuon"}
  for r in train:
    assert r["tokens_per_s"] > 0 and 0 < r["grads_s"]
    # random tokens over 256 ids: the loss starts near log(256) = 5.5
    assert abs(r["loss"] - 5.55) < 0.5, r


def test_tiles_part(tmp_path):
  bench, rows, _ = _quick(tmp_path, 4)
  want = {"xla", "default"} | {f"{t.block}/{t.block_k}"
                               for t in bench.TILE_CANDIDATES["quick"] if t}
  assert {r["tiles"] for r in rows} == want
  assert len(rows) == len(want) * len(bench.TILE_CASES["quick"])
  for r in rows:
    assert r["time_s"] > 0 and r["vs_default"] > 0, r
  # each case against its own default tiles
  assert [r["vs_default"] for r in rows if r["tiles"] == "default"] == [
      1.0] * len(bench.TILE_CASES["quick"])


def test_ready_list_is_the_package_s():
  """device.py finds the ready optimizers by module: the same set as the
  option tests' list, so a new one is benchmarked without an edit."""
  bench = _load("device")
  assert set(bench.READY) | {"muon", "normuon"} == set(READY)
  assert all(callable(getattr(orthax, n)) for n in bench.READY)
