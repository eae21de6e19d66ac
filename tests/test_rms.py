"""orthax.scale_to_rms and orthax.cosh_rms_normalize (issue 14).

* the transforms against their float64 formulas, per matrix slice, on
  square, wide, tall and stacked leaves, in float64 and float32, at extreme
  scales, and on zero, empty, bf16 and bad leaves;
* the properties of METHODS.md §1(e) (AuON) and §8a(e) (AdaMuon);
* the AdaMuon, AuON and Hybrid-AuON chains against the NumPy references of
  tests/reference.py over several steps: float64 to 1e-10 (same Newton–Schulz
  coefficients, or exact polar factors), float32 within bounds derived from
  the float32 unit roundoff.

orthax.momentum (default: Nesterov, no bias correction) is the papers'
momentum: its ``m <- beta m + (1 - beta) g`` and ``beta m + (1 - beta) g``
are torch's ``m.lerp_(g, 1 - beta)`` and ``g.lerp_(m, beta)``.
"""

from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
import reference
from orthax.transforms import rms

DIMS = orthax.MuonDimensionNumbers
U32 = 2.0**-24  # unit roundoffs
U64 = 2.0**-53
STEPS = 6
LR = 0.02
WD = 0.01

SHAPES = {
    "square": ((12, 12), None),
    "wide": ((8, 20), None),
    "tall": ((20, 8), None),
    "stacked": ((3, 8, 20), DIMS(1, 2)),
    "batch_in_middle": ((8, 3, 20), DIMS(0, 2)),
}
SPECS = {k: spec for k, (_, spec) in SHAPES.items()}

# gamma, normalize_input, normalize_output (cosh_rms_normalize's docstring)
FLAGS = {
    "paper_auon": (1.0, True, True),
    "package_auon": (1.5, True, False),
    "paper_hybrid": (1.0, False, False),
    "input_only": (1.5, False, True),
}


def _cosh(name, **kw):
  gamma, normalize_input, normalize_output = FLAGS[name]
  return orthax.cosh_rms_normalize(gamma, normalize_input=normalize_input,
                                   normalize_output=normalize_output, **kw)


def _batch_axis(spec) -> int:
  return 3 - spec.reduction_axis - spec.output_axis


def _flat(tree) -> list[np.ndarray]:
  """Every matrix of a tree of SHAPES' leaves, in float64, leaf by leaf."""
  return [s for k, spec in SPECS.items()
          for s in reference.matrices_of(np.asarray(tree[k], np.float64), spec)]


def _tree(seed: int, dtype, slice_scales=(0.1, 1.0, 10.0)):
  """Gaussian leaves of SHAPES; the three matrices of a stacked leaf scaled
  apart, so that one norm for a whole leaf would be visibly wrong."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, (shape, spec) in SHAPES.items():
    x = rng.normal(size=shape)
    if spec is not None:
      scale_shape = [1, 1, 1]
      scale_shape[_batch_axis(spec)] = 3
      x = x * np.reshape(slice_scales, scale_shape)
    out[k] = jnp.asarray(x, dtype)
  return out


def _problem(seed: int, dtype):
  params = jax.tree.map(lambda x: x / np.sqrt(x.shape[-2]),
                        _tree(seed, dtype, (1.0, 1.0, 1.0)))
  return params, [_tree(seed + 1 + t, dtype) for t in range(STEPS)]


def _run_orthax(tx, params, grads, jit=False):
  """The chain over the steps; eager by default: the many chains of this
  file then share XLA's per-operation compilations (one jit each would cost
  seconds of compilation per chain)."""
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params


def _run_reference(run, params, grads, aux=None, **kw):
  """The reference on every matrix: its history, matrices in _flat's order."""
  return run(_flat(params), [_flat(g) for g in grads], lr=LR,
             weight_decay=WD, aux=aux, **kw)


def _update(tx, tree):
  out, _ = tx.update(tree, tx.init(tree))
  return out


# --------------------------------------------------------------------------
# The transforms against their formulas


def _scale_to_rms_formula(x, target=0.2, eps=0.0):
  return target * np.sqrt(x.size) * x / (
      np.linalg.norm(x) + eps * np.max(np.abs(x)))


def _cosh_formula(g, name, eps_norm=1e-7, eps=1e-8, gamma=None):
  """AuON's normalization of one matrix, in float64 (FLAGS' settings, or
  another ``gamma``), and its largest cosh argument."""
  default_gamma, normalize_input, normalize_output = FLAGS[name]
  gamma = default_gamma if gamma is None else gamma
  x = g / (np.linalg.norm(g) + eps_norm * np.max(np.abs(g)))
  y = gamma * (x if normalize_input else g)
  with np.errstate(over="ignore"):  # r = inf: out = 0, its rounded value
    r = np.sqrt(np.mean(np.cosh(y) ** 2))
  return (x if normalize_output else g) / (r + eps), np.max(np.abs(y))


