"""POET-X's optimizer form (``block_stochastic_rotate``, ``orthax.poet``)
against the float64 reference, and its properties.

The permutations are random, drawn by the transform at init and at every
merge; the reference (``reference.poet_run``) is given the ones the state
holds before each step, and the tests check separately that they change
only at merges.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import orthax
import reference
from checkpoints import orbax_round_trip
from orthax.nn import POETLinear
from orthax.structured import poet
from orthax.transforms.block_rotate import (block_stochastic_rotate,
                                            cayley_neumann, side_blocks)

LR, LR_SCALE = 0.05, 0.5
STEPS, MERGE = 7, 3  # merges after steps 3 and 6
U32 = 2.0**-24  # float32 unit roundoff
DIMS = orthax.MuonDimensionNumbers
SHAPES = {  # name: (shape, dimension numbers)
    "square": ((8, 8), None),
    "wide": ((4, 12), None),
    "tall": ((12, 6), None),       # fan_out 6: blocks of 3 (side_blocks)
    "stacked": ((3, 8, 12), DIMS(1, 2)),
}
BLOCK = 4


def _problem(shape, seed=0, steps=STEPS):
  rng = np.random.default_rng(seed)
  return rng.normal(size=shape), [rng.normal(size=shape) for _ in range(steps)]


def _tx(spec=None, **kw):
  return block_stochastic_rotate(
      LR, **{"block_size": BLOCK, "merge_every": MERGE, "lr_scale": LR_SCALE,
             "dimension_numbers": spec, **kw})


class Run(NamedTuple):
  """Jitted steps of one transform on a tree: its inputs, the weights after
  every step and, for every step, the state before it (and the last)."""

  tx: optax.GradientTransformation
  update: Any
  w: dict
  grads: list
  specs: dict
  got: list
  states: list


def _run_from(update, params, state, grads):
  weights, states = [], []
  for g in grads:
    states.append(state)
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    weights.append(jax.tree.map(lambda x: np.asarray(x, np.float64), params))
  return weights, states + [state]


def _run(names, dtype, seed, zero=False, **kw):
  """``STEPS`` steps on a tree with a leaf of each shape in ``names`` (one
  compilation for all), and with ``zero`` an (8, 12) leaf whose gradients
  are zero."""
  problems = {k: _problem(SHAPES[k][0], seed=seed + i)
              for i, k in enumerate(names)}
  if zero:
    problems["zero"] = (_problem((8, 12), seed)[0], [np.zeros((8, 12))] * STEPS)
  w = {k: p[0] for k, p in problems.items()}
  grads = [{k: p[1][t] for k, p in problems.items()} for t in range(STEPS)]
  specs = {k: SHAPES[k][1] if k in SHAPES else None for k in problems}
  tx = _tx(specs, **kw)
  cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype), t)
  update = jax.jit(tx.update)
  got, states = _run_from(update, cast(w), tx.init(cast(w)),
                          [cast(g) for g in grads])
  return Run(tx, update, w, grads, specs, got, states)


def _reference(run, key, **kw):
  """``reference.poet_run`` on each matrix of leaf ``key`` of ``run``, with
  the permutations each step's state held; the leaf's weights per step, in
  its layout."""
  spec, out = run.specs[key], []
  for b, w_b in enumerate(reference.matrices_of(run.w[key], spec)):
    perms = [tuple(None if p is None else np.asarray(p)[b]
                   for p in s.perms[key]) for s in run.states[:-1]]
    gs = [reference.matrices_of(g[key], spec)[b] for g in run.grads]
    blocks = tuple(side_blocks(n, BLOCK) for n in w_b.shape)
    out.append(reference.poet_run(w_b, gs, perms, lr=LR, blocks=blocks,
                                  merge_every=MERGE, lr_scale=LR_SCALE, **kw))
  per_step = [np.stack([o[t] for o in out]) for t in range(len(run.grads))]
  if spec is None:
    return [x[0] for x in per_step]
  batch = 3 - spec.reduction_axis - spec.output_axis
  return [np.moveaxis(x, (0, 1, 2), (batch, spec.reduction_axis,
                                     spec.output_axis)) for x in per_step]


def _check_against_reference(run, names, atol, **kw):
  for k in names:
    want = _reference(run, k, **kw)
    for t in range(STEPS):
      np.testing.assert_allclose(run.got[t][k], want[t], rtol=0,
                                 atol=atol(run.w[k]),
                                 err_msg=f"{k} step {t + 1}")


@pytest.fixture(scope="module")
def f64_run():
  with jax.enable_x64(True):
    return _run(tuple(SHAPES), jnp.float64, seed=0)


@pytest.fixture(scope="module")
def f32_run():
  return _run(("stacked",), jnp.float32, seed=10, zero=True, eps=0.0)


# --------------------------------------------------------------------------
# The algorithm, against the float64 reference

# float64 rounding (u = 1.1e-16) of products of at most 3 b + b_l + b_r = 20
# terms and of 7 Adam steps, each ratio m / sqrt(v) within a few u of the
# reference's: far below 1e-10 of the O(1) weights.
F64_ATOL = 1e-10


def test_float64_matches_reference(f64_run):
  """Square, wide, tall (blocks of 4 and 3) and stacked leaves over 7 steps
  and two merges. The generators reach ||Q|| ~ 0.2 (lr * lr_scale = 0.025
  per entry and step), so the map is far from the identity."""
  _check_against_reference(f64_run, SHAPES, lambda _: F64_ATOL)
  for k in SHAPES:  # the weights did move
    assert np.max(np.abs(f64_run.got[-1][k] - f64_run.w[k])) > 0.05


def test_torch_map_matches_reference():
  with jax.enable_x64(True):
    run = _run(("tall",), jnp.float64, seed=20, neumann="torch")
  _check_against_reference(run, ("tall",), lambda _: F64_ATOL,
                           neumann="torch")


def test_float32_matches_reference(f32_run):
  # Per step, float32 rounds (a) W0 and the weights (u/2 max|W|), (b) the
  # map's three b×b products and the two block rotations, sums of at most
  # 3 b + b_l + b_r = 20 terms of size <= max|W0| (blocks near orthogonal),
  # 20 u max|W|, and (c) the generators' gradients (sums of <= 2 b n = 96
  # terms) through Adam's ratio m / sqrt(v): a relative error of <= 96 u in
  # each ratio moves theta by <= 96 u * lr * lr_scale * (bias factor <= 3.2
  # at t = 1), and W by at most 4 b max|W| times that. Over the <= 3 steps
  # of a window, which a merge freezes into W0 and carries on: 7 steps of
  # (0.5 + 20 + 96 * 0.025 * 3.2 * 16) u max|W| = 7 * 144 u max|W|; a factor
  # 2 for the window's errors carried by the rotations that follow. (A
  # generator gradient cancelled to rounding level could flip its ratio's
  # sign; for these Gaussian draws that has probability ~1e-6 per entry.)
  _check_against_reference(
      f32_run, ("stacked",), eps=0.0,
      atol=lambda w: 2 * STEPS * 144 * U32 * np.max(np.abs(w)))


def test_cayley_neumann_forms():
  """Both maps against the exact Cayley transform, in float64, with the
  algebraic identities that bound their errors."""
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    for scale in (0.01, 0.1, 0.4, 0.9):
      a = rng.normal(size=(6, 6))
      q = scale * (a - a.T) / np.linalg.norm(a - a.T, 2)  # ||Q||_2 = scale
      eye = np.eye(6)
      cayley = (eye + q) @ np.linalg.inv(eye - q)
      triton = np.asarray(cayley_neumann(jnp.asarray(q)[None]))[0]
      torch = np.asarray(cayley_neumann(jnp.asarray(q)[None],
                                        neumann="torch"))[0]
      # float64 rounding of three 6×6 products: <= 1e-14 of the O(1) map
      np.testing.assert_allclose(
          triton, (eye + q) @ (eye + q + q @ q + q @ q @ q), atol=1e-14)
      q4 = np.linalg.matrix_power(q, 4)
      np.testing.assert_allclose(triton, cayley @ (eye - q4), atol=1e-14)
      # ||Triton - Cayley||_2 = ||Q^4||_2 <= ||Q||_2^4 (METHODS.md: 2 ||Q||^4)
      assert np.linalg.norm(triton - cayley, 2) <= scale**4 + 1e-14
      # Torch - Cayley = -2 Q^5 (I - Q)^{-1}, ||(I - Q)^{-1}||_2 <= 1
      assert np.linalg.norm(torch - cayley, 2) <= 2 * scale**5 + 1e-14
      # Triton's singular values are 1 - lambda^4 for Q's eigenvalues ±i lambda
      lam = np.abs(np.linalg.eigvals(q).imag)
      np.testing.assert_allclose(np.sort(np.linalg.svd(triton)[1]),
                                 np.sort(1 - lam**4), atol=1e-14)


def _block_singular_range(theta, perms, neumann):
  """The smallest and largest singular value of one side's rotation."""
  if theta is None:
    return 1.0, 1.0
  s = np.concatenate([np.linalg.svd(reference.poet_rotation(
      np.asarray(theta)[b], np.asarray(perms)[b], neumann), compute_uv=False)
                      for b in range(theta.shape[0])])
  return s.min(), s.max()


