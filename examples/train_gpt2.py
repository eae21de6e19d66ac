r"""Train GPT-2 with AdamW, Muon, NorMuon or Pion, and compare them.

Run from the repository root::

  python examples/train_gpt2.py --config=configs/tiny.py
  python examples/train_gpt2.py --config=configs/tiny.py --optimizers=muon \
      --config.optimizer.muon.learning_rate=0.03 --config.steps=500
  python examples/train_gpt2.py --config=configs/gpt2_small.py --resume

Each optimizer named by ``--optimizers`` (default: the config's
``optimizers``) trains a fresh model from the same seed on the same batches.
Written under ``config.workdir``: ``<optimizer>/metrics.jsonl`` (one JSON
line per logged step, that is every ``log_every`` steps and each evaluation
and checkpoint step: mean training loss since the previous line, tokens/s,
and the validation loss at evaluation steps), ``<optimizer>/checkpoints/``
(orbax, every ``config.checkpoint_every`` steps) and ``loss.png`` (training
and validation loss, one line per optimizer). At the end a table goes to
stdout: per optimizer, the mean training loss over the last ``eval_every``
steps, the last validation loss and its step (step 0's for a run stopped
before its first evaluation), seconds per step and tokens/s ("-" when this
session timed no step: its first step compiles and is not timed, so a
session of one step has none).

A training or validation loss that is NaN or infinite stops that optimizer's
run where the loop first sees it (at the next logged or evaluated step): a
:class:`DivergenceError` naming the optimizer, the step and the loss, with
the metrics up to there in ``metrics.jsonl`` (the non-finite loss written as
``null``) and no checkpoint of the diverged state; the later optimizers do
not run. On the command line it is one line on stderr and exit status 1.

The model is GPT-2 in Flax NNX: learned token and position embeddings
(``wte``, ``wpe``), pre-LayerNorm blocks of causal self-attention and a GELU
MLP, a final LayerNorm, and a head tied to ``wte`` or a separate ``lm_head``.
``orthax.muon``, ``orthax.normuon`` and ``orthax.pion`` give the hidden
matrices (attention and MLP kernels) their orthogonalized or rotated updates
and route ``wte``, ``wpe``, ``lm_head``, the norms and the biases to AdamW:
:func:`orthax.route` decides from the model's own NNX modules (passed as
``model=``), and the run logs the table :func:`orthax.describe` prints
(absl INFO, shown with ``--verbosity=0``).

Data (``config.data``): ``train_files``/``val_files`` globs of llm.c /
modded-nanogpt ``.bin`` token shards, read through ``np.memmap``; with no
``train_files``, the bytes of the Python standard library's source
(:mod:`gpt2_data`). Batches are a pure function of ``(seed, step)``, so
``--resume`` continues from the latest checkpoint exactly as if the run had
never stopped (same parameters, optimizer state, step and batches).

Checks, all before anything trains (on the command line each is one line on
stderr and exit status 1):

* :func:`check_config`: every count, size, rate and choice of the config, a
  :class:`ConfigError` naming the field (``config.eval_every must be in [1,
  inf), got 0``).
* The token ids against ``config.model.vocab_size``: a
  ``gpt2_data.ShardError`` naming the shard, its largest id and the
  vocabulary size (an id without a logit would make every loss NaN).
* :func:`check_workdir`: nothing of an earlier run is lost or silently
  mixed in. A fresh run refuses a ``<optimizer>/checkpoints/`` of an earlier
  run (continue it with ``--resume``; this script never deletes checkpoints)
  and a ``metrics.jsonl`` (``--overwrite`` replaces it, saying so).
  ``--resume`` continues each optimizer from its latest checkpoint; one that
  has left nothing in ``workdir`` starts from step 0, saying so (a
  comparison stopped during its second optimizer resumes as a whole); one
  with metrics but no checkpoint is an error, as is finding no checkpoint at
  all, or a checkpoint at step ``k`` whose ``metrics.jsonl`` is missing or
  does not hold the lines of steps 0 to ``k``.
* Each checkpoint keeps the config it was saved with (JSON, beside the
  state); ``--resume`` with another ``seed``, ``steps``, ``batch_size``,
  ``model.*``, ``optimizer.learning_rate`` or ``optimizer.<optimizer>.*`` is a
  :class:`ConfigError` listing those fields, old and new, before any state is
  read. The data globs, the mesh, ``microbatches`` and the evaluation,
  logging and checkpoint intervals may change (moved shards, other hardware).

Devices: one mesh over all of ``jax.devices()`` with axes ``("data",
"fsdp")`` (``config.mesh.data`` × the rest). The batch is split over both
axes; every parameter and optimizer-state leaf is sharded along its largest
axis divisible by the ``fsdp`` size (replicated if none is), FSDP-style, and
the step is jitted with those shardings.

Multi-host (TPU pods, GPU clusters): start the same command on every host
with ``--distributed``, which calls ``jax.distributed.initialize()`` before
anything else touches JAX. On Cloud TPU, SLURM, Open MPI and Kubernetes it
finds the coordinator, process count and process id from the environment;
elsewhere call ``jax.distributed.initialize(coordinator_address,
num_processes, process_id)`` yourself first. Every host must see the token
shards and the same ``workdir`` (a shared filesystem): each process reads
only its own rows of every batch, orbax writes the sharded checkpoints
together, and process 0 alone writes metrics and the plot.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from ml_collections import config_flags
from tqdm import tqdm

import gpt2_data
import orthax
from orthax._checks import check_number

__all__ = [
    "ConfigError",
    "DivergenceError",
    "GPT",
    "OPTIMIZERS",
    "RunError",
    "WorkdirError",
    "check_config",
    "check_workdir",
    "format_table",
    "fsdp_sharding",
    "load_config",
    "load_data",
    "make_mesh",
    "make_optimizer",
    "make_schedule",
    "parse_optimizers",
    "plot_losses",
    "run",
    "train",
]

# The orthax ready optimizers the example trains, by name; AdamW is optax's.
_READY = {name: getattr(orthax, name) for name in (
    "muon", "normuon", "pion", "namo", "namo_d", "adamuon", "root", "auon",
    "hybrid_auon", "dion", "aro", "poet", "fismo", "muon_clip")}
OPTIMIZERS = ("adamw", *_READY)
# The methods whose update reads the attention's per-head max logits of the
# step's forward pass (orthax.qk_clip).
_RECORDS_MAX_LOGITS = frozenset(("muon_clip",))
# The methods that orthogonalize by Newton-Schulz take the mesh (each device
# orthogonalizes whole matrices for its share; FISMO whitens each leaf where
# it lies first). Pion's sharded rotation is left out, as before; AuON has
# no matrix-wide step to shard; Dion's low-rank products are partitioned by
# XLA where the leaves lie; ARO and POET work on each leaf where it lies.
_SHARDED = frozenset(("muon", "normuon", "namo", "namo_d", "adamuon", "root",
                      "hybrid_auon", "fismo", "muon_clip"))
# config.optimizer.<name> keys that shape the schedule rather than being the
# optimizer's keywords.
_SCHEDULE_KEYS = ("learning_rate", "adam_learning_rate", "warmup_frac",
                  "cooldown_frac", "decay", "end_lr_frac", "grad_clip")
# Mesh axes: the batch is split over both, parameters over "fsdp".
MESH_AXES = ("data", "fsdp")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None,
    "Config file (configs/*.py); override fields with --config.<field>=...")
flags.mark_flag_as_required("config")
flags.DEFINE_string("optimizers", None,
                    "Comma-separated optimizers to compare, from "
                    f"{','.join(OPTIMIZERS)} (default: config.optimizers).")
flags.DEFINE_bool("resume", False,
                  "Continue each optimizer's run from its latest checkpoint "
                  "(one that left nothing in config.workdir starts from step "
                  "0); an error if there is no checkpoint at all, or if the "
                  "config differs from the checkpoint's.")
flags.DEFINE_bool("overwrite", False,
                  "Start afresh where an earlier run left a metrics.jsonl but "
                  "no checkpoint, replacing it (without this flag, an error). "
                  "Checkpoints are never deleted.")
flags.DEFINE_integer("stop_at", None,
                     "Stop after this step (checkpointing there); --resume "
                     "continues the run.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() first (multi-host).")


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------


class RunError(Exception):
  """A config, data or work directory this script cannot run with.

  The command line prints the message and exits with status 1 (no
  traceback).
  """


class ConfigError(RunError, ValueError):
  """A config field out of range, or a checkpoint saved with another config."""


class WorkdirError(RunError, FileExistsError):
  """Files of an earlier run in ``config.workdir`` that this run would lose."""


class DivergenceError(RunError, FloatingPointError):
  """A training or validation loss that is NaN or infinite."""


# Integer fields and their least value.
_COUNTS = {"seed": 0, "checkpoint_every": 0, "steps": 1, "batch_size": 1,
           "microbatches": 1, "eval_every": 1, "eval_batches": 1,
           "log_every": 1, "keep_checkpoints": 1, "mesh.data": 1,
           "data.val_every_nth_file": 1}
_MODEL_SIZES = ("vocab_size", "padded_vocab_size", "context", "width",
                "num_layers", "num_heads", "mlp_ratio")
# The interval of each setting of config.optimizer.<name> (check_number's
# bounds); "decay" is one of _DECAYS.
_POSITIVE = dict(low=0, low_open=True)
_OPTIMIZER_SETTINGS = {
    **dict.fromkeys(("learning_rate", "adam_learning_rate", "eps",
                     "adam_eps"), _POSITIVE),
    **dict.fromkeys(("b1", "b2", "adam_b1", "adam_b2", "momentum", "beta2",
                     "mu"), dict(low=0, high=1, high_open=True)),
    **dict.fromkeys(("weight_decay", "adam_weight_decay", "grad_clip"),
                    dict(low=0)),
    **dict.fromkeys(("warmup_frac", "cooldown_frac", "end_lr_frac"),
                    dict(low=0, high=1)),
    **dict.fromkeys(("clamp", "quantile", "rank_fraction"),
                    dict(low=0, high=1, low_open=True)),
    **dict.fromkeys(("gamma", "lr_scale", "threshold"), _POSITIVE),
    "alpha": dict(low=0, high=1),
    **dict.fromkeys(("block_size", "merge_every", "update_every"),
                    dict(low=1, integer=True)),
}
_DECAYS = ("cosine", "linear")
# With the model and the optimizer's own settings, the fields that fix a
# run's trajectory: a resumed run must keep them.
_TRAJECTORY = ("seed", "steps", "batch_size", "optimizer.learning_rate")


def _check(name: str, value: Any, **bounds: Any) -> float | int:
  """:func:`orthax._checks.check_number`, raising :class:`ConfigError`."""
  try:
    return check_number("train_gpt2", name, value, **bounds)
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e)) from None


def _check_model(model: ml_collections.ConfigDict) -> None:
  """Checks ``config.model``: positive sizes, vocabularies, heads, dtype."""
  for key in _MODEL_SIZES:
    _check(f"config.model.{key}", model[key], low=1, integer=True)
  if model.padded_vocab_size < model.vocab_size:
    raise ConfigError(
        f"config.model.padded_vocab_size={model.padded_vocab_size} is "
        f"smaller than config.model.vocab_size={model.vocab_size}")
  if model.width % model.num_heads:
    raise ConfigError(f"config.model.num_heads={model.num_heads} must "
                      f"divide config.model.width={model.width}")
  try:
    floating = jnp.issubdtype(jnp.dtype(model.dtype), jnp.floating)
  except TypeError:
    floating = False
  if not floating:
    raise ConfigError("config.model.dtype must name a floating-point dtype "
                      f"('float32', 'bfloat16'), got {model.dtype!r}")


def _check_optimizer_settings(optimizer: ml_collections.ConfigDict) -> None:
  """Checks ``config.optimizer``: every rate, beta, fraction and decay."""
  if optimizer.learning_rate is not None:
    _check("config.optimizer.learning_rate", optimizer.learning_rate,
           **_POSITIVE)
  for name in (n for n in OPTIMIZERS if n in optimizer):
    for key, value in optimizer[name].items():
      field = f"config.optimizer.{name}.{key}"
      if key == "decay":
        if value not in _DECAYS:
          raise ConfigError(f"{field} must be one of {_DECAYS}, got "
                            f"{value!r}")
      elif key in _OPTIMIZER_SETTINGS:
        _check(field, value, **_OPTIMIZER_SETTINGS[key])
      else:
        raise ConfigError(f"{field}: this script reads no setting {key!r}")


def check_config(config: ml_collections.ConfigDict,
                 num_devices: int | None = None) -> None:
  """Checks every field of a run's config before anything runs.

  Counts (``steps``, ``batch_size``, ``microbatches``, ``eval_every``,
  ``eval_batches``, ``log_every``, ``keep_checkpoints``, ``mesh.data``,
  ``data.val_every_nth_file``) must be positive integers, ``seed`` and
  ``checkpoint_every`` non-negative ones; the model's sizes positive, with
  ``num_heads`` dividing ``width`` and ``padded_vocab_size >= vocab_size``;
  ``config.optimizers`` known names; every optimizer setting in range
  (rates and epsilons positive, betas in [0, 1), fractions in [0, 1], decays
  and clipping non-negative).

  Args:
    config: the run's config (see ``configs/``).
    num_devices: the devices of the mesh (default ``jax.device_count()``):
      ``config.mesh.data`` must divide it, and ``config.batch_size`` must be
      a multiple of it times ``config.microbatches``.

  Raises:
    ConfigError: naming the first field out of range, and its value.
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  for field, low in _COUNTS.items():
    _check(f"config.{field}", functools.reduce(getattr, field.split("."),
                                               config),
           low=low, integer=True)
  _check_model(config.model)
  if num_devices % config.mesh.data:
    raise ConfigError(f"config.mesh.data={config.mesh.data} must divide the "
                      f"{num_devices} devices")
  if config.batch_size % (num_devices * config.microbatches):
    raise ConfigError(
        f"config.batch_size={config.batch_size} must be a multiple of the "
        f"{num_devices} devices times config.microbatches="
        f"{config.microbatches}")
  parse_optimizers(config.optimizers, "config.optimizers")
  _check_optimizer_settings(config.optimizer)


