"""The ready optimizers' options of issue 13 and their shared signature.

* Wiring: with every new keyword set (and with none), ``orthax.muon`` and
  ``orthax.normuon`` compute, op for op, what the same transforms chained by
  hand compute: equal to the bit (eagerly), with the same state structure.
* Semantics: the hidden matrices' updates against a NumPy float64
  reference written from the equations (cautious decay, preconditioning and
  its margin, the RMS shape scale, bias correction, multipliers), over three
  steps, within a derived float64 bound; bias-corrected momentum against
  ``optax.contrib.muon`` and NAdamW against ``optax.adamw(nesterov=True)``.
* Multipliers scale exactly the leaves they match, matrices and AdamW
  leaves, given as patterns, a prefix tree or a callable.
* The signature: every shared keyword, with one default, in each optimizer
  that takes it, documented; an unknown keyword is a TypeError naming it.
"""

from __future__ import annotations

import doctest
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
import reference
from orthax.routing import ADAMW, MATRIX

U64 = 2.0 ** -53  # float64 unit roundoff
LR = 0.05
STEPS = 3
# Two matrices (wide and tall) and two AdamW leaves (orthax.route's rules:
# 2-D kernels are matrices, vectors AdamW). No side is 1.5 times the other,
# so gram="auto" runs the plain iteration that the reference writes out.
SHAPES = {"a": {"w": (16, 20), "b": (20,)}, "c": {"w": (20, 16), "b": (16,)}}
LABELS = {"a": {"w": MATRIX, "b": ADAMW}, "c": {"w": MATRIX, "b": ADAMW}}
WEIGHTS = ("a", "c")  # the matrices, by their group: params[g]["w"]


def _problem(seed, dtype=jnp.float32, shapes=SHAPES):
  """Params (entries of RMS 1/sqrt(fan_in)) and STEPS gradients."""
  rng = np.random.default_rng(seed)
  draw = lambda scale: jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s) * scale(s), dtype), shapes,
      is_leaf=lambda s: isinstance(s, tuple))
  params = draw(lambda s: 1 / np.sqrt(s[0]))
  return params, [draw(lambda s: 1.0) for _ in range(STEPS)]


def _updates(tx, params, grads):
  """``tx``'s updates at every step, eagerly, the params fixed; and its
  final state."""
  state = tx.init(params)
  outs = []
  for g in grads:
    u, state = tx.update(g, state, params)
    outs.append(u)
  return outs, state


def _assert_same_run(ours, theirs, params, grads):
  """Equal updates at every step and states of one structure."""
  (got, ours_state), (want, theirs_state) = (_updates(ours, params, grads),
                                             _updates(theirs, params, grads))
  assert (jax.tree.structure(ours_state) == jax.tree.structure(theirs_state))
  for g, w in zip(got, want):
    jax.tree.map(np.testing.assert_array_equal, g, w)


# ---------------------------------------------------------------------------
# Wiring: the ready optimizers equal the transforms chained by hand. The
# same transforms run the same operations on the same arrays (eagerly, one
# dispatch each), so the numbers are equal to the bit.


def _by_hand(*, neuron=False, beta=0.95, bias_correction=False,
             orthogonalize=None, shape=("muon", 0.2), decay=None,
             weight_decay=0.01, mask=None, adamw=None):
  """The ready optimizer's structure written out: a partition of the
  matrices' ``chain(chain(momentum, orthogonalize, [neuron_normalize],
  scale_by_shape), decay, -lr)`` and AdamW."""
  direction = optax.chain(
      orthax.momentum(beta, bias_correction=bias_correction),
      orthax.orthogonalize(**(orthogonalize or {})),
      *([orthax.neuron_normalize(0.95, 1e-10)] if neuron else []),
      orthax.scale_by_shape(shape[0], rms=shape[1]))
  decay = decay or optax.add_decayed_weights
  return optax.partition(
      {MATRIX: optax.chain(direction, decay(weight_decay, mask),
                           optax.scale_by_learning_rate(LR)),
       ADAMW: optax.adamw(LR, **{"weight_decay": 0.0, **(adamw or {})})},
      LABELS)


@pytest.mark.parametrize("name", ["muon", "normuon"])
def test_defaults_unchanged(name):
  """No new keyword: the optimizer of before issue 13, to the bit, and the
  same state structure (checkpoints of before still restore)."""
  params, grads = _problem(0)
  ours = getattr(orthax, name)(LR)
  _assert_same_run(ours, _by_hand(neuron=name == "normuon"), params, grads)


