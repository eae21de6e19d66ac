"""Independent NumPy float64 implementations of the published algorithms.

Written from the papers and the authors' reference code (not from orthax), in
the torch-free ``(fan_in, fan_out)`` layout; each function handles one 2-D
matrix and loops where orthax batches, so the tests compare two independent
routes to the same numbers.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

MUON_ABC = (3.4445, -4.7750, 2.0315)

# Amsel et al. 2025 (arXiv:2505.16932), the 5-step list of public Muon code,
# with its input normalization margin.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_MARGIN = 1.02


def newton_schulz(g: np.ndarray, coeffs, *, margin: float = 1.0,
                  eps: float = 1e-7,
                  preconditioning: str = "frobenius") -> np.ndarray:
  """Jordan's Muon iteration (any per-step table) on one matrix, in float64,
  after :func:`precondition` (Frobenius by default)."""
  x = np.asarray(g, np.float64)
  tall = x.shape[0] > x.shape[1]
  if tall:
    x = x.T
  x = precondition(x, preconditioning, margin=margin, eps=eps)
  for a, b, c in coeffs:
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if tall else x


def matrices_of(x: np.ndarray, spec) -> list[np.ndarray]:
  """The 2-D ``(fan_in, fan_out)`` matrices of a leaf of at most 3 axes,
  written out by hand: the leaf itself for ``spec=None``, else one per index
  of the axis that ``spec`` (``MuonDimensionNumbers``) leaves as batch."""
  if spec is None:
    return [x]
  batch = 3 - spec.reduction_axis - spec.output_axis
  return list(np.moveaxis(x, (batch, spec.reduction_axis, spec.output_axis),
                          (0, 1, 2)))


def exact_polar(x: np.ndarray) -> np.ndarray:
  """``U V^T`` of ``x = U S V^T`` in float64 (a zero matrix gives zero)."""
  u, s, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
  return (u * (s > 0)) @ vt


def _run(params, grads_per_step, *, lr, beta, weight_decay, nesterov, steps,
         coeffs, margin, normalize=None):
  """Muon's loop; ``normalize(i, O)`` is an optional stage after the polar step."""
  params = [np.asarray(p, np.float64) for p in params]
  moms = [np.zeros_like(p) for p in params]
  history = []
  for grads in grads_per_step:
    new = []
    for i, (w, g) in enumerate(zip(params, grads)):
      g = np.asarray(g, np.float64)
      moms[i] = beta * moms[i] + (1 - beta) * g
      u = beta * moms[i] + (1 - beta) * g if nesterov else moms[i]
      table = [MUON_ABC] * steps if coeffs is None else coeffs
      o = newton_schulz(u, table, margin=margin)
      if normalize is not None:
        o = normalize(i, o)
      fan_in, fan_out = w.shape
      o = o * np.sqrt(max(1.0, fan_out / fan_in))
      new.append(w - lr * (o + weight_decay * w))
    params = new
    history.append(params)
  return history


def muon_run(params, grads_per_step, *, lr, beta=0.95, weight_decay=0.0,
             nesterov=True, steps=5, coeffs=None, margin=1.0):
  """Muon on a list of 2-D matrices over several steps (Jordan 2024).

  ``m <- beta m + (1 - beta) g``; Nesterov input ``beta m + (1 - beta) g``;
  polar approximation by 5 quintic steps (Jordan's, or the per-step table
  ``coeffs`` with the normalization ``margin``); scale
  sqrt(max(1, fan_out/fan_in));
  decoupled weight decay ``lr * wd * W``; ``W <- W - lr * (update + wd W)``.
  Returns the list of parameters after every step.
  """
  return _run(params, grads_per_step, lr=lr, beta=beta,
              weight_decay=weight_decay, nesterov=nesterov, steps=steps,
              coeffs=coeffs, margin=margin)


def normuon_run(params, grads_per_step, *, lr, beta=0.95, beta2=0.95,
                eps=1e-10, weight_decay=0.0, steps=5, coeffs=None, margin=1.0):
  """NorMuon (Li et al. 2025) on a list of 2-D matrices over several steps.

  After Muon's orthogonalized momentum ``O``: ``v <- beta2 v + (1 - beta2) *
  mean over fan_in of O**2`` (one entry per output neuron, i.e. per column),
  ``O' = O / (sqrt(v) + eps)``, rescaled to ``||O||_F``, then Muon's shape
  scale, decay and step.
  """
  nus = {}

  def normalize(i, o):
    stat = np.mean(o * o, axis=0)
    nus[i] = beta2 * nus.get(i, np.zeros_like(stat)) + (1 - beta2) * stat
    o2 = o / (np.sqrt(nus[i])[None, :] + eps)
    return o2 * np.linalg.norm(o) / np.linalg.norm(o2)

  return _run(params, grads_per_step, lr=lr, beta=beta,
              weight_decay=weight_decay, nesterov=True, steps=steps,
              coeffs=coeffs, margin=margin, normalize=normalize)


