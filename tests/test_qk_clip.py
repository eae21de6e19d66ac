"""MuonClip (issue 15): ``qk_clip`` and the ready ``muon_clip``.

The transform is checked against the independent float64 reference of
``tests/reference.py`` (``qk_clip_reference``, a loop over heads from Kimi
K2's Algorithm 1) on square, wide, tall and stacked layouts, then on real
attention layers: after the clip, the logits recomputed from the clipped
weights land on the threshold for the clipped heads and do not move for the
others (MHA on Flax linen's ``MultiHeadDotProductAttention``, GQA, MLA);
then the ready optimizer against Moonlight's Muon plus AdamW plus the clip,
the errors, the edge cases, and the GPT example trained with ``muon_clip``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import reference
from checkpoints import orbax_round_trip
import train_gpt2  # examples/, put on sys.path by conftest.py
from orthax.structured import muon_clip
from orthax.transforms.qk_clip import qk_clip

U32 = 2.0**-24      # float32 unit roundoff
U64 = 2.0**-53
TAU = 10.0

# name: (stack, d_model, query heads, key heads, head dim). "stacked" is a
# scan of 3 layers: leaves (3, d_model, H d), max logits (3, H).
LAYOUTS = {"square": ((), 8, 2, 2, 4), "wide": ((), 4, 4, 4, 3),
           "tall": ((), 12, 2, 2, 2), "stacked": ((3,), 6, 2, 2, 3)}


def _attention(seed, layout, dtype):
  """Params, updates and per-head max logits (half above TAU) of one
  attention module in ``nnx.Linear`` layout (heads folded into fan_out)."""
  stack, d_model, heads, kv_heads, d = LAYOUTS[layout]
  rng = np.random.default_rng(seed)
  shapes = {"query": (heads * d,), "key": (kv_heads * d,)}

  def tree(scale):
    return {"attn": {name: {
        "kernel": jnp.asarray(scale * rng.normal(size=stack + (d_model,) + s),
                              dtype),
        "bias": jnp.asarray(scale * rng.normal(size=stack + s), dtype)}
        for name, s in shapes.items()}}

  params, updates = tree(1.0), tree(0.1)
  s = TAU * rng.choice([0.3, 0.9, 2.5, 7.0], size=stack + (heads,))
  return params, updates, {"attn": {"max_logits": (jnp.asarray(s, dtype),)}}


def _parts(tree, name):
  return [np.asarray(tree["attn"][name][p], np.float64)
          for p in ("kernel", "bias")]


def _reference_step(params, updates, logits, stack, alpha=0.5):
  """``reference.qk_clip_reference`` on ``W + u``, slice by slice."""
  w = jax.tree.map(lambda a, b: np.asarray(a, np.float64) + np.asarray(b),
                   params, updates)
  s = np.asarray(logits["attn"]["max_logits"][0], np.float64)
  q, k = _parts(w, "query"), _parts(w, "key")
  for idx in np.ndindex(*stack):
    new_q, new_k, _ = reference.qk_clip_reference(
        [p[idx] for p in q], [p[idx] for p in k], s[idx], tau=TAU,
        alpha=alpha)
    for p, n in zip(q + k, new_q + new_k):
      p[idx] = n
  return {"attn": {"query": dict(zip(("kernel", "bias"), q)),
                   "key": dict(zip(("kernel", "bias"), k))}}


@functools.cache
def _update(tx):
  return jax.jit(tx.update)


def _clip(tx, params, updates, logits):
  out, state = _update(tx)(updates, tx.init(params), params,
                           max_logits=logits)
  return optax.apply_updates(params, out), out, state


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float64_matches_reference_over_steps(layout):
  """6 steps from the transform's own weights: float64 rounding only, a few
  u64 of the entries (|W| + |u| <= 10 here), far below 1e-10."""
  tx = qk_clip(TAU)
  with jax.enable_x64(True):
    params, _, _ = _attention(0, layout, jnp.float64)
    for t in range(6):
      _, updates, logits = _attention(t + 1, layout, jnp.float64)
      new, _, _ = _clip(tx, params, updates, logits)
      want = _reference_step(params, updates, logits, LAYOUTS[layout][0])
      for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-10)
      params = new


@pytest.mark.parametrize("layout", ["wide", "stacked"])
def test_float32_within_derived_bound(layout):
  """float32 ``W + (u + (f - 1)(W + u))`` against ``f (W + u)`` in float64:
  ``W + u`` (u32 |s|), ``f = sqrt(tau / S)`` (2 u32 relative), ``f - 1``
  (exact for f >= 1/2 by Sterbenz, else u32 absolute: 3 u32 with f's error),
  the product (u32 |s| more, 5 u32 |s| in all), the sum with u and the final
  apply_updates (u32 (|u| + |s|) and u32 |s|): at most 7 u32 |s| + u32 |u|
  <= 8 u32 (|W| + |u|), plus O(u32^2) terms: 9 u32 (|W| + |u|) covers
  them. Unclipped heads are ``W + u`` exactly (the update passes through
  bit for bit)."""
  tx = qk_clip(TAU)
  params, updates, logits = _attention(7, layout, jnp.float32)
  new, _, _ = _clip(tx, params, updates, logits)
  want = _reference_step(params, updates, logits, LAYOUTS[layout][0])
  plain = optax.apply_updates(params, updates)
  for w, u, a, b, p in zip(*(jax.tree.leaves(x) for x in (
      params, updates, new, want, plain))):
    bound = 9 * U32 * (np.abs(np.asarray(w, np.float64)) + np.abs(u))
    assert np.all(np.abs(np.asarray(a, np.float64) - b) <= bound)
  s = np.asarray(logits["attn"]["max_logits"][0])
  d = LAYOUTS[layout][4]
  kept = np.repeat(s <= TAU, d, axis=-1)        # per column
  for a, p in zip(jax.tree.leaves(new), jax.tree.leaves(plain)):
    a, p = np.asarray(a), np.asarray(p)
    if a.ndim > kept.ndim:                       # kernels: (..., d_model, H d)
      a, p = np.moveaxis(a, -2, 0), np.moveaxis(p, -2, 0)
    np.testing.assert_array_equal(a[..., kept], p[..., kept])


def test_apply_updates_form_is_gamma_power_of_w_plus_u():
  """With alpha = 0.3 the queries end at gamma^0.3 (W + u), the keys at
  gamma^0.7 (W + u), exactly as written (float64, a few u64)."""
  with jax.enable_x64(True):
    params, updates, logits = _attention(3, "square", jnp.float64)
    new, _, state = _clip(qk_clip(TAU, alpha=0.3), params, updates, logits)
  s = np.asarray(logits["attn"]["max_logits"][0])
  gamma = np.where(s > TAU, TAU / s, 1.0)
  for name, power in (("query", 0.3), ("key", 0.7)):
    for p in ("kernel", "bias"):
      w = np.asarray(params["attn"][name][p]) + np.asarray(
          updates["attn"][name][p])
      want = w * np.repeat(gamma**power, 4)
      np.testing.assert_allclose(new["attn"][name][p], want, rtol=1e-14)
  assert int(state.clipped_heads) == int(np.sum(s > TAU))


# ---------------------------------------------------------------------------
# Real attention layers: the logits after the clip
# ---------------------------------------------------------------------------


def _linen_attention(dtype):
  """Flax linen's MHA (4 heads of 4, with biases) whose attention_fn records
  each call's per-head max logits from the layer's own queries and keys."""
  records = []

  def attention_fn(query, key, value, **kwargs):
    q = query / jnp.sqrt(query.shape[-1]).astype(query.dtype)
    records.append(jnp.max(jnp.einsum("bqhd,bkhd->bhqk", q, key),
                           axis=(0, 2, 3)))
    return nn.dot_product_attention(query, key, value, **kwargs)

  layer = nn.MultiHeadDotProductAttention(
      num_heads=4, qkv_features=16, dtype=dtype, param_dtype=dtype,
      attention_fn=attention_fn)
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 5, 12)), dtype)
  params = jax.jit(layer.init)(jax.random.key(0), x)["params"]
  # Larger query/key weights, so that the heads' max logits differ widely.
  params = jax.tree_util.tree_map_with_path(
      lambda kp, p: p * 3 if "query" in str(kp) or "key" in str(kp) else p,
      params)

  @jax.jit
  def max_logits(p):
    layer.apply({"params": p}, x)
    return records.pop()

  return params, x, max_logits


def _abs_logits(params, x):
  """Per head, ``max_{b,i,j} sum_k |q_ik| |k_jk| / sqrt(d)`` with ``|q| =
  |x| |Wq| + |bq|``: the scale of each logit's float32 rounding error."""
  x = np.abs(np.asarray(x, np.float64))
  q, k = ((np.einsum("btd,dhk->bthk", x, np.abs(np.asarray(
      params[n]["kernel"], np.float64))) + np.abs(np.asarray(
          params[n]["bias"], np.float64))) for n in ("query", "key"))
  d = q.shape[-1]
  return np.max(np.einsum("bqhd,bkhd->bhqk", q, k), axis=(0, 2, 3)) / np.sqrt(d)


def _clip_layer(params, s, dtype):
  """The clip of a zero update on the layer's params (heads on axis -2)."""
  tx = qk_clip(float(np.median(s)), head_axis=-2)
  zero = jax.tree.map(jnp.zeros_like, params)
  out, _ = jax.jit(tx.update)(zero, tx.init(params), params,
                              max_logits={"max_logits": s})
  return optax.apply_updates(params, out), float(np.median(s))


def test_linen_attention_float64_clipped_heads_land_on_threshold():
  with jax.enable_x64(True):
    params, _, max_logits = _linen_attention(jnp.float64)
    s = max_logits(params)
    new, tau = _clip_layer(params, s, jnp.float64)
    after = np.asarray(max_logits(new))
  s = np.asarray(s)
  assert np.sum(s > tau) == 2
  np.testing.assert_allclose(after[s > tau], tau, rtol=1e-10)
  np.testing.assert_array_equal(after[s <= tau], s[s <= tau])


def test_linen_attention_float32_within_derived_bound():
  """Each float32 logit is off by at most ``e A``, ``A`` the head's
  ``_abs_logits`` and ``e = (D + 1 + d + 2) u32`` (the projection's D + 1
  terms, the dot's d, the 1/sqrt(d) scale and the max), both at the
  recording and after the clip. The clipped weights are ``gamma^1/2 W``
  to 8 u32 relative each (test_float32_within_derived_bound with u = 0),
  16 u32 on a logit, and ``gamma = tau / S`` rounds once (tau u32): so
  ``|S' - tau| <= gamma (2 e + 16 u32) A + tau u32``. Unclipped heads keep
  their weights, and so their logits, bit for bit."""
  params, x, max_logits = _linen_attention(jnp.float32)
  s = max_logits(params)
  new, tau = _clip_layer(params, s, jnp.float32)
  after, s = np.asarray(max_logits(new), np.float64), np.asarray(s)
  clipped = s > tau
  gamma = tau / s[clipped]
  e = (12 + 1 + 4 + 2) * U32
  bound = gamma * (2 * e + 16 * U32) * _abs_logits(params, x)[clipped] \
      + tau * U32
  assert np.all(np.abs(after[clipped] - tau) <= bound)
  np.testing.assert_array_equal(after[~clipped], s[~clipped])


def _folded(seed, heads, kv_heads, d, d_model=6, rope=None):
  """Params ``{'attn': {...}}`` of folded projections (no biases for the
  rotary parts), float64, and inputs ``x``."""
  rng = np.random.default_rng(seed)
  attn = {n: {"kernel": rng.normal(size=(d_model, h * d)),
              "bias": rng.normal(size=(h * d,))}
          for n, h in (("query", heads), ("key", kv_heads))}
  if rope is not None:
    attn["q_rope"] = {"kernel": rng.normal(size=(d_model, heads * rope))}
    attn["k_rope"] = {"kernel": rng.normal(size=(d_model, rope))}
  x = rng.normal(size=(2, 5, d_model))
  return jax.tree.map(jnp.asarray, {"attn": attn}), x


def _reference_logits(params, x, heads):
  a = jax.tree.map(np.asarray, params["attn"])
  rope = ((a["q_rope"]["kernel"], a["k_rope"]["kernel"])
          if "q_rope" in a else None)
  return reference.attention_max_logits(
      x, (a["query"]["kernel"], a["query"]["bias"]),
      (a["key"]["kernel"], a["key"]["bias"]), heads, rope=rope)


def _clip_zero(tx, params, s):
  zero = jax.tree.map(jnp.zeros_like, params)
  out, _ = tx.update(zero, tx.init(params), params,
                     max_logits={"attn": {"max_logits": s}})
  return optax.apply_updates(params, out), out


def test_gqa_moves_only_the_queries():
  """4 query heads on 2 key heads: the shared keys do not move (the
  transform's key update is the zero update, bit for bit), the clipped
  heads' logits land on tau (float64)."""
  with jax.enable_x64(True):
    params, x = _folded(11, 4, 2, 3)
    s = _reference_logits(params, x, 4)
    tau = float(np.median(s))
    new, out = _clip_zero(qk_clip(tau), params, jnp.asarray(s))
    after = _reference_logits(new, x, 4)
  for leaf in jax.tree.leaves(out["attn"]["key"]):
    np.testing.assert_array_equal(leaf, 0.0)
  np.testing.assert_allclose(after[s > tau], tau, rtol=1e-10)
  np.testing.assert_array_equal(after[s <= tau], s[s <= tau])
  q, _, _ = reference.qk_clip_reference(
      _parts(params, "query"), _parts(params, "key"), s, tau=tau)
  for a, b in zip(_parts(new, "query"), q):
    np.testing.assert_allclose(a, b, rtol=1e-14)


def test_mla_logits_scale_by_gamma():
  """MLA with explicit roles: q_c, k_c by sqrt(gamma), q_rope by gamma,
  the shared k_rope untouched; every logit ``q_c . k_c + q_r . k_r`` of a
  clipped head scales by gamma, so its max lands on tau (float64)."""
  roles = {"attn/query": "q", "attn/key": "k", "attn/q_rope": "q_rope",
           "attn/k_rope": "k_rope"}
  with jax.enable_x64(True):
    params, x = _folded(12, 3, 3, 4, rope=2)
    s = _reference_logits(params, x, 3)
    tau = float(np.median(s))
    new, out = _clip_zero(qk_clip(tau, roles=roles), params, jnp.asarray(s))
    after = _reference_logits(new, x, 3)
  np.testing.assert_array_equal(out["attn"]["k_rope"]["kernel"], 0.0)
  np.testing.assert_allclose(after[s > tau], tau, rtol=1e-10)
  np.testing.assert_array_equal(after[s <= tau], s[s <= tau])
  q, k, qr = reference.qk_clip_reference(
      _parts(params, "query"), _parts(params, "key"), s, tau=tau,
      q_rope_parts=[np.asarray(params["attn"]["q_rope"]["kernel"])])
  got = _parts(new, "query") + _parts(new, "key") + [
      np.asarray(new["attn"]["q_rope"]["kernel"])]
  for a, b in zip(got, q + k + qr):
    np.testing.assert_allclose(a, b, rtol=1e-14)


# ---------------------------------------------------------------------------
# The ready optimizer
# ---------------------------------------------------------------------------


def _model_tree(seed):
  rng = np.random.default_rng(seed)
  attn = {n: {"kernel": rng.normal(size=(16, 16)), "bias": rng.normal(size=16)}
          for n in ("query", "key")}
  return {"attn": attn, "wte": {"embedding": rng.normal(size=(40, 16))}}


def test_ready_matches_moonlight_muon_adamw_and_clip():
  """3 float64 steps of muon_clip (hidden kernels: Moonlight's Muon; the
  biases and the embedding: AdamW; then the clip of 4 heads of 4 on the
  kernels and their biases) against the reference. Newton–Schulz in
  float64 on 16x16 matrices: rounding far below 1e-10."""
  lr, tau = 0.01, 100.0
  with jax.enable_x64(True):
    params = jax.tree.map(jnp.asarray, _model_tree(0))
    tx = muon_clip(lr, threshold=tau)
    state = tx.init(params)
    ref = jax.tree.map(np.asarray, params)
    moments = jax.tree.map(lambda p: (np.zeros_like(p), np.zeros_like(p)), ref)
    bufs = {n: np.zeros((16, 16)) for n in ("query", "key")}
    for t in range(1, 4):
      grads = _model_tree(t)
      s = np.array([150.0, 50.0, 400.0, 99.0]) * t
      updates, state = jax.jit(tx.update)(
          jax.tree.map(jnp.asarray, grads), state, params,
          max_logits={"attn": {"max_logits": jnp.asarray(s)}})
      params = optax.apply_updates(params, updates)
      for n in ("query", "key"):
        a = ref["attn"][n]
        a["kernel"], bufs[n] = reference.moonlight_muon_step(
            a["kernel"], grads["attn"][n]["kernel"], bufs[n], lr=lr)
        a["bias"], moments["attn"][n]["bias"] = reference.adamw_step(
            a["bias"], grads["attn"][n]["bias"],
            moments["attn"][n]["bias"], t, lr=lr)
      ref["wte"]["embedding"], moments["wte"]["embedding"] = \
          reference.adamw_step(ref["wte"]["embedding"],
                               grads["wte"]["embedding"],
                               moments["wte"]["embedding"], t, lr=lr)
      q, k, _ = reference.qk_clip_reference(
          _parts(ref, "query"), _parts(ref, "key"), s, tau=tau)
      for n, new in (("query", q), ("key", k)):
        ref["attn"][n] = dict(zip(("kernel", "bias"), new))
      for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-10)
  assert int(state[-1].clipped_heads) == np.sum(s > tau)


