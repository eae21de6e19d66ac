"""Sharded orthogonalization and Pion on 8 CPU devices equal the unsharded path.

The checks need 8 devices, and a process's JAX sees the device count it
started with: in a normal test session (1 CPU device) this module runs itself
again in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
and reports that run (``test_on_8_devices``); there, the real tests below run.

Sharded and unsharded runs differ only by rounding (other stacks, other
reduction orders, a matrix zero-padded into a larger slot taking the Gram
path), so each is compared with a float64 reference, within the float32 bound
``F32_BOUND`` derived below, rather than with the other.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import orthax
import reference
from orthax.matrices import matrix_views
from orthax.polar.newton_schulz import newton_schulz_flops
from orthax.sharded import _Kind, make_plan

DEVICES = 8
DIMS = orthax.MuonDimensionNumbers

# Float32 Newton-Schulz (the default: Polar Express, 5 steps) against the same
# iteration in float64, largest entry error (at most the error's spectral
# norm). Six roundings feed the result: the normalized input and each step's
# product. In the random-rounding model (Higham & Mary 2019) each perturbs
# the iterate X by entries of about 2u |X_ij| (the float32 accumulation of the
# product and the final rounding, u = 2^-24), a matrix of spectral norm
# 2u ||X||_F (1/sqrt(m) + 1/sqrt(n)) <= 4u, since ||X||_F <= sqrt(min(m, n))
# (singular values <= 1). Later steps multiply such a perturbation by at most
# their a's, the polynomials' slope at 0, where the small singular values sit
# (closer to 1 a step damps it): 990 for the input, then 121, 30, 7.7, 2.3
# and 1. Total 4u (990 + 121 + 30 + 7.7 + 2.3 + 1) = 4u * 1152 ~ 2.7e-4,
# whatever the spectrum and size. The Gram path applies the same polynomials;
# its restart after two steps (orthax.polar.newton_schulz) keeps its rounding
# in the same range: on steep spectra (sigma ~ 1/(1+i)^3, 32 to 256 wide)
# both paths reach at most ~2e-5 on this CPU, and the bound leaves room for
# other CPUs' reduction orders.
_GAINS = [math.prod(row[0] for row in reference.POLAR_EXPRESS[k:])
          for k in range(len(reference.POLAR_EXPRESS) + 1)]
F32_BOUND = 4 * 2.0**-24 * sum(_GAINS)

if jax.device_count() < DEVICES:

  # Two subprocesses of about equal length, which pytest-xdist's two workers
  # can run side by side.
  @pytest.mark.parametrize("part", ["pion or training", "not (pion or training)"])
  def test_on_8_devices(part):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={DEVICES}")
    env.pop("PYTEST_XDIST_WORKER", None)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-p", "no:xdist", "-k", part, __file__],
        env=env, capture_output=True, text=True, timeout=900,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert re.search(r"\d+ passed", run.stdout) and "skipped" not in run.stdout

else:

  def _rand(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)

  # A transformer-like tree: three layers of qkv / proj / MLP matrices (the
  # tall MLP matrix joins the wide group through its transpose), a stacked
  # 3-D leaf, a leaf the axis does not divide, and a bf16 matrix.
  SHAPES = {"qkv": (64, 192), "proj": (64, 64), "fc": (64, 256),
            "fc2": (256, 64)}

  def _tree():
    tree = {f"h{l}": {k: _rand(10 * l + i, s) for i, (k, s) in
                      enumerate(SHAPES.items())} for l in range(3)}
    tree["stack"] = _rand(99, (4, 32, 96))
    tree["odd"] = _rand(98, (12, 20))
    tree["half"] = _rand(97, (32, 128), jnp.bfloat16)
    return tree

  def _dims(tree):
    dims = jax.tree.map(lambda _: None, tree)
    if "stack" in tree:
      dims["stack"] = DIMS(1, 2)
    return dims

  def _specs(tree, axis="fsdp", matrix_dim=0, extra=None):
    """FSDP along ``matrix_dim`` of every 2-D leaf (``extra`` on the other);
    the stack along its fan_in; the odd leaf as it can (replicated)."""

    def spec(path, x):
      name = jax.tree_util.keystr(path)
      if "odd" in name:
        return P()
      if x.ndim == 3:
        return P(None, axis, None)
      entries = [extra, extra]
      entries[matrix_dim] = axis
      return P(*entries)

    return jax.tree_util.tree_map_with_path(spec, tree)

  def _put(tree, mesh, specs):
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                        tree, specs)

  def _float64(tree, dims=None):
    """The default iteration in NumPy float64 (tests/reference.py), matrix
    by matrix, on the leaves' exact values."""
    views = matrix_views(tree, dims, "test")
    out = []
    with jax.enable_x64(True):
      for view, x in zip(views, jax.tree.leaves(tree)):
        mats = np.asarray(view.to_matrices(jnp.asarray(x, jnp.float64)))
        q = np.stack([reference.newton_schulz(
            m, reference.POLAR_EXPRESS, margin=reference.POLAR_EXPRESS_MARGIN)
                      for m in mats])
        out.append(np.asarray(view.from_matrices(jnp.asarray(q))))
    return jax.tree.unflatten(jax.tree.structure(tree), out)

  def _errors(got, want):
    """Largest entry error of every leaf, by key path."""
    return {jax.tree_util.keystr(path): float(np.max(np.abs(
        np.asarray(g, np.float64) - w)))
            for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got),
                                    jax.tree.leaves(want))}

  def _check_against_float64(got, want, unsharded, tree):
    """Float32 leaves within F32_BOUND of float64. A bfloat16 rounding
    (2^-8) is no small perturbation of an iteration that amplifies small
    singular directions ~1000-fold, so bf16 leaves have no useful a-priori
    bound: they must be as close to float64 as the unsharded bf16 run (the
    same iteration, whose error is systematic), up to a factor 2 for
    single-ulp roundings that the two programs may take differently."""
    err, base = _errors(got, want), _errors(unsharded, want)
    for (path, x) in jax.tree_util.tree_leaves_with_path(tree):
      name = jax.tree_util.keystr(path)
      bound = F32_BOUND if x.dtype == jnp.float32 else 2 * base[name]
      assert err[name] <= bound, (name, err[name], bound)
    for (_, o), x in zip(jax.tree_util.tree_leaves_with_path(got),
                         jax.tree.leaves(tree)):
      assert o.dtype == x.dtype and o.shape == x.shape

  def _unsharded(tree):
    tx = orthax.orthogonalize(dimension_numbers=_dims(tree))
    return tx.update(tree, None)[0]

  def _shardings_kept(out, specs, mesh):
    for o, s in zip(jax.tree.leaves(out), jax.tree.leaves(
        specs, is_leaf=lambda x: isinstance(x, P))):
      assert o.sharding.is_equivalent_to(NamedSharding(mesh, s), o.ndim), (
          o.sharding, s)

  MESHES = {
      "fsdp8": ((8,), ("fsdp",)),
      "data2_fsdp4": ((2, 4), ("data", "fsdp")),
      "fsdp4_tp2": ((4, 2), ("fsdp", "tp")),
  }

  # Every pair of values of (mesh, axis type, matrix_dim) appears once: each
  # mesh with both axis types and both layouts, and each axis type with both
  # layouts, in 6 compilations rather than the 12 of the full product. The
  # case of issue 11 item 2 (fsdp x tp leaves, Explicit, no mesh context) is
  # among them.
  PAIRWISE = [("fsdp8", AxisType.Explicit, 0), ("fsdp8", AxisType.Auto, 1),
              ("data2_fsdp4", AxisType.Explicit, 0),
              ("data2_fsdp4", AxisType.Auto, 1),
              ("fsdp4_tp2", AxisType.Explicit, 1),
              ("fsdp4_tp2", AxisType.Auto, 0)]

  @pytest.mark.parametrize("mesh_name,axis_type,matrix_dim", PAIRWISE)
  def test_equals_unsharded(mesh_name, axis_type, matrix_dim):
    """Meshes and layouts, under jit; with jax.set_mesh for matrix_dim=0,
    without for matrix_dim=1 (a concrete mesh, no context: issue 11 item 2,
    which raised "Using PartitionSpec when you are not under a mesh
    context" on fsdp x tp leaves)."""
    shape, names = MESHES[mesh_name]
    mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))
    tree = _tree()
    extra = "tp" if "tp" in names else None
    specs = _specs(tree, matrix_dim=matrix_dim, extra=extra)
    sharded = _put(tree, mesh, specs)
    tx = orthax.orthogonalize(dimension_numbers=_dims(tree), mesh=mesh,
                              mesh_axis="fsdp")
    f = jax.jit(lambda t: tx.update(t, None)[0])
    if matrix_dim == 0:
      with jax.set_mesh(mesh):
        out = f(sharded)
    else:
      out = f(sharded)
    _check_against_float64(out, _float64(tree, _dims(tree)), _unsharded(tree),
                           tree)
    # Explicit axes: results come back in the leaves' own shardings (under
    # Auto axes the layout is XLA's to choose)
    if axis_type == AxisType.Explicit:
      _shardings_kept(out, specs, mesh)

  def _steep(seed, shape):
    """A matrix with singular values 1/(1+i)^2 and random singular vectors."""
    rng = np.random.default_rng(seed)
    k = min(shape)
    u, _ = np.linalg.qr(rng.normal(size=(shape[0], k)))
    v, _ = np.linalg.qr(rng.normal(size=(shape[1], k)))
    return (u / (1.0 + np.arange(k)) ** 2) @ v.T

  def test_steep_spectrum_against_float64():
    """Issue 11 item 22: on steep spectra (sigma ~ 1/(1+i)^2) sharded and
    unsharded results differed by 1.8e-5, above the 1e-5 the suite allowed
    between them, while both stay well inside F32_BOUND of float64. Stacks
    of 9 on 8 devices: a full layer each, and the 4 leftovers share one
    layer of (64, 192) slots, the smaller ones zero-padded onto the Gram
    path."""
    mesh = jax.make_mesh((DEVICES,), ("fsdp",))
    shapes = [(64, 64), (64, 192), (192, 64), (32, 96)]
    tree = {f"m{i}": jnp.asarray(np.stack([_steep(10 * i + j, s)
                                           for j in range(9)]), jnp.float32)
            for i, s in enumerate(shapes)}
    dims = jax.tree.map(lambda _: DIMS(1, 2), tree)
    specs = jax.tree.map(lambda _: P(None, "fsdp", None), tree)
    tx = orthax.orthogonalize(dimension_numbers=dims, mesh=mesh,
                              mesh_axis="fsdp")
    out = jax.jit(lambda t: tx.update(t, None)[0])(_put(tree, mesh, specs))
    want = _float64(tree, dims)
    unsharded = orthax.orthogonalize(dimension_numbers=dims).update(tree, None)
    for errors in (_errors(out, want), _errors(unsharded[0], want)):
      worst = max(errors, key=errors.get)
      assert errors[worst] <= F32_BOUND, (worst, errors[worst])

  def _collectives(hlo: str) -> dict[str, int]:
    ops = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter",
           "collective-permute")
    # the opcode follows the result shape and a space; "get-tuple-element(
    # %all-to-all)" and "%all-to-all = " do not match
    return {op: len(re.findall(rf" {op}(?:-start)?\(", hlo)) for op in ops}

  @pytest.mark.parametrize("context", [False, True])
  def test_explicit_shardings_are_seen(context):
    """Issue 11 item 1: on a mesh of jax.make_mesh's default (Explicit) axes,
    orthogonalize() without mesh arguments raised ShardingTypeError on
    FSDP-sharded leaves; it now reads the axis from the leaves' types and
    takes the sharded path (two all_to_alls per dtype), with or without
    jax.set_mesh. On fsdp x tp leaves the larger axis wins the tie."""
    for shape, names in (MESHES["fsdp8"], ((2, 4), ("tp", "fsdp"))):
      mesh = jax.make_mesh(shape, names)
      tree = _tree()
      del tree["odd"]
      specs = _specs(tree, extra="tp" if "tp" in names else None)
      sharded = _put(tree, mesh, specs)
      tx = orthax.orthogonalize(dimension_numbers=_dims(tree))
      f = jax.jit(lambda t: tx.update(t, None)[0])
      if context:
        with jax.set_mesh(mesh):
          out, hlo = f(sharded), f.lower(sharded).compile().as_text()
      else:
        out, hlo = f(sharded), f.lower(sharded).compile().as_text()
      _check_against_float64(out, _float64(tree, _dims(tree)),
                             _unsharded(tree), tree)
      _shardings_kept(out, specs, mesh)
      # f32 and bf16: one exchange each way; the tp axis is dropped by
      # gathering it (the only other collectives)
      assert _collectives(hlo)["all-to-all"] == 4, _collectives(hlo)

  def test_size_one_axis_with_tensor_parallel_leaves():
    """Issue 11 item 2: an fsdp axis of size 1 (the unsharded path) with
    tp-sharded leaves raised ShardingTypeError ("Contracting dimensions are
    sharded"): those leaves are now gathered for the iteration and returned
    in their shardings."""
    mesh = jax.make_mesh((1, DEVICES), ("fsdp", "tp"))
    tree = {"a": _rand(1, (64, 128)), "b": _rand(2, (128, 64)),
            "c": _rand(3, (64, 64))}
    specs = {"a": P(None, "tp"), "b": P("tp", None), "c": P()}
    tx = orthax.orthogonalize(mesh=mesh, mesh_axis="fsdp")
    out = jax.jit(lambda t: tx.update(t, None)[0])(_put(tree, mesh, specs))
    _check_against_float64(out, _float64(tree), _unsharded(tree), tree)
    _shardings_kept(out, specs, mesh)

  def test_batch_sharded_leaf_stays_local():
    """A stack sharded along its batch axis: whole matrices already; no
    collective at all."""
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Explicit,))
    x = {"stack": _rand(1, (16, 32, 48))}
    dims = {"stack": DIMS(1, 2)}
    xs = _put(x, mesh, {"stack": P("fsdp", None, None)})
    tx = orthax.orthogonalize(dimension_numbers=dims, mesh=mesh,
                              mesh_axis="fsdp")
    with jax.set_mesh(mesh):
      f = jax.jit(lambda t: tx.update(t, None)[0])
      out = f(xs)
      hlo = f.lower(xs).compile().as_text()
    assert max(_errors(out, _float64(x, dims)).values()) <= F32_BOUND
    assert sum(_collectives(hlo).values()) == 0

  def test_two_all_to_alls_and_nothing_per_iteration():
    """One all_to_all each way per dtype, whatever the leaves and steps; no
    collective inside the Newton-Schulz loop (or anywhere else)."""
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Explicit,))
    tree = _tree()
    del tree["odd"]
    sharded = _put(tree, mesh, _specs(tree))
    for steps in (5, 9):
      tx = orthax.orthogonalize(dimension_numbers=_dims(tree), mesh=mesh,
                                mesh_axis="fsdp", steps=steps)
      with jax.set_mesh(mesh):
        hlo = jax.jit(lambda t: tx.update(t, None)[0]).lower(
            sharded).compile().as_text()
      counts = _collectives(hlo)
      # f32 and bf16 leaves: two exchanges each
      assert counts == {"all-to-all": 4, "all-gather": 0, "all-reduce": 0,
                        "reduce-scatter": 0, "collective-permute": 0}, counts

  def test_auto_axes_assume_the_largest_axis():
    """Under Auto axes the layout is invisible while tracing: leaves sharded
    along their largest axis (the assumed FSDP layout) need no resharding,
    just the two all_to_alls."""
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
    tree = {f"h{l}": {k: _rand(10 * l + i, s) for i, (k, s) in
                      enumerate(SHAPES.items())} for l in range(2)}
    specs = jax.tree.map(
        lambda x: P("fsdp", None) if x.shape[0] >= x.shape[1] else
        P(None, "fsdp"), tree)
    sharded = _put(tree, mesh, specs)
    tx = orthax.orthogonalize(mesh=mesh, mesh_axis="fsdp")
    with jax.set_mesh(mesh):
      f = jax.jit(lambda t: tx.update(t, None)[0])
      out = f(sharded)
      counts = _collectives(f.lower(sharded).compile().as_text())
    assert counts["all-to-all"] == 2 and sum(counts.values()) == 2, counts
    assert max(_errors(out, _float64(tree)).values()) <= F32_BOUND

  def test_uneven_groups_are_packed():
    """GPT-2 small's hidden matrices on 8 devices: 12 qkv, 12 proj and 24
    MLP matrices. Padding each group to a multiple of 8 costs 1.135x the even
    share; packing the leftovers (4 qkv, 4 proj) into one shared layer of
    slots costs 1.036x."""
    d = 768
    tree = {}
    for l in range(12):
      for name, shape in (("qkv", (d, 3 * d)), ("proj", (d, d)),
                          ("fc", (d, 4 * d)), ("fc2", (4 * d, d))):
        tree[f"{name}{l}"] = jax.ShapeDtypeStruct(shape, jnp.float32)
    # leaves cut alike form one group (fc and fc2 are cut differently but
    # share the wide shape, hence slots)
    groups: dict = {}
    for v in matrix_views(tree, None, "test"):
      cut = _Kind(v, v.reduction_axes[0]).cut
      groups[cut] = groups.get(cut, 0) + 1
    assert len(groups) == 4
    plan = make_plan([((c.shape,), n) for c, n in groups.items()], DEVICES,
                     cost=lambda s: newton_schulz_flops(*s[0], 5, gram="auto"),
                     pad=True)
    assert plan.balance <= 1.10
    np.testing.assert_allclose(plan.balance, 314 / 303, rtol=1e-3)
    # every matrix is placed exactly once
    placed = [(g, f * DEVICES + j) for g, full in enumerate(plan.full)
              for f in range(full) for j in range(DEVICES)]
    placed += [m for _, layer in plan.layers for m in layer if m is not None]
    assert sorted(placed) == sorted(
        (g, row) for g, n in enumerate(groups.values()) for row in range(n))
    # without padding a leftover layer holds one shape only
    plan = make_plan([((c.shape,), n) for c, n in groups.items()], DEVICES,
                     cost=lambda s: newton_schulz_flops(*s[0], 5), pad=False)
    assert len(plan.layers) == 3

  def _hlo_lines(num_experts: int) -> int:
    mesh = jax.make_mesh((DEVICES,), ("fsdp",))
    x = jax.ShapeDtypeStruct((num_experts, 32, 64), jnp.float32,
                             sharding=NamedSharding(mesh, P(None, "fsdp")))
    tx = orthax.orthogonalize(dimension_numbers=DIMS(1, 2), mesh=mesh,
                              mesh_axis="fsdp")
    return len(jax.jit(lambda t: tx.update(t, None)[0]).lower(x).compile()
               .as_text().splitlines())

  def test_program_size_does_not_grow_with_the_matrices():
    """Issue 11 item 5: the exchange was built matrix by matrix, so an MoE
    stack (E, 32, 64) compiled into a program that grew with E (332 -> 34,604
    HLO lines for E = 16 -> 4096, compile time superlinear). Full layers are
    now one reshape per group: 100 and 1000 experts (4 leftovers each) give
    programs of the same size."""
    small, large = _hlo_lines(100), _hlo_lines(1000)
    assert large <= 1.1 * small, (small, large)

  # Muon / NorMuon steps: float32 runs (sharded, unsharded) against the same
  # optimizer in float64. Each step moves a matrix by lr * scale * O, scale
  # <= 2 here (sqrt(128 / 32)); O is off by at most F32_BOUND for the
  # iteration on its float32 input, and that input (the momentum) differs
  # from float64's by its own rounding, which the iteration amplifies no more
  # than it does its own: 2 F32_BOUND a step (NorMuon rescales each column to
  # the same norm, which keeps relative errors). Over STEPS steps, the params
  # drift by STEPS * lr * 2 * 2 F32_BOUND, the feedback of that drift on the
  # gradients being second order (these momenta are well conditioned). The
  # bias goes through AdamW, whose m / (sqrt(v) + eps) jumps by up to 2 where
  # a gradient entry crosses 0 within rounding: adam_eps = 1e-3 bounds its
  # slope (a rounding of the gradient, ~1e-8 here, moves it by ~1e-5 * lr).
  STEPS, LR = 4, 0.02
  TRAIN_BOUND = STEPS * LR * 2 * 2 * F32_BOUND

  def _train(make, params, data, **kw):
    tx = make(LR, adam_learning_rate=1e-3, adam_eps=1e-3, **kw)

    def loss(p, x, y):
      h = jnp.tanh(x @ p["w1"] + p["b"])
      return jnp.mean((jnp.tanh(h @ p["w2"]) @ p["w3"] - y) ** 2)

    @jax.jit
    def step(p, state):
      g = jax.grad(loss)(p, *data)
      u, state = tx.update(g, state, p)
      return optax.apply_updates(p, u), state

    state, losses = tx.init(params), []
    for _ in range(STEPS):
      losses.append(float(loss(params, *data)))
      params, state = step(params, state)
    return params, losses

  # The small MLP these tests train, its FSDP specs, and its float64 run.
  MLP_SPECS = {"w1": P("fsdp", None), "w2": P("fsdp", None),
               "w3": P("fsdp", None), "b": P()}

  def _mlp_against_float64(make):
    """(params, data, the float64 run's params and losses)."""
    params = {"w1": _rand(1, (32, 128)) / 6, "w2": _rand(2, (128, 128)) / 11,
              "w3": _rand(3, (128, 16)) / 11, "b": jnp.zeros(128)}
    data = _rand(4, (64, 32)), _rand(5, (64, 16))
    with jax.enable_x64(True):
      as64 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), t)
      want, losses = _train(make, as64(params), as64(data))
    return params, data, jax.tree.map(np.asarray, want), losses

  # Pairwise: each optimizer and each way of finding the mesh once, NorMuon
  # (per-neuron statistics on sharded rows) on the detected one.
  @pytest.mark.parametrize("name, detect", [("muon", False), ("normuon", True)])
  def test_training_matches_float64(name, detect):
    """A few optimizer steps of a small MLP under FSDP, NorMuon's per-neuron
    statistics included: with mesh arguments under jax.set_mesh, and (issue
    11 item 1, which raised ShardingTypeError) with none, on a jax.make_mesh
    default mesh without jax.set_mesh, the axis read from the params."""
    mesh, specs = jax.make_mesh((8,), ("fsdp",)), MLP_SPECS
    make = getattr(orthax, name)
    params, data, want, want_losses = _mlp_against_float64(make)
    assert want_losses[-1] < want_losses[0]
    sharded = _put(params, mesh, specs)
    if detect:
      got, _ = _train(make, sharded, data)
    else:
      with jax.set_mesh(mesh):
        got, _ = _train(make, sharded, data, mesh=mesh, mesh_axis="fsdp")
    _shardings_kept(got, specs, mesh)
    for run in (got, _train(make, params, data)[0]):
      errors = _errors(run, want)
      assert max(errors.values()) <= TRAIN_BOUND, errors

  # The adaptive family under FSDP, as above, with each method's largest
  # step coefficient in place of Muon's scale 2: the Moonlight scale 0.2 *
  # sqrt(128) = 2.26; ROOT's clip moves by the rounding of its threshold
  # (relative u) and runs Jordan's quintic here, whose a**5 = 485 is below
  # the Polar Express gains F32_BOUND assumes; NAMO-D's factor c_i is at most
  # (1 + beta) sqrt(1 - beta2) / (1 - beta) = 1.95 at step 1 (about 1 after)
  # and the clamp 0.75 widens it by 1 / 0.75, so 2.6.
  FAMILY_SCALE = {"root": 2.26, "namo_d": 2.26 * 2.6}

  @pytest.mark.parametrize("name", sorted(FAMILY_SCALE))
  def test_adaptive_family_matches_float64(name):
    """ROOT sorts each matrix's magnitudes and NAMO-D keeps per-row norms:
    on Explicit-sharded leaves (jax.make_mesh's default, no mesh arguments)
    both train as unsharded float64 does. ROOT's sort raised
    ShardingTypeError on a matrix sharded along its sorted axis."""
    mesh, specs = jax.make_mesh((8,), ("fsdp",)), MLP_SPECS
    make = getattr(orthax, name)
    params, data, want, _ = _mlp_against_float64(make)
    got, _ = _train(make, _put(params, mesh, specs), data)
    _shardings_kept(got, specs, mesh)
    bound = STEPS * LR * FAMILY_SCALE[name] * 2 * F32_BOUND
    errors = _errors(got, want)
    assert max(errors.values()) <= bound, errors

  def test_context_mesh_and_bad_axes():
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"),
                         axis_types=(AxisType.Explicit,) * 2)
    with pytest.raises(ValueError, match="mesh_axis='model' is not an axis"):
      orthax.orthogonalize(mesh=mesh, mesh_axis="model")
    with pytest.raises(ValueError, match="mesh_axis is required"):
      orthax.orthogonalize(mesh=mesh)
    tree = {"w": _rand(0, (16, 48))}
    with pytest.raises(ValueError, match="none is set with jax.set_mesh"):
      orthax.orthogonalize(mesh_axis="fsdp").update(tree, None)
    # mesh_axis alone takes the mesh of jax.set_mesh
    tx = orthax.orthogonalize(mesh_axis="fsdp")
    xs = _put(tree, mesh, {"w": P("fsdp", None)})
    with jax.set_mesh(mesh):
      f = jax.jit(lambda t: tx.update(t, None)[0])
      out = f(xs)
      assert _collectives(f.lower(xs).compile().as_text())["all-to-all"] == 2
    assert max(_errors(out, _float64(tree)).values()) <= F32_BOUND

  # Pion: float32 runs against float64 on the same gradients. Each step adds
  # its update D to W in float32, a rounding of u |W| per entry. D is computed
  # as an increment (orthax/transforms/rotate.py), relative to the step: some
  # eight roundings along its chain (skew gradients, moments, A, A W, the
  # norm, the Cayley solve or exponential, the increment), each about
  # u sqrt(k) relative in the random-rounding model for reduction lengths
  # k <= 128, so <= 8 sqrt(k) u |D|, provided A = -m / (sqrt(v) + eps) is not
  # ill-conditioned: with eps = 0.1 (above sqrt(v) here), A is about -m / eps,
  # linear in the moments (with the default 1e-8, an entry of m within
  # rounding of 0 could jump A by ~6). A restore rebuilds W from its SVD, an
  # error of about u sqrt(k) sigma_max (a backward-stable SVD and one
  # product), counted 4 times. Earlier errors are carried along by the next
  # rotations, which are orthogonal (they do not grow them).
  PION_EPS, PION_K = 0.1, 128
  # The default configuration's sharded step is the one "restore" runs on
  # its odd steps (the restore is a second branch of the same step), so it
  # is not run on its own.
  PION = {
      "smaller_exact": dict(sides="smaller", expm="exact"),
      "restore": dict(restore_every=2),
  }
  PION_SHAPES = {"w1": ((64, 128), P("fsdp", None)),
                 "w2": ((64, 64), P(None, "fsdp")),
                 "w3": ((128, 32), P("fsdp", None)),
                 "experts": ((3, 32, 64), P(None, "fsdp", None)),
                 "moe": ((8, 16, 32), P("fsdp", None, None))}
  PION_DIMS = {"w1": "auto", "w2": "auto", "w3": "auto", "experts": DIMS(1, 2),
               "moe": DIMS(1, 2)}

  def _pion(params, grads, **kw):
    """The params after each step of orthax.pion, and the compiled step."""
    tx = orthax.pion(LR, eps=PION_EPS, routing=PION_DIMS, **kw)
    state, history = tx.init(params), [params]
    step = jax.jit(tx.update)
    for g in grads:
      u, state = step(g, state, params)
      params = optax.apply_updates(params, u)
      history.append(params)
    return history, state, step.lower(grads[0], state, params).compile()

  def _step_bound(w, w_next, restored: bool) -> float:
    """One step's error bound for one leaf (see above)."""
    u = 2.0**-24
    bound = u * (np.max(np.abs(w)) + 8 * np.sqrt(PION_K) *
                 np.max(np.abs(w_next - w)))
    if restored:
      mats = w_next.reshape((-1,) + w_next.shape[-2:])
      bound += 4 * u * np.sqrt(PION_K) * max(np.linalg.norm(m, 2)
                                             for m in mats)
    return bound

  @pytest.mark.parametrize("config", list(PION))
  def test_pion_matches_float64(config):
    """Issue 11 item 1: orthax.pion could not run on FSDP-sharded params of
    an Explicit mesh at all. It now shards as orthax.muon does: init shards
    each matrix's moments (and spectrum) like its params, and a step sends W,
    g and the moments (and spectrum) in one all_to_all and the update and new
    moments back in another, nothing else; with the axis read from the
    params, without jax.set_mesh ("restore"), or given, under
    jax.set_mesh ("smaller_exact"). Sharded and unsharded runs are within the
    bound above of float64."""
    kw = PION[config]
    mesh = jax.make_mesh((DEVICES,), ("fsdp",))
    names = list(PION_SHAPES)
    params = {k: _rand(i, PION_SHAPES[k][0]) / np.sqrt(PION_SHAPES[k][0][-2])
              for i, k in enumerate(names)}
    grads = [{k: _rand(10 * t + i + 10, PION_SHAPES[k][0])
              for i, k in enumerate(names)} for t in range(STEPS)]
    with jax.enable_x64(True):
      as64 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), t)
      want = _pion(as64(params), [as64(g) for g in grads], **kw)[0]
      want = [jax.tree.map(np.asarray, w) for w in want]
    specs = {k: PION_SHAPES[k][1] for k in names}
    put = lambda t: _put(t, mesh, specs)
    if config == "smaller_exact":
      with jax.set_mesh(mesh):
        got, state, compiled = _pion(put(params), [put(g) for g in grads],
                                     mesh=mesh, mesh_axis="fsdp", **kw)
    else:
      got, state, compiled = _pion(put(params), [put(g) for g in grads], **kw)
    _shardings_kept(got[-1], specs, mesh)
    # the moments live sharded like their params: along their rows, or for
    # the expert stack sharded along its experts (computed where it is, no
    # collective), along the experts
    rotate, = [x for x in jax.tree.leaves(
        state, is_leaf=lambda x: isinstance(x, orthax.RotateState))
               if isinstance(x, orthax.RotateState)]
    for k in names:
      moments = [m[k] for m in rotate[1:5] if m[k] is not None]
      assert len(moments) == (2 if config == "smaller_exact" else 4)
      spec = P("fsdp", None, None) if k == "moe" else P(None, "fsdp", None)
      for x in moments:
        assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), 3), (
            k, x.sharding)
    counts = _collectives(compiled.as_text())
    assert counts["all-to-all"] == 2 and sum(counts.values()) == 2, counts
    restore_every = kw.get("restore_every")
    bound = {k: sum(_step_bound(
        w[k], w_next[k], bool(restore_every) and (t + 1) % restore_every == 0)
                    for t, (w, w_next) in enumerate(zip(want, want[1:])))
             for k in names}
    for run in (got, _pion(params, grads, **kw)[0]):
      for k in names:
        err = np.max(np.abs(np.asarray(run[-1][k], np.float64) - want[-1][k]))
        assert err <= bound[k], (config, k, err, bound[k])