def pion_run(w, grads_per_step, *, lr, b1=0.9, b2=0.999, eps=1e-8,
             rms_scale=0.2, expm="taylor2", left=True, right=True,
             max_angle=None):
  """Pion (Shi et al. 2026) on one 2-D matrix; returns W after every step.

  G_l = g W^T - W g^T, G_r = W^T g - g^T W; Adam moments per side without
  bias correction; A = -m / (sqrt(v) + eps); alpha = rms_scale sqrt(mn) /
  (||A_l W + W A_r||_F + eps); W <- E(h A_l) W E(h A_r), h = lr alpha.
  With ``max_angle`` (orthax's clamp), h is at most max_angle ||W||_F /
  (||A_l W + W A_r||_F + eps). ``expm="exact"`` is SciPy's matrix exponential.
  """
  w = np.asarray(w, np.float64)
  m, n = w.shape
  mom = {"l": [np.zeros((m, m)), np.zeros((m, m))],
         "r": [np.zeros((n, n)), np.zeros((n, n))]}

  def rotation(a, h):
    eye = np.eye(a.shape[0])
    if expm == "taylor2":
      return eye + h * a + 0.5 * (h * a) @ (h * a)
    if expm == "cayley":
      return np.linalg.inv(eye - 0.5 * h * a) @ (eye + 0.5 * h * a)
    if expm == "exact":
      return scipy.linalg.expm(h * a)
    raise ValueError(expm)

  history = []
  for g in grads_per_step:
    g = np.asarray(g, np.float64)
    a = {}
    for side, on, gs in (("l", left, g @ w.T - w @ g.T),
                         ("r", right, w.T @ g - g.T @ w)):
      if not on:
        continue
      mom[side][0] = b1 * mom[side][0] + (1 - b1) * gs
      mom[side][1] = b2 * mom[side][1] + (1 - b2) * gs * gs
      a[side] = -mom[side][0] / (np.sqrt(mom[side][1]) + eps)
    first = a.get("l", np.zeros((m, m))) @ w + w @ a.get("r", np.zeros((n, n)))
    step = lr * rms_scale * np.sqrt(m * n)
    if max_angle is not None:
      step = min(step, max_angle * np.linalg.norm(w))
    h = step / (np.linalg.norm(first) + eps)
    if "l" in a:
      w = rotation(a["l"], h) @ w
    if "r" in a:
      w = w @ rotation(a["r"], h)
    history.append(w)
  return history


def precondition(g: np.ndarray, kind: str = "frobenius", *,
                 margin: float = 1.0, eps: float = 1e-7) -> np.ndarray:
  """One matrix scaled before Newton–Schulz, in float64.

  The matrix is first divided by its largest entry, so ``eps`` is relative
  to it (orthax's scale-invariant convention). Then ``"frobenius"``,
  ``"spectral"`` and ``"schatten"`` divide by ``margin * N + eps`` with
  ``N`` the Frobenius, spectral or Schatten-4 norm, all three taken here from
  the singular values ``s`` (``sqrt(sum s^2)``, ``max s``, ``(sum s^4)^(1/4)``,
  Grishina et al. 2025, arXiv:2506.10935). ``"aol"`` scales row ``i`` of the
  wide orientation (the columns of a tall matrix) by ``1 / (margin *
  sqrt(sum_j |(X X^T)_ij|) + eps)`` (Prach & Lampert's almost-orthogonal
  layer bound, Turbo-Muon, Boissin et al. 2025, arXiv:2512.04632); a zero
  row, and a zero matrix, stay zero for any ``eps >= 0``.
  """
  x = np.asarray(g, np.float64)
  peak = np.max(np.abs(x), initial=0.0)
  if peak == 0:
    return x.copy()
  x = x / peak
  if kind == "aol":
    tall = x.shape[0] > x.shape[1]
    w = x.T if tall else x
    row = np.sqrt(np.sum(np.abs(w @ w.T), axis=1))
    safe = np.where(row == 0, 1.0, row)
    d = np.where(row == 0, 0.0, 1.0 / (margin * safe + eps))
    w = d[:, None] * w
    return w.T if tall else w
  s = np.linalg.svd(x, compute_uv=False)
  norms = {"frobenius": np.sqrt(np.sum(s**2)), "spectral": np.max(s),
           "schatten": np.sum(s**4) ** 0.25}
  return x / (margin * norms[kind] + eps)


def newton_schulz_error_bound(m: np.ndarray, coeffs, *, u: float,
                              margin: float = 1.0,
                              preconditioning: str = "frobenius",
                              start: float = 0.0) -> tuple[float, float]:
  """First-order bound on the Frobenius error of one evaluation of the plain
  Newton–Schulz steps on ``m`` in a float of unit roundoff ``u`` (by orthax or
  by a reference that forms ``A = X X^T``, ``B = b A + c A^2``, ``a X + B
  X``); and the exact result's Frobenius norm.

  Start: the preconditioned ``X_0`` within ``(size + 2) u + start``
  relative (its norm or row sums are sums of at most ``size`` terms, then a
  square root and a divide; ``start``: what the caller's input carries). A
  step's longest chain of roundings is the reductions of lengths cols (A),
  rows (A^2) and rows (BX) plus 3 (c A^2, its sum with bA, the sum with aX),
  so its result is componentwise within ``K u``, ``K = cols + 2 rows + 3``,
  of the same polynomial in ``|X|`` (Higham, Accuracy and Stability, 3.5).
  An error ``e`` already in ``X`` grows to at most ``L e``, ``L = max |f'|``
  on ``[0, ||X||_2]``: the step acts on the singular values, and the divided
  differences that bound the odd quintic's Fréchet derivative are bounded
  by ``|f'|``. The iterates are the exact (float64) ones.
  """
  x = np.asarray(m, np.float64)
  x = x.T if x.shape[0] > x.shape[1] else x
  rows, cols = x.shape
  x = precondition(x, preconditioning, margin=margin, eps=0.0)
  err = ((x.size + 2) * u + start) * np.linalg.norm(x)
  for a, b, c in coeffs:
    ax = np.abs(x)
    gram = ax @ ax.T
    poly = abs(a) * ax + abs(b) * gram @ ax + abs(c) * gram @ gram @ ax
    sigma = np.linspace(0.0, np.linalg.norm(x, 2), 4001)
    slope = np.abs(a + 3 * b * sigma ** 2 + 5 * c * sigma ** 4).max()
    err = slope * err + (cols + 2 * rows + 3) * u * np.linalg.norm(poly)
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return err, np.linalg.norm(x)


# --- AdaMuon and AuON / Hybrid-AuON (issue 14) ---
def _steps_run(step, params, grads_per_step, aux=None, **kw):
  """``step(w, g, state, **kw) -> (w, state, extra)`` on a list of 2-D
  matrices over several steps; returns the list of parameters after every
  step (and appends each step's list of ``extra`` to ``aux`` if given)."""
  params = [np.asarray(p, np.float64) for p in params]
  states = [None] * len(params)
  history = []
  for grads in grads_per_step:
    extras = []
    for i, g in enumerate(grads):
      params[i], states[i], extra = step(params[i], g, states[i], **kw)
      extras.append(extra)
    history.append(list(params))
    if aux is not None:
      aux.append(extras)
  return history