def test_singular_values_move_only_by_the_neumann_error(f64_run):
  """Within a merge window sigma_i(R W0 P) lies in sigma_i(W0) [s_min(R)
  s_min(P), s_max(R) s_max(P)], the bounds read from the blocks' own
  singular values (Triton's map: 1 - lambda^4, test_cayley_neumann_forms);
  after 2 steps at lr 0.05 the blocks' error is well above rounding."""
  run, t = f64_run, 2
  for k in ("square", "wide"):
    (lo_l, hi_l), (lo_r, hi_r) = [
        _block_singular_range(th, p, "triton")
        for th, p in zip(run.states[t].theta[k], run.states[t].perms[k])]
    s0 = np.linalg.svd(run.w[k], compute_uv=False)
    s = np.linalg.svd(run.got[t - 1][k], compute_uv=False)
    # the rounding of W (u ||W||) and of two float64 SVDs: 1e-13 of s_1
    tol = 1e-13 * s0[0]
    assert np.all(s <= s0 * hi_l * hi_r + tol), k
    assert np.all(s >= s0 * lo_l * lo_r - tol), k
    assert 1 - lo_l * lo_r > 1e-9, k  # the maps are not orthogonal
    with jax.enable_x64(True):
      drift = orthax.spectrum_drift({"w": jnp.asarray(run.got[t - 1][k])},
                                    {"w": jnp.asarray(run.w[k])})["w"]
    assert float(drift) <= 1 - lo_l * lo_r + 1e-13, k