@pytest.mark.parametrize("name", ["muon", "normuon"])
def test_every_new_keyword_reaches_its_transform(name):
  params, grads = _problem(1)
  mask = lambda p: jax.tree.map(lambda x: x.shape[0] == 16, p)
  ours = getattr(orthax, name)(
      LR, bias_correction=True, preconditioning="spectral", norm_margin=1.1,
      adaptive=True, shape_scale="rms", shape_rms=0.3, weight_decay=0.5,
      weight_decay_mask=mask, cautious_weight_decay=True, adam_nesterov=True,
      adam_eps_root=1e-6, adam_weight_decay=0.1)
  theirs = _by_hand(
      neuron=name == "normuon", bias_correction=True,
      orthogonalize=dict(preconditioning="spectral", norm_margin=1.1,
                         adaptive=True),
      shape=("rms", 0.3), decay=orthax.cautious_weight_decay,
      weight_decay=0.5, mask=mask,
      adamw=dict(nesterov=True, eps_root=1e-6, weight_decay=0.1))
  _assert_same_run(ours, theirs, params, grads)


@pytest.mark.parametrize("name", ["muon", "normuon", "pion"])
def test_adam_nesterov_is_optax_nadamw(name):
  """The AdamW leaves with ``adam_nesterov``/``adam_eps_root`` are
  ``optax.adamw(nesterov=True, eps_root=...)``'s: the same transform on the
  same leaves, so equal to the bit; without ``adam_nesterov`` they differ."""
  params, grads = _problem(2)
  settings = dict(adam_eps_root=1e-6, adam_weight_decay=0.1)
  nadamw = optax.adamw(LR, nesterov=True, eps_root=1e-6, weight_decay=0.1)
  vectors = lambda t: {g: t[g]["b"] for g in t}
  want, _ = _updates(nadamw, vectors(params), [vectors(g) for g in grads])
  make = getattr(orthax, name)
  got, _ = _updates(make(LR, adam_nesterov=True, **settings), params, grads)
  plain, _ = _updates(make(LR, **settings), params, grads)
  for g, p, w in zip(got, plain, want):
    jax.tree.map(np.testing.assert_array_equal, vectors(g), w)
    assert not np.array_equal(p["a"]["b"], w["a"])


# ---------------------------------------------------------------------------
# Semantics against NumPy float64.


def _muon_reference(*, coeffs, margin, preconditioning="frobenius",
                    bias_correction=False, shape_rms=None, weight_decay=0.0,
                    decayed=WEIGHTS, cautious=False, factors=None, beta=0.95):
  """Muon's update of one matrix at step ``t`` (1, 2, ...), in float64.

  ``m <- beta m + (1 - beta) g``; the Nesterov input ``beta m + (1 - beta)
  g``, or with bias correction (Dozat's NAdam) ``beta m / (1 - beta^(t+1)) +
  (1 - beta) g / (1 - beta^t)``; the polar approximation
  (:func:`reference.newton_schulz`); the shape scale ``sqrt(max(1, fan_out
  / fan_in))`` or ``rms sqrt(max(fan_in, fan_out))``; the decay ``wd W``,
  cautious: only where the direction ``O`` and ``W`` agree in sign (a zero
  agrees); times ``-lr`` and the leaf's factor. Returns ``step(t, key, w,
  g) -> (update, Newton–Schulz input, shape scale, direction O)``.
  """
  moments = {}

  def step(t, key, w, g):
    m = moments[key] = beta * moments.get(key, 0.0) + (1 - beta) * g
    if bias_correction:
      u = (beta * m / (1 - beta ** (t + 1))
           + (1 - beta) * g / (1 - beta ** t))
    else:
      u = beta * m + (1 - beta) * g
    o = reference.newton_schulz(u, coeffs, margin=margin,
                                preconditioning=preconditioning)
    fan_in, fan_out = w.shape
    scale = (np.sqrt(max(1.0, fan_out / fan_in)) if shape_rms is None
             else shape_rms * np.sqrt(max(fan_in, fan_out)))
    o = scale * o
    decay = weight_decay * w if key in decayed else 0.0 * w
    if cautious:
      decay = np.where(np.sign(o) * np.sign(w) >= 0, decay, 0.0)
    factor = 1.0 if factors is None else factors[key]
    return -LR * factor * (o + decay), u, scale, o

  return step