def test_orbax_resume_is_bit_identical(tmp_path):
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _model_tree(0))
  tx = muon_clip(0.01, threshold=100.0)
  update = jax.jit(tx.update)
  logits = {"attn": {"max_logits": jnp.array([150.0, 50.0, 400.0, 99.0])}}

  def run(state, steps):
    outs = []
    for t in steps:
      grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32),
                           _model_tree(t))
      u, state = update(grads, state, params, max_logits=logits)
      outs.append(u)
    return outs, state

  straight, _ = run(tx.init(params), range(1, 5))
  _, state = run(tx.init(params), range(1, 3))
  restored = orbax_round_trip(tmp_path / "ckpt", {"state": state})["state"]
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  resumed, _ = run(restored, range(3, 5))
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight[2:])):
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# Errors and edge cases
# ---------------------------------------------------------------------------


def _small():
  params, updates, logits = _attention(1, "square", jnp.float32)
  return params, updates, logits


@pytest.mark.parametrize("make, match", [
    (lambda: qk_clip(0.0), r"threshold must be in \(0"),
    (lambda: qk_clip(alpha=1.5), r"alpha must be in \[0, 1\]"),
    (lambda: qk_clip(roles=["q"]), r"roles must be None .* or a mapping"),
    (lambda: qk_clip(roles={"a/q": "v"}), r"roles\['a/q'\] is 'v'"),
])
def test_bad_hyperparameters(make, match):
  with pytest.raises((ValueError, TypeError), match=match):
    make()


