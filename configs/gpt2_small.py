"""GPT-2 small (124M) on FineWeb, with published hyper-parameters per method.

Data: GPT-2-tokenized FineWeb shards in the llm.c ``.bin`` format, in
``data/fineweb10B/`` relative to where you run. Either
``python dev/data/fineweb.py --version 10B`` in karpathy/llm.c, or
``python data/cached_fineweb10B.py 103`` in KellerJordan/modded-nanogpt
(100M tokens per shard) writes them.

  python examples/train_gpt2.py --config=configs/gpt2_small.py

Sized as the published runs: 512 sequences of 1024 tokens per step, 64 per
GPU on 8 GPUs of 80 GB. On fewer devices, accumulate gradients:
``--config.microbatches=8`` (one H100) keeps the same step.

Mixed precision: ``model.dtype="bfloat16"`` is the compute dtype of the
matrix products, the attention and the activations, as llm.c and
modded-nanogpt train in bfloat16; the parameters, their gradients and the
optimizer's state stay float32, and so does the Newton-Schulz iteration of
the orthax methods (this example passes no ``compute_dtype``).
``examples/gpt2_model.py`` lists what else stays float32.

Sources, cited per setting below:
[llm.c] karpathy/llm.c, scripts/run_gpt2_124M.sh (the GPT-2 124M
  reproduction: ``-b 64 -t 1024 -d 524288 -l 0.0006 -u 700 -q 0.0 -c 0.1
  -v 250 -n 5000``, 18,865 steps for 10B tokens) and train_gpt2.cu (AdamW
  betas 0.9/0.95, eps 1e-8, gradient clipping at norm 1; weight decay on the
  matrices only). GPT-2's vocabulary of 50257 is padded to 50304 there.
[modded] KellerJordan/modded-nanogpt,
  records/track_2_medium/OptimizationLeaderboard/simple_train_gpt_medium.py
  at commit 007191a, whose baseline is a 12-layer, 768-wide GPT trained with
  Muon: lr 0.025, weight decay 0.01, momentum 0.95; AdamW for the rest with
  betas 0.8/0.95, eps 1e-10 and rates 1/320 (head), 0.3 (embedding), 0.015
  (scalars); 4500 steps of 524,288 tokens, constant rate then a linear
  decay to 0 over the last 70%; no clipping.
[normuon] zichongli5/NorMuon, normuon.py: the defaults lr 0.02, momentum
  0.95, beta2 0.95.
[pion] Sphere-AI-Lab/pion, megatron-lm/opt_llama_60M_pion.sh: lr 1e-3 decayed
  by a cosine to 1e-5 with no warmup, Pion and Adam betas 0.9/0.95, rms 0.2,
  clipping at 1 (its 1.3B script uses lr 5e-4). No GPT-2-size Pion recipe was
  found; these are from the nearest published model.
[namo] minxin-zhg/namo, src/hydra_configs/optim/namo.yaml and namo-d.yaml
  (GPT-2 small runs; the AdamW part uses the same rate, betas 0.9/0.95).
[adamuon] Chongjie-Si/AdaMuon, gpt2/models/train.py (AdamW-matched rate).
[root] huawei-noah/noah-research, ROOT/examples/example_train.py (a 16-layer
  toy Llama; no GPT-2 run was published).
[auon] ryyzn9/AuON: paper v1 table settings (AuON) and training/config.py
  (HybridAuON). None of these ran GPT-2 small for 10B tokens; treat them as
  starting points, not tuned values.
[dion] microsoft/dion@0a059a4, configs/dion_160m.yaml: lr 0.02, rank
  fraction 0.5, mu 0.95, decay 0.01.
[aro] microsoft/dion, branch dev/aro, dion/aro.py: momentum 0.95, decay
  0.01; its lr 0.01 goes with a 0.2 sqrt(max) step scale, 55 times the RMS
  0.2 of orthax.aro, so the rate here is AdamW's ([llm.c]), as the paper's
  RMS-matched protocol intends.
[poet] Sphere-AI-Lab/poet@3a34bb6, poet_torch/config.py: poet_lr 5e-4 (x
  poet_scale 0.5 inside the transform), base lr 1e-3, block 256, merge
  every 200, no decay.
[moonlight] MoonshotAI/Moonlight, examples/toy_train.py: MuonClip's Muon
  (0.2 sqrt(max) scale, decay 0.1, AdamW betas 0.9/0.95 at the same rate);
  Kimi K2's threshold 100 (arXiv:2507.20534).
FISMO has no published code or settings: Muon's rate, [modded]'s AdamW part,
and a factor refresh every 10 steps (orthax.fismo's docstring).
"""

import ml_collections
from ml_collections import config_dict

STEPS = 18_865  # [llm.c] 10B tokens at 524,288 tokens per step


