"""Every transform's state can be donated: no buffer appears in two leaves.

``jax.jit(step, donate_argnums=...)`` (and ``nnx.jit``) hands each leaf's
buffer to XLA to reuse; a state that holds one array in two leaves fails with
"Attempt to donate the same buffer twice" (Pion's init once returned one
zeros array for both moments).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import orthax

MDN = orthax.MuonDimensionNumbers


def _params(bias):
  keys = jax.random.split(jax.random.key(0), 3)
  params = {"w1": jax.random.normal(keys[0], (8, 16)),
            "w2": jax.random.normal(keys[1], (16, 4)),
            "conv": jax.random.normal(keys[2], (3, 4, 5))}
  dn = {"w1": None, "w2": None, "conv": MDN(1, 2)}
  if bias:
    params["bias"], dn["bias"] = jnp.zeros(16), None
  return params, dn


def _routing(dn):
  """The ready optimizers' routing for ``dn``: its ``None`` (2-D, for the
  matrix transforms) left to the rules."""
  return {k: "auto" if v is None else v for k, v in dn.items()}


def _matrix(make):
  """A matrix transform on matrices and a 3-D leaf with dimension numbers."""
  return lambda: (make(_params(False)[1]), False)


def _optimizer(make):
  """A ready optimizer on matrices, a 3-D leaf and a bias (AdamW's)."""
  return lambda: (make(_params(True)[1]), True)


_ROTATE = {
    f"rotate-{sides}-{restore}": _matrix(
        lambda dn, sides=sides, restore=restore:
        orthax.spectrum_preserving_rotate(0.02, sides=sides,
                                          restore_every=restore,
                                          dimension_numbers=dn))
    for sides in ("both", "left", "right", "smaller")
    for restore in (None, 2)}

CASES = {
    "momentum": _optimizer(lambda dn: orthax.momentum()),
    "orthogonalize": _matrix(
        lambda dn: orthax.orthogonalize(dimension_numbers=dn)),
    "neuron_normalize": _matrix(
        lambda dn: orthax.neuron_normalize(dimension_numbers=dn)),
    "scale_by_shape": _matrix(
        lambda dn: orthax.scale_by_shape(dimension_numbers=dn)),
    **_ROTATE,
    "muon": _optimizer(lambda dn: orthax.muon(0.02, routing=_routing(dn))),
    "normuon": _optimizer(
        lambda dn: orthax.normuon(0.02, routing=_routing(dn))),
    "pion": _optimizer(lambda dn: orthax.pion(0.02, routing=_routing(dn))),
    "pion-restore": _optimizer(
        lambda dn: orthax.pion(0.02, restore_every=2, routing=_routing(dn))),
}


def _assert_no_shared_buffers(state):
  leaves = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
  assert len({id(x) for x in leaves}) == len(leaves)
  pointers = [x.unsafe_buffer_pointer() for x in leaves if x.size]
  assert len(set(pointers)) == len(pointers)


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_can_be_donated(case):
  tx, bias = CASES[case]()
  params, _ = _params(bias)
  grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p) + p, params)
  state = tx.init(params)
  _assert_no_shared_buffers(state)

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, params):
    updates, state = tx.update(grads, state, params)
    return state, optax.apply_updates(params, updates)

  for _ in range(2):  # the second step donates the first step's outputs
    state, params = step(state, params)
    _assert_no_shared_buffers(state)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


class _Model(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(8, 16, rngs=rngs)
    self.out = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


def test_nnx_optimizer_with_pion_can_be_donated():
  model = _Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, orthax.pion(0.02), wrt=nnx.Param)
  _assert_no_shared_buffers(nnx.state(optimizer))
  x = jax.random.normal(jax.random.key(1), (10, 8))
  y = jax.random.normal(jax.random.key(2), (10, 4))
  loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)

  @functools.partial(nnx.jit, donate_argnums=(0, 1))
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(3)]
  _assert_no_shared_buffers(nnx.state(optimizer))
  assert losses[-1] < losses[0]
  assert int(optimizer.step[...]) == 3