def _update_bound(m, w, scale, *, coeffs, margin, preconditioning="frobenius",
                  weight_decay=0.0, factor=1.0):
  """Bound on the Frobenius distance of two float64 evaluations of one
  update ``lr f (s NS(m) + decay)``: each within
  :func:`reference.newton_schulz_error_bound` of the exact iteration (the
  input ``m``, the momentum, carrying about 10 roundings a step), times ``lr
  f s``, plus 6 roundings (the shape scale's product, the decay's product
  and sum, the factor's and the learning rate's products; the mask's select
  is exact) relative to ``lr f (s ||NS(m)||_F + wd ||W||_F)``."""
  err, polar = reference.newton_schulz_error_bound(
      m, coeffs, u=U64, margin=margin, preconditioning=preconditioning,
      start=10 * STEPS * U64)
  rest = scale * polar + weight_decay * np.linalg.norm(w)
  return LR * factor * 2 * (scale * err + 6 * U64 * rest)


POLAR_EXPRESS = dict(coeffs=reference.POLAR_EXPRESS,
                     margin=reference.POLAR_EXPRESS_MARGIN)
JORDAN = dict(coeffs=[reference.MUON_ABC] * 5, margin=1.0)

# name: (orthax.muon's keywords, the reference's)
OPTIONS = {
    "cautious_decay": (
        dict(coeffs="polar_express", weight_decay=0.5,
             cautious_weight_decay=True,
             weight_decay_mask=lambda p: {"a": {"w": True},
                                          "c": {"w": False}}),
        dict(POLAR_EXPRESS, weight_decay=0.5, cautious=True, decayed=("a",))),
    "spectral_margin": (
        dict(coeffs="polar_express", preconditioning="spectral",
             norm_margin=1.1, weight_decay=0.0),
        dict(POLAR_EXPRESS, preconditioning="spectral", margin=1.1)),
    "aol": (
        dict(coeffs="muon", preconditioning="aol", weight_decay=0.0),
        dict(JORDAN, preconditioning="aol")),
    "frobenius_margin": (
        dict(coeffs="muon", norm_margin=1.25, weight_decay=0.1),
        dict(JORDAN, margin=1.25, weight_decay=0.1)),
    "shape_rms": (
        dict(coeffs="polar_express", shape_scale="rms", shape_rms=0.3,
             weight_decay=0.1),
        dict(POLAR_EXPRESS, shape_rms=0.3, weight_decay=0.1)),
    "bias_correction": (
        dict(coeffs="polar_express", bias_correction=True, weight_decay=0.0),
        dict(POLAR_EXPRESS, bias_correction=True)),
    "multipliers": (
        dict(coeffs="polar_express", weight_decay=0.1,
             lr_multipliers={"a/*": 3.0, "c/*": 0.3}),
        dict(POLAR_EXPRESS, weight_decay=0.1, factors={"a": 3.0, "c": 0.3})),
}
MATRICES_ONLY = {g: {"w": SHAPES[g]["w"]} for g in WEIGHTS}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_matrices_match_float64_reference(option):
  """Three steps of ``orthax.muon`` in float64 against the reference, fed
  the same params (moved by the reference's updates). Both evaluate the
  same equations in float64 (``_update_bound``). The cautious mask is
  decided alike on both sides: every entry of ``O`` and ``W`` is farther
  from 0 than the bound."""
  ours_kw, ref_kw = OPTIONS[option]
  with jax.enable_x64(True):
    params, grads = _problem(3, jnp.float64, MATRICES_ONLY)
    tx = orthax.muon(LR, **ours_kw)
    ref = _muon_reference(**ref_kw)
    state = tx.init(params)
    for t, g in enumerate(grads, 1):
      got, state = tx.update(g, state, params)
      for key in WEIGHTS:
        w = np.asarray(params[key]["w"], np.float64)
        want, m, scale, o = ref(t, key, w,
                                np.asarray(g[key]["w"], np.float64))
        bound = _update_bound(
            m, w, scale, coeffs=ref_kw["coeffs"], margin=ref_kw["margin"],
            preconditioning=ref_kw.get("preconditioning", "frobenius"),
            weight_decay=ref_kw.get("weight_decay", 0.0),
            factor=(ref_kw.get("factors") or {}).get(key, 1.0))
        diff = np.linalg.norm(np.asarray(got[key]["w"]) - want)
        assert diff <= bound, (t, key, diff, bound)
        if ref_kw.get("cautious"):
          assert min(np.abs(o).min(), np.abs(w).min()) > bound
        params[key]["w"] = jnp.asarray(w + want)