def _nesterov(g, state, beta):
  """EMA momentum ``m <- beta m + (1 - beta) g`` (torch's ``m.lerp_(g, 1 -
  beta)``) and the Nesterov input ``beta m + (1 - beta) g`` (``g.lerp_(m,
  beta)``); ``state`` is ``None`` at the first step."""
  g = np.asarray(g, np.float64)
  m = (0.0 if state is None else state["m"]) * beta + (1 - beta) * g
  return beta * m + (1 - beta) * g, m


def _cosh_rms(z):
  """``sqrt(mean(cosh(z)**2))``, directly (float64: no overflow below 350)."""
  return np.sqrt(np.mean(np.cosh(z) ** 2))


def adamuon_step(w, g, state, *, lr, beta=0.95, beta2=0.999, eps=1e-8,
                 weight_decay=0.01, sign=False, coeffs=MUON_ABC, ns_steps=5,
                 rms=0.2):
  """One AdaMuon step on one ``(fan_in, fan_out)`` matrix, in float64 (Si,
  Zhang, Shen 2025, arXiv:2507.11005; github.com/Chongjie-Si/AdaMuon
  ``adamuon.py``, whose released version has no ``sign``).

  Nesterov EMA momentum ``u``; ``O = NS(sign(u))`` (``sign``) or ``NS(u)``,
  ``ns_steps`` quintics ``coeffs`` (``None``: the exact polar factor);
  ``v <- beta2 v + (1 - beta2) O*O``; ``v_hat = v / (1 - beta2^t)``;
  ``O_hat = O / (sqrt(v_hat) + eps)``; ``U = rms sqrt(mn) O_hat /
  ||O_hat||_F`` (exactly RMS ``rms``, as on the METHODS page; the official
  code adds 1e-8 to that norm, a relative change of ``1e-8 /
  ||O_hat||_F``, and ``||O_hat||_F`` is about ``sqrt(mn)``: ``O_hat`` is
  ``O / |O|`` up to eps at the first step); ``W <- W (1 - lr wd) - lr U``.
  ``state``: ``None`` at the first step. Returns ``(W, state, (u, O,
  v_hat))``.
  """
  w = np.asarray(w, np.float64)
  u, m = _nesterov(g, state, beta)
  x = np.sign(u) if sign else u
  o = (exact_polar(x) if coeffs is None
       else newton_schulz(x, [coeffs] * ns_steps))
  t = 1 if state is None else state["t"] + 1
  v = (0.0 if state is None else beta2 * state["v"]) + (1 - beta2) * o * o
  v_hat = v / (1 - beta2**t)
  o_hat = o / (np.sqrt(v_hat) + eps)
  norm = np.linalg.norm(o_hat)
  update = rms * np.sqrt(o.size) * o_hat / norm if norm > 0 else o_hat
  state = dict(m=m, v=v, t=t)
  return w - lr * (update + weight_decay * w), state, (u, o, v_hat)


def adamuon_run(params, grads_per_step, *, aux=None, **kw):
  """:func:`adamuon_step` on a list of 2-D matrices over several steps
  (``kw`` as there); returns the list of parameters after every step."""
  return _steps_run(adamuon_step, params, grads_per_step, aux=aux, **kw)


def auon_step(w, g, state, *, lr, variant="paper", gamma=None, beta=0.95,
              weight_decay=0.0):
  """One AuON step on one ``(fan_in, fan_out)`` matrix, in float64 (D. Maity
  2025, arXiv:2509.24320; github.com/ryyzn9/AuON).

  ``variant="paper"`` (paper v1 §3.1, script ``Auon_Adam_train.py`` @
  c87b862; ``gamma`` 1): Nesterov EMA momentum ``u``; ``X = u / (||u||_F +
  1e-7 max|u|)`` (the official 1e-7 is absolute; orthax's, followed here, is
  relative to ``max|u|``: the two differ by a factor within 1e-7 of 1 when
  ``||u||_F >= 1``);
  ``r = sqrt(mean(cosh(gamma X)^2))``; ``U = sqrt(max(1, fan_out / fan_in))
  X / (r + 1e-8)``. ``variant="package"`` (``auon/optimizer.py`` @ bba2e82,
  ``gamma`` 1.5): the same ``r``, ``U = u / (r + 1e-8)``, no shape factor.
  Both: ``W <- W (1 - lr wd) - lr U`` (the paper has no decay: wd 0).
  Returns ``(W, state, u)``.
  """
  w = np.asarray(w, np.float64)
  gamma = (1.0 if variant == "paper" else 1.5) if gamma is None else gamma
  u, m = _nesterov(g, state, beta)
  x = precondition(u, "frobenius", eps=1e-7)
  r = _cosh_rms(gamma * x)
  if variant == "paper":
    fan_in, fan_out = w.shape
    update = np.sqrt(max(1.0, fan_out / fan_in)) * x / (r + 1e-8)
  elif variant == "package":
    update = u / (r + 1e-8)
  else:
    raise ValueError(variant)
  return w - lr * (update + weight_decay * w), dict(m=m), u


def auon_run(params, grads_per_step, *, aux=None, **kw):
  """:func:`auon_step` on a list of 2-D matrices over several steps (``kw``
  as there); returns the list of parameters after every step."""
  return _steps_run(auon_step, params, grads_per_step, aux=aux, **kw)