def test_missing_params_or_max_logits():
  params, updates, logits = _small()
  tx = qk_clip(TAU)
  with pytest.raises(ValueError, match="needs the params"):
    tx.update(updates, tx.init(params), max_logits=logits)
  with pytest.raises(ValueError, match=r"max_logits=\.\.\."):
    tx.update(updates, tx.init(params), params)


def test_module_without_max_logits_is_named():
  params, updates, logits = _small()
  params["attn2"], updates["attn2"] = params["attn"], updates["attn"]
  tx = qk_clip(TAU)
  with pytest.raises(ValueError, match=r"module 'attn2' of leaf "
                     r"\['attn2'\]\['key'\]\['bias'\]"):
    tx.update(updates, tx.init(params), params, max_logits=logits)


def test_max_logits_of_unrecognized_module_is_an_error():
  """A module whose projections are not found would go unclipped."""
  params, updates, logits = _small()
  logits["mlp"] = {"max_logits": jnp.ones(2)}
  tx = qk_clip(TAU)
  with pytest.raises(ValueError, match=r"max_logits\['mlp'\]\['max_logits'\] "
                     r"\(shape \(2,\)\) is under no attention module"):
    tx.update(updates, tx.init(params), params, max_logits=logits)


def test_wrong_head_count_is_named():
  params, updates, _ = _small()              # 2 heads of 4: 8 columns
  tx = qk_clip(TAU)
  with pytest.raises(ValueError, match=r"leaf \['attn'\]\['query'\]\['bias'\] "
                     r"\(q\) of shape \(8,\) has 8 entries on its head axis 0, "
                     r"not a multiple of the 3 heads"):
    tx.update(updates, tx.init(params), params,
              max_logits={"attn": {"max_logits": jnp.ones(3)}})


