"""Ready optimizers: Muon, NorMuon and Pion for hidden matrices, AdamW for the rest.

Their shared keyword arguments are declared once in :mod:`orthax._ready`;
:mod:`orthax.adaptive` holds the adaptive members of Muon's family.
"""


from __future__ import annotations

import functools
import types

import jax
import optax

from orthax._ready import (_ADAMW_ARGS, _DESCENT_ARGS, _MOMENTUM_ARGS,
                           _POLAR_ARGS, _ROUTING_ARGS, _descent, _momentum,
                           _orthogonalize, _ready, _shape, _values,
                           _with_adamw)
from orthax.transforms.neuron_normalize import neuron_normalize
from orthax.transforms.rotate import spectrum_preserving_rotate, state_entries

__all__ = ["muon", "normuon", "pion"]


_MUON_FAMILY = (_MOMENTUM_ARGS, _POLAR_ARGS, _DESCENT_ARGS, _ROUTING_ARGS,
                _ADAMW_ARGS)


@_ready(*_MUON_FAMILY)
def muon(learning_rate: optax.ScalarOrSchedule, *,
         shared: types.SimpleNamespace) -> optax.GradientTransformation:
  """Muon: orthogonalized momentum for hidden matrices, AdamW for the rest.

  Hidden matrices get ``momentum -> orthogonalize -> scale_by_shape ->
  add_decayed_weights -> scale_by_learning_rate`` (the decay cautious with
  ``cautious_weight_decay``); every other leaf gets :func:`optax.adamw`
  (NAdamW with ``adam_nesterov``). ``lr_multipliers`` then scales each
  leaf's update. Which leaves are hidden matrices, and their batch,
  reduction and output axes, :func:`orthax.route` decides from the params
  (Flax metadata, structure, names: embeddings, heads, norms and biases go
  to AdamW; scanned layers and experts are stacks of matrices; conv kernels
  are ``(kh kw in, out)`` matrices); :func:`orthax.describe` shows it.
  Unlike ``optax.contrib.muon``, the momentum has no bias correction by
  default (as in Jordan's reference code); :func:`orthax.contrib.muon` has
  optax's signature and defaults.

  Args:
    learning_rate: step size of the hidden matrices, a float or an optax
      schedule (0.02 is the usual Muon value with ``shape_scale="muon"``).{shared_args}

  Returns:
    An :class:`optax.GradientTransformation` whose state is an
    ``optax.partition``'s (with ``lr_multipliers``, a chain of it and
    :func:`orthax.scale_by_multipliers`' empty state).
{raises}
  Example:
    >>> import jax.numpy as jnp, optax, orthax
    >>> params = {'embedding': jnp.zeros((100, 16)), 'w': jnp.zeros((16, 64)),
    ...           'b': jnp.zeros(64)}
    >>> opt = orthax.muon(learning_rate=0.02, adam_learning_rate=3e-3)
    >>> state = opt.init(params)
    >>> updates, state = opt.update(params, state, params)

  References:
    K. Jordan et al., Muon: An optimizer for hidden layers in neural networks,
    2024, https://kellerjordan.github.io/posts/muon/
  """
  return _descent("orthax.muon", learning_rate, shared, lambda dims: [
      _momentum(shared), _orthogonalize(shared, dims), _shape(shared, dims)])