def hybrid_auon_step(w, g, state, *, lr, variant="package", ns_steps=None,
                     gamma=None, beta=0.95, weight_decay=0.0):
  """One Hybrid-AuON step on one ``(fan_in, fan_out)`` matrix, in float64.

  Nesterov EMA momentum ``u``; ``X_k`` = ``ns_steps`` of Jordan's quintics
  on ``u / (||u||_F + 1e-7 max|u|)`` (wide orientation); ``U = X_k / (r +
  1e-8)``, no shape factor; ``W <- W (1 - lr wd) - lr U``.
  ``variant="paper"`` (§3.2; ``ns_steps`` 1, ``gamma`` 1): ``r =
  sqrt(mean(cosh(gamma X_1)^2))`` of the iterate itself (the paper prints
  ``mean(cosh(X_1)^2)`` without the square root of §3.1: read as §3.1).
  ``variant="package"`` (``HybridAuON`` @ bba2e82; ``ns_steps`` 5,
  ``gamma`` 1.5): ``r`` of ``X_5 / (||X_5||_F + 1e-7 max|X_5|)``.
  Returns ``(W, state, (u, X_k))``.
  """
  w = np.asarray(w, np.float64)
  paper = variant == "paper"
  if not paper and variant != "package":
    raise ValueError(variant)
  ns_steps = (1 if paper else 5) if ns_steps is None else ns_steps
  gamma = (1.0 if paper else 1.5) if gamma is None else gamma
  u, m = _nesterov(g, state, beta)
  x = newton_schulz(u, [MUON_ABC] * ns_steps)
  y = x if paper else precondition(x, "frobenius", eps=1e-7)
  update = x / (_cosh_rms(gamma * y) + 1e-8)
  return w - lr * (update + weight_decay * w), dict(m=m), (u, x)


def hybrid_auon_run(params, grads_per_step, *, aux=None, **kw):
  """:func:`hybrid_auon_step` on a list of 2-D matrices over several steps
  (``kw`` as there); returns the list of parameters after every step."""
  return _steps_run(hybrid_auon_step, params, grads_per_step, aux=aux, **kw)
# --- end AdaMuon and AuON ---


# --- NAMO and NAMO-D (issue 14) ---
def namo_step(w, g, state, *, lr, beta1=0.95, beta2=0.99, eps=1e-8,
              weight_decay=0.1, nesterov=True, coeffs=MUON_ABC, ns_steps=5,
              scale=0.2, granularity="matrix", clamp=None):
  """One NAMO (``granularity="matrix"``) or NAMO-D (``"input"``) step on one
  ``(fan_in, fan_out)`` matrix, in float64 (Zhang, Liu, Schaeffer 2026,
  arXiv:2602.17080; github.com/minxin-zhg/namo ``src/namo.py``).

  Written, as the official code is, on the torch-layout ``P = W^T`` (out,
  in), NAMO-D's statistics being per column of ``P`` (an input feature):
  ``B <- b1 B + (1 - b1) G``; ``M = b1 B + (1 - b1) G`` (Nesterov) or ``B``;
  ``v <- b2 v + (1 - b2) ||G||^2`` (NAMO: Frobenius; NAMO-D: each column);
  ``O = polar(M)`` (``coeffs=None``) or ``ns_steps`` quintics ``coeffs``;
  ``c = ||M|| / (sqrt(v) + eps)`` (NAMO-D per column, clamped to ``[k mean,
  mean / k]`` with ``clamp=k`` when the mean is positive); ``r = lr c
  sqrt(1 - b2^t) / (1 - b1^t + 1e-12)``; ``P <- P (1 - wd min(r, 1))``
  (NAMO-D: ``max(0, ...)`` per column); ``P <- P - min(r scale sqrt(max(out,
  in)), 1) O``. ``lr``: a float or a function of ``t - 1``. ``state``:
  ``None`` at the first step. Returns ``(W, state, (M^T, r))``: the new
  weights, the state, and the Nesterov input and the rate, in W's layout.
  """
  p = np.asarray(w, np.float64).T.copy()
  grad = np.asarray(g, np.float64).T
  per_column = granularity == "input"
  if state is None:
    state = dict(buf=np.zeros_like(p), t=0,
                 v=np.zeros(p.shape[1]) if per_column else 0.0)
  norm = ((lambda x: np.sqrt(np.sum(x * x, axis=0))) if per_column
          else np.linalg.norm)
  v = beta2 * state["v"] + (1 - beta2) * norm(grad) ** 2
  buf = beta1 * state["buf"] + (1 - beta1) * grad
  m = beta1 * buf + (1 - beta1) * grad if nesterov else buf
  o = (exact_polar(m) if coeffs is None
       else newton_schulz(m, [coeffs] * ns_steps))
  t = state["t"] + 1
  eta = lr(t - 1) if callable(lr) else lr
  base = eta * np.sqrt(1 - beta2**t) / (1 - beta1**t + 1e-12)
  c = norm(m) / (np.sqrt(v) + eps)
  if per_column and clamp is not None and 0 < clamp <= 1:
    mean = np.mean(c)
    if np.isfinite(mean) and mean > 0:
      c = np.clip(c, clamp * mean, mean / clamp)
  rate = base * c
  decay = 1 - weight_decay * np.minimum(rate, 1)
  if per_column:
    decay = np.maximum(decay, 0)
  p = p * decay  # per column (broadcast along rows) or by the scalar
  p = p - np.minimum(rate * scale * np.sqrt(max(p.shape)), 1) * o
  return p.T, dict(buf=buf, t=t, v=v), (m.T, rate)


def namo_run(params, grads_per_step, **kw):
  """:func:`namo_step` on a list of 2-D matrices over several steps
  (``kw`` as there); returns the list of parameters after every step."""
  return _steps_run(namo_step, params, grads_per_step, **kw)
# --- end NAMO ---


# --- ROOT (issue 14) ---
# ROOT's quintics by (short side, long side) of the matrix (He et al. 2025,
# arXiv:2511.20626; noah-research ROOT/examples/example_train.py), each run at
# every step; any other shape runs MUON_ABC.
ROOT_TABLE = {
    (2048, 2048): (3.4916, -4.8224, 2.1095),
    (2048, 16384): (3.1943, -3.8221, 1.5322),
    (2048, 3072): (3.4509, -4.5790, 1.9325),
    (2048, 8192): (2.9794, -3.6674, 1.6207),
}


