"""The GPT-2 example's checks (issue 11, items 18-21) and what it reports.

Config fields out of range, token ids outside the vocabulary, a work
directory holding an earlier run (or a checkpoint without its metrics), and a
resume into another config are each an error naming what is wrong, raised
before any step trains. A loss that turns NaN or infinite during training
stops the run with an error naming the optimizer, the step and the loss; a
session that timed no step reports no speed rather than NaN. The checks are
called directly on ``configs/tiny.py``; two subprocesses run the command line
for its exit status and message (a bad config, a diverging run).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import gpt2_data  # examples/, put on sys.path by conftest.py
import train_gpt2
from test_train_gpt2 import ROOT, TINY, tiny_config


def _set(config, field, value):
  """``config.<field> = value`` for a dotted ``field``."""
  *parents, key = field.split(".")
  setattr(functools.reduce(getattr, parents, config), key, value)


@pytest.fixture(scope="module")
def stdlib_data():
  return train_gpt2.load_data(train_gpt2.load_config(TINY))


# ---------------------------------------------------------------------------
# Item 19: the config's fields
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "config.steps must be in [1, inf), got 0"),
    ("steps", -3, "config.steps must be in [1, inf), got -3"),
    ("batch_size", 0, "config.batch_size must be in [1, inf)"),
    ("microbatches", 0, "config.microbatches must be in [1, inf)"),
    ("eval_every", 0, "config.eval_every must be in [1, inf), got 0"),
    ("eval_batches", 0, "config.eval_batches must be in [1, inf)"),
    ("log_every", 0, "config.log_every must be in [1, inf)"),
    ("checkpoint_every", -1, "config.checkpoint_every must be in [0, inf)"),
    ("keep_checkpoints", 0, "config.keep_checkpoints must be in [1, inf)"),
    ("seed", -1, "config.seed must be in [0, inf)"),
    ("mesh.data", 0, "config.mesh.data must be in [1, inf)"),
    ("data.val_every_nth_file", 0, "config.data.val_every_nth_file must be"),
    ("model.context", 0, "config.model.context must be in [1, inf)"),
    ("model.width", 0, "config.model.width must be in [1, inf)"),
    ("model.num_layers", 0, "config.model.num_layers must be in [1, inf)"),
    ("model.num_heads", 0, "config.model.num_heads must be in [1, inf)"),
    ("model.vocab_size", 0, "config.model.vocab_size must be in [1, inf)"),
    ("model.mlp_ratio", 0, "config.model.mlp_ratio must be in [1, inf)"),
    ("model.num_heads", 3,
     "config.model.num_heads=3 must divide config.model.width=128"),
    ("model.padded_vocab_size", 255, "config.model.padded_vocab_size=255 is "
     "smaller than config.model.vocab_size=256"),
    ("model.dtype", "int32", "config.model.dtype must name a floating-point "
     "dtype"),
    ("model.dtype", "float33", "config.model.dtype must name"),
    # tiny's batch of 32 over the 8 devices of these checks.
    ("microbatches", 3, "config.batch_size=32 must be a multiple of the 8 "
     "devices times config.microbatches=3"),
    ("batch_size", 12, "config.batch_size=12 must be a multiple of the 8 "
     "devices"),
    ("mesh.data", 3, "config.mesh.data=3 must divide the 8 devices"),
    ("optimizers", "adamw,lion",
     "unknown or no optimizers in config.optimizers='adamw,lion'"),
    ("optimizers", "", "unknown or no optimizers in config.optimizers=''"),
    ("optimizer.learning_rate", -1.0,
     "config.optimizer.learning_rate must be in (0, inf), got -1.0"),
    ("optimizer.muon.learning_rate", 0.0,
     "config.optimizer.muon.learning_rate must be in (0, inf)"),
    ("optimizer.adamw.learning_rate", float("nan"),
     "config.optimizer.adamw.learning_rate must be finite"),
    ("optimizer.pion.adam_learning_rate", float("inf"),
     "config.optimizer.pion.adam_learning_rate must be finite"),
    ("optimizer.adamw.b2", 1.0, "config.optimizer.adamw.b2 must be in [0, 1)"),
    ("optimizer.normuon.beta2", -0.1, "config.optimizer.normuon.beta2 must"),
    ("optimizer.muon.momentum", 1.0, "config.optimizer.muon.momentum must"),
    ("optimizer.adamw.eps", 0.0, "config.optimizer.adamw.eps must be in (0"),
    ("optimizer.muon.weight_decay", -0.1,
     "config.optimizer.muon.weight_decay must be in [0, inf)"),
    ("optimizer.normuon.grad_clip", -1.0,
     "config.optimizer.normuon.grad_clip must be in [0, inf)"),
    ("optimizer.adamw.warmup_frac", 1.5,
     "config.optimizer.adamw.warmup_frac must be in [0, 1]"),
    ("optimizer.pion.end_lr_frac", -0.1, "config.optimizer.pion.end_lr_frac"),
    ("optimizer.muon.decay", "step",
     "config.optimizer.muon.decay must be one of ('cosine', 'linear'), got "
     "'step'"),
])
def test_config_field_out_of_range_is_named(tmp_path, field, value, message):
  config = tiny_config(tmp_path)
  _set(config, field, value)
  with pytest.raises(train_gpt2.ConfigError) as e:
    train_gpt2.check_config(config, num_devices=8)
  assert message in str(e.value)


def test_unknown_optimizer_setting_is_named(tmp_path):
  config = tiny_config(tmp_path)
  config.optimizer.muon.lr = 0.1  # a config file's typo: never read
  with pytest.raises(train_gpt2.ConfigError,
                     match="config.optimizer.muon.lr: this script reads no "
                           "setting 'lr'"):
    train_gpt2.check_config(config, num_devices=1)


@pytest.mark.parametrize("period", [1, 10_000])
def test_stdlib_holdout_period_is_checked(period):
  """1 left no training text; 10,000 raised a RuntimeError listing files."""
  with pytest.raises(gpt2_data.ShardError,
                     match=f"val_every_nth_file={period} "
                           r"\(config.data.val_every_nth_file\) must be "
                           "from 2 to"):
    gpt2_data.stdlib_corpus(period)


@pytest.mark.parametrize("config_file, num_devices", [
    ("tiny.py", 1), ("tiny.py", 8), ("gpt2_small.py", 8),
    ("gpt2_medium.py", 8)])
def test_shipped_configs_pass_the_checks(config_file, num_devices):
  config = train_gpt2.load_config(ROOT / "configs" / config_file)
  train_gpt2.check_config(config, num_devices)


@pytest.mark.parametrize("fields, stop_at, message", [
    (dict(steps=0), None, "config.steps must be in [1, inf), got 0"),
    (dict(eval_every=0), None, "config.eval_every must be in [1, inf)"),
    (dict(), 0, "stop_at must be in [1, inf), got 0"),
])
def test_bad_config_stops_before_training(tmp_path, stdlib_data, fields,
                                          stop_at, message):
  """Before the checks, these ran to a NaN table or a ZeroDivisionError."""
  config = tiny_config(tmp_path / "run", **fields)
  with pytest.raises(train_gpt2.ConfigError, match=re.escape(message)):
    train_gpt2.train(config, "adamw", stdlib_data, stop_at=stop_at)
  assert not (tmp_path / "run").exists()  # nothing written


def test_cli_prints_the_error_and_exits_1(tmp_path):
  command = [sys.executable, str(ROOT / "examples" / "train_gpt2.py"),
             f"--config={TINY}", f"--config.workdir={tmp_path}",
             "--config.eval_every=0"]
  out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1] == (
      "error: train_gpt2: config.eval_every must be in [1, inf), got 0.")
  assert "Traceback" not in out.stderr
  assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------
# Item 18: token ids against the vocabulary
# ---------------------------------------------------------------------------


def test_largest_id_must_be_below_the_vocabulary():
  tokens = gpt2_data.Tokens((np.array([3, 255], np.uint16),
                             np.array([0, 256, 7], np.uint16)), ("a", "b"))
  tokens.check_vocabulary(257)
  with pytest.raises(gpt2_data.ShardError,
                     match="b: token id 256 is outside the model's "
                           "vocabulary of 256 ids"):
    tokens.check_vocabulary(256)


@pytest.mark.parametrize("bad_split", ["train", "val"])
def test_shard_beyond_the_vocabulary_stops_before_training(tmp_path,
                                                           bad_split):
  """Before the check, such a shard trained on NaN and failed in the plot."""
  rng = np.random.default_rng(0)
  for split in ("train", "val"):
    tokens = rng.integers(0, 256, 5000).astype(np.uint16)
    if split == bad_split:
      tokens[1234] = 300  # a GPT-2 id in a byte-level run
    gpt2_data.write_shard(tmp_path / f"{split}_0.bin", tokens)
  config = tiny_config(tmp_path / "run", steps=2)
  config.data.train_files = str(tmp_path / "train_*.bin")
  config.data.val_files = str(tmp_path / "val_*.bin")
  with pytest.raises(gpt2_data.ShardError) as e:
    train_gpt2.run(config, ("adamw",))
  assert str(e.value).startswith(f"{tmp_path / f'{bad_split}_0.bin'}: token "
                                 "id 300 is outside the model's vocabulary "
                                 "of 256 ids")
  assert not (tmp_path / "run" / "adamw").exists()


# ---------------------------------------------------------------------------
# Item 20: what a run finds in its work directory
# ---------------------------------------------------------------------------


def _earlier_metrics(workdir, name):
  """A metrics.jsonl as an earlier run leaves it; returns its text."""
  path = workdir / name / "metrics.jsonl"
  path.parent.mkdir(parents=True)
  text = json.dumps({"step": 0, "val_loss": 5.5}) + "\n"
  path.write_text(text)
  return text


def test_resume_with_no_checkpoint_is_an_error(tmp_path):
  """It restarted from step 0 silently before."""
  config = tiny_config(tmp_path)
  with pytest.raises(train_gpt2.RunError) as e:
    train_gpt2.run(config, ("adamw", "muon"), resume=True)
  assert str(e.value) == (
      f"--resume: nothing to resume, no checkpoint in "
      f"{tmp_path / 'adamw' / 'checkpoints'}, "
      f"{tmp_path / 'muon' / 'checkpoints'} (config.checkpoint_every is 0: "
      "checkpointing is off)")
  assert not list(tmp_path.iterdir())


def test_resume_never_replaces_earlier_metrics(tmp_path, stdlib_data):
  """It overwrote metrics.jsonl, when no checkpoint was found, before."""
  text = _earlier_metrics(tmp_path, "adamw")
  config = tiny_config(tmp_path, checkpoint_every=2)
  with pytest.raises(train_gpt2.WorkdirError) as e:
    train_gpt2.train(config, "adamw", stdlib_data, resume=True)
  assert str(e.value).startswith(
      f"{tmp_path / 'adamw' / 'metrics.jsonl'} holds the metrics of an "
      f"earlier run, but there is no checkpoint in "
      f"{tmp_path / 'adamw' / 'checkpoints'} to resume from: pass "
      "--overwrite")
  assert (tmp_path / "adamw" / "metrics.jsonl").read_text() == text


def test_fresh_run_replaces_earlier_metrics_only_with_overwrite(
    tmp_path, stdlib_data, capsys):
  """A fresh run truncated an earlier run's metrics.jsonl silently before."""
  text = _earlier_metrics(tmp_path, "adamw")
  config = tiny_config(tmp_path, steps=1)
  with pytest.raises(train_gpt2.WorkdirError,
                     match="a fresh run would replace them: pass "
                           "--overwrite"):
    train_gpt2.train(config, "adamw", stdlib_data)
  metrics = tmp_path / "adamw" / "metrics.jsonl"
  assert metrics.read_text() == text

  train_gpt2.train(config, "adamw", stdlib_data, overwrite=True)
  assert f"adamw: replacing the earlier run's {metrics} (--overwrite)" in (
      capsys.readouterr().out)
  assert [json.loads(l)["step"] for l in
          metrics.read_text().splitlines()] == [0, 1]


