"""Unit checks of each transform and of the leaf labelling, against NumPy."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
from orthax.routing import ADAMW, MATRIX

DIMS = orthax.MuonDimensionNumbers


def _rand(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale,
                     jnp.float32)


@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_formula(nesterov):
  beta = 0.9
  tx = orthax.momentum(beta, nesterov=nesterov)
  params = {"a": jnp.zeros((3, 4)), "b": jnp.zeros(5)}
  state = tx.init(params)
  m = {k: np.zeros(v.shape) for k, v in params.items()}
  for step in range(4):
    g = {"a": _rand(step, (3, 4)), "b": _rand(10 + step, (5,))}
    u, state = tx.update(g, state)
    for k in g:
      gk = np.asarray(g[k], np.float64)
      m[k] = beta * m[k] + (1 - beta) * gk
      want = beta * m[k] + (1 - beta) * gk if nesterov else m[k]
      np.testing.assert_allclose(u[k], want, rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(state.mu[k], m[k], rtol=1e-6, atol=1e-7)


def test_momentum_mu_dtype():
  tx = orthax.momentum(mu_dtype=jnp.bfloat16)
  params = {"w": jnp.zeros((4, 4), jnp.float32)}
  state = tx.init(params)
  assert state.mu["w"].dtype == jnp.bfloat16
  u, state = tx.update({"w": jnp.ones((4, 4))}, state)
  assert u["w"].dtype == jnp.float32 and state.mu["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(u["w"], 0.95 * 0.05 + 0.05, rtol=1e-2)


@pytest.mark.parametrize("mode", ["muon", "rms"])
def test_scale_by_shape(mode):
  tree = {"wide": jnp.ones((8, 32)), "tall": jnp.ones((32, 8)),
          "stack": jnp.ones((2, 8, 32))}
  dims = {"wide": None, "tall": None, "stack": DIMS(1, 2)}
  tx = orthax.scale_by_shape(mode, dimension_numbers=dims)
  out, _ = tx.update(tree, tx.init(None))
  if mode == "muon":
    want = {"wide": 2.0, "tall": 1.0, "stack": 2.0}
  else:
    want = {k: 0.2 * np.sqrt(32) for k in tree}
  for k, v in want.items():
    np.testing.assert_allclose(out[k], v, rtol=1e-6)
  with pytest.raises(ValueError, match="Unknown scale_by_shape mode 'nope'"):
    orthax.scale_by_shape("nope")


def _np_neuron_normalize(os_, axis, beta2=0.95, eps=1e-10):
  """NorMuon's rule on 2-D (fan_in, fan_out) matrices, per step."""
  reduce = {"output": 0, "input": 1}[axis]
  nu = None
  outs = []
  for o in os_:
    o = np.asarray(o, np.float64)
    stat = np.mean(o * o, axis=reduce)
    nu = (1 - beta2) * stat if nu is None else beta2 * nu + (1 - beta2) * stat
    scaled = o / (np.expand_dims(np.sqrt(nu), reduce) + eps)
    outs.append(scaled * np.linalg.norm(o) / np.linalg.norm(scaled))
  return outs


@pytest.mark.parametrize("axis,shape,effective", [
    ("output", (12, 20), "output"),
    ("input", (12, 20), "input"),
    ("larger", (12, 20), "output"),   # fan_out is larger
    ("larger", (20, 12), "input"),    # fan_in is larger
])
def test_neuron_normalize_axes(axis, shape, effective):
  scales = np.geomspace(1e-2, 1e2, shape[0 if effective == "input" else 1])
  os_ = [np.asarray(_rand(s, shape)) * (scales[:, None] if effective == "input"
                                        else scales[None, :]) for s in range(3)]
  tx = orthax.neuron_normalize(axis=axis)
  state = tx.init({"w": jnp.zeros(shape)})
  want = _np_neuron_normalize(os_, effective)
  for o, w in zip(os_, want):
    out, state = tx.update({"w": jnp.asarray(o)}, state)
    np.testing.assert_allclose(out["w"], w, rtol=2e-5, atol=1e-7)
  # The rule equalizes neuron scales that differed by 1e4 while keeping ||O||_F.
  norms = np.linalg.norm(np.asarray(out["w"]),
                         axis=0 if effective == "output" else 1)
  assert norms.max() / norms.min() < 3
  np.testing.assert_allclose(np.linalg.norm(out["w"]), np.linalg.norm(os_[-1]),
                             rtol=1e-5)


def test_neuron_normalize_stacked_state_shape():
  tx = orthax.neuron_normalize(dimension_numbers=DIMS(1, 2))
  state = tx.init({"w": jnp.zeros((3, 8, 5))})
  assert state.rms["w"].shape == (3, 5)
  with pytest.raises(ValueError, match="Unknown neuron_normalize axis"):
    orthax.neuron_normalize(axis="rows")


def test_optimizer_routes_leaves():
  """Matrices get the Muon chain, the rest exactly optax.adamw."""
  params = {"embedding": _rand(0, (30, 8)), "w": _rand(1, (8, 16)),
            "b": _rand(2, (16,))}
  grads = jax.tree.map(lambda x: x * 0.5 + 0.1, params)
  opt = orthax.muon(0.02, adam_learning_rate=1e-3, weight_decay=0.0)
  u, _ = opt.update(grads, opt.init(params), params)
  adamw = optax.adamw(1e-3, weight_decay=0.0)
  sub = {"embedding": params["embedding"], "b": params["b"]}
  ua, _ = adamw.update({k: grads[k] for k in sub}, adamw.init(sub), sub)
  for k in sub:
    np.testing.assert_allclose(u[k], ua[k], rtol=1e-6)
  chain = optax.chain(orthax.momentum(), orthax.orthogonalize(),
                      orthax.scale_by_shape(), optax.scale(-0.02))
  um, _ = chain.update({"w": grads["w"]}, chain.init({"w": params["w"]}))
  np.testing.assert_allclose(u["w"], um["w"], rtol=1e-6)