def test_theta_gradient_matches_finite_differences(f64_run):
  """The first moment after one step from zero moments is (1 - b1) times
  the analytic gradient of L(theta) = <G, R W0 P>; central differences of L
  through the transform's own forward map (a zero gradient leaves theta,
  and the update is then R W0 P - W)."""
  run, key = f64_run, "tall"
  rng = np.random.default_rng(5)
  g = rng.normal(size=run.w[key].shape)
  with jax.enable_x64(True):
    start = run.states[0]
    theta = tuple(jnp.asarray(0.2 * rng.normal(size=x.shape))
                  for x in start.theta[key])
    zero = jax.tree.map(jnp.zeros_like, start.base)

    def at(th):
      return start._replace(theta={**start.theta, key: th})

    def loss(th):
      u, _ = run.update(zero, at(th), zero)
      return float(jnp.sum(u[key] * g))

    _, after = run.update({**zero, key: jnp.asarray(g)}, at(theta), zero)
    h = 1e-5
    for side in range(2):
      analytic = np.asarray(after.mu[key][side]) / (1 - 0.9)
      for idx in np.ndindex(theta[side].shape):
        shifted = [list(theta), list(theta)]
        shifted[0][side] = theta[side].at[idx].add(h)
        shifted[1][side] = theta[side].at[idx].add(-h)
        fd = (loss(tuple(shifted[0])) - loss(tuple(shifted[1]))) / (2 * h)
        # Central differences: truncation h^2 / 6 |L^(3)| (L is a degree-8
        # polynomial in theta with O(10) coefficients: < 1e-8) and rounding
        # u |L| / h (|L| <= 50: 5e-10); 1e-7 leaves room for both.
        assert abs(fd - analytic[idx]) < 1e-7, (side, idx)


# --------------------------------------------------------------------------
# Merges


