"""Cautious weight decay and per-leaf learning-rate multipliers (issue 13),
against NumPy float64 references written from the rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
from orthax.transforms.weight_decay import (CautiousWeightDecayState,
                                            cautious_weight_decay,
                                            scale_by_multipliers)

U32 = 2.0 ** -24   # float32 unit roundoff
U16 = 2.0 ** -8    # bfloat16 unit roundoff (8 significant bits)


def _tree(seed, zero_frac=0.0):
  """Params-like tree of float32 leaves, with a fraction of exact zeros."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in (("w", (6, 5)), ("b", (5,))):
    x = rng.normal(size=shape)
    x[rng.random(shape) < zero_frac] = 0.0
    out[name] = jnp.asarray(x, jnp.float32)
  return out


def _cwd(u, p, rate, on=True):
  """The rule in float64: u + rate * [u * p >= 0] * p (where ``on``)."""
  u, p = np.asarray(u, np.float64), np.asarray(p, np.float64)
  return u + rate * (on & (u * p >= 0)) * p


def _check_step(p_new, p, u, rate, lr, on=True):
  """``p_new`` is ``p - lr * (u + rate * mask * p)`` up to float32 rounding.

  The float32 path rounds rate (1), rate * p (1), the sum (1), lr (1) and
  lr * sum (1): 5 roundings of size at most lr * (|u| + rate * |p|); then
  p + step rounds once, by at most |p_new|. Bound: 6 u (lr (|u| + rate |p|))
  + 2 u |p_new| (a margin over 5 and 1 for the second-order terms). The
  reference is fed the same float32 p and u, so the masks agree exactly.
  """
  want = np.asarray(p, np.float64) - lr * _cwd(u, p, rate, on)
  scale = lr * (np.abs(np.asarray(u, np.float64))
                + rate * np.abs(np.asarray(p, np.float64)))
  bound = 6 * U32 * scale + 2 * U32 * np.abs(want)
  err = np.abs(np.asarray(p_new, np.float64) - want)
  assert np.all(err <= bound), float(np.max(err - bound))


def _ties(u, p):
  """Entries where the strict and non-strict rules differ: u == 0 != p."""
  return int(sum(np.sum((np.asarray(u[k]) == 0) & (np.asarray(p[k]) != 0))
                 for k in u))


def _run_chain(tx, steps=4, lr=0.1, rates=None, mask=None, jit=False):
  """Several steps of ``tx`` (ending in scale_by_learning_rate(lr)), each
  checked against the rule at the current float32 params."""
  params = _tree(0, zero_frac=0.2)
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  ties = 0
  for step in range(steps):
    u = _tree(100 + step, zero_frac=0.3)
    ties += _ties(u, params)
    step_u, state = update(u, state, params)
    new = optax.apply_updates(params, step_u)
    for k in params:
      on = True if mask is None else mask[k]
      _check_step(new[k], params[k], u[k], rates[step], lr, on)
    params = new
  assert ties > 0   # the strict (> 0) rule would fail the check above
  return state


def test_cautious_chain_matches_rule_with_ties():
  tx = optax.chain(cautious_weight_decay(0.3),
                   optax.scale_by_learning_rate(0.1))
  state = _run_chain(tx, rates=[0.3] * 4)
  assert isinstance(state[0], optax.EmptyState)


def test_cautious_jit():
  tx = optax.chain(cautious_weight_decay(0.3),
                   optax.scale_by_learning_rate(0.1))
  _run_chain(tx, rates=[0.3] * 4, jit=True)


def test_cautious_schedule():
  rate = lambda t: 0.2 * (t + 1)  # noqa: E731
  tx = optax.chain(cautious_weight_decay(rate),
                   optax.scale_by_learning_rate(0.1))
  state = _run_chain(tx, rates=[0.2 * (t + 1) for t in range(4)], jit=True)
  assert isinstance(state[0], CautiousWeightDecayState)
  assert int(state[0].count) == 4


