"""Train a tiny byte-level GPT with AdamW, Muon and NorMuon and compare them.

The corpus is the Python standard library's own source code (no downloads),
the model a small pre-LayerNorm GPT decoder in Flax NNX, and the optimizers
``optax.adamw``, ``orthax.muon`` and ``orthax.normuon``. Run it as a script::

  python examples/tiny_lm.py --steps 300 --optimizers adamw,muon,normuon \
      --out runs/quickstart

which prints a table of final losses and writes ``metrics.json`` and
``val_loss.png`` into ``--out``; or import it and call :func:`train`.

Muon and NorMuon orthogonalize the update of every hidden 2-D matrix (the
attention and MLP kernels). The token and position embeddings (named
``*_embed``) and the output head (``lm_head``) are routed to AdamW by
:mod:`orthax.labels`, as are LayerNorm scales and biases.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import orthax

__all__ = [
    "Config",
    "GPT",
    "LEARNING_RATES",
    "OPTIMIZERS",
    "load_corpus",
    "make_optimizer",
    "train",
]

OPTIMIZERS = ("adamw", "muon", "normuon", "pion")
# What the script compares by default (the Quickstart); pion on request.
DEFAULT_COMPARISON = ("adamw", "muon", "normuon")
VOCAB_SIZE = 256  # bytes

# Hyper-parameters, chosen by sweeps at the default Config and 300 steps
# (validation loss at the last step, nats/byte; "3 seeds" is the mean of
# seeds 0-2; AdamW's loss varies by about 0.05 from seed to seed):
# * adamw, b2=0.95: learning rates 2e-3, 4e-3, 8e-3 at b1 = 0.9, 0.8, 0.7,
#   then 3e-3 and 6e-3 at b1 = 0.8 (seed 0); b1=0.9 was worst at every rate
#   (2.37 at best), 8e-3 worst at every b1. The three best, on 3 seeds:
#   b1=0.7 at 3e-3 2.08, b1=0.7 at 2e-3 2.12, b1=0.8 at 3e-3 2.15; b1=0.5 at
#   3e-3 was worse (2.14 on seeds 0-1). Earlier, coarser sweeps found
#   b2=0.99, weight decay 0.1 and a 20% warmup no better.
# * muon / normuon: 0.01, 0.02, 0.04 and 0.08 for the hidden matrices
#   (shape_scale="muon", momentum 0.95; seed 0), then 0.02 against 0.04 on
#   3 seeds: Muon 1.76 / 1.77, NorMuon 1.75 / 1.75; 0.01 and 0.08 were
#   worse by 0.1 or more. 0.02 is also the usual Muon rate.
# The AdamW part of Muon and NorMuon (embeddings, head, norms, biases) uses
# AdamW's rate and betas, so the only difference from the baseline is the
# update of the hidden matrices.
# * pion: 0.05, 0.02, 0.01, 0.005, 0.0025 at 200 steps, seed 0: validation
#   loss 2.66, 2.38, 2.24, 2.20, 2.22 (AdamW 2.36, Muon 2.03 there). Its
#   first-order update has RMS lr * 0.2 (rms_scale), so 0.005 moves the
#   matrices by RMS 1e-3 per step.
PION_LR = 0.005
LEARNING_RATES = {"adamw": 3e-3, "muon": 0.02, "normuon": 0.02, "pion": PION_LR}
ADAM_B1, ADAM_B2 = 0.7, 0.95
# No weight decay anywhere: a run sees a fraction of one epoch of the corpus,
# so there is nothing to regularize, and the comparison stays about the
# direction of the update.
WEIGHT_DECAY = 0.0


@dataclasses.dataclass(frozen=True)
class Config:
  """Model, data and evaluation settings.

  Attributes:
    context: tokens (bytes) per sequence.
    d_model: width of the residual stream.
    num_layers: transformer blocks.
    num_heads: attention heads (must divide ``d_model``).
    mlp_ratio: hidden width of the MLP, in multiples of ``d_model``.
    batch_size: sequences per training and validation batch.
    warmup_frac: fraction of the steps spent in linear learning-rate warmup,
      before a cosine decay to ``end_lr_frac`` of the peak.
    end_lr_frac: final learning rate as a fraction of the peak.
    eval_every: steps between validation evaluations (the last step is
      always evaluated).
    eval_batches: validation batches per evaluation (always the same ones).
    val_every_nth_file: every n-th standard-library file is held out for
      validation.
  """

  context: int = 64
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  mlp_ratio: int = 4
  batch_size: int = 32
  warmup_frac: float = 0.05
  end_lr_frac: float = 0.1
  eval_every: int = 25
  eval_batches: int = 8
  val_every_nth_file: int = 10


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def load_corpus(val_every_nth_file: int = 10) -> tuple[np.ndarray, np.ndarray]:
  """Byte-level corpus from the standard library's top-level ``*.py`` files.

  The files of ``os.path.dirname(os.__file__)`` are sorted by name; every
  ``val_every_nth_file``-th one (starting with the first) is held out for
  validation, the rest is training text (about 4 MB in all on CPython 3.11).

  Args:
    val_every_nth_file: period of the held-out files.

  Returns:
    ``(train, val)``, two ``uint8`` arrays of concatenated file bytes.
  """
  files = sorted(Path(os.path.dirname(os.__file__)).glob("*.py"))
  if len(files) < 2 * val_every_nth_file:
    raise RuntimeError(f"too few standard-library sources in {files!r}")
  train, val = [], []
  for i, f in enumerate(files):
    (val if i % val_every_nth_file == 0 else train).append(f.read_bytes())
  return (np.frombuffer(b"".join(train), np.uint8),
          np.frombuffer(b"".join(val), np.uint8))


def _windows(data: jax.Array, starts: jax.Array, length: int) -> jax.Array:
  """Rows ``data[s:s + length]`` for each ``s`` in ``starts``, as int32."""
  return jax.vmap(lambda s: jax.lax.dynamic_slice(data, (s,), (length,)))(
      starts).astype(jnp.int32)


def _sample_batch(data: jax.Array, key: jax.Array, config: Config) -> jax.Array:
  """A ``(batch_size, context + 1)`` batch of random windows of ``data``."""
  starts = jax.random.randint(key, (config.batch_size,), 0,
                              data.shape[0] - config.context - 1)
  return _windows(data, starts, config.context + 1)


def _validation_batches(val: np.ndarray, config: Config) -> jax.Array:
  """Fixed validation batches: windows evenly spread over the held-out text.

  They depend on neither the seed nor the optimizer, so every run is
  evaluated on the same bytes.
  """
  n = config.eval_batches * config.batch_size
  starts = np.linspace(0, len(val) - config.context - 1, n).astype(np.int32)
  rows = _windows(jnp.asarray(val), jnp.asarray(starts), config.context + 1)
  return rows.reshape(config.eval_batches, config.batch_size, -1)


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention with separate Q, K, V, O projections.

  Separate ``(d_model, d_model)`` kernels make each projection its own
  hidden matrix for Muon, rather than one fused ``(d_model, 3 d_model)``.
  """

  def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs):
    if d_model % num_heads:
      raise ValueError(f"num_heads={num_heads} must divide d_model={d_model}")
    self.num_heads = num_heads
    self.query = nnx.Linear(d_model, d_model, rngs=rngs)
    self.key = nnx.Linear(d_model, d_model, rngs=rngs)
    self.value = nnx.Linear(d_model, d_model, rngs=rngs)
    self.out = nnx.Linear(d_model, d_model, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    heads = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
    y = jax.nn.dot_product_attention(
        heads(self.query(x)), heads(self.key(x)), heads(self.value(x)),
        is_causal=True)
    return self.out(y.reshape(b, t, d))


class MLP(nnx.Module):
  """Two-layer GELU feed-forward network."""

  def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs):
    self.up = nnx.Linear(d_model, hidden, rngs=rngs)
    self.down = nnx.Linear(hidden, d_model, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(nnx.gelu(self.up(x)))


class Block(nnx.Module):
  """Pre-LayerNorm block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    d = config.d_model
    self.attn_norm = nnx.LayerNorm(d, rngs=rngs)
    self.attn = CausalSelfAttention(d, config.num_heads, rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(d, rngs=rngs)
    self.mlp = MLP(d, config.mlp_ratio * d, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x))
    return x + self.mlp(self.mlp_norm(x))


class GPT(nnx.Module):
  """Byte-level GPT decoder: embeddings, pre-LN blocks, final LN, untied head.

  The embeddings' attribute names contain ``"embed"`` and the head is
  ``lm_head``, so orthax's default labels give them to AdamW; every other
  2-D kernel is a ``(fan_in, fan_out)`` hidden matrix. Embeddings start at
  GPT-2's N(0, 0.02²), hidden kernels at Flax's LeCun normal default.
  """

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(stddev=0.02)
    self.token_embed = nnx.Embed(VOCAB_SIZE, config.d_model,
                                 embedding_init=init, rngs=rngs)
    self.position_embed = nnx.Embed(config.context, config.d_model,
                                    embedding_init=init, rngs=rngs)
    self.blocks = nnx.List([Block(config, rngs=rngs)
                            for _ in range(config.num_layers)])
    self.final_norm = nnx.LayerNorm(config.d_model, rngs=rngs)
    # A zero head starts every run at the uniform prediction, loss ln(256).
    self.lm_head = nnx.Linear(config.d_model, VOCAB_SIZE, use_bias=False,
                              kernel_init=nnx.initializers.zeros, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Logits ``(batch, time, 256)`` for int tokens ``(batch, time)``."""
    x = self.token_embed(tokens) + self.position_embed(
        jnp.arange(tokens.shape[1]))
    for block in self.blocks:
      x = block(x)
    return self.lm_head(self.final_norm(x))


def _loss(model: GPT, batch: jax.Array) -> jax.Array:
  """Mean next-byte cross-entropy (nats) of a ``(batch, context + 1)`` batch."""
  logits = model(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), batch[:, 1:]).mean()


