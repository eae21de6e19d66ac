"""Ready optimizers whose updates have more structure than one polar
factor: low-rank (Dion), clipped (MuonClip), rotated (ARO, POET) and
whitened (FISMO), for hidden matrices, with AdamW for the rest.

Like :mod:`orthax.adaptive`, each takes :func:`orthax.muon`'s routing and
the shared keywords of :mod:`orthax._ready`, uses the defaults of the
method's official code (or says that none are published), and writes out in
its docstring the ``optax.chain`` it builds from public transforms.
"""

from __future__ import annotations

import types
from typing import Any

import optax

from orthax._ready import (_ADAMW_ARGS, _Arg, _DECAY_ARGS, _DESCENT_ARGS,
                           _MOMENTUM_ARGS, _MULTIPLIER_ARGS, _POLAR_ARGS,
                           _ROUTING_ARGS, _descent, _momentum, _orthogonalize,
                           _ready, _shape, _values, _with_adamw)
from orthax.transforms.adaptive_rotate import adaptive_rotate
from orthax.transforms.block_rotate import block_stochastic_rotate
from orthax.transforms.dion import scale_by_dion
from orthax.transforms.kronecker_whiten import kronecker_whiten
from orthax.transforms.qk_clip import qk_clip
from orthax.transforms.rms import scale_to_rms
from orthax.transforms.shape import scale_by_shape

__all__ = ["aro", "dion", "fismo", "muon_clip", "poet"]


# Dion's buffer is not a momentum of the parameters' dtype (see
# orthax.scale_by_dion), so its optimizer takes mu_dtype for AdamW alone.
_DION_MU_DTYPE = _Arg(
    "mu_dtype", None, "Any",
    "dtype of AdamW's first moment (as in ``optax.contrib.muon``); ``None`` "
    "follows the params (float32 for float16 ones). Dion's own buffer is "
    "float32 (float64 for float64 params) whatever this is "
    "(:func:`orthax.scale_by_dion`).")


@_ready((_DION_MU_DTYPE,), _DECAY_ARGS, _MULTIPLIER_ARGS, _ROUTING_ARGS,
        _ADAMW_ARGS, defaults=dict(adam_b2=0.95))
def dion(learning_rate: optax.ScalarOrSchedule, *,
         rank_fraction: float = 1.0, rank: int | None = None,
         mu: float = 0.95, eps: float = 1e-8, seed: int = 0,
         shared: types.SimpleNamespace) -> optax.GradientTransformation:
  """Dion: low-rank orthonormal updates with error feedback, for hidden
  matrices; AdamW for the rest.

  Hidden matrices get::

    optax.chain(orthax.scale_by_dion(rank_fraction, rank=rank, mu=mu,
                                     eps=eps, seed=seed),
                orthax.scale_by_shape("spectral"),  # sqrt(fan_out / fan_in)
                optax.add_decayed_weights(weight_decay),
                optax.scale_by_learning_rate(learning_rate))

  (the decay cautious with ``cautious_weight_decay``); the other leaves
  AdamW (:func:`orthax.muon` describes the routing). Dion's buffer replaces
  the momentum, and one power iteration with QR replaces Newton–Schulz, so
  Muon's momentum and polar keywords do not apply. Under FSDP sharding the
  devices exchange only the low-rank factors (:func:`orthax.scale_by_dion`).

  The defaults are the official ``dion.py``'s (``microsoft/dion@0a059a4``,
  class ``Dion``): learning rate 0.01, ``mu = 0.95``, decay 0.01, ``eps =
  1e-8``, ``rank_fraction = 1`` and AdamW betas ``(0.9, 0.95)`` for the
  other leaves. Its 160M GPT config (``configs/dion_160m.yaml``) trains
  with a learning rate of 0.02 and ``rank_fraction = 0.5``; its README
  finds 0.25 nearly as good as full rank at 3B parameters.

  Args:
    learning_rate: step size (float or schedule) of the hidden matrices,
      multiplied by ``sqrt(fan_out / fan_in)``, and of AdamW unless
      ``adam_learning_rate`` is given.
    rank_fraction: each matrix's rank ``r = ceil(rank_fraction *
      min(fan_in, fan_out))``, in ``(0, 1]``.
    rank: an explicit rank for every matrix (capped at ``min(fan_in,
      fan_out)``) instead of ``rank_fraction``.
    mu: the share of the captured low-rank part kept in the error-feedback
      buffer, in ``[0, 1]``.
    eps: added to the column norms, relative to the buffer's largest
      entry, ``>= 0``.
    seed: integer seed of the initial factors ``Q_0``.{shared_args}

{returns}
  Example:
    {example: dion(learning_rate=0.01, rank_fraction=0.25)}

  References:
    K. Ahn, B. Xu, N. Abreu, Y. Fan, G. Magakyan, P. Sharma, Z. Zhan,
    J. Langford, Dion: Distributed Orthonormalized Updates, 2025,
    arXiv:2504.05295, github.com/microsoft/dion
  """
  return _descent("orthax.dion", learning_rate, shared, lambda dims: [
      scale_by_dion(rank_fraction, rank=rank, mu=mu, eps=eps, seed=seed,
                    dimension_numbers=dims),
      scale_by_shape("spectral", dimension_numbers=dims)])