@pytest.mark.parametrize("kind", ["tree", "callable"])
def test_cautious_mask(kind):
  on = {"w": True, "b": False}
  mask = on if kind == "tree" else (
      lambda p: jax.tree.map(lambda x: x.ndim == 2, p))
  tx = optax.chain(cautious_weight_decay(0.3, mask),
                   optax.scale_by_learning_rate(0.1))
  _run_chain(tx, rates=[0.3] * 4, mask=on)


def test_cautious_inject_hyperparams():
  tx = optax.chain(optax.inject_hyperparams(cautious_weight_decay)(0.3),
                   optax.scale_by_learning_rate(0.1))
  params, u = _tree(0, 0.2), _tree(1, 0.3)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for rate in (0.3, 0.7):
    state[0].hyperparams["weight_decay"] = jnp.asarray(rate, jnp.float32)
    step_u, state = update(u, state, params)
    new = optax.apply_updates(params, step_u)
    # the injected rate is a float32 array: the rounding counted for it in
    # _check_step already covers it
    for k in params:
      _check_step(new[k], params[k], u[k], rate, 0.1)


def test_cautious_inject_schedule_and_static_mask():
  factory = optax.inject_hyperparams(cautious_weight_decay, static_args="mask")
  tx = optax.chain(factory(lambda t: 0.2 * (t + 1),
                           mask=lambda p: {"w": True, "b": False}),
                   optax.scale_by_learning_rate(0.1))
  _run_chain(tx, rates=[0.2 * (t + 1) for t in range(4)],
             mask={"w": True, "b": False})


def test_cautious_tiny_opposite_signs_not_decayed():
  # u * p underflows to -0.0 in float32 for these (1e-60 < 2^-149), and
  # -0.0 >= 0 holds: a product-based mask would decay the opposite signs
  u = jnp.asarray([-1e-30, 1e-30, -1e-30, 1e-30], jnp.float32)
  p = jnp.asarray([1e-30, 1e-30, -1e-30, -1e-30], jnp.float32)
  tx = cautious_weight_decay(0.5)
  out, _ = tx.update({"w": u}, tx.init({"w": p}), {"w": p})
  want = _cwd(u, p, 0.5)
  # one rounding of the sum, of 0.5 and of 0.5 * p (all normal numbers)
  np.testing.assert_allclose(np.asarray(out["w"], np.float64), want,
                             rtol=3 * U32, atol=0)
  assert out["w"][0] == u[0] and out["w"][3] == u[3]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_cautious_low_precision_keeps_dtype(dtype):
  p32, u32 = _tree(0, 0.2)["w"], _tree(1, 0.3)["w"]
  p, u = p32.astype(dtype), u32.astype(dtype)
  tx = cautious_weight_decay(0.3)
  out, _ = tx.update({"w": u}, tx.init({"w": p}), {"w": p})
  assert out["w"].dtype == dtype
  want = _cwd(u.astype(jnp.float32), p.astype(jnp.float32), 0.3)
  # computed in float32 (3 roundings of at most |u| + 0.3 |p|), rounded once
  # to the half-precision dtype (its unit roundoff, 2^-8 bfloat16, 2^-11
  # float16, relative to the result)
  unit = U16 if dtype == jnp.bfloat16 else 2.0 ** -11
  size = (np.abs(np.asarray(u, np.float64))
          + 0.3 * np.abs(np.asarray(p, np.float64)))
  bound = unit * np.abs(want) + 3 * U32 * size
  assert np.all(np.abs(np.asarray(out["w"], np.float64) - want) <= bound)


def test_cautious_needs_params():
  tx = cautious_weight_decay(0.1)
  with pytest.raises(ValueError, match="orthax.cautious_weight_decay needs "
                     "the params"):
    tx.update({"w": jnp.ones(3)}, tx.init({"w": jnp.ones(3)}))


def test_cautious_shape_mismatch_names_leaf():
  tx = cautious_weight_decay(0.1)
  params = {"w": jnp.ones((4, 3))}
  with pytest.raises(ValueError, match=r"cautious_weight_decay: leaf \['w'\] "
                     r"has a gradient of shape \(3, 4\)"):
    tx.update({"w": jnp.ones((3, 4))}, tx.init(params), params)