def _run_record(config: ml_collections.ConfigDict, name: str,
                ) -> dict[str, Any]:
  """What each checkpoint keeps of its run (JSON): optimizer and config."""
  return {"optimizer": name, "config": config.to_dict()}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat |= _flatten(value, f"{prefix}{key}.")
    else:
      flat[prefix + key] = value
  return flat


def _trajectory(record: dict[str, Any]) -> dict[str, Any]:
  """The fields of a :func:`_run_record` that a resumed run must keep."""
  name = record.get("optimizer")
  mine = ("model.", f"optimizer.{name}.")
  return {"optimizer": name} | {
      k: v for k, v in _flatten(record.get("config", {})).items()
      if k in _TRAJECTORY or k.startswith(mine)}


def _check_resumable(directory: Path, step: int,
                     config: ml_collections.ConfigDict, name: str) -> None:
  """Raises unless the checkpoint at ``step`` was saved with ``config``.

  Only its record is read, so a checkpoint of another model never reaches
  the state's restore (whose shape errors orbax would bury in the noise of
  its aborted reads).

  Raises:
    ConfigError: listing each field of :func:`_trajectory` that differs,
      with the checkpoint's value and this run's.
  """
  with ocp.CheckpointManager(directory.resolve()) as manager:
    saved = manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta
  old, new = _trajectory(saved), _trajectory(_run_record(config, name))
  show = lambda record, key: repr(record[key]) if key in record else "absent"
  differ = [f"  {k}: {show(old, k)} -> {show(new, k)}"
            for k in sorted(old.keys() | new.keys())
            if (k in old, old.get(k)) != (k in new, new.get(k))]
  if differ:
    raise ConfigError(
        f"the checkpoint at step {step} in {directory} is of another run; "
        "these fields differ (checkpoint -> this run):\n" + "\n".join(differ)
        + "\nresume with the checkpoint's values, or choose another "
        "config.workdir")