# Moonlight's Muon (MoonshotAI/Moonlight@abaa96e, examples/toy_train.py,
# class Muon), which Kimi K2 trains with: Jordan's quintic for 5 steps, the
# 0.2 * sqrt(max(A, B)) scale, decay 0.1 on every leaf, AdamW betas
# (0.9, 0.95) at the same learning rate.
_MUON_CLIP_DEFAULTS = dict(coeffs="muon", shape_scale="rms", weight_decay=0.1,
                           adam_b2=0.95, adam_weight_decay=0.1)


@_ready(_MOMENTUM_ARGS, _POLAR_ARGS, _DESCENT_ARGS, _ROUTING_ARGS,
        _ADAMW_ARGS, defaults=_MUON_CLIP_DEFAULTS)
def muon_clip(learning_rate: optax.ScalarOrSchedule, *,
              threshold: float = 100.0, alpha: float = 0.5,
              roles: Any = None, head_axis: int = -1,
              shared: types.SimpleNamespace
              ) -> optax.GradientTransformationExtraArgs:
  """MuonClip: Moonlight's Muon, then QK-clip on the attention heads whose
  logits grew past ``threshold``.

  The update is::

    optax.chain(
        orthax.muon(learning_rate, ...),   # the chain and routing below
        orthax.qk_clip(threshold, alpha=alpha, roles=roles,
                       head_axis=head_axis))

  where hidden matrices get::

    optax.chain(orthax.momentum(beta, nesterov=True),
                orthax.orthogonalize(coeffs="muon"),
                orthax.scale_by_shape("rms", rms=0.2),  # 0.2 sqrt(max(m, n))
                optax.add_decayed_weights(weight_decay),
                optax.scale_by_learning_rate(learning_rate))

  and the other leaves AdamW (:func:`orthax.muon` describes the routing).
  :func:`orthax.qk_clip` comes last, on the whole tree, so that it rescales
  the post-update query and key weights (kernels and biases, whichever
  optimizer moved them): ``update`` needs the params and
  ``max_logits=``, the per-head max attention logits of the forward pass
  at the params (:func:`orthax.qk_clip` says how they are matched to the
  projections).

  No code from Kimi K2's authors is public; its report (Section 2.1,
  Algorithm 1) clips at ``threshold = 100`` with ``alpha = 1/2`` and trains
  with Moonlight's Muon, whose code gives the other defaults
  (MoonshotAI/Moonlight@abaa96e, ``examples/toy_train.py``, class ``Muon``):
  momentum 0.95 with Nesterov, 5 steps of Jordan's quintic, the update
  scaled by ``0.2 * sqrt(max(fan_in, fan_out))`` (``shape_scale="rms"``),
  decay 0.1 (multiplied by the learning rate) on the hidden matrices and
  the AdamW leaves alike, AdamW betas (0.9, 0.95) and eps 1e-8 at the same
  learning rate (1e-3 there). Moonlight's momentum is a sum, ``M = mu M +
  G``, with the Nesterov step ``G + mu M``; :func:`orthax.momentum`'s is an
  average, ``(1 - mu)`` times it at every step, a factor the
  orthogonalization discards (up to the relative ``eps``), so the updates
  are the same.

  Args:
    learning_rate: step size (float or schedule) of the hidden matrices,
      multiplied by ``0.2 * sqrt(max(fan_in, fan_out))``, and of AdamW
      unless ``adam_learning_rate`` is given.
    threshold, alpha, roles, head_axis: see :func:`orthax.qk_clip`.{shared_args}

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`: a chain of Muon's
    ``optax.partition`` (with ``lr_multipliers``, the chain of it and
    :func:`orthax.scale_by_multipliers`) and :func:`orthax.qk_clip`, whose
    state counts the heads clipped at the last step.
{raises}
  Example:
    >>> import jax, jax.numpy as jnp, optax, orthax
    >>> q, k = jax.random.normal(jax.random.key(0), (2, 16, 16))
    >>> params = {'attn': {'query': {'kernel': q}, 'key': {'kernel': k}},
    ...           'b': jnp.zeros(16)}
    >>> opt = orthax.muon_clip(learning_rate=1e-3, threshold=100.0)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> logits = {'attn': {'max_logits': jnp.array([150.0, 20.0])}}  # 2 heads
    >>> updates, state = opt.update(grads, opt.init(params), params,
    ...                             max_logits=logits)
    >>> params = optax.apply_updates(params, updates)

  References:
    Kimi Team, Kimi K2: Open Agentic Intelligence, 2025, arXiv:2507.20534;
    J. Liu et al., Muon is Scalable for LLM Training (Moonlight), 2025,
    arXiv:2502.16982, github.com/MoonshotAI/Moonlight
  """
  clip = qk_clip(threshold, alpha=alpha, roles=roles, head_axis=head_axis)
  return optax.chain(
      _descent("orthax.muon_clip", learning_rate, shared, lambda dims: [
          _momentum(shared), _orthogonalize(shared, dims),
          _shape(shared, dims)]),
      clip)


