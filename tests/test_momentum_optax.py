"""``orthax.momentum(bias_correction=True)`` against optax's Muon momentum.

optax's ``scale_by_muon`` forms a bias-corrected (NAdam-style) momentum and
hands it to its Newton–Schulz step. With that step replaced by the identity
(the update function looks the name up in its module at each call), its
update *is* the momentum, which orthax reproduces: bit for bit eagerly in
float32, within derived rounding bounds under jit and with a bfloat16
average. The whole optimizer is then compared end to end with
``optax.contrib.muon``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib._muon as optax_muon
import pytest

import orthax
import reference

U = 2.0 ** -24  # float32 unit roundoff
JORDAN = (3.4445, -4.7750, 2.0315)  # optax's default ns_coeffs


def _tree(seed, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  shapes = {"wide": (4, 8), "tall": (8, 4), "square": (6, 6)}
  return {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in shapes.items()}


@pytest.fixture
def optax_momentum(monkeypatch):
  """optax's ``scale_by_muon`` whose update is its Newton–Schulz input."""
  monkeypatch.setattr(optax_muon, "orthogonalize_via_newton_schulz",
                      lambda x, *args, **kwargs: x)

  def scale_by_muon(beta, nesterov, mu_dtype=None):
    every_leaf = lambda u: jax.tree.map(
        lambda _: optax.contrib.MuonDimensionNumbers(), u)
    return optax.contrib.scale_by_muon(
        beta=beta, nesterov=nesterov, mu_dtype=mu_dtype,
        weight_dimension_numbers=every_leaf)

  return scale_by_muon


def _assert_equal(ours, theirs):
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)


def _run(tx, params, steps, state=None, jit=False):
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params) if state is None else state
  outs = []
  for step in range(steps):
    u, state = update(_tree(10 + step), state)
    outs.append(u)
  return outs, state


def _magnitudes(betas, nesterov):
  """Per step, the corrected update and the average evaluated on |g| in
  float64 (the scale every rounding error of either path is relative to)."""
  m_abs, out = jax.tree.map(lambda x: np.zeros(x.shape), _tree(0)), []
  for t, beta in enumerate(betas, start=1):
    g = jax.tree.map(lambda x: np.abs(np.asarray(x, np.float64)),
                     _tree(9 + t))
    m_abs = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, m_abs, g)
    if nesterov:
      u = jax.tree.map(lambda m, g: beta * m / (1 - beta ** (t + 1))
                       + (1 - beta) * g / (1 - beta ** t), m_abs, g)
    else:
      u = jax.tree.map(lambda m: m / (1 - beta ** t), m_abs)
    out.append((u, m_abs))
  return out


def _assert_close(ours, theirs, scale, rel):
  jax.tree.map(lambda x, y, s: np.testing.assert_array_less(
      np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)),
      rel * s + 1e-30), ours, theirs, scale)


def _rel_bound(steps, mu_dtype):
  """Both paths evaluate the same nonnegative combination of the gradients;
  each is within gamma_R of it, relative to the combination of |g|
  (Higham, Accuracy and Stability, 3.1), so they are within twice that of
  each other. Along any path at step k: 3 roundings per average step
  (beta * m, (1 - beta) * g, the sum), then at most 6 (each division done
  as a reciprocal and a product, Nesterov's two products and its sum):
  R = 3k + 6 in float32. A bfloat16 average adds its storage rounding each
  step and optax's bfloat16 product beta * m (it multiplies the stored
  average in its own dtype, orthax in float32): 2k roundings of
  2^-9.
  """
  bf16 = 2 * steps * 2.0 ** -9 if mu_dtype == jnp.bfloat16 else 0.0
  return 2 * ((3 * steps + 6) * U + bf16)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("mu_dtype", [None, jnp.bfloat16])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_optax(optax_momentum, nesterov, mu_dtype, jit):
  """Eager float32: bit for bit (the same operations, tree by tree). Under
  jit XLA compiles each program on its own (it may divide through a shared
  reciprocal) and with a bfloat16 average optax rounds beta * m to
  bfloat16: within _rel_bound."""
  params, steps = _tree(0), 4
  ours = orthax.momentum(0.9, nesterov=nesterov, bias_correction=True,
                         mu_dtype=mu_dtype)
  theirs = optax_momentum(beta=0.9, nesterov=nesterov, mu_dtype=mu_dtype)
  u, state = _run(ours, params, steps, jit=jit)
  want, want_state = _run(theirs, params, steps, jit=jit)
  scales = _magnitudes([0.9] * steps, nesterov)
  for t in range(steps):
    _assert_close(u[t], want[t], scales[t][0], _rel_bound(t + 1, mu_dtype))
  _assert_close(state.mu, want_state.mu, scales[-1][1],
                _rel_bound(steps, mu_dtype))
  if not jit and mu_dtype is None:
    _assert_equal(u, want)
    _assert_equal(state.mu, want_state.mu)
  assert state.mu["wide"].dtype == want_state.mu["wide"].dtype
  assert state.count.dtype == want_state.count.dtype == jnp.int32
  assert int(state.count) == int(want_state.count) == steps
  # optax was really patched, and the option really changes the update:
  # Jordan's first update is (1 - beta^2) g_1 (Nesterov) or (1 - beta) g_1,
  # this one (1 + beta / (1 + beta)) g_1 or g_1 (test_first_update)
  jordan, _ = _run(orthax.momentum(0.9, nesterov=nesterov, mu_dtype=mu_dtype),
                   params, 1)
  assert not np.allclose(jordan[0]["wide"], u[0]["wide"], rtol=0.1)