def _no_checkpoint(config: ml_collections.ConfigDict, *dirs: Path) -> str:
  """``"no checkpoint in <dirs>"``, saying why when checkpointing is off."""
  off = ("" if config.checkpoint_every else
         " (config.checkpoint_every is 0: checkpointing is off)")
  return f"no checkpoint in {', '.join(map(str, dirs))}{off}"


def _start_step(config: ml_collections.ConfigDict, name: str, *,
                resume: bool, overwrite: bool) -> int:
  """The step ``name``'s run starts from: its latest checkpoint's, or 0.

  Raises:
    WorkdirError: where starting would lose an earlier run's files: a
      checkpoint without ``resume``, or a ``metrics.jsonl`` with no
      checkpoint to continue and no ``overwrite``.
    ConfigError: ``resume`` into a checkpoint of another config.
    RunError: ``resume`` from a checkpoint at step ``k`` whose
      ``metrics.jsonl`` is missing or lacks lines of steps 0 to ``k``.
  """
  run_dir = Path(config.workdir) / name
  checkpoint_dir = run_dir / "checkpoints"
  metrics = run_dir / "metrics.jsonl"
  latest = max(ocp.utils.checkpoint_steps(checkpoint_dir), default=None)
  if latest is not None:
    if not resume:
      raise WorkdirError(
          f"{checkpoint_dir} holds a checkpoint at step {latest}: pass "
          "--resume to continue that run, or choose another config.workdir "
          "(this script never deletes checkpoints: remove the directory "
          "yourself to start over)")
    _check_resumable(checkpoint_dir, latest, config, name)
    _check_history(metrics, checkpoint_dir, latest)
    return latest
  if metrics.exists() and not overwrite:
    why = (f"there is {_no_checkpoint(config, checkpoint_dir)} to resume "
           "from" if resume else "a fresh run would replace them")
    raise WorkdirError(
        f"{metrics} holds the metrics of an earlier run, but {why}: pass "
        f"--overwrite to start {name} afresh, or choose another "
        "config.workdir")
  return 0


