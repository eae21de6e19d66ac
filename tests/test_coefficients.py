"""Each Newton–Schulz preset maps a known spectrum where its source says it does."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
import reference
from orthax.polar.coefficients import CONVERGENT_QUINTIC
from orthax.polar import PRESETS, newton_schulz, resolve_coefficients
from orthax.polar.newton_schulz import newton_schulz_flops, use_gram


def _composed(preset, s):
  for a, b, c in preset.coeffs:
    s = a * s + b * s**3 + c * s**5
  return s


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_scalar_map_stays_in_band(name):
  preset = PRESETS[name]
  lo, hi = preset.interval
  s = np.geomspace(lo, hi, 100_001)
  out = _composed(preset, s)
  assert out.min() >= preset.band[0] and out.max() <= preset.band[1], (
      out.min(), out.max())
  # The band is tight: it is not satisfied by a band 0.02 narrower.
  assert out.min() < preset.band[0] + 0.02 or out.max() > preset.band[1] - 0.02


def test_muon_and_polar_express_claims():
  """The figures the sources state: Muon ~[0.7, 1.2]; Polar Express gets closer."""
  s = np.geomspace(3e-3, 1.0, 10_001)
  muon = _composed(PRESETS["muon"], s)
  pe = _composed(PRESETS["polar_express"], s)
  assert 0.65 < muon.min() < 0.75 and 1.15 < muon.max() < 1.25
  assert np.max(np.abs(pe - 1)) < 0.6 * np.max(np.abs(muon - 1))


def _matrix_with_normalized_spectrum(rng, m, n, t, scale=10.0):
  u, _ = np.linalg.qr(rng.normal(size=(m, m)))
  v, _ = np.linalg.qr(rng.normal(size=(n, n)))
  k = min(m, n)
  return scale * (u[:, :k] * t) @ v[:, :k].T, u[:, :k], v[:, :k]


def _spectrum_spanning(preset, k):
  """k singular values whose Frobenius-normalized values span the interval."""
  lo = preset.interval[0]
  rest = np.geomspace(lo, 0.1, k - 1)
  top = np.sqrt(1.0 / preset.norm_margin**2 - np.sum(rest**2))
  return np.concatenate([[top], rest[::-1]])


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("shape", [(40, 64), (64, 40)])
def test_matrix_iteration_is_the_scalar_map(name, shape):
  """In float64 the matrix iteration applies the composed quintic to the spectrum."""
  preset = PRESETS[name]
  rng = np.random.default_rng(0)
  t = _spectrum_spanning(preset, min(shape))
  x, u, v = _matrix_with_normalized_spectrum(rng, *shape, t)
  with jax.enable_x64(True):
    got = np.asarray(newton_schulz(jnp.asarray(x), preset.coeffs,
                                   norm_margin=preset.norm_margin, eps=0.0))
  want = (u * _composed(preset, t)) @ v.T
  np.testing.assert_allclose(got, want, atol=1e-10)
  np.testing.assert_allclose(
      got, reference.newton_schulz(x, preset.coeffs, margin=preset.norm_margin,
                                   eps=0.0), atol=1e-10)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_transform_float32_spectrum_in_band(name):
  preset = PRESETS[name]
  rng = np.random.default_rng(1)
  t = _spectrum_spanning(preset, 48)
  x, _, _ = _matrix_with_normalized_spectrum(rng, 48, 96, t)
  tx = orthax.orthogonalize(coeffs=name)
  out, _ = tx.update({"w": jnp.asarray(x, jnp.float32)}, tx.init(None))
  s = np.linalg.svd(np.asarray(out["w"], np.float64), compute_uv=False)
  # float32 rounding of a 48x96 iteration: measured at most 5.2e-6.
  want = np.sort(_composed(preset, t))[::-1]
  np.testing.assert_allclose(s, want, atol=1e-4)
  slack = 1e-4
  assert s.min() >= preset.band[0] - slack and s.max() <= preset.band[1] + slack


@pytest.mark.parametrize("shape", [(30, 30), (20, 50), (50, 20), (3, 8, 12)])
def test_svd_is_orthogonal(shape):
  x = jax.random.normal(jax.random.key(0), shape)
  dims = orthax.MuonDimensionNumbers(1, 2) if len(shape) == 3 else None
  tx = orthax.orthogonalize(coeffs="svd", dimension_numbers=dims)
  q, _ = tx.update({"w": x}, tx.init(None))
  q = np.asarray(q["w"], np.float64).reshape((-1,) + shape[-2:])
  for qi in q:
    small = qi.T @ qi if qi.shape[0] >= qi.shape[1] else qi @ qi.T
    np.testing.assert_allclose(small, np.eye(small.shape[0]), atol=1e-5)
  # and it is the polar factor: U V^T of the float64 SVD
  x64 = np.asarray(x, np.float64).reshape((-1,) + shape[-2:])
  for xi, qi in zip(x64, q):
    u, _, vt = np.linalg.svd(xi, full_matrices=False)
    np.testing.assert_allclose(qi, u @ vt, atol=1e-5)


def test_svd_drops_null_directions():
  rng = np.random.default_rng(2)
  a = rng.normal(size=(20, 3)) @ rng.normal(size=(3, 30))  # rank 3
  tx = orthax.orthogonalize(coeffs="svd")
  q, _ = tx.update({"w": jnp.asarray(a), "z": jnp.zeros((4, 5))}, tx.init(None))
  s = np.linalg.svd(np.asarray(q["w"]), compute_uv=False)
  np.testing.assert_allclose(s[:3], 1.0, atol=1e-5)
  np.testing.assert_allclose(s[3:], 0.0, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(q["z"]), 0.0)


def test_newton_schulz_approaches_svd_with_more_steps():
  """Steps past the table (the convergent quintic) reach U V^T."""
  x = jax.random.normal(jax.random.key(3), (32, 48))
  exact, _ = orthax.orthogonalize(coeffs="svd").update({"w": x}, None)
  ns, _ = orthax.orthogonalize(coeffs="polar_express", steps=12).update(
      {"w": x}, None)
  np.testing.assert_allclose(ns["w"], exact["w"], atol=2e-3)


def test_resolve_coefficients_steps():
  table, margin = resolve_coefficients("polar_express", 3)
  np.testing.assert_array_equal(table, PRESETS["polar_express"].coeffs[:3])
  assert margin == PRESETS["polar_express"].norm_margin
  table, _ = resolve_coefficients("polar_express", 7)
  np.testing.assert_array_equal(table[:5], PRESETS["polar_express"].coeffs)
  np.testing.assert_array_equal(table[5:], [CONVERGENT_QUINTIC] * 2)
  table, margin = resolve_coefficients((3.0, -3.0, 1.0), None)
  assert table.shape == (5, 3) and margin == 1.0
  table, _ = resolve_coefficients((3.0, -3.0, 1.0), 2)
  np.testing.assert_array_equal(table, [(3.0, -3.0, 1.0)] * 2)
  with pytest.raises(ValueError, match="Unknown Newton-Schulz coefficient preset 'nope'"):
    resolve_coefficients("nope", None)
  with pytest.raises(ValueError, match=r"shape \(steps, 3\); got shape \(2, 2\)"):
    resolve_coefficients(np.ones((2, 2)), None)
  with pytest.raises(ValueError, match="positive"):
    resolve_coefficients("muon", 0)


def test_explicit_table_equals_preset():
  x = jax.random.normal(jax.random.key(4), (24, 40))
  by_name, _ = orthax.orthogonalize(coeffs="you").update({"w": x}, None)
  by_table, _ = orthax.orthogonalize(coeffs=PRESETS["you"].coeffs).update(
      {"w": x}, None)
  np.testing.assert_allclose(by_name["w"], by_table["w"], atol=1e-6)
  assert isinstance(orthax.orthogonalize(), optax.GradientTransformation)


@pytest.mark.parametrize("name", ["muon", "polar_express"])
@pytest.mark.parametrize("shape", [(48, 160), (160, 48), (2, 40, 96), (64, 64)])
def test_gram_path_equals_plain(name, shape):
  """Gram Newton-Schulz computes the same polynomial as the plain iteration.

  In float64 they agree to rounding (1e-9); in float32 on a decaying
  spectrum (the hard case: rounding in Q grows for small singular values)
  within 1e-5 of the float64 result with the restart (measured <= 3.6e-6;
  without the restart up to 1.5e-5 on these shapes, 4e-4 at 768x2304).
  """
  preset = PRESETS[name]
  rng = np.random.default_rng(5)
  m, n = shape[-2:]
  k = min(m, n)
  mats = []
  for _ in range(int(np.prod(shape[:-2]))):
    u, _ = np.linalg.qr(rng.normal(size=(m, k)))
    v, _ = np.linalg.qr(rng.normal(size=(n, k)))
    mats.append((u / (1.0 + np.arange(k))) @ v.T)
  x = np.stack(mats).reshape(shape)
  kw = dict(norm_margin=preset.norm_margin)
  with jax.enable_x64(True):
    want = np.asarray(newton_schulz(jnp.asarray(x), preset.coeffs, **kw))
    got64 = np.asarray(newton_schulz(jnp.asarray(x), preset.coeffs, gram=True, **kw))
  np.testing.assert_allclose(got64, want, atol=1e-9)
  got32 = newton_schulz(jnp.asarray(x, jnp.float32), preset.coeffs, gram=True, **kw)
  np.testing.assert_allclose(np.asarray(got32), want, atol=1e-5)
  tx = orthax.orthogonalize(coeffs=name, gram=True)
  if len(shape) == 2:
    out, _ = tx.update({"w": jnp.asarray(x, jnp.float32)}, None)
    np.testing.assert_allclose(np.asarray(out["w"]), want, atol=1e-5)


def _matmul_flops(fn, *args) -> int:
  """FLOPs of every dot_general in ``fn``'s program (scans times their length)."""

  def walk(jaxpr, times):
    total = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        k = int(np.prod([lhs[d] for d in contract]))
        total += times * 2 * k * int(np.prod(eqn.outvars[0].aval.shape))
      inner = times * eqn.params["length"] if eqn.primitive.name == "scan" else times
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        total += walk(sub, inner)
    return total

  return walk(jax.make_jaxpr(fn)(*args).jaxpr, 1)


