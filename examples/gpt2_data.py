"""Token data for ``train_gpt2.py``: shards, the standard-library text, batches.

Two sources, one interface (:class:`Tokens`):

* **Token shards** in the llm.c / modded-nanogpt ``.bin`` format: a header of
  256 little-endian int32 (``20240520``, version ``1``, the token count, then
  zeros) followed by that many uint16 tokens. FineWeb in this format comes
  from llm.c's ``dev/data/fineweb.py`` or modded-nanogpt's
  ``data/cached_fineweb10B.py``. :func:`open_shards` memory-maps every file
  that a glob matches, so only the windows a batch touches are ever read.
* **The Python standard library's own source** as bytes (vocabulary 256), on
  every machine with Python, no download: :func:`stdlib_corpus`.

Training batches are a pure function of ``(seed, step)`` (:func:`train_batch`),
so a run resumed from a checkpoint at step ``k`` sees exactly the batches an
uninterrupted run sees after step ``k``; validation batches are fixed windows
spread evenly over the held-out tokens (:func:`eval_batches`).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
from pathlib import Path

import numpy as np

__all__ = [
    "HEADER_INTS",
    "MAGIC",
    "ShardError",
    "Tokens",
    "VERSION",
    "eval_batches",
    "load_splits",
    "open_shards",
    "read_shard",
    "stdlib_corpus",
    "train_batch",
    "write_shard",
]

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
_HEADER_BYTES = HEADER_INTS * 4


class ShardError(ValueError):
  """A token shard (or a glob of them) that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Tokens:
  """Token arrays sampled as one pool; a window never crosses two of them.

  Attributes:
    arrays: 1-D integer arrays (``np.memmap`` for shards).
    names: where each array came from, for error messages.
  """

  arrays: tuple[np.ndarray, ...]
  names: tuple[str, ...]

  @property
  def num_tokens(self) -> int:
    return sum(len(a) for a in self.arrays)

  @functools.cached_property
  def largest_ids(self) -> tuple[int, ...]:
    """The largest token id of each array (-1 if empty), read once."""
    return tuple(int(a.max()) if len(a) else -1 for a in self.arrays)

  def check_vocabulary(self, vocab_size: int) -> None:
    """Raises unless every token id is below ``vocab_size``.

    An id at or above the model's vocabulary has no logit: its loss, and then
    every parameter, would be NaN. The first call reads all the tokens (one
    pass over the shards); later calls reuse :attr:`largest_ids`.

    Raises:
      ShardError: naming the first array with such an id, its largest id and
        ``vocab_size``.
    """
    for name, largest in zip(self.names, self.largest_ids):
      if largest >= vocab_size:
        raise ShardError(
            f"{name}: token id {largest} is outside the model's vocabulary "
            f"of {vocab_size} ids (config.model.vocab_size); were these "
            "tokens made by another tokenizer?")

  def _starts_per_array(self, length: int) -> np.ndarray:
    """How many windows of ``length`` tokens fit in each array."""
    starts = np.array([len(a) - length + 1 for a in self.arrays], np.int64)
    if np.any(starts < 1):
      i = int(np.argmin(starts))
      raise ShardError(
          f"{self.names[i]} holds {len(self.arrays[i])} tokens, fewer than "
          f"one window of {length} (context + 1)")
    return starts

  def windows(self, positions: np.ndarray, length: int) -> np.ndarray:
    """Windows at ``positions``, indices into all windows of the pool.

    Args:
      positions: int array; position ``p`` is the ``p``-th window of
        ``length`` tokens, counting through the arrays in order.
      length: tokens per window.

    Returns:
      An int32 array ``positions.shape + (length,)``.
    """
    bounds = np.cumsum(self._starts_per_array(length))
    flat = positions.reshape(-1)
    which = np.searchsorted(bounds, flat, side="right")
    offsets = flat - np.concatenate([[0], bounds[:-1]])[which]
    rows = [self.arrays[a][o:o + length] for a, o in zip(which, offsets)]
    return np.stack(rows).astype(np.int32).reshape(*positions.shape, length)

  def num_windows(self, length: int) -> int:
    return int(self._starts_per_array(length).sum())


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
  """Writes ``tokens`` (values below 65536) as a version-1 ``.bin`` shard."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or tokens.size and (tokens.min() < 0
                                          or tokens.max() > 0xFFFF):
    raise ValueError("tokens must be a 1-D array of values in [0, 65535]")
  header = np.zeros(HEADER_INTS, "<i4")
  header[:3] = MAGIC, VERSION, len(tokens)
  with open(path, "wb") as f:
    f.write(header.tobytes())
    f.write(tokens.astype("<u2").tobytes())


def read_shard(path: str | os.PathLike) -> np.ndarray:
  """Memory-maps the tokens of one ``.bin`` shard, after checking its header.

  Args:
    path: the shard.

  Returns:
    A read-only ``np.memmap`` of uint16 tokens.

  Raises:
    ShardError: naming ``path``, when the header is short, the magic number
      or version is wrong, or the file's size does not match the token count.
  """
  size = os.path.getsize(path)
  if size < _HEADER_BYTES:
    raise ShardError(f"{path}: {size} bytes, shorter than the "
                     f"{_HEADER_BYTES}-byte header of a token shard")
  header = np.fromfile(path, "<i4", count=HEADER_INTS)
  if header[0] != MAGIC:
    raise ShardError(f"{path}: magic number {header[0]}, expected {MAGIC} "
                     "(not an llm.c / modded-nanogpt token shard)")
  if header[1] != VERSION:
    raise ShardError(f"{path}: version {header[1]}, expected {VERSION} "
                     "(uint16 tokens)")
  expected = _HEADER_BYTES + 2 * int(header[2])
  if size != expected:
    raise ShardError(
        f"{path}: header says {header[2]} tokens ({expected} bytes with the "
        f"header), the file has {size} bytes (truncated or corrupt)")
  return np.memmap(path, "<u2", mode="r", offset=_HEADER_BYTES,
                   shape=(int(header[2]),))


def open_shards(pattern: str) -> Tokens:
  """Every shard that the glob ``pattern`` matches, in sorted order.

  Raises:
    ShardError: when nothing matches, or a shard is bad (:func:`read_shard`).
  """
  paths = sorted(glob.glob(os.path.expanduser(pattern)))
  if not paths:
    raise ShardError(f"no token shards match {pattern!r} (relative to "
                     f"{os.getcwd()})")
  return Tokens(tuple(read_shard(p) for p in paths), tuple(paths))


def stdlib_corpus(val_every_nth_file: int = 10) -> tuple[Tokens, Tokens]:
  """Bytes of the standard library's top-level ``*.py`` files.

  The files of ``os.path.dirname(os.__file__)`` are sorted by name; every
  ``val_every_nth_file``-th one (starting with the first) is held out for
  validation, the rest is training text (about 4 MB in all on CPython 3.11).
  Each split is one array of the concatenated files.

  Args:
    val_every_nth_file: period of the held-out files.

  Returns:
    ``(train, val)`` :class:`Tokens` of byte values.

  Raises:
    ShardError: ``val_every_nth_file`` below 2 (nothing left to train on)
      or above half the number of files.
  """
  library = os.path.dirname(os.__file__)
  files = sorted(Path(library).glob("*.py"))
  if not 2 <= val_every_nth_file <= len(files) // 2:
    raise ShardError(
        f"val_every_nth_file={val_every_nth_file} "
        "(config.data.val_every_nth_file) must be from 2 to "
        f"{len(files) // 2}, for the {len(files)} sources in {library}")
  train, val = [], []
  for i, f in enumerate(files):
    (val if i % val_every_nth_file == 0 else train).append(f.read_bytes())
  as_tokens = lambda parts, name: Tokens(
      (np.frombuffer(b"".join(parts), np.uint8),), (name,))
  return (as_tokens(train, "standard library (train)"),
          as_tokens(val, "standard library (validation)"))


def _process_rows(batch_size: int, process_index: int,
                  process_count: int) -> slice:
  if batch_size % process_count:
    raise ValueError(f"batch size {batch_size} is not divisible by the "
                     f"{process_count} processes")
  per_process = batch_size // process_count
  return slice(process_index * per_process, (process_index + 1) * per_process)


def train_batch(tokens: Tokens, seed: int, step: int, batch_size: int,
                length: int, process_index: int = 0,
                process_count: int = 1) -> np.ndarray:
  """Training windows for ``step``: uniform over the pool, fixed by the seed.

  The positions of all ``batch_size`` windows are drawn from
  ``np.random.default_rng([seed, step])``; a process reads only its own
  contiguous share of the rows.

  Args:
    tokens: the training pool.
    seed: the run's data seed.
    step: the training step (any non-negative int).
    batch_size: windows in the global batch.
    length: tokens per window (context + 1).
    process_index, process_count: this process's share of the rows.

  Returns:
    int32 ``(batch_size // process_count, length)``.
  """
  rng = np.random.default_rng([seed, step])
  positions = rng.integers(0, tokens.num_windows(length), batch_size)
  rows = _process_rows(batch_size, process_index, process_count)
  return tokens.windows(positions[rows], length)


def eval_batches(tokens: Tokens, num_batches: int, batch_size: int,
                 length: int, process_index: int = 0,
                 process_count: int = 1) -> np.ndarray:
  """Fixed validation windows, spread evenly over the held-out pool.

  They depend on neither the seed nor the optimizer, so every run is
  evaluated on the same tokens.

  Returns:
    int32 ``(num_batches, batch_size // process_count, length)``.
  """
  positions = np.linspace(0, tokens.num_windows(length) - 1,
                          num_batches * batch_size).astype(np.int64)
  positions = positions.reshape(num_batches, batch_size)
  rows = _process_rows(batch_size, process_index, process_count)
  return tokens.windows(positions[:, rows], length)


def load_splits(train_files: str, val_files: str,
                val_every_nth_file: int) -> tuple[Tokens, Tokens]:
  """Token shards when ``train_files`` is set, else the standard library.

  Raises:
    ShardError: ``train_files`` without ``val_files``, or a bad shard or glob
      (:func:`open_shards`).
  """
  if not train_files:
    return stdlib_corpus(val_every_nth_file)
  if not val_files:
    raise ShardError("train_files is set but val_files is empty: give a glob "
                     "of held-out shards too")
  return open_shards(train_files), open_shards(val_files)
