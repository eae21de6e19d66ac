"""Zero-configuration routing on other projects' real param trees (issue 12).

* Hugging Face's ``FlaxGPT2LMHeadModel`` (transformers 4.x, the last line with
  Flax models): its tree as recorded in ``fixtures/hf_gpt2_tree.json`` (by
  ``fixtures/make_hf_gpt2_tree.py``), always; the live model too when
  transformers with Flax GPT-2 imports. ``FlaxConv1D`` stores its kernel as
  (out, in), so every kernel reduces axis 1 into axis 0 -- the square
  attention ``c_proj`` included, which only NorMuon's per-neuron
  normalization tells apart from (in, out).
* MaxText's llama2 and deepseek3 trees (``fixtures/maxtext_trees.py``):
  linen boxes with MaxText's logical names, and the same trees unboxed; and
  MaxText's own optax spec tree through ``orthax.routing.from_optax``.

Each tree is checked twice: the routes ``orthax.route`` gives, and, without
asking ``orthax.route``, the first update of the ready optimizer
(``routing_check``).
"""

from __future__ import annotations

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import orthax
from fixtures import make_hf_gpt2_tree
from fixtures import maxtext_trees as mt
from routing_check import (ADAMW, Matrix, check_routes, check_updates,
                           gradients, step_kwargs, verify_updates)

# --- Hugging Face Flax GPT-2 -------------------------------------------------

GPT2_RECORD = json.loads(make_hf_gpt2_tree.JSON_PATH.read_text())
GPT2_CONFIGS = sorted(GPT2_RECORD["models"])

_OUT_IN = Matrix((), (1,), (0,))  # FlaxConv1D's kernel: (features, in)

# Each block's leaves (under 'transformer/h/<i>/').
_GPT2_BLOCK = {
    "ln_1/scale": ADAMW, "ln_1/bias": ADAMW,
    "attn/c_attn/kernel": _OUT_IN, "attn/c_attn/bias": ADAMW,   # (3d, d)
    "attn/c_proj/kernel": _OUT_IN, "attn/c_proj/bias": ADAMW,   # (d, d)
    "ln_2/scale": ADAMW, "ln_2/bias": ADAMW,
    "mlp/c_fc/kernel": _OUT_IN, "mlp/c_fc/bias": ADAMW,         # (4d, d)
    "mlp/c_proj/kernel": _OUT_IN, "mlp/c_proj/bias": ADAMW,     # (d, 4d)
}
_GPT2_TOP = {
    "transformer/wte/embedding": ADAMW,  # (vocab, d), also the tied head
    "transformer/wpe/embedding": ADAMW,  # (positions, d)
    "transformer/ln_f/scale": ADAMW, "transformer/ln_f/bias": ADAMW,
    "lm_head/kernel": ADAMW,             # (d, vocab), untied head only
}


def gpt2_expected(paths) -> dict:
  """The right route of each recorded GPT-2 leaf (KeyError for others)."""
  block = re.compile(r"transformer/h/\d+/(.*)")
  return {p: _GPT2_BLOCK[m.group(1)] if (m := block.fullmatch(p))
          else _GPT2_TOP[p] for p in paths}


def gpt2_params(config: str) -> dict:
  """Params with the recorded paths, shapes and dtypes (random values)."""
  rng = np.random.default_rng(0)
  params = {}
  for path, leaf in GPT2_RECORD["models"][config]["params"].items():
    *parents, name = path.split("/")
    node = params
    for key in parents:
      node = node.setdefault(key, {})
    node[name] = jnp.asarray(0.02 * rng.standard_normal(leaf["shape"]),
                             leaf["dtype"])
  return params


@pytest.mark.parametrize("config", GPT2_CONFIGS)
def test_hf_gpt2_recorded_tree_routes(config):
  expected = gpt2_expected(GPT2_RECORD["models"][config]["params"])
  check_routes(gpt2_params(config), expected)