@pytest.mark.parametrize("shape", [(24, 96), (96, 24), (40, 40), (16, 20)])
@pytest.mark.parametrize("gram, restart", [(False, 2), (True, 2), (True, None),
                                           (True, 1), (True, 4)])
@pytest.mark.parametrize("steps", [1, 5])
def test_flop_count_is_the_programs(shape, gram, restart, steps):
  """newton_schulz_flops (used by gram="auto" and the benchmarks) counts the
  matmuls the traced program really contains."""
  table = PRESETS["polar_express"].coeffs[:steps]
  got = _matmul_flops(lambda x: newton_schulz(x, table, gram=gram,
                                              gram_restart=restart),
                      jnp.ones(shape))
  assert got == newton_schulz_flops(*shape, steps, gram=gram,
                                    gram_restart=restart)


def test_auto_gram_where_it_saves_flops():
  # 5 steps: break-even at long/short = 1.5 (with or without restart)
  assert use_gram(768, 2304, 5, "auto") and use_gram(3072, 768, 5, "auto")
  assert not use_gram(768, 768, 5, "auto")
  assert not use_gram(768, 1152, 5, "auto") and use_gram(768, 1160, 5, "auto")
  assert use_gram(8, 8, 5, True) and not use_gram(8, 80, 5, False)
  # and the transform's default follows it, leaf by leaf
  tx = orthax.orthogonalize()
  tree = {"wide": jnp.ones((16, 48)), "square": jnp.ones((32, 32))}
  got = _matmul_flops(lambda t: tx.update(t, None)[0], tree)
  assert got == (newton_schulz_flops(16, 48, 5, gram=True)
                 + newton_schulz_flops(32, 32, 5))


@pytest.mark.parametrize("gram", [False, True])
def test_bfloat16_on_both_paths(gram):
  """bf16 compute (bf16 matmul operands, f32 accumulation; the Gram path's
  m×m products stay f32) against float64, on a decaying spectrum: relative
  error 0.05 allowed (measured 0.018 plain, 0.011 Gram on this matrix;
  3.5e-2 and 3.2e-2 at 768x2304)."""
  rng = np.random.default_rng(9)
  u, _ = np.linalg.qr(rng.normal(size=(64, 64)))
  v, _ = np.linalg.qr(rng.normal(size=(192, 64)))
  x = (u / (1.0 + np.arange(64))) @ v.T
  preset = PRESETS["polar_express"]
  with jax.enable_x64(True):
    want = np.asarray(newton_schulz(jnp.asarray(x), preset.coeffs,
                                    norm_margin=preset.norm_margin))
  got = newton_schulz(jnp.asarray(x, jnp.float32), preset.coeffs,
                      norm_margin=preset.norm_margin, gram=gram,
                      compute_dtype=jnp.bfloat16)
  assert got.dtype == jnp.float32
  err = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
  assert err < 0.05, err