def root_polar(b: np.ndarray, *, table=ROOT_TABLE, steps: int = 5,
               eps: float = 1e-7) -> np.ndarray:
  """ROOT's orthogonalization of one matrix, in float64.

  ``table`` (a dict as ROOT_TABLE): the quintic of ``b``'s (short, long)
  shape, or MUON_ABC, run ``steps`` times after dividing by ``||b||_F +
  eps`` (an absolute eps, as ROOT's code); ``None``: the exact polar factor
  (:func:`exact_polar`, of the NAMO block).
  """
  b = np.asarray(b, np.float64)
  if table is None:
    return exact_polar(b)
  abc = table.get((min(b.shape), max(b.shape)), MUON_ABC)
  # newton_schulz divides by the largest entry p first, then by ||b/p||_F +
  # eps', which is b / (||b||_F + eps' p): eps' = eps / p is ROOT's division
  peak = np.max(np.abs(b), initial=0.0)
  return newton_schulz(b, [abc] * steps, eps=eps / peak if peak else 0.0)


def root_run(params, grads_per_step, *, lr, beta=0.95, weight_decay=0.1,
             nesterov=True, quantile=0.9, quantile_eps=1e-9, ns_steps=5,
             table=ROOT_TABLE, ns_eps=1e-7, scale=0.2):
  """ROOT (He et al. 2025) on a list of 2-D matrices over several steps.

  As ``ROOT.step`` in the authors' script, one matrix at a time:
  ``M <- beta M + G`` (a sum, not an average); ``M^ = G + beta M``
  (Nesterov) or ``M``; ``tau = quantile(|M^|, q) + quantile_eps`` (NumPy's
  'linear' method, the script's ``simple_quantile``); the soft threshold
  ``O = sign(M^) max(|M^| - tau, 0)`` and ``B = M^ - O``; ``U =``
  :func:`root_polar` ``(B)``; ``W <- W (1 - lr wd) - lr scale
  sqrt(max(m, n)) U``. Every step is the same on a matrix and its transpose,
  so torch's ``(out, in)`` layout and this ``(in, out)`` one agree. Returns
  the list of parameters after every step.
  """
  params = [np.asarray(p, np.float64) for p in params]
  sums = [np.zeros_like(p) for p in params]
  history = []
  for grads in grads_per_step:
    new = []
    for i, (w, g) in enumerate(zip(params, grads)):
      g = np.asarray(g, np.float64)
      sums[i] = beta * sums[i] + g
      m = g + beta * sums[i] if nesterov else sums[i]
      tau = np.quantile(np.abs(m), quantile, method="linear") + quantile_eps
      b = m - np.sign(m) * np.maximum(np.abs(m) - tau, 0.0)
      u = root_polar(b, table=table, steps=ns_steps, eps=ns_eps)
      new.append(w * (1 - lr * weight_decay)
                 - lr * scale * np.sqrt(max(w.shape)) * u)
    params = new
    history.append(params)
  return history
# --- end ROOT ---


# --- Dion (issue 15) ---
def dion_step(g, m, q, *, mu=0.95, eps=1e-8):
  """One Dion step on one ``(fan_in, fan_out)`` matrix, in float64, written
  in the official code's torch layout (``dion_simple.py`` @ 0a059a4, lines
  32-64: the weight is ``(out, in)``, so ``X = W^T``): ``M += G``; ``P =
  QR(M Q)``; ``R = M^T P``; ``M -= (1 - mu) P R^T``; ``Q = R / (||R_j|| +
  eps max|M|)``; direction ``P Q^T``. ``eps`` is relative to the buffer's
  largest entry, as orthax documents (the official one is absolute). The QR
  is made unique (R's diagonal >= 0); an all-zero buffer gives a zero
  direction and keeps ``Q`` (the official ``fix_all_zero_or_nan``).

  Args: the gradient ``g`` and buffer ``m`` in orthax's ``(fan_in,
  fan_out)`` layout, the factor ``q`` ``(fan_in, r)``.

  Returns: ``(direction, m, q, x)`` in orthax's layout, where ``x`` is the
  matrix whose QR gave ``P`` (``B^T Q``, ``(fan_out, r)``).
  """
  mt = (np.asarray(m, np.float64) + np.asarray(g, np.float64)).T  # (out, in)
  q = np.asarray(q, np.float64)
  if not np.any(mt):
    return np.zeros_like(mt.T), mt.T, q, mt @ q
  x = mt @ q
  p, upper = np.linalg.qr(x)
  p = p * np.where(np.diag(upper) < 0, -1.0, 1.0)
  r = mt.T @ p
  q = r / (np.linalg.norm(r, axis=0) + eps * np.max(np.abs(mt)))
  mt = mt - (1 - mu) * p @ r.T
  return (p @ q.T).T, mt.T, q, x


def dion_run(params, grads_per_step, q0s, *, lr, mu=0.95, eps=1e-8,
             weight_decay=0.01):
  """Dion's optimizer on a list of 2-D ``(fan_in, fan_out)`` matrices, from
  the factors ``q0s``: ``W <- W (1 - lr wd) - lr sqrt(fan_out / fan_in)
  direction`` (``dion_simple.py``'s update). Returns the matrices after
  every step."""
  params = [np.asarray(w, np.float64) for w in params]
  states = [(np.zeros_like(w), np.asarray(q, np.float64))
            for w, q in zip(params, q0s)]
  history = []
  for grads in grads_per_step:
    for i, g in enumerate(grads):
      w = params[i]
      d, m, q, _ = dion_step(g, *states[i], mu=mu, eps=eps)
      states[i] = (m, q)
      scale = np.sqrt(w.shape[1] / w.shape[0])
      params[i] = w * (1 - lr * weight_decay) - lr * scale * d
    history.append(list(params))
  return history
# --- end Dion ---