def test_merge_keeps_the_weights_and_resets_the_generators(f64_run):
  """A merge leaves W_eff unchanged (W0 <- W_new, theta <- 0: R = P = I);
  the moments restart from zero; the permutations (and the key that draws
  them) change at merges only. That the update at the merge step is the
  un-merged formula's, and the step after it a first step (bias correction
  restarted), is checked against the reference (test_float64_...)."""
  run, key = f64_run, "square"
  after = run.states[MERGE]  # the state after the merge step
  # W0 <- W_new; the weights are W + (W_new - W), rounded (u |W|)
  np.testing.assert_allclose(after.base[key], run.got[MERGE - 1][key],
                             rtol=0, atol=1e-15 * np.max(np.abs(run.w[key])))
  for part in (after.theta, after.mu, after.rms):
    assert all(np.all(np.asarray(x) == 0) for x in part[key])
  for part in (run.states[MERGE - 1].mu, run.states[MERGE - 1].rms):
    assert all(np.all(np.asarray(x) != 0) for x in part[key])  # before it
  for t in range(1, len(run.states)):
    same = all(np.array_equal(a, b) for a, b in zip(
        run.states[t - 1].perms[key], run.states[t].perms[key]))
    assert same == (t % MERGE != 0), t
    assert np.array_equal(run.states[t - 1].key, run.states[t].key) == same


# --------------------------------------------------------------------------
# Edge cases and bad input


def test_zero_gradients_give_zero_updates(f32_run):
  """With eps = 0 too: Adam's ratio 0 / 0 is a zero step, not NaN."""
  for w in f32_run.got:
    np.testing.assert_array_equal(
        w["zero"], np.asarray(jnp.asarray(f32_run.w["zero"], jnp.float32)))
  for x in jax.tree.leaves(f32_run.states):
    assert np.all(np.isfinite(np.asarray(x)))


def test_bfloat16_leaves_computed_in_float32():
  run = _run(("wide",), jnp.bfloat16, seed=7)
  # the reference gets the same (bfloat16-rounded) inputs
  run = run._replace(**{name: jax.tree.map(
      lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64),
      getattr(run, name)) for name in ("w", "grads")})
  assert run.states[-1].base["wide"].dtype == jnp.float32
  assert run.states[-1].theta["wide"][0].dtype == jnp.float32
  # The weights differ by their own rounding to bfloat16 at each step, W +
  # (W_new - W) rounded twice (2^-9 of |W| and of the step, <= 2^-8 max|W|
  # in all), plus the float32 computation's error
  # (test_float32_matches_reference: 2 * 7 * 144 u max|W|).
  _check_against_reference(run, ("wide",), lambda w: (
      2**-8 + 2 * STEPS * 144 * U32) * np.max(np.abs(w)))


def test_side_blocks_rule():
  assert side_blocks(768, 256) == 256
  assert side_blocks(96, 256) == 96    # small side: one block
  assert side_blocks(768, 512) == 384  # largest divisor below 512
  assert side_blocks(12, None) == 12
  # a side of 1 is not rotated; a (1, 8) matrix rotates its fan_out only
  state = _tx().init({"w": jnp.ones((1, 8))})
  assert state.theta["w"][0] is None and state.theta["w"][1].shape == (1, 2, 6)


@pytest.mark.parametrize("call, error, match", [
    (lambda tx, p: tx.update(p, tx.init(p)), ValueError, "needs the params"),
    (lambda tx, p: tx.update({"w": jnp.ones((6, 8))}, tx.init(p), p),
     ValueError, r"\['w'\] has a gradient of shape \(6, 8\)"),
    (lambda tx, p: tx.init({"w": jnp.ones((7, 8))}),
     ValueError, r"\['w'\] of shape \(7, 8\) has a fan_in side of 7"),
    (lambda tx, p: tx.update(p, _tx(block_size=2).init(p), p),
     ValueError, r"\['w'\] \(theta, left\) is an array of shape \(1, 4, 1\)"),
    (lambda tx, p: tx.update({"w": jnp.ones((8, 8), jnp.int32)}, tx.init(p),
                             p), TypeError, r"\['w'\] has dtype int32"),
])
def test_bad_input_is_named(call, error, match):
  with pytest.raises(error, match=match):
    call(_tx(), {"w": jnp.ones((8, 8))})


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(block_size=1), ValueError, "block_size"),
    (dict(merge_every=0), ValueError, "merge_every"),
    (dict(neumann="exact"), ValueError, "neumann"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(lr_scale=0.0), ValueError, "lr_scale"),
    (dict(seed=0.5), TypeError, "seed"),
])
def test_hyperparameters_checked_at_construction(kwargs, error, match):
  with pytest.raises(error, match=match):
    _tx(**kwargs)


