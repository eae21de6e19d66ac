"""``orthax.orthogonalize``: the polar factor of every matrix leaf."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from orthax._checks import check_hyperparameter, check_number
from orthax.matrices import DimensionNumbersSpec, MatrixView, matrix_views
from orthax.polar.coefficients import (ShapeCoefficients, get_preset,
                                       resolve_coefficients,
                                       shape_coefficients, shape_key)
from orthax.polar.newton_schulz import PRECONDITIONINGS, newton_schulz
from orthax.polar.reference import polar_svd
from orthax.sharded import replicated, resolve_mesh, sharded_polar

__all__ = ["orthogonalize"]

_BACKENDS = ("auto", "xla", "pallas")
_ADAPTIVE = (False, True, "leaf")


def _stacked(polar: Callable[[jax.Array], jax.Array],
             views: list[MatrixView], leaves: list[jax.Array]) -> list[jax.Array]:
  """Applies ``polar`` to every leaf's matrices, one call per shape group.

  Each leaf becomes its ``(batch, fan_in, fan_out)`` stack, tall stacks are
  transposed to wide, and stacks of equal ``(rows, cols, dtype)`` are
  concatenated along the batch axis. The polar factor commutes with the
  transpose and acts on each matrix on its own, so the result equals the
  leaf-by-leaf one.
  """
  wide = []
  for view, x in zip(views, leaves):
    m = view.to_matrices(x)
    tall = view.fan_in > view.fan_out
    wide.append((jnp.swapaxes(m, -1, -2) if tall else m, tall))
  groups: dict[tuple, list[int]] = {}
  for i, (m, _) in enumerate(wide):
    groups.setdefault((m.shape[1:], m.dtype), []).append(i)
  out: list[Any] = [None] * len(leaves)
  for members in groups.values():
    result = polar(jnp.concatenate([wide[i][0] for i in members]))
    offsets = np.cumsum([0] + [wide[i][0].shape[0] for i in members])
    for i, start, stop in zip(members, offsets[:-1], offsets[1:]):
      q = result[start:stop]
      q = jnp.swapaxes(q, -1, -2) if wide[i][1] else q
      out[i] = views[i].from_matrices(q)
  return out


def _describe(coeffs: Any) -> str:
  if isinstance(coeffs, str):
    return repr(coeffs)
  if coeffs.shape == (3,):
    return "(" + ", ".join(f"{c:g}" for c in coeffs) + ")"
  return f"a ({coeffs.shape[0]}, 3) table"


def _report_fallback(table: ShapeCoefficients,
                     views: list[MatrixView]) -> None:
  """Warns about the matrices whose shape ``table`` lacks, by shape and leaf
  (a table made for some shapes silently running other coefficients on the
  rest would be a surprise)."""
  missing: dict[tuple[int, int], list[str]] = {}
  for view in views:
    key = shape_key((view.fan_in, view.fan_out))
    if key not in table.table:
      missing.setdefault(key, []).append(view.path)
  if missing:
    name = ("the by_shape table" if table.name is None
            else f"the {table.name!r} table")
    shapes = "; ".join(f"{k} ({', '.join(paths)})"
                       for k, paths in missing.items())
    warnings.warn(
        f"orthax.orthogonalize: {name} has no Newton-Schulz coefficients for "
        f"matrices of shape (short, long) {shapes}; they run its default "
        f"{_describe(table.default)}. Its shapes: {sorted(table.table)}.",
        stacklevel=3)


def _dual_norm_scaled(view: MatrixView, g: jax.Array, o: jax.Array, *,
                      per_leaf: bool) -> jax.Array:
  """``<G, O> O`` per matrix of the leaf (or with one sum over the leaf),
  accumulated in float32 or wider and returned in ``o``'s dtype."""
  acc = jnp.promote_types(o.dtype, jnp.float32)
  if per_leaf:
    return (jnp.sum(g.astype(acc) * o.astype(acc)) * o).astype(o.dtype)
  gm, om = view.to_matrices(g).astype(acc), view.to_matrices(o).astype(acc)
  dual = jnp.sum(gm * om, axis=(-2, -1), keepdims=True)
  return view.from_matrices((dual * om).astype(o.dtype))