def test_grouped_key_that_does_not_divide_is_named():
  params, updates, logits = _small()
  for tree in (params, updates):
    tree["attn"]["key"] = {"kernel": jnp.ones((8, 6))}
  tx = qk_clip(TAU)
  with pytest.raises(ValueError, match=r"leaf \['attn'\]\['key'\]\['kernel'\] "
                     r"\(k\) of shape \(8, 6\) has 6 entries"):
    tx.update(updates, tx.init(params), params, max_logits=logits)


def test_stacked_logits_must_match_leading_axes():
  params, updates, _ = _attention(1, "stacked", jnp.float32)   # 3 layers
  tx = qk_clip(TAU)
  with pytest.raises(ValueError, match=r"\['attn'\]\['key'\]\['bias'\] "
                     r"\(k\) of shape \(3, 6\).*stacked axes \(4,\)"):
    tx.update(updates, tx.init(params), params,
              max_logits={"attn": {"max_logits": jnp.ones((4, 2))}})


def test_roles_pattern_matching_nothing_is_an_error():
  params, updates, logits = _small()
  tx = qk_clip(TAU, roles={"attn/query": "q", "attn/kee": "k"})
  with pytest.raises(ValueError, match=r"pattern 'attn/kee' matches no"):
    tx.update(updates, tx.init(params), params, max_logits=logits)


