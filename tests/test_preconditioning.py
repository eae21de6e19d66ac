"""Preconditioning (frobenius, spectral, schatten, aol) and adaptive scaling
against independent float64 NumPy (tests/reference.py) and against optax.

Error model for the bounds (as in tests/test_sharded.py). In float32 (unit
roundoff u = 2^-24) every rounded product of the iteration perturbs the
iterate X (singular values <= about 1.2) by a matrix of spectral norm <= 4u
(entries of 2u |X_ij|: accumulation and final rounding). Later steps stretch
such a perturbation by at most their a's, each polynomial's slope at 0, where
the small singular values sit; so a perturbation before step k ends up at
most G_k = prod_{j >= k} a_j larger. The plain path has one such perturbation
per step plus the input's: 4u sum_k G_k (Polar Express: 4u * 1152 = 2.7e-4).
The Gram path forms Q, whose norm is the product of its segment's a's, and
A_k, in float32: each of a k-step segment's 4k - 1 products (the Gram matrix,
k squares A^2, k - 1 products P Q, 2 (k - 1) updates P (P A), the final Q X)
errs by 4u relative to that norm, and the steps after the segment stretch it
further, so each costs 4u G_start (Polar Express with the restart after 2
steps: 4u (990 + 7 * 990 + 11 * 30) = 2.0e-3; without: 4u * 20 * 990 =
4.7e-3). The largest entry error is at most the spectral norm's. In float64
the same formula holds with u = 2^-53 (Polar Express: <= 9e-12).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optax.contrib import _muon as optax_muon

import orthax
import reference
from orthax.polar import newton_schulz
from orthax.polar.newton_schulz import PRECONDITIONINGS, precondition

U32, U64, UBF16 = 2.0**-24, 2.0**-53, 2.0**-9
PE = np.asarray(reference.POLAR_EXPRESS)
PE_MARGIN = reference.POLAR_EXPRESS_MARGIN
MUON = np.asarray([reference.MUON_ABC] * 5)
DIMS = orthax.MuonDimensionNumbers
SHAPES = [(32, 32), (24, 56), (56, 24)]
PATHS = {"plain": dict(gram=False), "gram": dict(gram=True, gram_restart=2),
         "gram_no_restart": dict(gram=True, gram_restart=None)}


def _gains(coeffs) -> list[float]:
  """G_k = prod_{j >= k} a_j, k = 0 .. steps (G_steps = 1)."""
  return [math.prod(row[0] for row in coeffs[k:])
          for k in range(len(coeffs) + 1)]


def _bound(coeffs, u, gram=False, gram_restart=2) -> float:
  """Largest entry error of the iteration against float64 (module doc)."""
  g = _gains(coeffs)
  if not gram:
    return 4 * u * sum(g)
  steps = len(coeffs)
  cut = steps if gram_restart is None else min(gram_restart, steps)
  total = g[0]  # the input's rounding
  for start, k in ((0, cut), (cut, steps - cut)):
    if k:
      total += (4 * k - 1) * g[start]
  return 4 * u * total


def _decaying(seed, shape, power=1.0) -> np.ndarray:
  """Random singular vectors, singular values 1 / (1 + i)^power."""
  rng = np.random.default_rng(seed)
  k = min(shape)
  u, _ = np.linalg.qr(rng.normal(size=(shape[0], k)))
  v, _ = np.linalg.qr(rng.normal(size=(shape[1], k)))
  return (u / (1.0 + np.arange(k)) ** power) @ v.T


def _ns_jax(x, kind, coeffs=PE, margin=PE_MARGIN, eps=1e-7, **kw):
  return newton_schulz(x, coeffs, norm_margin=margin, eps=eps,
                       preconditioning=kind, **kw)


def _ns(x, kind, **kw) -> np.ndarray:
  return np.asarray(_ns_jax(x, kind, **kw), np.float64)


def _max_err(got, want) -> float:
  return float(np.max(np.abs(np.asarray(got, np.float64)
                            - np.asarray(want, np.float64))))


# --- the iteration against the float64 reference -----------------------------


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", PRECONDITIONINGS)
def test_newton_schulz_against_float64(kind, shape, path):
  """Square, wide and tall, on a decaying spectrum (the small singular values
  carry the amplified rounding); float32 within the module's bound for the
  path, float64 input within the same bound at u = 2^-53."""
  x = _decaying(0, shape)
  want = reference.newton_schulz(x, PE, margin=PE_MARGIN, eps=1e-7,
                                 preconditioning=kind)
  got32 = _ns(jnp.asarray(x, jnp.float32), kind, **PATHS[path])
  assert _max_err(got32, want) <= _bound(PE, U32, **PATHS[path])
  with jax.enable_x64(True):
    got64 = _ns(jnp.asarray(x), kind, **PATHS[path])
  assert _max_err(got64, want) <= _bound(PE, U64, **PATHS[path])


def _lipschitz(coeffs, s) -> float:
  """Root-mean-square stretch of a random perturbation by the steps ``coeffs``
  on a matrix of singular values ``s``.

  The iteration is an odd matrix function X = U s V^T -> U phi(s) V^T; in the
  singular vector basis its derivative multiplies a perturbation's (i, j)
  entry by the divided differences (phi(s_i) -+ phi(s_j)) / (s_i -+ s_j)
  (phi'(s_i) on the diagonal) and its null-space part by phi(s_i) / s_i.
  Rounding errors are independent and spread over all entries, so their
  squared norm grows by the mean of these factors squared.
  """
  phi, slope = np.asarray(s, np.float64), np.ones_like(s)
  for a, b, c in coeffs:
    slope = slope * (a + 3 * b * phi**2 + 5 * c * phi**4)
    phi = a * phi + b * phi**3 + c * phi**5
  si, sj, fi, fj = s[:, None], s[None, :], phi[:, None], phi[None, :]
  same = si == sj
  minus = np.where(same, slope[:, None], (fi - fj) / np.where(same, 1, si - sj))
  plus = (fi + fj) / (si + sj)
  return float(np.sqrt((np.mean(minus**2) + np.mean(plus**2)
                        + np.mean((phi / s) ** 2)) / 3))


def _bf16_bound(coeffs, s0) -> float:
  """Relative Frobenius error of the bf16 iteration (bf16 operands, float32
  accumulation) against float64, from the singular values ``s0`` of its
  preconditioned input.

  Step k rounds to bf16 (relative u = 2^-9) its operand X_k (norm ||X_k||_F,
  stretched by the remaining steps k..), A for A^2 (c dA A + c A dA, norm
  <= 2u |c| s_max^4 ||X_k||_F), B = b A + c A^2 for B X (<= u max_s |b s +
  c s^3| s_max ||X_k||_F) and its output X_{k+1} (u ||X_{k+1}||_F), the last
  three stretched by the steps after k (:func:`_lipschitz`). Float32's own
  rounding is 2^15 times smaller and is left out.
  """
  coeffs = np.asarray(coeffs)
  spectra = [np.asarray(s0, np.float64)]
  for a, b, c in coeffs:
    s = spectra[-1]
    spectra.append(a * s + b * s**3 + c * s**5)
  fro = [np.linalg.norm(s) for s in spectra]
  total = 0.0
  for k, (a, b, c) in enumerate(coeffs):
    s, top = spectra[k], spectra[k].max()
    inner = 2 * abs(c) * top**4 + top * np.max(np.abs(b * s + c * s**3))
    total += UBF16 * (_lipschitz(coeffs[k:], s) * fro[k]
                      + _lipschitz(coeffs[k + 1:], spectra[k + 1])
                      * (inner * fro[k] + fro[k + 1]))
  return total / fro[-1]


@pytest.mark.parametrize("kind", PRECONDITIONINGS)
def test_bfloat16_against_float64(kind):
  """compute_dtype=bf16 on a tall matrix with a decaying spectrum, within
  :func:`_bf16_bound` of float64 (about 0.15 here)."""
  x = _decaying(1, (48, 32))
  want = reference.newton_schulz(x, PE, margin=PE_MARGIN, eps=1e-7,
                                 preconditioning=kind)
  s0 = np.linalg.svd(reference.precondition(x.T, kind, margin=PE_MARGIN),
                     compute_uv=False)
  got = newton_schulz(jnp.asarray(x, jnp.float32), PE, norm_margin=PE_MARGIN,
                      preconditioning=kind, compute_dtype=jnp.bfloat16)
  assert got.dtype == jnp.float32
  err = (np.linalg.norm(np.asarray(got, np.float64) - want)
         / np.linalg.norm(want))
  assert err <= _bf16_bound(PE, s0), (err, _bf16_bound(PE, s0))


# --- the preconditioners themselves, in float64 -------------------------------


def _matrices() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(2)
  u, _ = np.linalg.qr(rng.normal(size=(20, 20)))
  v, _ = np.linalg.qr(rng.normal(size=(36, 20)))
  return {"gaussian": rng.normal(size=(20, 36)),
          "ill_conditioned": (u * np.geomspace(1.0, 1e-10, 20)) @ v.T,
          "rank_one": np.outer(rng.normal(size=20), rng.normal(size=36)),
          "row_scaled": (rng.normal(size=(20, 36))
                         * np.geomspace(1e3, 1e-3, 20)[:, None])}


@pytest.mark.parametrize("margin", [1.0, 1.3])
@pytest.mark.parametrize("kind", PRECONDITIONINGS)
def test_precondition_bounds_spectral_norm(kind, margin):
  """Every kind leaves ||X||_2 <= 1/margin (AOL: ||D X||_2 <= 1 by Prach &
  Lampert's bound; Schatten-4 and Frobenius bound the spectral norm), equals
  the reference, and returns X X^T of its output as the Gram matrix. float64
  rounding of these m x n reductions and of the SVD: relative <= m n u each
  (worst-case accumulation), so 4 m n u in all."""
  slack = 4 * 20 * 36 * U64
  for name, x in _matrices().items():
    with jax.enable_x64(True):
      out, gram = precondition(jnp.asarray(x), kind, margin=margin, eps=0.0)
    out = np.asarray(out)
    want = reference.precondition(x, kind, margin=margin, eps=0.0)
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(out, want, rtol=0, atol=slack * scale,
                               err_msg=name)
    top = np.linalg.norm(out, 2)
    assert top <= (1 + slack) / margin, (name, top)
    if kind == "spectral":
      np.testing.assert_allclose(top, 1 / margin, rtol=slack)
    if gram is None:
      assert kind in ("frobenius", "spectral")
    else:
      np.testing.assert_allclose(np.asarray(gram), out @ out.T, rtol=0,
                                 atol=slack * np.max(np.abs(out @ out.T)))


def test_norm_orderings():
  """||X||_2 <= ||X||_S4 <= ||X||_F, read off the scalar preconditioners as
  1 / ||output||_F (eps = 0): equal on a rank-one matrix, apart on a
  Gaussian one, and on the
  identity exactly 1, n^(1/4) and n^(1/2). AOL makes orthogonal rows of any
  lengths orthonormal (D = diag(1 / ||x_i||))."""
  slack = 4 * 20 * 36 * U64

  def norm(kind, x):
    with jax.enable_x64(True):
      out, _ = precondition(jnp.asarray(x), kind, eps=0.0)
    return np.linalg.norm(x / np.max(np.abs(x))) / np.linalg.norm(out)

  for name, x in _matrices().items():
    spectral, schatten, frobenius = (norm(k, x) for k in
                                     ("spectral", "schatten", "frobenius"))
    assert spectral <= schatten * (1 + slack), name
    assert schatten <= frobenius * (1 + slack), name
    if name == "rank_one":
      np.testing.assert_allclose([schatten, frobenius], spectral, rtol=slack)
    elif name == "gaussian":  # a flat spectrum: the three norms far apart
      assert frobenius > schatten * 1.1 and schatten > spectral * 1.1
  eye = np.eye(16)
  np.testing.assert_allclose([norm(k, eye) for k in
                              ("spectral", "schatten", "frobenius")],
                             [1.0, 2.0, 4.0], rtol=slack)
  rng = np.random.default_rng(3)
  q, _ = np.linalg.qr(rng.normal(size=(36, 20)))
  with jax.enable_x64(True):
    rows = q.T * np.geomspace(1e3, 1e-3, 20)[:, None]
    out, _ = precondition(jnp.asarray(rows), "aol", eps=0.0)
  np.testing.assert_allclose(np.asarray(out), q.T, atol=slack)


# --- degenerate input, scale, gradients ---------------------------------------


@pytest.mark.parametrize("eps", [0.0, 1e-7])
@pytest.mark.parametrize("kind", PRECONDITIONINGS)
def test_zero_matrix_and_zero_row(kind, eps):
  """A zero matrix maps to zero, and a zero row of the wide orientation (a
  zero column of a tall matrix) stays zero (it is zero in every product),
  with the other rows those of the float64 reference (plain-path float32
  bound); jax.grad is finite at both."""
  rng = np.random.default_rng(4)
  run = jax.jit(lambda y: _ns_jax(y, kind, eps=eps))
  grad = jax.jit(jax.grad(lambda y, w: jnp.sum(_ns_jax(y, kind, eps=eps) * w)))
  zero = jnp.zeros((24, 40), jnp.float32)
  np.testing.assert_array_equal(np.asarray(run(zero)), 0.0)
  weights = jnp.asarray(rng.normal(size=(24, 40)), jnp.float32)
  assert np.all(np.isfinite(np.asarray(grad(zero, weights))))
  x = _decaying(5, (24, 40))
  x[7] = 0.0
  for m in (x, x.T):  # wide with a zero row; tall with a zero column
    got = np.asarray(run(jnp.asarray(m, jnp.float32)), np.float64)
    want = reference.newton_schulz(m, PE, margin=PE_MARGIN, eps=eps,
                                   preconditioning=kind)
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got[7] if m is x else got[:, 7], 0.0)
    assert _max_err(got, want) <= _bound(PE, U32)
    weights = jnp.asarray(rng.normal(size=m.shape), jnp.float32)
    assert np.all(np.isfinite(np.asarray(grad(jnp.asarray(m, jnp.float32),
                                              weights))))


@pytest.mark.parametrize("kind", PRECONDITIONINGS)
def test_scale_invariance(kind):
  """1e20 G (its Frobenius norm squared overflows float32) and 1e-12 G (its
  squares are subnormal, 1e-24 times G's) give G's update in float32: within
  the plain-path bound of G's float64 reference, plus one more input rounding
  (the scaled entries are rounded: 4u G_0)."""
  x = _decaying(6, (24, 40))
  want = reference.newton_schulz(x, PE, margin=PE_MARGIN, eps=1e-7,
                                 preconditioning=kind)
  bound = _bound(PE, U32) + 4 * U32 * _gains(PE)[0]
  for scale in (1e20, 1e-12):
    got = _ns(jnp.asarray(scale * x, jnp.float32), kind)
    assert _max_err(got, want) <= bound, scale


# --- the Pallas backend ------------------------------------------------------


@pytest.mark.parametrize("kind,gram", [("schatten", False), ("aol", True)])
def test_pallas_backend(kind, gram):
  """backend="pallas" (the kernels interpreted on CPU) runs the preconditioner
  on its own Gram product: it and backend="xla" both lie within the path's
  float32 bound of float64, hence within twice that of each other."""
  x = _decaying(7, (24, 40))
  want = reference.newton_schulz(x, PE, margin=PE_MARGIN, eps=1e-7,
                                 preconditioning=kind)
  bound = _bound(PE, U32, gram=gram)
  run = lambda backend: np.asarray(jax.jit(lambda y: _ns_jax(
      y, kind, gram=gram, backend=backend))(jnp.asarray(x, jnp.float32)),
                                   np.float64)
  pallas, xla = run("pallas"), run("xla")
  assert _max_err(pallas, want) <= bound and _max_err(xla, want) <= bound
  assert _max_err(pallas, xla) <= 2 * bound


# --- orthogonalize: adaptive scaling ------------------------------------------


def _tree(dtype=np.float64):
  rng = np.random.default_rng(8)
  return {"stack": rng.normal(size=(3, 16, 24)).astype(dtype),
          "w": rng.normal(size=(20, 12)).astype(dtype)}


def _expected(tree, kind, adaptive, coeffs, margin, eps):
  """Per matrix O_b = polar approximation of G_b (float64 reference); scaled
  by <G_b, O_b> (adaptive=True) or by the leaf's sum of them ("leaf")."""
  out = {}
  for name, g in tree.items():
    g = np.asarray(g, np.float64)
    mats = g if g.ndim == 3 else g[None]
    o = np.stack([reference.newton_schulz(m, coeffs, margin=margin, eps=eps,
                                          preconditioning=kind) for m in mats])
    dual = np.sum(mats * o, axis=(1, 2), keepdims=True)
    if adaptive == "leaf":
      o = np.sum(dual) * o
    elif adaptive:
      o = dual * o
    out[name] = o if g.ndim == 3 else o[0]
  return out


def _adaptive_bound(g, bound, u=U32) -> float:
  """Entry error of <G, O> O given ||dO||_2 <= bound: |<G, dO>| <= ||G||_*
  bound, times |O_ij| <= ||O||_2 <= 1.2 (the presets' band), plus |<G, O>| <=
  1.2 ||G||_* times |dO_ij| <= bound; the float32 sum of m n products adds
  m n u sum |G| (worst-case accumulation, u the leaf's unit roundoff) times
  1.2."""
  mats = g if g.ndim == 3 else g[None]
  nuclear = sum(np.linalg.svd(m, compute_uv=False).sum() for m in mats)
  return 1.2 * (2 * nuclear * bound + mats[0].size * u * np.sum(np.abs(g)))


@pytest.mark.parametrize("adaptive", [False, True, "leaf"])
@pytest.mark.parametrize("kind", PRECONDITIONINGS)
def test_orthogonalize_adaptive(kind, adaptive):
  """adaptive=True scales each matrix of a stacked 3-D leaf by its own
  <G_b, O_b>; "leaf" by the sum over the leaf (optax's); on a 2-D leaf the
  two agree. float64 leaves, float64 bounds (Gram path: "auto" may pick it)."""
  tree = _tree()
  tx = orthax.orthogonalize(preconditioning=kind, adaptive=adaptive,
                            dimension_numbers={"stack": DIMS(1, 2), "w": None})
  with jax.enable_x64(True):
    got, _ = tx.update(jax.tree.map(jnp.asarray, tree), None)
  want = _expected(tree, kind, adaptive, PE, PE_MARGIN, 1e-7)
  for name, g in tree.items():
    bound = _bound(PE, U64, gram=True)
    bound = _adaptive_bound(g, bound, U64) if adaptive else bound
    assert got[name].dtype == jnp.float64
    assert _max_err(got[name], want[name]) <= bound, name
  # the two modes differ (by far more than the bound) exactly on the stack
  other = _expected(tree, kind, "leaf" if adaptive is True else True, PE,
                    PE_MARGIN, 1e-7)
  if adaptive:
    assert _max_err(other["stack"], want["stack"]) > 1e3 * bound
    np.testing.assert_allclose(other["w"], want["w"], rtol=1e-12)


# --- the sharded path ---------------------------------------------------------


def sharded_check() -> None:
  """Run in a process with 8 CPU devices: aol + adaptive=True on the sharded
  path and unsharded, both within the float32 adaptive bound of float64."""
  assert jax.device_count() == 8, jax.device_count()
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((8,), ("fsdp",))
  rng = np.random.default_rng(9)
  tree = {"stack": rng.normal(size=(4, 32, 64)).astype(np.float32),
          "w": rng.normal(size=(64, 128)).astype(np.float32)}
  specs = {"stack": P(None, "fsdp", None), "w": P("fsdp", None)}
  dims = {"stack": DIMS(1, 2), "w": None}
  kw = dict(preconditioning="aol", adaptive=True, dimension_numbers=dims)
  sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k]))
             for k, v in tree.items()}
  tx = orthax.orthogonalize(mesh=mesh, mesh_axis="fsdp", **kw)
  got = jax.jit(lambda t: tx.update(t, None)[0])(sharded)
  plain = orthax.orthogonalize(**kw).update(
      jax.tree.map(jnp.asarray, tree), None)[0]
  want = _expected(tree, "aol", True, PE, PE_MARGIN, 1e-7)
  for name, g in tree.items():
    bound = _adaptive_bound(g, _bound(PE, U32, gram=True))
    for out in (got, plain):
      assert _max_err(out[name], want[name]) <= bound, (name, bound)