@pytest.mark.parametrize("nesterov", [True, False])
def test_saturated_count_as_optax(optax_momentum, nesterov):
  """At the int32 maximum the count stays put (optax.safe_increment), where
  beta**count is 0: no correction, as in optax."""
  params = _tree(0)
  top = jnp.asarray(jnp.iinfo(jnp.int32).max - 1, jnp.int32)
  ours = orthax.momentum(0.9, nesterov=nesterov, bias_correction=True)
  theirs = optax_momentum(beta=0.9, nesterov=nesterov)
  mu = _tree(1)
  u, state = _run(ours, params, 3, ours.init(params)._replace(
      mu=mu, count=top))
  want, want_state = _run(theirs, params, 3, theirs.init(params)._replace(
      mu=mu, count=top))
  _assert_equal(u, want)
  assert int(state.count) == int(want_state.count) == jnp.iinfo(jnp.int32).max


def test_injected_beta_as_optax(optax_momentum):
  """beta as an injected (float32 array) hyperparameter, changed mid-run,
  under jit: within _rel_bound (the corrections use the current beta)."""
  params, betas = _tree(0), [0.9, 0.9, 0.5, 0.5]
  ours = optax.inject_hyperparams(orthax.momentum)(
      beta=0.9, nesterov=True, bias_correction=True)
  theirs = optax.inject_hyperparams(optax_momentum)(beta=0.9, nesterov=True)
  s_ours, s_theirs = ours.init(params), theirs.init(params)
  scales = _magnitudes(betas, nesterov=True)
  for step, beta in enumerate(betas):
    for s in (s_ours, s_theirs):
      s.hyperparams["beta"] = jnp.asarray(beta, jnp.float32)
    g = _tree(10 + step)
    u, s_ours = jax.jit(ours.update)(g, s_ours)
    want, s_theirs = jax.jit(theirs.update)(g, s_theirs)
    _assert_close(u, want, scales[step][0], _rel_bound(step + 1, None))
  # the new beta was used: Jordan's update at beta 0.9 throughout is far off
  jordan, _ = _run(orthax.momentum(0.9), params, 4)
  assert not np.allclose(jordan[-1]["wide"], u["wide"], rtol=0.1)


@pytest.mark.parametrize("nesterov", [True, False])
def test_first_update(nesterov):
  """The docstring's equations in float64 for three steps; at the first,
  g_1 (1 + beta / (1 + beta)) with Nesterov and g_1 without.

  beta = 0.5 makes beta, 1 - beta, beta**t and 1 - beta**t exact in float32
  and the products by them exact; what rounds is the average's sum (t - 1
  of them on the path of g_2 at step t), the division by 1 - beta**t (2
  roundings if XLA multiplies by a rounded reciprocal) and the Nesterov sum:
  R = t + 2 roundings, so gamma_R < (t + 3) u times the same expression on
  |g| bounds the error (Higham, Accuracy and Stability, 3.1).
  """
  beta, params = 0.5, _tree(0)
  tx = orthax.momentum(beta, nesterov=nesterov, bias_correction=True)
  u, _ = _run(tx, params, 3)
  m, scales = 0.0, _magnitudes([beta] * 3, nesterov)
  for t in (1, 2, 3):
    g = np.asarray(_tree(9 + t)["wide"], np.float64)
    m = beta * m + (1 - beta) * g
    if nesterov:
      want = (beta * m / (1 - beta ** (t + 1))
              + (1 - beta) * g / (1 - beta ** t))
    else:
      want = m / (1 - beta ** t)
    if t == 1:
      first = g * (1 + beta / (1 + beta)) if nesterov else g
      np.testing.assert_allclose(want, first, rtol=1e-12)
    err = np.abs(np.asarray(u[t - 1]["wide"], np.float64) - want)
    bound = (t + 3) * U * scales[t - 1][0]["wide"]
    assert np.all(err <= bound), (t, err.max())


