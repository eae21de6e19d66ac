"""orthax.routing: its rules one by one, overrides, optax specs, describe.

The model families of issue 12 (Flax's own layers, MaxText trees, Hugging
Face's GPT-2) are in test_routing_models.py and test_routing_external.py.
"""

import doctest
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import flax.linen as nn
from flax import nnx
from optax.transforms import _masking

import orthax
from orthax import routing

MDN = orthax.MuonDimensionNumbers
z = jnp.zeros


def _table(tree, **kw):
  return routing.by_path(orthax.route(tree, **kw))


def _axes(r):
  return (r.kind, r.batch_axes, r.reduction_axes, r.output_axes)


def test_docstring_examples():
  assert doctest.testmod(routing, optionflags=doctest.NORMALIZE_WHITESPACE
                         ).failed == 0


def test_names_structure_and_shapes():
  params = {
      "wte": z((50, 8)), "tok_embedding": z((50, 8)),
      "lm_head": z((8, 50)), "cls_head": z((8, 3)),
      "block": {"attn": {"kernel": z((8, 24)), "bias": z(24)},
                "ln": {"scale": z(8)},
                "experts": z((4, 8, 16))},
      "temperature": z(()),
      "patch_embedder": {"mlp": {"kernel": z((8, 8))},
                         "proj": {"embedding": z((8, 8))}},
      "decoder": {"kernel": z((8, 50))},   # the vocabulary's size, unnamed
  }
  t = _table(params)
  for k in ("wte", "tok_embedding", "lm_head", "cls_head", "block/attn/bias",
            "block/ln/scale", "temperature", "patch_embedder/proj/embedding",
            "decoder/kernel"):
    assert t[k].kind == "adamw", (k, t[k])
  assert _axes(t["block/attn/kernel"]) == ("matrix", (), (0,), (1,))
  # a 3-D parameter of a module named for experts: one matrix per expert
  assert _axes(t["block/experts"]) == ("matrix", (0,), (1,), (2,))
  # only the leaf's own name and its owner's count
  assert t["patch_embedder/mlp/kernel"].kind == "matrix"
  assert "vocabulary" in t["decoder/kernel"].rule


def test_vocab_sized_hidden_layer_stays_a_matrix():
  """An MLP whose width equals the vocabulary's size feeds the next layer:
  it is no head."""
  params = {"embed": {"embedding": z((32, 8))},
            "up": {"kernel": z((8, 32))}, "down": {"kernel": z((32, 8))}}
  t = _table(params)
  assert t["up/kernel"].kind == t["down/kernel"].kind == "matrix"


def test_numbered_last_layer_is_a_head_only_at_the_output():
  params = {"Dense_0": {"kernel": z((20, 16))},
            "Dense_1": {"kernel": z((16, 16))},
            "Dense_2": {"kernel": z((16, 10))}}
  t = _table(params)
  assert t["Dense_2/kernel"].kind == "adamw"
  assert "numbered" in t["Dense_2/kernel"].rule
  assert t["Dense_0/kernel"].kind == t["Dense_1/kernel"].kind == "matrix"
  # a transformer MLP's Dense_1 returns to the model width: hidden
  mlp = {"Dense_0": {"kernel": z((8, 32))}, "Dense_1": {"kernel": z((32, 8))},
         "attn": {"kernel": z((8, 8))}}
  assert _table(mlp)["Dense_1/kernel"].kind == "matrix"


def test_scan_stack_needs_a_stacked_vector():
  """A leading size shared by chance is no layer axis: only a subtree with
  a (L, d) bias or scale is a scanned stack."""
  scanned = {"blocks": {"w": z((3, 8, 16)), "ln": {"scale": z((3, 8))}}}
  assert _axes(_table(scanned)["blocks/w"]) == ("matrix", (0,), (1,), (2,))
  assert _table(scanned)["blocks/ln/scale"].kind == "adamw"
  chance = {"blocks": {"w": z((3, 8, 16)), "p": z((3, 5, 7))}}
  t = _table(chance)
  assert t["blocks/w"].unrecognized and t["blocks/p"].unrecognized


