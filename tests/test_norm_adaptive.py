"""NAMO and NAMO-D (``orthax.norm_adaptive``) against the float64 reference.

The reference (``reference.namo_step``) is the official code's step written
on the torch-layout ``W^T``, with NAMO-D's column-wise statistics; the orthax
chain keeps one statistic per fan_in row of ``W``. Agreement to 1e-10 in
float64 therefore also checks that ``granularity="input"`` is the official
column-wise form on the transpose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
import reference
from checkpoints import orbax_round_trip

LR, WD, B1, B2 = 0.02, 0.1, 0.95, 0.99
STEPS = 6
U32 = 2.0**-24  # float32 unit roundoff
DIMS = orthax.MuonDimensionNumbers
SHAPES = {
    "square": ((10, 10), None),
    "wide": ((6, 15), None),
    "tall": ((15, 6), None),
    "stacked": ((3, 8, 12), DIMS(1, 2)),
}
BATCH_IN_MIDDLE = ((8, 2, 12), DIMS(0, 2))
SPECS = {k: spec for k, (_, spec) in SHAPES.items()}
VARIANTS = {  # name: (granularity, clamp)
    "namo": ("matrix", None),
    "namo_d": ("input", None),
    "namo_d_clamp": ("input", 0.75),
}


def _problem(seed, dtype=jnp.float64, shapes=SHAPES):
  """Params of RMS 1/sqrt(fan_in), and gradients ``a_i F + N_t``: input rows
  ``i`` whose fixed part ``F`` has weight ``a_i`` from 0 to 3 over white
  noise ``N_t``, the rows scaled by 0.1 to 10. NAMO-D's row factors then
  span several times (a consistent row keeps ``||M_i|| / sqrt(V_i)`` near
  1, a noisy one near ``sqrt((1 - B1) / (1 + B1))``), so the clamp binds."""
  rng = np.random.default_rng(seed)
  params, fixed, rows = {}, {}, {}
  for k, (shape, spec) in shapes.items():
    red = 0 if spec is None else spec.reduction_axis
    params[k] = rng.normal(size=shape) / np.sqrt(shape[red])
    fixed[k] = rng.normal(size=shape)
    along = [1] * len(shape)
    along[red] = shape[red]
    rows[k] = (np.linspace(0, 3, shape[red]).reshape(along),
               np.geomspace(0.1, 10, shape[red]).reshape(along))
  grads = [{k: rows[k][1] * (rows[k][0] * fixed[k] + rng.normal(size=s))
            for k, (s, _) in shapes.items()} for _ in range(STEPS)]
  cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype), t)
  return cast(params), [cast(g) for g in grads]


def _chain(granularity="matrix", clamp=None, coeffs="svd", *, dims=SPECS,
           gram="auto", nesterov=True, **kw):
  """The NAMO / NAMO-D chain: Muon's momentum, the polar factor ("svd") or
  Newton–Schulz, and the combinator at LR, WD unless ``kw`` says otherwise."""
  kw = dict(beta1=B1, learning_rate=LR, weight_decay=WD) | kw
  direction = (orthax.orthogonalize(coeffs="svd", dimension_numbers=dims)
               if coeffs == "svd" else orthax.orthogonalize(
                   coeffs=coeffs, gram=gram, dimension_numbers=dims))
  return orthax.norm_adaptive(
      orthax.momentum(B1, nesterov=nesterov), direction,
      granularity=granularity, clamp=clamp, dimension_numbers=dims, **kw)


def _run_orthax(tx, params, grads):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _run_reference(params, grads, shapes=SHAPES, **kw):
  """namo_run on every 2-D slice; returns {leaf: [final slices]}."""
  index = [(k, i) for k in shapes
           for i in range(len(reference.matrices_of(np.asarray(params[k]), shapes[k][1])))]
  flat = lambda t: [reference.matrices_of(np.asarray(t[k], np.float64), shapes[k][1])[i]
                    for k, i in index]
  final = reference.namo_run(flat(params), [flat(g) for g in grads], **kw)[-1]
  out = {k: [] for k in shapes}
  for (k, _), w in zip(index, final):
    out[k].append(w)
  return out


def _max_error(got, want, shapes=SHAPES):
  return max(np.max(np.abs(s - w))
             for k in shapes
             for s, w in zip(reference.matrices_of(np.asarray(got[k], np.float64),
                                     shapes[k][1]), want[k]))


def _finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------
# The algorithm, against the float64 reference


@pytest.mark.parametrize("variant, coeffs", [
    ("namo", "svd"), ("namo_d", "svd"), ("namo_d_clamp", "muon")])
def test_float64_matches_reference(variant, coeffs):
  """Square, wide, tall and stacked leaves over 6 steps; "svd" against
  the exact polar factor, "muon" against the same five quintics. float64
  rounding (u = 1.1e-16) through five quintics (slope at most 3.4445 each)
  and sums of at most 100 terms stays far below 1e-10 of O(1) entries."""
  granularity, clamp = VARIANTS[variant]
  ref_coeffs = None if coeffs == "svd" else reference.MUON_ABC
  with jax.enable_x64(True):
    params, grads = _problem(0)
    got, state = _run_orthax(_chain(granularity, clamp, coeffs), params,
                             grads)
  want = _run_reference(params, grads, lr=LR, coeffs=ref_coeffs,
                        granularity=granularity, clamp=clamp)
  assert _max_error(got, want) < 1e-10
  assert state.grad_rms["stacked"].dtype == jnp.float64
  if clamp is not None:  # the clamp binds on this problem
    free = _run_reference(params, grads, lr=LR, coeffs=ref_coeffs,
                          granularity=granularity)
    assert _max_error(got, free) > 1e-4


def test_schedule_matches_reference():
  """A learning-rate schedule is read at the step count before the step (0
  first), as optax.scale_by_learning_rate reads it."""
  schedule = lambda count: LR * 0.5**count
  shapes = {k: SHAPES[k] for k in ("tall", "stacked")}
  dims = {k: SHAPES[k][1] for k in shapes}
  with jax.enable_x64(True):
    params, grads = _problem(1, shapes=shapes)
    got, _ = _run_orthax(_chain("input", 0.5, dims=dims,
                                learning_rate=schedule), params, grads)
  kw = dict(shapes=shapes, coeffs=None, granularity="input", clamp=0.5)
  want = _run_reference(params, grads, lr=schedule, **kw)
  assert _max_error(got, want, shapes) < 1e-10
  shifted = _run_reference(params, grads, lr=lambda t: schedule(t + 1), **kw)
  assert _max_error(got, shifted, shapes) > 1e-4


@pytest.mark.parametrize("granularity", ["matrix", "input"])
def test_caps_bind_at_a_huge_learning_rate(granularity):
  """At lr 50 every factor is capped: the step is -(O + WD W) (the
  shape-scaled and the decay rates both min(., 1)), as the reference's
  official caps give. With weight_decay 2 the decay factor stops at 0
  (NAMO-D's floor, kept for NAMO too): -(O + W)."""
  lr, shapes = 50.0, {"wide": SHAPES["wide"]}
  with jax.enable_x64(True):
    params, grads = _problem(2, shapes=shapes)
    w, g = np.asarray(params["wide"]), np.asarray(grads[0]["wide"])
    for wd in (WD, 2.0):
      tx = _chain(granularity, dims=None, learning_rate=lr, weight_decay=wd)
      u, _ = jax.jit(tx.update)(grads[0], tx.init(params), params)
      np.testing.assert_allclose(
          u["wide"], -(reference.exact_polar(g) + min(wd, 1) * w), atol=1e-13)
    got, _ = _run_orthax(_chain(granularity, dims=None, learning_rate=lr),
                         params, grads[:3])
  want = _run_reference(params, grads[:3], shapes=shapes, lr=lr, coeffs=None,
                        granularity=granularity)
  assert _max_error(got, want, shapes) < 1e-10


@pytest.mark.parametrize("granularity", ["matrix", "input"])
def test_uncapped_form_then_learning_rate_equals_capped_below_the_caps(
    granularity):
  """learning_rate=None, then optax.scale_by_learning_rate, is the same
  update where no cap binds (LR: every rate is below 0.1). The two differ
  by the order of a few float64 products: 1e-13 of O(1) entries."""
  shapes = {"stacked": SHAPES["stacked"]}
  dims = {k: SHAPES[k][1] for k in shapes}
  with jax.enable_x64(True):
    params, grads = _problem(3, shapes=shapes)
    capped, _ = _run_orthax(_chain(granularity, dims=dims), params,
                            grads[:3])
    free, _ = _run_orthax(
        optax.chain(_chain(granularity, dims=dims, learning_rate=None),
                    optax.scale_by_learning_rate(LR)), params, grads[:3])
  for k in shapes:
    np.testing.assert_allclose(capped[k], free[k], atol=1e-13, err_msg=k)


def _float32_bound(w0, grads, granularity, clamp, lr=LR):
  """Bound on the Frobenius error of float32 orthax against float64 for one
  matrix over the steps, from the reference's iterates (W_t, M_t, rate r_t
  per matrix or row):

  * Newton–Schulz (plain iteration, gram=False): within
    reference.newton_schulz_error_bound of the exact iteration, its input
    M_t carrying ``start`` relative error: each step's momentum and Nesterov
    sums round 10 times at most (products by beta and 1 - beta, their
    roundings, sums, the stored average), componentwise relative to the
    same sums of |g| (``A``), so ``start = 10 t u ||A|| / ||M||``;
  * the rate ``r = lr c b_t``: each norm is a sum of ``n`` squares of
    entries scaled to [-1, 1] (n u, any order) plus 4 roundings (square,
    mean, sqrt, the peak's product), the momentum's norm also ``start``;
    the moving average 4 roundings a step (hypot and its two products);
    ``b_t``'s powers (t + 2) u each, amplified by beta^t / (1 - beta^t) in
    ``1 - beta^t``; 8 more (eps, the ratio, lr, s, their products); the
    clamp's mean fan_in u more. The caps are 1-Lipschitz.
  * the step ``k O`` with ``k = min(r s, 1)``: ``max k`` times (the NS error
    plus ``delta ||O||``); the decay ``wd min(r, 1) W`` off by delta + 3u;
    the output's 3 roundings of (``max k ||O|| + wd ||W||``), and
    apply_updates' one of ``||W_t||``. W's error passes to the next step
    through the decay factor, at most 1, so the steps' errors add.
  """
  n = w0.size if granularity == "matrix" else w0.shape[1]
  state, w, acc, bound = None, w0, np.zeros_like(w0), 0.0
  for t, g in enumerate(grads, start=1):
    w_prev = w
    w, state, (m, rate) = reference.namo_step(
        w, g, state, lr=lr, coeffs=reference.MUON_ABC,
        granularity=granularity, clamp=clamp)
    acc = B1 * acc + (1 - B1) * np.abs(g)
    start = 10 * t * U32 * np.linalg.norm(
        B1 * acc + (1 - B1) * np.abs(g)) / np.linalg.norm(m)
    ns_err, o_norm = reference.newton_schulz_error_bound(
        m, [reference.MUON_ABC] * 5, u=U32, start=start)
    powers = ((t + 2) * B1**t / (1 - B1**t) + (t + 2) * B2**t / (1 - B2**t)
              ) * U32
    delta = (2 * (n + 4) + 4 * t + 8) * U32 + start + powers
    if clamp is not None:
      delta += w0.shape[0] * U32
    s = 0.2 * np.sqrt(max(w0.shape))
    k = np.max(np.minimum(rate * s, 1))
    decay = WD * np.max(np.minimum(rate, 1)) * np.linalg.norm(w_prev)
    bound += (k * (ns_err + delta * o_norm) + decay * (delta + 3 * U32)
              + 3 * U32 * (k * o_norm + WD * np.linalg.norm(w_prev))
              + U32 * np.linalg.norm(w))
  return bound, w


@pytest.mark.parametrize("variant", ["namo", "namo_d_clamp"])
def test_float32_within_derived_bound(variant):
  """float32 chain (Jordan's quintic, plain iteration) against the float64
  reference on the same float32 inputs, per matrix within _float32_bound.
  The bound has teeth: the reference at a learning rate 1% off falls
  outside it."""
  granularity, clamp = VARIANTS[variant]
  shapes = {k: SHAPES[k] for k in ("wide", "tall", "stacked")}
  dims = {k: SHAPES[k][1] for k in shapes}
  params, grads = _problem(4, jnp.float32, shapes)
  got, _ = _run_orthax(_chain(granularity, clamp, "muon", dims=dims,
                              gram=False), params, grads)
  as64 = lambda x, spec: reference.matrices_of(np.asarray(x, np.float64), spec)
  for k, (_, spec) in shapes.items():
    slices = zip(as64(params[k], spec),
                 zip(*[as64(g[k], spec) for g in grads]), as64(got[k], spec))
    for w0, g, w32 in slices:
      bound, want = _float32_bound(w0, g, granularity, clamp)
      assert np.linalg.norm(w32 - want) <= bound, k
      _, off = _float32_bound(w0, g, granularity, clamp, lr=1.01 * LR)
      assert np.linalg.norm(w32 - off) > bound, k


# --------------------------------------------------------------------------
# Properties of the method (METHODS.md section 2 (e))


def _nesterov_inputs(grads, nesterov=True):
  """M~_t of Muon's momentum for a list of 2-D float64 gradients."""
  m, out = 0.0, []
  for g in grads:
    m = B1 * m + (1 - B1) * g
    out.append(B1 * m + (1 - B1) * g if nesterov else m)
  return out


@pytest.mark.parametrize("nesterov, factor", [(True, 1 + B1), (False, 1.0)])
def test_first_step_rate_is_lr_times_one_plus_beta1(nesterov, factor):
  """With eps = 0, NAMO's first rate is lr (1 + beta1) with Nesterov and lr
  without, for any gradient: M~_1 = (1 - b1^2) g (or (1 - b1) g), sqrt(v_1)
  = sqrt(1 - b2) ||g||, b_1 = sqrt(1 - b2) / (1 - b1) (times (1 - b1) /
  (1 - b1 + 1e-12), the official guard: 2e-11 relative). It scales both the
  shaped polar factor and the decay. float64: a few roundings of O(1)."""
  with jax.enable_x64(True):
    params, grads = _problem(5, shapes={"tall": SHAPES["tall"]})
    tx = _chain(dims=None, eps=0.0, nesterov=nesterov)
    u, _ = jax.jit(tx.update)(grads[0], tx.init(params), params)
  w, g = np.asarray(params["tall"]), np.asarray(grads[0]["tall"])
  rate = LR * factor * (1 - B1) / (1 - B1 + 1e-12)
  want = -rate * (0.2 * np.sqrt(15) * reference.exact_polar(g) + WD * w)
  np.testing.assert_allclose(u["tall"], want, rtol=1e-12, atol=1e-15)


def test_decay_is_scaled_by_the_adaptive_factor_not_lr():
  """With a zero direction the update is the decay alone: -WD lr c_t b_t W,
  with c_t b_t computed here from the gradients (gradient scales that grow
  and shrink make it move away from 1, so lr alone would fail)."""
  shapes = {"square": SHAPES["square"]}
  with jax.enable_x64(True):
    params, grads = _problem(6, shapes=shapes)
    grads = [{"square": g["square"] * s} for g, s in
             zip(grads, [1.0, 4.0, 0.25, 1.0, 8.0, 0.1])]
    tx = orthax.norm_adaptive(orthax.momentum(B1), optax.set_to_zero(),
                              beta1=B1, learning_rate=LR, weight_decay=WD)
    state, update = tx.init(params), jax.jit(tx.update)
    w = np.asarray(params["square"])
    gs = [np.asarray(g["square"]) for g in grads]
    v, factors = 0.0, []
    for t, (g, m) in enumerate(zip(gs, _nesterov_inputs(gs)), start=1):
      u, state = update(grads[t - 1], state, params)
      v = B2 * v + (1 - B2) * np.sum(g * g)
      cb = (np.linalg.norm(m) / (np.sqrt(v) + 1e-8) * np.sqrt(1 - B2**t)
            / (1 - B1**t + 1e-12))
      np.testing.assert_allclose(u["square"], -WD * LR * cb * w, rtol=1e-12)
      factors.append(cb)
  assert max(abs(f - 1) for f in factors) > 0.5


def test_namo_direction_is_polar_of_nesterov_momentum():
  """Without decay, every NAMO step is a negative multiple of
  polar(M~_t), M~_t the Nesterov momentum computed here."""
  shapes = {"wide": SHAPES["wide"]}
  with jax.enable_x64(True):
    params, grads = _problem(7, shapes=shapes)
    tx = _chain(dims=None, weight_decay=0.0)
    state, update = tx.init(params), jax.jit(tx.update)
    gs = [np.asarray(g["wide"]) for g in grads]
    for g, m in zip(grads, _nesterov_inputs(gs)):
      u, state = update(g, state, params)
      p = reference.exact_polar(m)
      gamma = -np.sum(np.asarray(u["wide"]) * p) / np.sum(p * p)
      assert gamma > 0
      # float64 rounding of O(1) entries: 1e-12 of ||u|| with room
      residual = np.linalg.norm(u["wide"] + gamma * p)
      assert residual < 1e-12 * gamma * np.linalg.norm(p)


def test_namo_d_with_clamp_one_is_proportional_to_polar():
  """kappa = 1 clips every row to the mean factor: the update is one
  multiple of polar(M~); without the clamp the rows' factors differ (the
  problem's rows have different signal-to-noise ratios)."""
  shapes = {"tall": SHAPES["tall"]}
  with jax.enable_x64(True):
    params, grads = _problem(8, shapes=shapes)
    gs = [np.asarray(g["tall"]) for g in grads[:3]]
    for clamp, proportional in ((1.0, True), (None, False)):
      tx = _chain("input", clamp, dims=None, weight_decay=0.0)
      state, update = tx.init(params), jax.jit(tx.update)
      for g, m in zip(grads, _nesterov_inputs(gs)):
        u, state = update(g, state, params)
      p = reference.exact_polar(m)
      gamma = -np.sum(np.asarray(u["tall"]) * p) / np.sum(p * p)
      residual = np.linalg.norm(u["tall"] + gamma * p)
      assert (residual < 1e-12 * gamma * np.linalg.norm(p)) == proportional


@pytest.mark.parametrize("granularity", ["matrix", "input"])
def test_state_has_one_entry_per_matrix_or_input_row(granularity):
  """After one step grad_rms is sqrt((1 - b2) / n) times each matrix's (or
  input row's) gradient norm, n its entries: (batch,) or (batch, fan_in).
  float32: sums of at most 96 squares (96 u), a few more roundings: 1e-5."""
  shapes = {"stacked": SHAPES["stacked"], "batch_in_middle": BATCH_IN_MIDDLE}
  params, grads = _problem(9, jnp.float32, shapes)
  tx = orthax.norm_adaptive(
      orthax.momentum(B1), optax.identity(), beta1=B1,
      granularity=granularity,
      dimension_numbers={k: spec for k, (_, spec) in shapes.items()})
  _, state = jax.jit(tx.update)(grads[0], tx.init(params))
  for k, (_, spec) in shapes.items():
    g = np.stack(reference.matrices_of(np.asarray(grads[0][k], np.float64), spec))
    if granularity == "matrix":
      want = np.sqrt((1 - B2) * np.mean(g * g, axis=(1, 2)))
    else:
      want = np.sqrt((1 - B2) * np.mean(g * g, axis=2))
    assert state.grad_rms[k].shape == want.shape
    assert state.grad_rms[k].dtype == jnp.float32
    np.testing.assert_allclose(state.grad_rms[k], want, rtol=1e-5)


def test_weight_decay_mask():
  """A False leaf gets the update without decay, a True leaf with it; a
  callable mask is called on the params (identity direction: the mask
  concerns the decay alone). Other programs than the unmasked ones, so
  float64 rounding may differ: 1e-13 of O(1) entries."""
  shapes = {"square": SHAPES["square"], "wide": SHAPES["wide"]}
  chain = lambda **kw: orthax.norm_adaptive(
      orthax.momentum(B1), optax.identity(), beta1=B1, learning_rate=LR,
      **dict(weight_decay=WD) | kw)
  with jax.enable_x64(True):
    params, grads = _problem(10, shapes=shapes)
    plain = chain()
    free = chain(weight_decay=0.0)
    u_plain, _ = jax.jit(plain.update)(grads[0], plain.init(params), params)
    u_free, _ = jax.jit(free.update)(grads[0], free.init(params), params)
    tx = chain(weight_decay_mask=lambda p: {"square": True, "wide": False})
    u, _ = jax.jit(tx.update)(grads[0], tx.init(params), params)
  np.testing.assert_allclose(u["square"], u_plain["square"], atol=1e-13)
  np.testing.assert_allclose(u["wide"], u_free["wide"], atol=1e-13)
  assert np.max(np.abs(u_plain["wide"] - u_free["wide"])) > 1e-4


# --------------------------------------------------------------------------
# Edge cases, dtypes, transformations and checkpoints


def test_zero_gradients_give_zero_updates():
  """A zero gradient has c = 0: no step and no decay (the official rate is
  0 too), with a finite state; later zero gradients after real ones give
  finite updates."""
  shapes = {"stacked": SHAPES["stacked"]}
  params, grads = _problem(11, jnp.float32, shapes)
  zeros = jax.tree.map(jnp.zeros_like, grads[0])
  for (granularity, clamp), eps in ((VARIANTS["namo"], 1e-8),
                                    (VARIANTS["namo_d_clamp"], 0.0)):
    tx = _chain(granularity, clamp, "muon", dims=DIMS(1, 2), eps=eps)
    update = jax.jit(tx.update)
    u, state = update(zeros, tx.init(params), params)
    assert not np.any(np.asarray(u["stacked"]))
    assert _finite(state)
    _, state = update(grads[0], state, params)
    u, state = update(zeros, state, params)
    assert _finite((u, state))


def test_huge_gradients_are_finite_and_scale_free():
  """Gradients scaled by 2^100 (their squared norms overflow float32 by
  2^70) give bit for bit the update of the unscaled ones with eps = 0:
  every norm is taken on entries divided by their peak, and scaling by a
  power of two commutes with every rounding."""
  shapes = {"stacked": SHAPES["stacked"]}
  params, grads = _problem(12, jnp.float32, shapes)
  for granularity, clamp in (VARIANTS["namo"], VARIANTS["namo_d_clamp"]):
    tx = _chain(granularity, clamp, "muon", dims=DIMS(1, 2), eps=0.0)
    update = jax.jit(tx.update)
    s1 = s2 = tx.init(params)
    for g in grads[:3]:
      u1, s1 = update(g, s1, params)
      u2, s2 = update(jax.tree.map(lambda x: x * 2.0**100, g), s2, params)
      assert _finite((u2, s2))
      np.testing.assert_array_equal(u2["stacked"], u1["stacked"])


def test_bfloat16_leaves_compute_in_float32():
  """bfloat16 params and gradients: the state is float32 and the update is
  the float32 computation on the same values, rounded once to bfloat16
  (identity inner transforms and no decay, so each entry is the gradient
  times its row's rate). The two float32 programs may reduce in another
  order (the rates then within (2 (6 + 4) + 15 + 10) u = 3e-6 relative:
  two sums of 6 squares per row of the 15 x 6 matrix, the clamp's mean
  over 15 rows, ten roundings), so a result may fall on the other side of
  a bfloat16 rounding point: one bfloat16 ulp, 2^-8 relative. The full
  chain with decay then runs in bfloat16."""
  shapes = {"tall": SHAPES["tall"]}
  params, grads = _problem(13, jnp.bfloat16, shapes)
  up = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  tx = orthax.norm_adaptive(
      optax.identity(), optax.identity(), beta1=B1, learning_rate=LR,
      granularity="input", clamp=0.75)
  update = jax.jit(tx.update)
  u16, s16 = update(grads[0], tx.init(params))
  u32, _ = update(up(grads[0]), tx.init(up(params)))
  assert u16["tall"].dtype == jnp.bfloat16
  assert s16.grad_rms["tall"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(u16["tall"], np.float32),
                             u32["tall"], rtol=2.0**-8, atol=0)
  # the full chain in bfloat16 runs and stays finite
  tx = _chain("input", 0.75, "muon", dims=None)
  u, state = jax.jit(tx.update)(grads[0], tx.init(params), params)
  assert u["tall"].dtype == jnp.bfloat16 and _finite((u, state))


def test_vmap_over_matrices_equals_the_stacked_leaf():
  """vmap over independent 2-D problems (under jit, as every comparison
  here) equals the stacked leaf with dimension numbers (1, 2): the same
  float64 operations in other orders, within 1e-13 of O(1) entries."""
  shapes = {"stacked": SHAPES["stacked"]}
  with jax.enable_x64(True):
    params, grads = _problem(14, shapes=shapes)
    jitted, _ = _run_orthax(_chain("input", 0.75, dims=DIMS(1, 2)), params,
                            grads[:2])
    single = _chain("input", 0.75, dims=None)
    w = {"m": params["stacked"]}
    state = jax.vmap(single.init)(w)
    update = jax.jit(jax.vmap(single.update))
    for g in grads[:2]:
      u, state = update({"m": g["stacked"]}, state, w)
      w = optax.apply_updates(w, u)
  np.testing.assert_allclose(w["m"], jitted["stacked"], atol=1e-13)


def test_orbax_resume_is_bit_identical(tmp_path):
  params, grads = _problem(15, jnp.float32, {"stacked": SHAPES["stacked"]})
  tx = _chain("input", 0.75, dims=DIMS(1, 2))
  straight = _run_orthax(tx, params, grads)
  first = _run_orthax(tx, params, grads[:3])
  restored = orbax_round_trip(tmp_path / "ckpt",
                              {"params": first[0], "state": first[1]})
  assert jax.tree.structure(restored["state"]) == jax.tree.structure(first[1])
  state = restored["state"]
  update = jax.jit(tx.update)
  p = restored["params"]
  for g in grads[3:]:
    u, state = update(g, state, p)
    p = optax.apply_updates(p, u)
  for a, b in zip(jax.tree.leaves((p, state)), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("make, call, error, match", [
    (lambda: _chain(dims=None), lambda tx, p: tx.update(p, tx.init(p)),
     ValueError, r"needs the params"),
    (lambda: _chain(dims=None), lambda tx, p: tx.update(
        {"w": jnp.ones((4, 6)), "v": jnp.ones((3,))},
        tx.init({"w": jnp.ones((4, 6)), "v": jnp.ones((3,))}),
        {"w": jnp.ones((4, 6)), "v": jnp.ones((3,))}),
     ValueError, r"\['v'\] has shape \(3,\)"),
    (lambda: _chain(dims=None), lambda tx, p: tx.update(
        {"w": jnp.ones((6, 4))}, tx.init(p), p),
     ValueError, r"\['w'\] has a gradient of shape \(6, 4\)"),
    (lambda: _chain("input", dims=None), lambda tx, p: tx.update(
        p, _chain(dims=None).init(p), p),
     ValueError, r"\['w'\] is an array of shape \(1,\).*\(1, 4\)"),
    (lambda: _chain(dims=None), lambda tx, p: tx.update(
        {"w": jnp.ones((4, 6), jnp.int32)}, tx.init(p), p),
     TypeError, r"\['w'\] has dtype int32"),
    (lambda: _chain(dims=None, weight_decay_mask={"w": 1}),
     lambda tx, p: tx.update(p, tx.init(p), p),
     TypeError, r"\['w'\] the value 1"),
    (lambda: _chain(dims=None), lambda tx, p: tx.update(
        p, tx.init(p)._replace(count=None), p),
     ValueError, r"count is None"),
])
def test_bad_input_is_named(make, call, error, match):
  params = {"w": jnp.ones((4, 6))}
  tx = make()
  with pytest.raises(error, match=match):
    call(tx, params)


@pytest.mark.parametrize("kw, error, match", [
    (dict(granularity="output"), ValueError, "unknown granularity"),
    (dict(clamp=0.5), ValueError, "clamp acts on the rows"),
    (dict(granularity="input", clamp=0.0), ValueError, "clamp must be in"),
    (dict(granularity="input", clamp=1.5), ValueError, "clamp must be in"),
    (dict(beta1=1.0), ValueError, "beta1 must be in"),
    (dict(beta2=-0.1), ValueError, "beta2 must be in"),
    (dict(eps=-1.0), ValueError, "eps must be in"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must be in"),
    (dict(shape_scale="frobenius"), ValueError, "unknown shape_scale"),
    (dict(learning_rate="0.1"), TypeError, "learning_rate must be"),
    (dict(bias_correction=1), TypeError, "bias_correction must be a bool"),
])
def test_bad_hyperparameters(kw, error, match):
  kw = dict(beta1=B1) | kw
  with pytest.raises(error, match=match):
    orthax.norm_adaptive(orthax.momentum(), orthax.orthogonalize(), **kw)