@_ready(_MOMENTUM_ARGS, _DECAY_ARGS, _MULTIPLIER_ARGS, _ROUTING_ARGS,
        _ADAMW_ARGS, defaults=dict(nesterov=False, adam_b2=0.95))
def aro(learning_rate: optax.ScalarOrSchedule, *, base: Any = "sinkhorn",
        side: Any = "smaller", sinkhorn_iters: int = 5,
        base_eps: float = 1e-8, target_rms: float = 0.2,
        shared: types.SimpleNamespace) -> optax.GradientTransformation:
  """ARO: the momentum, Sinkhorn-normalized in an adaptively rotated frame.

  Hidden matrices get::

    optax.chain(orthax.momentum(beta, nesterov=False),
                orthax.adaptive_rotate(base, side=side),
                orthax.scale_to_rms(target_rms),
                optax.add_decayed_weights(weight_decay),
                optax.scale_by_learning_rate(learning_rate))

  and the other leaves AdamW. :func:`orthax.adaptive_rotate` keeps one
  rotation ``R`` per matrix (``s × s`` for its rotated side ``s``, float32)
  and returns ``D = R f(R^T M)`` with ``R`` re-fitted to the momentum ``M``
  every step by a QR factorization; with Sinkhorn's ``f`` every matrix's
  ``D`` has entries of RMS 1, so the step's RMS is ``target_rms`` times the
  learning rate: the paper's benchmarking protocol (update RMS 0.2, as
  AdamW's), under which AdamW's learning rate and decay carry over.

  No code from the paper's authors was found; the defaults are those of
  J. Langford's implementation (microsoft/dion@9c6b30d, branch ``dev/aro``,
  ``dion/aro.py``, lines 58-64): momentum 0.95 without Nesterov (line 196),
  Sinkhorn with 5 passes, norms clamped at 1e-8, decay 0.01 (multiplied by
  the learning rate), AdamW betas (0.9, 0.95) for the other leaves, and a
  learning rate of 0.01. That code scales the step by Moonlight's
  ``0.2 * sqrt(max(fan_in, fan_out))`` (``adjust_lr="rms_norm"``), which
  assumes an orthogonal ``D`` of entries ``1 / sqrt(max)``; ARO's ``D`` has
  entries of RMS 1 already, so there the step's RMS is ``0.2 * sqrt(max)``
  times the learning rate (55 times Muon's at 768×3072). To reproduce it,
  build the chain above with ``orthax.scale_by_shape("rms", rms=0.2)`` in
  place of ``scale_to_rms``, and ``side="output"`` (Langford rotates
  torch's rows). Its 0.01 is a rate for that scale; here, where the step
  RMS is ``0.2 * learning_rate``, start from AdamW's rate.

  The default ``side="smaller"`` rotates the residual stream's side of a
  transformer's matrices (the paper's orientation) and is the numerically
  sound one (:func:`orthax.adaptive_rotate` explains both).

  Args:
    learning_rate: step size of the hidden matrices (float or schedule).
    base: the base optimizer in the rotated frame: ``"sinkhorn"``,
      ``"row_norm"``, ``"sign"`` or a callable.
    side: the rotated side: ``"smaller"``, ``"input"``, ``"output"``, a
      tree of them (a prefix of the params) or a callable returning one.
    sinkhorn_iters: Sinkhorn passes, ``>= 1``.
    base_eps: the base's norm clamp, relative to each matrix's largest
      entry, ``> 0``.
    target_rms: the RMS of each matrix's step per unit learning rate,
      ``> 0`` (:func:`orthax.scale_to_rms`).{shared_args}

{returns}
  Example:
    {example: aro(learning_rate=3e-3)}

  References:
    W. Gong, J. Zazo, Q. Luo, X. Wang, J. Hensman, C. Ma, ARO: Adaptively
    Rotated Optimization, 2026, arXiv:2602.09006; J. Langford's
    implementation, github.com/microsoft/dion, branch dev/aro, dion/aro.py
  """
  return _descent("orthax.aro", learning_rate, shared, lambda dims: [
      _momentum(shared),
      adaptive_rotate(base, sinkhorn_iters=sinkhorn_iters, side=side,
                      eps=base_eps, dimension_numbers=dims),
      scale_to_rms(target_rms, dimension_numbers=dims)])


