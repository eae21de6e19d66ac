"""The GPT-2 example's training: devices, the step and the loop.

The device mesh and the FSDP shardings (:func:`make_mesh`,
:func:`fsdp_sharding`), the jitted training step and validation loss with
gradient accumulation over microbatches (:func:`_step_functions`), and
:func:`train`, which trains one optimizer's run: checked, resumed,
evaluated, logged and checkpointed. Importing this module defines no
command-line flag (``train_gpt2.py`` does).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

import gpt2_data
import orthax
from gpt2_config import check_config
from gpt2_errors import DivergenceError, _check
from gpt2_model import GPT, _loss
from gpt2_optim import _RECORDS_MAX_LOGITS, make_optimizer
from gpt2_workdir import _Checkpoints, _Metrics, _run_record, _start_step

# Mesh axes: the batch is split over both, parameters over "fsdp".
MESH_AXES = ("data", "fsdp")


def make_mesh(data: int = 1, devices: list[jax.Device] | None = None) -> Mesh:
  """A ``("data", "fsdp")`` mesh of shape ``(data, len(devices) // data)``.

  Args:
    data: size of the ``data`` axis (pure data parallelism: parameters are
      replicated across it); the rest of the devices form ``fsdp``.
    devices: defaults to ``jax.devices()`` (every process's devices).
  """
  devices = jax.devices() if devices is None else devices
  if data < 1 or len(devices) % data:
    raise ValueError(f"mesh data axis {data} does not divide the "
                     f"{len(devices)} devices")
  return Mesh(np.asarray(devices).reshape(data, -1), MESH_AXES)


def fsdp_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
  """Shards the largest axis of ``shape`` divisible by the ``fsdp`` size.

  Ties go to the first such axis; with no divisible axis (scalars included)
  the leaf is replicated.
  """
  size = mesh.shape["fsdp"]
  spec = [None] * len(shape)
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % size == 0:
      spec[axis] = "fsdp"
      break
  return NamedSharding(mesh, P(*spec))


def _batch_shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
  """Of a training batch ``(B, L)`` and of the validation set ``(E, B, L)``."""
  return (NamedSharding(mesh, P(MESH_AXES, None)),
          NamedSharding(mesh, P(None, MESH_AXES, None)))


def _split_microbatches(batch: jax.Array, count: int) -> jax.Array:
  """``(B, L) -> (count, B / count, L)``: microbatch ``i`` is rows i, i+count...

  Taking every ``count``-th row keeps each device's rows on that device when
  its share of the batch is a multiple of ``count``.
  """
  b, length = batch.shape
  return batch.reshape(b // count, count, length).swapaxes(0, 1)


def load_data(config: ml_collections.ConfigDict,
              ) -> tuple[gpt2_data.Tokens, gpt2_data.Tokens]:
  """``(train, val)`` tokens of ``config.data`` (``gpt2_data.load_splits``)."""
  return gpt2_data.load_splits(config.data.train_files, config.data.val_files,
                               config.data.val_every_nth_file)


def _step_functions(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    shardings: Any, mesh: Mesh, microbatches: int, *,
                    max_logits: bool = False):
  """The jitted training step and validation loss, with their shardings.

  Args:
    graphdef: the model's structure (:func:`flax.nnx.split`).
    tx: the optimizer.
    shardings: of the train state ``{"params", "opt_state"}``.
    mesh: the device mesh.
    microbatches: gradient accumulation: each batch is split into this many
      parts whose gradients are averaged (one optimizer step).
    max_logits: record the attention's per-head max logits in the forward
      pass (the max over the microbatches) and give them to the optimizer,
      ``tx.update(..., max_logits=...)``, as :func:`orthax.qk_clip` needs.

  Returns:
    ``train_step(state, batch) -> (state, loss)`` (donating ``state``) and
    ``evaluate(params, batches) -> loss`` (the mean over ``batches``).
  """
  batch_sharding, eval_sharding = _batch_shardings(mesh)
  replicated = NamedSharding(mesh, P())

  def loss_fn(params, batch):
    return _loss(nnx.merge(graphdef, params), batch)

  def recorded_loss(params, batch):
    """``(loss, max logits)``; the max logits are ``{}`` unless recorded."""
    if max_logits:
      return _loss(nnx.merge(graphdef, params), batch, max_logits=True)
    return loss_fn(params, batch), {}

  grad_fn = jax.value_and_grad(recorded_loss, has_aux=True)

  def value_and_grad(params, batch):
    """``(loss, grads, max logits)``."""
    if microbatches == 1:
      (loss, logits), grads = grad_fn(params, batch)
      return loss, grads, logits

    def accumulate(total, microbatch):
      (loss, logits), grads = grad_fn(params, microbatch)
      return jax.tree.map(jnp.add, total, (loss, grads)), logits

    zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    total, logits = jax.lax.scan(accumulate, zero,
                                 _split_microbatches(batch, microbatches))
    loss, grads = jax.tree.map(lambda x: x / microbatches, total)
    return loss, grads, jax.tree.map(lambda s: s.max(axis=0), logits)

  @functools.partial(jax.jit, in_shardings=(shardings, batch_sharding),
                     out_shardings=(shardings, replicated), donate_argnums=0)
  def train_step(state, batch):
    loss, grads, logits = value_and_grad(state["params"], batch)
    extra = {"max_logits": logits} if max_logits else {}
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"],
                                   **extra)
    return {"params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state}, loss

  @functools.partial(jax.jit,
                     in_shardings=(shardings["params"], eval_sharding),
                     out_shardings=replicated)
  def evaluate(params, batches):
    per_batch = lambda b: jax.lax.map(
        lambda m: loss_fn(params, m),
        _split_microbatches(b, microbatches)).mean()
    return jax.lax.map(per_batch, batches).mean()

  return train_step, evaluate


def _summary(name: str, history: list[dict[str, Any]],
             config: ml_collections.ConfigDict,
             seconds_per_step: float | None) -> dict[str, Any]:
  """The curves of ``history`` and the final figures of a run.

  ``history`` holds step 0's validation loss and at least one training
  step: a fresh run trains one step or more, and a resumed one has the
  lines up to its checkpoint (:func:`gpt2_workdir._check_history`).
  """
  trained = [l for l in history if "train_loss" in l]
  evaluated = [l for l in history if "val_loss" in l]
  last = trained[-1]["step"]
  # Mean over the last evaluation interval: less noisy than the last batch.
  tail = [l["train_loss"] for l in trained
          if l["step"] > last - config.eval_every]
  return {
      "optimizer": name,
      "steps": [l["step"] for l in trained],
      "train_loss": [l["train_loss"] for l in trained],
      "eval_steps": [l["step"] for l in evaluated],
      "val_loss": [l["val_loss"] for l in evaluated],
      "final_train_loss": float(np.mean(tail)),
      "final_val_loss": evaluated[-1]["val_loss"],
      "final_val_step": evaluated[-1]["step"],
      "seconds_per_step": seconds_per_step,
      "tokens_per_second": (
          None if seconds_per_step is None else
          config.batch_size * config.model.context / seconds_per_step),
  }


def _check_finite(name: str, line: dict[str, Any],
                  train_losses: Sequence[float], path: Path) -> None:
  """Raises if a loss of the metrics ``line`` is NaN or infinite.

  Args:
    name: the optimizer.
    line: a metrics line, already written to ``path``.
    train_losses: the training loss of each step the line averages (its
      last at ``line["step"]``); empty for step 0.
    path: the run's ``metrics.jsonl``.

  Raises:
    DivergenceError: naming ``name``, the first step of ``train_losses``
      that is not finite (else the line's step, for its validation loss)
      and that loss.
  """
  bad = np.flatnonzero(~np.isfinite(train_losses))
  if bad.size:
    step = line["step"] - len(train_losses) + 1 + bad[0]
    what = f"training loss is {float(train_losses[bad[0]])} at step {step}"
  elif not math.isfinite(line.get("val_loss", 0.0)):
    what = f"validation loss is {line['val_loss']} at step {line['step']}"
  else:
    return
  raise DivergenceError(f"{name} diverged: the {what} (metrics up to step "
                        f"{line['step']} in {path})")


def train(config: ml_collections.ConfigDict, name: str,
          data: tuple[gpt2_data.Tokens, gpt2_data.Tokens], *,
          mesh: Mesh | None = None, resume: bool = False,
          overwrite: bool = False, stop_at: int | None = None,
          progress: bool = False) -> dict[str, Any]:
  """Trains a fresh (or resumed) :class:`GPT` with one optimizer.

  Step ``s`` (from 1) trains on :func:`gpt2_data.train_batch` ``(seed, s)``;
  the model is initialized from ``config.seed``; validation runs at step 0,
  every ``config.eval_every`` steps and at ``config.steps`` on fixed
  held-out windows. First the config (:func:`check_config`), the token ids
  (``Tokens.check_vocabulary``) and the run's directory (as
  :func:`gpt2_workdir.check_workdir` does, for this optimizer) are checked.

  Args:
    config: the run's config (see ``configs/``).
    name: one of :data:`gpt2_optim.OPTIMIZERS`.
    data: ``(train, val)`` tokens (:func:`load_data`).
    mesh: the device mesh; ``make_mesh(config.mesh.data)`` by default.
    resume: continue from the latest checkpoint in
      ``<workdir>/<name>/checkpoints``, which must have been saved with the
      same config; with none, start from step 0 (saying so) unless an
      earlier run left its metrics there. Without it, finding a checkpoint
      there is an error.
    overwrite: start from step 0 even where an earlier run left a
      ``metrics.jsonl`` (but no checkpoint), replacing it (saying so).
    stop_at: stop after this step (saving a checkpoint if checkpointing is
      on), as a job with a time limit would; ``resume`` continues the run.
    progress: show a tqdm bar with the loss and tokens/s.

  Returns:
    A dict: ``optimizer``; ``steps`` and ``train_loss`` (per logged step, the
    mean since the previous one); ``eval_steps`` and ``val_loss``;
    ``final_train_loss`` (mean over the last ``eval_every`` steps),
    ``final_val_loss`` and ``final_val_step`` (the last evaluation: step 0's
    when stopped before the first), ``seconds_per_step`` (training steps of
    this session after its first, which compiles; evaluation excluded) and
    ``tokens_per_second``, both ``None`` when this session trained one step
    or none.

  Raises:
    ConfigError, WorkdirError, RunError: see :func:`check_config` and
      :func:`gpt2_workdir.check_workdir`; also ``stop_at`` below 1.
    gpt2_data.ShardError: a token id of ``data`` outside the vocabulary.
    DivergenceError: a training or validation loss that is NaN or infinite,
      at the first logged or evaluated step that holds it; the metrics up
      to that step are written, the diverged state is not checkpointed.
  """
  check_config(config, None if mesh is None else mesh.size)
  if stop_at is not None:
    _check("stop_at", stop_at, low=1, integer=True)
  for tokens in data:
    tokens.check_vocabulary(config.model.vocab_size)
  start = _start_step(config, name, resume=resume, overwrite=overwrite)
  run_dir = Path(config.workdir) / name
  metrics_path = run_dir / "metrics.jsonl"
  if jax.process_index() == 0 and not start:
    if resume:
      print(f"{name}: no checkpoint in {run_dir / 'checkpoints'}; starting "
            "from step 0")
    if metrics_path.exists():  # only with overwrite (_start_step)
      print(f"{name}: replacing the earlier run's {metrics_path} "
            "(--overwrite)")
  history = _Metrics.read(metrics_path, start) if start else []
  if jax.process_count() > 1:  # all have read before process 0 writes
    multihost_utils.sync_global_devices(f"train_gpt2: {name} starts")

  mesh = make_mesh(config.mesh.data) if mesh is None else mesh
  abstract = nnx.eval_shape(lambda: GPT(config.model, rngs=nnx.Rngs(0)))
  tx = make_optimizer(name, config, mesh, model=abstract)
  graphdef, _ = nnx.split(abstract)
  if name != "adamw":
    logging.info("%s routes the GPT's leaves so:\n%s", name, orthax.describe(
        abstract, print_fn=None))

  def init():
    params = nnx.state(GPT(config.model, rngs=nnx.Rngs(config.seed)),
                       nnx.Param)
    return {"params": params, "opt_state": tx.init(params)}

  abstract = jax.eval_shape(init)
  shardings = jax.tree.map(lambda x: fsdp_sharding(x.shape, mesh), abstract)
  batch_sharding, eval_sharding = _batch_shardings(mesh)
  train_step, evaluate = _step_functions(
      graphdef, tx, shardings, mesh, config.microbatches,
      max_logits=name in _RECORDS_MAX_LOGITS)
  checkpoints = (_Checkpoints(run_dir / "checkpoints",
                              _run_record(config, name),
                              config.keep_checkpoints)
                 if config.checkpoint_every or start else None)
  if not start:
    state = jax.jit(init, out_shardings=shardings)()
  else:
    state = checkpoints.restore(start, jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract, shardings))

  metrics = _Metrics(metrics_path, history)
  train_tokens, val_tokens = data
  length = config.model.context + 1
  rows = dict(process_index=jax.process_index(),
              process_count=jax.process_count())
  val_batches = jax.make_array_from_process_local_data(
      eval_sharding,
      gpt2_data.eval_batches(val_tokens, config.eval_batches,
                             config.batch_size, length, **rows),
      (config.eval_batches, config.batch_size, length))
  end = config.steps if stop_at is None else min(stop_at, config.steps)
  tokens_per_step = config.batch_size * config.model.context
  bar = tqdm(total=config.steps, initial=start, desc=name,
             disable=not progress)
  pending, clock, interval, train_time, timed = [], None, 0, 0.0, 0
  try:
    if start == 0:
      line = {"step": 0, "val_loss": float(evaluate(state["params"],
                                                    val_batches))}
      metrics.log(line)
      _check_finite(name, line, (), metrics_path)
    for step in range(start + 1, end + 1):
      batch = jax.make_array_from_process_local_data(
          batch_sharding,
          gpt2_data.train_batch(train_tokens, config.seed, step,
                                config.batch_size, length, **rows),
          (config.batch_size, length))
      state, loss = train_step(state, batch)
      pending.append(loss)
      bar.update(1)
      if clock is None:  # The first step compiles: keep it out of the timing.
        jax.block_until_ready(loss)
        clock = time.perf_counter()
      else:
        interval += 1
      evaluate_now = step % config.eval_every == 0 or step == config.steps
      save_now = bool(config.checkpoint_every) and (
          step % config.checkpoint_every == 0 or step == end)
      if (step % config.log_every and not (evaluate_now or save_now)
          and step != end):
        continue
      # The losses come to the host here only, so a divergence is seen at
      # the next logged step.
      losses = np.asarray(jax.device_get(pending))
      line = {"step": step,
              "train_loss": float(np.mean(losses, dtype=np.float64))}
      if interval:
        seconds = time.perf_counter() - clock
        train_time, timed = train_time + seconds, timed + interval
        line["tokens_per_s"] = interval * tokens_per_step / seconds
      if evaluate_now:
        line["val_loss"] = float(evaluate(state["params"], val_batches))
      # Logged before the checkpoint, so a resume from it finds its line.
      metrics.log(line)
      _check_finite(name, line, losses, metrics_path)
      if save_now:
        checkpoints.save(step, state)
      bar.set_postfix(loss=f"{line['train_loss']:.3f}",
                      tokens_per_s=f"{line.get('tokens_per_s', 0):.0f}")
      pending, interval, clock = [], 0, time.perf_counter()
  finally:
    bar.close()
    if checkpoints:
      checkpoints.close()
    metrics.close()
  return _summary(name, metrics.history, config,
                  train_time / timed if timed else None)