def test_zero_weights_and_updates_stay_zero():
  params, _, logits = _small()
  zero = jax.tree.map(jnp.zeros_like, params)
  logits = {"attn": {"max_logits": jnp.array([0.0, 10 * TAU])}}
  tx = qk_clip(TAU)
  out, state = tx.update(zero, tx.init(zero), zero, max_logits=logits)
  for leaf in jax.tree.leaves(out):
    np.testing.assert_array_equal(leaf, 0.0)
  assert int(state.clipped_heads) == 1


def test_bfloat16_leaves():
  """bf16 in, bf16 out. The float32 value (error 9 u32 (|W| + |u|)) is
  rounded to bf16 (2^-8 |u'|, |u'| <= |u| + |W + u|) and apply_updates in
  bf16 rounds once more (2^-8 |W'|, |W'| <= |W + u|): within 2^-8 (2 |W| +
  3 |u|) plus the float32 part; unclipped heads are W + u bit for bit."""
  params, updates, logits = _attention(2, "square", jnp.bfloat16)
  new, out, _ = _clip(qk_clip(TAU), params, updates, logits)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
  want = _reference_step(params, updates, logits, ())
  for w, u, a, b in zip(*(jax.tree.leaves(x) for x in (
      params, updates, new, want))):
    w, u = (np.abs(np.asarray(x, np.float64)) for x in (w, u))
    bound = 2.0**-8 * (2 * w + 3 * u) + 9 * U32 * (w + u)
    assert np.all(np.abs(np.asarray(a, np.float64) - b) <= bound)


