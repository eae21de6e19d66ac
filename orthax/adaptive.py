"""Ready optimizers of Muon's adaptive family: NAMO, NAMO-D, AdaMuon, ROOT,
AuON and Hybrid-AuON, for hidden matrices, with AdamW for the rest.

Each is Muon's skeleton (:func:`orthax.muon`'s routing, momentum and
Newton–Schulz iteration, the keywords of :mod:`orthax._ready`) with the
method's own stages, and the defaults of the method's official code where
they differ from Muon's (each docstring names its source). The building
blocks are public transforms, so each optimizer is also a readable
``optax.chain`` a user can rearrange: its docstring gives the chain.
"""

from __future__ import annotations

import types

import optax

from orthax._checks import check_hyperparameter
from orthax._ready import (_ADAMW_ARGS, _BETA, _DECAY_ARGS, _DESCENT_ARGS,
                           _MOMENTUM_ARGS, _MU_DTYPE, _MULTIPLIER_ARGS,
                           _NESTEROV, _POLAR_ARGS, _ROUTING_ARGS, _SHAPE_ARGS,
                           _WEIGHT_DECAY, _WEIGHT_DECAY_MASK, _descent,
                           _momentum, _orthogonalize, _ready, _routed, _shape)
from orthax.transforms.clip import clip_to_quantile
from orthax.transforms.momentum import momentum
from orthax.transforms.norm_adaptive import norm_adaptive
from orthax.transforms.rms import cosh_rms_normalize, scale_to_rms
from orthax.transforms.shape import scale_by_shape

__all__ = ["adamuon", "auon", "hybrid_auon", "namo", "namo_d", "root"]

# The official NAMO code's defaults (minxin-zhg/namo, src/namo.py): Jordan's
# quintic, Moonlight's 0.2 * sqrt(max(fan_in, fan_out)) scale, decay 0.1,
# and AdamW with betas (0.9, 0.95) for the other leaves.
_NAMO_DEFAULTS = dict(coeffs="muon", shape_scale="rms", weight_decay=0.1,
                      adam_b2=0.95)
_NAMO_FAMILY = ((_BETA, _NESTEROV, _MU_DTYPE), _POLAR_ARGS, _SHAPE_ARGS,
                (_WEIGHT_DECAY, _WEIGHT_DECAY_MASK), _MULTIPLIER_ARGS,
                _ROUTING_ARGS, _ADAMW_ARGS)



def _auon_variant(name: str, variant: str, variants: tuple[str, str]) -> bool:
  """Whether ``variant`` (one of ``variants``) is the paper's."""
  if variant not in variants:
    raise ValueError(f"{name}: unknown variant {variant!r}; expected one of "
                     f"{variants}.")
  return variant == "paper"


def _namo(name: str, learning_rate: optax.ScalarOrSchedule,
          shared: types.SimpleNamespace, *, granularity: str, beta2: float,
          norm_eps: float, clamp: float | None,
          bias_correction: bool) -> optax.GradientTransformation:
  """NAMO (``granularity="matrix"``) or NAMO-D (``"input"``): the
  norm-adaptive step around Muon's momentum and orthogonalization, with the
  learning rate inside it (the official code's caps need it)."""
  s = shared
  return _routed(name, learning_rate, s, lambda dims: norm_adaptive(
      momentum(s.beta, nesterov=s.nesterov, mu_dtype=s.mu_dtype),
      _orthogonalize(s, dims), beta1=s.beta, beta2=beta2, eps=norm_eps,
      granularity=granularity, clamp=clamp, bias_correction=bias_correction,
      shape_scale=s.shape_scale, shape_rms=s.shape_rms,
      weight_decay=s.weight_decay, weight_decay_mask=s.weight_decay_mask,
      learning_rate=learning_rate, dimension_numbers=dims))