def _scale_to_rms_rtol(n, u):
  """``out = target sqrt(N) X / ||X||``, with the norm of ``X / max|X|``:
  a sum of N squares (N u), its root and the divisions and products (6 u):
  (N + 6) u relative per entry; the NumPy route as much again in float64."""
  return 2 * (n + 6) * u


def _cosh_error(n, arg, u):
  """Relative error of cosh_rms_normalize's ``Z / (r + eps)`` per entry:
  ``X`` as in _scale_to_rms_rtol, (N + 6) u; ``1/r`` from sums of N terms
  (N u), whose exponentials ``exp(2 (a - t))``, ``exp(-t)`` carry the
  rounding of their arguments, at most 4 ``arg`` u with ``arg`` the largest
  ``gamma |Y|``, and about 24 further roundings (expm1, exp, squares,
  roots, products, quotients, the eps term): (2 N + 4 arg + 30) u."""
  return (2 * n + 4 * arg + 30) * u


def _cosh_rtol(n, arg, u):
  """_cosh_error for orthax and as much again for the NumPy route."""
  return 2 * _cosh_error(n, arg, u)


@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_scale_to_rms_matches_formula_per_matrix(eps):
  with jax.enable_x64(True):
    tree = _tree(0, jnp.float64)
    out = _update(orthax.scale_to_rms(0.2, eps=eps, dimension_numbers=SPECS),
                  tree)
  for got, x in zip(_flat(out), _flat(tree)):
    np.testing.assert_allclose(got, _scale_to_rms_formula(x, 0.2, eps),
                               rtol=_scale_to_rms_rtol(x.size, U64))


@pytest.mark.parametrize("name", list(FLAGS))
def test_cosh_rms_normalize_matches_formula_per_matrix(name):
  """Slices 100x apart in scale: a norm or an r taken over the whole leaf
  (as the official code does on its 2-D tensors) fails here."""
  with jax.enable_x64(True):
    tree = _tree(1, jnp.float64)
    out = _update(_cosh(name, dimension_numbers=SPECS), tree)
  for got, g in zip(_flat(out), _flat(tree)):
    want, arg = _cosh_formula(g, name)
    np.testing.assert_allclose(got, want, rtol=_cosh_rtol(g.size, arg, U64))


# float32 leaves at the edges of the range, where a sum of squares of the
# raw entries would overflow (huge, near_max) or underflow (tiny: squares of
# 1e-30 are below float32's subnormals). Not tested: subnormal entries (XLA
# flushes them to zero in every operation), and max|G| above 2**126 ~ 8.5e37,
# where XLA computes divide_by_max_abs's G / max|G| as G * (1 / max|G|)
# with a flushed subnormal reciprocal: every orthax transform then gives 0
# (a limit of orthax.polar.divide_by_max_abs, shared by all of them).
SCALES = {"tiny": 1e-30, "huge": 1e30, "near_max": 8e37}


@pytest.mark.parametrize("scale", list(SCALES))
def test_float32_at_extreme_scales_matches_formula(scale):
  """float32 against the float64 formula on the same float32 input. Where
  the exact output is below float32's normal range (package AuON and the
  paper Hybrid keep G's scale) it may flush to 0: atol 2**-126."""
  rng = np.random.default_rng(2)
  g = rng.normal(size=(8, 20))
  g = jnp.asarray(g / np.max(np.abs(g)) * SCALES[scale], jnp.float32)
  g64 = np.asarray(g, np.float64)
  cases = {"scale_to_rms": (orthax.scale_to_rms(),
                            _scale_to_rms_formula(g64),
                            _scale_to_rms_rtol(g.size, U32))}
  for name in FLAGS:
    want, arg = _cosh_formula(g64, name)
    cases[name] = (_cosh(name), want,
                   _cosh_rtol(g.size, min(arg, 1e4), U32))
  for name, (tx, want, rtol) in cases.items():
    got = np.asarray(_update(tx, {"w": g})["w"], np.float64)
    assert np.all(np.isfinite(got)), name
    np.testing.assert_allclose(got, want, rtol=rtol, atol=2.0**-126,
                               err_msg=name)