def test_reference_comparison_has_teeth():
  """Plain decay where cautious decay was asked misses the reference by far
  more than the comparison's bound (below 1e-9 here)."""
  ours_kw, ref_kw = OPTIONS["cautious_decay"]
  with jax.enable_x64(True):
    params, grads = _problem(3, jnp.float64, MATRICES_ONLY)
    tx = orthax.muon(LR, **dict(ours_kw, cautious_weight_decay=False))
    got, _ = tx.update(grads[0], tx.init(params), params)
    want = _muon_reference(**ref_kw)(
        1, "a", np.asarray(params["a"]["w"]),
        np.asarray(grads[0]["a"]["w"]))[0]
    assert np.linalg.norm(np.asarray(got["a"]["w"]) - want) > 1e-6


def test_bias_correction_is_optax_muon():
  """``bias_correction=True`` with Jordan's coefficients and no epsilon is
  ``optax.contrib.muon``'s Muon (eps=0): in float64 the two evaluate the
  same equations (``_update_bound``). Jordan's uncorrected momentum falls
  outside that bound from the second step on (at the first the two forms
  differ by a factor, which the iteration discards)."""
  wd = 0.1
  with jax.enable_x64(True):
    params, grads = _problem(4, jnp.float64, MATRICES_ONLY)
    common = dict(coeffs="muon", eps=0.0, gram=False, weight_decay=wd)
    txs = (optax.contrib.muon(LR, eps=0.0, weight_decay=wd),
           orthax.muon(LR, bias_correction=True, **common),
           orthax.muon(LR, **common))
    (theirs, ours, jordan) = (_updates(tx, params, grads)[0] for tx in txs)
    ref = _muon_reference(**JORDAN, bias_correction=True)
    for t in range(STEPS):
      for key in WEIGHTS:
        w = np.asarray(params[key]["w"])
        _, m, scale, _ = ref(t + 1, key, w, np.asarray(grads[t][key]["w"]))
        bound = _update_bound(m, w, scale, weight_decay=wd, **JORDAN)
        got = [np.asarray(u[t][key]["w"]) for u in (theirs, ours, jordan)]
        assert np.linalg.norm(got[1] - got[0]) <= bound, (t, key)
        if t > 0:
          assert np.linalg.norm(got[2] - got[0]) > bound, (t, key)


# ---------------------------------------------------------------------------
# Multipliers: each leaf's final update times its factor, nothing else. The
# multiplier is the last operation and float multiplication is correctly
# rounded, so the update is float32(base) * float32(factor) to the bit.

MULTIPLIERS = {
    # patterns: the last match wins; c/w matches none and keeps 1
    "patterns": ({"a/*": 3.0, "*/b": 0.25},
                 {"a": {"w": 3.0, "b": 0.25}, "c": {"w": 1.0, "b": 0.25}}),
    # a prefix tree: its factor covers the subtree below it
    "tree": ({"a": 0.7, "c": {"w": 2.5, "b": 0.0}},
             {"a": {"w": 0.7, "b": 0.7}, "c": {"w": 2.5, "b": 0.0}}),
    "callable": (lambda p: {"a": {"w": 1.5, "b": 1.0},
                            "c": {"w": 1.0, "b": 4.0}},
                 {"a": {"w": 1.5, "b": 1.0}, "c": {"w": 1.0, "b": 4.0}}),
}


@pytest.mark.parametrize("name", ["muon", "normuon"])
@pytest.mark.parametrize("spec", list(MULTIPLIERS))
def test_multipliers_scale_exactly_the_matched_leaves(spec, name):
  multipliers, factors = MULTIPLIERS[spec]
  params, grads = _problem(5)
  make = getattr(orthax, name)
  base, _ = _updates(make(LR, weight_decay=0.1), params, grads)
  got, _ = _updates(make(LR, weight_decay=0.1, lr_multipliers=multipliers),
                    params, grads)
  for g, b in zip(got, base):
    want = jax.tree.map(lambda x, f: np.asarray(x) * np.float32(f), b, factors)
    jax.tree.map(np.testing.assert_array_equal, g, want)


def test_multipliers_unmatched_pattern_names_it():
  params, _ = _problem(5)
  with pytest.raises(ValueError, match="nowhere/"):
    orthax.muon(LR, lr_multipliers={"nowhere/*": 2.0}).init(params)


# ---------------------------------------------------------------------------
# The signature: shared keywords in one place, each shown and documented.


def _documented(fn):
  """The argument names of ``fn``'s ``Args:`` entries (``a, b: ...`` gives
  both)."""
  section = fn.__doc__.split("  Args:\n")[1].split("\n\n")[0]
  names = set()
  for entry in re.findall(r"^    (\w[\w,\s]*?):", section, re.MULTILINE):
    names.update(n.strip() for n in entry.split(","))
  return names