def test_unrecognized_leaves_warn_at_init():
  params = {"w": z((8, 16)), "mystery": z((5, 6, 7))}
  with pytest.warns(UserWarning, match=r"orthax\.muon.*mystery \(5, 6, 7\)"):
    orthax.muon(0.02).init(params)


def test_init_logs_a_summary(caplog):
  with caplog.at_level(logging.INFO, logger="orthax"):
    orthax.muon(0.02).init({"w": z((8, 16)), "b": z(16)})
  assert "orthax.muon: 1 matrix (128 parameters), 1 AdamW (16)" in caplog.text


def test_pion_warns_for_a_head_routed_as_a_matrix():
  params = {"h": {"kernel": z((8, 16))}, "lm_head": {"kernel": z((8, 300))}}
  # as a matrix, Pion's moments hold 2 (8^2 + 300^2) entries for 2400
  with pytest.warns(UserWarning, match=r"lm_head/kernel \(8, 300\) \(75x\)"):
    orthax.pion(0.02, overrides={"lm_head/*": "matrix"}).init(params)


def test_overrides_compose_with_the_rules():
  params = {"embed": {"embedding": z((50, 8))},
            "blocks": {"0": {"kernel": z((8, 8))}, "1": {"kernel": z((8, 8))}},
            "conv": z((5, 6, 7))}
  t = _table(params, overrides={"blocks/*": "adamw", "blocks/1/*": "matrix",
                                "conv": MDN((0, 1), 2)})
  assert t["blocks/0/kernel"].kind == "adamw"
  assert t["blocks/1/kernel"].kind == "matrix"   # the last match wins
  assert _axes(t["conv"]) == ("matrix", (), (0, 1), (2,))
  assert t["embed/embedding"].kind == "adamw"    # untouched: the rules'
  with pytest.raises(ValueError, match=r"'blok/\*' matches no leaf.*"
                     r"blocks/0/kernel"):
    _table(params, overrides={"blok/*": "adamw"})
  with pytest.raises(ValueError, match=re.escape("['conv']") + r".*'adam'"):
    _table(params, overrides={"conv": "adam"})
  with pytest.raises(TypeError, match="mapping"):
    _table(params, overrides=[("conv", "adamw")])


def test_matrix_without_axes_is_an_error_naming_the_way_out():
  with pytest.raises(ValueError, match=r"\['b'\].*\(6,\).*MuonDimensionNumbers"):
    _table({"b": z(6)}, routing={"b": "matrix"})


def test_none_in_a_routing_is_refused():
  with pytest.raises(ValueError, match=r"(?s)\['b'\].*ambiguous.*from_optax"):
    orthax.muon(0.02, routing={"w": "auto", "b": None}).init(
        {"w": z((4, 8)), "b": z(8)})


def test_one_spec_for_every_leaf_says_the_way_out():
  params = {"w": z((3, 4, 5)), "b": z((4, 5))}
  with pytest.raises(ValueError, match=r"\['b'\].*every leaf.*overrides="):
    _table(params, routing=MDN(1, 2))
  with pytest.raises(ValueError, match=r"\['b'\].*every leaf.*a tree.*"
                     r"orthax\.route"):
    orthax.orthogonalize(dimension_numbers=MDN(1, 2)).update(params, None)


# --------------------------------------------------------------------------
# optax's specs


def _optax_matrices(params, spec):
  """The leaves optax.contrib.muon orthogonalizes (its masked Muon state)."""
  state = optax.contrib.muon(0.02, muon_weight_dimension_numbers=spec).init(
      params)
  mu = state.inner_states["muon"].inner_state[0].mu
  return {routing.path_of(kp) for kp, x in jax.tree_util.tree_leaves_with_path(
      mu, is_leaf=lambda x: isinstance(x, _masking.MaskedNode))
          if not isinstance(x, _masking.MaskedNode)}


_OPTAX_PARAMS = {"emb": {"embedding": z((20, 8))}, "w": z((8, 16)),
                 "b": z(16), "experts": z((3, 8, 16)), "s": z(())}


