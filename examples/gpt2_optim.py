"""The optimizers the GPT-2 example compares, and their schedules.

:data:`OPTIMIZERS` names them (optax's AdamW and the orthax ready
optimizers); :func:`make_optimizer` builds one from ``config.optimizer``,
with :func:`make_schedule`'s warmup and decay; :func:`parse_optimizers`
reads a comma-separated list of names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

import orthax
from gpt2_errors import ConfigError

if TYPE_CHECKING:  # annotations only: the optimizers build without ml_collections
  import ml_collections

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
# The choices of config.optimizer.<name>.decay (make_schedule).
_DECAYS = ("cosine", "linear")


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