# The official AdamW settings for the other parameters (Sphere-AI-Lab/poet
# @3a34bb6: config.py base_lr 1e-3 and weight_decay 0.0, optim/adamw.py eps
# 1e-6 and betas (0.9, 0.999)).
_POET_DEFAULTS = dict(adam_learning_rate=1e-3, adam_eps=1e-6)


@_ready(_ROUTING_ARGS, _ADAMW_ARGS, defaults=_POET_DEFAULTS)
def poet(learning_rate: optax.ScalarOrSchedule, *,
         block_size: int | None = 256, merge_every: int = 200,
         b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-6, lr_scale: float = 0.5, neumann: str = "triton",
         seed: int = 0,
         shared: types.SimpleNamespace) -> optax.GradientTransformation:
  """POET-X: hidden matrices trained as block-stochastic rotations of their
  last merged value, AdamW for the rest.

  Hidden matrices (routed as by :func:`orthax.muon`; the output head goes
  to AdamW, as the official ``exclude_modules=["lm_head"]``) get::

    orthax.block_stochastic_rotate(
        learning_rate, block_size=block_size, merge_every=merge_every,
        b1=b1, b2=b2, eps=eps, lr_scale=lr_scale, neumann=neumann,
        seed=seed)

  and the other leaves ``optax.adamw(adam_learning_rate, b1=adam_b1,
  b2=adam_b2, eps=adam_eps, weight_decay=adam_weight_decay)``, together an
  ``optax.partition``. The learning rate is applied inside the rotation
  (an Adam step on the generators), so nothing scales the matrices' update
  after it, and there is no weight decay or learning-rate multiplier for
  them: either would move the weights off ``R W_0 P`` (the next step puts
  them back). ``update`` needs the params.

  The defaults are the official code's (github.com/Sphere-AI-Lab/poet at
  3a34bb6, ``poet_torch/config.py`` and ``optim/adamw.py``): blocks of 256,
  a merge every 200 steps, ``poet_lr`` 5e-4 (pass it as ``learning_rate``)
  times ``poet_scale`` 0.5, Adam betas (0.9, 0.999) and eps 1e-6, and AdamW
  at 1e-3 with no weight decay for the other parameters. Where a side of a
  matrix is smaller than 256 (small models) it is one block; a side that
  256 does not divide uses its largest divisor below 256
  (:func:`orthax.block_stochastic_rotate`). The official ``POETAdamW`` adds
  eps to the uncorrected ``sqrt(v)`` of every group; the rotation does the
  same, while ``optax.adamw`` (the other leaves) adds it to the
  bias-corrected one: the official step on those leaves is optax's with eps
  replaced by ``eps / sqrt(1 - adam_b2^t)``, which differs only while
  ``sqrt(v)`` is within a few eps.

  Args:
    learning_rate: POET's learning rate (float or schedule) for the
      generators; each Adam step on them is ``learning_rate * lr_scale``.
    block_size, merge_every, b1, b2, eps, lr_scale, neumann, seed: see
      :func:`orthax.block_stochastic_rotate`.{shared_args}

{returns}
  Example:
    {example: poet(learning_rate=5e-4)}

  References:
    Qiu, Buchholz, Xiao, Dax, Schölkopf, Liu, Reparameterized LLM Training
    via Orthogonal Equivalence Transformation, NeurIPS 2025,
    arXiv:2506.08001; Qiu, Liu, Weller, Shi, Liu, POET-X: Memory-efficient
    LLM Training by Scaling Orthogonal Transformation, ICML 2026,
    arXiv:2603.05500; github.com/Sphere-AI-Lab/poet
  """
  return _with_adamw(
      lambda dims: block_stochastic_rotate(
          learning_rate, block_size=block_size, merge_every=merge_every,
          b1=b1, b2=b2, eps=eps, lr_scale=lr_scale, neumann=neumann,
          seed=seed, dimension_numbers=dims),
      name="orthax.poet", learning_rate=learning_rate, mu_dtype=None,
      **_values(shared, _ROUTING_ARGS, _ADAMW_ARGS))


