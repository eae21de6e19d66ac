"""The Pallas kernels (orthax.kernels), interpreted on CPU, against NumPy float64
and against the XLA path; lowering for TPU and GPU; compiled runs on a device.

Both kernel variants run here. The TPU one runs under the TPU interpreter with
two simulated cores: "parallel" grid axes are split between them in a shuffled
order, each core has its own VMEM accumulator, and uninitialized buffers read
as NaN, so a reduction axis marked parallel, an accumulator read before it is
set, or a tile never written all show up as wrong numbers. The Triton one
runs under the generic interpreter. Small tiles (16) give multi-tile grids,
padding and the triangle walk on small matrices.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

import orthax
from orthax import kernels
from orthax.kernels import matmul, platform
from orthax.polar import PRESETS, auto_backend, newton_schulz

SMALL = kernels.Tiles(16, 16)
VARIANTS = {
    "mosaic_tpu": kernels.Target(
        "mosaic_tpu", pltpu.InterpretParams(num_cores_or_threads=2,
                                            random_seed=0)),
    "triton": kernels.Target("triton", interpret=True),
}
PE = PRESETS["polar_express"]
BF16_EPS = 2.0**-8  # bfloat16 unit roundoff (8 significant bits)


def _bf16(a) -> np.ndarray:
  """``a`` rounded to bfloat16, back in float64."""
  return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)


def _symmetric(rng, shape, k=None) -> np.ndarray:
  """Gram matrices scaled to spectral norm about 1: the iteration's ``A``."""
  k = shape[-1] + 8 if k is None else k
  x = rng.normal(size=shape[:-1] + (k,))
  a = x @ np.swapaxes(x, -1, -2)
  return a / np.linalg.norm(a, 2, axis=(-2, -1), keepdims=True)


# --- each kernel alone, against NumPy float64 --------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_symmetric_matmul_gram(variant):
  """X X^T on a batched, odd-sized X (40x56: 3 row tiles, padded, 6 upper
  tiles); float32 accumulation, and the result is exactly symmetric."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 40, 56)) / np.sqrt(56)
  got = np.asarray(kernels.symmetric_matmul(
      jnp.asarray(x, jnp.float32), jnp.asarray(x, jnp.float32),
      target=VARIANTS[variant], tiles=SMALL))
  np.testing.assert_allclose(got, x @ np.swapaxes(x, -1, -2), atol=1e-5)
  np.testing.assert_array_equal(got, np.swapaxes(got, -1, -2))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_polynomial_epilogue(variant):
  """a I + b A + c A^2 with A^2 from bf16 operands: the epilogue is fused and
  the products accumulate in float32, so the result matches float64 on the
  bf16-rounded operands to float32 rounding (1e-5), far below one bf16 ulp
  (an accumulation in bf16 would miss by ~1e-2); also without the identity
  (the plain step's form) and from float32 operands."""
  rng = np.random.default_rng(1)
  a = _symmetric(rng, (2, 40, 40))
  a32 = jnp.asarray(a, jnp.float32)
  a = np.asarray(a32, np.float64)
  coef = (3.9, -2.7, 0.5)
  eye = np.eye(40)
  target = VARIANTS[variant]
  got = kernels.symmetric_matmul(a32, a32, scale=coef[2], addend=a32,
                                 addend_scale=coef[1], identity_scale=coef[0],
                                 operand_dtype=jnp.bfloat16, target=target,
                                 tiles=SMALL)
  low = _bf16(a)
  want = coef[0] * eye + coef[1] * a + coef[2] * low @ low
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  # and the bf16 rounding of the operands is visible at that tolerance
  assert np.abs(want - (coef[0] * eye + coef[1] * a + coef[2] * a @ a)).max() > 1e-4
  got = kernels.symmetric_matmul(a32, a32, scale=coef[2], addend=a32,
                                 addend_scale=coef[1], target=target,
                                 tiles=SMALL)
  np.testing.assert_allclose(np.asarray(got), coef[1] * a + coef[2] * a @ a,
                             atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_symmetric_product_of_commuting_matrices(variant):
  """P Q for two polynomials in one symmetric matrix (the Gram path's
  products): the upper tiles of P Q^T, mirrored, are P Q."""
  rng = np.random.default_rng(2)
  a = _symmetric(rng, (3, 33, 33))
  p = 2.0 * np.eye(33) - a + 0.5 * a @ a
  q = np.eye(33) + 3.0 * a @ a
  got = kernels.symmetric_matmul(jnp.asarray(p, jnp.float32),
                                 jnp.asarray(q, jnp.float32),
                                 target=VARIANTS[variant], tiles=SMALL)
  np.testing.assert_allclose(np.asarray(got), p @ q, atol=2e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_update(variant, dtype):
  """a X + P X with the accumulator started at a X; P rounded to X's dtype,
  float32 accumulation, one rounding to X's dtype at the end (half a bf16
  ulp of the result, ~|X| 2^-9); and P X alone (the Gram path's last
  product)."""
  rng = np.random.default_rng(3)
  p = _symmetric(rng, (2, 40, 40))
  x = jnp.asarray(rng.normal(size=(2, 40, 48)) / np.sqrt(48), dtype)
  x64 = np.asarray(x, np.float64)
  p32 = jnp.asarray(p, jnp.float32)
  p_op = np.asarray(jnp.asarray(p32, dtype), np.float64)
  got = kernels.matmul_update(p32, x, 3.4, target=VARIANTS[variant],
                              tiles=SMALL)
  assert got.dtype == dtype
  want = 3.4 * x64 + p_op @ x64
  tol = 1e-5 if dtype == jnp.float32 else np.abs(want).max() * BF16_EPS
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tol)
  if dtype == jnp.float32:
    got = kernels.matmul_update(p32, x, target=VARIANTS[variant], tiles=SMALL)
    np.testing.assert_allclose(np.asarray(got), p_op @ x64, atol=tol)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (2, 0, 3), (0, 3, 4)])
