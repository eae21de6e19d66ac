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

The code: this file is the command line (its flags, :func:`run`,
:func:`plot_losses` and :func:`format_table`) and re-exports the names the
tests, the benchmarks and the notebook use. The rest is in modules that can
be read and imported alone, each importing only those before it here:
``gpt2_data`` (token shards and batches), ``gpt2_errors``
(:class:`RunError` and its kinds), ``gpt2_model`` (:class:`GPT` and its
loss), ``gpt2_optim`` (:data:`OPTIMIZERS`, :func:`make_optimizer`,
:func:`make_schedule`), ``gpt2_config`` (:func:`load_config`,
:func:`check_config`), ``gpt2_workdir`` (metrics, checkpoints,
:func:`check_workdir`) and ``gpt2_train`` (mesh, shardings, the step and
:func:`train`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from ml_collections import config_flags

import gpt2_data
from gpt2_config import check_config, load_config
from gpt2_errors import ConfigError, DivergenceError, RunError, WorkdirError
from gpt2_model import GPT, _loss
from gpt2_optim import (OPTIMIZERS, make_optimizer, make_schedule,
                        parse_optimizers)
from gpt2_train import (MESH_AXES, _step_functions, fsdp_sharding, load_data,
                        make_mesh, train)
from gpt2_workdir import check_workdir

# Defined here, and the names of the other modules that the tests, the
# benchmarks and the notebook reach as train_gpt2.<name>.
__all__ = [
    "ConfigError",
    "DivergenceError",
    "GPT",
    "MESH_AXES",
    "OPTIMIZERS",
    "RunError",
    "WorkdirError",
    "_loss",
    "_step_functions",
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
