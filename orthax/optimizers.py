"""Ready optimizers: orthogonalized updates for hidden matrices, AdamW for the rest."""

from __future__ import annotations

from typing import Any

import jax
import optax

from orthax.labels import ADAMW, MATRIX, LabelSpec, resolve_labels
from orthax.matrices import DimensionNumbersSpec
from orthax.transforms.momentum import momentum
from orthax.transforms.neuron_normalize import neuron_normalize
from orthax.transforms.orthogonalize import orthogonalize
from orthax.transforms.rotate import spectrum_preserving_rotate
from orthax.transforms.shape import scale_by_shape

__all__ = ["muon", "normuon", "pion"]


def _descent(matrix_tx: optax.GradientTransformation, *,
             learning_rate: optax.ScalarOrSchedule, weight_decay: float,
             weight_decay_mask: Any) -> optax.GradientTransformation:
  """``matrix_tx`` followed by decoupled weight decay and the step size."""
  return optax.chain(
      matrix_tx,
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def _with_adamw(
    matrices: optax.GradientTransformation, *,
    learning_rate: optax.ScalarOrSchedule,
    dimension_numbers: DimensionNumbersSpec,
    label_fn: LabelSpec, adam_learning_rate: optax.ScalarOrSchedule | None,
    adam_b1: float, adam_b2: float, adam_eps: float,
    adam_weight_decay: float, mu_dtype,
) -> optax.GradientTransformation:
  """Routes hidden matrices to ``matrices`` and every other leaf to AdamW."""
  adamw = optax.adamw(
      learning_rate if adam_learning_rate is None else adam_learning_rate,
      b1=adam_b1, b2=adam_b2, eps=adam_eps, weight_decay=adam_weight_decay,
      mu_dtype=mu_dtype)
  return optax.partition({MATRIX: matrices, ADAMW: adamw},
                         resolve_labels(label_fn, dimension_numbers))


_SHARED_ARGS_DOC = """
    beta: momentum decay (:func:`orthax.momentum`).
    nesterov: Nesterov momentum.
    mu_dtype: dtype of the momentum (and of AdamW's first moment, as in
      ``optax.contrib.muon``); ``None`` follows the params.
    coeffs: Newton–Schulz preset or coefficients (:func:`orthax.orthogonalize`);
      ``"muon"`` gives Jordan's original quintic.
    steps: Newton–Schulz steps; ``None`` keeps the preset's.
    gram: Gram Newton–Schulz: ``"auto"`` (where it saves FLOPs), ``True`` or
      ``False`` (:func:`orthax.orthogonalize`).
    mesh, mesh_axis: sharded orthogonalization, each device whole matrices
      for its share of the FSDP-sharded parameters
      (:func:`orthax.orthogonalize`).
    eps: Newton–Schulz normalization epsilon.
    compute_dtype: dtype of the iteration (e.g. ``jnp.bfloat16``).
    shape_scale: ``"muon"`` or ``"rms"`` (:func:`orthax.scale_by_shape`).
    weight_decay: decoupled weight decay of the hidden matrices, multiplied by
      the learning rate (optax's convention).
    weight_decay_mask: optax mask (tree or callable) restricting it.
    dimension_numbers: specs for ndim>2 leaves (:func:`orthax.orthogonalize`);
      a leaf with a spec is a hidden matrix under the default labels.
    label_fn: override of the default hidden-matrix rule (:mod:`orthax.labels`):
      a callable on the params or a tree of ``"matrix"``/``"adamw"`` (or
      booleans).
    adam_learning_rate: AdamW's learning rate (float or schedule) for the
      other leaves; ``None`` uses ``learning_rate``, as optax's Muon does.
    adam_b1, adam_b2, adam_eps: AdamW's moment decays and epsilon.
    adam_weight_decay: AdamW's decoupled weight decay (0 by default: the
      usual choice for embeddings, norms and biases)."""


def muon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    beta: float = 0.95,
    nesterov: bool = True,
    mu_dtype=None,
    coeffs: str | Any = "polar_express",
    steps: int | None = None,
    gram: bool | str = "auto",
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    mesh_axis: str | None = None,
    eps: float = 1e-7,
    compute_dtype=None,
    shape_scale: str = "muon",
    weight_decay: float = 0.01,
    weight_decay_mask: Any = None,
    dimension_numbers: DimensionNumbersSpec = None,
    label_fn: LabelSpec = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps: float = 1e-8,
    adam_weight_decay: float = 0.0,
) -> optax.GradientTransformation:
  """Muon: orthogonalized momentum for hidden matrices, AdamW for the rest.

  Hidden matrices (see :mod:`orthax.labels`) get
  ``momentum -> orthogonalize -> scale_by_shape -> add_decayed_weights ->
  scale_by_learning_rate``; every other leaf gets :func:`optax.adamw`. Unlike
  ``optax.contrib.muon``, the momentum has no bias correction (as in
  Jordan's reference code), embeddings and heads are routed to AdamW by key
  path, and leaves with more than two axes are matrices only when given
  dimension numbers.

  Args:
    learning_rate: step size of the hidden matrices, a float or an optax
      schedule (0.02 is the usual Muon value with ``shape_scale="muon"``).
  """ + _SHARED_ARGS_DOC + """

  Returns:
    An :class:`optax.GradientTransformation` (an ``optax.partition``).

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
  return _with_adamw(
      _descent(optax.chain(
          momentum(beta, nesterov=nesterov, mu_dtype=mu_dtype),
          orthogonalize(coeffs=coeffs, steps=steps, eps=eps,
                        compute_dtype=compute_dtype, gram=gram,
                        mesh=mesh, mesh_axis=mesh_axis,
                        dimension_numbers=dimension_numbers),
          scale_by_shape(shape_scale, dimension_numbers=dimension_numbers),
      ), learning_rate=learning_rate, weight_decay=weight_decay,
          weight_decay_mask=weight_decay_mask),
      learning_rate=learning_rate, dimension_numbers=dimension_numbers,
      label_fn=label_fn,
      adam_learning_rate=adam_learning_rate, adam_b1=adam_b1, adam_b2=adam_b2,
      adam_eps=adam_eps, adam_weight_decay=adam_weight_decay,
      mu_dtype=mu_dtype)


def normuon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    beta: float = 0.95,
    beta2: float = 0.95,
    neuron_eps: float = 1e-10,
    neuron_axis: str = "output",
    nesterov: bool = True,
    mu_dtype=None,
    coeffs: str | Any = "polar_express",
    steps: int | None = None,
    gram: bool | str = "auto",
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    mesh_axis: str | None = None,
    eps: float = 1e-7,
    compute_dtype=None,
    shape_scale: str = "muon",
    weight_decay: float = 0.01,
    weight_decay_mask: Any = None,
    dimension_numbers: DimensionNumbersSpec = None,
    label_fn: LabelSpec = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps: float = 1e-8,
    adam_weight_decay: float = 0.0,
) -> optax.GradientTransformation:
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
    neuron_axis: ``"output"``, ``"input"`` or ``"larger"``.
  """ + _SHARED_ARGS_DOC + """

  Returns:
    An :class:`optax.GradientTransformation` (an ``optax.partition``).

  Example:
    >>> import jax.numpy as jnp, orthax
    >>> params = {'w': jnp.zeros((16, 64)), 'b': jnp.zeros(64)}
    >>> opt = orthax.normuon(learning_rate=0.02)
    >>> updates, state = opt.update(params, opt.init(params), params)

  References:
    Z. Li et al., NorMuon: Making Muon more efficient and scalable, 2025,
    arXiv:2510.05491
  """
  return _with_adamw(
      _descent(optax.chain(
          momentum(beta, nesterov=nesterov, mu_dtype=mu_dtype),
          orthogonalize(coeffs=coeffs, steps=steps, eps=eps,
                        compute_dtype=compute_dtype, gram=gram,
                        mesh=mesh, mesh_axis=mesh_axis,
                        dimension_numbers=dimension_numbers),
          neuron_normalize(beta2, neuron_eps, axis=neuron_axis,
                           dimension_numbers=dimension_numbers),
          scale_by_shape(shape_scale, dimension_numbers=dimension_numbers),
      ), learning_rate=learning_rate, weight_decay=weight_decay,
          weight_decay_mask=weight_decay_mask),
      learning_rate=learning_rate, dimension_numbers=dimension_numbers,
      label_fn=label_fn,
      adam_learning_rate=adam_learning_rate, adam_b1=adam_b1, adam_b2=adam_b2,
      adam_eps=adam_eps, adam_weight_decay=adam_weight_decay,
      mu_dtype=mu_dtype)