# ---------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------


def make_optimizer(name: str, steps: int, config: Config = Config(), *,
                   learning_rate: float | None = None,
                   ) -> optax.GradientTransformation:
  """``adamw``, ``muon``, ``normuon`` or ``pion`` with this example's settings.

  All three use the same schedule shape: linear warmup over
  ``config.warmup_frac`` of the steps, then cosine decay to
  ``config.end_lr_frac`` of the peak.

  Args:
    name: one of :data:`OPTIMIZERS`.
    steps: training steps (the schedule's length).
    config: supplies the schedule's shape.
    learning_rate: peak learning rate (of the hidden matrices for Muon and
      NorMuon); defaults to :data:`LEARNING_RATES`.

  Returns:
    An :class:`optax.GradientTransformation`.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; expected one of "
                     f"{OPTIMIZERS}")

  def schedule(peak):
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup_steps=max(1, round(config.warmup_frac * steps)),
        decay_steps=steps, end_value=config.end_lr_frac * peak)

  lr = schedule(LEARNING_RATES[name] if learning_rate is None
                else learning_rate)
  if name == "adamw":
    return optax.adamw(lr, b1=ADAM_B1, b2=ADAM_B2, weight_decay=WEIGHT_DECAY)
  adam = dict(adam_learning_rate=schedule(LEARNING_RATES["adamw"]),
              adam_b1=ADAM_B1, adam_b2=ADAM_B2)
  if name == "pion":  # rotations keep the spectrum: no weight decay
    return orthax.pion(lr, **adam)
  return getattr(orthax, name)(lr, weight_decay=WEIGHT_DECAY, **adam)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def train(optimizer: str | optax.GradientTransformation, *, steps: int,
          seed: int = 0, config: Config = Config(),
          learning_rate: float | None = None, progress: bool = False,
          corpus: tuple[np.ndarray, np.ndarray] | None = None,
          ) -> dict[str, Any]:
  """Trains a fresh :class:`GPT` and records its losses.

  The model's initialization and the training batches are fixed by ``seed``;
  the validation batches are the same for every seed and optimizer.

  Args:
    optimizer: a name from :data:`OPTIMIZERS` (built by
      :func:`make_optimizer`) or any optax transformation.
    steps: training steps.
    seed: seed of the initialization and of the batch sampling (two
      independent keys split from it).
    config: model, data and evaluation settings.
    learning_rate: peak learning rate when ``optimizer`` is a name.
    progress: show a tqdm progress bar.
    corpus: ``(train, val)`` byte arrays; :func:`load_corpus` by default.

  Returns:
    A dict with ``optimizer`` (the name, or ``"custom"``), ``steps``,
    ``seed``, ``train_loss`` (one float per step), ``eval_steps`` and
    ``val_loss`` (the validation loss after those many steps, 0 and
    ``steps`` included), ``final_train_loss`` (mean of the last
    ``config.eval_every`` training losses), ``final_val_loss`` and
    ``seconds_per_step`` (wall time of the training steps after the first,
    which includes compilation).
  """
  if steps < 1:
    raise ValueError(f"steps must be positive, got {steps}")
  if isinstance(optimizer, str):
    name, tx = optimizer, make_optimizer(optimizer, steps, config,
                                         learning_rate=learning_rate)
  else:
    name, tx = "custom", optimizer
  if corpus is None:
    corpus = load_corpus(config.val_every_nth_file)
  train_bytes, val_bytes = corpus
  train_data = jnp.asarray(train_bytes)
  val_batches = _validation_batches(val_bytes, config)

  # Separate keys: nnx.Rngs(seed) draws fold_in(key(seed), i), so batches
  # drawn from fold_in(key(seed), step) would reuse the init's random bits.
  init_key, data_key = jax.random.split(jax.random.key(seed))
  graphdef, params = nnx.split(GPT(config, rngs=nnx.Rngs(init_key)),
                               nnx.Param)
  opt_state = tx.init(params)

  def loss_fn(params, batch):
    return _loss(nnx.merge(graphdef, params), batch)

  @jax.jit
  def train_step(params, opt_state, train_data, key):
    batch = _sample_batch(train_data, key, config)
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def evaluate(params, val_batches):
    return jax.lax.map(lambda b: loss_fn(params, b), val_batches).mean()

  train_loss, eval_steps = [], [0]
  val_loss = [float(evaluate(params, val_batches))]
  step_time = 0.0
  bar = tqdm(range(1, steps + 1), desc=name, disable=not progress)
  for step in bar:
    start = time.perf_counter()
    params, opt_state, loss = train_step(
        params, opt_state, train_data, jax.random.fold_in(data_key, step))
    train_loss.append(float(loss))
    if step > 1:
      step_time += time.perf_counter() - start
    if step % config.eval_every == 0 or step == steps:
      eval_steps.append(step)
      val_loss.append(float(evaluate(params, val_batches)))
      bar.set_postfix(train=f"{train_loss[-1]:.3f}", val=f"{val_loss[-1]:.3f}")
  bar.close()
  return {
      "optimizer": name,
      "steps": steps,
      "seed": seed,
      "train_loss": train_loss,
      "eval_steps": eval_steps,
      "val_loss": val_loss,
      "final_train_loss": float(np.mean(train_loss[-config.eval_every:])),
      "final_val_loss": val_loss[-1],
      "seconds_per_step": step_time / max(1, steps - 1),
  }


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _plot(results: list[dict[str, Any]], path: Path) -> None:
  """Validation loss against step, one line per optimizer."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for r in results:
    ax.plot(r["eval_steps"], r["val_loss"], marker=".", label=r["optimizer"])
  # Zoom past step 0 (ln 256 for every run) onto where the curves differ.
  low = min(min(r["val_loss"]) for r in results)
  high = max(r["val_loss"][1] for r in results)
  ax.set_ylim(low - 0.05, high + 0.1)
  ax.set_xlabel("step")
  ax.set_ylabel("validation loss (nats/byte)")
  ax.set_title("tiny byte-level GPT on the Python standard library")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  """Command-line entry point; returns the results of :func:`train`."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=300,
                      help="training steps per optimizer (default: 300, "
                           "about 2 minutes for all three on 2 CPU cores)")
  parser.add_argument("--optimizers", default=",".join(DEFAULT_COMPARISON),
                      help="comma-separated subset of "
                           f"{','.join(OPTIMIZERS)} (default: "
                           f"{','.join(DEFAULT_COMPARISON)})")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=Path, default=Path("runs/quickstart"),
                      help="directory for metrics.json and val_loss.png")
  args = parser.parse_args(argv)
  names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
  unknown = sorted(set(names) - set(OPTIMIZERS))
  if unknown:
    parser.error(f"unknown optimizers {unknown}; choose from {OPTIMIZERS}")

  config = Config()
  corpus = load_corpus(config.val_every_nth_file)
  print(f"corpus: {len(corpus[0]):,} train bytes, {len(corpus[1]):,} "
        f"validation bytes; {jax.device_count()} {jax.default_backend()} "
        "device(s)")
  results = [train(n, steps=args.steps, seed=args.seed, config=config,
                   corpus=corpus, progress=sys.stderr.isatty())
             for n in names]

  print(f"\n{'optimizer':<10} {'train loss':>10} {'val loss':>10} "
        f"{'s/step':>8}")
  for r in results:
    print(f"{r['optimizer']:<10} {r['final_train_loss']:>10.4f} "
          f"{r['final_val_loss']:>10.4f} {r['seconds_per_step']:>8.4f}")

  args.out.mkdir(parents=True, exist_ok=True)
  metrics = {"config": dataclasses.asdict(config),
             "learning_rates": {n: LEARNING_RATES[n] for n in names},
             "adam_betas": [ADAM_B1, ADAM_B2],
             "results": results}
  (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
  _plot(results, args.out / "val_loss.png")
  print(f"wrote {args.out / 'metrics.json'} and {args.out / 'val_loss.png'}")
  return results


if __name__ == "__main__":
  main()