@pytest.mark.parametrize("value, error", [
    (-0.1, ValueError), (float("nan"), ValueError), ("0.1", TypeError)])
def test_cautious_bad_rate(value, error):
  with pytest.raises(error, match="cautious_weight_decay: weight_decay"):
    cautious_weight_decay(value)


# ---------------------------------------------------------------------------
# scale_by_multipliers

def _model():
  rng = np.random.default_rng(7)
  shapes = {"embed": {"embedding": (5, 3)},
            "blocks": {"attn": {"kernel": (3, 3)}, "mlp": {"kernel": (3, 6)},
                       "norm": {"scale": (3,)}},
            "head": {"kernel": (3, 5)}}
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32),
                      shapes, is_leaf=lambda x: isinstance(x, tuple))


def _check_scaled(out, updates, factors):
  """Each leaf is its update times its factor, up to float32 rounding: the
  factor is rounded to float32 and the product once (2 u relative)."""
  for kp, u in jax.tree_util.tree_leaves_with_path(updates):
    path = jax.tree_util.keystr(kp)
    got = np.asarray(dict(jax.tree_util.tree_leaves_with_path(out))[kp],
                     np.float64)
    want = np.asarray(u, np.float64) * factors[path]
    assert np.all(np.abs(got - want) <= 2 * U32 * np.abs(want)), path


_PATHS = ("['blocks']['attn']['kernel']", "['blocks']['mlp']['kernel']",
          "['blocks']['norm']['scale']", "['embed']['embedding']",
          "['head']['kernel']")


def _factors(attn, mlp, norm, embed, head):
  return dict(zip(_PATHS, (attn, mlp, norm, embed, head)))


@pytest.mark.parametrize("patterns, factors", [
    ({"blocks/*": 0.3, "*/mlp/*": 1.7, "head/kernel": 0.0},
     _factors(0.3, 1.7, 0.3, 1.0, 0.0)),
    # the same patterns the other way round: the last match wins, in the
    # mapping's order (not sorted)
    ({"*/mlp/*": 1.7, "blocks/*": 0.3, "head/kernel": 0.0},
     _factors(0.3, 0.3, 0.3, 1.0, 0.0)),
])
def test_multipliers_by_pattern(patterns, factors):
  g = _model()
  tx = scale_by_multipliers(patterns)
  out, _ = tx.update(g, tx.init(g))
  _check_scaled(out, g, factors)
  out, _ = jax.jit(tx.update)(g, tx.init(g))
  _check_scaled(out, g, factors)


def test_multipliers_by_tree_prefix():
  g = _model()
  spec = {"embed": 0.5, "head": 0.25,
          "blocks": {"attn": 2.0, "mlp": 3.0, "norm": {"scale": 1.5}}}
  tx = scale_by_multipliers(spec)
  out, _ = tx.update(g, tx.init(g))
  _check_scaled(out, g, _factors(2.0, 3.0, 1.5, 0.5, 0.25))


def test_multipliers_flat_mapping_of_top_level_keys_is_a_prefix():
  # 'blocks' names a subtree: as a pattern it would match no leaf
  g = _model()
  tx = scale_by_multipliers({"embed": 0.5, "blocks": 2.0, "head": 0.25})
  out, _ = tx.update(g, tx.init(g))
  _check_scaled(out, g, _factors(2.0, 2.0, 2.0, 0.5, 0.25))


@pytest.mark.parametrize("fn, factors", [
    (lambda p: jax.tree.map(lambda x: 2.0 if x.ndim == 2 else 1.0, p),
     _factors(2.0, 2.0, 1.0, 2.0, 2.0)),
    (lambda p: {"*/kernel": 0.5}, _factors(0.5, 0.5, 1.0, 1.0, 0.5)),
])
def test_multipliers_by_callable(fn, factors):
  g = _model()
  tx = scale_by_multipliers(fn)
  out, _ = tx.update(g, tx.init(g), g)
  _check_scaled(out, g, factors)
  out, _ = tx.update(g, tx.init(g))   # no params: called with the updates
  _check_scaled(out, g, factors)