def test_empty_operands(variant, shape):
  """Empty results come back empty; an empty contraction (5x0 times its
  transpose) is the zero product, so only the epilogue's 2 I is left (exact:
  no rounding)."""
  x = jnp.zeros(shape)
  kw = dict(target=VARIANTS[variant], tiles=SMALL)
  got = kernels.symmetric_matmul(x, x, identity_scale=2.0, **kw)
  m = shape[-2]
  np.testing.assert_array_equal(got, np.broadcast_to(2.0 * np.eye(m),
                                                     shape[:-2] + (m, m)))
  p = jnp.ones(shape[:-2] + (m, m))
  assert kernels.matmul_update(p, x, 3.0, **kw).shape == shape


def test_triangle_walk_covers_each_upper_tile_once():
  for n in range(1, 8):
    got = [tuple(int(v) for v in matmul._triangle(jnp.int32(t), n))
           for t in range(n * (n + 1) // 2)]
    assert got == [(i, j) for i in range(n) for j in range(i, n)]


def test_block_sizes():
  """Blocks are powers of two, at most the preferred size, never smaller than
  needed (one block for a short axis, 128 or more on long ones), and among
  those the one that pads least: 768 splits into 256-blocks rather than
  padding to 1024."""
  for preferred in (16, 64, 256, 512):
    for dim in (1, 15, 40, 100, 128, 300, 768, 1000, 2304, 3072, 8192):
      b = platform.block_size(dim, preferred)
      low = min(128, max(16, 1 << (dim - 1).bit_length()), preferred)
      allowed = [c for c in (16, 32, 64, 128, 256, 512) if low <= c <= preferred]
      assert b in allowed, (dim, preferred, b)
      assert -(-dim // b) * b == min(-(-dim // c) * c for c in allowed)
  assert platform.block_size(768, 512) == 256
  assert platform.block_size(40, 256) == 64
  for target in (kernels.Target("mosaic_tpu"), kernels.Target("triton")):
    small, large = (kernels.tiles_for(target, s, 2) for s in (512, 8192))
    assert small.block <= large.block
    assert kernels.tiles_for(target, 512, 4).block_k == small.block_k // 2


# --- the whole iteration: Pallas path against the XLA path -------------------


def _ns(x, backend, **kw):
  return jax.jit(lambda x: newton_schulz(
      x, PE.coeffs, norm_margin=PE.norm_margin, backend=backend, **kw))(x)


@pytest.mark.parametrize("gram", [False, True])
@pytest.mark.parametrize("shape", [(32, 32), (24, 64), (51, 37), (3, 20, 44)])
def test_newton_schulz_float32_equals_xla(shape, gram):
  """backend="pallas" as a user gets it on CPU (the TPU variant, interpreted)
  on square, wide, tall and odd-sized (51x37: padded to 64x64), and batched
  matrices, plain and Gram path: the XLA path's iteration to float32
  rounding (measured <= 4.5e-6)."""
  x = jnp.asarray(np.random.default_rng(4).normal(size=shape), jnp.float32)
  want = _ns(x, "xla", gram=gram)
  got = _ns(x, "pallas", gram=gram)
  assert got.shape == x.shape and got.dtype == x.dtype
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("gram", [False, True])
def test_newton_schulz_multi_tile(gram):
  """The whole iteration on multi-tile grids (16-blocks: a batch of 40x72
  matrices runs triangles of 3x3 tiles, with padding). The Triton variant:
  the TPU one is checked tile by tile above and at the default tiles here,
  and its interpreter is too slow for this many grid steps in CI."""
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 40, 72)),
                  jnp.float32)
  ops = kernels.pallas_ops(VARIANTS["triton"], SMALL)
  np.testing.assert_allclose(np.asarray(_ns(x, ops, gram=gram)),
                             np.asarray(_ns(x, "xla", gram=gram)), atol=1e-5)