def test_cosh_factor_never_overflows_nor_underflows_early():
  """cosh(gamma Y)**2 overflows float32 for gamma |Y| above ~44, and 1/r
  underflows for gamma max|Y| above ~87, while G / r may be well inside
  float32's range. Matched against float64 (where a cosh formed in float32
  would give 0): G up to 60 with gamma 1 and Y = G (the paper Hybrid's
  flags; out ~ 1e-24); G up to 1e30 with gamma 600 and Y = G / ||G||
  (package flags; gamma max|Y| > 100: 1/r < 1e-43, out > 1e-29). Entries
  near float32's maximum with gamma 1 or 2 (gamma G = inf) give 0, the
  float64 value rounded, never NaN."""
  rng = np.random.default_rng(3)
  g = rng.normal(size=(8, 20))
  g = g / np.max(np.abs(g))
  for name, scale, gamma, least_arg in (("paper_hybrid", 60.0, 1.0, 44),
                                        ("package_auon", 1e30, 600.0, 100)):
    _, normalize_input, normalize_output = FLAGS[name]
    tx = orthax.cosh_rms_normalize(gamma, normalize_input=normalize_input,
                                   normalize_output=normalize_output)
    g32 = jnp.asarray(scale * g, jnp.float32)
    got = np.asarray(_update(tx, {"w": g32})["w"], np.float64)
    want, arg = _cosh_formula(np.asarray(g32, np.float64), name, gamma=gamma)
    assert arg > least_arg and np.all(got != 0), name
    np.testing.assert_allclose(got, want, rtol=_cosh_rtol(g.size, arg, U32),
                               err_msg=name)
  top = jnp.full((12, 12), 3e38, jnp.float32)
  for gamma in (1.0, 2.0):
    tx = orthax.cosh_rms_normalize(gamma, normalize_input=False,
                                   normalize_output=False)
    np.testing.assert_array_equal(_update(tx, {"w": top})["w"], 0.0)


# --------------------------------------------------------------------------
# Properties (METHODS.md §1(e), §8a(e))


def _test_matrices(rng):
  """Gaussian ones; one non-zero entry (r^2 at its upper bound); equal
  magnitudes (r^2 near its lower bound)."""
  one_hot = np.zeros((8, 20))
  one_hot[2, 3] = -4.0
  return {"gauss_wide": rng.normal(size=(8, 20)),
          "gauss_square": rng.normal(size=(12, 12)),
          "one_hot": one_hot,
          "flat": rng.choice([-1.0, 1.0], size=(12, 12))}


@pytest.mark.parametrize("gamma", [0.5, 1.5, 4.0])
def test_r_squared_bounds(gamma):
  """With ||X||_F = 1: 1 + gamma^2/N <= r^2 <= 1 + sinh(gamma)^2/N, r read
  off the output as 1 / ||out||_F (eps, eps_norm = 0); the upper bound is
  attained by a matrix of one entry, and equal magnitudes give r^2 = 1 +
  sinh(gamma / sqrt(N))^2. Rounding: ||out||^2 is a sum of N squares
  ((N + 2) u) of entries within _cosh_error each, so r^2 is within twice
  that plus (N + 2) u, relative."""
  rng = np.random.default_rng(4)
  tx = orthax.cosh_rms_normalize(gamma, eps_norm=0.0, eps=0.0)
  with jax.enable_x64(True):
    for name, g in _test_matrices(rng).items():
      n = g.size
      out = np.asarray(_update(tx, {"w": jnp.asarray(g)})["w"])
      r2 = 1 / np.sum(out**2)
      slack = (2 * _cosh_error(n, gamma, U64) + (n + 2) * U64) * r2
      low, high = 1 + gamma**2 / n, 1 + np.sinh(gamma) ** 2 / n
      assert low - slack <= r2 <= high + slack, (name, low, r2, high)
      if name == "one_hot":
        assert abs(r2 - high) <= slack, (r2, high)
      if name == "flat":
        assert abs(r2 - 1 - np.sinh(gamma / np.sqrt(n)) ** 2) <= slack


@pytest.mark.parametrize("gamma", [0.5, 1.5, 4.0])
def test_output_is_normalized_input_within_sinh_bound(gamma):
  """U ||G||_F / G = 1/r elementwise, and 0 <= 1 - 1/r <= r - 1 <=
  sinh(gamma)^2 / (2N) (from the bound on r^2); slack: the entries'
  rounding (_cosh_error), and ||G||'s and the product's and quotient's in
  NumPy, (N + 4) u."""
  rng = np.random.default_rng(5)
  tx = orthax.cosh_rms_normalize(gamma, eps_norm=0.0, eps=0.0)
  with jax.enable_x64(True):
    for name, g in _test_matrices(rng).items():
      if name == "one_hot":
        continue  # the ratio is defined on non-zero entries only
      n = g.size
      out = np.asarray(_update(tx, {"w": jnp.asarray(g)})["w"])
      ratio = out * np.linalg.norm(g) / g
      slack = _cosh_error(n, gamma, U64) + (n + 4) * U64
      assert np.max(np.abs(ratio - 1)) <= np.sinh(gamma) ** 2 / (2 * n) + slack
      assert np.all(ratio <= 1 + slack), name