def test_orbax_resume_is_bit_identical(f32_run, tmp_path):
  """Saved after step 2 (inside the first window) and restored, the state
  goes on through two merges to the same weights, bit for bit."""
  run = f32_run
  tree = {"params": jax.tree.map(lambda x: jnp.asarray(x, jnp.float32),
                                 run.got[1]), "state": run.states[2]}
  restored = orbax_round_trip(tmp_path / "ckpt", tree)
  assert jax.tree.structure(restored) == jax.tree.structure(tree)
  # through NumPy (exact), so that the arrays are uncommitted like those the
  # update was compiled for, and it is not compiled again
  restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restored)
  grads = [jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)
           for g in run.grads[2:]]
  resumed, _ = _run_from(run.update, restored["params"], restored["state"],
                         grads)
  for k in run.w:
    np.testing.assert_array_equal(resumed[-1][k], run.got[-1][k])


# --------------------------------------------------------------------------
# The ready optimizer


def _adam(p, grads, *, lr=1e-3, b1=0.9, b2=0.999, eps=1e-6):
  """optax.adam's step (eps on the bias-corrected sqrt(v)) on one array in
  float64 NumPy; the values after every step."""
  m, v, out = np.zeros_like(p), np.zeros_like(p), []
  for t, g in enumerate(grads, start=1):
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    out.append(p)
  return out


def test_ready_optimizer_follows_the_reference_and_adamw():
  """A hidden matrix gets the rotation (against the reference), the
  embedding and the bias AdamW at the official 1e-3 and eps 1e-6."""
  steps, rng = 4, np.random.default_rng(11)
  params = {"embedding": rng.normal(size=(20, 12)),
            "w1": rng.normal(size=(12, 8)) / 4, "bias": rng.normal(size=8)}
  grads = [{k: rng.normal(size=x.shape) for k, x in params.items()}
           for _ in range(steps)]
  with jax.enable_x64(True):
    tx = poet(LR, block_size=BLOCK, merge_every=MERGE)
    run = _run_from(jax.jit(tx.update), jax.tree.map(jnp.asarray, params),
                    tx.init(jax.tree.map(jnp.asarray, params)),
                    [jax.tree.map(jnp.asarray, g) for g in grads])
  got, states = run
  perms = [tuple(np.asarray(x)[0] for x in
                 s.inner_states["matrix"].inner_state.perms["w1"])
           for s in states[:-1]]
  want = reference.poet_run(params["w1"], [g["w1"] for g in grads], perms,
                            lr=LR, blocks=(4, 4), merge_every=MERGE)
  for t in range(steps):  # as test_float64_matches_reference
    np.testing.assert_allclose(got[t]["w1"], want[t], rtol=0, atol=F64_ATOL)
  for k in ("embedding", "bias"):
    want = _adam(params[k], [g[k] for g in grads])
    for t in range(steps):
      # a few float64 roundings (u = 1.1e-16) of |p| <= 5 per step
      np.testing.assert_allclose(got[t][k], want[t], rtol=0, atol=1e-14)


def test_ready_optimizer_defaults_are_the_official_ones():
  sig = inspect.signature(poet).parameters
  official = dict(block_size=256, merge_every=200, b1=0.9, b2=0.999, eps=1e-6,
                  lr_scale=0.5, neumann="triton", adam_learning_rate=1e-3,
                  adam_b1=0.9, adam_b2=0.999, adam_eps=1e-6,
                  adam_weight_decay=0.0)
  assert {k: sig[k].default for k in official} == official


# --------------------------------------------------------------------------
# The reparameterized layer (orthax.nn.POETLinear)


