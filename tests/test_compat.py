"""orthax transforms inside the optax / Flax / Orbax ecosystem.

Each test compares numbers against an independent route to the same result:
the transforms applied by hand, NumPy's SVD, a plain optax run, ...
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import orthax
from checkpoints import orbax_round_trip

MDN = orthax.MuonDimensionNumbers


def _normal(seed, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.key(seed), shape)


def _mixed(seed):
  """Hidden matrices (wide, tall), an embedding and a bias: muon's routing."""
  return {
      "embedding": _normal(seed, (10, 8)),
      "hidden": {"w1": _normal(seed + 1, (8, 16)), "w2": _normal(seed + 2, (16, 4))},
      "bias": _normal(seed + 3, (16,)),
  }


def _matrices(seed):
  return {"a": _normal(seed, (6, 12)), "b": _normal(seed + 1, (9, 5))}


def _close(actual, expected, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(
      lambda a, e: np.testing.assert_allclose(
          np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=rtol, atol=atol),
      actual, expected)


def _equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(np.testing.assert_array_equal, actual, expected)


def _np_polar(x):
  u, _, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
  return u @ vt


# --------------------------------------------------------------------------
# optax combinators


def test_chain_equals_hand_composed_transforms():
  parts = [orthax.momentum(0.9), orthax.orthogonalize(),
           orthax.neuron_normalize(0.9), orthax.scale_by_shape("rms"),
           optax.add_decayed_weights(0.1), optax.scale(-0.05)]
  chained = optax.chain(*parts)
  params = _matrices(0)
  chain_state = chained.init(params)
  states = [t.init(params) for t in parts]
  for step in range(3):
    g = _matrices(10 + 2 * step)
    u_chain, chain_state = chained.update(g, chain_state, params)
    u = g
    for i, t in enumerate(parts):
      u, states[i] = t.update(u, states[i], params)
    _close(u_chain, u, rtol=1e-6, atol=1e-7)
    _close(chain_state, tuple(states), rtol=1e-6, atol=1e-7)


def test_chain_matches_numpy_muon_with_exact_polar():
  beta, wd, lr = 0.9, 0.1, 0.05
  tx = optax.chain(orthax.momentum(beta),
                   orthax.orthogonalize(coeffs="svd"), orthax.scale_by_shape(),
                   optax.add_decayed_weights(wd), optax.scale(-lr))
  params = _matrices(0)
  state = tx.init(params)
  mom = {k: np.zeros(v.shape) for k, v in params.items()}
  for step in range(3):
    g = _matrices(10 + 2 * step)
    u, state = tx.update(g, state, params)
    for k, p in params.items():
      g64 = np.asarray(g[k], np.float64)
      mom[k] = beta * mom[k] + (1 - beta) * g64
      nesterov = beta * mom[k] + (1 - beta) * g64
      fan_in, fan_out = p.shape
      want = -lr * (np.sqrt(max(1.0, fan_out / fan_in)) * _np_polar(nesterov)
                    + wd * np.asarray(p, np.float64))
      np.testing.assert_allclose(u[k], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("combine, callable_labels", [
    (optax.partition, False), (optax.multi_transform, True)])
def test_partition_branch_equals_transform_on_subset(combine, callable_labels):
  params = {"w": _normal(0, (8, 16)), "conv": _normal(1, (3, 4, 5)),
            "bias": _normal(2, (16,)), "embedding": _normal(3, (10, 8))}
  labels = {"w": "orth", "conv": "orth", "bias": "sgd", "embedding": "sgd"}
  # A dimension-number tree over *all* params: in the branch, the leaves of the
  # other label are MaskedNodes, which must be skipped.
  full_dn = {"w": None, "conv": MDN(reduction_axis=1, output_axis=2),
             "bias": None, "embedding": None}
  subset_dn = {"w": None, "conv": full_dn["conv"]}

  def orth(dn):
    return optax.chain(orthax.momentum(0.9), orthax.orthogonalize(dimension_numbers=dn),
                       orthax.neuron_normalize(dimension_numbers=dn),
                       orthax.scale_by_shape(dimension_numbers=dn))

  tx = combine({"orth": orth(full_dn), "sgd": optax.sgd(0.1)},
               (lambda p: labels) if callable_labels else labels)
  direct = orth(subset_dn)
  subset = lambda t: {"w": t["w"], "conv": t["conv"]}
  state, direct_state = tx.init(params), direct.init(subset(params))
  for step in range(2):
    g = {k: _normal(10 + 4 * step + i, v.shape) for i, (k, v) in enumerate(params.items())}
    u, state = tx.update(g, state, params)
    want, direct_state = direct.update(subset(g), direct_state, subset(params))
    _close(subset(u), want, rtol=1e-6, atol=1e-7)
    for k in ("bias", "embedding"):
      np.testing.assert_allclose(u[k], -0.1 * g[k], rtol=1e-6)


def test_multisteps_applies_muon_to_mean_gradient():
  k = 3
  tx = optax.MultiSteps(orthax.muon(0.05), every_k_schedule=k)
  update = jax.jit(tx.update)  # eager lax.cond would recompile every call
  params = _mixed(0)
  state = tx.init(params)
  grads = [_mixed(10 + 4 * i) for i in range(k)]
  for g in grads[:-1]:
    u, state = update(g, state, params)
    _equal(u, jax.tree.map(jnp.zeros_like, params))
  u, state = update(grads[-1], state, params)
  mean = jax.tree.map(lambda *gs: sum(gs) / k, *grads)
  ref = orthax.muon(0.05)
  want, want_state = ref.update(mean, ref.init(params), params)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(want)) > 1e-3
  _close(u, want, rtol=1e-4, atol=1e-6)
  _close(state.inner_opt_state, want_state, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_apply_if_finite_skips_non_finite_step(bad):
  tx = optax.apply_if_finite(orthax.muon(0.05), max_consecutive_errors=3)
  update = jax.jit(tx.update)
  ref = orthax.muon(0.05)
  params = _mixed(0)
  state, ref_state = tx.init(params), ref.init(params)
  g1, g3 = _mixed(10), _mixed(20)
  u, state = update(g1, state, params)
  want, ref_state = ref.update(g1, ref_state, params)
  _close(u, want)

  inner_before = state.inner_state
  g2 = jax.tree.map(lambda x: x, g1)
  g2["hidden"]["w1"] = g2["hidden"]["w1"].at[2, 3].set(bad)
  u, state = update(g2, state, params)
  _equal(optax.apply_updates(params, u), params)
  _equal(state.inner_state, inner_before)
  assert int(state.notfinite_count) == 1 and not bool(state.last_finite)

  u, state = update(g3, state, params)  # as if the bad step never happened
  want, ref_state = ref.update(g3, ref_state, params)
  _close(u, want)
  assert int(state.notfinite_count) == 0 and int(state.total_notfinite) == 1


@pytest.mark.parametrize("factory", [orthax.muon, orthax.normuon])
def test_inject_hyperparams_learning_rate_scales_updates(factory):
  tx = optax.inject_hyperparams(factory)(learning_rate=0.1)
  params, g = _mixed(0), _mixed(10)
  state = tx.init(params)
  u1, _ = tx.update(g, state, params)
  plain = factory(0.1)
  _close(u1, plain.update(g, plain.init(params), params)[0])

  state.hyperparams["learning_rate"] = jnp.asarray(0.3)
  u3, new_state = tx.update(g, state, params)
  _close(u3, jax.tree.map(lambda u: 3 * u, u1))
  np.testing.assert_allclose(new_state.hyperparams["learning_rate"], 0.3)


@pytest.mark.parametrize("factory", [orthax.muon, orthax.normuon])
def test_inject_hyperparams_follows_schedule(factory):
  schedule = optax.linear_schedule(0.1, 0.02, transition_steps=3)
  tx = optax.inject_hyperparams(factory)(learning_rate=schedule)
  unit = factory(1.0)  # momentum/AdamW statistics do not depend on the lr
  params = _mixed(0)
  state, unit_state = tx.init(params), unit.init(params)
  for step in range(4):
    g = _mixed(10 + 4 * step)
    u, state = tx.update(g, state, params)
    u1, unit_state = unit.update(g, unit_state, params)
    lr = 0.1 - 0.08 * min(step, 3) / 3
    np.testing.assert_allclose(state.hyperparams["learning_rate"], lr, rtol=1e-6)
    _close(u, jax.tree.map(lambda x: lr * x, u1))


# The adaptive family (issue 14), in the orbax test, which runs it jitted
# (its eager steps are tests/test_adaptive.py's; its transforms' jit and vmap
# are tested with each: test_norm_adaptive.py, test_rms.py, test_root.py).
_FAMILY = [orthax.namo, orthax.namo_d, orthax.adamuon, orthax.root,
           orthax.auon, orthax.hybrid_auon]


@pytest.mark.parametrize("factory", [orthax.muon, orthax.normuon, orthax.pion])
def test_jit_update_equals_eager(factory):
  tx = factory(0.05)
  params = _mixed(0)
  eager_state = jit_state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(3):
    g = _mixed(10 + 4 * step)
    u_eager, eager_state = tx.update(g, eager_state, params)
    u_jit, jit_state = update(g, jit_state, params)
    _close(u_jit, u_eager)
    _close(jit_state, eager_state)


@pytest.mark.parametrize("factory", [orthax.muon, orthax.normuon, orthax.pion])
def test_vmap_update_equals_loop(factory):
  tx, n = factory(0.05), 3
  problems = [_mixed(100 * i) for i in range(n)]
  grads = [[_mixed(100 * i + 10 + 4 * s) for i in range(n)] for s in range(2)]
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)

  states = jax.vmap(tx.init)(stack(problems))
  loop_states = [tx.init(p) for p in problems]
  for gs in grads:
    u, states = jax.vmap(tx.update)(stack(gs), states, stack(problems))
    loop = [tx.update(g, s, p) for g, s, p in zip(gs, loop_states, problems)]
    loop_states = [s for _, s in loop]
    _close(u, stack([u for u, _ in loop]))
  _close(states, stack(loop_states))


# --------------------------------------------------------------------------
# Flax NNX


class _Model(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(12, 16, rngs=rngs)
    self.hidden = nnx.Linear(16, 32, rngs=rngs)
    self.norm = nnx.LayerNorm(32, rngs=rngs)
    self.out = nnx.Linear(32, 4, rngs=rngs)

  def __call__(self, tokens):
    return self.out(jax.nn.gelu(self.norm(self.hidden(self.embed(tokens)))))


def test_nnx_optimizer_with_muon():
  tokens = jnp.arange(12)
  targets = _normal(7, (12, 4))
  loss_fn = lambda m: jnp.mean((m(tokens) - targets) ** 2)
  model = nnx.jit(lambda: _Model(nnx.Rngs(0)))()  # jit: fewer eager compiles
  tx = orthax.muon(0.02, adam_learning_rate=1e-2)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  # First step: the same numbers as plain optax on the pure parameter dict.
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  loss0, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
  g = nnx.to_pure_dict(grads)
  u, _ = jax.jit(tx.update)(g, tx.init(params), params)
  optimizer.update(model, grads)
  _close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), optax.apply_updates(params, u))
  # Routing: the hidden (16, 32) kernel got Muon's step (momentum only rescales
  # the first gradient), the embedding AdamW's first step, lr * sign(g).
  ortho = orthax.orthogonalize().update(g["hidden"]["kernel"], None)[0]
  want = -0.02 * (np.sqrt(2) * ortho + 0.01 * params["hidden"]["kernel"])
  np.testing.assert_allclose(u["hidden"]["kernel"], want, rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(u["embed"]["embedding"],
                             -1e-2 * np.sign(g["embed"]["embedding"]), rtol=1e-3)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(10)]
  assert losses[-1] < 0.5 * float(loss0)
  assert int(optimizer.step[...]) == 11