TRANSFORMS = {
    "scale_to_rms": lambda **kw: orthax.scale_to_rms(eps=0.1, **kw),
    "cosh_rms_normalize": lambda **kw: orthax.cosh_rms_normalize(1.5, **kw),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_scale_invariance(name):
  """U(cG) = U(G): bit for bit for powers of two in float32 (dividing by
  max|G| first makes the rest of the computation identical; eps is relative
  to max|G|), and for any c in float64 to rounding: each result within
  _cosh_error (a bound on scale_to_rms's too) of the exact one, and c G's
  own rounding, u per entry, through a map of slope 1."""
  tx = TRANSFORMS[name]()
  g = _tree(6, jnp.float32)["square"]
  base = _update(tx, {"w": g})["w"]
  for c in (2.0**-100, 2.0**100):
    np.testing.assert_array_equal(_update(tx, {"w": g * c})["w"], base)
  with jax.enable_x64(True):
    g64 = jnp.asarray(g, jnp.float64)
    base = _update(tx, {"w": g64})["w"]
    for c in (3.7e-150, 1e-3, 7.1e150):
      np.testing.assert_allclose(_update(tx, {"w": g64 * c})["w"], base,
                                 rtol=_cosh_rtol(g64.size, 1.5, U64) + U64)


def test_zero_matrices_give_zero_and_empty_leaves_stay_empty():
  """A zero matrix, alone or as one slice of a stacked leaf, gives exactly
  zero (never NaN) for every eps >= 0; the other slices are unaffected."""
  stacked = np.random.default_rng(7).normal(size=(3, 8, 20))
  stacked[1] = 0.0
  tree = {"zero": jnp.zeros((12, 12)), "stacked": jnp.asarray(stacked),
          "empty": jnp.zeros((0, 5))}
  specs = {"zero": None, "stacked": DIMS(1, 2), "empty": None}
  txs = {f"scale_to_rms_eps{e}": orthax.scale_to_rms(eps=e,
                                                    dimension_numbers=specs)
         for e in (0.0, 0.1)}
  for name in FLAGS:
    for e in (0.0, 1e-8):
      txs[f"{name}_eps{e}"] = _cosh(name, eps_norm=e, eps=e,
                                    dimension_numbers=specs)
  for name, tx in txs.items():
    out = _update(tx, tree)
    np.testing.assert_array_equal(out["zero"], 0.0, err_msg=name)
    np.testing.assert_array_equal(out["stacked"][1], 0.0, err_msg=name)
    assert np.all(np.isfinite(out["stacked"])), name
    assert np.all(out["stacked"][::2] != 0), name
    assert out["empty"].shape == (0, 5), name


def test_bad_input_is_named():
  for make, kw, err, match in [
      (orthax.scale_to_rms, dict(target=0.0), ValueError, "target"),
      (orthax.scale_to_rms, dict(eps=-1e-3), ValueError, "eps"),
      (orthax.scale_to_rms, dict(target="0.2"), TypeError, "target"),
      (orthax.cosh_rms_normalize, dict(gamma=-1.0), ValueError, "gamma"),
      (orthax.cosh_rms_normalize, dict(eps_norm=-1.0), ValueError, "eps_norm"),
      (orthax.cosh_rms_normalize, dict(eps=np.nan), ValueError, "eps"),
      (orthax.cosh_rms_normalize, dict(normalize_input=1), TypeError,
       "normalize_input"),
      (orthax.cosh_rms_normalize, dict(normalize_output=None), TypeError,
       "normalize_output"),
  ]:
    with pytest.raises(err, match=match):
      make(**kw)
  for tx in (orthax.scale_to_rms(), orthax.cosh_rms_normalize()):
    with pytest.raises(ValueError, match=r"\['layer'\]\['bias'\].*\(4,\)"):
      _update(tx, {"layer": {"bias": jnp.ones(4), "w": jnp.ones((4, 4))}})
    with pytest.raises(ValueError, match=r"\['scan'\].*\(2, 4, 4\).*"
                       "dimension_numbers"):
      _update(tx, {"scan": jnp.ones((2, 4, 4))})
    with pytest.raises(TypeError, match=r"\['w'\].*int32"):
      _update(tx, {"w": jnp.ones((4, 4), jnp.int32)})
  # one spec for every leaf: a 2-D leaf has no axis 2
  tx = orthax.scale_to_rms(dimension_numbers=DIMS(1, 2))
  with pytest.raises(ValueError, match=r"\['w'\].*\(4, 4\)"):
    _update(tx, {"w": jnp.ones((4, 4))})


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_bfloat16_leaves(name):
  """bfloat16 in, bfloat16 out, computed in float32: the float32 result of
  the same (bf16-valued) input, rounded once to bfloat16 (2**-8 relative,
  8 significand bits)."""
  tree = {k: _tree(8, jnp.bfloat16)[k] for k in ("tall", "stacked")}
  tx = TRANSFORMS[name](dimension_numbers={k: SPECS[k] for k in tree})
  out = _update(tx, tree)
  want = _update(tx, jax.tree.map(lambda x: x.astype(jnp.float32), tree))
  for k in tree:
    assert out[k].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out[k], np.float32), want[k],
                               rtol=2.0**-8, err_msg=k)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_jit_and_vmap(name):
  """Under jit, and vmapped over the slices of a stack (each then a 2-D
  leaf), the result is the eager stacked one to float32 rounding: each
  within _cosh_error of the exact value (a bound on scale_to_rms's too)."""
  tree = {k: _tree(9, jnp.float32)[k] for k in ("tall", "stacked")}
  tx = TRANSFORMS[name](dimension_numbers={k: SPECS[k] for k in tree})
  eager = _update(tx, tree)
  jitted = jax.jit(lambda t: tx.update(t, tx.init(t))[0])(tree)
  tx2 = TRANSFORMS[name]()
  vmapped = jax.vmap(lambda m: tx2.update({"w": m}, None)[0]["w"])(
      tree["stacked"])
  rtol = _cosh_rtol(8 * 20, 1.5, U32)
  for k in tree:
    np.testing.assert_allclose(jitted[k], eager[k], rtol=rtol, err_msg=k)
  np.testing.assert_allclose(vmapped, eager["stacked"], rtol=rtol)