_NAMO_ARGS_DOC = """
    learning_rate: NAMO's step size (float or schedule); each matrix's step
      is ``min(learning_rate * c * s, 1)`` times its orthogonalized momentum
      (``s`` its shape scale) and its decay ``weight_decay * min(
      learning_rate * c, 1)`` times the weight, where ``c`` is the adaptive
      factor (:func:`orthax.norm_adaptive`). The official code gives AdamW
      the same learning rate (``adam_learning_rate=None``).
    beta2: decay of the moving average of the raw gradient's squared norm.
    norm_eps: epsilon added to its square root, ``>= 0``.
    bias_correction: multiply the factor by ``sqrt(1 - beta2**t) /
      (1 - beta**t)`` (the official code's); it is NAMO's own correction,
      so the momentum itself stays uncorrected."""


@_ready(*_NAMO_FAMILY, defaults=_NAMO_DEFAULTS)
def namo(learning_rate: optax.ScalarOrSchedule, *, beta2: float = 0.99,
         norm_eps: float = 1e-8, bias_correction: bool = True,
         shared: types.SimpleNamespace) -> optax.GradientTransformation:
  """NAMO: Muon's orthogonalized momentum with Adam's norm-adaptive step size.

  For each hidden matrix, a scalar ``c = ||M~|| / (sqrt(v) + norm_eps)``
  adapts the step, where ``M~`` is the (Nesterov) momentum and ``v`` the
  moving average of the raw gradient's squared Frobenius norm: like Adam's
  ``m / sqrt(v)``, but for the whole matrix, so the orthogonalized direction
  keeps its shape. The same factor scales the weight decay, as in the
  official code. Hidden matrices get :func:`orthax.norm_adaptive` around
  ``orthax.momentum(beta, nesterov=True)`` and :func:`orthax.orthogonalize`
  (its decay and learning rate inside); the other leaves AdamW
  (:func:`orthax.muon` describes the routing).

  The defaults are the official code's (``src/namo.py``): Jordan's quintic
  for 5 steps, the Moonlight scale ``0.2 * sqrt(max(fan_in, fan_out))``,
  decay 0.1, ``beta2 = 0.99``, AdamW betas (0.9, 0.95). Its GPT-2 runs use
  a learning rate of 0.012 for both parts.

  Args:{namo_args}{shared_args}

{returns}
  Example:
    {example: namo(learning_rate=0.012)}

  References:
    M. Zhang, Y. Liu, H. Schaeffer, Adam Improves Muon: Adaptive Moment
    Estimation with Orthogonalized Momentum, 2026, arXiv:2602.17080,
    github.com/minxin-zhg/namo
  """
  return _namo("orthax.namo", learning_rate, shared, granularity="matrix",
               beta2=beta2, norm_eps=norm_eps, clamp=None,
               bias_correction=bias_correction)


@_ready(*_NAMO_FAMILY, defaults=_NAMO_DEFAULTS)
def namo_d(learning_rate: optax.ScalarOrSchedule, *, beta2: float = 0.99,
           norm_eps: float = 1e-8, bias_correction: bool = True,
           clamp: float | None = 0.75,
           shared: types.SimpleNamespace) -> optax.GradientTransformation:
  """NAMO-D: NAMO with one adaptive factor per input neuron.

  As :func:`orthax.namo`, but the factor ``c_i = ||M~[i, :]|| / (sqrt(v_i) +
  norm_eps)`` is computed for each fan_in row ``i`` of the ``(fan_in,
  fan_out)`` matrix (the official code's columns of torch's ``(out, in)``
  weight), and clamped to ``[clamp * mean(c), mean(c) / clamp]``: the update
  is ``diag(c) O``, with ``clamp = 1`` NAMO's direction ``O`` itself.

  The official class's default clamp is 0.75; its GPT-2 config
  (``optim/namo-d.yaml``) uses 0.01 with a learning rate of 0.009.

  Args:{namo_args}
    clamp: ``kappa`` in ``(0, 1]``, or ``None`` for no clamp.{shared_args}

{returns}
  Example:
    {example: namo_d(learning_rate=0.009)}

  References:
    M. Zhang, Y. Liu, H. Schaeffer, Adam Improves Muon: Adaptive Moment
    Estimation with Orthogonalized Momentum, 2026, arXiv:2602.17080,
    github.com/minxin-zhg/namo
  """
  return _namo("orthax.namo_d", learning_rate, shared, granularity="input",
               beta2=beta2, norm_eps=norm_eps, clamp=clamp,
               bias_correction=bias_correction)