# ---------------------------------------------------------------------------
# Item 21: a resume into another config; resuming a comparison
# ---------------------------------------------------------------------------


CHECKPOINTED = dict(steps=2, checkpoint_every=2)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, stdlib_data):
  """The work directory of a 2-step AdamW run checkpointed at its end."""
  workdir = tmp_path_factory.mktemp("finished")
  train_gpt2.train(tiny_config(workdir, **CHECKPOINTED), "adamw", stdlib_data)
  return workdir


def test_resume_into_another_config_names_the_fields(tmp_path, finished_run,
                                                     stdlib_data):
  """orbax's shape error, buried in asyncio noise, came out before."""
  shutil.copytree(finished_run, tmp_path, dirs_exist_ok=True)
  config = tiny_config(tmp_path, seed=1, **CHECKPOINTED)
  config.model.width = 64
  config.optimizer.adamw.b1 = 0.8
  config.optimizer.muon.b1 = 0.5  # not adamw's: may change
  with pytest.raises(train_gpt2.ConfigError) as e:
    train_gpt2.train(config, "adamw", stdlib_data, resume=True)
  assert str(e.value) == (
      f"the checkpoint at step 2 in {tmp_path / 'adamw' / 'checkpoints'} is "
      "of another run; these fields differ (checkpoint -> this run):\n"
      "  model.width: 128 -> 64\n"
      "  optimizer.adamw.b1: 0.7 -> 0.8\n"
      "  seed: 0 -> 1\n"
      "resume with the checkpoint's values, or choose another config.workdir")


