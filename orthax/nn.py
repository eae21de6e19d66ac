"""Flax NNX layers: POET's reparameterized linear layer."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from orthax.transforms.block_rotate import (effective_weights,
                                            generator_blocks,
                                            random_permutations, side_blocks)

__all__ = ["POETBase", "POETLinear", "POETPermutation"]


class POETBase(nnx.Variable):
  """The frozen weights ``W0`` of a :class:`POETLinear` (not an
  ``nnx.Param``: no gradient, no optimizer state)."""


class POETPermutation(nnx.Variable):
  """A :class:`POETLinear`'s permutation of one side's features (int32)."""


def _turn(x: jax.Array, theta: jax.Array, perm: jax.Array,
          neumann: str) -> jax.Array:
  """``x S^T diag(CN(Q_1), ...) S`` for row vectors ``x`` ``(..., s)``, with
  ``(S x)_i = x_{perm_i}``: the features gathered by ``perm``, each group of
  ``b`` times its block, and put back."""
  s = x.shape[-1]
  k = theta.shape[0]
  b = s // k
  blocks = generator_blocks(theta, b, neumann=neumann).astype(x.dtype)
  grouped = jnp.take(x, perm, axis=-1).reshape(*x.shape[:-1], k, b)
  turned = jnp.einsum("...ki,kij->...kj", grouped, blocks,
                      precision=jax.lax.Precision.HIGHEST)
  return jnp.take(turned.reshape(x.shape), jnp.argsort(perm), axis=-1)


class POETLinear(nnx.Module):
  """A linear layer ``y = x R W0 P`` trained as POET-BS: the frozen weights
  ``W0`` turned by block-stochastic rotations.

  ``R`` (``in_features`` square) and ``P`` (``out_features`` square) are
  ``S^T diag(G_1, ...) S`` for a random permutation ``S`` of the side and
  blocks ``G_k = CN(Q_k)`` (:func:`orthax.transforms.block_rotate.
  cayley_neumann`) of skew generators, trained from zero as ``nnx.Param``
  ``theta_in`` and ``theta_out`` (``(blocks, b (b - 1) / 2)`` each, the
  upper triangles). ``W0`` (:class:`POETBase`) and the permutations
  (:class:`POETPermutation`) are not parameters, so an optimizer built on
  ``nnx.Param`` (``nnx.Optimizer(model, tx, wrt=nnx.Param)``) trains the
  generators only. The forward pass is the official code's input-centric
  one: the features are permuted, turned block by block, multiplied by
  ``W0`` and turned again, without forming ``R W0 P`` (``O((m + n) b)``
  extra work per row against ``W0``'s ``m n``).

  Every ``merge_every`` steps POET calls :meth:`merge`, which folds the
  rotations into ``W0``, sets the generators to zero and draws new
  permutations; the generators' optimizer state must then be reset too
  (the official optimizer does: re-initialize it). The same parameters and
  permutations give the same weights as
  :func:`orthax.transforms.block_rotate.block_stochastic_rotate`, the
  optimizer form, whose state holds them for a plain weight.

  Blocks as in the optimizer form: the largest size that divides the side
  and is at most ``block_size`` (``None``: one block per side); a side of
  1 is not rotated. There is no bias (the official layer's is off by
  default).

  Args:
    in_features, out_features: the sizes of ``x``'s last axis and of ``y``'s.
    block_size: the largest block size (``>= 2``), or ``None``.
    neumann: ``"triton"`` or ``"torch"`` (:func:`cayley_neumann`).
    kernel_init: the initializer of ``W0``, ``(in_features, out_features)``.
    param_dtype: the dtype of ``W0`` and of the generators.
    rngs: ``params`` draws ``W0`` and the first permutations.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from orthax.nn import POETLinear
    >>> layer = POETLinear(16, 32, block_size=8, rngs=nnx.Rngs(0))
    >>> y = layer(jnp.ones((4, 16)))
    >>> layer.merge(jax.random.key(1))

  References:
    Qiu, Buchholz, Xiao, Dax, Schölkopf, Liu, Reparameterized LLM Training
    via Orthogonal Equivalence Transformation, NeurIPS 2025,
    arXiv:2506.08001; Qiu, Liu, Weller, Shi, Liu, POET-X, ICML 2026,
    arXiv:2603.05500; github.com/Sphere-AI-Lab/poet
    (``poet_torch/layers/poet_linear.py``)
  """

  def __init__(self, in_features: int, out_features: int, *,
               block_size: int | None = 256, neumann: str = "triton",
               kernel_init: Any = nnx.initializers.lecun_normal(),
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if neumann not in ("triton", "torch"):
      raise ValueError(f"orthax.nn.POETLinear: unknown neumann {neumann!r}; "
                       "expected 'triton' or 'torch'.")
    self.neumann = neumann
    key = rngs.params()
    self.base = POETBase(kernel_init(key, (in_features, out_features),
                                     param_dtype))
    for name, size in (("in", in_features), ("out", out_features)):
      b = side_blocks(size, block_size)
      if size > 1 and b == 1:
        raise ValueError(
            f"orthax.nn.POETLinear: no block size from 2 to {block_size} "
            f"divides {name}_features = {size}; expected a block_size with a "
            "divisor of it at or below it, or block_size=None.")
      setattr(self, f"theta_{name}", nnx.Param(
          jnp.zeros((size // b, b * (b - 1) // 2), param_dtype)))
    perm_in, perm_out = self._permutations(rngs.params())
    self.perm_in = POETPermutation(perm_in)
    self.perm_out = POETPermutation(perm_out)

  def _permutations(self, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    (perm_in, perm_out), = random_permutations(
        key, (tuple((1, n) for n in self.base[...].shape),))
    return perm_in[0], perm_out[0]

  def __call__(self, x: jax.Array) -> jax.Array:
    """``x R W0 P`` for ``x`` ``(..., in_features)``."""
    x = _turn(x, self.theta_in[...], self.perm_in[...], self.neumann)
    y = jnp.matmul(x, self.base[...].astype(x.dtype))
    return _turn(y, self.theta_out[...], self.perm_out[...], self.neumann)

  def effective_weight(self) -> jax.Array:
    """``R W0 P``, ``(in_features, out_features)``."""
    return effective_weights(
        self.base[...][None],
        (self.theta_in[...][None], self.theta_out[...][None]),
        (self.perm_in[...][None], self.perm_out[...][None]),
        neumann=self.neumann)[0]

  def merge(self, key: jax.Array) -> None:
    """``W0 <- R W0 P``, the generators to zero, new permutations from
    ``key``: the layer's function does not change."""
    self.base[...] = self.effective_weight()
    self.theta_in[...] = jnp.zeros_like(self.theta_in[...])
    self.theta_out[...] = jnp.zeros_like(self.theta_out[...])
    self.perm_in[...], self.perm_out[...] = self._permutations(key)
