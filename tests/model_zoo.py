"""Tiny real Flax models, built from Flax's own layers, with their right routes.

Each builder returns ``(params, expected, extra)``:

* the params as a user hands them to an optimizer (linen
  ``variables['params']``, NNX ``nnx.state(model, nnx.Param)``), zeros of the
  model's shapes: routing and the update checks need only the shapes, and a
  real initialization costs seconds of compilation per model;
* the route every leaf should get, written by hand from issue 12: stacked
  layer and expert axes are batch axes; conv kernels are ``(kh * kw * in,
  out)``; attention in-projections ``(embed, heads * head_dim)``,
  out-projections ``(heads * head_dim, embed)``; embeddings, output heads,
  classifiers, norm scales and biases (stacked ones too) AdamW; MoE routers
  matrices;
* ``extra``: ``make()`` builds the real thing (linen params, or the NNX
  module), ``model`` is the abstract NNX module (``None`` for linen),
  ``loss(params, batch)`` (linen) and ``batch``.

Sizes are distinct where a swap would hide (embed 24, heads 4 of head_dim 12,
MLP 96, vocabulary 40), with head_dim below embed: the heads of an
in-projection, orthogonalized apart, are then tall blocks whose polar factors
do not add up to an orthogonal matrix (see ``routing_check``).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from routing_check import ADAMW, Matrix

VOCAB, EMBED, HEADS, HEAD_DIM, MLP, MAX_LEN, LAYERS = 40, 24, 4, 12, 96, 10, 3
EXPERTS, EXPERT_MLP = 4, 64
SEQ = 8

DENSE = Matrix((), (0,), (1,))            # (in, out)
IN_PROJ = Matrix((), (0,), (1, 2))        # (embed, heads, head_dim)
OUT_PROJ = Matrix((), (0, 1), (2,))       # (heads, head_dim, embed)
CONV = Matrix((), (0, 1, 2), (3,))        # (kh, kw, in, out)


def _init(key, shape, dtype=jnp.float32):
  """N(0, 0.02^2), drawn flat: on XLA:CPU a 3-D or 4-D draw takes seconds to
  compile, a flat one a fraction of that."""
  flat = jax.random.normal(key, (math.prod(shape),), dtype)
  return 0.02 * flat.reshape(shape)


def stacked(route, axes: int = 1):
  """``route`` under ``axes`` leading stacked (layer, expert) batch axes."""
  if route == ADAMW:
    return ADAMW
  shift = lambda group: tuple(a + axes for a in group)
  return Matrix(tuple(range(axes)) + shift(route.batch),
                shift(route.reduction), shift(route.output))


def _attention(prefix: str, use_bias: bool) -> dict:
  routes = {f"{prefix}/{p}/kernel": IN_PROJ for p in ("query", "key", "value")}
  routes[f"{prefix}/out/kernel"] = OUT_PROJ
  if use_bias:
    routes.update({f"{prefix}/{p}/bias": ADAMW
                   for p in ("query", "key", "value", "out")})
  return routes


def _dense(prefix: str, route=DENSE, use_bias: bool = True) -> dict:
  routes = {f"{prefix}/kernel": route}
  if use_bias:
    routes[f"{prefix}/bias"] = ADAMW
  return routes


def _norm(prefix: str) -> dict:
  return {f"{prefix}/scale": ADAMW, f"{prefix}/bias": ADAMW}


def _zeros(tree):
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)


def _linen(model: nn.Module, expected: dict, example, batch, loss):
  """A linen family, initialized on ``example``."""
  init = functools.partial(model.init, jax.random.key(0), example)
  params = _zeros(jax.eval_shape(init))["params"]
  return params, expected, dict(model=None, batch=batch, loss=loss,
                                make=lambda: jax.jit(init)()["params"])


def _nnx(make, expected: dict, batch):
  """An NNX family, its module made by ``make()``."""
  model = nnx.eval_shape(make)
  return (_zeros(nnx.state(model, nnx.Param)), expected,
          dict(model=model, batch=batch, loss=None, make=make))


def _tokens():
  return jax.random.randint(jax.random.key(0), (2, SEQ + 1), 0, VOCAB)


def _linen_lm(model: nn.Module, expected: dict):
  """A linen LM family: next-token cross-entropy on a batch of tokens."""
  tokens = _tokens()

  def loss(params, tokens):
    logits = model.apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:]).mean()

  return _linen(model, expected, tokens[:, :-1], tokens, loss)


# --------------------------------------------------------------------------
# linen, after flax's lm1b example


class LinenBlock(nn.Module):
  """Pre-norm decoder block: attention and an MlpBlock of two Dense."""
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=HEADS, qkv_features=HEADS * HEAD_DIM, use_bias=self.use_bias,
        kernel_init=_init, name="SelfAttention_0")(
            y, y, mask=nn.make_causal_mask(x[..., 0]))
    x = x + y
    y = nn.LayerNorm()(x)
    y = LinenMlp(name="MlpBlock_0")(y)
    return x + y


class LinenMlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(EMBED)(nn.gelu(nn.Dense(MLP)(x)))


class LinenLM(nn.Module):
  use_bias: bool = True
  blocks: int = 2

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, EMBED)(tokens)
    pos = self.param("pos_embedding", _init, (1, MAX_LEN, EMBED))
    x = x + pos[:, :tokens.shape[1]]
    for i in range(self.blocks):
      x = LinenBlock(self.use_bias, name=f"encoderdecoderblock_{i}")(x)
    x = nn.LayerNorm(name="encoderdecoder_norm")(x)
    return nn.Dense(VOCAB, name="logitdense")(x)


def _linen_block_routes(prefix: str, use_bias: bool, route=lambda r: r) -> dict:
  routes = {**_norm(f"{prefix}/LayerNorm_0"), **_norm(f"{prefix}/LayerNorm_1"),
            **_attention(f"{prefix}/SelfAttention_0", use_bias),
            **_dense(f"{prefix}/MlpBlock_0/Dense_0"),
            **_dense(f"{prefix}/MlpBlock_0/Dense_1")}
  return {p: route(r) for p, r in routes.items()}


def linen_lm(use_bias: bool = True, blocks: int = 2):
  model = LinenLM(use_bias, blocks)
  expected = {"Embed_0/embedding": ADAMW, "pos_embedding": ADAMW,
              **_norm("encoderdecoder_norm"), **_dense("logitdense", ADAMW)}
  for i in range(blocks):
    expected.update(_linen_block_routes(f"encoderdecoderblock_{i}", use_bias))
  return _linen_lm(model, expected)


# --------------------------------------------------------------------------
# linen nn.scan over the block


class LinenScanned(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, EMBED)(tokens)
    stack = nn.scan(lambda module, carry, _: (module(carry), None),
                    variable_axes={"params": 0},
                    split_rngs={"params": True}, length=LAYERS)
    x, _ = stack(LinenBlock(name="layers"), x, None)
    x = nn.LayerNorm(name="final_norm")(x)
    return nn.Dense(VOCAB, name="logitdense")(x)


def linen_scan():
  model = LinenScanned()
  expected = {"Embed_0/embedding": ADAMW, **_norm("final_norm"),
              **_dense("logitdense", ADAMW),
              **_linen_block_routes("layers", True, stacked)}
  return _linen_lm(model, expected)


# --------------------------------------------------------------------------
# NNX GPT


class NnxBlock(nnx.Module):
  def __init__(self, use_bias: bool, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(EMBED, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
        HEADS, EMBED, qkv_features=HEADS * HEAD_DIM, use_bias=use_bias,
        kernel_init=_init, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(EMBED, rngs=rngs)
    self.mlp_in = nnx.Linear(EMBED, MLP, rngs=rngs)
    self.mlp_out = nnx.Linear(MLP, EMBED, rngs=rngs)

  def __call__(self, x):
    y = self.ln1(x)
    x = x + self.attn(y, mask=nnx.make_causal_mask(x[..., 0]))
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.ln2(x))))


def _nnx_block_routes(prefix: str, use_bias: bool, route=lambda r: r) -> dict:
  routes = {**_norm(f"{prefix}/ln1"), **_norm(f"{prefix}/ln2"),
            **_attention(f"{prefix}/attn", use_bias),
            **_dense(f"{prefix}/mlp_in"), **_dense(f"{prefix}/mlp_out")}
  return {p: route(r) for p, r in routes.items()}


class NnxGPT(nnx.Module):
  def __init__(self, use_bias: bool, blocks: int, rngs: nnx.Rngs):
    self.tok_emb = nnx.Embed(VOCAB, EMBED, rngs=rngs)
    self.pos_emb = nnx.Embed(MAX_LEN, EMBED, rngs=rngs)
    self.blocks = nnx.List([NnxBlock(use_bias, rngs) for _ in range(blocks)])
    self.ln_f = nnx.LayerNorm(EMBED, rngs=rngs)
    self.output_layer = nnx.Linear(EMBED, VOCAB, use_bias=False, rngs=rngs)

  def __call__(self, tokens):
    x = self.tok_emb(tokens) + self.pos_emb(jnp.arange(tokens.shape[1]))
    for block in self.blocks:
      x = block(x)
    return self.output_layer(self.ln_f(x))


def nnx_gpt(use_bias: bool = True, blocks: int = 2):
  expected = {"tok_emb/embedding": ADAMW, "pos_emb/embedding": ADAMW,
              **_norm("ln_f"), "output_layer/kernel": ADAMW}
  for i in range(blocks):
    expected.update(_nnx_block_routes(f"blocks/{i}", use_bias))
  return _nnx(lambda: NnxGPT(use_bias, blocks, nnx.Rngs(0)), expected,
              _tokens())


# --------------------------------------------------------------------------
# NNX stack: made by nnx.vmap over an init function, run by nnx.scan


class NnxStacked(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.tok_emb = nnx.Embed(VOCAB, EMBED, rngs=rngs)

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return NnxBlock(True, rngs)

    self.blocks = make(rngs)
    self.ln_f = nnx.LayerNorm(EMBED, rngs=rngs)
    self.output_layer = nnx.Linear(EMBED, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    x = self.tok_emb(tokens)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x)

    return self.output_layer(self.ln_f(run(x, self.blocks)))


def nnx_stacked():
  expected = {"tok_emb/embedding": ADAMW, **_norm("ln_f"),
              **_dense("output_layer", ADAMW),
              **_nnx_block_routes("blocks", True, stacked)}
  return _nnx(lambda: NnxStacked(nnx.Rngs(0)), expected, _tokens())


# --------------------------------------------------------------------------
# CNNs: two convs, a hidden Dense and a classifier, auto-named in linen


IMAGE, CLASSES = 8, 10


class LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    for features in (8, 16):
      x = nn.relu(nn.Conv(features, (3, 3), kernel_init=_init)(x))
      x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
    return nn.Dense(CLASSES)(x)


def _images():
  return _init(jax.random.key(1), (2, IMAGE, IMAGE, 3)) / 0.02


def linen_cnn():
  model = LinenCNN()
  expected = {**_dense("Conv_0", CONV), **_dense("Conv_1", CONV),
              **_dense("Dense_0"), **_dense("Dense_1", ADAMW)}
  labels = jnp.arange(2) % CLASSES

  def loss(p, images):
    logits = model.apply({"params": p}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           labels).mean()
  return _linen(model, expected, _images(), _images(), loss)


class NnxCNN(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), kernel_init=_init, rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, (3, 3), kernel_init=_init, rngs=rngs)
    self.linear1 = nnx.Linear(16 * (IMAGE // 4)**2, 32, rngs=rngs)
    self.linear2 = nnx.Linear(32, CLASSES, rngs=rngs)

  def __call__(self, x):
    pool = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
    x = pool(nnx.relu(self.conv2(pool(nnx.relu(self.conv1(x))))))
    return self.linear2(nnx.relu(self.linear1(x.reshape(x.shape[0], -1))))


def nnx_cnn():
  expected = {**_dense("conv1", CONV), **_dense("conv2", CONV),
              **_dense("linear1"), **_dense("linear2", ADAMW)}
  return _nnx(lambda: NnxCNN(nnx.Rngs(0)), expected, _images())


# --------------------------------------------------------------------------
# MoE: a router Dense and expert stacks (E, in, out) made with self.param


class MoeBlock(nn.Module):
  """Soft routing, computed densely (every expert on every token)."""

  @nn.compact
  def __call__(self, x):
    gates = jax.nn.softmax(nn.Dense(EXPERTS, use_bias=False,
                                    name="router")(x))
    wi = self.param("wi", _init, (EXPERTS, EMBED, EXPERT_MLP))
    wo = self.param("wo", _init, (EXPERTS, EXPERT_MLP, EMBED))
    h = nn.gelu(jnp.einsum("bsd,edf->bsef", x, wi))
    return jnp.einsum("bsef,efd,bse->bsd", h, wo, gates)


class MoeLayer(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + MoeBlock(name="moe")(nn.LayerNorm(name="pre_norm")(x))


def _moe_routes(prefix: str) -> dict:
  return {**_norm(f"{prefix}/pre_norm"),
          f"{prefix}/moe/router/kernel": DENSE,
          f"{prefix}/moe/wi": stacked(DENSE),
          f"{prefix}/moe/wo": stacked(DENSE)}


class LinenMoE(nn.Module):
  scanned: bool = False

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, EMBED)(tokens)
    if self.scanned:
      stack = nn.scan(lambda module, carry, _: (module(carry), None),
                      variable_axes={"params": 0},
                      split_rngs={"params": True}, length=LAYERS)
      x, _ = stack(MoeLayer(name="layers"), x, None)
    else:
      x = MoeLayer(name="layer_0")(x)
    x = nn.LayerNorm(name="final_norm")(x)
    return nn.Dense(VOCAB, name="logitdense")(x)


def linen_moe(scanned: bool = False):
  model = LinenMoE(scanned)
  expected = {"Embed_0/embedding": ADAMW, **_norm("final_norm"),
              **_dense("logitdense", ADAMW)}
  if scanned:
    expected.update({p: stacked(r)
                     for p, r in _moe_routes("layers").items()})
  else:
    expected.update(_moe_routes("layer_0"))
  return _linen_lm(model, expected)


# The variants without biases (attention routed by names and shapes alone)
# have one block: the update checks compile a program per leaf.
FAMILIES = {
    "linen_lm_bias": functools.partial(linen_lm, True),
    "linen_lm_nobias": functools.partial(linen_lm, False, 1),
    "linen_scan": linen_scan,
    "nnx_gpt_bias": functools.partial(nnx_gpt, True),
    "nnx_gpt_nobias": functools.partial(nnx_gpt, False, 1),
    "nnx_stacked": nnx_stacked,
    "linen_cnn": linen_cnn,
    "nnx_cnn": nnx_cnn,
    "linen_moe": functools.partial(linen_moe, False),
    "linen_moe_scanned": functools.partial(linen_moe, True),
}