def pion(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    rms_scale: float = 0.2,
    expm: str = "taylor2",
    sides: str = "both",
    moments_dtype=None,
    restore_every: int | None = None,
    dimension_numbers: DimensionNumbersSpec = None,
    label_fn: LabelSpec = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps: float = 1e-8,
    adam_weight_decay: float = 0.0,
) -> optax.GradientTransformation:
  """Pion: spectrum-preserving rotations for hidden matrices, AdamW for the rest.

  Hidden matrices (the same labels as :func:`orthax.muon`) are updated by
  :func:`orthax.spectrum_preserving_rotate` (no weight decay: it would change
  the spectrum that Pion keeps); every other leaf by :func:`optax.adamw`.
  ``update`` needs the params.

  Args:
    learning_rate: Pion's step size (float or schedule); the first-order
      update of each matrix has RMS ``learning_rate * rms_scale``.
    b1, b2, eps, rms_scale, expm, sides, moments_dtype, restore_every: see
      :func:`orthax.spectrum_preserving_rotate`.
    dimension_numbers: specs for ndim>2 leaves.
    label_fn: override of the hidden-matrix rule (:mod:`orthax.labels`).
    adam_learning_rate: AdamW's learning rate; ``None`` uses
      ``learning_rate``.
    adam_b1, adam_b2, adam_eps, adam_weight_decay: AdamW's settings.

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
      spectrum_preserving_rotate(
          learning_rate, b1=b1, b2=b2, eps=eps, rms_scale=rms_scale,
          expm=expm, sides=sides, moments_dtype=moments_dtype,
          restore_every=restore_every, dimension_numbers=dimension_numbers),
      learning_rate=learning_rate, dimension_numbers=dimension_numbers,
      label_fn=label_fn, adam_learning_rate=adam_learning_rate,
      adam_b1=adam_b1, adam_b2=adam_b2, adam_eps=adam_eps,
      adam_weight_decay=adam_weight_decay, mu_dtype=None)
