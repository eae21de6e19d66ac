"""The GPT-2 example's run config: loading it and checking every field.

:func:`load_config` reads a ``configs/*.py`` file as ``--config=`` does;
:func:`check_config` checks every count, size, rate and choice of it before
anything runs, raising a :class:`gpt2_errors.ConfigError` that names the
field.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import jax
import ml_collections

from gpt2_errors import ConfigError, _check
from gpt2_model import _check_model
from gpt2_optim import _DECAYS, OPTIMIZERS, parse_optimizers

# Integer fields and their least value.
_COUNTS = {"seed": 0, "checkpoint_every": 0, "steps": 1, "batch_size": 1,
           "microbatches": 1, "eval_every": 1, "eval_batches": 1,
           "log_every": 1, "keep_checkpoints": 1, "mesh.data": 1,
           "data.val_every_nth_file": 1}
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


def load_config(path: str | Path) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file (what ``--config=path`` loads)."""
  spec = importlib.util.spec_from_file_location(Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


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