@pytest.mark.parametrize("spec", [
    None,
    {"emb": None, "w": MDN(), "b": None, "experts": MDN(1, 2), "s": None},
    {"emb": {"embedding": None}, "w": MDN(1, 0), "b": None,
     "experts": MDN((0, 1), -1), "s": None},
    lambda p: jax.tree.map(lambda x: MDN(-2, -1) if x.ndim >= 2 else None, p),
], ids=["none", "tree", "axes", "callable"])
def test_from_optax_reproduces_optax_routing(spec):
  t = _table(_OPTAX_PARAMS, routing=routing.from_optax(spec))
  assert {k for k, r in t.items() if r.kind == "matrix"} == _optax_matrices(
      _OPTAX_PARAMS, spec)
  if spec is None:
    want = {"emb/embedding": MDN(0, 1), "w": MDN(0, 1)}
  else:
    tree = spec(_OPTAX_PARAMS) if callable(spec) else spec
    want = {routing.path_of(kp): d for kp, d in
            jax.tree_util.tree_leaves_with_path(
                tree, is_leaf=lambda x: isinstance(x, MDN)) if d is not None}
  for k, d in want.items():
    ndim = len(t[k].batch_axes + t[k].reduction_axes + t[k].output_axes)
    norm = lambda a: tuple(sorted(x % ndim for x in np.atleast_1d(a)))
    assert (t[k].reduction_axes, t[k].output_axes) == (
        norm(d.reduction_axis), norm(d.output_axis)), k


def test_routes_as_an_optax_spec():
  """orthax.routing.dimension_numbers gives optax.contrib.muon orthax's
  routing (None there means AdamW)."""
  routes = orthax.route(_OPTAX_PARAMS)
  spec = routing.dimension_numbers(routes)
  got = {k for k, r in routing.by_path(routes).items() if r.kind == "matrix"}
  assert got == {"w", "experts"} == _optax_matrices(_OPTAX_PARAMS, spec)


# --------------------------------------------------------------------------
# NNX modules


class _Modules(nnx.Module):

  def __init__(self, rngs):
    self.einsum = nnx.Einsum("btd,dnh->btnh", (8, 2, 4), rngs=rngs)
    self.batched = nnx.LinearGeneral((3, 8), 5, axis=(-2, -1),
                                     batch_axis={0: 6}, rngs=rngs)
    self.conv = nnx.Conv(3, 5, kernel_size=(2, 2), rngs=rngs)
    self.norm = nnx.RMSNorm(8, rngs=rngs)


def test_nnx_modules_decide_their_axes():
  t = _table(_Modules(nnx.Rngs(0)))
  assert _axes(t["einsum/kernel"]) == ("matrix", (), (0,), (1, 2))
  assert t["einsum/kernel"].rule.startswith("nnx Einsum")
  assert _axes(t["batched/kernel"]) == ("matrix", (0,), (1, 2), (3,))
  assert _axes(t["conv/kernel"]) == ("matrix", (), (0, 1, 2), (3,))
  assert t["conv/bias"].kind == t["norm/scale"].kind == "adamw"


def test_describe_lists_every_leaf():
  text = orthax.describe({"blocks": {"w": z((3, 8, 16)),
                                     "ln": {"scale": z((3, 8))}}},
                         print_fn=None)
  lines = text.splitlines()
  assert lines[0].split() == ["path", "shape", "route", "grouping", "scale",
                              "rule"]
  row = next(l for l in lines if l.startswith("blocks/w"))
  assert "3 x 8x16" in row and " 1.41 " in row and "stacked: layers" in row
  assert lines[-1] == "1 matrix (384 parameters), 1 AdamW (24); 0 unrecognized"


class _Named(nnx.Module):
  """Params that carry only their logical axis names (no module rule)."""

  def __init__(self):
    p = lambda shape, names: nnx.Param(jnp.zeros(shape), out_sharding=names)
    self.wi = p((8, 3, 16), ("embed", "layers", "mlp"))
    self.q = p((8, 3, 2, 4), ("embed", "layers", "heads", "kv"))
    self.out = p((2, 3, 4, 8), ("heads", "layers", "kv", "embed"))
    self.norm = p((8, 3), ("norm", "layers"))
    self.unembed = p((8, 50), ("embed", "vocab"))


