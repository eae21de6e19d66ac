"""The GPT-2 example: token shards, batches, model, optimizers, resume, devices.

Everything runs through ``examples/train_gpt2.py`` and
``examples/gpt2_data.py`` on ``configs/tiny.py`` shortened to a few steps
(the long comparison is ``test_training.py``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import nbclient
import nbformat
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

import gpt2_data  # examples/, put on sys.path by conftest.py
import orthax
import train_gpt2

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.py"


def tiny_config(workdir, **fields):
  """``configs/tiny.py`` with a work directory and top-level overrides."""
  config = train_gpt2.load_config(TINY)
  config.workdir = str(workdir)
  config.update(fields)
  return config


@pytest.fixture(scope="module")
def corpus():
  return gpt2_data.stdlib_corpus()


# ---------------------------------------------------------------------------
# Token shards
# ---------------------------------------------------------------------------


def test_shards_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  first = rng.integers(0, 1 << 16, 1000).astype(np.uint16)
  second = np.array([0, 1, 65535, 50256], np.uint16)
  gpt2_data.write_shard(tmp_path / "train_001.bin", second)
  gpt2_data.write_shard(tmp_path / "train_000.bin", first)
  header = np.fromfile(tmp_path / "train_000.bin", "<i4", count=3)
  assert list(header) == [20240520, 1, 1000]

  tokens = gpt2_data.open_shards(str(tmp_path / "train_*.bin"))
  assert [Path(n).name for n in tokens.names] == ["train_000.bin",
                                                   "train_001.bin"]
  assert isinstance(tokens.arrays[0], np.memmap)
  np.testing.assert_array_equal(tokens.arrays[0], first)
  np.testing.assert_array_equal(tokens.arrays[1], second)
  assert tokens.num_tokens == 1004


def _corrupt(path: Path, kind: str) -> None:
  gpt2_data.write_shard(path, np.arange(100, dtype=np.uint16))
  raw = bytearray(path.read_bytes())
  if kind == "magic":
    raw[:4] = np.int32(20240521).tobytes()
  elif kind == "version":
    raw[4:8] = np.int32(2).tobytes()
  elif kind == "truncated":
    raw = raw[:-10]
  elif kind == "no header":
    raw = raw[:100]
  path.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind, message", [
    ("magic", "magic number 20240521, expected 20240520"),
    ("version", "version 2, expected 1"),
    ("truncated", "header says 100 tokens"),
    ("no header", "shorter than the 1024-byte header"),
])
def test_bad_shard_names_the_file(tmp_path, kind, message):
  good, bad = tmp_path / "shard_0.bin", tmp_path / "shard_1.bin"
  gpt2_data.write_shard(good, np.arange(10, dtype=np.uint16))
  _corrupt(bad, kind)
  with pytest.raises(gpt2_data.ShardError, match=message) as e:
    gpt2_data.open_shards(str(tmp_path / "shard_*.bin"))
  assert str(bad) in str(e.value)


def test_empty_glob_is_an_error(tmp_path):
  with pytest.raises(gpt2_data.ShardError, match="no token shards match"):
    gpt2_data.open_shards(str(tmp_path / "missing_*.bin"))


def test_shard_shorter_than_a_window_is_an_error(tmp_path):
  gpt2_data.write_shard(tmp_path / "tiny.bin", np.arange(5, dtype=np.uint16))
  tokens = gpt2_data.open_shards(str(tmp_path / "*.bin"))
  with pytest.raises(gpt2_data.ShardError, match="tiny.bin holds 5 tokens"):
    gpt2_data.train_batch(tokens, seed=0, step=1, batch_size=2, length=9)


def test_data_config_needs_both_globs():
  with pytest.raises(ValueError, match="val_files is empty"):
    gpt2_data.load_splits("data/*.bin", "", 10)


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


def _counting_pool() -> gpt2_data.Tokens:
  """Two runs of consecutive ints: consecutive windows stay within one."""
  return gpt2_data.Tokens((np.arange(0, 300), np.arange(10_000, 10_050)),
                          ("a", "b"))


def test_train_batch_is_a_function_of_seed_and_step():
  pool = _counting_pool()
  batch = gpt2_data.train_batch(pool, seed=3, step=7, batch_size=64, length=9)
  assert batch.shape == (64, 9) and batch.dtype == np.int32
  np.testing.assert_array_equal(
      batch, gpt2_data.train_batch(pool, seed=3, step=7, batch_size=64,
                                   length=9))
  assert np.all(np.diff(batch, axis=1) == 1)  # no window crosses arrays
  assert np.any(batch[:, 0] >= 10_000)  # both arrays are sampled
  for other in (dict(seed=3, step=8), dict(seed=4, step=7)):
    assert not np.array_equal(batch, gpt2_data.train_batch(
        pool, batch_size=64, length=9, **other))


def test_each_process_reads_its_rows():
  pool = _counting_pool()
  full = gpt2_data.train_batch(pool, 0, 5, 8, 4)
  parts = [gpt2_data.train_batch(pool, 0, 5, 8, 4, process_index=i,
                                 process_count=4) for i in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), full)
  evals = gpt2_data.eval_batches(pool, 3, 8, 4)
  halves = [gpt2_data.eval_batches(pool, 3, 8, 4, process_index=i,
                                   process_count=2) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves, axis=1), evals)


def test_eval_batches_span_the_held_out_tokens():
  pool = _counting_pool()
  batches = gpt2_data.eval_batches(pool, num_batches=2, batch_size=5,
                                   length=4)
  assert batches.shape == (2, 5, 4)
  starts = batches[:, :, 0].reshape(-1)
  assert starts[0] == 0 and starts[-1] == 10_046  # the first and last window
  assert np.all(np.diff(batches, axis=-1) == 1)


def test_stdlib_corpus_holds_out_every_tenth_file(corpus):
  train, val = corpus
  files = sorted(Path(os.path.dirname(os.__file__)).glob("*.py"))
  held_out = sum(f.stat().st_size for f in files[::10])
  assert val.num_tokens == held_out
  assert train.num_tokens + val.num_tokens == sum(f.stat().st_size
                                                  for f in files)


# ---------------------------------------------------------------------------
# Model, configs, optimizers, sharding
# ---------------------------------------------------------------------------


def _abstract_model(model_config):
  return nnx.eval_shape(lambda: train_gpt2.GPT(model_config, rngs=nnx.Rngs(0)))


def _abstract_params(model_config):
  return nnx.state(_abstract_model(model_config), nnx.Param)


@pytest.mark.parametrize("config_file, tie", [
    ("tiny.py", False), ("tiny.py", True), ("gpt2_small.py", True)])
def test_only_hidden_matrices_are_routed_as_matrices(config_file, tie):
  """The example keeps its routing: every attention and MLP kernel a
  (fan_in, fan_out) matrix, the rest AdamW; the same from the model's NNX
  modules (as the example passes it) and from the state alone."""
  config = train_gpt2.load_config(ROOT / "configs" / config_file)
  config.model.tie_embeddings = tie
  model = _abstract_model(config.model)
  params = nnx.state(model, nnx.Param)
  with_model = orthax.routing.by_path(orthax.route(params, model=model))
  alone = orthax.routing.by_path(orthax.route(params))
  hidden = {f"h/{i}/{module}/{name}/kernel"
            for i in range(config.model.num_layers)
            for module, names in (("attn", ("query", "key", "value", "proj")),
                                  ("mlp", ("fc", "proj")))
            for name in names}
  for got in (with_model, alone):
    assert {k for k, r in got.items() if r.kind == "matrix"} == hidden
    assert all((r.batch_axes, r.reduction_axes, r.output_axes)
               == ((), (0,), (1,)) for k, r in got.items() if k in hidden)
    assert ("lm_head/kernel" in got) == (not tie)
    assert got["wte/embedding"].kind == "adamw"


@pytest.mark.parametrize("config_file, parameters", [
    # GPT-2's 124M and 355M, plus the padding rows of the token embedding
    # (llm.c reports 124,475,904 for the padded 124M model).
    ("gpt2_small.py", 124_439_808 + 47 * 768),
    ("gpt2_medium.py", 354_823_168 + 47 * 1024),
])
def test_gpt2_configs_build_gpt2(config_file, parameters):
  config = train_gpt2.load_config(ROOT / "configs" / config_file)
  params = _abstract_params(config.model)
  assert sum(x.size for x in jax.tree.leaves(params)) == parameters
  assert config.batch_size * config.model.context == 524_288
  for name in train_gpt2.OPTIMIZERS:  # every method's settings are complete
    train_gpt2.make_optimizer(name, config, mesh=None)


def test_tiny_schedule_is_warmup_then_cosine():
  config = train_gpt2.load_config(TINY)
  ours = train_gpt2.make_schedule(0.02, config.optimizer.muon, 300)
  reference = optax.warmup_cosine_decay_schedule(
      0.0, 0.02, warmup_steps=15, decay_steps=300, end_value=0.002)
  np.testing.assert_allclose([ours(i) for i in range(301)],
                             [reference(i) for i in range(301)], rtol=1e-6)


def test_gpt2_small_muon_schedule_is_constant_then_linear():
  config = train_gpt2.load_config(ROOT / "configs" / "gpt2_small.py")
  schedule = train_gpt2.make_schedule(0.025, config.optimizer.muon, 1000)
  values = np.array([schedule(i) for i in range(1001)])
  np.testing.assert_allclose(values[:301], 0.025)
  np.testing.assert_allclose(values[300:], np.linspace(0.025, 0.0, 701),
                             atol=1e-8)


def test_unknown_optimizer_is_an_error():
  with pytest.raises(ValueError, match="unknown or no optimizers"):
    train_gpt2.parse_optimizers("adamw,lion")
  assert train_gpt2.parse_optimizers(" adamw, pion ") == ("adamw", "pion")


def test_fsdp_sharding_takes_the_largest_divisible_axis():
  mesh = AbstractMesh((2, 4), train_gpt2.MESH_AXES)
  spec = lambda shape: train_gpt2.fsdp_sharding(shape, mesh).spec
  assert spec((768, 2304)) == P(None, "fsdp")
  assert spec((50304, 768)) == P("fsdp", None)
  assert spec((6, 8)) == P(None, "fsdp")  # 6 is not divisible by 4
  assert spec((3, 5)) == P(None, None)  # replicated
  assert spec(()) == P()


# ---------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------


def test_every_optimizer_trains_and_reports(tmp_path, capsys):
  # The report of a comparison; every method trains in
  # tests/test_training.py.
  config = tiny_config(tmp_path, steps=4, eval_every=2)
  results = train_gpt2.run(config, ("adamw", "muon"))

  out = capsys.readouterr().out
  for r in results:
    name = r["optimizer"]
    assert r["eval_steps"] == [0, 2, 4] and r["steps"] == [1, 2, 3, 4]
    # The zero head predicts uniform bytes at step 0; training lowers it.
    assert r["val_loss"][0] == pytest.approx(math.log(256), abs=1e-4)
    assert r["val_loss"][-1] < r["val_loss"][0] - 0.5, name
    assert np.all(np.isfinite(r["train_loss"]))
    lines = [json.loads(l) for l in
             (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [0, 1, 2, 3, 4]
    assert [l["train_loss"] for l in lines[1:]] == r["train_loss"]
    assert all(l["tokens_per_s"] > 0 for l in lines[2:])
    row = next(l for l in out.splitlines() if l.startswith(name))
    assert f"{r['final_val_loss']:.4f}" in row
  assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_continues_exactly(tmp_path):
  """Checkpoint at step 3, stop after 5 (as if killed), resume from 3 to 6."""
  kwargs = dict(steps=6, eval_every=2, checkpoint_every=3)
  data = train_gpt2.load_data(tiny_config(tmp_path))
  whole = train_gpt2.train(tiny_config(tmp_path / "whole", **kwargs),
                           "normuon", data)

  config = tiny_config(tmp_path / "split", **kwargs)
  train_gpt2.train(config, "normuon", data, stop_at=5)
  checkpoints = tmp_path / "split" / "normuon" / "checkpoints"
  assert sorted(p.name for p in checkpoints.iterdir()) == ["3", "5"]
  shutil.rmtree(checkpoints / "5")  # killed before it was written
  with pytest.raises(FileExistsError, match="pass --resume"):
    train_gpt2.train(config, "normuon", data)
  other_seed = tiny_config(tmp_path / "split", seed=1, **kwargs)
  with pytest.raises(ValueError, match="is of another run"):
    train_gpt2.train(other_seed, "normuon", data, resume=True)
  resumed = train_gpt2.train(config, "normuon", data, resume=True)

  assert resumed["steps"] == whole["steps"] == [1, 2, 3, 4, 5, 6]
  assert resumed["train_loss"] == whole["train_loss"]  # bit for bit
  assert resumed["val_loss"] == whole["val_loss"]
  lines = (tmp_path / "split" / "normuon" / "metrics.jsonl").read_text()
  assert [json.loads(l)["step"] for l in lines.splitlines()] == list(range(7))


def test_eight_devices_match_one(tmp_path, corpus):
  """The CLI on 8 CPU devices (mesh 2 x 4, 2 microbatches) against 1 device.

  Both read token shards written from the corpus. The 8 devices need a
  fresh process: this one's JAX already has its single device.
  """
  train_bytes, val_bytes = (t.arrays[0] for t in corpus)
  for i in range(2):
    gpt2_data.write_shard(tmp_path / f"train_{i}.bin",
                          train_bytes[i * 100_000:(i + 1) * 100_000])
  gpt2_data.write_shard(tmp_path / "val_0.bin", val_bytes[:50_000])
  fields = {"steps": 3, "eval_every": 2,
            "data.train_files": str(tmp_path / "train_*.bin"),
            "data.val_files": str(tmp_path / "val_*.bin")}
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  command = [sys.executable, str(ROOT / "examples" / "train_gpt2.py"),
             f"--config={TINY}", "--optimizers=muon",
             f"--config.workdir={tmp_path / 'eight'}",
             "--config.mesh.data=2", "--config.microbatches=2"]
  command += [f"--config.{k}={v}" for k, v in fields.items()]
  out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert ("data: 200,000 training and 50,000 validation tokens; mesh "
          "{'data': 2, 'fsdp': 4} of 8 cpu device(s)") in out.stdout
  lines = [json.loads(l) for l in
           (tmp_path / "eight" / "muon" / "metrics.jsonl").read_text()
           .splitlines()]
  eight = {"train_loss": [l["train_loss"] for l in lines if "train_loss" in l],
           "val_loss": [l["val_loss"] for l in lines if "val_loss" in l]}

  config = tiny_config(tmp_path / "one", steps=3, eval_every=2)
  config.data.train_files = fields["data.train_files"]
  config.data.val_files = fields["data.val_files"]
  one = train_gpt2.train(config, "muon", train_gpt2.load_data(config))
  rtol = _float32_loss_rtol(config)
  for key in ("train_loss", "val_loss"):  # steps 1-3; steps 0, 2, 3
    assert len(eight[key]) == len(one[key]) == 3
    np.testing.assert_allclose(eight[key], one[key], rtol=rtol)


def _float32_loss_rtol(config) -> float:
  """How far two float32 evaluations of the loss may differ by reduction order.

  8 devices and 2 microbatches sum the same terms as 1 device in another
  order (partial sums per device and microbatch, then an all-reduce; sharded
  contractions under FSDP). A float32 sum of ``n`` terms computed in any
  order is within ``(n - 1) u`` (``u = 2**-24``) of the exact sum, relative to
  the sum of magnitudes (Higham, Accuracy and Stability of Numerical
  Algorithms, 2nd ed., section 4.2); errors of successive reductions add to
  first order. The loss is a mean of ``batch_size * context`` per-token
  cross-entropies of equal sign (about ln 256 each at the start), each made
  of the reductions of the forward pass: per layer, two layer norms (mean
  and variance over ``width``), the qkv, attention-output, MLP-in and MLP-out
  contractions (``width``, ``width``, ``width``, ``mlp_ratio * width``), the
  attention scores (head size) and the softmax sum and weighted sum over
  ``context``; then the final layer norm, the head (``width``) and the
  log-sum-exp over the vocabulary. Both runs carry such an error, hence the
  factor 2. This is a worst-case bound: 6.9e-4 for configs/tiny.py,
  where the measured difference of the first loss is 1.6e-6 on one x86-64
  CPU and 1.04e-5 on an AVX-512 one (the earlier 1e-5 bound failed there).
  The later losses follow parameters that differ by the update's rounding;
  Muon's update is a polar factor, insensitive to the gradient's scale and
  to relative perturbations of this size (measured: below 3e-7 at steps
  1-5), so the same bound holds for them.
  """
  m = config.model
  per_layer = (2 * 2 * m.width  # two layer norms: mean and variance
               + 3 * m.width + m.mlp_ratio * m.width  # contractions
               + m.width // m.num_heads  # attention scores
               + 2 * m.context)  # softmax sum and weighted sum
  per_token = (m.num_layers * per_layer + 2 * m.width  # final layer norm
               + m.width + m.padded_vocab_size)  # head and log-sum-exp
  tokens = config.batch_size * m.context
  return 2 * (tokens + per_token) * 2.0**-24


def test_notebook_runs(tmp_path):
  notebook = nbformat.read(ROOT / "examples" / "gpt2_orthax.ipynb",
                           as_version=4)
  (parameters,) = [c for c in notebook.cells
                   if "parameters" in c.metadata.get("tags", [])]
  parameters.source = (f'CONFIG = "{TINY}"\nSTEPS = 3\n'
                       'OPTIMIZERS = ("adamw", "muon", "root")\n'
                       f'WORKDIR = "{tmp_path}"')
  nbclient.NotebookClient(
      notebook, timeout=600, kernel_name="python3",
      resources={"metadata": {"path": str(ROOT / "examples")}}).execute()

  outputs = [o for c in notebook.cells if c.cell_type == "code"
             for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs)
  text = "".join(o.get("text", "") for o in outputs)
  for name in ("adamw", "muon", "root"):  # root: any method by name
    assert (tmp_path / name / "metrics.jsonl").exists()
    assert f"\n{name} " in text