def orthogonalize(
    *,
    coeffs: str | Any = "polar_express",
    steps: int | None = None,
    preconditioning: str | None = None,
    norm_margin: float | None = None,
    eps: float = 1e-7,
    adaptive: bool | str = False,
    compute_dtype=None,
    dimension_numbers: DimensionNumbersSpec = None,
    backend: str = "auto",
    gram: bool | str = "auto",
    gram_restart: int | None = 2,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    mesh_axis: str | None = None,
) -> optax.GradientTransformation:
  r"""Replaces each matrix leaf by (an approximation of) its polar factor.

  For a matrix :math:`G = U S V^\top` the polar factor is :math:`U V^\top`:
  the same singular vectors, every non-zero singular value set to 1. The
  default runs Newton–Schulz (see :func:`orthax.polar.newton_schulz`): the
  matrix is divided by its Frobenius norm, then five odd quintics push its
  singular values towards 1. The default ``"polar_express"`` coefficients
  leave them within 0.14 of 1 where Jordan's ``"muon"`` quintic (optax's
  default) leaves them within 0.47, at the same cost (``benchmarks/
  orthogonalize.py``, gradients with a decaying spectrum); ``"svd"`` computes
  the exact factor (a reference, costly beyond small matrices).

  Rectangular matrices whose long side is more than 1.5 times the short one
  (a transformer's QKV and MLP matrices) run Gram Newton–Schulz by default,
  which does the same steps in fewer FLOPs: on one GPT-2-small layer the
  default takes 0.70× the time of optax's Newton–Schulz at its best
  (``lax.scan`` path) on 2 CPU cores, with the better quality above
  (``benchmarks/orthogonalize.py``).

  Tall matrices are iterated through their transpose, so the Gram products
  are ``min(fan_in, fan_out)`` square; matrices of the same shape (a tall
  one joins its transpose's group) and dtype, across leaves and batch axes,
  run as one stacked batch, so a model's many same-shape layers cost one
  call rather than one each. A zero matrix maps to zero (never NaN, and
  with a finite derivative), a leaf with a side of 0 to an empty update;
  NaN or Inf in the input gives NaN out: wrap the optimizer in
  :func:`optax.apply_if_finite` to skip such steps.

  Args:
    coeffs: a preset name (``"muon"``, ``"polar_express"``, ``"you"``; see
      :data:`orthax.polar.PRESETS`), ``"svd"`` for the exact polar factor, one
      ``(a, b, c)`` triple used at every step, an array of shape
      ``(steps, 3)``, or coefficients keyed by matrix shape: an
      :func:`orthax.polar.by_shape` table or ``"root"`` (ROOT's four
      quintics, each repeated at every step, for its toy model's ``(short,
      long)`` shapes ``(2048, 2048)``, ``(2048, 3072)``, ``(2048, 8192)`` and
      ``(2048, 16384)``, and Jordan's quintic, repeated, for every other
      shape; :data:`orthax.polar.SHAPE_PRESETS`). A table's shapes not in it
      run its default, and the update warns about them (naming the shapes
      and leaves) when it is traced. ROOT's code divides by ``||G||_F +
      1e-7``, an absolute ``eps``: orthax's ``eps`` is relative (below),
      which differs only for gradients of norm near ``1e-7``.
    steps: number of Newton–Schulz steps, a positive integer (Python or
      NumPy); ``None`` keeps the preset's own (5 for every built-in preset).
      A per-step table runs its first ``steps`` rows and, past its end, the
      classical quintic that converges to the polar factor
      (:func:`orthax.polar.resolve_coefficients`). optax differs:
      ``optax.contrib.muon`` runs every row of a table and rejects
      ``ns_steps`` below its length; :func:`orthax.contrib.muon` keeps
      optax's rule.
    preconditioning: how each matrix is scaled before the first step
      (:func:`orthax.polar.precondition`): ``"frobenius"`` (divide by
      ``norm_margin * ||G||_F + eps * max|G|``), ``"spectral"`` (the
      spectral norm, by an SVD: costly), ``"schatten"`` (the Schatten-4
      norm, from the first step's Gram matrix: free, and tighter than
      Frobenius) or ``"aol"`` (Turbo-Muon's row scaling, free too; it
      orthogonalizes ``D G`` rather than ``G``). ``None``: the preset's own
      (``"frobenius"`` for every built-in preset and for explicit
      coefficients). The tighter scalings do not let a step go: on
      gradients with decaying spectra the kept singular values span about
      700×, and 4 quintics designed for the interval AOL gives still leave
      them 0.51 from 1, against the default's 0.14 in 5 (BUILD.md,
      ``benchmarks/coefficient_design.py``).
    norm_margin: the norm above is multiplied by it, ``>= 1`` in practice
      (room for rounding); ``None``: the preset's own (1.02 for
      ``"polar_express"``, the input margin of its paper), 1.0 for explicit
      coefficients.
    eps: ``>= 0``, relative to the matrix's largest entry
      (:func:`orthax.polar.frobenius_normalize`), so the result does not
      depend on the gradient's scale: ``1e20 * G`` and ``1e-12 * G`` give the
      update of ``G``. A zero matrix maps to zero whatever ``eps``. (optax's
      ``eps`` is absolute: it shrinks gradients whose norm is near ``eps``,
      where orthax does not.)
    adaptive: scale each result ``O`` by ``<G, O>``, the dual (nuclear) norm
      of the input ``G`` that the spectral-norm steepest-descent step has
      (Bernstein & Newhouse 2024): ``True`` per matrix; ``"leaf"`` one
      scalar per leaf, summed over its batch axes as ``optax.contrib.muon``
      (``adaptive=True``) does; ``False`` (default) not at all.
    compute_dtype: dtype of the iteration (``jnp.bfloat16`` halves the cost on
      accelerators); ``None`` uses each leaf's dtype. Updates are returned in
      their input dtype.
    dimension_numbers: ``None`` (every leaf must be 2-D ``(fan_in,
      fan_out)``), an :class:`orthax.MuonDimensionNumbers`, a tree of them
      (``None`` entries meaning 2-D) that is a prefix of the updates, or a
      callable on the updates returning such a tree. Axes that are neither
      reduction nor output axes are batch axes: each slice is orthogonalized
      on its own.
    backend: ``"xla"`` (the iteration as XLA matmuls), ``"pallas"`` (the
      same iteration on the fused kernels of :mod:`orthax.kernels`;
      interpreted, slowly, on CPU) or ``"auto"``, which picks the kernels
      exactly for the device kinds, dtypes, paths and shapes where
      ``benchmarks/device.py`` measured them faster
      (:mod:`orthax.polar.auto_backend`); none has been measured yet, so it
      runs XLA everywhere (BUILD.md, "Pallas kernels").
    gram: Gram Newton–Schulz (see :func:`orthax.polar.newton_schulz`): the
      same polynomial, iterated on the small Gram matrix and applied to the
      matrix once (with a restart in bf16). ``"auto"`` uses it where it takes
      fewer FLOPs (long side > 1.5 × short side); ``True`` everywhere,
      ``False`` nowhere (``np.bool_`` is accepted).
    gram_restart: Gram steps before the restart that bounds rounding, a
      positive integer (``None``: no restart; 0.6× instead of 0.7× of optax's time on a GPT-2
      layer, at a float32 error of 1.6e-3 instead of 3e-5; see
      :func:`orthax.polar.newton_schulz`).
    mesh: the device mesh the parameters are sharded over; ``None`` with a
      ``mesh_axis`` uses the one set with ``jax.set_mesh``. Both ``None``:
      the mesh axis that the leaves' own ``Explicit`` shardings use (the one
      sharding matrix axes of the most elements; ``jax.make_mesh``'s default
      axes are ``Explicit``), else unsharded, even under ``jax.set_mesh``.
      With a mesh, each device orthogonalizes whole matrices for its share of
      them (see :mod:`orthax.sharded`): one ``all_to_all`` gathers whole
      matrices, the same iteration runs locally, and one ``all_to_all``
      returns the results in the leaves' own shardings; other mesh axes
      (e.g. tensor parallel) are gathered first. Leaves not sharded along a
      matrix axis over ``mesh_axis`` are orthogonalized where they are. The
      sharded path's program does not grow with the number of matrices
      (``benchmarks/sharded.py`` measures its compile time). On the
      unsharded path, leaves with ``Explicit`` shardings are gathered for
      the iteration and returned in their shardings.
    mesh_axis: the mesh axis that shards the parameters (FSDP); may be
      omitted for a one-axis mesh. Under ``Explicit`` axes the leaves' layout
      is read from their types; under ``Auto`` axes it cannot be seen while
      tracing, and the largest matrix axis that the mesh axis divides is
      assumed (XLA reshards if the leaf is laid out otherwise).

  Returns:
    A stateless :class:`optax.GradientTransformation`.

  Raises:
    ValueError: unknown preset, backend, preconditioning or adaptive mode,
      ``norm_margin <= 0``, preconditioning with ``coeffs="svd"``, bad
      coefficient
      shape, ``steps`` or ``gram_restart`` below 1, ``eps < 0``; at update
      time, a leaf that is not a matrix under its dimension numbers (the
      message names its key path and shape).
    TypeError: ``steps`` or ``gram_restart`` not an integer, ``eps`` not a
      real number; at update time, a leaf whose dtype is not float16,
      bfloat16, float32 or float64, or dimension numbers whose axes are not
      integers.

  Example:
    >>> import jax, jax.numpy as jnp, optax, orthax
    >>> tx = optax.chain(orthax.momentum(), orthax.orthogonalize(),
    ...                  orthax.scale_by_shape(), optax.scale(-0.02))
    >>> params = {'w': jnp.ones((64, 128))}
    >>> g = {'w': jax.random.normal(jax.random.key(0), (64, 128))}
    >>> updates, _ = tx.update(g, tx.init(params))

  References:
    K. Jordan et al., Muon: An optimizer for hidden layers in neural networks,
    2024, https://kellerjordan.github.io/posts/muon/

    N. Amsel et al., The Polar Express: Optimal Matrix Sign Methods and Their
    Application to the Muon Algorithm, 2025, arXiv:2505.16932

    T. Boissin et al., Turbo-Muon: Accelerating Orthogonality-Based
    Optimization with Pre-Conditioning, 2025, arXiv:2512.04632

    E. Grishina et al., Accelerating Newton-Schulz Iteration for
    Orthogonalization via Chebyshev-type Polynomials, 2025, arXiv:2506.10935

    J. Bernstein, L. Newhouse, Old Optimizer, New Norm: An Anthology, 2024,
    arXiv:2409.20325
  """
  if backend not in _BACKENDS:
    raise ValueError(
        f"Unknown orthogonalization backend {backend!r}; expected one of "
        f"{_BACKENDS}.")
  if preconditioning is not None and preconditioning not in PRECONDITIONINGS:
    raise ValueError(
        f"Unknown preconditioning {preconditioning!r}; expected one of "
        f"{PRECONDITIONINGS} or None (the preset's own).")
  adaptive = bool(adaptive) if isinstance(adaptive, np.bool_) else adaptive
  if not (isinstance(adaptive, (bool, str)) and adaptive in _ADAPTIVE):
    raise ValueError(f"orthax.orthogonalize: adaptive must be one of "
                     f"{_ADAPTIVE}, got {adaptive!r}.")
  transform = "orthax.orthogonalize"
  if norm_margin is not None:
    norm_margin = check_hyperparameter(transform, "norm_margin", norm_margin,
                                       low=0.0, low_open=True)
  if not (gram == "auto" if isinstance(gram, str)
          else isinstance(gram, (bool, np.bool_))):
    raise ValueError(
        f"{transform}: gram must be True, False or 'auto', got {gram!r}.")
  gram = gram if isinstance(gram, str) else bool(gram)
  if gram_restart is not None:
    gram_restart = check_number(transform, "gram_restart", gram_restart,
                                low=1, integer=True)
  if steps is not None:
    steps = check_number(transform, "steps", steps, low=1, integer=True)
  eps = check_hyperparameter(transform, "eps", eps, low=0.0)
  if compute_dtype is not None and not jnp.issubdtype(
      jnp.dtype(compute_dtype), jnp.floating):
    raise TypeError(
        f"compute_dtype must be a floating dtype, got {compute_dtype!r}.")

  shaped, per_shape = None, {}
  if isinstance(coeffs, str) and coeffs == "svd":
    if steps is not None:
      raise ValueError("steps has no meaning with coeffs='svd'.")
    if gram is True:
      raise ValueError("gram=True needs Newton-Schulz coefficients; "
                       "coeffs='svd' computes the exact polar factor.")
    if backend == "pallas":
      raise ValueError("backend='pallas' runs Newton-Schulz kernels; "
                       "coeffs='svd' computes the exact polar factor by SVD "
                       "(use backend='xla' or 'auto').")
    if preconditioning is not None or norm_margin is not None:
      raise ValueError("preconditioning and norm_margin scale the input of "
                       "Newton-Schulz; coeffs='svd' computes the exact polar "
                       "factor of the gradient itself: leave them None.")

    def polar(x):
      dtype = x.dtype if compute_dtype is None else compute_dtype
      return polar_svd(x.astype(dtype)).astype(x.dtype)
  else:
    shaped = shape_coefficients(coeffs)

    def settings(entry):
      """The iteration's ``(table, margin, preconditioning)`` for an entry."""
      table, margin = resolve_coefficients(entry, steps)
      kind = preconditioning or (get_preset(entry).preconditioning
                                 if isinstance(entry, str) else "frobenius")
      return (np.asarray(table), margin if norm_margin is None else
              norm_margin, kind)

    per_shape = {key: settings(entry) for key, entry in shaped.table.items()}
    fallback = settings(shaped.default)

    def polar(x):
      table, margin, kind = per_shape.get(shape_key(x.shape[-2:]), fallback)
      return newton_schulz(x, table, norm_margin=margin, eps=eps,
                           preconditioning=kind,
                           compute_dtype=compute_dtype, gram=gram,
                           gram_restart=gram_restart, backend=backend)

  if mesh is not None:
    resolve_mesh(mesh, mesh_axis)  # bad axis names fail here, not at update
  # the plan's cost model (sharded path): the longest table's steps
  steps_run = 5 if shaped is None else max(
      t.shape[0] for t, _, _ in [fallback, *per_shape.values()])

  def update_fn(updates, state, params=None):
    del params
    views = matrix_views(updates, dimension_numbers, "orthax.orthogonalize")
    if shaped is not None and shaped.warn:
      _report_fallback(shaped, views)
    leaves, treedef = jax.tree.flatten(updates)
    sharding = resolve_mesh(mesh, mesh_axis, views, leaves)
    if sharding is None:
      out = replicated(lambda x: _stacked(polar, views, x), leaves)
    else:
      # with coefficients keyed by shape, a matrix must not be zero-padded
      # into a larger matrix's slot: it would run that shape's coefficients
      out = sharded_polar(
          polar, lambda v, x: _stacked(polar, v, x), views, leaves,
          *sharding, steps=steps_run, gram=gram, gram_restart=gram_restart,
          pad=not per_shape)
    if adaptive:
      out = [_dual_norm_scaled(view, g, o, per_leaf=adaptive == "leaf")
             for view, g, o in zip(views, leaves, out)]
    return treedef.unflatten(out), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)