def test_nnx_sharding_names_decide_without_the_model():
  with nnx.use_eager_sharding(False):
    state = nnx.state(_Named(), nnx.Param)
  t = _table(state)
  assert _axes(t["wi"]) == ("matrix", (1,), (0,), (2,))
  assert _axes(t["q"]) == ("matrix", (1,), (0,), (2, 3))
  assert _axes(t["out"]) == ("matrix", (1,), (0, 2), (3,))
  assert t["norm"].kind == t["unembed"].kind == "adamw"
  assert all(t[k].rule.startswith("logical axes") for k in t)


def test_mesh_axis_names_are_not_roles():
  """nn.with_partitioning's mesh axes say nothing of roles: the scanned
  stack is still found from the structure."""
  box = lambda x, names: nn.Partitioned(x, names)
  params = {"blocks": {"w": box(z((3, 8, 16)), (None, "fsdp", None)),
                       "ln": {"scale": box(z((3, 8)), (None, None))}}}
  t = _table(params)
  assert _axes(t["blocks/w"]) == ("matrix", (0,), (1,), (2,))
  assert "stacked: layers" in t["blocks/w"].rule


class _MoE(nnx.Module):
  """A custom module: no module rule, so its structure decides."""

  def __init__(self, rngs):
    self.router = nnx.Linear(8, 4, use_bias=False, rngs=rngs)
    self.w_in = nnx.Param(jnp.zeros((4, 8, 16)))
    self.w_out = nnx.Param(jnp.zeros((4, 16, 8)))


class _MoEModel(nnx.Module):

  def __init__(self, rngs):
    self.moe = _MoE(rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)


def test_custom_module_params_fall_back_to_structure():
  model = _MoEModel(nnx.Rngs(0))
  for t in (_table(model), _table(nnx.state(model, nnx.Param))):
    assert _axes(t["moe/w_in"]) == ("matrix", (0,), (1,), (2,))
    assert _axes(t["moe/w_out"]) == ("matrix", (0,), (1,), (2,))
    assert _axes(t["moe/router/kernel"]) == ("matrix", (), (0,), (1,))


def test_routes_decided_at_init_hold_for_plain_update_trees():
  """Boxed params at init (logical names: the layer axis in the middle, as
  MaxText scans), plain arrays in the train step: update keeps init's
  routes, and a routing pinned with orthax.route gives the same."""
  boxed = {"layers": {
      "wi": nn.LogicallyPartitioned(z((8, 3, 16)), ("embed", "layers", "mlp")),
      "norm": nn.LogicallyPartitioned(z((8, 3)), ("norm", "layers"))}}
  plain = nn.unbox(boxed)
  grads = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(0).normal(
      size=x.shape), jnp.float32), plain)
  tx = orthax.muon(0.02, weight_decay=0.0)
  # MaxText's way: the state is built from the boxed params, then unboxed
  u, _ = tx.update(grads, nn.unbox(tx.init(boxed)), plain)
  pinned = orthax.muon(0.02, weight_decay=0.0, routing=orthax.route(boxed))
  up, _ = pinned.update(grads, pinned.init(plain), plain)
  np.testing.assert_array_equal(u["layers"]["wi"], up["layers"]["wi"])
  # each of the 3 layers (axis 1) is its own orthogonalized 8x16 matrix: a
  # Gaussian 8x16 slice's singular values lie far inside the preset's design
  # interval once normalized (its smallest is ~0.1 of the Frobenius norm,
  # the interval starts at 1e-3), so all land in the band (lo, hi): their
  # ratio is at least lo / hi, less float32 rounding of the 5 steps (a few
  # 1e-6, far below the 1e-4 allowed)
  lo, hi = orthax.polar.get_preset("polar_express").band
  for i in range(3):
    s = np.linalg.svd(np.asarray(u["layers"]["wi"][:, i]), compute_uv=False)
    assert s.min() / s.max() >= lo / hi - 1e-4
  assert _table(boxed)["layers/wi"].batch_axes == (1,)