@_ready(_MOMENTUM_ARGS, _POLAR_ARGS, _DESCENT_ARGS, _ROUTING_ARGS,
        _ADAMW_ARGS, defaults=dict(nesterov=False))
def fismo(learning_rate: optax.ScalarOrSchedule, *, gamma: float = 0.95,
          damping: float = 0.01, root_eps: float = 0.0,
          update_every: int = 1, side_order: str = "output_first",
          shared: types.SimpleNamespace) -> optax.GradientTransformation:
  """FISMO (EXPERIMENTAL): Muon's orthogonalized momentum in the geometry
  of a Kronecker-factored Fisher metric, for hidden matrices; AdamW for the
  rest.

  Hidden matrices get::

    optax.chain(
        orthax.kronecker_whiten(
            optax.chain(orthax.momentum(beta, nesterov=False),
                        orthax.orthogonalize(coeffs=coeffs, ...)),
            gamma=gamma, damping=damping, eps=root_eps,
            update_every=update_every, side_order=side_order),
        orthax.scale_by_shape("muon"),  # sqrt(max(1, fan_out / fan_in))
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate))

  (the decay cautious with ``cautious_weight_decay``); the other leaves
  AdamW (:func:`orthax.muon` describes the routing). Each matrix's step is
  ``A^(-1/2) polar(M) B^(-1/2)``, ``M`` the momentum of the whitened
  gradient ``A^(-1/2) G B^(-1/2)`` and ``A``, ``B`` the factors (trace
  ``fan_in`` and ``fan_out``) that :func:`orthax.kronecker_whiten` keeps,
  with ``gamma = 1`` (factors fixed at the identity) exactly Muon without
  Nesterov. The state per matrix is twice ``fan_in^2 + fan_out^2`` floats,
  and each refresh two ``eigh``: embeddings and heads go to AdamW.

  EXPERIMENTAL: no code from the paper's authors was found, and its
  defaults are not known (the update rule comes from two secondary
  restatements of its Algorithm 1); the factors' statistic is rescaled
  before the average so that the step does not depend on the gradient's
  scale (:func:`orthax.kronecker_whiten` says how this departs from the
  published form). The defaults here are this library's choices, not the
  paper's: ``beta = 0.95`` without Nesterov (FISMO's EMA momentum, at
  Muon's decay); ``gamma = 0.95``, the decay of Shampoo/SOAP-style
  Kronecker statistics; ``damping = 0.01`` of the mean eigenvalue, which
  bounds each factor's condition number by about ``100 * lambda_max`` and
  so the step's by about the ``1e2``-``1e3`` the paper reports; a refresh
  every step, as in Algorithm 1 (raise ``update_every`` to amortize the
  ``eigh``); Muon's shape scale and the shared Newton–Schulz defaults.

  Args:
    learning_rate: step size of the hidden matrices (float or schedule),
      and of AdamW unless ``adam_learning_rate`` is given.
    gamma: decay of the factors' moving average, in ``[0, 1]``.
    damping: ``mu``, the identity added to each statistic relative to its
      mean eigenvalue, ``>= 0``.
    root_eps: relative floor of the factors' eigenvalues, ``>= 0``
      (:func:`orthax.kronecker_whiten`'s ``eps``).
    update_every: refresh the factors every this many steps, ``>= 1``.
    side_order: ``"output_first"`` or ``"input_first"``: the side whose
      factor the Gauss–Seidel refresh updates first (which one the paper
      means is unconfirmed).{shared_args}

{returns}
  Example:
    {example: fismo(learning_rate=0.02)}

  References:
    C. Xu, W. Yan, Y.-J. A. Zhang, FISMO: Fisher-Structured
    Momentum-Orthogonalized Optimizer, 2026, arXiv:2601.21750
  """
  return _descent("orthax.fismo", learning_rate, shared, lambda dims: [
      kronecker_whiten(
          optax.chain(_momentum(shared), _orthogonalize(shared, dims)),
          gamma=gamma, damping=damping, eps=root_eps,
          update_every=update_every, side_order=side_order,
          dimension_numbers=dims),
      _shape(shared, dims)])