for _f in (namo, namo_d):
  _f.__doc__ = _f.__doc__.replace("{namo_args}", _NAMO_ARGS_DOC)


@_ready(_MOMENTUM_ARGS, _POLAR_ARGS, _DECAY_ARGS, _MULTIPLIER_ARGS,
        _ROUTING_ARGS, _ADAMW_ARGS, defaults=dict(coeffs="muon"))
def adamuon(learning_rate: optax.ScalarOrSchedule, *, sign: bool = False,
            beta2: float = 0.999, rms_eps: float = 1e-8,
            target_rms: float = 0.2,
            shared: types.SimpleNamespace) -> optax.GradientTransformation:
  """AdaMuon: Adam's second moment on the orthogonalized direction.

  Hidden matrices get::

    optax.chain(orthax.momentum(beta),
                optax.scale_by_sign(),            # only with sign=True
                orthax.orthogonalize(coeffs="muon"),
                optax.scale_by_rms(beta2, rms_eps, eps_in_sqrt=False,
                                   bias_correction=True),
                orthax.scale_to_rms(target_rms),
                optax.add_decayed_weights(weight_decay),
                optax.scale_by_learning_rate(learning_rate))

  so each matrix's update has RMS exactly ``target_rms`` times the learning
  rate (before the decay); the other leaves get AdamW.

  The defaults are the official ``adamuon.py``'s (commit 3b84e03), which
  orthogonalizes the momentum itself. ``sign=True`` is the paper's
  sign-stabilized form (the Newton–Schulz input is ``sign(M~)``, every entry
  ±1), which the released code predates; on the example's tiny GPT it
  trained far worse (validation loss 1.95 against 1.71 without it at their
  best rates, BUILD.md), so it is not the default. The other defaults:
  momentum 0.95
  (Nesterov), 5 steps of Jordan's quintic, ``beta2 = 0.999``, ``eps = 1e-8``,
  decay 0.01 and a learning rate of 0.02. (optax's closed PR #1632 called
  ``optax.contrib.muon(adaptive=True)`` AdaMuon: that is
  :func:`orthax.muon`'s ``adaptive=``, not this method.)

  Args:
    learning_rate: step size of the hidden matrices (float or schedule).
    sign: orthogonalize the momentum's signs (the paper's form) rather than
      the momentum (the released code's, the default).
    beta2: decay of the elementwise second moment of the orthogonalized
      direction, in ``[0, 1)``.
    rms_eps: epsilon added to its (bias-corrected) square root, ``>= 0``.
    target_rms: the RMS of each matrix's direction, ``> 0``
      (:func:`orthax.scale_to_rms`).{shared_args}

{returns}
  Example:
    {example: adamuon(learning_rate=0.02)}

  References:
    C. Si, D. Zhang, W. Shen, AdaMuon: Adaptive Muon Optimizer, 2025,
    arXiv:2507.11005, github.com/Chongjie-Si/AdaMuon
  """
  name = "orthax.adamuon"
  beta2 = check_hyperparameter(name, "beta2", beta2, low=0.0, high=1.0,
                               high_open=True)
  rms_eps = check_hyperparameter(name, "rms_eps", rms_eps, low=0.0)
  signs = [optax.scale_by_sign()] if sign else []
  return _descent(name, learning_rate, shared, lambda dims: [
      _momentum(shared), *signs, _orthogonalize(shared, dims),
      optax.scale_by_rms(beta2, rms_eps, eps_in_sqrt=False,
                         bias_correction=True),
      scale_to_rms(target_rms, dimension_numbers=dims)])