@_ready(*_MUON_FAMILY)
def normuon(learning_rate: optax.ScalarOrSchedule, *, beta2: float = 0.95,
            neuron_eps: float = 1e-10, neuron_axis: str = "output",
            shared: types.SimpleNamespace) -> optax.GradientTransformation:
  """NorMuon: Muon with per-neuron normalization, AdamW for the rest.

  Hidden matrices get ``momentum -> orthogonalize -> neuron_normalize ->
  scale_by_shape -> add_decayed_weights -> scale_by_learning_rate``; every
  other leaf gets :func:`optax.adamw` (see :func:`orthax.muon`).

  Args:
    learning_rate: step size of the hidden matrices, a float or an optax
      schedule.
    beta2: decay of the per-neuron second moment
      (:func:`orthax.neuron_normalize`).
    neuron_eps: epsilon added to its square root.
    neuron_axis: ``"output"``, ``"input"`` or ``"larger"``.{shared_args}

  Returns:
    An :class:`optax.GradientTransformation` whose state is an
    ``optax.partition``'s (with ``lr_multipliers``, a chain of it and
    :func:`orthax.scale_by_multipliers`' empty state).
{raises}
  Example:
    >>> import jax.numpy as jnp, orthax
    >>> params = {'w': jnp.zeros((16, 64)), 'b': jnp.zeros(64)}
    >>> opt = orthax.normuon(learning_rate=0.02)
    >>> updates, state = opt.update(params, opt.init(params), params)

  References:
    Z. Li et al., NorMuon: Making Muon more efficient and scalable, 2025,
    arXiv:2510.05491
  """
  return _descent("orthax.normuon", learning_rate, shared, lambda dims: [
      _momentum(shared), _orthogonalize(shared, dims),
      neuron_normalize(beta2, neuron_eps, axis=neuron_axis,
                       dimension_numbers=dims),
      _shape(shared, dims)])


@_ready(_ROUTING_ARGS, _ADAMW_ARGS)
def pion(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    rms_scale: float = 0.2,
    max_angle: float | None = 0.5,
    expm: str = "cayley",
    sides: str = "both",
    moments_dtype=None,
    restore_every: int | None = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    mesh_axis: str | None = None,
    shared: types.SimpleNamespace,
) -> optax.GradientTransformation:
  """Pion: spectrum-preserving rotations for hidden matrices, AdamW for the rest.

  Hidden matrices (routed as by :func:`orthax.muon`) are updated by
  :func:`orthax.spectrum_preserving_rotate` (no weight decay and no
  learning-rate multipliers: either would change the spectrum that Pion
  keeps); every other leaf by :func:`optax.adamw`. ``update`` needs the
  params.

  Args:
    learning_rate: Pion's step size (float or schedule); the first-order
      update of each matrix has RMS ``learning_rate * rms_scale``, at most
      ``max_angle * RMS(W)`` (a turn of ``W`` by ``max_angle`` radians).
    b1, b2, eps, rms_scale, max_angle, expm, sides, moments_dtype,
      restore_every: see :func:`orthax.spectrum_preserving_rotate`. The
      default map, ``"cayley"``, keeps every singular value to rounding
      (under 1e-6 relative to the largest after 2000 float32 steps, at any
      weight scale); the paper's ``"taylor2"`` grows them by up to
      about ``(lr * rms_scale / RMS(W))^4 / 8`` per step, 34% over 2000
      steps at lr 0.02 for GPT-2's init std 0.02. Moments are float32 for
      16-bit params.
    mesh, mesh_axis: sharded rotation, each device whole matrices for its
      share of the FSDP-sharded parameters, with one exchange each way
      (:func:`orthax.spectrum_preserving_rotate`).{shared_args}

  Returns:
    An :class:`optax.GradientTransformation` (an ``optax.partition``).

  Example:
    >>> import jax, jax.numpy as jnp, orthax
    >>> params = {'w': jax.random.normal(jax.random.key(0), (16, 64)),
    ...           'b': jnp.zeros(64)}
    >>> opt = orthax.pion(learning_rate=0.02, adam_learning_rate=3e-3)
    >>> updates, state = opt.update(params, opt.init(params), params)

  References:
    Shi, Li, Qiu, Wen, Buchholz, Liu, Pion: a spectrum-preserving optimizer
    based on orthogonal equivalence transformation, 2026, arXiv:2605.12492
  """
  return _with_adamw(
      lambda dims: spectrum_preserving_rotate(
          learning_rate, b1=b1, b2=b2, eps=eps, rms_scale=rms_scale,
          max_angle=max_angle, expm=expm, sides=sides,
          moments_dtype=moments_dtype,
          restore_every=restore_every, dimension_numbers=dims,
          mesh=mesh, mesh_axis=mesh_axis),
      name="orthax.pion", learning_rate=learning_rate, mu_dtype=None,
      state_entries=functools.partial(state_entries, sides=sides,
                                      restore_every=restore_every),
      **_values(shared, _ROUTING_ARGS, _ADAMW_ARGS))