@pytest.mark.parametrize("style", ["callable", "tree", "bool", "numpy_bool"])
def test_routing_override(style):
  params = {"embedding": _rand(0, (30, 8)), "w": _rand(1, (8, 16))}
  tree = {"embedding": MATRIX, "w": ADAMW}
  routing = {"callable": lambda p: tree, "tree": tree,
              "bool": {"embedding": True, "w": False},
              "numpy_bool": {"embedding": np.bool_(True),
                             "w": np.bool_(False)}}[style]
  opt = orthax.muon(0.02, routing=routing, weight_decay=0.0)
  u, _ = opt.update(params, opt.init(params), params)
  # the embedding was orthogonalized: its singular values are all ~equal
  s = np.linalg.svd(np.asarray(u["embedding"]), compute_uv=False)
  assert s.max() / s.min() < 2.0
  # w went to AdamW: first step is -lr * sign(g)
  np.testing.assert_allclose(u["w"], -0.02 * np.sign(params["w"]), rtol=1e-4)


def test_compute_dtype_bfloat16():
  """bf16 iteration returns the input dtype and stays near the f32 result.

  bf16 keeps 8 bits of mantissa (relative spacing 2**-8 = 3.9e-3); the
  matmul operands are rounded to it at every step (products accumulate in
  f32), and five steps compound that to ~1e-2 relative error on the polar
  factor (measured here: 0.018 for "muon" and "polar_express"; it was 0.059
  when the coefficients themselves were rounded to bf16).
  """
  g = {"w": _rand(5, (64, 96))}
  f32, _ = orthax.orthogonalize().update(g, None)
  bf16, _ = orthax.orthogonalize(compute_dtype=jnp.bfloat16).update(g, None)
  assert bf16["w"].dtype == jnp.float32
  err = np.linalg.norm(np.asarray(bf16["w"]) - np.asarray(f32["w"]))
  assert err / np.linalg.norm(np.asarray(f32["w"])) < 0.04
  s = np.linalg.svd(np.asarray(bf16["w"]), compute_uv=False)
  assert 0.6 < s.min() and s.max() < 1.3


def test_tall_matrix_goes_through_transpose():
  """The Gram products of a 48x16 matrix are 16x16, never 48x48."""
  tx = orthax.orthogonalize()
  jaxpr = jax.make_jaxpr(lambda g: tx.update(g, None)[0])({"w": jnp.ones((48, 16))})
  shapes = set()

  def walk(jpr):
    for eqn in jpr.eqns:
      if eqn.primitive.name == "dot_general":
        shapes.add(tuple(eqn.outvars[0].aval.shape))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  assert (16, 16) in shapes and (48, 48) not in shapes, shapes


def test_dimension_numbers_callable():
  params = {"stack": _rand(6, (3, 8, 12)), "w": _rand(7, (8, 12))}
  spec = lambda p: jax.tree.map(lambda x: DIMS(1, 2) if x.ndim == 3 else None, p)
  tx = orthax.orthogonalize(dimension_numbers=spec)
  out, _ = tx.update(params, None)
  with jax.enable_x64(True):
    exact = orthax.orthogonalize(dimension_numbers=spec).update(
        jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params), None)[0]
  for i in range(3):
    single, _ = orthax.orthogonalize().update({"w": params["stack"][i]}, None)
    # A batched and a single matmul round in different orders, so the two
    # float32 paths are compared with the float64 result, each within the
    # float32 bound of tests/test_coefficients.py (1e-5: Polar Express's
    # first step, |b|, |c| about 22 and 16, amplifies rounding).
    for got in (out["stack"][i], single["w"]):
      np.testing.assert_allclose(np.asarray(got, np.float64),
                                 np.asarray(exact["stack"][i]), atol=1e-5)


@pytest.mark.parametrize("coeffs", ["muon", "svd"])
def test_stacked_equals_leaf_by_leaf(coeffs):
  """Same-shape leaves (and transposed shapes) run as one batch, same numbers."""
  tree = {"a": _rand(20, (16, 24)), "b": _rand(21, (24, 16)),
          "c": _rand(22, (3, 16, 24)), "d": _rand(23, (8, 8)),
          "e": _rand(24, (16, 24)).astype(jnp.bfloat16)}
  dims = {"a": None, "b": None, "c": DIMS(1, 2), "d": None, "e": None}
  tx = orthax.orthogonalize(coeffs=coeffs, dimension_numbers=dims)
  out = jax.jit(lambda t: tx.update(t, None)[0])(tree)
  for k, x in tree.items():
    one = orthax.orthogonalize(coeffs=coeffs, dimension_numbers=dims[k])
    want = jax.jit(lambda t: one.update(t, None)[0])({k: x})[k]
    assert out[k].dtype == x.dtype and out[k].shape == x.shape
    tol = 2e-2 if x.dtype == jnp.bfloat16 else 2e-6
    np.testing.assert_allclose(np.asarray(out[k], np.float32),
                               np.asarray(want, np.float32), atol=tol)
  # one call for the 16x24 family: a, b (transposed) and c's 3 slices
  jaxpr = jax.make_jaxpr(lambda t: tx.update(t, None)[0])(tree)
  batches = {tuple(v.aval.shape) for e in jaxpr.jaxpr.eqns
             for v in e.outvars if len(v.aval.shape) == 3}
  assert (5, 16, 24) in batches, batches