# --- MuonClip / QK-clip (issue 15) ---
def attention_max_logits(x, q_parts, k_parts, heads, *, rope=None):
  """Per-head max attention logits ``S_h = max_{b, i, j <= i} q_i^h . k_j^h
  / sqrt(d)`` (Kimi K2, Algorithm 1), in float64, by loops over heads.

  ``x``: ``(batch, time, d_model)``; ``q_parts = (Wq, bq)`` with ``Wq``
  ``(d_model, H d)`` and ``bq`` ``(H d,)`` (heads as contiguous blocks of
  ``d`` columns), ``k_parts`` the same with ``K`` key heads (query head
  ``h`` uses key head ``h // (H / K)``). ``rope = (Wqr (d_model, H r), Wkr
  (d_model, r))`` adds MLA's rotary term ``q_r^h . k_r`` (shared key);
  ``sqrt(d)`` is then ``sqrt(d + r)``.
  """
  x = np.asarray(x, np.float64)
  q = x @ np.asarray(q_parts[0], np.float64) + np.asarray(q_parts[1])
  k = x @ np.asarray(k_parts[0], np.float64) + np.asarray(k_parts[1])
  d = q.shape[-1] // heads
  group = heads // (k.shape[-1] // d)
  width = d + (0 if rope is None else rope[1].shape[-1])
  t = x.shape[1]
  causal = np.tril(np.ones((t, t), bool))
  out = np.empty(heads)
  for h in range(heads):
    qh = q[..., h * d:(h + 1) * d]
    kh = k[..., (h // group) * d:(h // group + 1) * d]
    logits = np.einsum("bid,bjd->bij", qh, kh)
    if rope is not None:
      r = rope[1].shape[-1]
      qr = (x @ np.asarray(rope[0], np.float64))[..., h * r:(h + 1) * r]
      kr = x @ np.asarray(rope[1], np.float64)
      logits = logits + np.einsum("bid,bjd->bij", qr, kr)
    out[h] = np.max(np.where(causal, logits, -np.inf)) / np.sqrt(width)
  return out


def qk_clip_reference(q_parts, k_parts, s_max, *, tau, alpha=0.5,
                      q_rope_parts=()):
  """QK-Clip (Kimi K2, Algorithm 1) on the post-update weights, per head.

  Every array of ``q_parts`` (a query kernel, its bias) holds the ``H =
  len(s_max)`` query heads as contiguous blocks of its last axis, every one
  of ``k_parts`` the key heads. For each head with ``S_h > tau``, ``gamma =
  tau / S_h``: with as many key heads as query heads, the query block times
  ``gamma**alpha`` and the key block times ``gamma**(1 - alpha)``; with
  fewer (grouped keys), the query block times ``gamma`` and the keys
  unchanged. ``q_rope_parts`` (MLA's rotary query) take ``gamma``; MLA's
  shared rotary key is not an argument: it never changes. Returns new
  ``(q_parts, k_parts, q_rope_parts)`` lists, float64.
  """
  q = [np.array(p, np.float64) for p in q_parts]
  k = [np.array(p, np.float64) for p in k_parts]
  qr = [np.array(p, np.float64) for p in q_rope_parts]
  heads = len(s_max)
  grouped = k[0].shape[-1] < q[0].shape[-1]
  for h, s in enumerate(np.asarray(s_max, np.float64)):
    if s <= tau:
      continue
    gamma = tau / s
    for p in q:
      d = p.shape[-1] // heads
      p[..., h * d:(h + 1) * d] *= gamma if grouped else gamma ** alpha
    for p in qr:
      d = p.shape[-1] // heads
      p[..., h * d:(h + 1) * d] *= gamma
    if not grouped:
      for p in k:
        d = p.shape[-1] // heads
        p[..., h * d:(h + 1) * d] *= gamma ** (1 - alpha)
  return q, k, qr


def moonlight_muon_step(w, g, buf, *, lr, mu=0.95, weight_decay=0.1,
                        steps=5):
  """One step of Moonlight's Muon (MoonshotAI/Moonlight@abaa96e,
  ``examples/toy_train.py``) on a ``(fan_in, fan_out)`` matrix: the sum
  momentum ``buf <- mu buf + g``, the Nesterov input ``g + mu buf``, Jordan's
  quintic, ``W <- W (1 - lr wd) - lr 0.2 sqrt(max(m, n)) O``. Returns ``(W,
  buf)``."""
  w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
  buf = mu * buf + g
  o = newton_schulz(g + mu * buf, [MUON_ABC] * steps)
  return (w * (1 - lr * weight_decay)
          - lr * 0.2 * np.sqrt(max(w.shape)) * o), buf


def adamw_step(w, g, state, t, *, lr, b1=0.9, b2=0.95, eps=1e-8,
               weight_decay=0.1):
  """One AdamW step (Loshchilov & Hutter; bias-corrected moments, ``eps``
  outside the root, decay ``lr wd W``) at step ``t >= 1``; ``state`` is
  ``(m, v)``. Returns ``(W, (m, v))``."""
  w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
  m = b1 * state[0] + (1 - b1) * g
  v = b2 * state[1] + (1 - b2) * g * g
  step = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
  return w - lr * (step + weight_decay * w), (m, v)
# --- end MuonClip ---


# --- ARO (issue 15) ---
def aro_base(y: np.ndarray, base: str, *, iters: int = 5,
             eps: float = 1e-8) -> np.ndarray:
  """ARO's base map on one ``s × k`` matrix (Langford's ``dion/aro.py``):
  Sinkhorn (rows to L2 norm sqrt(k), then columns to sqrt(s), ``iters``
  times), row normalization to sqrt(k), or sign; norms clamped at ``eps``."""
  y = np.asarray(y, np.float64)
  s, k = y.shape
  if base == "sign":
    return np.sign(y)
  for _ in range(iters if base == "sinkhorn" else 1):
    y = y * np.sqrt(k) / np.maximum(np.linalg.norm(y, axis=1, keepdims=True),
                                    eps)
    if base == "sinkhorn":
      y = y * np.sqrt(s) / np.maximum(
          np.linalg.norm(y, axis=0, keepdims=True), eps)
  return y


def aro_direction(x: np.ndarray, rotation: np.ndarray, base: str,
                  **kw) -> tuple[np.ndarray, np.ndarray]:
  """One ARO step on ``x`` (``s × k``, the rotated side first) with the
  previous rotation: the cross-alignment ``C = x f(R^T x)^T``, the new
  rotation ``Q`` of Householder ``QR(C)``, and ``D = Q f(Q^T x)``. Returns
  ``(D, Q)``."""
  cross = x @ aro_base(rotation.T @ x, base, **kw).T
  q, _ = np.linalg.qr(cross)
  return q @ aro_base(q.T @ x, base, **kw), q


def aro(grads_per_step, *, side: str, base: str = "sinkhorn",
        beta: float = 0.95, **kw) -> list[np.ndarray]:
  """ARO's directions ``D_t`` for one ``(fan_in, fan_out)`` matrix over
  several steps: ``M <- beta M + (1 - beta) G`` (no Nesterov), then
  :func:`aro_direction` on ``M`` (``side="input"``) or on ``M^T`` (torch's
  layout, Langford's rows: ``side="output"``), starting from ``R = I``.
  Returns the list of ``D_t`` in the ``(fan_in, fan_out)`` layout."""
  flip = side == "output"
  m, rotation, out = None, None, []
  for g in grads_per_step:
    g = np.asarray(g, np.float64)
    m = (1 - beta) * g if m is None else beta * m + (1 - beta) * g
    x = m.T if flip else m
    if rotation is None:
      rotation = np.eye(x.shape[0])
    d, rotation = aro_direction(x, rotation, base, **kw)
    out.append(d.T if flip else d)
  return out
# --- end ARO ---


# --- POET (issue 15) ---
# The Cayley–Neumann polynomials of POET-BS (Sphere-AI-Lab/poet@3a34bb6):
# coefficients of Q^0 .. Q^4. "triton" (core/triton_ops.py, the GPU kernel)
# is (I + Q)(I + Q + Q^2 + Q^3); "torch" (core/ops.py, the fallback) is the
# Cayley series (I + Q)(I - Q)^{-1} = I + 2 sum_k Q^k cut after Q^4.
POET_NEUMANN = {"triton": (1, 2, 2, 2, 1), "torch": (1, 2, 2, 2, 2)}


def poet_block(q: np.ndarray, neumann: str) -> np.ndarray:
  """One rotation block: the product form for ``"triton"``, the series for
  ``"torch"`` (different algebra from a polynomial in powers)."""
  eye = np.eye(q.shape[0])
  if neumann == "triton":
    return (eye + q) @ (eye + q + q @ q + q @ q @ q)
  return eye + 2 * sum(np.linalg.matrix_power(q, k) for k in range(1, 5))


def poet_skew(theta: np.ndarray, b: int) -> np.ndarray:
  """The skew ``b×b`` matrix with strict upper triangle ``theta``, filled
  row by row (torch.triu_indices' order)."""
  q = np.zeros((b, b))
  k = 0
  for i in range(b):
    for j in range(i + 1, b):
      q[i, j], q[j, i] = theta[k], -theta[k]
      k += 1
  return q


def poet_rotation(theta: np.ndarray, perm: np.ndarray,
                  neumann: str) -> np.ndarray:
  """The full ``s×s`` matrix ``S^T diag(G_1, ..., G_k) S`` of one side, with
  ``S = I[perm]`` and ``G_i`` the map of the ``i``-th row of ``theta``."""
  s, k = len(perm), theta.shape[0]
  b = s // k
  diag = scipy.linalg.block_diag(*[poet_block(poet_skew(t, b), neumann)
                                   for t in theta])
  select = np.eye(s)[np.asarray(perm)]
  return select.T @ diag @ select


def _poet_block_grads(theta, perm, neumann, d_rot):
  """Gradients of the generators of one side, given ``dL/d(S^T D S)``."""
  s, k = len(perm), theta.shape[0]
  b = s // k
  select = np.eye(s)[np.asarray(perm)]
  d_diag = select @ d_rot @ select.T
  coeffs = POET_NEUMANN[neumann]
  rows, cols = np.triu_indices(b, 1)
  out = np.zeros_like(theta)
  for i, t in enumerate(theta):
    qt = poet_skew(t, b).T
    d_g = d_diag[i * b:(i + 1) * b, i * b:(i + 1) * b]
    # d <D, sum_k c_k Q^k> / dQ = sum_k c_k sum_j (Q^T)^j D (Q^T)^(k-1-j)
    d_q = sum(c * np.linalg.matrix_power(qt, j) @ d_g
              @ np.linalg.matrix_power(qt, p - 1 - j)
              for p, c in enumerate(coeffs) for j in range(p))
    out[i] = d_q[rows, cols] - d_q[cols, rows]
  return out


def poet_effective(w0, theta, perms, neumann):
  """``R W0 P`` of one matrix; ``theta``, ``perms``: (left, right), a side
  of ``None`` being the identity."""
  sides = [np.eye(n) if t is None else poet_rotation(t, p, neumann)
           for t, p, n in zip(theta, perms, w0.shape)]
  return sides[0] @ w0 @ sides[1]


def poet_theta_grads(w0, theta, perms, g, neumann):
  """``dL/dtheta`` for ``L = <g, R W0 P>``, by hand: ``dL/dR = g (W0
  P)^T``, ``dL/dP = (R W0)^T g``, then through the block map."""
  left, right = [None if t is None else poet_rotation(t, p, neumann)
                 for t, p in zip(theta, perms)]
  left = np.eye(w0.shape[0]) if left is None else left
  right = np.eye(w0.shape[1]) if right is None else right
  d_sides = (g @ (w0 @ right).T, (left @ w0).T @ g)
  return tuple(None if t is None else _poet_block_grads(t, p, neumann, d)
               for t, p, d in zip(theta, perms, d_sides))


def poet_run(w, grads, perms_per_step, *, lr, blocks, merge_every,
             b1=0.9, b2=0.999, eps=1e-6, lr_scale=0.5, neumann="triton"):
  """POET-BS on one 2-D matrix over several steps, as the official loop.

  ``blocks``: (left, right) block sizes (``None``: side not rotated);
  ``perms_per_step[t]``: the (left, right) permutations in force at step
  ``t`` (drawn at random by the implementation under test at each merge).
  Each step: ``POETAdamW`` on ``theta`` (moments and step count reset after
  each merge; eps on the uncorrected ``sqrt(v)``, the bias corrections in
  the step size ``lr lr_scale sqrt(1 - b2^t) / (1 - b1^t)``), ``W =
  R W0 P``, and after every ``merge_every``-th step ``W0 <- W``, ``theta <-
  0``. Returns the weights after every step.
  """
  w0 = np.asarray(w, np.float64)
  zero = lambda: tuple(None if b is None else np.zeros((n // b, b * (b - 1) // 2))
                       for b, n in zip(blocks, w0.shape))
  theta, mu, nu = zero(), zero(), zero()
  history = []
  for step, (g, perms) in enumerate(zip(grads, perms_per_step), start=1):
    t = (step - 1) % merge_every + 1
    d = poet_theta_grads(w0, theta, perms, np.asarray(g, np.float64), neumann)
    size = lr * lr_scale * np.sqrt(1 - b2**t) / (1 - b1**t)
    new = [[], [], []]
    for th, m, v, dt in zip(theta, mu, nu, d):
      if th is None:
        for lst in new:
          lst.append(None)
        continue
      m = b1 * m + (1 - b1) * dt
      v = b2 * v + (1 - b2) * dt * dt
      new[0].append(th - size * m / (np.sqrt(v) + eps))
      new[1].append(m)
      new[2].append(v)
    theta, mu, nu = map(tuple, new)
    w = poet_effective(w0, theta, perms, neumann)
    history.append(w)
    if step % merge_every == 0:
      w0, (theta, mu, nu) = w, (zero(), zero(), zero())
  return history
# --- end POET ---


# --- FISMO (issue 15) ---
def fismo_inv_sqrt(a: np.ndarray) -> np.ndarray:
  """``a^(-1/2)`` of a symmetric positive definite matrix (principal root)."""
  return np.linalg.inv(np.real(scipy.linalg.sqrtm(a)))


def fismo_factor(old: np.ndarray, stat: np.ndarray, *, gamma: float,
                 damping: float) -> np.ndarray:
  """Steps 1-2 (or 3-4) of Algorithm 1 for one factor of side ``d``, given
  its statistic ``stat`` (``G Q^-1 G^T / n``): the statistic rescaled to
  trace ``d`` (orthax's scale-free form; the paper adds it as it is), plus
  ``mu tr(old) / d I``, averaged with ``old``, rescaled to trace ``d`` and
  symmetrized."""
  d = old.shape[0]
  tr = np.trace(stat)
  scaled = d * stat / tr if tr > 0 else np.zeros_like(stat)
  mixed = gamma * old + (1 - gamma) * (
      scaled + damping * np.trace(old) / d * np.eye(d))
  mixed = d * mixed / np.trace(mixed)
  return (mixed + mixed.T) / 2


def fismo_step(x, p, q, mom, *, beta: float, gamma: float, damping: float,
               refresh: bool = True):
  """One step of Algorithm 1 on the paper's ``x`` (``d1 x d2``, ``P`` on its
  left): with ``refresh``, ``P`` from ``x Q^-1 x^T / d2`` with the old ``Q``,
  then ``Q`` from ``x^T P^-1 x / d1`` with the new ``P``; then ``xt = P^-1/2
  x Q^-1/2``, ``M = beta M + (1 - beta) xt``, ``dx = P^-1/2 polar(M)
  Q^-1/2``. Returns ``(dx, P, Q, M)``."""
  d1, d2 = x.shape
  if refresh:
    p = fismo_factor(p, x @ np.linalg.inv(q) @ x.T / d2, gamma=gamma,
                     damping=damping)
    q = fismo_factor(q, x.T @ np.linalg.inv(p) @ x / d1, gamma=gamma,
                     damping=damping)
  rp, rq = fismo_inv_sqrt(p), fismo_inv_sqrt(q)
  mom = beta * mom + (1 - beta) * rp @ x @ rq
  return rp @ exact_polar(mom) @ rq, p, q, mom


def fismo_run(grads_per_step, *, beta: float, gamma: float, damping: float,
              update_every: int = 1, side_order: str = "output_first"):
  """FISMO (Xu et al. 2026, Algorithm 1 as METHODS.md §5 restates it) on one
  ``(fan_in, fan_out)`` matrix over several steps, in float64 with the exact
  polar factor, from ``P = Q = I`` and ``M = 0``.

  The paper's ``W`` (``P`` on its left) is ``G^T`` for ``"output_first"``
  and ``G`` for ``"input_first"``; the factors are refreshed at steps ``1,
  1 + k, 1 + 2k, ...`` (``k = update_every``). Returns the list of steps
  ``dW`` (orthax's layout) and of ``(input factor, output factor)`` after
  each step.
  """
  flip = side_order == "output_first"
  orient = (lambda a: a.T) if flip else (lambda a: a)
  d1, d2 = orient(np.asarray(grads_per_step[0])).shape
  p, q, mom = np.eye(d1), np.eye(d2), np.zeros((d1, d2))
  steps, factors = [], []
  for t, g in enumerate(grads_per_step):
    dx, p, q, mom = fismo_step(
        orient(np.asarray(g, np.float64)), p, q, mom, beta=beta, gamma=gamma,
        damping=damping, refresh=t % update_every == 0)
    steps.append(orient(dx))
    factors.append((q, p) if flip else (p, q))
  return steps, factors
# --- end FISMO ---