@pytest.mark.parametrize("optimizer", ["muon", "normuon"])
def test_hf_gpt2_recorded_tree_updates(optimizer):
  # The untied config: the tied one's leaves and the lm_head (one compile of
  # the optimizer each, the slow part). normuon: the square attention c_proj
  # is (out, in) too, and only NorMuon's per-output-neuron normalization
  # shows which of its axes is the output.
  expected = gpt2_expected(GPT2_RECORD["models"]["untied"]["params"])
  check_updates(gpt2_params("untied"), expected, optimizer=optimizer)


def _flax_gpt2():
  transformers = pytest.importorskip("transformers")
  try:
    from transformers.models.gpt2 import modeling_flax_gpt2
  except ImportError as e:
    pytest.skip(f"transformers {transformers.__version__} has no Flax GPT-2 "
                f"(Flax models ended with 4.x): {e}")
  return modeling_flax_gpt2


@pytest.mark.parametrize("config", GPT2_CONFIGS)
def test_hf_gpt2_live_model(config):
  modeling = _flax_gpt2()
  recorded = GPT2_RECORD["models"][config]
  params = make_hf_gpt2_tree.build_model(recorded["config"]).params
  # The installed transformers builds the tree that was recorded ...
  assert make_hf_gpt2_tree.record(params) == recorded["params"]
  # ... FlaxConv1D computes x @ kernel.T there: its kernel is (out, in), the
  # square attention c_proj's too (shown by values, as the shape cannot).
  proj = params["transformer"]["h"]["0"]["attn"]["c_proj"]
  kernel = np.asarray(proj["kernel"], np.float64)
  x = np.random.default_rng(1).standard_normal((2, kernel.shape[1]))
  x = x.astype(np.float32)
  y = modeling.FlaxConv1D(features=kernel.shape[0]).apply({"params": proj}, x)
  want = x.astype(np.float64) @ kernel.T + np.asarray(proj["bias"], np.float64)
  # float32 dot products of length d = 24: error <= d u sum_i |x_i k_i| <=
  # 24 * 6e-8 * |x| |k_row| ~ 24 * 6e-8 * 4.9 * 0.1 ~ 7e-7 (GPT-2 init:
  # entries N(0, 0.02^2)), plus u |y| for the bias; 1e-5 leaves a factor 10,
  # and (in, out) would be off by about |y| ~ 0.1.
  np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=0, atol=1e-5)
  # ... and it is routed as expected.
  check_routes(params, gpt2_expected(recorded["params"]))


# --- MaxText ------------------------------------------------------------------

SPECS = {"llama2": mt.llama2_spec, "deepseek3": mt.deepseek3_spec}
# (model, naming, param_scan_axis): both namings of MaxText's logical axes, the
# experts-on-fsdp names, and layers stacked on axis 0 instead of MaxText's 1.
VARIANTS = [
    ("llama2", "2026", 1), ("llama2", "2025", 1), ("llama2", "2026", 0),
    ("deepseek3", "2026", 1), ("deepseek3", "2025", 1),
    ("deepseek3", "2026-experts-on-fsdp", 1), ("deepseek3", "2026", 0),
]
VARIANTS_2026 = [v for v in VARIANTS if v[1] == "2026"]


def _ids(variant) -> str:
  return "{}-{}-scan{}".format(*variant)


def maxtext_tree(variant, boxed):
  model, naming, scan_axis = variant
  return mt.build(SPECS[model](naming), scan_axis=scan_axis, boxed=boxed)


@pytest.mark.parametrize("boxed", [True, False], ids=["boxed", "unboxed"])
@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_maxtext_routes(variant, boxed):
  params, expected = maxtext_tree(variant, boxed)
  check_routes(params, expected)