def test_multipliers_unmatched_pattern_names_examples():
  g = _model()
  tx = scale_by_multipliers({"blocks/*": 2.0, "decoder/*": 1.0})
  for call in (lambda: tx.init(g), lambda: tx.update(g, optax.EmptyState())):
    with pytest.raises(ValueError, match=r"scale_by_multipliers: pattern "
                       r"'decoder/\*' matches no leaf; paths look like "
                       r".*blocks/attn/kernel"):
      call()


@pytest.mark.parametrize("spec, error, match", [
    ({"blocks/*": -1.0}, ValueError, r"multipliers\['blocks/\*'\] must be in "
     r"\[0, inf\)"),
    ({"*/mlp/*": float("inf")}, ValueError, r"multipliers\['\*/mlp/\*'\] "
     "must be finite"),
    ({"embed": 1.0, "head": 1.0,
      "blocks": {"attn": float("nan"), "mlp": 1.0, "norm": 1.0}},
     ValueError, r"multipliers\['blocks'\]\['attn'\] must be finite"),
    ({"head/*": "2"}, TypeError, r"multipliers\['head/\*'\] must be a real"),
])
def test_multipliers_bad_factor_named(spec, error, match):
  with pytest.raises(error, match="orthax.scale_by_multipliers: " + match):
    scale_by_multipliers(spec)


def test_multipliers_bad_factor_from_callable_names_leaf():
  g = _model()
  tx = scale_by_multipliers(
      lambda p: jax.tree.map(lambda x: -1.0 if x.ndim == 1 else 1.0, p))
  with pytest.raises(ValueError, match=r"multipliers\(params\)\['blocks'\]"
                     r"\['norm'\]\['scale'\] must be in \[0, inf\)"):
    tx.init(g)


def test_multipliers_tree_not_a_prefix():
  g = _model()
  tx = scale_by_multipliers({"embed": 1.0, "head": 1.0,
                             "blocks": {"attn": 1.0}})
  with pytest.raises(ValueError, match="scale_by_multipliers: multipliers "
                     "must be .* its structure does not fit"):
    tx.init(g)


def test_multipliers_keep_low_precision_dtype():
  u = _model()["head"]["kernel"].astype(jnp.bfloat16)
  tx = scale_by_multipliers({"w": 0.3})
  out, _ = tx.update({"w": u}, tx.init({"w": u}))
  assert out["w"].dtype == jnp.bfloat16
  want = np.asarray(u, np.float64) * 0.3
  # the float32 product (2 u32) rounded once to bfloat16 (2^-8)
  bound = (U16 + 2 * U32) * np.abs(want)
  assert np.all(np.abs(np.asarray(out["w"], np.float64) - want) <= bound)


def test_muon_like_chain_trains():
  """momentum -> orthogonalize -> shape -> cautious decay -> multipliers ->
  learning rate fits a two-layer tanh regression."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(128, 8)), jnp.float32)
  a, b = rng.normal(size=(8, 16)) / np.sqrt(8), rng.normal(size=(16, 4)) / 4
  y = jnp.asarray(np.tanh(np.asarray(x) @ a) @ b, jnp.float32)
  params = {"w1": jnp.asarray(rng.normal(size=(8, 16)) * 0.1, jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(16, 4)) * 0.1, jnp.float32)}

  def loss(p):
    return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)

  tx = optax.chain(orthax.momentum(0.9), orthax.orthogonalize(),
                   orthax.scale_by_shape(), cautious_weight_decay(0.01),
                   scale_by_multipliers({"w2": 0.5}),
                   optax.scale_by_learning_rate(0.05))

  @jax.jit
  def step(p, s):
    value, g = jax.value_and_grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, value

  state, first = tx.init(params), float(loss(params))
  for _ in range(60):
    params, state, value = step(params, state)
  assert np.isfinite(float(value))
  assert float(loss(params)) < 0.5 * first


def test_docstring_examples():
  import doctest
  from orthax.transforms import weight_decay
  assert doctest.testmod(weight_decay).failed == 0