def _check_history(metrics: Path, checkpoint_dir: Path, step: int) -> None:
  """Raises unless ``metrics`` holds the lines of steps 0 to ``step``.

  A run logs every step it checkpoints before saving it, so its metrics
  reach each of its checkpoints; without them a resumed run would have no
  curve and no final losses before ``step``.

  Raises:
    RunError: naming ``metrics``, what it holds and the checkpoint.
  """
  lines = _Metrics.read(metrics, step)
  if lines and lines[0]["step"] == 0 and lines[-1]["step"] == step:
    return
  if not metrics.exists():
    held = "is missing"
  elif lines:
    held = f"has steps {lines[0]['step']} to {lines[-1]['step']}"
  else:
    held = f"has no line up to step {step}"
  raise RunError(
      f"{metrics} {held}, but {checkpoint_dir} holds a checkpoint at step "
      f"{step}: a resumed run would lose the losses of steps 0 to {step}; "
      "put the run's metrics.jsonl back, or choose another config.workdir")


def check_workdir(config: ml_collections.ConfigDict, names: tuple[str, ...],
                  *, resume: bool = False, overwrite: bool = False,
                  ) -> dict[str, int]:
  """Checks ``config.workdir`` for the runs of ``names`` before any starts.

  Without ``resume``, each optimizer's directory must hold no checkpoint,
  and no ``metrics.jsonl`` unless ``overwrite``. With ``resume``, each
  optimizer continues from its latest checkpoint, whose saved config must
  match ``config``; one without a checkpoint starts from step 0 if it left
  no metrics (or with ``overwrite``); at least one must have a checkpoint.

  Returns:
    The step each optimizer starts from.

  Raises:
    WorkdirError, ConfigError: from each optimizer's directory.
    RunError: ``resume`` and no checkpoint at all, or a checkpoint whose
      metrics are missing.
  """
  starts = {n: _start_step(config, n, resume=resume, overwrite=overwrite)
            for n in names}
  if resume and not any(starts.values()):
    raise RunError("--resume: nothing to resume, " + _no_checkpoint(
        config, *(Path(config.workdir) / n / "checkpoints" for n in names)))
  return starts


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention with separate Q, K, V and output kernels.

  GPT-2 stores the three input projections as one ``(width, 3 width)``
  kernel; separate kernels compute the same function and make each
  projection its own hidden matrix for Muon (as modded-nanogpt does).

  With ``record_max_logits`` set (by :func:`_loss`), each call also sows
  ``max_logits``: per head, the largest causal logit ``q_i . k_j /
  sqrt(d_head)`` (``j <= i``) over the batch, in float32, the ``S_max``
  that :func:`orthax.qk_clip` compares with its threshold. The heads are
  contiguous blocks of ``d_head`` columns of the query and key kernels
  (``qk_clip``'s default ``head_axis=-1``). Unset (the default), the call
  is the plain attention.
  """

  def __init__(self, width: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
    if width % num_heads:
      raise ValueError(f"num_heads={num_heads} must divide width={width}")
    self.num_heads = num_heads
    self.record_max_logits = False
    dense = functools.partial(nnx.Linear, width, width, dtype=dtype, rngs=rngs)
    self.query, self.key, self.value, self.proj = (dense(), dense(), dense(),
                                                   dense())

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    heads = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    if self.record_max_logits:
      self.sow(nnx.Intermediate, "max_logits", self._max_logits(q, k))
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.proj(y.reshape(b, t, d))

  @staticmethod
  def _max_logits(q: jax.Array, k: jax.Array) -> jax.Array:
    """Per head, the max causal logit over the batch: ``(heads,)``."""
    logits = jnp.einsum("bthd,bshd->bhts", q, k,
                        preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(q.shape[-1])
    causal = jnp.tril(jnp.ones(logits.shape[-2:], bool))
    return jnp.max(jnp.where(causal, logits, -jnp.inf), axis=(0, 2, 3))


class MLP(nnx.Module):
  """GPT-2's feed-forward network: ``proj(gelu(fc(x)))`` (tanh GELU)."""

  def __init__(self, width: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.fc = nnx.Linear(width, hidden, dtype=dtype, rngs=rngs)
    self.proj = nnx.Linear(hidden, width, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(nnx.gelu(self.fc(x), approximate=True))


def _layer_norm(width: int, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(width, epsilon=1e-5, dtype=dtype, rngs=rngs)  # GPT-2's


class Block(nnx.Module):
  """Pre-LayerNorm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

  def __init__(self, width: int, num_heads: int, mlp_ratio: int, *, dtype,
               rngs: nnx.Rngs):
    self.ln_1 = _layer_norm(width, dtype, rngs)
    self.attn = CausalSelfAttention(width, num_heads, dtype=dtype, rngs=rngs)
    self.ln_2 = _layer_norm(width, dtype, rngs)
    self.mlp = MLP(width, mlp_ratio * width, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class GPT(nnx.Module):
  """GPT-2: embeddings, pre-LN blocks, final LayerNorm, tied or separate head.

  Attribute names follow GPT-2's checkpoints (``wte``, ``wpe``, ``h``,
  ``ln_f``; ``lm_head`` when untied). :func:`orthax.route` sends the
  embeddings (``nnx.Embed``), the norms, the biases and ``lm_head`` to AdamW
  and makes every other kernel a ``(fan_in, fan_out)`` hidden matrix.
  The embedding tables have ``padded_vocab_size`` rows (a multiple of 128
  runs faster); the logits are cut back to ``vocab_size`` so padded ids never
  take probability. Embeddings start at GPT-2's N(0, 0.02²), hidden kernels
  at Flax's LeCun normal, an untied head at zero (every run starts at the
  uniform prediction).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    """Builds the model.

    Args:
      config: ``vocab_size``, ``padded_vocab_size``, ``context``, ``width``,
        ``num_layers``, ``num_heads``, ``mlp_ratio``, ``tie_embeddings`` and
        ``dtype`` (the compute dtype; parameters are float32).
      rngs: initialization keys.

    Raises:
      ConfigError: a size out of range (``config.model.*``, as
        :func:`check_config` checks it).
    """
    _check_model(config)
    dtype = jnp.dtype(config.dtype)
    init = nnx.initializers.normal(stddev=0.02)
    self.vocab_size = config.vocab_size
    self.tie_embeddings = config.tie_embeddings
    self.wte = nnx.Embed(config.padded_vocab_size, config.width,
                         embedding_init=init, dtype=dtype, rngs=rngs)
    self.wpe = nnx.Embed(config.context, config.width, embedding_init=init,
                         dtype=dtype, rngs=rngs)
    self.h = nnx.List([
        Block(config.width, config.num_heads, config.mlp_ratio, dtype=dtype,
              rngs=rngs) for _ in range(config.num_layers)])
    self.ln_f = _layer_norm(config.width, dtype, rngs)
    if not config.tie_embeddings:
      self.lm_head = nnx.Linear(config.width, config.padded_vocab_size,
                                use_bias=False,
                                kernel_init=nnx.initializers.zeros,
                                dtype=dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Logits ``(batch, time, vocab_size)`` for int tokens ``(batch, time)``."""
    x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[1]))
    for block in self.h:
      x = block(x)
    x = self.ln_f(x)
    logits = self.wte.attend(x) if self.tie_embeddings else self.lm_head(x)
    return logits[..., :self.vocab_size]


def _loss(model: GPT, batch: jax.Array, *, max_logits: bool = False) -> Any:
  """Mean next-token cross-entropy (nats) of ``(batch, context + 1)`` tokens.

  With ``max_logits``, ``(loss, recorded)``: ``recorded`` holds each
  attention module's per-head max logits (:class:`CausalSelfAttention`)
  under its path, ``{'h': {0: {'attn': {'max_logits': (S,)}}, ...}}``, the
  ``max_logits=`` of :func:`orthax.qk_clip`. The model is switched to
  recording (it is the one :func:`flax.nnx.merge` made for this call).
  """
  tokens = batch[:, :-1]
  if max_logits:
    for _, module in nnx.iter_modules(model):
      if isinstance(module, CausalSelfAttention):
        module.record_max_logits = True
    logits, recorded = nnx.capture(model, nnx.Intermediate)(tokens)
  else:
    logits = model(tokens)
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), batch[:, 1:]).mean()
  return (loss, nnx.to_pure_dict(recorded)) if max_logits else loss


# ---------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------


def make_schedule(peak: float, hparams: ml_collections.ConfigDict,
                  steps: int) -> optax.Schedule:
  """Linear warmup, constant, then a cosine or linear decay to the end.

  Args:
    peak: the peak learning rate.
    hparams: ``warmup_frac`` (of ``steps``, from 0 to ``peak``),
      ``cooldown_frac`` (the last fraction of ``steps`` that decays; 1 decays
      from the end of the warmup on), ``decay`` (``"cosine"`` or
      ``"linear"``) and ``end_lr_frac`` (the final rate over ``peak``).
    steps: the run's training steps.

  Returns:
    An optax schedule of the step count.
  """
  if hparams.decay not in _DECAYS:
    raise ValueError(f"decay must be one of {_DECAYS}, got {hparams.decay!r}")
  warmup = round(hparams.warmup_frac * steps)
  decay_start = max(warmup, steps - round(hparams.cooldown_frac * steps))
  decay_steps = max(1, steps - decay_start)
  if hparams.decay == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps,
                                        alpha=hparams.end_lr_frac)
  else:
    decay = optax.linear_schedule(peak, hparams.end_lr_frac * peak,
                                  decay_steps)
  pieces, boundaries = [optax.constant_schedule(peak), decay], [decay_start]
  if warmup:
    pieces.insert(0, optax.linear_schedule(0.0, peak, warmup))
    boundaries.insert(0, warmup)
  return optax.join_schedules(pieces, boundaries)


def make_optimizer(name: str, config: ml_collections.ConfigDict,
                   mesh: Mesh, model: nnx.Module | None = None,
                   ) -> optax.GradientTransformation:
  """The optimizer ``name`` with the hyper-parameters of ``config.optimizer``.

  ``config.optimizer.<name>`` holds each method's settings (the configs cite
  their sources); ``config.optimizer.learning_rate``, when set, replaces the
  peak learning rate of every method (the hidden matrices' for the orthax
  methods), for sweeps. AdamW decays only the leaves with two or more axes
  (llm.c's and nanoGPT's rule). The orthax methods take their settings as
  their keywords (``momentum`` is ``beta``; unset ones keep the method's
  defaults) and give the other leaves to AdamW with the ``adam_*`` settings
  and the same schedule shape.

  Args:
    name: one of :data:`OPTIMIZERS`.
    config: the run's config (``optimizer`` and ``steps`` are read).
    mesh: the device mesh the parameters are sharded over.
    model: the GPT (an abstract one from ``nnx.eval_shape`` is enough) whose
      NNX modules tell orthax each leaf's route; ``None`` leaves it to the
      tree's structure and names (the same routes for this model).

  Returns:
    An :class:`optax.GradientTransformation`.
  """
  if name not in OPTIMIZERS:
    raise ConfigError(f"unknown optimizer {name!r}; expected one of "
                      f"{OPTIMIZERS}")
  hp = config.optimizer[name]
  peak = config.optimizer.learning_rate or hp.learning_rate
  lr = make_schedule(peak, hp, config.steps)
  if name == "adamw":
    tx = optax.adamw(lr, b1=hp.b1, b2=hp.b2, eps=hp.eps,
                     weight_decay=hp.weight_decay,
                     mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
  else:
    # The method's own settings are its orthax keywords ("momentum" is
    # beta); model: its NNX modules decide each leaf's route (orthax.route).
    kwargs = {("beta" if k == "momentum" else k): v for k, v in hp.items()
              if k not in _SCHEDULE_KEYS}
    if name in _SHARDED:
      # Each device orthogonalizes whole matrices for its share of the
      # FSDP-sharded ones (two all_to_alls per step, orthax.sharded); with
      # an fsdp axis of size 1 this is the plain unsharded path.
      kwargs.update(mesh=mesh, mesh_axis="fsdp")
    tx = _READY[name](
        lr, model=model,
        adam_learning_rate=make_schedule(hp.adam_learning_rate, hp,
                                         config.steps), **kwargs)
  if hp.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(hp.grad_clip), tx)
  return tx


def parse_optimizers(names: str, field: str = "--optimizers",
                     ) -> tuple[str, ...]:
  """``"adamw,muon"`` -> ``("adamw", "muon")``, checked against the choices.

  Raises:
    ConfigError: an unknown name, or none, naming ``field`` (where
      ``names`` came from).
  """
  parsed = tuple(n.strip() for n in names.split(",") if n.strip())
  unknown = [n for n in parsed if n not in OPTIMIZERS]
  if unknown or not parsed:
    raise ConfigError(f"unknown or no optimizers in {field}={names!r}; "
                      f"choose from {','.join(OPTIMIZERS)}")
  return parsed


# ---------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def load_config(path: str | Path) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file (what ``--config=path`` loads)."""
  spec = importlib.util.spec_from_file_location(Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


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


class _Checkpoints:
  """Orbax checkpoints of the train state, each with its run's record (JSON).

  The record (:func:`_run_record`) is what :func:`_check_resumable` compares
  before a resume.
  """

  def __init__(self, directory: Path, record: dict[str, Any], keep: int):
    self.record = record
    self.manager = ocp.CheckpointManager(
        directory.resolve(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep))

  def save(self, step: int, state: Any) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(self.record)))

  def restore(self, step: int, abstract_state: Any) -> Any:
    return self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state))).state

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class _Metrics:
  """A run's metrics lines: kept in memory, and in JSONL by process 0.

  JSON has no NaN or infinity: a value that is not finite (the loss of a
  diverged run) is written as ``null``.
  """

  def __init__(self, path: Path, history: list[dict[str, Any]]):
    """Starts ``path`` afresh with ``history`` (the lines kept on resume)."""
    self.history = list(history)
    self.file = None
    if jax.process_index() == 0:
      path.parent.mkdir(parents=True, exist_ok=True)
      self.file = path.open("w")
      self.file.writelines(map(self._encode, history))

  @staticmethod
  def _encode(line: dict[str, Any]) -> str:
    return json.dumps({k: v if math.isfinite(v) else None
                       for k, v in line.items()}, allow_nan=False) + "\n"

  @staticmethod
  def read(path: Path, last_step: int) -> list[dict[str, Any]]:
    """The lines of ``path`` up to ``last_step``, where a resumed run starts."""
    if not path.exists():
      return []
    lines = [json.loads(l) for l in path.read_text().splitlines()]
    return [l for l in lines if l["step"] <= last_step]

  def log(self, line: dict[str, Any]) -> None:
    self.history.append(line)
    if self.file:
      self.file.write(self._encode(line))
      self.file.flush()

  def close(self) -> None:
    if self.file:
      self.file.close()


