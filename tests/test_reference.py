"""Muon and NorMuon chains against the NumPy float64 reference (tests/reference.py).

Two comparisons for each:
* float64 end to end (``jax.enable_x64``): orthax and the reference compute the
  same numbers by different routes, so they agree to ~1e-12 — any algorithmic
  difference (a missing Nesterov term, a wrong axis, a transposed scale) shows
  up at O(1e-3) or more;
* float32 (the dtype users train in) against float64: Newton–Schulz amplifies
  rounding in small singular values (the composed quintic's slope at 0 is
  3.4445**5 ~ 480), so entries of the f32 polar factor (size ~0.2 here) carry
  relative errors up to ~1e-4, i.e. ~2e-5 absolute; each step moves the params
  by ``lr`` (0.02) times that, ~4e-7, and ``STEPS`` = 6 steps add up to
  ~2.4e-6. We allow 3e-6 (measured on this problem: 2.8e-7 worst).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
import reference

STEPS = 6
LR = 0.02
WD = 0.01
DIMS = orthax.MuonDimensionNumbers

SHAPES = {
    "square": ((32, 32), None),
    "wide": ((16, 48), None),
    "tall": ((48, 16), None),
    "stacked": ((4, 12, 20), DIMS(1, 2)),
    "batch_in_middle": ((12, 3, 20), DIMS(0, 2)),
}


def _problem(seed: int, dtype, neuron_scales: bool = False):
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(size=s) / np.sqrt(s[-2]) for k, (s, _) in SHAPES.items()}
  grads = []
  for _ in range(STEPS):
    g = {}
    for k, (s, _) in SHAPES.items():
      gk = rng.normal(size=s)
      if neuron_scales:  # output neurons whose gradients differ by 1e4
        gk = gk * np.geomspace(1e-2, 1e2, s[-1])
      g[k] = gk
    grads.append(g)
  cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype), t)
  return cast(params), [cast(g) for g in grads]


def _run_orthax(tx, params, grads):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params


def _run_reference(run, params, grads, **kw):
  """Runs the reference on every 2-D slice and returns {leaf: [slices]}."""
  keys = list(SHAPES)
  index = [(k, i) for k in keys
           for i in range(len(reference.matrices_of(np.asarray(params[k]), SHAPES[k][1])))]
  flat = lambda t: [reference.matrices_of(np.asarray(t[k], np.float64), SHAPES[k][1])[i]
                    for k, i in index]
  final = run(flat(params), [flat(g) for g in grads], lr=LR,
              weight_decay=WD, **kw)[-1]
  out = {k: [] for k in keys}
  for (k, _), w in zip(index, final):
    out[k].append(w)
  return out


# orthax's default coefficients (Polar Express), and Jordan's original
# quintic. The reference runs the plain iteration; orthax takes the Gram path
# (gram="auto") on every leaf but the square one.
COEFFS = {
    "polar_express": dict(coeffs=reference.POLAR_EXPRESS,
                          margin=reference.POLAR_EXPRESS_MARGIN),
    "muon": dict(coeffs=None, margin=1.0),
}


def _muon_chain(coeffs):
  dims = {k: spec for k, (_, spec) in SHAPES.items()}
  return optax.chain(
      orthax.momentum(0.95),
      orthax.orthogonalize(coeffs=coeffs, dimension_numbers=dims),
      orthax.scale_by_shape(dimension_numbers=dims),
      optax.add_decayed_weights(WD), optax.scale(-LR))


def _normuon_chain(coeffs):
  dims = {k: spec for k, (_, spec) in SHAPES.items()}
  return optax.chain(
      orthax.momentum(0.95),
      orthax.orthogonalize(coeffs=coeffs, dimension_numbers=dims),
      orthax.neuron_normalize(dimension_numbers=dims),
      orthax.scale_by_shape(dimension_numbers=dims),
      optax.add_decayed_weights(WD), optax.scale(-LR))


# The ready optimizers' routing: every leaf a matrix with SHAPES' axes.
_ROUTING = {k: spec or DIMS(0, 1) for k, (_, spec) in SHAPES.items()}


def _normuon_optimizer(coeffs):
  return orthax.normuon(LR, weight_decay=WD, coeffs=coeffs, routing=_ROUTING)


def _muon_optimizer(coeffs):
  return orthax.muon(LR, weight_decay=WD, coeffs=coeffs, routing=_ROUTING)


CASES = {
    "muon_chain": (_muon_chain, reference.muon_run, False),
    "muon_optimizer": (_muon_optimizer, reference.muon_run, False),
    "normuon_chain": (_normuon_chain, reference.normuon_run, True),
    "normuon_optimizer": (_normuon_optimizer, reference.normuon_run, True),
}


def _compare(got, want, atol):
  for k, (_, spec) in SHAPES.items():
    slices = reference.matrices_of(np.asarray(got[k], np.float64), spec)
    assert len(slices) == len(want[k])
    for s, w in zip(slices, want[k]):
      np.testing.assert_allclose(s, w, atol=atol, rtol=0, err_msg=k)


@pytest.mark.parametrize("coeffs", list(COEFFS))
@pytest.mark.parametrize("case", list(CASES))
def test_float64_matches_reference(case, coeffs):
  make_tx, run, neuron_scales = CASES[case]
  with jax.enable_x64(True):
    params, grads = _problem(0, jnp.float64, neuron_scales)
    got = _run_orthax(make_tx(coeffs), params, grads)
    want = _run_reference(run, params, grads, **COEFFS[coeffs])
    _compare(got, want, atol=1e-10)


@pytest.mark.parametrize("coeffs", list(COEFFS))
@pytest.mark.parametrize("case", list(CASES))
def test_float32_matches_reference(case, coeffs):
  make_tx, run, neuron_scales = CASES[case]
  params, grads = _problem(1, jnp.float32, neuron_scales)
  got = _run_orthax(make_tx(coeffs), params, grads)
  want = _run_reference(run, params, grads, **COEFFS[coeffs])
  _compare(got, want, atol=3e-6)


def test_reference_detects_a_wrong_chain():
  """The comparison has teeth: Muon without Nesterov is far from the reference."""
  with jax.enable_x64(True):
    params, grads = _problem(0, jnp.float64)
    dims = {k: spec for k, (_, spec) in SHAPES.items()}
    tx = optax.chain(
        orthax.momentum(0.95, nesterov=False),
        orthax.orthogonalize(coeffs="muon", dimension_numbers=dims),
        orthax.scale_by_shape(dimension_numbers=dims),
        optax.add_decayed_weights(WD), optax.scale(-LR))
    got = _run_orthax(tx, params, grads)
    want = _run_reference(reference.muon_run, params, grads)
    with pytest.raises(AssertionError):
      _compare(got, want, atol=1e-3)