def test_jit_matches_eager():
  """Elementwise float32 operations, fused or not: each result within the
  float32 bound of test_float32_within_derived_bound of the exact one, so
  the two within twice that."""
  params, updates, logits = _small()
  tx = qk_clip(TAU)
  eager, _ = tx.update(updates, tx.init(params), params, max_logits=logits)
  jitted, _ = jax.jit(tx.update)(updates, tx.init(params), params,
                                 max_logits=logits)
  for w, u, a, b in zip(*(jax.tree.leaves(x) for x in (
      params, updates, eager, jitted))):
    bound = 18 * U32 * (np.abs(np.asarray(w)) + np.abs(np.asarray(u)))
    assert np.all(np.abs(np.asarray(a) - np.asarray(b)) <= bound)


# ---------------------------------------------------------------------------
# The GPT example
# ---------------------------------------------------------------------------


def _example(microbatches, threshold, **opt):
  """A 1-layer GPT of the example, its train step with muon_clip (recording
  the max logits), a jitted function of a batch's per-head max logits and
  the batches. ``threshold=None``: the median head's on the first batch."""
  config = train_gpt2.load_config(train_gpt2.Path(__file__).resolve()
                                  .parent.parent / "configs" / "tiny.py")
  config.model.update(width=32, num_layers=1, num_heads=4, context=16)
  mesh = train_gpt2.make_mesh(1)
  model = train_gpt2.GPT(config.model, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  batches = jnp.asarray(
      np.random.default_rng(0).integers(0, 256, size=(3, 8, 17)))

  @jax.jit
  def recorded(params, batch):
    _, logits = train_gpt2._loss(nnx.merge(graphdef, params), batch,
                                 max_logits=True)
    return logits["h"][0]["attn"]["max_logits"][0]

  if threshold is None:
    threshold = float(np.median(recorded(params, batches[0])))
  tx = muon_clip(model=model, threshold=threshold, **opt)
  state = {"params": params, "opt_state": tx.init(params)}
  shardings = jax.tree.map(
      lambda x: train_gpt2.fsdp_sharding(x.shape, mesh), state)
  state = jax.device_put(state, shardings)   # as train() places it
  train_step, _ = train_gpt2._step_functions(
      graphdef, tx, shardings, mesh, microbatches, max_logits=True)
  @jax.jit
  def attention_input(params, batch):
    m = nnx.merge(graphdef, params)
    tokens = batch[:, :-1]
    attn = m.h[0].attn
    return (m.h[0].ln_1(m.wte(tokens) + m.wpe(jnp.arange(tokens.shape[1]))),
            [(p.kernel[...], p.bias[...]) for p in (attn.query, attn.key)])

  return (state, train_step, recorded, batches, threshold,
          lambda params, batch: _example_abs_logits(
              *attention_input(params, batch)))


def _example_abs_logits(x, projections):
  """``_abs_logits`` of the example's attention (causal pairs only): its
  input ``ln_1(wte + wpe)``, its folded ``(32, 4 * 8)`` kernels."""
  x = np.abs(np.asarray(x, np.float64))
  q, k = ((x @ np.abs(np.asarray(w, np.float64))
           + np.abs(np.asarray(b, np.float64))).reshape(x.shape[:2] + (4, 8))
          for w, b in projections)
  a = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
  causal = np.tril(np.ones(a.shape[-2:], bool))
  return np.max(np.where(causal, a, 0.0), axis=(0, 2, 3))


def test_example_clips_heads_onto_threshold():
  """Two microbatches (the recorded max logits are the max over both).
  The first two steps have learning rates of 1e-30, which isolate the clip:
  ``W + u`` rounds to ``W`` for every kernel and norm scale, and the
  zero-initialized biases move by about 1e-30, far below the bound's terms.
  After each of them the head's max logit on that step's batch is bounded
  as in test_linen_attention_float32_within_derived_bound, with ``e = (32 +
  1 + 8 + 1) u32`` (the width-32 projection and its bias, the 8-term dot,
  the scale) and ``A`` computed for this model: clipped heads land on tau
  to ``gamma (2 e + 16 u32) A + tau u32``, and no head ends above tau by
  more than that. The third step trains at the usual rates."""
  lr = lambda rate: lambda t: jnp.where(t < 2, 1e-30, rate)
  state, train_step, recorded, batches, tau, abs_logits = _example(
      2, None, learning_rate=lr(0.02), adam_learning_rate=lr(3e-3))
  e = (32 + 1 + 8 + 1) * U32
  for step, batch in enumerate(batches):
    before = np.asarray(recorded(state["params"], batch), np.float64)
    a = abs_logits(state["params"], batch)
    state, loss = train_step(state, batch)
    assert np.isfinite(loss)
    if step == 2:
      break
    after = np.asarray(recorded(state["params"], batch), np.float64)
    gamma = np.where(before > tau, tau / before, 1.0)
    bound = gamma * (2 * e + 16 * U32) * a + tau * U32
    clipped = before > tau
    assert np.all(np.abs(after[clipped] - tau) <= bound[clipped])
    assert np.all(after <= tau + bound)
    if step == 0:  # tau is the median: no head is near it yet
      assert int(state["opt_state"][-1].clipped_heads) == 2
