"""``orthax.contrib.muon``: ``optax.contrib.muon``'s exact signature on orthax.

Changing ``optax.contrib.muon`` to ``orthax.contrib.muon`` in an import is
the whole port: the same positional and keyword arguments, the same defaults
and the same meaning (``muon_weight_dimension_numbers`` with ``None`` for
AdamW, bias-corrected Nesterov momentum, NAdamW for the other leaves when
``nesterov=True``, optax's coefficient-table rule), and the same updates to
float32 rounding (``tests/test_contrib.py`` runs both on optax 0.2.8's
settings). What orthax adds comes by keyword, each off by default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax

from orthax import routing as routing_lib
from orthax._ready import _with_adamw
from orthax.polar.coefficients import PRESETS
from orthax.transforms.momentum import momentum
from orthax.transforms.neuron_normalize import neuron_normalize
from orthax.transforms.orthogonalize import orthogonalize
from orthax.transforms.shape import scale_by_shape

__all__ = ["muon"]

# optax.contrib.muon's presets, by optax's names: its default triple, and
# J. You's table that optax calls "dion" (orthax's "you").
_OPTAX_PRESETS = {"standard": PRESETS["muon"].coeffs[0],
                  "dion": PRESETS["you"].coeffs}
_NAME = "orthax.contrib.muon"


def _table(ns_coeffs: Any, ns_steps: Any) -> tuple[np.ndarray | str, int]:
  """optax's reading of ``(ns_coeffs, ns_steps)`` as ``(coeffs, steps)`` for
  :func:`orthax.orthogonalize`.

  One ``(a, b, c)`` triple runs ``ns_steps`` times. A ``(k, 3)`` table runs
  all ``k`` rows whatever ``ns_steps``, which must be at least ``k``
  (optax's rule; orthax's own would take the first ``ns_steps`` rows). An
  orthax preset name keeps its margin and preconditioning default.
  """
  if isinstance(ns_coeffs, str):
    if ns_coeffs in PRESETS:
      table = PRESETS[ns_coeffs].coeffs
      name = ns_coeffs
    elif ns_coeffs in _OPTAX_PRESETS:
      table, name = _OPTAX_PRESETS[ns_coeffs], None
    else:
      raise ValueError(
          f"{_NAME}: unknown ns_coeffs preset {ns_coeffs!r}; optax's are "
          f"{sorted(_OPTAX_PRESETS)}, orthax's {sorted(PRESETS)}.")
  else:
    table, name = np.asarray(ns_coeffs, np.float64), None
  if table.ndim not in (1, 2) or table.shape[-1] != 3:
    raise ValueError(f"{_NAME}: ns_coeffs must have shape (3,) or (n, 3), "
                     f"got {table.shape}.")
  if isinstance(ns_steps, (bool, np.bool_)) or not isinstance(
      ns_steps, (int, np.integer)) or ns_steps < 1:
    raise ValueError(f"{_NAME}: ns_steps must be a positive integer (a "
                     f"static one: list it in inject_hyperparams' "
                     f"static_args), got {ns_steps!r}.")
  if table.ndim == 1:
    return table, int(ns_steps)
  if table.shape[0] > ns_steps:
    raise ValueError(f"{_NAME}: ns_coeffs has {table.shape[0]} rows, more "
                     f"than ns_steps={ns_steps} (optax's rule: a table runs "
                     "all its rows, and ns_steps may not be below them).")
  return (table if name is None else name), table.shape[0]


def muon(
    learning_rate: optax.ScalarOrSchedule,
    ns_coeffs: Any = (3.4445, -4.7750, 2.0315),
    ns_steps: int = 5,
    beta: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    mu_dtype: Any = None,
    *,
    nesterov: bool = True,
    adaptive: bool = False,
    preconditioning: str = "frobenius",
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps_root: float = 0.0,
    adam_weight_decay: float = 0.0,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    muon_weight_dimension_numbers: Any = None,
    consistent_rms: float | None = None,
    gram: bool | str = False,
    backend: str = "xla",
    compute_dtype: Any = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    mesh_axis: str | None = None,
    neuron_beta2: float | None = None,
    neuron_eps: float = 1e-10,
    neuron_axis: str = "output",
    model: Any = None,
    overrides: Mapping[str, Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""``optax.contrib.muon``, argument for argument, computed by orthax.

  Hidden matrices get ``momentum (bias-corrected) -> orthogonalize ->
  scale_by_shape -> add_decayed_weights -> scale_by_learning_rate``, the
  other leaves :func:`optax.adamw` (NAdamW when ``nesterov``), exactly as in
  optax. Three deliberate differences, each where optax's numbers are an
  accident of scale or rounding:

  * ``eps`` in the Newton–Schulz normalization is relative to the matrix's
    largest entry: optax adds it to the norm, which shrinks the update of a
    gradient whose norm is near ``eps`` (below about 1e-3 in norm the two
    differ by more than 1e-5);
  * with a 16-bit ``mu_dtype`` the stored momentum is decayed in float32
    (optax multiplies it by ``beta`` in 16 bits first: the two differ by that
    rounding, about 4e-3 relative in bfloat16);
  * float16 AdamW leaves keep float32 moments (in float16 optax's divide by
    zero on the first step).

  Args:
    learning_rate: step size (float or optax schedule).
    ns_coeffs: one ``(a, b, c)`` triple, run ``ns_steps`` times; a ``(k,
      3)`` table, whose ``k`` rows all run (``ns_steps`` must be ``>= k``:
      optax's rule, unlike :func:`orthax.orthogonalize`'s); optax's preset
      names ``"standard"`` and ``"dion"``, or an orthax preset name
      (:data:`orthax.polar.PRESETS`, with its own normalization margin).
    ns_steps: Newton–Schulz steps for a triple (a static Python integer).
    beta: momentum decay.
    eps: Newton–Schulz normalization epsilon (relative, see above) and
      AdamW's epsilon.
    weight_decay: decoupled weight decay of the hidden matrices, times the
      learning rate.
    weight_decay_mask: optax mask restricting it.
    mu_dtype: dtype of the momentum and of AdamW's first moment.
    nesterov: bias-corrected (NAdam-style) Nesterov momentum for the
      matrices, NAdamW for the other leaves; ``False``: bias-corrected
      heavy-ball momentum and AdamW.
    adaptive: scale each leaf's update by ``<M, O>`` summed over the leaf
      (optax's dual-norm scaling; :func:`orthax.orthogonalize`'s
      ``adaptive="leaf"``).
    preconditioning: ``"frobenius"``, ``"spectral"``, ``"aol"`` or
      ``"schatten"`` (:func:`orthax.polar.precondition`).
    adam_b1, adam_b2, adam_eps_root, adam_weight_decay: AdamW's settings.
    adam_learning_rate: AdamW's learning rate; ``None``: ``learning_rate``.
    muon_weight_dimension_numbers: ``None`` (every 2-D leaf is a ``(0, 1)``
      matrix, every other leaf AdamW), one ``MuonDimensionNumbers`` for every
      leaf, a tree (a prefix of the params) of them with ``None`` for AdamW,
      or a callable on the params returning one. orthax's own addition:
      ``"auto"`` lets :func:`orthax.route` decide every leaf (embeddings and
      heads to AdamW, scanned and expert stacks as batches of matrices; see
      :func:`orthax.describe`).
    consistent_rms: ``None``: Jordan's shape scale ``sqrt(max(1, fan_out /
      fan_in))``; a float ``r > 0``: ``r * sqrt(max(fan_in, fan_out))``
      (Moonlight; :func:`orthax.scale_by_shape`'s ``"rms"`` mode).
    gram: orthax's Gram Newton–Schulz (:func:`orthax.orthogonalize`):
      ``False`` by default here, so the numbers are optax's to 1e-5;
      ``"auto"`` (orthax's default) saves FLOPs on rectangular matrices at a
      float32 difference of about 3e-5.
    backend, compute_dtype, mesh, mesh_axis: as in
      :func:`orthax.orthogonalize` (``backend="xla"``: the plain XLA
      iteration; ``mesh``: each device orthogonalizes whole matrices).
      (No integer beyond optax's ``ns_steps`` is added: under
      ``optax.inject_hyperparams`` every integer argument becomes an array,
      and ``ns_steps`` is already the one that must be in ``static_args``.)
    neuron_beta2: ``None``: Muon. A float: NorMuon, with
      :func:`orthax.neuron_normalize` (second-moment decay ``neuron_beta2``,
      ``neuron_eps``, ``neuron_axis``) after the orthogonalization.
    neuron_eps, neuron_axis: see ``neuron_beta2``.
    model: the Flax NNX module, for ``muon_weight_dimension_numbers="auto"``.
    overrides: ``{path pattern: route}`` on top of the routing
      (:func:`orthax.route`), with any ``muon_weight_dimension_numbers``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`, an ``optax.partition``
    of the matrices and the AdamW leaves under optax's labels (``"muon"``,
    ``"adam"``), with the momentum state first in the matrices' chain as in
    optax (``state.inner_states["muon"].inner_state[0].mu``); the chains
    behind them are orthax's, so a checkpoint of one is not a checkpoint of
    the other.

  Raises:
    ValueError: an unknown preset or preconditioning, a coefficient table
      with more rows than ``ns_steps``, ``consistent_rms <= 0`` or another
      hyperparameter out of range (at construction); at update time, a
      leaf that is not a matrix under its dimension numbers, named by its
      key path.
    TypeError: a complex or integer leaf (orthax is real-valued), named by
      its key path.

  Example:
    >>> import jax.numpy as jnp, orthax
    >>> from orthax.contrib import muon  # was: from optax.contrib import muon
    >>> params = {'w': jnp.ones((4, 8)), 'b': jnp.zeros(8)}
    >>> opt = muon(learning_rate=0.02, weight_decay=0.01)
    >>> updates, state = opt.update(params, opt.init(params), params)

  References:
    optax.contrib.muon (optax 0.2.8), https://optax.readthedocs.io

    K. Jordan et al., Muon: An optimizer for hidden layers in neural networks,
    2024, https://kellerjordan.github.io/posts/muon/

    J. Liu et al., Muon is Scalable for LLM Training, 2025, arXiv:2502.16982

    T. Boissin et al., Turbo-Muon: Accelerating Orthogonality-Based
    Optimization with Pre-Conditioning, 2025, arXiv:2512.04632
  """
  coeffs, steps = _table(ns_coeffs, ns_steps)
  if isinstance(muon_weight_dimension_numbers, str):
    if muon_weight_dimension_numbers != "auto":
      raise ValueError(
          f"{_NAME}: muon_weight_dimension_numbers must be None, 'auto', a "
          "MuonDimensionNumbers, a tree of them or a callable, got "
          f"{muon_weight_dimension_numbers!r}.")
    routing = None
  else:
    if model is not None:
      raise ValueError(f"{_NAME}: model= is read only with "
                       "muon_weight_dimension_numbers='auto'.")
    routing = routing_lib.from_optax(muon_weight_dimension_numbers)
  if consistent_rms is None:
    shape = lambda dims: scale_by_shape("muon", dimension_numbers=dims)
  else:
    shape = lambda dims: scale_by_shape("rms", rms=consistent_rms,
                                        dimension_numbers=dims)

  def matrices(dims):
    return optax.chain(
        momentum(beta, nesterov=nesterov, bias_correction=True,
                 mu_dtype=mu_dtype),
        orthogonalize(coeffs=coeffs, steps=steps, eps=eps,
                      preconditioning=preconditioning,
                      adaptive="leaf" if adaptive else False,
                      compute_dtype=compute_dtype, dimension_numbers=dims,
                      backend=backend, gram=gram,
                      mesh=mesh, mesh_axis=mesh_axis),
        *(() if neuron_beta2 is None else (neuron_normalize(
            neuron_beta2, neuron_eps, axis=neuron_axis,
            dimension_numbers=dims),)),
        shape(dims),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )

  return _with_adamw(
      matrices, name=_NAME, learning_rate=learning_rate, model=model,
      routing=routing, overrides=overrides,
      adam_learning_rate=adam_learning_rate, adam_b1=adam_b1,
      adam_b2=adam_b2, adam_eps=eps, adam_eps_root=adam_eps_root,
      adam_weight_decay=adam_weight_decay, adam_nesterov=nesterov,
      mu_dtype=mu_dtype, labels=("muon", "adam"))

