"""The GPT-2 of the example, in Flax NNX, and its loss.

:class:`GPT`: learned token and position embeddings (``wte``, ``wpe``),
pre-LayerNorm blocks (:class:`Block`: a :class:`CausalSelfAttention`,
which can record its per-head max logits for :func:`orthax.qk_clip`, and an
:class:`MLP`), a final LayerNorm, and a head tied to ``wte`` or a separate
``lm_head``. :func:`_loss` is the next-token cross-entropy. The model checks
its own ``config.model`` (:func:`_check_model`) as it is built.

Mixed precision: ``config.model.dtype`` is the compute dtype of the matrix
products (XLA accumulates them in float32 and rounds the result), the
attention, the GELU and the residual stream; the parameters, and so their
gradients and the optimizer's state, are float32. What stays float32
whatever the compute dtype: the LayerNorm statistics and affine step (Flax
computes them in float32 and casts the result), the attention logits and
softmax (``jax.nn.dot_product_attention``), the loss (the logits are
upcast), the embedding lookups and their sum, and the biases' addition. The
last two are for the gradients: the gradient of an embedding row, of a
position or of a bias is a sum over the batch's tokens, which a bfloat16
lookup or bias would make XLA accumulate in bfloat16 (on XLA:CPU, 2048
ones summed to 256 and 512).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gpt2_errors import ConfigError, _check

if TYPE_CHECKING:  # annotations only: the model runs without ml_collections
  import ml_collections

_MODEL_SIZES = ("vocab_size", "padded_vocab_size", "context", "width",
                "num_layers", "num_heads", "mlp_ratio")


def _check_model(model: ml_collections.ConfigDict) -> None:
  """Checks ``config.model``: positive sizes, vocabularies, heads, dtype."""
  for key in _MODEL_SIZES:
    _check(f"config.model.{key}", model[key], low=1, integer=True)
  if model.padded_vocab_size < model.vocab_size:
    raise ConfigError(
        f"config.model.padded_vocab_size={model.padded_vocab_size} is "
        f"smaller than config.model.vocab_size={model.vocab_size}")
  if model.width % model.num_heads:
    raise ConfigError(f"config.model.num_heads={model.num_heads} must "
                      f"divide config.model.width={model.width}")
  try:
    floating = jnp.issubdtype(jnp.dtype(model.dtype), jnp.floating)
  except TypeError:
    floating = False
  if not floating:
    raise ConfigError("config.model.dtype must name a floating-point dtype "
                      f"('float32', 'bfloat16'), got {model.dtype!r}")


def _promote_all_but_bias(args: tuple[jax.Array, jax.Array, jax.Array | None],
                          *, dtype) -> tuple[jax.Array, ...]:
  """``nnx.Linear``'s promotion of ``(inputs, kernel, bias)``, bias left alone.

  The float32 bias makes the layer's output float32: its gradient, summed
  over the tokens, is then accumulated in float32. :func:`_dense` casts the
  output back to the compute dtype.
  """
  inputs, kernel, bias = args
  return inputs.astype(dtype), kernel.astype(dtype), bias


def _linear(fan_in: int, fan_out: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  """An ``nnx.Linear`` computing in ``dtype`` that adds its bias in float32."""
  return nnx.Linear(fan_in, fan_out, dtype=dtype,
                    promote_dtype=_promote_all_but_bias, rngs=rngs)


def _dense(layer: nnx.Linear, x: jax.Array) -> jax.Array:
  """``layer(x)`` in ``x``'s dtype, the compute dtype (see :func:`_linear`)."""
  return layer(x).astype(x.dtype)


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention with separate Q, K, V and output kernels.

  GPT-2 stores the three input projections as one ``(width, 3 width)``
  kernel; separate kernels compute the same function and make each
  projection its own hidden matrix for Muon (as modded-nanogpt does).

  With ``record_max_logits`` set (by :func:`_loss`), each call also sows
  ``max_logits``: per head, the largest causal logit ``q_i . k_j /
  sqrt(d_head)`` (``j <= i``) over the batch, in float32, the ``S_max``
  that :func:`orthax.qk_clip` compares with its threshold. The heads are
  contiguous blocks of ``d_head`` columns of the query and key kernels
  (``qk_clip``'s default ``head_axis=-1``). Unset (the default), the call
  is the plain attention.
  """

  def __init__(self, width: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
    if width % num_heads:
      raise ValueError(f"num_heads={num_heads} must divide width={width}")
    self.num_heads = num_heads
    self.record_max_logits = False
    dense = functools.partial(_linear, width, width, dtype, rngs)
    self.query, self.key, self.value, self.proj = (dense(), dense(), dense(),
                                                   dense())

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    heads = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
    q, k, v = (heads(_dense(layer, x))
               for layer in (self.query, self.key, self.value))
    if self.record_max_logits:
      self.sow(nnx.Intermediate, "max_logits", self._max_logits(q, k))
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return _dense(self.proj, y.reshape(b, t, d))

  @staticmethod
  def _max_logits(q: jax.Array, k: jax.Array) -> jax.Array:
    """Per head, the max causal logit over the batch: ``(heads,)``."""
    logits = jnp.einsum("bthd,bshd->bhts", q, k,
                        preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(q.shape[-1])
    causal = jnp.tril(jnp.ones(logits.shape[-2:], bool))
    return jnp.max(jnp.where(causal, logits, -jnp.inf), axis=(0, 2, 3))


class MLP(nnx.Module):
  """GPT-2's feed-forward network: ``proj(gelu(fc(x)))`` (tanh GELU)."""

  def __init__(self, width: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.fc = _linear(width, hidden, dtype, rngs)
    self.proj = _linear(hidden, width, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return _dense(self.proj, nnx.gelu(_dense(self.fc, x), approximate=True))


def _layer_norm(width: int, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(width, epsilon=1e-5, dtype=dtype, rngs=rngs)  # GPT-2's


class Block(nnx.Module):
  """Pre-LayerNorm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

  def __init__(self, width: int, num_heads: int, mlp_ratio: int, *, dtype,
               rngs: nnx.Rngs):
    self.ln_1 = _layer_norm(width, dtype, rngs)
    self.attn = CausalSelfAttention(width, num_heads, dtype=dtype, rngs=rngs)
    self.ln_2 = _layer_norm(width, dtype, rngs)
    self.mlp = MLP(width, mlp_ratio * width, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class GPT(nnx.Module):
  """GPT-2: embeddings, pre-LN blocks, final LayerNorm, tied or separate head.

  Attribute names follow GPT-2's checkpoints (``wte``, ``wpe``, ``h``,
  ``ln_f``; ``lm_head`` when untied). :func:`orthax.route` sends the
  embeddings (``nnx.Embed``), the norms, the biases and ``lm_head`` to AdamW
  and makes every other kernel a ``(fan_in, fan_out)`` hidden matrix.
  The embedding tables have ``padded_vocab_size`` rows (a multiple of 128
  runs faster); the logits are cut back to ``vocab_size`` so padded ids never
  take probability. Embeddings start at GPT-2's N(0, 0.02²), hidden kernels
  at Flax's LeCun normal, an untied head at zero (every run starts at the
  uniform prediction).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    """Builds the model.

    Args:
      config: ``vocab_size``, ``padded_vocab_size``, ``context``, ``width``,
        ``num_layers``, ``num_heads``, ``mlp_ratio``, ``tie_embeddings`` and
        ``dtype`` (the compute dtype; parameters are float32).
      rngs: initialization keys.

    Raises:
      ConfigError: a size out of range (``config.model.*``, as
        :func:`gpt2_config.check_config` checks it).
    """
    _check_model(config)
    dtype = jnp.dtype(config.dtype)
    init = nnx.initializers.normal(stddev=0.02)
    self.vocab_size = config.vocab_size
    self.tie_embeddings = config.tie_embeddings
    self.dtype = dtype
    # No dtype: the lookups are float32 (the module's docstring says why).
    self.wte = nnx.Embed(config.padded_vocab_size, config.width,
                         embedding_init=init, rngs=rngs)
    self.wpe = nnx.Embed(config.context, config.width, embedding_init=init,
                         rngs=rngs)
    self.h = nnx.List([
        Block(config.width, config.num_heads, config.mlp_ratio, dtype=dtype,
              rngs=rngs) for _ in range(config.num_layers)])
    self.ln_f = _layer_norm(config.width, dtype, rngs)
    if not config.tie_embeddings:
      self.lm_head = nnx.Linear(config.width, config.padded_vocab_size,
                                use_bias=False,
                                kernel_init=nnx.initializers.zeros,
                                dtype=dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Logits ``(batch, time, vocab_size)`` for int tokens ``(batch, time)``."""
    x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[1]))
    x = x.astype(self.dtype)
    for block in self.h:
      x = block(x)
    x = self.ln_f(x)
    if self.tie_embeddings:  # wte.attend would run in wte's float32
      logits = x @ self.wte.embedding[...].astype(self.dtype).T
    else:
      logits = self.lm_head(x)
    return logits[..., :self.vocab_size]


def _loss(model: GPT, batch: jax.Array, *, max_logits: bool = False) -> Any:
  """Mean next-token cross-entropy (nats) of ``(batch, context + 1)`` tokens.

  With ``max_logits``, ``(loss, recorded)``: ``recorded`` holds each
  attention module's per-head max logits (:class:`CausalSelfAttention`)
  under its path, ``{'h': {0: {'attn': {'max_logits': (S,)}}, ...}}``, the
  ``max_logits=`` of :func:`orthax.qk_clip`. The model is switched to
  recording (it is the one :func:`flax.nnx.merge` made for this call).
  """
  tokens = batch[:, :-1]
  if max_logits:
    for _, module in nnx.iter_modules(model):
      if isinstance(module, CausalSelfAttention):
        module.record_max_logits = True
    logits, recorded = nnx.capture(model, nnx.Intermediate)(tokens)
  else:
    logits = model(tokens)
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), batch[:, 1:]).mean()
  return (loss, nnx.to_pure_dict(recorded)) if max_logits else loss
