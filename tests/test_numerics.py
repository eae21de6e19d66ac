"""Numerics at the edges: any scale, float16, subnormals, empty matrices, the
derivative at zero.

Bounds are in units of the float32 unit roundoff ``U32 = 2**-24``; where two
float32 runs differ only by rounding they are compared with a float64
reference (tests/reference.py) rather than with each other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
import reference
from orthax.polar import PRESETS

MDN = orthax.MuonDimensionNumbers
U32 = 2.0**-24


def _normal(seed, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


def _orth(x, **kw):
  return orthax.orthogonalize(**kw).update({"w": x}, None)[0]["w"]


def _finite(tree):
  return all(np.isfinite(np.asarray(x, np.float64)).all()
             for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------
# The update does not depend on the gradient's scale


# 2**66 (7.4e19): the squared Frobenius norm overflowed float32 (above
# 1.8e19) and the update was silently 0. 2**-40 (9.1e-13): the absolute
# eps=1e-7 swamped the norm and shrank the update towards 0. 2**125 (the
# largest entry of these gradients, about 3, becomes 1.3e38 > 2**126): XLA
# divided by max|X| as a multiplication by its reciprocal, subnormal and
# flushed to 0, and the update was silently 0.
_POWERS_OF_TWO = [2.0**66, 2.0**-40, 2.0**125]

# 12x16 takes the plain iteration (16/12 < 1.5), "gram" forces the Gram one.
_CONFIGS = {
    "default": (dict(), jnp.float32),
    "gram": (dict(gram=True), jnp.float32),
    "muon-coeffs": (dict(coeffs="muon"), jnp.float32),
    "pallas": (dict(backend="pallas"), jnp.float32),
    "svd": (dict(coeffs="svd"), jnp.float32),
    "bf16": (dict(), jnp.bfloat16),
    "bf16-compute": (dict(compute_dtype=jnp.bfloat16), jnp.float32),
}


@pytest.mark.parametrize("scale", _POWERS_OF_TWO)
@pytest.mark.parametrize("config", list(_CONFIGS))
def test_power_of_two_scale_gives_the_same_bits(config, scale):
  """Bound 0, exactly: multiplying by 2**k is exact in float32 and bfloat16
  (nothing overflows or becomes subnormal here), and the normalization
  first divides by max|X|, which the same 2**k scales, so both runs reach
  the same bits there and do the same operations on them afterwards (a
  division done as a multiplication by the reciprocal scales exactly too)."""
  kw, dtype = _CONFIGS[config]
  g = _normal(0, (12, 16), dtype)
  want = _orth(g, **kw)
  got = _orth(scale * g, **kw)
  assert got.dtype == dtype
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(want, np.float32))


def _lipschitz(coeffs, margin, g):
  """How much the exact iteration can amplify a perturbation of ``g``.

  With ``X = U diag(s) V^T`` the iteration maps ``X`` to ``U f(s) V^T``, ``f``
  the composed odd quintics. Its derivative is bounded in the Frobenius norm
  by the largest of ``|f'(s_i)|``, ``|f(s_i) - f(s_j)| / |s_i - s_j|``,
  ``(f(s_i) + f(s_j)) / (s_i + s_j)`` and ``f(s_i) / s_i`` over the
  normalized singular values: the first two are at most ``max |f'|`` over
  ``[s_min, s_max]`` (mean value theorem), the last two at most
  ``max f(s) / s`` there (f > 0 on it). Evaluated in float64 on a fine grid.
  """
  s = np.linalg.svd(g, compute_uv=False) / (margin * np.linalg.norm(g))
  grid = np.linspace(s.min(), s.max(), 100_001)
  value, slope = grid, np.ones_like(grid)
  for a, b, c in coeffs:
    slope = slope * (a + 3 * b * value**2 + 5 * c * value**4)
    value = a * value + b * value**3 + c * value**5
  return max(np.abs(slope).max(), np.abs(value / grid).max())


@pytest.mark.parametrize("scale", [1e20, 1e-12])
def test_any_scale_gives_the_unit_scale_update(scale):
  """orthogonalize(scale * G) equals orthogonalize(G) to float32 rounding.

  Both float32 runs are compared with the float64 iteration on G. Bound:
  float32 input rounding, fl(scale * G) = scale * G * (1 + d) with
  |d| <= U32 entrywise, moves the normalized input by at most U32 (Frobenius,
  the scale itself cancels), which the exact iteration amplifies by at most
  ``_lipschitz`` (2x for the grid's maximum); plus each run's own rounding
  in the iteration, 1e-5 as everywhere in this suite for float32 Polar
  Express on small matrices (tests/test_coefficients.py: its first step,
  |b|, |c| about 22 and 16, amplifies the rounding of the products).
  """
  preset = PRESETS["polar_express"]
  g32 = _normal(1, (12, 16))
  g = np.asarray(g32, np.float64)
  want = reference.newton_schulz(g, preset.coeffs, margin=preset.norm_margin)
  tol = 1e-5 + 2 * _lipschitz(preset.coeffs, preset.norm_margin, g) * U32
  for x in (g32, scale * g32):
    with jax.default_matmul_precision("highest"):  # float32, not TF32 on GPUs
      got = np.asarray(_orth(x), np.float64)
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)


@pytest.mark.parametrize("kw", [dict(), dict(gram=True), dict(backend="pallas")])
def test_float16_subnormal_input(kw):
  """float16 below 6.1e-5 is subnormal. The normalization reads float16 in
  float32, where those values are normal and exact, so 2**-20 G (subnormal
  in float16) gives the bits of the same float16 values times 2**20: bound
  0, as in test_power_of_two_scale_gives_the_same_bits."""
  tiny = (_normal(2, (12, 16)) * 2.0**-20).astype(jnp.float16)
  assert np.all(np.abs(np.asarray(tiny, np.float32)) < 6.1e-5)
  unit = (tiny.astype(jnp.float32) * 2.0**20).astype(jnp.float16)  # exact
  got = _orth(tiny, **kw)
  assert got.dtype == jnp.float16 and _finite(got)
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(_orth(unit, **kw), np.float32))


@pytest.mark.parametrize("kw", [dict(), dict(gram=True), dict(coeffs="svd")])
def test_float32_subnormal_input_is_finite(kw):
  """float32 subnormals (below 1.2e-38) are flushed to zero on some hardware
  (XLA on CPU does): the matrix then maps to zero. Where they are kept (XLA
  on GPU), the update is that of the same values times 2**140, which are
  normal float32 numbers (exact: a power of two); only the division by the
  subnormal max|X| rounds differently, so the float32 bound of
  test_any_scale_gives_the_unit_scale_update (1e-5) holds. Never NaN or Inf.
  """
  g = np.asarray(_normal(3, (12, 16)), np.float32)
  tiny = g * np.float32(2.0**-140)  # built in NumPy: XLA on CPU would flush
  assert np.abs(tiny).max() < np.finfo(np.float32).tiny
  # tiny's own values, scaled exactly (in float64: 2**140 is no float32)
  unit = jnp.asarray((tiny.astype(np.float64) * 2.0**140).astype(np.float32))
  with jax.default_matmul_precision("highest"):
    got = np.asarray(_orth(jnp.asarray(tiny), **kw))
    want = np.asarray(_orth(unit, **kw))
  assert np.isfinite(got).all()
  if np.any(got != 0):
    np.testing.assert_allclose(got, want, atol=1e-5)


def _neuron_run(tx, grads):
  state = tx.init(grads[0])
  outs = []
  for g in grads:
    out, state = tx.update(g, state)
    outs.append(out)
  return outs, state


@pytest.mark.parametrize("axis", ["output", "input"])
@pytest.mark.parametrize("scale", [2.0**66, 1e20])
def test_neuron_normalize_large_scale(axis, scale):
  """Two steps on 1e20-scale updates (whose squares overflow float32) give
  the unit-scale outputs and state scaled by ``scale``.

  Bound: each output entry is the input entry times factors built from sums
  of squares of at most m*n = 192 terms, a hypot, square roots and
  divisions: relative error at most (2 m n + n + 16) U32 per run (2 m n for
  the two Frobenius norms, n for the neuron's mean, 16 for the rest); the
  input rounding fl(scale * O) adds at most U32 per factor it enters (4:
  the entry, the neuron statistic, the two norms). eps = 1e-10 changes
  sqrt(v) ~ 0.2 by less than U32 at unit scale and not at all at 1e20. For
  scale 2**66 everything scales exactly: bitwise.
  """
  tx = orthax.neuron_normalize(axis=axis)
  grads = [{"w": _normal(4 + i, (12, 16))} for i in range(2)]
  big = [jax.tree.map(lambda x: scale * x, g) for g in grads]
  want, want_state = _neuron_run(tx, grads)
  got, got_state = _neuron_run(tx, big)
  assert _finite((got, got_state))
  m, n = 12, 16
  rtol = 2 * (2 * m * n + n + 16) * U32 + 4 * U32
  pairs = [(o["w"], w["w"]) for o, w in zip(got, want)]
  pairs.append((got_state.rms["w"], want_state.rms["w"]))
  for g, w in pairs:
    g = np.asarray(g, np.float64) / scale
    if scale == 2.0**66:
      np.testing.assert_array_equal(g, np.asarray(w, np.float64))
    else:
      np.testing.assert_allclose(g, np.asarray(w, np.float64), rtol=rtol)


# --------------------------------------------------------------------------
# The derivative at a zero matrix


@pytest.mark.parametrize("kw", [dict(), dict(gram=True), dict(coeffs="muon"),
                                dict(compute_dtype=jnp.bfloat16)])
def test_derivative_at_zero_is_finite(kw):
  """A zero matrix maps to zero, by a jump (the map is scale-invariant); its
  derivative there is defined as 0, never NaN. Away from zero it is the
  iteration's own (finite, non-zero)."""
  w = _normal(5, (8, 12))
  loss = lambda x: jnp.sum(_orth(x, **kw) * w)
  at_zero = jax.grad(loss)(jnp.zeros((8, 12)))
  np.testing.assert_array_equal(at_zero, 0.0)
  elsewhere = np.asarray(jax.grad(loss)(_normal(6, (8, 12))))
  assert np.isfinite(elsewhere).all() and np.any(elsewhere != 0)


# --------------------------------------------------------------------------
# float16


@pytest.mark.parametrize("make", [orthax.muon, orthax.normuon])
def test_float16_adamw_leaves_stay_finite(make):
  """float16 params and gradients below 8e-3: AdamW's moments are kept in
  float32, so its update is float32 AdamW's, rounded once to float16 (within
  one float16 ulp, 2**-10 relative: the two float32 results may differ in
  the last bits and round to neighbouring float16 values)."""
  params = {"w": _normal(0, (8, 12), jnp.float16),
            "bias": _normal(1, (12,), jnp.float16),
            "embedding": _normal(2, (10, 8), jnp.float16)}
  grads = [jax.tree.map(lambda x, i=i: 1e-3 * _normal(10 + i, x.shape,
                                                      jnp.float16), params)
           for i in range(2)]
  tx = make(0.1)
  adam = optax.adamw(0.1, weight_decay=0.0)
  f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  adam_params = {k: params[k] for k in ("bias", "embedding")}
  state, adam_state = tx.init(params), adam.init(f32(adam_params))
  for g in grads:
    u, state = tx.update(g, state, params)
    want, adam_state = adam.update(f32({k: g[k] for k in adam_params}),
                                   adam_state, f32(adam_params))
    assert _finite((u, state))
    assert all(x.dtype == jnp.float16 for x in jax.tree.leaves(u))
    for k in adam_params:
      np.testing.assert_allclose(np.asarray(u[k], np.float32),
                                 np.asarray(want[k].astype(jnp.float16),
                                            np.float32), rtol=2.0**-10)
  moments = state.inner_states["adamw"].inner_state[0]
  assert moments.nu["bias"].dtype == moments.mu["bias"].dtype == jnp.float32


@pytest.mark.parametrize("make", [orthax.momentum, orthax.neuron_normalize])
def test_float16_transforms_stay_finite(make):
  """Both compute in float32; momentum stores its average in float16 (the
  params' dtype), which tiny gradients may leave subnormal, never Inf."""
  tx = make()
  g = _normal(1, (8, 12))
  state = tx.init({"w": g.astype(jnp.float16)})
  # largest entry 1e-4 (most below float16's normal range), then 6e4 (near
  # float16's largest value, 65504)
  for peak in (1e-4, 6e4):
    x = (peak / jnp.abs(g).max() * g).astype(jnp.float16)
    u, state = tx.update({"w": x}, state)
    assert u["w"].dtype == jnp.float16 and _finite((u, state))


# --------------------------------------------------------------------------
# Leaves with a side of 0


_EMPTY = {"rows": (0, 5), "cols": (5, 0), "stack": (0, 3, 4)}


def _DIMS(tree):  # pylint: disable=invalid-name
  return jax.tree.map(lambda x: MDN(1, 2) if x.ndim == 3 else None, tree)


def _ROUTING(tree):  # pylint: disable=invalid-name
  return jax.tree.map(lambda x: MDN(1, 2) if x.ndim == 3 else "auto", tree)


_EMPTY_TXS = {
    "momentum": lambda: orthax.momentum(),
    **{f"orthogonalize-{n}": (lambda kw=kw: orthax.orthogonalize(
        dimension_numbers=_DIMS, **kw))
       for n, kw in [("default", {}), ("gram", dict(gram=True)),
                     ("svd", dict(coeffs="svd")),
                     ("pallas", dict(backend="pallas"))]},
    **{f"neuron_normalize-{a}": (lambda a=a: orthax.neuron_normalize(
        axis=a, dimension_numbers=_DIMS))
       for a in ("output", "input", "larger")},
    **{f"scale_by_shape-{m}": (lambda m=m: orthax.scale_by_shape(
        m, dimension_numbers=_DIMS)) for m in ("muon", "rms")},
    "muon": lambda: orthax.muon(0.1, routing=_ROUTING),
    "normuon": lambda: orthax.normuon(0.1, routing=_ROUTING),
}


@pytest.mark.parametrize("name", list(_EMPTY_TXS))
def test_empty_leaves_give_empty_updates(name):
  """Empty leaves come back empty with a finite state, and the other leaves
  get exactly the updates they get without them."""
  make = _EMPTY_TXS[name]
  full = {"w": _normal(0, (4, 6))}
  params = {**full, **{k: jnp.zeros(s) for k, s in _EMPTY.items()}}
  tx, ref = make(), make()
  state, ref_state = tx.init(params), ref.init(full)
  for step in range(2):
    g = {"w": _normal(1 + step, (4, 6))}
    u, state = tx.update({**params, **g}, state, params)
    want, ref_state = ref.update(g, ref_state, full)
    for k, shape in _EMPTY.items():
      assert u[k].shape == shape
    np.testing.assert_array_equal(u["w"], want["w"])
    assert _finite(state)
