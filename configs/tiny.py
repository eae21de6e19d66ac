"""The CPU default: a 2-layer, 128-wide byte-level GPT on standard-library text.

AdamW, Muon and NorMuon for 300 steps of 32 windows of 64 bytes each take a
few minutes together on 2 CPU cores (see BUILD.md for the measured figures).

  python examples/train_gpt2.py --config=configs/tiny.py

``model.dtype`` is the compute dtype, float32 here; with
``--config.model.dtype=bfloat16`` the matrix products, the attention and the
activations run in bfloat16 as in the GPT-2 configs, while the parameters,
their gradients and the optimizer's state stay float32
(``examples/gpt2_model.py`` lists what else does). Muon's bfloat16 run ends
within 0.005 nats/byte of its float32 one at 300 steps (seeds 0-2; README.md,
"Mixed precision").

The learning rates and betas were tuned by sweeps at this size and 300 steps
(validation loss at the last step, nats/byte; "3 seeds" is the mean of seeds
0-2; AdamW's loss varies by about 0.05 from seed to seed):

* adamw, b2=0.95: learning rates 2e-3, 4e-3, 8e-3 at b1 = 0.9, 0.8, 0.7,
  then 3e-3 and 6e-3 at b1 = 0.8 (seed 0); b1=0.9 was worst at every rate
  (2.37 at best), 8e-3 worst at every b1. The three best, on 3 seeds: b1=0.7
  at 3e-3 2.08, b1=0.7 at 2e-3 2.12, b1=0.8 at 3e-3 2.15; b1=0.5 at 3e-3 was
  worse (2.14 on seeds 0-1). Earlier, coarser sweeps found b2=0.99, weight
  decay 0.1 and a 20% warmup no better.
* muon / normuon: 0.01, 0.02, 0.04 and 0.08 for the hidden matrices
  (momentum 0.95; seed 0), then 0.02 against 0.04 on 3 seeds: Muon 1.76 /
  1.77, NorMuon 1.75 / 1.75; 0.01 and 0.08 were worse by 0.1 or more. 0.02 is
  also the usual Muon rate.
* pion: 0.05, 0.02, 0.01, 0.005, 0.0025 at 200 steps, seed 0: validation
  loss 2.66, 2.38, 2.24, 2.20, 2.22 (AdamW 2.36, Muon 2.03 there). Its
  first-order update has RMS lr * 0.2, so 0.005 moves the matrices by RMS
  1e-3 per step.

(These sweeps ran with ``examples/tiny_lm.py``, this example's predecessor,
now removed: the same model and schedule, batches drawn on the device.)

The adaptive family (2026-11-26, this script, 300 steps, seed 0; each
``python examples/train_gpt2.py --config=configs/tiny.py --optimizers=NAME
--config.optimizer.learning_rate=LR``), rates in factors of 2 around each
method's own scale until the best had worse neighbours on both sides:

* namo: 0.005 2.01, 0.01 1.96, 0.02 1.87, 0.04 1.76, 0.08 1.77. Its step is
  ``lr * c * 0.2 sqrt(max(fan_in, fan_out))`` with ``c`` below 1 when the
  gradients are noisy, hence a rate above Muon's.
* namo_d: 0.02 1.86, 0.04 1.76, 0.08 1.80.
* adamuon (the released code's form, its default): 0.006 1.75, 0.012 1.71,
  0.024 1.86; with the paper's sign step (``sign=True``): 0.003 1.97, 0.006
  1.95, 0.012 2.04, 0.024 2.30 (RMS 0.2 updates, so AdamW-like rates).
* root: 0.006 1.77, 0.012 1.76, 0.024 1.83 (the Moonlight scale, as NAMO).
* auon: 0.00625 2.10, 0.0125 2.07, 0.025 2.05, 0.05 2.12, 0.1 2.30, 0.2 2.54,
  0.4 2.59 (the paper's update has RMS ``lr * shape / sqrt(N)``).
* hybrid_auon: 0.01 1.83, 0.02 1.76, 0.04 1.76, 0.08 1.97 (no shape scale:
  Muon's rate).

The structured updates (issue 15; the same protocol, 2026-11-26):

* dion (full rank): 0.01 1.81, 0.02 1.79, 0.04 1.83 (Dion's sqrt(fan_out /
  fan_in) scale, near Muon's).
* aro: 0.003 1.84, 0.006 1.79, 0.012 1.75, 0.024 1.90 (RMS 0.2 updates).
* poet: 0.001 1.99, 0.002 1.98, 0.004 1.98, 0.008 2.71, 0.016 3.12 (the
  rate of Adam on the rotations' generators, times 0.5).
* fismo (factors refreshed every 10 steps): 0.01 1.70, 0.02 1.64, 0.04
  1.68.
* muon_clip: 0.006 1.76, 0.012 1.71, 0.024 1.82 (the Moonlight scale, as
  ROOT).

The AdamW part of every orthax method (embeddings, head, norms, biases) uses
AdamW's rate and betas, so the only difference from the baseline is the
update of the hidden matrices. No weight decay anywhere: a run sees a
fraction of one epoch of the corpus, so there is nothing to regularize, and
the comparison stays about the direction of the update.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """The tiny byte-level run."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.steps = 300
  config.batch_size = 32  # windows per step, over all devices
  config.microbatches = 1  # gradient accumulation: batch_size / microbatches
  config.optimizers = "adamw,muon,normuon"
  config.workdir = "runs/tiny"
  config.eval_every = 25
  config.eval_batches = 8
  config.log_every = 1
  config.checkpoint_every = 0  # 0: no checkpoints
  config.keep_checkpoints = 2

  config.model = ml_collections.ConfigDict(dict(
      vocab_size=256,  # bytes
      padded_vocab_size=256,
      context=64,
      width=128,
      num_layers=2,
      num_heads=4,
      mlp_ratio=4,
      tie_embeddings=False,
      dtype="float32",  # compute; parameters and optimizer state are f32
  ))
  # No train_files: the standard library's source, every 10th file held out.
  config.data = ml_collections.ConfigDict(dict(
      train_files="", val_files="", val_every_nth_file=10))
  config.mesh = ml_collections.ConfigDict(dict(data=1))

  # Every method: linear warmup over 5% of the steps, then a cosine decay to
  # 10% of the peak.
  schedule = dict(warmup_frac=0.05, cooldown_frac=1.0, decay="cosine",
                  end_lr_frac=0.1, grad_clip=0.0)
  adam = dict(adam_learning_rate=3e-3, adam_b1=0.7, adam_b2=0.95,
              adam_eps=1e-8, adam_weight_decay=0.0)
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=config_dict.placeholder(float),  # sweeps: all methods
      adamw=dict(learning_rate=3e-3, b1=0.7, b2=0.95, eps=1e-8,
                 weight_decay=0.0, **schedule),
      muon=dict(learning_rate=0.02, momentum=0.95, weight_decay=0.0,
                **adam, **schedule),
      normuon=dict(learning_rate=0.02, momentum=0.95, beta2=0.95,
                   weight_decay=0.0, **adam, **schedule),
      pion=dict(learning_rate=0.005, b1=0.9, b2=0.999, **adam, **schedule),
      # The adaptive family: the methods' own defaults but for the rate
      # (swept, above) and no weight decay, like the others here.
      namo=dict(learning_rate=0.04, momentum=0.95, weight_decay=0.0,
                **adam, **schedule),
      namo_d=dict(learning_rate=0.04, momentum=0.95, weight_decay=0.0,
                  **adam, **schedule),
      adamuon=dict(learning_rate=0.012, momentum=0.95, weight_decay=0.0,
                   **adam, **schedule),
      root=dict(learning_rate=0.012, momentum=0.95, weight_decay=0.0,
                **adam, **schedule),
      auon=dict(learning_rate=0.025, momentum=0.95, weight_decay=0.0,
                **adam, **schedule),
      hybrid_auon=dict(learning_rate=0.02, momentum=0.95, weight_decay=0.0,
                       **adam, **schedule),
      # Low-rank, rotated and whitened updates (issue 15): the methods' own
      # defaults but for the rate (swept, above) and no weight decay.
      dion=dict(learning_rate=0.02, mu=0.95, weight_decay=0.0,
                **adam, **schedule),
      aro=dict(learning_rate=0.012, momentum=0.95, weight_decay=0.0,
               **adam, **schedule),
      poet=dict(learning_rate=2e-3, **adam, **schedule),
      # FISMO refreshes its Kronecker factors (two eigh per matrix) every
      # 10 steps: refreshed every step, its update of this model took 40
      # times Muon's on a 2-core CPU (1.08 s against 0.026 s, jitted).
      fismo=dict(learning_rate=0.02, momentum=0.95, weight_decay=0.0,
                 update_every=10, **adam, **schedule),
      # Moonlight's Muon with QK-clip at Kimi K2's threshold.
      muon_clip=dict(learning_rate=0.012, momentum=0.95, weight_decay=0.0,
                     threshold=100.0, **adam, **schedule),
  ))
  return config