def test_resume_may_change_the_intervals(tmp_path, finished_run,
                                         stdlib_data):
  shutil.copytree(finished_run, tmp_path, dirs_exist_ok=True)
  config = tiny_config(tmp_path, eval_every=1, log_every=2, microbatches=2,
                       **CHECKPOINTED)
  resumed = train_gpt2.train(config, "adamw", stdlib_data, resume=True)
  assert resumed["steps"] == [1, 2]


def test_resume_starts_the_optimizers_that_never_ran(tmp_path, finished_run,
                                                     stdlib_data):
  """A comparison stopped during its first optimizer resumes as a whole."""
  shutil.copytree(finished_run, tmp_path, dirs_exist_ok=True)
  config = tiny_config(tmp_path, **CHECKPOINTED)
  assert train_gpt2.check_workdir(config, ("adamw", "muon"),
                                  resume=True) == {"adamw": 2, "muon": 0}


@pytest.mark.parametrize("keep, what", [(None, "is missing"),
                                        (1, "has steps 0 to 0")])
def test_resume_needs_the_metrics_up_to_the_checkpoint(
    tmp_path, finished_run, stdlib_data, keep, what):
  """Without its metrics.jsonl, resuming a finished run hit an IndexError.

  With only some of its lines, it reported a NaN training loss and step 0's
  validation loss as the final ones.
  """
  shutil.copytree(finished_run, tmp_path, dirs_exist_ok=True)
  metrics = tmp_path / "adamw" / "metrics.jsonl"
  if keep is None:
    metrics.unlink()
  else:
    metrics.write_text("".join(metrics.read_text().splitlines(True)[:keep]))
  config = tiny_config(tmp_path, **CHECKPOINTED)
  for check in (
      lambda: train_gpt2.check_workdir(config, ("adamw",), resume=True),
      lambda: train_gpt2.train(config, "adamw", stdlib_data, resume=True)):
    with pytest.raises(train_gpt2.RunError) as e:
      check()
    assert str(e.value) == (
        f"{metrics} {what}, but {tmp_path / 'adamw' / 'checkpoints'} holds "
        "a checkpoint at step 2: a resumed run would lose the losses of "
        "steps 0 to 2; put the run's metrics.jsonl back, or choose another "
        "config.workdir")