@_ready(_MOMENTUM_ARGS, _POLAR_ARGS, _DESCENT_ARGS, _ROUTING_ARGS,
        _ADAMW_ARGS,
        defaults=dict(coeffs="root", shape_scale="rms", weight_decay=0.1,
                      adam_b2=0.95, adam_weight_decay=0.1))
def root(learning_rate: optax.ScalarOrSchedule, *, quantile: float = 0.9,
         quantile_eps: float = 1e-9,
         shared: types.SimpleNamespace) -> optax.GradientTransformation:
  """ROOT: Muon on the momentum with its outliers clipped, shape-fitted
  Newton–Schulz coefficients.

  Hidden matrices get::

    optax.chain(orthax.momentum(beta),
                orthax.clip_to_quantile(quantile),
                orthax.orthogonalize(coeffs="root"),
                orthax.scale_by_shape("rms", rms=0.2),
                optax.add_decayed_weights(weight_decay),
                optax.scale_by_learning_rate(learning_rate))

  and the other leaves AdamW. The clip bounds each entry of the momentum by
  its matrix's ``quantile`` of magnitudes (ROOT's ``M - T(M)``, the part the
  soft threshold leaves), and the ``"root"`` coefficients are the paper's
  per-shape quintics for its four shapes, Jordan's elsewhere
  (:func:`orthax.polar.get_preset`).

  The official code keeps the sum ``M = beta M + G`` rather than orthax's
  average; every stage after it is positively homogeneous or scale-free, so
  the updates are the same. The defaults are that code's (ROOT's
  ``example_train.py``): momentum 0.95 (Nesterov), 5 steps, the Moonlight
  scale, decay 0.1, and AdamW with the same learning rate and decay and
  betas (0.9, 0.95) for the other leaves; its learning rate is 1e-3.

  Args:
    learning_rate: step size of the hidden matrices (float or schedule).
    quantile: the magnitudes' quantile each matrix is clipped to, in
      ``(0, 1]`` (:func:`orthax.clip_to_quantile`).
    quantile_eps: added to the threshold (the official code's 1e-9).{shared_args}

{returns}
  Example:
    {example: root(learning_rate=1e-3)}

  References:
    W. He et al., ROOT: Robust Orthogonalized Optimizer for Neural Network
    Training, 2025, arXiv:2511.20626,
    github.com/huawei-noah/noah-research/tree/master/ROOT
  """
  return _descent("orthax.root", learning_rate, shared, lambda dims: [
      _momentum(shared),
      clip_to_quantile(quantile, eps=quantile_eps, dimension_numbers=dims),
      _orthogonalize(shared, dims), _shape(shared, dims)])


@_ready(_MOMENTUM_ARGS, _DECAY_ARGS, _MULTIPLIER_ARGS, _ROUTING_ARGS,
        _ADAMW_ARGS, defaults=dict(weight_decay=0.0))