def get_config() -> ml_collections.ConfigDict:
  """GPT-2 small; each method's settings from its source."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.steps = STEPS
  config.batch_size = 512  # [llm.c] -d 524288 = 512 x 1024 tokens
  config.microbatches = 1
  config.optimizers = "adamw,muon,normuon"
  config.workdir = "runs/gpt2_small"
  config.eval_every = 250  # [llm.c] -v 250
  # 20 x 512 x 1024 = 10,485,760 tokens: [modded]'s fixed validation set.
  config.eval_batches = 20
  config.log_every = 10
  config.checkpoint_every = 5000  # [llm.c] -n 5000
  config.keep_checkpoints = 2

  config.model = ml_collections.ConfigDict(dict(
      vocab_size=50257,  # GPT-2's tokenizer
      padded_vocab_size=50304,  # [llm.c]: a multiple of 128
      context=1024,
      width=768,
      num_layers=12,
      num_heads=12,
      mlp_ratio=4,
      tie_embeddings=True,  # GPT-2 ties the head to wte
      dtype="bfloat16",  # compute; parameters and optimizer state are f32
  ))
  config.data = ml_collections.ConfigDict(dict(
      train_files="data/fineweb10B/fineweb_train_*.bin",
      val_files="data/fineweb10B/fineweb_val_*.bin",
      val_every_nth_file=10,  # only for the standard-library corpus
  ))
  config.mesh = ml_collections.ConfigDict(dict(data=1))

  # [modded]'s AdamW part for Muon and NorMuon. orthax gives one rate to all
  # AdamW leaves; with the head tied to the embedding, the head's rate.
  modded_adam = dict(adam_learning_rate=1 / 320, adam_b1=0.8, adam_b2=0.95,
                     adam_eps=1e-10, adam_weight_decay=0.0)
  modded_schedule = dict(warmup_frac=0.0, cooldown_frac=0.7, decay="linear",
                         end_lr_frac=0.0, grad_clip=0.0)
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=config_dict.placeholder(float),  # sweeps: all methods
      adamw=dict(  # [llm.c]
          learning_rate=6e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
          warmup_frac=700 / STEPS, cooldown_frac=1.0, decay="cosine",
          end_lr_frac=0.0, grad_clip=1.0),
      muon=dict(  # [modded]
          learning_rate=0.025, momentum=0.95, weight_decay=0.01,
          **modded_adam, **modded_schedule),
      normuon=dict(  # [normuon] rates; [modded] weight decay, AdamW, schedule
          learning_rate=0.02, momentum=0.95, beta2=0.95, weight_decay=0.01,
          **modded_adam, **modded_schedule),
      pion=dict(  # [pion]; its weight decay 0.1 is left out: orthax's AdamW
          # part has no mask and would decay the norms too.
          learning_rate=1e-3, b1=0.9, b2=0.95, adam_learning_rate=1e-3,
          adam_b1=0.9, adam_b2=0.95, adam_eps=1e-8, adam_weight_decay=0.0,
          warmup_frac=0.0, cooldown_frac=1.0, decay="cosine",
          end_lr_frac=0.01, grad_clip=1.0),
      # The adaptive family ([namo], [adamuon], [root], [auon]): each
      # method's published rate and decay where it has a GPT-2-size run,
      # the [modded] AdamW part and schedule like Muon's otherwise.
      namo=dict(  # [namo] optim/namo.yaml: lr 0.012 for both parts
          learning_rate=0.012, momentum=0.95, weight_decay=0.1,
          **{**modded_adam, "adam_learning_rate": 0.012, "adam_b1": 0.9},
          **modded_schedule),
      namo_d=dict(  # [namo] optim/namo-d.yaml: lr 0.009, clamp 0.01
          learning_rate=0.009, momentum=0.95, weight_decay=0.1, clamp=0.01,
          **{**modded_adam, "adam_learning_rate": 0.009, "adam_b1": 0.9},
          **modded_schedule),
      adamuon=dict(  # [adamuon] gpt2/models/train.py: lr 6e-4, decay 0.1
          learning_rate=6e-4, momentum=0.95, weight_decay=0.1,
          **modded_adam, **modded_schedule),
      root=dict(  # [root] example_train.py: lr 1e-3, decay 0.1 (toy run)
          learning_rate=1e-3, momentum=0.95, weight_decay=0.1,
          **modded_adam, **modded_schedule),
      auon=dict(  # [auon] paper v1: lr 0.055, no decay
          learning_rate=0.055, momentum=0.95, weight_decay=0.0,
          **modded_adam, **modded_schedule),
      hybrid_auon=dict(  # [auon] training/config.py: lr 0.08, decay 0.01
          learning_rate=0.08, momentum=0.95, weight_decay=0.01,
          **modded_adam, **modded_schedule),
      dion=dict(  # [dion] dion_160m.yaml
          learning_rate=0.02, mu=0.95, rank_fraction=0.5, weight_decay=0.01,
          **modded_adam, **modded_schedule),
      aro=dict(  # [aro]; AdamW's rate under its RMS-0.2 step
          learning_rate=6e-4, momentum=0.95, weight_decay=0.01,
          **modded_adam, **modded_schedule),
      poet=dict(  # [poet]
          learning_rate=5e-4, block_size=256, merge_every=200,
          **{**modded_adam, "adam_learning_rate": 1e-3, "adam_b1": 0.9,
             "adam_b2": 0.999, "adam_eps": 1e-6}, **modded_schedule),
      fismo=dict(  # no published settings (see above)
          learning_rate=0.025, momentum=0.95, weight_decay=0.01,
          update_every=10, **modded_adam, **modded_schedule),
      muon_clip=dict(  # [moonlight]; the rate is [adamuon]'s AdamW-matched one
          learning_rate=6e-4, momentum=0.95, weight_decay=0.1,
          threshold=100.0,
          **{**modded_adam, "adam_learning_rate": 6e-4, "adam_b1": 0.9},
          **modded_schedule),
  ))
  return config