READY = ("muon", "normuon", "pion", "namo", "namo_d", "adamuon", "root", "auon",
         "hybrid_auon", "dion", "muon_clip", "aro", "poet", "fismo")


@pytest.mark.parametrize("name", READY)
def test_signature_is_explicit_and_documented(name):
  fn = getattr(orthax, name)
  params = inspect.signature(fn).parameters
  assert list(params)[0] == "learning_rate"
  assert all(p.kind is inspect.Parameter.KEYWORD_ONLY
             for p in list(params.values())[1:])
  assert "shared" not in params
  assert set(params) == _documented(fn)
  for mark in ("{shared_args}", "{raises}", "{returns}", "{example"):
    assert mark not in fn.__doc__


@pytest.mark.parametrize("name", READY)
def test_docstring_example_runs(name):
  """Each ready optimizer's Example (some written by ``_ready`` from an
  ``{example: ...}`` mark) runs as written."""
  fn = getattr(orthax, name)
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  for test in doctest.DocTestFinder(recurse=False).find(fn, f"orthax.{name}",
                                                        globs={}):
    runner.run(test)
  result = runner.summarize(verbose=False)
  assert result.attempted >= 3 and result.failed == 0


def test_shared_keywords_have_one_default():
  """What muon and normuon share, and pion's AdamW and routing block, has
  the same defaults everywhere; the issue-13 keywords are among them."""
  muon, normuon, pion = (inspect.signature(f).parameters
                         for f in (orthax.muon, orthax.normuon, orthax.pion))
  for other in (normuon, pion):
    for key in set(muon) & set(other) - {"learning_rate", "eps", "mesh",
                                          "mesh_axis"}:
      assert other[key].default == muon[key].default, key
  new = {"bias_correction": False, "cautious_weight_decay": False,
         "preconditioning": None, "norm_margin": None, "shape_rms": 0.2,
         "lr_multipliers": None, "adam_nesterov": False, "adam_eps_root": 0.0}
  for key, default in new.items():
    assert muon[key].default == default and normuon[key].default == default
  assert pion["adam_nesterov"].default is False
  assert pion["adam_eps_root"].default == 0.0


@pytest.mark.parametrize("call, match", [
    (lambda: orthax.muon(LR, ns_steps=3), r"orthax\.muon.*'ns_steps'"),
    (lambda: orthax.normuon(LR, consistent_rms=0.2),
     r"orthax\.normuon.*'consistent_rms'"),
    (lambda: orthax.pion(LR, shared=None), r"orthax\.pion.*'shared'"),
    (lambda: orthax.muon(LR, 0.9), "positional"),
    (lambda: orthax.muon(), "learning_rate"),
    (lambda: orthax.muon(LR, cautious_weight_decay=1),
     "cautious_weight_decay must be a bool"),
    (lambda: orthax.muon(LR, adam_nesterov="yes"),
     "adam_nesterov must be a bool"),
    (lambda: orthax.normuon(LR, bias_correction=None),
     "bias_correction must be a bool"),
])
def test_bad_call_is_a_type_error_naming_it(call, match):
  with pytest.raises(TypeError, match=match):
    call()


@pytest.mark.parametrize("call, match", [
    (lambda: orthax.muon(LR, shape_rms=0.0), "rms"),
    (lambda: orthax.muon(LR, norm_margin=-1.0), "norm_margin"),
    (lambda: orthax.normuon(LR, preconditioning="cholesky"), "cholesky"),
    (lambda: orthax.muon(LR, adam_eps_root=-1.0), "adam_eps_root"),
    (lambda: orthax.muon(LR, lr_multipliers={"*": -1.0}), "multipliers"),
])
def test_bad_value_is_a_value_error_naming_it(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_jit_with_every_new_keyword():
  """One jitted step of each with the new keywords: finite updates of the
  params' structure."""
  params, grads = _problem(6)
  for make in (orthax.muon, orthax.normuon):
    tx = make(LR, bias_correction=True, preconditioning="aol",
              cautious_weight_decay=True, shape_scale="rms",
              lr_multipliers={"a/*": 2.0}, adam_nesterov=True,
              adam_eps_root=1e-8)
    updates, _ = jax.jit(tx.update)(grads[0], tx.init(params), params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    assert all(np.isfinite(np.asarray(u)).all()
               for u in jax.tree.leaves(updates))