def auon(learning_rate: optax.ScalarOrSchedule, *, variant: str = "paper",
         gamma: float | None = None,
         shared: types.SimpleNamespace) -> optax.GradientTransformation:
  """AuON: the momentum normalized by a hyperbolic-cosine RMS, no
  orthogonalization.

  Hidden matrices get ``orthax.momentum(beta) ->``
  :func:`orthax.cosh_rms_normalize` ``-> decay -> learning rate``:

  * ``variant="paper"`` (paper v1, section 3.1, ``gamma`` 1): the momentum
    divided by its Frobenius norm and by ``r = RMS(cosh(X))``, times
    Muon's shape scale ``sqrt(max(1, fan_out / fan_in))``;
  * ``variant="package"`` (the ``auon`` package's class, ``gamma`` 1.5):
    the momentum itself divided by ``r``, no shape scale.

  Read this before choosing it: for a matrix of unit Frobenius norm,
  ``1 + gamma**2 / N <= r**2 <= 1 + sinh(gamma)**2 / N`` with ``N`` its
  entries, so ``r = 1 + O(1/N)`` (under 1e-5 from 1 for a 512×512 matrix).
  The paper variant is Frobenius-normalized Nesterov momentum, the package
  variant SGD with Nesterov momentum, each to within that factor: nothing
  here orthogonalizes. The paper's own results (6000 steps, 41M parameters)
  do not beat Muon; :func:`orthax.hybrid_auon` adds Newton–Schulz.

  Args:
    learning_rate: step size of the hidden matrices (float or schedule);
      the paper tunes 0.055 against Muon's 0.01, the package's class
      defaults to 0.24 and its config to 0.08.
    variant: ``"paper"`` or ``"package"``.
    gamma: the cosh's scale, ``>= 0``; ``None``: the variant's (1 or 1.5).{shared_args}

{returns}
  Example:
    {example: auon(learning_rate=0.05)}

  References:
    D. Maity, AuON: A Linear-time Alternative to Orthogonal Momentum
    Updates, 2025, arXiv:2509.24320, github.com/ryyzn9/AuON
  """
  paper = _auon_variant("orthax.auon", variant, ("paper", "package"))
  gamma = (1.0 if paper else 1.5) if gamma is None else gamma
  return _descent("orthax.auon", learning_rate, shared, lambda dims: [
      _momentum(shared),
      cosh_rms_normalize(gamma, normalize_output=paper,
                         dimension_numbers=dims),
      *([scale_by_shape("muon", dimension_numbers=dims)] if paper else [])])


@_ready(_MOMENTUM_ARGS, _POLAR_ARGS, _DECAY_ARGS, _MULTIPLIER_ARGS,
        _ROUTING_ARGS, _ADAMW_ARGS,
        defaults=dict(coeffs="muon", weight_decay=0.0))
def hybrid_auon(learning_rate: optax.ScalarOrSchedule, *,
                variant: str = "package", gamma: float | None = None,
                shared: types.SimpleNamespace) -> optax.GradientTransformation:
  """Hybrid-AuON: Newton–Schulz steps, then AuON's cosh-RMS normalization.

  Hidden matrices get::

    optax.chain(orthax.momentum(beta),
                orthax.orthogonalize(coeffs="muon", steps=steps),
                orthax.cosh_rms_normalize(gamma, normalize_output=False),
                optax.add_decayed_weights(weight_decay),
                optax.scale_by_learning_rate(learning_rate))

  * ``variant="package"`` (the ``auon`` package's ``HybridAuON``): 5 steps,
    ``gamma`` 1.5, the cosh of the iterate divided by its Frobenius norm;
  * ``variant="paper"`` (v1, section 3.2): 1 step, ``gamma`` 1, the cosh
    of the iterate itself (``normalize_input=False``). The paper prints
    that normalization without the square root of its section 3.1: taken
    as a typo.

  Neither has a shape scale. The cosh factor is 1 to within ``1e-6`` for
  hidden-size matrices (see :func:`orthax.auon`), so the package variant is
  Muon without its shape scale, and the paper's one Newton–Schulz step is
  far from orthogonal (``steps=`` overrides either).

  Args:
    learning_rate: step size of the hidden matrices (float or schedule);
      the package's training config uses 0.08.
    variant: ``"package"`` or ``"paper"``.
    gamma: the cosh's scale, ``>= 0``; ``None``: the variant's (1.5 or
      1).{shared_args}

{returns}
  Example:
    {example: hybrid_auon(learning_rate=0.02)}

  References:
    D. Maity, AuON: A Linear-time Alternative to Orthogonal Momentum
    Updates, 2025, arXiv:2509.24320, github.com/ryyzn9/AuON
  """
  paper = _auon_variant("orthax.hybrid_auon", variant, ("package", "paper"))
  gamma = (1.0 if paper else 1.5) if gamma is None else gamma
  steps = (1 if paper else 5) if shared.steps is None else shared.steps
  return _descent("orthax.hybrid_auon", learning_rate, shared, lambda dims: [
      _momentum(shared), _orthogonalize(shared, dims, steps=steps),
      cosh_rms_normalize(gamma, normalize_input=not paper,
                         normalize_output=False, dimension_numbers=dims)])
