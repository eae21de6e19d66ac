"""The adaptive family's ready optimizers (issue 14): NAMO, NAMO-D, AdaMuon,
ROOT, AuON and Hybrid-AuON.

Each ready optimizer is checked three ways: its defaults are the official
code's (as its docstring says); on a small model it gives the hidden matrices
exactly the ``optax.chain`` of public transforms its docstring writes out and
the other leaves AdamW; and over several steps in float64 its matrices follow
the independent NumPy reference of ``tests/reference.py``, written from the
methods' equations. The transforms themselves are tested against the same
references in tests/test_rms.py, test_norm_adaptive.py and test_root.py.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
import reference

LR, ADAM_LR = 0.02, 3e-3


def _params(dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 4)
  return {"embedding": jax.random.normal(keys[0], (20, 12), dtype),
          "w1": jax.random.normal(keys[1], (12, 24), dtype) * 0.1,
          "w2": jax.random.normal(keys[2], (24, 8), dtype) * 0.1,
          "bias": jax.random.normal(keys[3], (8,), dtype) * 0.1}


def _grads(step, dtype=jnp.float32):
  return jax.tree.map(
      lambda p, k: jax.random.normal(k, p.shape, dtype),
      _params(dtype),
      dict(zip(("embedding", "w1", "w2", "bias"),
               jax.random.split(jax.random.key(100 + step), 4))))


MATRICES = ("w1", "w2")


# The official defaults, as each docstring cites them.
DEFAULTS = {
    "namo": dict(beta=0.95, nesterov=True, beta2=0.99, norm_eps=1e-8,
                 coeffs="muon", shape_scale="rms", shape_rms=0.2,
                 weight_decay=0.1, adam_b1=0.9, adam_b2=0.95),
    "namo_d": dict(beta=0.95, beta2=0.99, clamp=0.75, coeffs="muon",
                   shape_scale="rms", weight_decay=0.1, adam_b2=0.95),
    "adamuon": dict(beta=0.95, nesterov=True, sign=False, beta2=0.999,
                    rms_eps=1e-8, target_rms=0.2, coeffs="muon",
                    weight_decay=0.01),
    "root": dict(beta=0.95, nesterov=True, quantile=0.9, coeffs="root",
                 shape_scale="rms", shape_rms=0.2, weight_decay=0.1,
                 adam_b2=0.95, adam_weight_decay=0.1),
    "auon": dict(beta=0.95, nesterov=True, variant="paper", gamma=None,
                 weight_decay=0.0),
    "hybrid_auon": dict(beta=0.95, variant="package", gamma=None,
                        coeffs="muon", steps=None, weight_decay=0.0),
}


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_official_defaults(name):
  params = inspect.signature(getattr(orthax, name)).parameters
  for key, value in DEFAULTS[name].items():
    assert params[key].default == value, (name, key)


def _chain(name, **kw):
  """The chain each docstring writes out, with the defaults above."""
  d = {**DEFAULTS[name], **kw}
  mom = orthax.momentum(d["beta"], nesterov=True)
  decay = optax.add_decayed_weights(d["weight_decay"])
  lr = optax.scale_by_learning_rate(LR)
  if name in ("namo", "namo_d"):
    return orthax.norm_adaptive(
        mom, orthax.orthogonalize(coeffs="muon"), beta1=d["beta"],
        beta2=d["beta2"], eps=1e-8,
        granularity="matrix" if name == "namo" else "input",
        clamp=d.get("clamp"), shape_scale="rms", shape_rms=0.2,
        weight_decay=d["weight_decay"], learning_rate=LR)
  if name == "adamuon":
    return optax.chain(
        mom, *([optax.scale_by_sign()] if d["sign"] else []),
        orthax.orthogonalize(coeffs="muon"),
        optax.scale_by_rms(0.999, 1e-8, eps_in_sqrt=False,
                           bias_correction=True),
        orthax.scale_to_rms(0.2), decay, lr)
  if name == "root":
    return optax.chain(
        mom, orthax.clip_to_quantile(0.9),
        orthax.orthogonalize(coeffs="root"),
        orthax.scale_by_shape("rms", rms=0.2), decay, lr)
  if name == "auon":
    return optax.chain(mom, orthax.cosh_rms_normalize(1.0),
                       orthax.scale_by_shape("muon"), decay, lr)
  return optax.chain(
      mom, orthax.orthogonalize(coeffs="muon", steps=5),
      orthax.cosh_rms_normalize(1.5, normalize_output=False), decay, lr)


@pytest.mark.parametrize("name, kw", [
    *((n, {}) for n in sorted(DEFAULTS)), ("adamuon", dict(sign=True))])
def test_ready_optimizer_is_its_documented_chain(name, kw):
  """The hidden matrices get the docstring's chain, the embedding and the
  bias AdamW with the method's AdamW defaults."""
  tx = getattr(orthax, name)(LR, adam_learning_rate=ADAM_LR, **kw)
  chain = _chain(name, **kw)
  adam_b2 = DEFAULTS[name].get("adam_b2", 0.999)
  adamw = optax.adamw(ADAM_LR, b1=0.9, b2=adam_b2, eps=1e-8,
                      weight_decay=DEFAULTS[name].get("adam_weight_decay", 0.0))
  params = _params()
  hidden = {k: params[k] for k in MATRICES}
  other = {k: params[k] for k in ("embedding", "bias")}
  state = tx.init(params)
  chain_state, adam_state = chain.init(hidden), adamw.init(other)
  for step in range(3):
    g = _grads(step)
    u, state = tx.update(g, state, params)
    want, chain_state = chain.update({k: g[k] for k in MATRICES}, chain_state,
                                     hidden)
    want_adam, adam_state = adamw.update(
        {k: g[k] for k in ("embedding", "bias")}, adam_state, other)
    # The same operations on the same leaves, run eagerly in the same order:
    # only a different fusion could move a rounding, 1e-6 of the entries.
    for k in MATRICES:
      np.testing.assert_allclose(u[k], want[k], rtol=1e-6, atol=1e-9,
                                 err_msg=f"{name} {k} step {step}")
    for k in ("embedding", "bias"):
      np.testing.assert_allclose(u[k], want_adam[k], rtol=1e-6, atol=1e-9,
                                 err_msg=f"{name} {k} step {step}")
    assert float(jnp.abs(u["w1"]).max()) > 0


