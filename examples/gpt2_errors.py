"""The errors of the GPT-2 example's runs, and its check of a config value.

Every error here is a :class:`RunError`: the command line
(``train_gpt2.py``) prints its message on one line and exits with status 1,
no traceback. :func:`_check` is :func:`orthax._checks.check_number` raising
:class:`ConfigError`, for the config checks of the other modules.
"""

from __future__ import annotations

from typing import Any

from orthax._checks import check_number


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


def _check(name: str, value: Any, **bounds: Any) -> float | int:
  """:func:`orthax._checks.check_number`, raising :class:`ConfigError`."""
  try:
    return check_number("train_gpt2", name, value, **bounds)
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e)) from None
