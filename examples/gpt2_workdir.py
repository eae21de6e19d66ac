"""What a GPT-2 example run keeps in ``config.workdir``, and its checks.

Per optimizer, ``<workdir>/<optimizer>/``: ``metrics.jsonl``
(:class:`_Metrics`) and ``checkpoints/`` (:class:`_Checkpoints`: orbax,
each checkpoint with the record of its run, :func:`_run_record`).
:func:`check_workdir` (and :func:`_start_step`, per optimizer) checks before
a run starts that it loses or silently mixes in nothing of an earlier one,
and finds the step each run resumes from.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from gpt2_errors import ConfigError, RunError, WorkdirError

# With the model and the optimizer's own settings, the fields that fix a
# run's trajectory: a resumed run must keep them.
_TRAJECTORY = ("seed", "steps", "batch_size", "optimizer.learning_rate")


def _run_record(config: ml_collections.ConfigDict, name: str,
                ) -> dict[str, Any]:
  """What each checkpoint keeps of its run (JSON): optimizer and config."""
  return {"optimizer": name, "config": config.to_dict()}


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
