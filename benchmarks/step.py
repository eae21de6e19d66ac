"""Benchmark: one full optimizer step on the GPT-2 parameter tree, as ratios.

Times ``jit(update + apply_updates)`` on GPT-2 small's parameters (124M:
token and position embeddings, 12 pre-LN blocks, tied head) for

* ``orthax.muon`` and ``orthax.normuon`` (defaults: Polar Express, Gram
  Newton–Schulz where it saves FLOPs; embeddings, norms and biases go to
  AdamW, as :func:`orthax.route` decides);
* ``optax.contrib.muon`` routed the same way (``muon_weight_dimension_numbers``
  from ``orthax.routing.dimension_numbers``: ``None`` for the embeddings,
  biases and norms): the fair comparison;
* ``optax.contrib.muon`` with its defaults, which orthogonalizes every 2-D
  parameter, the 50257×768 token embedding included;
* ``optax.adamw``.

Every time is divided by the same-routing optax Muon step's, measured in the
same process (absolute CPU times on shared machines mean little). Prints a
table and writes JSON. ``--quick`` uses a 2-layer, 64-wide model (the test
suite runs it).

  python benchmarks/step.py [--quick] [--reps 3] [--out runs/bench/step.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import orthax
from harness import median_seconds, write_json

# (vocab, context, width, layers)
MODELS = {"gpt2_small": (50257, 1024, 768, 12),
          "gpt2_medium": (50257, 1024, 1024, 24), "quick": (256, 64, 64, 2)}
LR = 0.02


def gpt2_params(vocab: int, context: int, width: int, layers: int,
                seed: int = 0) -> dict:
  """GPT-2's parameter tree (names as in the Hugging Face checkpoint)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(0.02 * rng.normal(size=shape), jnp.float32)
  norm = lambda: {"scale": jnp.ones(width), "bias": jnp.zeros(width)}
  dense = lambda fi, fo: {"kernel": normal(fi, fo), "bias": jnp.zeros(fo)}
  params = {"wte": {"embedding": normal(vocab, width)},
            "wpe": {"embedding": normal(context, width)},
            "ln_f": norm()}
  for i in range(layers):
    params[f"h_{i}"] = {
        "ln_1": norm(), "ln_2": norm(),
        "attn": {"c_attn": dense(width, 3 * width),
                 "c_proj": dense(width, width)},
        "mlp": {"c_fc": dense(width, 4 * width),
                "c_proj": dense(4 * width, width)},
    }
  return params


def _same_routing(params):
  """orthax's routing as optax's dimension numbers (``None``: Adam)."""
  return orthax.routing.dimension_numbers(orthax.route(params))


def optimizers(params) -> dict[str, optax.GradientTransformation]:
  return {
      "optax.contrib.muon (same routing)": optax.contrib.muon(
          LR, adam_learning_rate=3e-4,
          muon_weight_dimension_numbers=_same_routing(params)),
      "optax.contrib.muon (defaults: every 2-D leaf)": optax.contrib.muon(
          LR, adam_learning_rate=3e-4),
      "orthax.muon": orthax.muon(LR, adam_learning_rate=3e-4),
      "orthax.normuon": orthax.normuon(LR, adam_learning_rate=3e-4),
      "optax.adamw": optax.adamw(3e-4),
  }


def jitted_step(tx, **extra):
  """``jit(update + apply_updates)`` of ``tx``; ``extra``: keyword arguments
  of its update (``max_logits=`` of :func:`orthax.muon_clip`)."""
  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  return step


def time_step(tx, params, grads, reps: int) -> float:
  return median_seconds(jitted_step(tx), params, tx.init(params), grads,
                        reps=reps)


def run(model: str, reps: int) -> list[dict]:
  params = gpt2_params(*MODELS[model])
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape),
                       params)
  times = {name: time_step(tx, params, grads, reps)
           for name, tx in optimizers(params).items()}
  base = times["optax.contrib.muon (same routing)"]
  n = sum(x.size for x in jax.tree.leaves(params))
  return [dict(model=model, params=n, optimizer=name, time_s=t,
               vs_optax_muon=t / base) for name, t in times.items()]


def print_table(rows) -> None:
  header = f"{'optimizer':46} {'time s':>9} {'vs optax muon (same routing)':>29}"
  print(f"{rows[0]['model']}: {rows[0]['params'] / 1e6:.1f}M parameters")
  print(header)
  print("-" * len(header))
  for r in rows:
    print(f"{r['optimizer']:46} {r['time_s']:9.3f} {r['vs_optax_muon']:29.2f}")


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="a tiny model, one repetition (smoke test)")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--out", type=Path, default=Path("runs/bench/step.json"))
  args = parser.parse_args(argv)
  rows = run("quick" if args.quick else "gpt2_small",
             1 if args.quick else args.reps)
  print_table(rows)
  write_json(args.out, rows)
  return rows


if __name__ == "__main__":
  main()