@pytest.mark.parametrize("model,boxed,optimizer", [
    (model, boxed, optimizer) for boxed in (True, False)
    for model, optimizer in [("llama2", "muon"), ("llama2", "normuon"),
                             ("deepseek3", "muon")]
], ids=lambda x: {True: "boxed", False: "unboxed"}.get(x, x))
def test_maxtext_updates(model, boxed, optimizer):
  # deepseek3 under muon only: compiling its optimizer is the slow part
  # (~10 s a run); NorMuon's orientation check is on llama2's out-projection.
  params, expected = maxtext_tree((model, "2026", 1), boxed)
  check_updates(params, expected, optimizer=optimizer)


def test_maxtext_train_state_flow():
  # MaxText's own flow (maxtext_utils.init_initial_state): the optimizer's
  # init sees the boxed variables, then the whole TrainState, optimizer state
  # included, is unboxed (max_utils.unbox_logicallypartioned), and every
  # update sees plain arrays. The routing must not change between the two.
  boxed, expected = maxtext_tree(("llama2", "2026", 1), True)
  plain = nn.meta.unbox(boxed)
  opt = orthax.muon(**step_kwargs("muon"))
  state = nn.meta.unbox(opt.init(boxed))
  grads = gradients(plain, expected)
  updates, _ = jax.jit(opt.update)(grads, state, plain)
  verify_updates(updates, grads, expected)


def test_maxtext_tree_is_linen_logical_partitioning():
  # The fixture's leaves are what nn.with_logical_partitioning + nn.scan give.
  params, _ = maxtext_tree(("deepseek3", "2026", 1), True)
  moe = params["params"]["decoder"]["moe_layers"]
  box = moe["DeepSeekMoeBlock_0"]["MoeBlock_0"]["wi_0"]
  assert isinstance(box, nn.LogicallyPartitioned)
  assert box.names == ("exp", "layers", "embed_moe", "mlp_moe")
  scale = moe["self_attention"]["kv_norm"]["scale"]
  assert scale.names == ("norm", "layers") and scale.value.shape == (7, 3)


@pytest.mark.parametrize("boxed", [True, False], ids=["boxed", "unboxed"])
@pytest.mark.parametrize("variant", VARIANTS_2026, ids=_ids)
def test_maxtext_own_spec_through_from_optax(variant, boxed):
  # MaxText's spec tree gives optax's routing exactly, right or wrong (at
  # param_scan_axis=0 it is wrong, see test_maxtext_own_spec_vs_hand_routing).
  params, _ = maxtext_tree(variant, boxed)
  spec = mt.maxtext_spec(params)
  check_routes(params, mt.optax_routes(spec, params),
               routing=orthax.routing.from_optax(spec))


def test_maxtext_own_spec_through_from_optax_updates():
  params, _ = maxtext_tree(("llama2", "2026", 0), True)
  spec = mt.maxtext_spec(params)
  check_updates(params, mt.optax_routes(spec, params),
                routing=orthax.routing.from_optax(spec))


@pytest.mark.parametrize("variant", VARIANTS_2026, ids=_ids)
def test_maxtext_own_spec_vs_hand_routing(variant):
  """Where MaxText's own table differs from the right routing (no orthax here).

  Its axes are fixed positions: (0,) the input and (-1,) the output, which
  holds when the scan inserts 'layers' at axis 1 (its default
  param_scan_axis). At param_scan_axis=0 every scanned matrix reduces over the
  layer axis instead, except the expert stacks, which it addresses from the
  end ((-2,) into (-1,)).
  """
  params, expected = maxtext_tree(variant, True)
  optax = mt.optax_routes(mt.maxtext_spec(params), params)
  differ = {p for p in expected if optax[p] != expected[p]}
  if variant[2] == 1:
    assert differ == set()
  else:
    scanned = re.compile(r".*/(dense_layers|moe_layers|layers)/.*")
    experts = re.compile(r".*/MoeBlock_0/(wi_0|wi_1|wo)")
    assert differ == {p for p, r in expected.items() if r != ADAMW
                      and scanned.fullmatch(p) and not experts.fullmatch(p)}