def test_hyperparameters_can_be_injected():
  """optax.inject_hyperparams passes target and gamma as arrays (not
  checkable at construction); the result is the fixed-value one."""
  g = {"w": _tree(10, jnp.float32)["wide"]}
  for make, kw in ((orthax.scale_to_rms, dict(target=0.3)),
                   (orthax.cosh_rms_normalize, dict(gamma=1.5))):
    tx = optax.inject_hyperparams(make)(**kw)
    got, _ = jax.jit(tx.update)(g, tx.init(g))
    np.testing.assert_allclose(got["w"], _update(make(**kw), g)["w"],
                               rtol=_cosh_rtol(8 * 20, 1.5, U32))


# --------------------------------------------------------------------------
# The chains against the references


# Newton–Schulz with (a, b, c) = (1, 0, 0) is Frobenius normalization: in
# float32 its error is that of a norm, (N + 6) u. Jordan's quintic amplifies
# rounding up to 3.44**5 ~ 480 times (newton_schulz_error_bound: ~1% of
# ||O|| on these matrices), which AdaMuon's per-entry division by sqrt(v)
# would turn into a bound too loose to test anything. The float32 AdaMuon
# tests use IDENTITY; the quintic is checked in float64
# (test_adamuon_float64_matches_reference).
IDENTITY = (1.0, 0.0, 0.0)


def _decay_and_lr():
  return optax.add_decayed_weights(WD), optax.scale_by_learning_rate(LR)


def _adamuon_stages(*, sign=False, coeffs="muon", steps=None, eps=1e-8,
                    bias_correction=True):
  """AdaMuon's steps 1-5 as METHODS.md §8a(d) writes them (optax 0.2.8's
  scale_by_rms with these flags is step 4: ``O / (sqrt(v / (1 - beta2^t)) +
  eps)``). Here and in _auon_chain, Newton–Schulz runs its plain steps
  (gram=False), the iteration of the references and of
  newton_schulz_error_bound (the Gram path is orthogonalize's own, tested
  with it)."""
  return [
      orthax.momentum(0.95),
      *([optax.scale_by_sign()] if sign else []),
      orthax.orthogonalize(coeffs=coeffs, steps=steps, gram=False,
                           dimension_numbers=SPECS),
      optax.scale_by_rms(decay=0.999, eps=eps, eps_in_sqrt=False,
                         bias_correction=bias_correction),
      orthax.scale_to_rms(0.2, dimension_numbers=SPECS)]


def _adamuon_chain(**kw):
  return optax.chain(*_adamuon_stages(**kw), *_decay_and_lr())


# case: the reference, its keywords, and the FLAGS of cosh_rms_normalize
AUON_CASES = {
    "paper": (reference.auon_run, dict(variant="paper"), "paper_auon"),
    "package": (reference.auon_run, dict(variant="package"), "package_auon"),
    # one J-quintic on the normalized momentum (§1(e)), then r of X_1 itself
    "hybrid_paper": (reference.hybrid_auon_run, dict(variant="paper"),
                     "paper_hybrid"),
    "hybrid_package": (reference.hybrid_auon_run, dict(variant="package"),
                       "package_auon"),
}


def _auon_chain(case, gamma=None):
  """AuON and Hybrid-AuON (METHODS.md §1(d))."""
  flags = FLAGS[AUON_CASES[case][2]]
  default_gamma, normalize_input, normalize_output = flags
  stages = [orthax.cosh_rms_normalize(
      default_gamma if gamma is None else gamma,
      normalize_input=normalize_input, normalize_output=normalize_output,
      dimension_numbers=SPECS)]
  if case == "paper":
    stages.append(orthax.scale_by_shape("muon", dimension_numbers=SPECS))
  if case.startswith("hybrid"):
    steps = 1 if case == "hybrid_paper" else 5
    stages.insert(0, orthax.orthogonalize(coeffs="muon", steps=steps,
                                          gram=False,
                                          dimension_numbers=SPECS))
  return optax.chain(orthax.momentum(0.95), *stages, *_decay_and_lr())


def _max_errors(got, want) -> np.ndarray:
  return np.array([np.max(np.abs(g - w)) for g, w in zip(_flat(got), want)])


@pytest.mark.parametrize("sign, coeffs", [(False, "muon"), (False, "svd"),
                                         (True, "muon")])