# Each ready optimizer against its independent float64 reference
# (tests/reference.py), written from the method's equations: the ready
# optimizer's keywords and the reference's, for the same update. "svd" and
# exact polar factors where the method orthogonalizes with the default
# quintic; ROOT drops its eps terms on both sides (orthax's are relative to
# the largest entry, the official code's absolute: tests/test_root.py).
REFERENCES = {
    "namo": (dict(coeffs="svd"), reference.namo_run,
             dict(coeffs=None, granularity="matrix")),
    "namo_d": (dict(coeffs="svd"), reference.namo_run,
               dict(coeffs=None, granularity="input", clamp=0.75)),
    "adamuon": (dict(coeffs="svd"), reference.adamuon_run,
                dict(coeffs=None, sign=False)),
    "adamuon_sign": (dict(coeffs="svd", sign=True), reference.adamuon_run,
                     dict(coeffs=None, sign=True)),
    "root": (dict(coeffs="svd", eps=0.0, quantile_eps=1e-30),
             reference.root_run, dict(table=None, quantile_eps=0.0,
                                      ns_eps=0.0)),
    "auon": ({}, reference.auon_run, dict(variant="paper")),
    "hybrid_auon": ({}, reference.hybrid_auon_run, dict(variant="package")),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_ready_optimizer_follows_the_float64_reference(name):
  """4 steps on the small model; the hidden matrices' weights must equal the
  reference's. float64 rounding (u = 1.1e-16) through at most 5 quintics
  (each multiplying an error by at most 3.4 in the slope at 0) or an SVD,
  and sums of at most 288 terms, stays below 1e-12 of the O(1) weights:
  1e-10 leaves room for any reduction order."""
  ours, run, theirs = REFERENCES[name]
  steps = 4
  with jax.enable_x64(True):
    params = _params(jnp.float64)
    tx = getattr(orthax, name.removesuffix("_sign"))(LR, **ours)
    state, p = tx.init(params), params
    got = []
    for step in range(steps):
      u, state = tx.update(_grads(step, jnp.float64), state, p)
      p = optax.apply_updates(p, u)
      got.append(p)
    grads = [[np.asarray(_grads(t, jnp.float64)[k]) for k in MATRICES]
             for t in range(steps)]
    want = run([np.asarray(params[k]) for k in MATRICES], grads, lr=LR,
               **theirs)
  for step in range(steps):
    for i, k in enumerate(MATRICES):
      np.testing.assert_allclose(got[step][k], want[step][i], rtol=0,
                                 atol=1e-10, err_msg=f"{name} {k} {step}")


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_zero_gradients_give_zero_matrix_updates(name):
  tx = getattr(orthax, name)(LR, weight_decay=0.0, adam_weight_decay=0.0)
  params = _params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  u, _ = tx.update(zeros, tx.init(params), params)
  for k, x in u.items():
    assert np.all(np.asarray(x) == 0), (name, k)


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_bfloat16_params_train(name):
  tx = getattr(orthax, name)(LR)
  params = _params(jnp.bfloat16)
  state = tx.init(params)
  for step in range(2):
    u, state = tx.update(_grads(step, jnp.bfloat16), state, params)
    params = optax.apply_updates(params, u)
  for k, x in params.items():
    assert x.dtype == jnp.bfloat16, (name, k)
    assert np.all(np.isfinite(np.asarray(x, np.float32))), (name, k)


@pytest.mark.parametrize("call, match", [
    (lambda: orthax.namo(LR, beta2=1.0), "beta2"),
    (lambda: orthax.namo_d(LR, clamp=0.0), "clamp"),
    (lambda: orthax.adamuon(LR, rms_eps=-1.0), "rms_eps"),
    (lambda: orthax.root(LR, quantile=1.5), "quantile"),
    (lambda: orthax.auon(LR, variant="v4"), "variant"),
    (lambda: orthax.hybrid_auon(LR, gamma=-1.0), "gamma"),
    (lambda: orthax.namo(LR, cautious_weight_decay=True),
     r"orthax\.namo.*'cautious_weight_decay'"),
])
def test_bad_hyperparameters_are_named(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()