def test_sharded_aol_adaptive_on_8_devices():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                      + " --xla_force_host_platform_device_count=8")
  here = os.path.dirname(os.path.abspath(__file__))
  run = subprocess.run(
      [sys.executable, "-c", "import sys; sys.path[:0] = [sys.argv[1]]; "
       "import test_preconditioning as t; t.sharded_check()", here],
      env=env, capture_output=True, text=True, timeout=600,
      cwd=os.path.dirname(here))
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]


# --- against optax -----------------------------------------------------------


def _optax(tree, kind):
  """optax's own iteration (Jordan's triple, 5 steps, eps 1e-8) leaf by leaf."""
  dims = {"stack": DIMS(1, 2), "w": DIMS(0, 1), "t": DIMS(0, 1)}

  def leaf(g, dim):
    return optax_muon.orthogonalize_via_newton_schulz(
        g, jnp.asarray(MUON, g.dtype), 5, kind, 1e-8, dim)

  return jax.jit(lambda t: {k: leaf(v, dims[k]) for k, v in t.items()})(tree)


@pytest.mark.parametrize("kind", PRECONDITIONINGS)
def test_matches_optax(kind):
  """orthax.orthogonalize with optax's settings (Jordan's triple x5,
  norm_margin 1, eps 1e-8, plain path) is optax's iteration, on a wide, a
  tall and a stacked 3-D leaf.

  In float64 the two differ by their eps only: optax adds 1e-8 to the norm
  (frobenius, spectral) or floors the squared norms at 1e-8 (schatten, aol),
  orthax adds 1e-8 times the largest entry; so the input (each row, for aol)
  is scaled differently by a relative delta <= 1e-8 (1 + max|G|) / N, N the
  smallest norm any kind divides by (the spectral norm, or for aol a row
  norm ||g_i|| <= (sum_j |(G G^T)_ij|)^(1/2)), which the steps stretch by at
  most G_0 = 3.4445^5 = 486; plus each side's float64 rounding. In float32
  each side is within the plain-path bound (4u sum G_k = 1.6e-4) of its own
  float64 result.
  """
  rng = np.random.default_rng(10)
  tree = {"w": rng.normal(size=(24, 40)), "t": rng.normal(size=(40, 24)),
          "stack": rng.normal(size=(3, 16, 28))}
  tx = orthax.orthogonalize(coeffs=MUON, preconditioning=kind, norm_margin=1.0,
                            eps=1e-8, gram=False,
                            dimension_numbers={"stack": DIMS(1, 2), "w": None,
                                               "t": None})
  with jax.enable_x64(True):
    got64 = jax.jit(lambda t: tx.update(t, None)[0])(tree)
    want64 = _optax(tree, kind)
  tree32 = jax.tree.map(np.float32, tree)
  got32 = jax.jit(lambda t: tx.update(t, None)[0])(tree32)
  want32 = _optax(tree32, kind)
  for name, g in tree.items():
    mats = g if g.ndim == 3 else g[None]
    wide = [m if m.shape[0] <= m.shape[1] else m.T for m in mats]
    smallest = min(min(np.linalg.norm(m, 2), np.min(np.linalg.norm(m, axis=1)))
                   for m in wide)
    delta = 1e-8 * (1 + np.max(np.abs(g))) / smallest
    bound64 = delta * _gains(MUON)[0] + 2 * _bound(MUON, U64)
    bound32 = bound64 + 2 * _bound(MUON, U32)
    assert _max_err(got64[name], want64[name]) <= bound64, name
    assert _max_err(got32[name], want32[name]) <= bound32, name