def test_adamuon_float64_matches_reference(sign, coeffs):
  """Six steps, float64: the same Newton–Schulz steps (Jordan's quintic, or
  exact polar factors) by two routes agree to ~1e-13. Not sign with "svd":
  a small +-1 matrix is often singular (3 of these 54), where the polar
  factor is not unique (Newton–Schulz maps the null space to 0)."""
  with jax.enable_x64(True):
    params, grads = _problem(0, jnp.float64)
    got = _run_orthax(_adamuon_chain(sign=sign, coeffs=coeffs), params, grads)
  want = _run_reference(
      reference.adamuon_run, params, grads, sign=sign,
      coeffs=reference.MUON_ABC if coeffs == "muon" else None)[-1]
  assert np.max(_max_errors(got, want)) <= 1e-10


@pytest.mark.parametrize("case", list(AUON_CASES))
def test_auon_float64_matches_reference(case):
  with jax.enable_x64(True):
    params, grads = _problem(1, jnp.float64)
    got = _run_orthax(_auon_chain(case), params, grads)
  run, kw, _ = AUON_CASES[case]
  want = _run_reference(run, params, grads, **kw)[-1]
  assert np.max(_max_errors(got, want)) <= 1e-10


@pytest.mark.parametrize("case", ["paper", "hybrid_package"])
def test_references_see_the_cosh_factor(case):
  """r = 1 + O(1/N) is small but the comparisons see it: gamma = 0 (r = 1,
  plain Frobenius normalization) is far outside their 1e-10."""
  with jax.enable_x64(True):
    params, grads = _problem(1, jnp.float64)
    got = _run_orthax(_auon_chain(case, gamma=0.0), params, grads)
  run, kw, _ = AUON_CASES[case]
  want = _run_reference(run, params, grads, **kw)[-1]
  assert np.max(_max_errors(got, want)) > 1e-6


def _directions(stages, grads, params):
  """The updates of ``optax.chain(*stages)`` at every step."""
  tx = optax.chain(*stages)
  state, out = tx.init(params), []
  for g in grads:
    u, state = tx.update(g, state, params)
    out.append(_flat(u))
  return out


def test_adamuon_update_rms_is_target():
  """Every matrix of every step has RMS 0.2 (float32): scale_to_rms's
  (N + 6) u per entry (_scale_to_rms_rtol), and the test's own float64 RMS
  exact to ~N u64."""
  params, grads = _problem(2, jnp.float32)
  stages = _adamuon_stages(sign=True, coeffs=IDENTITY, steps=5)
  for step in _directions(stages, grads[:3], params):
    for m in step:
      value = np.sqrt(np.mean(m**2))
      assert abs(value / 0.2 - 1) <= _scale_to_rms_rtol(m.size, U32) / 2


def test_adamuon_bias_correction_cancels_when_eps_is_zero():
  """With eps = 0, 1 / (1 - beta2^t) is one factor per matrix, which
  scale_to_rms removes: the updates with and without bias correction agree
  to rounding (float64: the two routes' (N + 6) u each, 4 u more for the
  correction's product and root). With eps = 1e-8 they do not (the eps
  term is 1e-8 / sqrt(v), v ~ 1e-3 O^2 without the correction)."""
  with jax.enable_x64(True):
    params, grads = _problem(3, jnp.float64)
    runs = {(eps, bc): _directions(_adamuon_stages(eps=eps,
                                                   bias_correction=bc),
                                   grads, params)
            for eps in (0.0, 1e-8) for bc in (True, False)}
  worst = {eps: max(np.max(np.abs(a / b - 1))
                    for sa, sb in zip(runs[eps, True], runs[eps, False])
                    for a, b in zip(sa, sb))
           for eps in (0.0, 1e-8)}
  tol = 2 * (8 * 20 + 6 + 4) * U64
  assert worst[0.0] <= tol
  assert worst[1e-8] > 100 * tol


@pytest.mark.parametrize("sign", [True, False])
def test_adamuon_sign_discards_magnitudes(sign):
  """With sign the Newton–Schulz input is +-1 (the momentum has no zero
  entry here), so gradients rescaled entry by entry by positive factors give
  the same update, bit for bit; without sign they do not."""
  params, grads = _problem(4, jnp.float32)
  rng = np.random.default_rng(11)
  rescaled = jax.tree.map(
      lambda g: g * jnp.asarray(rng.uniform(0.5, 2.0, g.shape), g.dtype),
      grads[0])
  if sign:
    prefix = _directions(_adamuon_stages(sign=True)[:2], grads[:1], params)
    for m in prefix[0]:
      np.testing.assert_array_equal(np.abs(m), 1.0)
  stages = _adamuon_stages(sign=sign)
  a, = _directions(stages, grads[:1], params)
  b, = _directions(stages, [rescaled], params)
  differ = max(np.max(np.abs(x - y)) for x, y in zip(a, b))
  assert (differ == 0) if sign else (differ > 1e-2)