def test_poet_linear_forward_and_merge():
  """x R W0 P with R and P written out by the reference; a merge keeps the
  layer's function, zeroes the generators and draws new permutations."""
  rng = np.random.default_rng(12)
  x = rng.normal(size=(5, 8))

  @nnx.jit
  def forward_and_merge(layer, x, key):
    y, w = layer(x), layer.effective_weight()
    layer.merge(key)
    return y, w, layer(x)

  with jax.enable_x64(True):
    layer = POETLinear(8, 12, block_size=BLOCK, param_dtype=jnp.float64,
                       kernel_init=nnx.initializers.normal(1.0),
                       rngs=nnx.Rngs(0))
    for name in ("theta_in", "theta_out"):
      param = getattr(layer, name)
      param[...] = jnp.asarray(0.2 * rng.normal(size=param[...].shape))
    want = reference.poet_effective(
        np.asarray(layer.base[...]),
        (np.asarray(layer.theta_in[...]), np.asarray(layer.theta_out[...])),
        (np.asarray(layer.perm_in[...]), np.asarray(layer.perm_out[...])),
        "triton")
    perms = np.asarray(layer.perm_in[...]), np.asarray(layer.perm_out[...])
    y, w, merged = forward_and_merge(layer, jnp.asarray(x),
                                     jax.random.key(1))
  # float64 products of at most 3 b + b + 8 + b = 28 terms: 1e-12 of |y|
  np.testing.assert_allclose(y, x @ want, rtol=0, atol=1e-12)
  np.testing.assert_allclose(w, want, rtol=0, atol=1e-12)
  np.testing.assert_allclose(merged, y, rtol=0, atol=1e-12)
  assert np.all(np.asarray(layer.theta_in[...]) == 0)
  assert np.all(np.asarray(layer.theta_out[...]) == 0)
  assert not (np.array_equal(layer.perm_in[...], perms[0])
              and np.array_equal(layer.perm_out[...], perms[1]))


def test_poet_linear_with_adam_follows_the_optimizer_form(f32_run):
  """optax.adam (eps 0, where POETAdamW's eps placement does not matter) on
  the layer's generators, and the optimizer form (f32_run's transform, eps
  0) on a plain weight with the layer's W0 and permutations, give the same
  weights over the first window (3 steps, the merge step included)."""
  rng = np.random.default_rng(13)
  x, y = (jnp.asarray(rng.normal(size=s), jnp.float32)
          for s in ((16, 8), (16, 12)))
  layer = POETLinear(8, 12, block_size=BLOCK,
                     kernel_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(1))
  graphdef, theta, rest = nnx.split(layer, nnx.Param, ...)
  adam = optax.adam(LR * LR_SCALE, eps=0.0)

  @jax.jit
  def layer_step(theta, opt):
    grads = jax.grad(lambda th: jnp.mean(
        (nnx.merge(graphdef, th, rest)(x) - y) ** 2))(theta)
    updates, opt = adam.update(grads, opt)
    theta = optax.apply_updates(theta, updates)
    return theta, opt, nnx.merge(graphdef, theta, rest).effective_weight()

  weight_grad = jax.jit(jax.grad(lambda w: jnp.mean((x @ w - y) ** 2)))

  start = f32_run.states[0]
  state = start._replace(
      base={**start.base, "zero": layer.base[...]},
      perms={**start.perms, "zero": (layer.perm_in[...][None],
                                     layer.perm_out[...][None])})
  params = {"stacked": jnp.asarray(f32_run.w["stacked"], jnp.float32),
            "zero": layer.base[...]}
  opt = adam.init(theta)
  zero = jnp.zeros_like(params["stacked"])
  for step in range(MERGE):
    g = {"stacked": zero, "zero": weight_grad(params["zero"])}
    u, state = f32_run.update(g, state, params)
    params = optax.apply_updates(params, u)
    theta, opt, w = layer_step(theta, opt)
    # two float32 routes to the same weights, each within
    # test_float32_matches_reference's bound (per step 2 * 144 u max|W|)
    np.testing.assert_allclose(
        params["zero"], w, rtol=0,
        atol=2 * (step + 1) * 2 * 144 * U32 * np.max(np.abs(layer.base[...])))
  assert np.max(np.abs(params["zero"] - layer.base[...])) > 1e-2  # it moved