# ---------------------------------------------------------------------------
# What a run reports: speed, the final losses, divergence
# ---------------------------------------------------------------------------


def test_one_step_session_reports_no_speed_and_labels_the_val_loss(
    tmp_path, stdlib_data):
  """A session of one step printed nan for s/step and tokens/s.

  Its only step compiles, so none is timed. Stopped before the first
  evaluation, its "final" validation loss was step 0's, unlabelled. Resumed,
  the checkpoint at step 2 (not a logging step) was skipped.
  """
  config = tiny_config(tmp_path, steps=3, log_every=3, checkpoint_every=2)
  first = train_gpt2.train(config, "adamw", stdlib_data, stop_at=1)
  assert first["seconds_per_step"] is None
  assert first["tokens_per_second"] is None
  assert first["final_val_step"] == 0
  assert first["final_val_loss"] == first["val_loss"][0]
  header, row = train_gpt2.format_table([first]).splitlines()
  assert header.split() == ["optimizer", "train", "loss", "val", "loss",
                            "val", "step", "s/step", "tokens/s"]
  assert row.split() == ["adamw", f"{first['final_train_loss']:.4f}",
                         f"{first['final_val_loss']:.4f}", "0", "-", "-"]

  resumed = train_gpt2.train(config, "adamw", stdlib_data, resume=True)
  assert resumed["final_val_step"] == 3
  assert resumed["seconds_per_step"] > 0  # steps 2 and 3: one timed
  checkpoints = tmp_path / "adamw" / "checkpoints"
  assert sorted(int(p.name) for p in checkpoints.iterdir()) == [2, 3]
  lines = (tmp_path / "adamw" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [0, 1, 2, 3]


# Adam's first update moves every parameter whose gradient is well above its
# eps (1e-8) by the learning rate (m / (sqrt(v) + eps) = g / (|g| + eps) after
# bias correction); the tiny config's 5% warmup rounds to no step in runs of
# 1 to 3 steps. At 1e38 the next forward pass multiplies such entries
# together (a kernel's by a layer norm's bias or scale: 1e76 per term), far
# past float32's largest value 3.4e38, so every loss after the first update
# is inf or NaN, on any machine.
DIVERGING_LEARNING_RATE = 1e38


def test_validation_divergence_stops_the_run(tmp_path, stdlib_data):
  """A NaN validation loss ended in a crash of the plot after training.

  With one step, the training loss is of the initial parameters (finite);
  the validation loss at step 1 is the first of the updated ones.
  """
  config = tiny_config(tmp_path, steps=1, checkpoint_every=1)
  config.optimizer.learning_rate = DIVERGING_LEARNING_RATE
  metrics = tmp_path / "adamw" / "metrics.jsonl"
  with pytest.raises(train_gpt2.DivergenceError) as e:
    train_gpt2.train(config, "adamw", stdlib_data)
  assert re.fullmatch(
      r"adamw diverged: the validation loss is (nan|inf) at step 1 "
      rf"\(metrics up to step 1 in {re.escape(str(metrics))}\)",
      str(e.value)), str(e.value)
  lines = [json.loads(l) for l in metrics.read_text().splitlines()]
  assert [l["step"] for l in lines] == [0, 1]
  assert np.isfinite(lines[1]["train_loss"])
  assert lines[1]["val_loss"] is None  # JSON has no NaN
  assert not (tmp_path / "adamw" / "checkpoints" / "1").exists()


def test_cli_stops_a_diverging_run_with_an_error(tmp_path):
  """A NaN training loss went into the table, and the exit status was 0.

  Logged every 3 steps, the error names the first non-finite step of the
  three: step 2, the first after the update of step 1.
  """
  command = [sys.executable, str(ROOT / "examples" / "train_gpt2.py"),
             f"--config={TINY}", f"--config.workdir={tmp_path}",
             "--optimizers=adamw", "--config.steps=3",
             "--config.log_every=3",
             f"--config.optimizer.learning_rate={DIVERGING_LEARNING_RATE}"]
  out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  metrics = tmp_path / "adamw" / "metrics.jsonl"
  assert out.returncode == 1, out.stderr[-3000:]
  assert re.fullmatch(
      r"error: adamw diverged: the training loss is (nan|inf) at step 2 "
      rf"\(metrics up to step 3 in {re.escape(str(metrics))}\)",
      out.stderr.strip().splitlines()[-1]), out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  lines = [json.loads(l) for l in metrics.read_text().splitlines()]
  assert [l["step"] for l in lines] == [0, 3]
  assert lines[1]["train_loss"] is None
  assert not (tmp_path / "loss.png").exists()