# --------------------------------------------------------------------------
# Orbax


@pytest.mark.parametrize("factory", [
    orthax.muon, orthax.normuon, orthax.pion,
    functools.partial(orthax.pion, sides="smaller", restore_every=2),
    *_FAMILY])
def test_orbax_resume_is_bit_identical(factory, tmp_path):
  tx = factory(0.02, adam_learning_rate=1e-2)
  tokens, target = jnp.arange(10), _normal(99, (10, 4))

  def loss_fn(p):
    h = jnp.tanh(p["embedding"][tokens] @ p["hidden"]["w1"] + p["bias"])
    return jnp.mean((h @ p["hidden"]["w2"] - target) ** 2)

  @jax.jit
  def step(params, state):
    g = jax.grad(loss_fn)(params)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  def run(params, state, n):
    for _ in range(n):
      params, state = step(params, state)
    return params, state

  params0 = _mixed(0)
  straight = run(params0, tx.init(params0), 6)

  first = run(params0, tx.init(params0), 3)
  restored = orbax_round_trip(tmp_path / "ckpt",
                              {"params": first[0], "opt_state": first[1]})
  assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(first[1])
  resumed = run(restored["params"], restored["opt_state"], 3)

  assert not np.array_equal(straight[0]["hidden"]["w1"], params0["hidden"]["w1"])
  _equal(resumed, straight)
