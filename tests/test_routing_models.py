"""Issue 12: zero-configuration routing on real Flax models.

Every family of ``model_zoo`` (linen and NNX attention LMs with biases on
and off, ``nn.scan`` and ``nnx.vmap``/``nnx.scan`` stacks, linen and NNX CNNs,
plain and scanned MoE) is checked twice: ``orthax.route`` against the table
written by hand, and, independently of ``orthax.route``, the first update of
``orthax.muon`` (and ``orthax.normuon`` where orientation and neurons matter)
called with no routing argument (``routing_check``). The tests at the end show
that the update checks fail on a wrong grouping, orientation or route.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import model_zoo
import orthax
import routing_check
from routing_check import ADAMW, Matrix

FAMILIES = sorted(model_zoo.FAMILIES)
# Checked through nnx.Optimizer (test_nnx_optimizer_step), muon too.
OPTIMIZER_FAMILIES = [("nnx_gpt_bias", False), ("nnx_cnn", False),
                      ("nnx_stacked", True)]
MUON_FAMILIES = sorted(set(FAMILIES) - {f for f, _ in OPTIMIZER_FAMILIES})
# NorMuon's per-neuron statistics show a swapped orientation even on square
# matrices: attention models and a CNN.
NORMUON_FAMILIES = ["linen_lm_bias", "nnx_gpt_bias", "linen_cnn"]


@pytest.mark.parametrize("family", FAMILIES)
def test_routes(family):
  params, expected, extra = model_zoo.FAMILIES[family]()
  routing_check.check_routes(params, expected)
  if extra["model"] is not None:  # the modules' features agree
    routing_check.check_routes(params, expected, model=extra["model"])


@pytest.mark.parametrize("family", MUON_FAMILIES)
def test_muon_updates(family):
  params, expected, _ = model_zoo.FAMILIES[family]()
  routing_check.check_updates(params, expected, optimizer="muon")


@pytest.mark.parametrize("family", NORMUON_FAMILIES)
def test_normuon_updates(family):
  params, expected, _ = model_zoo.FAMILIES[family]()
  routing_check.check_updates(params, expected, optimizer="normuon")


# nnx.Optimizer hands tx.update plain arrays (nnx.as_pure): no Variable
# metadata, so the first two route from names and structure alone; the
# stack also with the model's modules.
@pytest.mark.parametrize("family, with_model", OPTIMIZER_FAMILIES)
def test_nnx_optimizer_step(family, with_model):
  _, expected, extra = model_zoo.FAMILIES[family]()
  model = extra["make"]()
  kwargs = routing_check.step_kwargs("muon")
  if with_model:
    kwargs["model"] = model
  optimizer = nnx.Optimizer(model, orthax.muon(**kwargs), wrt=nnx.Param)
  before = routing_check.arrays_by_path(nnx.state(model, nnx.Param))
  grads = routing_check.gradients(nnx.state(model, nnx.Param), expected)
  updates = nnx.jit(lambda o, m, g: o.update(m, g))(optimizer, model, grads)
  routing_check.verify_updates(updates, grads, expected)
  # ... and moved the model by them: XLA may fuse the sum with the update,
  # so each of the two roundings may differ, u of |update| and of |sum|.
  after = routing_check.arrays_by_path(nnx.state(model, nnx.Param))
  for path, u in routing_check.arrays_by_path(updates).items():
    b, u, a = (np.asarray(x, np.float64)
               for x in (before[path], u, after[path]))
    assert np.all(np.abs(a - (b + u)) <= 2 * routing_check.U32 * (
        np.abs(b) + np.abs(u))), path


def test_training_loss_decreases():
  _, _, extra = model_zoo.linen_moe()
  params = extra["make"]()
  opt = orthax.muon(learning_rate=0.02, adam_learning_rate=3e-3)
  loss_fn, batch = extra["loss"], extra["batch"]

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state, losses = opt.init(params), []
  for _ in range(3):  # each step's loss is the one before its update
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[0] > losses[1] > losses[2], (
      losses)


# --------------------------------------------------------------------------
# The checks can fail: leaves routed wrongly on purpose through `routing`.

_PARAMS = {"layers": jnp.zeros((3, 16, 48)), "query": jnp.zeros((16, 4, 8)),
           "square": jnp.zeros((16, 16)), "head": jnp.zeros((16, 40)),
           "bias": jnp.zeros(16)}
_EXPECTED = {"layers": Matrix((0,), (1,), (2,)),
             "query": Matrix((), (0,), (1, 2)),
             "square": Matrix((), (0,), (1,)), "head": ADAMW, "bias": ADAMW}
_DN = orthax.MuonDimensionNumbers
_RIGHT = {"layers": _DN(1, 2), "query": _DN(0, (1, 2)), "square": _DN(0, 1),
          "head": "adamw", "bias": "adamw"}


@pytest.mark.parametrize("optimizer, wrong", [
    ("muon", {"layers": _DN((0, 1), 2),   # layers flattened into fan_in
              "query": _DN(0, 2),         # heads as a batch axis
              "square": "adamw",          # a matrix given to AdamW
              "head": _DN(0, 1)}),        # an AdamW leaf orthogonalized
    ("normuon", {"layers": _DN(2, 1),     # orientation swapped
                 "square": _DN(1, 0)}),   # the same, on a square matrix
])
def test_update_check_catches(optimizer, wrong):
  # the leaves routed right are the control: they must pass
  with pytest.raises(AssertionError) as info:
    routing_check.check_updates(_PARAMS, _EXPECTED, optimizer=optimizer,
                                routing={**_RIGHT, **wrong})
  listed = re.findall(r"^  (\w+) ", str(info.value), re.MULTILINE)
  assert listed == sorted(wrong), str(info.value)


def test_route_check_lists_every_difference():
  expected = {**_EXPECTED, "query": Matrix((1,), (0,), (2,)), "extra": ADAMW}
  del expected["bias"]
  with pytest.raises(AssertionError) as info:
    routing_check.check_routes(_PARAMS, expected, routing=_RIGHT)
  message = str(info.value)
  assert message.startswith("3 leaves"), message
  for path in ("bias", "extra", "query (16, 4, 8)"):
    assert f"\n  {path}" in message, message