@pytest.mark.parametrize("gram", [False, True])
def test_newton_schulz_bfloat16(gram):
  """bf16 operands, f32 accumulation, on a decaying spectrum. bf16 keeps 8
  significant bits (relative rounding 2^-8). Both paths round the same
  quantities to bf16, but sum in different orders, so a sum near a rounding
  boundary can land on the neighbouring bf16 value; Polar Express's first
  steps multiply small singular values by up to 8, so such one-ulp
  differences grow over the 5 steps. Allowed: 8 * 2^-8 ~ 0.03 relative in
  Frobenius norm (measured <= 0.015 over 48 matrices of 4 shapes). Against
  float64, the kernels are held to the XLA path's own bound (0.05, as in
  test_coefficients)."""
  rng = np.random.default_rng(6)
  u, _ = np.linalg.qr(rng.normal(size=(32, 32)))
  v, _ = np.linalg.qr(rng.normal(size=(80, 32)))
  x = (u / (1.0 + np.arange(32))) @ v.T
  with jax.enable_x64(True):
    exact = np.asarray(newton_schulz(jnp.asarray(x), PE.coeffs,
                                     norm_margin=PE.norm_margin))
  x = jnp.asarray(x, jnp.float32)
  kw = dict(gram=gram, compute_dtype=jnp.bfloat16)
  xla = np.asarray(_ns(x, "xla", **kw), np.float64)
  pallas = np.asarray(_ns(x, "pallas", **kw), np.float64)
  rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
  assert rel(pallas, xla) < 8 * BF16_EPS, rel(pallas, xla)
  assert rel(pallas, exact) < 0.05 and rel(xla, exact) < 0.05


def _calls(jaxpr, into_scan=1):
  """(pallas_call equations with their multiplicity, dot_generals outside
  kernels) in a jaxpr, not descending into kernels."""
  kernels_, dots = [], 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      kernels_.append((eqn, into_scan))
      continue
    dots += eqn.primitive.name == "dot_general"
    times = into_scan * (eqn.params["length"] if eqn.primitive.name == "scan"
                         else 1)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      k, d = _calls(sub, times)
      kernels_ += k
      dots += d
  return kernels_, dots