def _summary(name: str, history: list[dict[str, Any]],
             config: ml_collections.ConfigDict,
             seconds_per_step: float | None) -> dict[str, Any]:
  """The curves of ``history`` and the final figures of a run.

  ``history`` holds step 0's validation loss and at least one training
  step: a fresh run trains one step or more, and a resumed one has the
  lines up to its checkpoint (:func:`_check_history`).
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
  :func:`check_workdir` does, for this optimizer) are checked.

  Args:
    config: the run's config (see ``configs/``).
    name: one of :data:`OPTIMIZERS`.
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
      :func:`check_workdir`; also ``stop_at`` below 1.
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


# ---------------------------------------------------------------------------
# Reporting and the command line
# ---------------------------------------------------------------------------


def plot_losses(results: list[dict[str, Any]], title: str = "") -> Figure:
  """Training and validation loss against step, one line per optimizer.

  Returns a figure on the Agg canvas (no global backend is touched, so it
  also displays inline in a notebook); ``fig.savefig(path)`` writes a PNG.
  """
  fig = Figure(figsize=(10, 4))
  FigureCanvasAgg(fig)
  train_ax, val_ax = fig.subplots(1, 2)
  for r in results:
    train_ax.plot(r["steps"], r["train_loss"], lw=0.8, label=r["optimizer"])
    val_ax.plot(r["eval_steps"], r["val_loss"], marker=".",
                label=r["optimizer"])
  # Zoom past step 0 (the same loss for every run) to where the runs differ.
  trained = [v for r in results for v in r["val_loss"][1:]]
  if trained:
    val_ax.set_ylim(min(trained) - 0.05,
                    max(r["val_loss"][1] for r in results
                        if len(r["val_loss"]) > 1) + 0.1)
  for ax, what in ((train_ax, "training"), (val_ax, "validation")):
    ax.set_xlabel("step")
    ax.set_ylabel(f"{what} loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def format_table(results: list[dict[str, Any]]) -> str:
  """Final losses and speed per optimizer, one row each.

  ``val step`` is the step of ``val loss``; ``s/step`` and ``tokens/s`` are
  "-" where a session timed no step (see :func:`train`).
  """
  speed = lambda value, spec: "-" if value is None else format(value, spec)
  rows = [f"{'optimizer':<10} {'train loss':>10} {'val loss':>10} "
          f"{'val step':>9} {'s/step':>8} {'tokens/s':>10}"]
  rows += [f"{r['optimizer']:<10} {r['final_train_loss']:>10.4f} "
           f"{r['final_val_loss']:>10.4f} {r['final_val_step']:>9} "
           f"{speed(r['seconds_per_step'], '.4f'):>8} "
           f"{speed(r['tokens_per_second'], '.0f'):>10}" for r in results]
  return "\n".join(rows)


def run(config: ml_collections.ConfigDict, names: tuple[str, ...] | None = None,
        *, resume: bool = False, overwrite: bool = False,
        stop_at: int | None = None, progress: bool = False,
        ) -> list[dict[str, Any]]:
  """Trains each optimizer of ``names`` (default: ``config.optimizers``).

  The config and the work directory of every run are checked before the
  first starts (:func:`check_config`, :func:`check_workdir`; ``resume``,
  ``overwrite`` and ``stop_at`` as in :func:`train`). Process 0 writes
  ``<workdir>/loss.png`` and prints :func:`format_table`.

  Returns:
    The :func:`train` results, in order.

  Raises:
    RunError: the config or work directory (see the checks); or the
      :class:`DivergenceError` of an optimizer's run, before the later
      optimizers train and the plot and table are made.
    gpt2_data.ShardError: the token shards.
  """
  check_config(config)
  names = (parse_optimizers(config.optimizers, "config.optimizers")
           if names is None else parse_optimizers(",".join(names), "names"))
  check_workdir(config, names, resume=resume, overwrite=overwrite)
  data = load_data(config)
  mesh = make_mesh(config.mesh.data)
  print(f"data: {data[0].num_tokens:,} training and {data[1].num_tokens:,} "
        f"validation tokens; mesh {dict(mesh.shape)} of "
        f"{jax.device_count()} {jax.default_backend()} device(s)")
  results = [train(config, n, data, mesh=mesh, resume=resume,
                   overwrite=overwrite, stop_at=stop_at, progress=progress)
             for n in names]
  if jax.process_index() == 0:
    plot = Path(config.workdir) / "loss.png"
    plot_losses(results, f"{config.model.num_layers} layers, width "
                f"{config.model.width}").savefig(plot, dpi=120)
    print("\n" + format_table(results))
    print(f"\nwrote {plot} and <optimizer>/metrics.jsonl in {config.workdir}")
  return results


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:  # absl logs INFO by default
    logging.set_verbosity(logging.WARNING)
  if FLAGS.distributed:
    jax.distributed.initialize()
  try:
    names = (parse_optimizers(FLAGS.optimizers) if FLAGS.optimizers
             else None)
    run(FLAGS.config, names, resume=FLAGS.resume, overwrite=FLAGS.overwrite,
        stop_at=FLAGS.stop_at, progress=sys.stderr.isatty())
  except (RunError, gpt2_data.ShardError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