# --------------------------------------------------------------------------
# float32 chains against the float64 references, within derived bounds.
#
# Each bound is first order in u = 2**-24 (the float32 result is the exact
# one plus the roundings listed, carried by the derivatives of the exact
# map), doubled to cover the second-order terms while those stay below the
# first-order ones. The chains run the plain Newton–Schulz steps, whose
# float32 error reference.newton_schulz_error_bound bounds.


def _momentum_error(flat_grads, t, i, norm=np.linalg.norm):
  """Bound on ``|fl(u_t) - u_t|`` for matrix i's Nesterov input at step t
  (1-based), in ``norm`` (Frobenius; elementwise with ``np.abs``):
  orthax.momentum forms ``beta m + (1 - beta) g`` twice a step with ``beta``
  and ``1 - beta`` rounded to float32, at most 4 u a step on a combination
  of the gradients with non-negative weights of sum at most 1: (4 t + 4) u
  times the largest gradient."""
  return (4 * t + 4) * U32 * np.max([norm(g[i]) for g in flat_grads[:t]],
                                    axis=0)


def _cosh_sensitivity(y, gamma):
  """kappa: r's relative change per relative (Frobenius) change of its
  argument ``Y``. ``grad r^2 = (gamma / N) sinh(2 gamma Y)``, and ``|sinh(2
  gamma y)| <= sinh(2 gamma m) |y| / m`` for ``|y| <= m = max|Y|``, so
  ``|dr| / r <= gamma sinh(2 gamma m) ||Y||_F^2 / (2 N m)`` times the
  relative change (r >= 1)."""
  m = np.max(np.abs(y))
  return gamma * np.sinh(2 * gamma * m) * np.sum(y**2) / (2 * y.size * m)


def _param_bound(history, params, rel):
  """Bound on each matrix's ``|fl(W_T) - W_T|`` given ``rel[t][i]``, the
  direction ``U_t``'s error (Frobenius, relative to ``||U_t||_F``; or an
  absolute elementwise array): ``W_t = W_{t-1} (1 - lr wd) - lr U_t``, with
  ``U_t`` read off the reference's history; per step ``lr`` times ``U_t``'s
  error, the decay's and learning rate's 3 roundings ``3 u lr (|U_t| + wd
  |W_{t-1}|)`` and apply_updates' ``u |W_t|``; earlier errors shrink by
  ``1 - lr wd``. Frobenius bounds bound every entry."""
  bounds = []
  for i, prev in enumerate(params):
    err = 0.0
    for t, step in enumerate(history):
      w = step[i]
      update = (prev * (1 - LR * WD) - w) / LR
      elementwise = np.ndim(rel[t][i]) > 0
      mag = np.abs if elementwise else np.linalg.norm
      absolute = rel[t][i] if elementwise else rel[t][i] * mag(update)
      err = ((1 - LR * WD) * err + LR * absolute
             + 3 * U32 * LR * (mag(update) + WD * mag(prev)) + U32 * mag(w))
      prev = w
    bounds.append(2 * err)
  return bounds


def _auon_direction_errors(case, aux, flat_grads):
  """``rel[t][i]``: the float32 direction's relative error. Its input: for
  AuON the momentum (_momentum_error / ||u||), for Hybrid the Newton–Schulz
  iterate (newton_schulz_error_bound from that input error, relative to
  ||X_k||). cosh_rms_normalize adds its own rounding (_cosh_error) and r's
  response to the input's error (_cosh_sensitivity); scale_by_shape 2 u."""
  gamma, normalize_input, _ = FLAGS[AUON_CASES[case][2]]
  rel = []
  for t, step in enumerate(aux, 1):
    rel.append([])
    for i, extra in enumerate(step):
      u, x = extra if case.startswith("hybrid") else (extra, extra)
      error = _momentum_error(flat_grads, t, i) / np.linalg.norm(u)
      if case.startswith("hybrid"):
        steps = 1 if case == "hybrid_paper" else 5
        e, p = reference.newton_schulz_error_bound(
            u, [reference.MUON_ABC] * steps, u=U32, start=error)
        error = e / p
      y = x / np.linalg.norm(x) if normalize_input else x
      rel[-1].append(
          (1 + _cosh_sensitivity(y, gamma)) * error
          + _cosh_error(y.size, gamma * np.max(np.abs(y)), U32) + 2 * U32)
  return rel


@pytest.mark.parametrize("case", list(AUON_CASES))
def test_auon_float32_within_derived_bound(case):
  """Six float32 steps (the paper's chain under jit) against the float64
  reference, each matrix within _param_bound of _auon_direction_errors."""
  params, grads = _problem(5, jnp.float32)
  got = _run_orthax(_auon_chain(case), params, grads, jit=case == "paper")
  run, kw, _ = AUON_CASES[case]
  aux = []
  history = _run_reference(run, params, grads, aux=aux, **kw)
  flat_grads = [_flat(g) for g in grads]
  bounds = _param_bound(history, _flat(params),
                        _auon_direction_errors(case, aux, flat_grads))
  for g, w, b in zip(_flat(got), history[-1], bounds):
    assert np.max(np.abs(g - w)) <= b, (np.max(np.abs(g - w)), b)