@pytest.mark.parametrize("gram", [False, True])
def test_traced_program_is_pallas_calls(gram):
  """backend="pallas" puts every product in a pallas_call (no XLA dot left):
  3 per plain step; per Gram segment of k steps, G, k polynomials, k-1
  updates of Q, 2(k-1) of A and Q X_0. The symmetric ones walk only the
  upper triangle: T(T+1)/2 tiles of T×T."""
  x = jnp.ones((2, 96, 160), jnp.float32)
  ops = kernels.pallas_ops(VARIANTS["mosaic_tpu"], kernels.Tiles(32, 32))
  jaxpr = jax.make_jaxpr(lambda x: newton_schulz(
      x, PE.coeffs, gram=gram, backend=ops))(x).jaxpr
  calls, dots = _calls(jaxpr)
  assert dots == 0
  segments = (2, 3) if gram else ()
  want = sum(4 * k - 1 for k in segments) if gram else 3 * len(PE.coeffs)
  assert sum(times for _, times in calls) == want
  tri = 3 * 4 // 2  # 96 rows in 32-blocks: 3 tiles a side
  grids = sorted(tuple(e.params["grid_mapping"].grid) for e, _ in calls)
  assert (2, tri, 160 // 32) in grids  # X X^T
  assert (2, tri, 96 // 32) in grids  # A^2 and the Gram path's products
  assert (2, 3, 160 // 32, 96 // 32) in grids  # the update: all 3×5 tiles
  _, xla_dots = _calls(jax.make_jaxpr(lambda x: newton_schulz(
      x, PE.coeffs, gram=gram))(x).jaxpr)
  assert xla_dots > 0


def test_auto_takes_the_kernels_exactly_where_measured(monkeypatch):
  """backend="auto" runs pallas_calls only for a row of the measured table
  that matches this device's kind, the compute dtype, the path and the
  sides (either orientation); any other shape, dtype or path, another
  device's row, or the shipped (empty) table give XLA's iteration."""
  def kernel_calls(shape, dtype=jnp.float32, **kw):
    jaxpr = jax.make_jaxpr(lambda x: newton_schulz(
        x, PE.coeffs, backend="auto", **kw))(jnp.ones(shape, dtype)).jaxpr
    return len(_calls(jaxpr)[0])

  assert auto_backend.MEASURED_FASTER == ()  # none measured: XLA everywhere
  assert kernel_calls((32, 96), gram=False) == 0
  kind = jax.devices()[0].device_kind
  row = auto_backend.Measured(kind, "float32", False, (32, 96), 1.4,
                              "2026-11-27")
  monkeypatch.setattr(auto_backend, "MEASURED_FASTER", (
      row, row._replace(device_kind="another device", sides=(32, 64))))
  assert kernel_calls((32, 96), gram=False) > 0
  assert kernel_calls((2, 96, 32), gram=False) > 0  # tall, stacked
  assert kernel_calls((32, 64), gram=False) == 0  # only another device's
  assert kernel_calls((32, 97), gram=False) == 0
  assert kernel_calls((32, 96), gram=True) == 0
  assert kernel_calls((32, 96), gram=False, compute_dtype=jnp.bfloat16) == 0
  assert kernel_calls((32, 96), jnp.bfloat16, gram=False) == 0
  # the transform passes "auto" down (its default)
  x = jnp.ones((32, 96))
  jaxpr = jax.make_jaxpr(lambda t: orthax.orthogonalize(gram=False).update(
      t, None)[0])(x).jaxpr
  assert _calls(jaxpr)[0]


# --- errors and wiring -------------------------------------------------------


def test_orthogonalize_backend_pallas():
  """The transform passes backend through (stacked leaves, a tall one
  included) and refuses the SVD with the kernels."""
  rng = np.random.default_rng(7)
  tree = {"a": jnp.asarray(rng.normal(size=(24, 40)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(40, 24)), jnp.float32)}
  run = lambda backend: jax.jit(lambda t: orthax.orthogonalize(
      backend=backend, gram=False).update(t, None)[0])(tree)
  got, want = run("pallas"), run("xla")
  for k in tree:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]),
                               atol=1e-5)
  with pytest.raises(ValueError, match="backend='pallas'.*svd"):
    orthax.orthogonalize(coeffs="svd", backend="pallas")
  with pytest.raises(ValueError, match="Unknown orthogonalization backend"):
    orthax.orthogonalize(backend="triton")


