"""Sharded orthogonalization on 8 CPU devices equals the unsharded path.

The checks need 8 devices, and a process's JAX sees the device count it
started with: in a normal test session (1 CPU device) this module runs itself
again in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
and reports that run (``test_on_8_devices``); there, the real tests below run.
"""

from __future__ import annotations

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
from orthax.matrices import matrix_views
from orthax.sharded import _Kind, make_plan

DEVICES = 8
DIMS = orthax.MuonDimensionNumbers
# Measured worst differences from the unsharded path are 5e-6 (f32): the
# slots batch matrices differently, and a matrix padded into a larger slot
# may take the Gram path where it alone would not; the target is 1e-5.
ATOL = 1e-5

if jax.device_count() < DEVICES:

  def test_on_8_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={DEVICES}")
    env.pop("PYTEST_XDIST_WORKER", None)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-p", "no:xdist", __file__],
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

  def _max_err(a, b):
    return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) -
                                      y.astype(jnp.float32))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  def _unsharded(tree, **kw):
    tx = orthax.orthogonalize(dimension_numbers=_dims(tree), **kw)
    return tx.update(tree, None)[0]

  MESHES = {
      "fsdp8": ((8,), ("fsdp",)),
      "data2_fsdp4": ((2, 4), ("data", "fsdp")),
      "fsdp4_tp2": ((4, 2), ("fsdp", "tp")),
  }

  @pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
  @pytest.mark.parametrize("mesh_name", list(MESHES))
  @pytest.mark.parametrize("matrix_dim", [0, 1])
  def test_equals_unsharded(mesh_name, axis_type, matrix_dim):
    shape, names = MESHES[mesh_name]
    mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))
    tree = _tree()
    extra = "tp" if "tp" in names else None
    specs = _specs(tree, matrix_dim=matrix_dim, extra=extra)
    sharded = _put(tree, mesh, specs)
    tx = orthax.orthogonalize(dimension_numbers=_dims(tree), mesh=mesh,
                              mesh_axis="fsdp")
    with jax.set_mesh(mesh):
      out = jax.jit(lambda t: tx.update(t, None)[0])(sharded)
    want = _unsharded(tree)
    for (path, o), w in zip(jax.tree_util.tree_leaves_with_path(out),
                            jax.tree.leaves(want)):
      tol = 2e-2 if o.dtype == jnp.bfloat16 else ATOL
      np.testing.assert_allclose(np.asarray(o, np.float32),
                                 np.asarray(w, np.float32), atol=tol,
                                 err_msg=jax.tree_util.keystr(path))
    # Explicit axes: results come back in the leaves' own shardings (under
    # Auto axes the layout is XLA's to choose)
    if axis_type == AxisType.Explicit:
      for o, s in zip(jax.tree.leaves(out), jax.tree.leaves(
          specs, is_leaf=lambda x: isinstance(x, P))):
        assert o.sharding.is_equivalent_to(NamedSharding(mesh, s), o.ndim)

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
    assert _max_err(out, orthax.orthogonalize(dimension_numbers=dims).update(
        x, None)[0]) < ATOL
    assert not re.search(r"all-to-all|all-gather|all-reduce|collective-permute",
                         hlo)

  def _collectives(hlo: str) -> dict[str, int]:
    ops = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter",
           "collective-permute")
    # the opcode follows the result shape and a space; "get-tuple-element(
    # %all-to-all)" and "%all-to-all = " do not match
    return {op: len(re.findall(rf" {op}(?:-start)?\(", hlo)) for op in ops}

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
    assert _max_err(out, orthax.orthogonalize().update(tree, None)[0]) < ATOL

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
    views = matrix_views(tree, None, "test")
    kinds = {i: _Kind(v, v.reduction_axes[0]) for i, v in enumerate(views)}
    plan = make_plan(kinds, {i: 1 for i in kinds}, DEVICES)
    assert plan.balance <= 1.10
    np.testing.assert_allclose(plan.balance, 314 / 303, rtol=1e-3)
    # every matrix is placed exactly once
    placed = sorted(m for row in plan.assignment for m in row if m is not None)
    assert placed == sorted((i, 0) for i in kinds)

  @pytest.mark.parametrize("name", ["muon", "normuon"])
  def test_training_matches_unsharded(name):
    """A few optimizer steps of a small MLP under FSDP equal the unsharded
    ones (NorMuon's per-neuron statistics included)."""
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Explicit,))
    params = {"w1": _rand(1, (32, 128)) / 6, "w2": _rand(2, (128, 128)) / 11,
              "w3": _rand(3, (128, 16)) / 11, "b": jnp.zeros(128)}
    data = _rand(4, (64, 32)), _rand(5, (64, 16))

    def loss(p, x, y):
      h = jnp.tanh(x @ p["w1"] + p["b"])
      return jnp.mean((jnp.tanh(h @ p["w2"]) @ p["w3"] - y) ** 2)

    def run(tx, p):
      state = tx.init(p)

      @jax.jit
      def step(p, state):
        g = jax.grad(loss)(p, *data)
        u, state = tx.update(g, state, p)
        return optax.apply_updates(p, u), state

      losses = []
      for _ in range(5):
        losses.append(float(loss(p, *data)))
        p, state = step(p, state)
      return p, losses

    make = getattr(orthax, name)
    want, want_losses = run(make(0.02, adam_learning_rate=1e-3), params)
    specs = {"w1": P("fsdp", None), "w2": P("fsdp", None),
             "w3": P("fsdp", None), "b": P()}
    with jax.set_mesh(mesh):
      got, got_losses = run(
          make(0.02, adam_learning_rate=1e-3, mesh=mesh, mesh_axis="fsdp"),
          _put(params, mesh, specs))
    assert want_losses[-1] < want_losses[0]
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
    assert _max_err(got, want) < 1e-6  # lr * ATOL-sized differences

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
    assert _max_err(out, orthax.orthogonalize().update(tree, None)[0]) < ATOL