def _adamuon_direction_errors(aux, flat_grads, sign, beta2=0.999, eps=1e-8):
  """Elementwise first-order bounds on the float32 direction ``U_t``'s
  error, with IDENTITY in place of Newton–Schulz.

  ``O_t``: newton_schulz_error_bound ``e_t`` (Frobenius, so per entry) from
  the momentum's error (none with sign: the +-1 input is the same when no
  entry of ``u`` is within its error of 0, which is asserted). ``O_hat =
  O_t / (S + eps)``, ``S = sqrt(v_hat)``, ``v_hat = sum_s w_s O_s^2``
  (``w_s = (1 - b2) b2^(t-s) / (1 - b2^t)``): its derivatives are ``((S +
  eps) - w_t O_t^2 / S) / (S + eps)^2`` in ``O_t`` (``eps / (|O| + eps)^2``
  at t = 1) and ``-O_t w_s O_s / (S (S + eps)^2)`` in ``O_s``, s < t;
  ``v_hat``'s own rounding, 6 a step on non-negative terms and the
  correction's divide, ``(6 t + 1) u v_hat``, moves ``O_hat`` by ``(3 t + 1)
  u |O_hat|``, and 4 roundings more (root, eps, divide). optax's float32
  ``1 - b2^t`` (b2 rounded, a power, a difference: ``(t + 2) u`` absolute)
  is one factor for every entry, which scale_to_rms removes except through
  eps: ``c / 2 |O_hat| eps / (S + eps)``. Never more than twice the largest
  ``|O_hat|``, ``sqrt(1 / w_t)`` (``v_hat >= w_t O_t^2``). ``U = 0.2
  sqrt(N) O_hat / ||O_hat||``: ``0.2 sqrt(N) (dO_hat / ||O_hat|| + |O_hat|
  ||dO_hat|| / ||O_hat||^2)`` and scale_to_rms's (N + 6) u.
  """
  errors, ns_errors = [], []
  for t, step in enumerate(aux, 1):
    errors.append([])
    ns_errors.append([])
    weights = (1 - beta2) * beta2 ** np.arange(t - 1, -1, -1) / (1 - beta2**t)
    for i, (u, o, v_hat) in enumerate(step):
      if sign:
        assert np.all(np.abs(u) > _momentum_error(flat_grads, t, i, np.abs))
        x, start = np.sign(u), 0.0
      else:
        x, start = u, _momentum_error(flat_grads, t, i) / np.linalg.norm(u)
      e, _ = reference.newton_schulz_error_bound(x, [IDENTITY] * 5, u=U32,
                                                 start=start)
      ns_errors[-1].append(e)
      s = np.sqrt(v_hat)
      o_hat = o / (s + eps)
      d_hat = ((s + eps) - weights[-1] * o**2 / s) / (s + eps) ** 2 * e
      for past in range(t - 1):
        o_past = aux[past][i][1]
        d_hat = d_hat + (np.abs(o * weights[past] * o_past)
                         / (s * (s + eps) ** 2) * ns_errors[past][i])
      common = (t + 2) * U32 / (1 - beta2**t)
      d_hat = d_hat + (common / 2 * eps / (s + eps) + (3 * t + 5) * U32) * (
          np.abs(o_hat))
      d_hat = np.minimum(d_hat, 2 / np.sqrt(weights[-1]))
      n = np.linalg.norm(o_hat)
      scale = 0.2 * np.sqrt(o.size)
      d_u = scale * (d_hat / n + np.abs(o_hat) * np.linalg.norm(d_hat) / n**2
                     + (o.size + 6) * U32 * np.abs(o_hat) / n)
      errors[-1].append(d_u)
  return errors


@pytest.mark.parametrize("sign", [False, True])
def test_adamuon_float32_within_derived_bound(sign):
  """Six float32 steps (IDENTITY for Newton–Schulz) against the float64
  reference, every entry within _param_bound of _adamuon_direction_errors."""
  params, grads = _problem(6, jnp.float32)
  got = _run_orthax(_adamuon_chain(sign=sign, coeffs=IDENTITY, steps=5),
                    params, grads)
  aux = []
  history = _run_reference(reference.adamuon_run, params, grads, aux=aux,
                           sign=sign, coeffs=IDENTITY)
  flat_grads = [_flat(g) for g in grads]
  bounds = _param_bound(history, _flat(params),
                        _adamuon_direction_errors(aux, flat_grads, sign))
  for g, w, b in zip(_flat(got), history[-1], bounds):
    assert np.all(np.abs(g - w) <= b), np.max(np.abs(g - w) / b)


def test_docstring_examples_run():
  assert doctest.testmod(rms).failed == 0