def test_float64_is_refused():
  with jax.enable_x64(True):
    with pytest.raises(ValueError, match="float32.*backend='xla'"):
      newton_schulz(jnp.ones((8, 16), jnp.float64), PE.coeffs,
                    backend="pallas")
  with pytest.raises(ValueError, match="Unknown Newton-Schulz backend"):
    newton_schulz(jnp.ones((8, 16)), PE.coeffs, backend="cuda")


def test_platform_picks_lowering():
  assert kernels.target("tpu") == kernels.Target("mosaic_tpu")
  assert kernels.target("gpu") == kernels.Target("triton")
  cpu = kernels.target("cpu")
  assert cpu.lowering == "mosaic_tpu"
  assert isinstance(cpu.interpret, pltpu.InterpretParams)
  with pytest.raises(ValueError, match="Unknown Pallas lowering"):
    kernels.Target("mosaic_gpu")


# --- lowering and compiling for the accelerators -----------------------------


@pytest.mark.parametrize("platform_name, lowering", [("tpu", "mosaic_tpu"),
                                                     ("cuda", "triton")])
@pytest.mark.parametrize("gram", [False, True])
def test_lowers_for_accelerator(platform_name, lowering, gram):
  """Lowering runs on any host: Pallas checks block shapes against Mosaic's
  (8, 128) tiling and Triton's power-of-two rule, and emits the TPU custom
  call or Triton IR, with the default tiles on a bf16 GPT-2-like stack and an
  odd float32 shape. (Compiling needs the device; see the test below.)"""
  ops = kernels.pallas_ops(kernels.Target(lowering))
  fn = jax.jit(lambda x: newton_schulz(x, PE.coeffs, gram=gram, backend=ops))
  triton_call = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
  for shape, dtype in (((2, 256, 768), jnp.bfloat16), ((300, 200), jnp.float32)):
    exported = export.export(fn, platforms=[platform_name],
                             disabled_checks=[triton_call])(
                                 jax.ShapeDtypeStruct(shape, dtype))
    text = exported.mlir_module()
    marker = "tpu_custom_call" if lowering == "mosaic_tpu" else "xla.gpu.triton"
    assert marker in text


def test_compiled_on_device_equals_xla():
  """Compiled kernels on a GPU or TPU, float32 and bf16, against XLA: float32
  at full precision on both sides to 1e-4 (larger matrices than above, more
  rounding), bf16 within the bound of test_newton_schulz_bfloat16."""
  if jax.default_backend() not in ("gpu", "tpu"):
    pytest.skip(f"needs a GPU or TPU; the default backend is "
                f"{jax.default_backend()!r} (the kernels are interpreted on "
                "it, which the tests above cover)")
  rng = np.random.default_rng(8)
  for shape in ((768, 2304), (4, 512, 512), (300, 200)):
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    for gram in (False, True):
      with jax.default_matmul_precision("highest"):  # no TF32 on the XLA side
        want = _ns(x, "xla", gram=gram)
        got = _ns(x, "pallas", gram=gram)
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
      got = np.asarray(_ns(x, "pallas", gram=gram,
                           compute_dtype=jnp.bfloat16), np.float64)
      want = np.asarray(_ns(x, "xla", gram=gram,
                            compute_dtype=jnp.bfloat16), np.float64)
      assert np.linalg.norm(got - want) / np.linalg.norm(want) < 8 * BF16_EPS