def test_default_state_and_update_unchanged():
  """Without the option the state is mu alone (count None): checkpoints of
  the default keep their leaves."""
  params = _tree(0)
  state = orthax.momentum().init(params)
  assert state.count is None
  assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(params))


def test_state_can_be_donated():
  """The count is a buffer of its own (no leaf shares one): a jitted step
  that donates the state runs twice."""
  params = _tree(0)
  tx = orthax.momentum(bias_correction=True)
  state = tx.init(params)
  leaves = jax.tree.leaves(state)
  assert len(leaves) == len(jax.tree.leaves(params)) + 1
  step = jax.jit(lambda s: tx.update(params, s)[1], donate_argnums=0)
  for _ in range(2):
    pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)]
    assert len(set(pointers)) == len(pointers)
    state = step(state)
  assert int(state.count) == 2


def test_bad_count_is_named():
  params = _tree(0)
  tx = orthax.momentum(bias_correction=True)
  with pytest.raises(ValueError, match=r"count.*does not match"):
    tx.update(params, orthax.momentum().init(params))
  with pytest.raises(TypeError, match="bias_correction"):
    orthax.momentum(bias_correction=1)


# --------------------------------------------------------------------------
# End to end: optax.contrib.muon against the orthax chain


def _orthax_muon(lr, beta, wd, bias_correction):
  """optax's Muon as orthax pieces: its coefficients and steps, its width
  scale sqrt(max(1, fan_out / fan_in)) ("muon" mode), decay, then -lr.
  orthax's eps is relative to max|G| (optax adds 1e-8 to ||G||_F): 0 here,
  optax's 1e-8 enters the bound."""
  return optax.chain(
      orthax.momentum(beta, bias_correction=bias_correction),
      orthax.orthogonalize(coeffs=JORDAN, steps=5, eps=0.0, gram=False),
      orthax.scale_by_shape("muon"), optax.add_decayed_weights(wd),
      optax.scale_by_learning_rate(lr))


def _ns_error_bound(m, eps):
  """First-order bound on ||fl(NS(m)) - NS(m)||_F for Jordan's five steps in
  float32 by either implementation (``reference.newton_schulz_error_bound``,
  derived there), with optax's absolute ``eps`` added to the norm as a
  relative error ``eps / ||m||_F`` of the normalized input; and ||NS(m)||_F.
  """
  return reference.newton_schulz_error_bound(
      m, [JORDAN] * 5, u=U, start=eps / np.linalg.norm(m))


def test_end_to_end_as_optax_muon():
  """Three steps of optax.contrib.muon (2-D leaves: all Muon) and the orthax
  chain. The Newton–Schulz inputs are bit-identical (test_matches_optax,
  eager float32); the outputs differ by the two implementations' rounding,
  each within _ns_error_bound of the exact iteration (orthax's with eps 0,
  optax's with its 1e-8), times lr * scale, plus 5 roundings each (the
  scale factor and its product, the decay's product and sum, lr's
  product) relative to
  lr * (scale ||O||_F + wd ||p||_F). Jordan's form (no correction) must
  fall outside the same bound from the second step on (at the first the
  two forms differ only in scale, which the iteration discards).
  """
  lr, beta, wd = 0.1, 0.95, 0.1
  params = _tree(0)
  txs = (optax.contrib.muon(lr, beta=beta, weight_decay=wd),
         _orthax_muon(lr, beta, wd, bias_correction=True),
         _orthax_muon(lr, beta, wd, bias_correction=False))
  states = [tx.init(params) for tx in txs]
  ns_input = orthax.momentum(beta, bias_correction=True)
  ns_state = ns_input.init(params)
  for step in range(3):
    g = _tree(10 + step)
    outs = []
    for i, tx in enumerate(txs):
      u, states[i] = tx.update(g, states[i], params)
      outs.append(jax.tree.map(lambda x: np.asarray(x, np.float64), u))
    m, ns_state = ns_input.update(g, ns_state)
    theirs, ours, jordan = outs
    for k, p in params.items():
      fan_in, fan_out = p.shape
      scale = np.sqrt(max(1.0, fan_out / fan_in))
      m64 = np.asarray(m[k], np.float64)
      (e_ours, polar), (e_theirs, _) = (_ns_error_bound(m64, 0.0),
                                        _ns_error_bound(m64, 1e-8))
      rest = scale * polar + wd * np.linalg.norm(np.asarray(p, np.float64))
      bound = lr * (scale * (e_ours + e_theirs) + 2 * 5 * U * rest)
      got = np.linalg.norm(ours[k] - theirs[k])
      assert got <= bound, (step, k, got, bound)
      if step > 0:
        off = np.linalg.norm(jordan[k] - theirs[k])
        assert off > bound, (step, k, off, bound)
