"""GPT-2 medium (350M): ``gpt2_small.py`` with the larger model's settings.

Data: FineWeb 100B in the llm.c ``.bin`` format in ``data/fineweb100B/``
(``python dev/data/fineweb.py --version 100B`` in karpathy/llm.c).

  python examples/train_gpt2.py --config=configs/gpt2_medium.py

Like GPT-2 small it computes in bfloat16 with float32 parameters, gradients
and optimizer state (``model.dtype``; see ``gpt2_small.py``).

What changes from GPT-2 small, and where from:
[llm.c] karpathy/llm.c, scripts/run_gpt2_350M.sh: ``-e d24`` (24 layers,
  width 1024, 16 heads), ``-l 0.0003 -u 700 -q 0.0 -c 0.1 -n 2000
  -x 60000`` on fineweb100B, 524,288 tokens per step.
[modded] KellerJordan/modded-nanogpt,
  records/061525_GPT2MediumOptimizationLeaderboard/simple_train_gpt_medium.py
  (commit 00be17d): the GPT-2-medium track uses the same Muon and AdamW
  settings as the small baseline (Muon lr 0.025, weight decay 0.01; AdamW
  betas 0.8/0.95, head rate 1/320; linear decay over the last 70%), so
  Muon and NorMuon keep gpt2_small's.
[pion] Sphere-AI-Lab/pion, megatron-lm/opt_llama_1.3B_pion.sh: lr 5e-4 for
  the larger model (1e-3 at 60M).
"""

import pathlib
import runpy

import ml_collections

STEPS = 60_000  # [llm.c] -x 60000: 31.5B tokens

_small = runpy.run_path(str(pathlib.Path(__file__).with_name("gpt2_small.py")))


def get_config() -> ml_collections.ConfigDict:
  """gpt2_small's config with [llm.c]'s 350M run and [pion]'s larger rate."""
  config = _small["get_config"]()
  config.steps = STEPS
  config.workdir = "runs/gpt2_medium"
  config.checkpoint_every = 2000  # [llm.c] -n 2000
  config.model.width = 1024
  config.model.num_layers = 24
  config.model.num_heads = 16
  config.data.train_files = "data/fineweb100B/fineweb_train_*.bin"
  config.data.val_files = "data/fineweb100B/fineweb_val_*.bin"
  config.optimizer.adamw.learning_rate = 3e-4  # [llm.c] -l 0.0003
  config.optimizer.adamw.warmup_frac = 700 / STEPS  # [llm.c] -u 700
  config.optimizer.pion.learning_rate = 5e-4  # [pion], 1.3B
  config.optimizer.pion.adam_learning_rate = 5e-4
  return config
