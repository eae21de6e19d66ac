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
