"""Centered Kernel Alignment (CKA) between the hidden states of two models.

Estimators (see docs/cka.md for when to use which):

* ``linear``  -- biased linear CKA (Kornblith et al. 2019) over *all* samples, exact.
  Streamed through sufficient statistics (column sums, X^T X, Y^T Y and the
  cross-covariance X^T Y, all float64), so memory does not grow with the number of
  samples: ``8 * (sum d_a) * (sum d_b)`` bytes for the cross block.
* ``unbiased_minibatch`` -- minibatch CKA (Nguyen et al. 2021): unbiased HSIC_1
  (Song et al. 2007) of linear Gram matrices per minibatch, averaged over minibatches
  separately for XY, XX and YY, then normalised.  Independent of the sample count
  in expectation (no O(1/n) inflation).
* ``rbf`` -- the same minibatch scheme with RBF kernels (median-heuristic bandwidth
  per minibatch and layer) and unbiased HSIC_1.

Conventions: all math in float64; a "sample" (unit) is either one real token
(``unit="tokens"``, padding removed with the attention mask) or one sequence
(``unit="mean_pool"``, mean over its real tokens).  Layer ``i`` means
``hidden_states[i]`` of a HF model called with ``output_hidden_states=True``:
0 = embedding output, ``i`` = output of decoder layer ``i``, and the last index is
the last decoder layer *after* the final norm (that is what HF returns there).

Guard for undefined values: when a normaliser (HSIC(X, X) or HSIC(Y, Y)) is <= 0
or not finite -- a constant representation, or an unbiased estimate that came out
negative -- CKA is reported as 0.0 ("no measurable signal"), never NaN.  A negative
*numerator* is kept: the unbiased estimate can be slightly below 0 around
independence, and clamping it would reintroduce a positive bias.
"""
from __future__ import annotations

import inspect
import io
import math
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

ESTIMATORS = ("linear", "unbiased_minibatch", "rbf")
UNITS = ("tokens", "mean_pool")
F64 = torch.float64


# ============================================================== pure functions
def _f64(x: Any, name: str = "X", ndim: int = 2) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t.to(F64)


def _same_n(X: torch.Tensor, Y: torch.Tensor) -> int:
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must have the same number of rows (samples), got {X.shape[0]} and {Y.shape[0]}")
    return X.shape[0]


def center(X: torch.Tensor) -> torch.Tensor:
    """Column centering.  X: [n, d] -> [n, d] float64 with zero column means."""
    X = _f64(X)
    return X - X.mean(0, keepdim=True)


def center_gram(K: torch.Tensor) -> torch.Tensor:
    """H K H with H = I - 11^T/n.  K: [n, n] -> [n, n] float64 (double centering)."""
    K = _f64(K, "K")
    return K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()


def linear_gram(X: torch.Tensor) -> torch.Tensor:
    """K = X X^T.  X: [n, d] -> [n, n] float64."""
    X = _f64(X)
    return X @ X.T


def cka_from_hsic(hxy: torch.Tensor, hxx: torch.Tensor, hyy: torch.Tensor) -> torch.Tensor:
    """CKA = hxy / sqrt(hxx hyy), guarded.  hxy: [La, Lb], hxx: [La], hyy: [Lb] -> [La, Lb].

    Where hxx or hyy is <= 0 or not finite the result is 0.0 (never NaN/inf).
    """
    hxy, hxx, hyy = hxy.to(F64), hxx.to(F64), hyy.to(F64)
    ok_x = torch.isfinite(hxx) & (hxx > 0)                          # [La]
    ok_y = torch.isfinite(hyy) & (hyy > 0)                          # [Lb]
    sx = torch.where(ok_x, hxx, torch.ones_like(hxx)).sqrt()        # [La]
    sy = torch.where(ok_y, hyy, torch.ones_like(hyy)).sqrt()        # [Lb]
    out = hxy / (sx[:, None] * sy[None, :])                         # [La, Lb]
    ok = ok_x[:, None] & ok_y[None, :] & torch.isfinite(out)
    return torch.where(ok, out, torch.zeros_like(out))


def _cka_scalar(hxy: torch.Tensor, hxx: torch.Tensor, hyy: torch.Tensor) -> float:
    return float(cka_from_hsic(hxy.reshape(1, 1), hxx.reshape(1), hyy.reshape(1))[0, 0])


def linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Biased linear CKA.  X: [n, dx], Y: [n, dy] -> float in [0, 1].

    Feature form after column centering: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F).
    When n is small relative to the widths the (equal) Gram form
    <Kc, Lc> / (||Kc||_F ||Lc||_F) is cheaper and used instead.
    """
    X, Y = center(X), center(Y)                                      # [n, dx], [n, dy]
    n, dx, dy = X.shape[0], X.shape[1], Y.shape[1]
    _same_n(X, Y)
    if n * (dx * dy + dx * dx + dy * dy) <= n * n * (dx + dy + 1):  # feature form is cheaper
        hxy = (Y.T @ X).square().sum()                              # ||Y^T X||_F^2
        hxx = (X.T @ X).square().sum()                              # ||X^T X||_F^2
        hyy = (Y.T @ Y).square().sum()
    else:
        K, L = X @ X.T, Y @ Y.T                                      # [n, n] (already centred)
        hxy, hxx, hyy = (K * L).sum(), K.square().sum(), L.square().sum()
    return _cka_scalar(hxy, hxx, hyy)


def hsic_biased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Biased HSIC_0 = tr(K H L H) / (n-1)^2.  K, L: [n, n] -> 0-d float64."""
    K, L = _f64(K, "K"), _f64(L, "L")
    n = _same_n(K, L)
    if n < 2:
        raise ValueError(f"biased HSIC needs n >= 2 samples, got n={n}")
    return (center_gram(K) * L.T).sum() / (n - 1) ** 2             # tr(HKH L) = sum (HKH) * L^T


def _check_unbiased_n(n: int) -> None:
    if n < 4:
        raise ValueError(f"unbiased HSIC (Song et al. 2007) needs n >= 4 samples per batch, got n={n}; "
                         "use larger batches (or the biased 'linear' estimator)")


def hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC_1 (Song et al. 2007).  K, L: symmetric [n, n], n >= 4 -> 0-d float64.

    With the diagonals of K, L zeroed (K~, L~):
    HSIC_1 = [tr(K~L~) + (1'K~1)(1'L~1)/((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)).
    """
    K, L = _f64(K, "K"), _f64(L, "L")
    n = _same_n(K, L)
    _check_unbiased_n(n)
    return hsic_unbiased_pairs(K[None], L[None])[0, 0]


def _zero_diag(Ks: torch.Tensor) -> torch.Tensor:
    """Ks: [m, n, n] -> copy with each diagonal set to 0."""
    Ks = Ks.clone()
    Ks.diagonal(dim1=-2, dim2=-1).zero_()
    return Ks


def _hsic1_combine(tr: torch.Tensor, sk: torch.Tensor, sl: torch.Tensor, kl: torch.Tensor, n: int) -> torch.Tensor:
    """HSIC_1 from its terms (any broadcastable shapes): tr(K~L~), 1'K~1, 1'L~1, 1'K~L~1."""
    return (tr + sk * sl / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * kl) / (n * (n - 3))


def hsic_unbiased_pairs(Ks: torch.Tensor, Ls: torch.Tensor) -> torch.Tensor:
    """HSIC_1 for every pair of kernels.  Ks: [La, n, n], Ls: [Lb, n, n] symmetric -> [La, Lb].

    Each Gram is formed once; all pair terms are matrix products:
    tr(K~_a L~_b) = vec(K~_a) . vec(L~_b), 1'K~_a L~_b 1 = (K~_a 1) . (L~_b 1).
    """
    Ks, Ls = _f64(Ks, "Ks", 3), _f64(Ls, "Ls", 3)
    n = Ks.shape[-1]
    if Ls.shape[-1] != n or Ks.shape[-2] != n or Ls.shape[-2] != n:
        raise ValueError(f"kernels must be square with the same n, got {tuple(Ks.shape)} and {tuple(Ls.shape)}")
    _check_unbiased_n(n)
    Ks, Ls = _zero_diag(Ks), _zero_diag(Ls)                          # [La, n, n], [Lb, n, n]
    tr = Ks.reshape(Ks.shape[0], -1) @ Ls.reshape(Ls.shape[0], -1).T  # [La, Lb]
    rk, rl = Ks.sum(2), Ls.sum(2)                                   # row sums [La, n], [Lb, n]
    sk, sl = rk.sum(1), rl.sum(1)                                   # [La], [Lb]
    return _hsic1_combine(tr, sk[:, None], sl[None, :], rk @ rl.T, n)


def hsic_unbiased_self(Ks: torch.Tensor) -> torch.Tensor:
    """HSIC_1(K_a, K_a) for each kernel.  Ks: [L, n, n] -> [L] (diagonal of the pairs matrix)."""
    Ks = _f64(Ks, "Ks", 3)
    n = Ks.shape[-1]
    _check_unbiased_n(n)
    Ks = _zero_diag(Ks)
    rk = Ks.sum(2)                                                  # [L, n]
    sk = rk.sum(1)                                                  # [L]
    return _hsic1_combine(Ks.square().sum((1, 2)), sk, sk, rk.square().sum(1), n)


def median_distance(X: torch.Tensor) -> torch.Tensor:
    """Median of the pairwise Euclidean distances between distinct rows.  X: [n, d] -> 0-d."""
    X = _f64(X)
    n = X.shape[0]
    if n < 2:
        raise ValueError(f"the median heuristic needs n >= 2 samples, got n={n}")
    sq = _sq_dists(X)
    d = sq[~torch.eye(n, dtype=torch.bool, device=X.device)].sqrt()  # each pair twice: same median
    v = d.sort().values
    m = v.numel()
    return (v[(m - 1) // 2] + v[m // 2]) / 2


def _sq_dists(X: torch.Tensor) -> torch.Tensor:
    """X: [n, d] -> [n, n] squared Euclidean distances (>= 0, zero diagonal)."""
    G = X @ X.T
    g = G.diagonal()
    sq = (g[:, None] + g[None, :] - 2 * G).clamp_min(0)
    sq.fill_diagonal_(0)
    return sq


def rbf_kernel(X: torch.Tensor, sigma: float | None = None, factor: float = 1.0) -> torch.Tensor:
    """RBF Gram exp(-||x_i - x_j||^2 / (2 sigma^2)).  X: [n, d] -> [n, n] float64.

    ``sigma=None``: median heuristic, sigma = factor * median pairwise distance
    (over distinct pairs; Kornblith et al. include the zero diagonal, which only
    shifts the median for tiny n).  A zero bandwidth (all points identical, or
    ``factor=0``) returns the sigma -> 0 limit, 1 where points coincide else 0.
    """
    X = _f64(X)
    sq = _sq_dists(X)                                               # [n, n]
    if sigma is None:
        sigma = float(median_distance(X)) * factor
    if not sigma > 0 or not math.isfinite(sigma):
        return (sq == 0).to(F64)
    return torch.exp(-sq / (2.0 * sigma * sigma))


def kernel_cka(K: torch.Tensor, L: torch.Tensor, unbiased: bool = False) -> float:
    """HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)).  K, L: [n, n] -> float (guarded, never NaN)."""
    hsic = hsic_unbiased if unbiased else hsic_biased
    return _cka_scalar(hsic(K, L), hsic(K, K), hsic(L, L))


def _gram(X: torch.Tensor, kernel: str, rbf_factor: float) -> torch.Tensor:
    """X: [n, d] -> [n, n].  Linear Grams are built from the batch-centred X: HSIC_1 is
    exactly invariant to that shift, and it avoids cancellation with large feature means."""
    if kernel == "linear":
        return linear_gram(center(X))
    if kernel == "rbf":
        return rbf_kernel(X, factor=rbf_factor)
    raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")


class MinibatchCKA:
    """Streaming minibatch CKA of one pair (Nguyen et al. 2021).

    ``update(X_b, Y_b)`` with X_b: [n_b, dx], Y_b: [n_b, dy], n_b >= 4; ``compute()`` ->
    mean_b HSIC_1(K_b, L_b) / sqrt(mean_b HSIC_1(K_b, K_b) * mean_b HSIC_1(L_b, L_b)).
    """

    def __init__(self, kernel: str = "linear", rbf_factor: float = 1.0):
        if kernel not in ("linear", "rbf"):
            raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")
        self.kernel, self.rbf_factor = kernel, rbf_factor
        self.hxy = self.hxx = self.hyy = 0.0
        self.n_batches = 0
        self.n = 0

    def update(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        X, Y = _f64(X), _f64(Y)
        n = _same_n(X, Y)
        _check_unbiased_n(n)
        K, L = _gram(X, self.kernel, self.rbf_factor), _gram(Y, self.kernel, self.rbf_factor)
        self.hxy += float(hsic_unbiased(K, L))
        self.hxx += float(hsic_unbiased(K, K))
        self.hyy += float(hsic_unbiased(L, L))
        self.n_batches += 1
        self.n += n

    def compute(self) -> float:
        if self.n_batches == 0:
            raise ValueError("MinibatchCKA.compute() called before any update()")
        b = self.n_batches
        h = torch.tensor([self.hxy / b, self.hxx / b, self.hyy / b], dtype=F64)
        return _cka_scalar(h[0], h[1], h[2])


# ============================================================== layer-pair matrices
class CKAMatrix:
    """Streaming [La, Lb] CKA matrix between the layers of model A and model B.

    ``update(states_a, states_b)``: lists of La and Lb tensors, each [n, d] for the same
    n samples (already masked/pooled).  ``compute()`` -> [La, Lb] float64 (CPU).

    * ``linear``: exact biased linear CKA over all samples seen; keeps the column sums,
      per-layer X^T X, Y^T Y and the full cross-covariance [sum d_a, sum d_b] (float64),
      centred analytically at the end: X_c^T Y_c = X^T Y - n mu_x mu_y^T.
    * ``unbiased_minibatch`` / ``rbf``: HSIC_1 per minibatch for all pairs at once (each
      layer's Gram computed once per minibatch), averaged over minibatches.  With
      ``minibatch_size=None`` each ``update`` is one minibatch (needs n >= 4); with an
      integer m, rows are buffered and processed in minibatches of exactly m; a final
      remainder of >= 4 rows counts as one more (smaller) minibatch, fewer are dropped
      (counted by ``dropped``).
    """

    def __init__(self, n_layers_a: int, n_layers_b: int, estimator: str = "linear", *,
                 minibatch_size: int | None = None, rbf_factor: float = 1.0,
                 device: str | torch.device | None = None):
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown CKA estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if n_layers_a < 1 or n_layers_b < 1:
            raise ValueError(f"need at least one layer per model, got {n_layers_a} and {n_layers_b}")
        if minibatch_size is not None and minibatch_size < 4:
            raise ValueError(f"minibatch_size must be >= 4 (unbiased HSIC), got {minibatch_size}")
        self.La, self.Lb, self.estimator = n_layers_a, n_layers_b, estimator
        self.minibatch_size, self.rbf_factor = minibatch_size, rbf_factor
        self.device = torch.device(device) if device is not None else None
        self.n = 0            # samples seen
        self.n_batches = 0    # update() calls
        self.n_minibatches = 0  # full minibatches accumulated (see also .minibatches, .dropped)
        self._stats: dict[str, Any] | None = None       # linear sufficient statistics
        self._h: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # minibatch HSIC sums
        self._buf_a: list[torch.Tensor] = []
        self._buf_b: list[torch.Tensor] = []
        self._dims_a: list[int] | None = None
        self._dims_b: list[int] | None = None

    # ---------------------------------------------------------------- input checks
    def _prepare(self, states: Sequence[torch.Tensor], L: int, which: str) -> list[torch.Tensor]:
        if len(states) != L:
            raise ValueError(f"model {which}: expected {L} layer states, got {len(states)}")
        out = []
        for i, s in enumerate(states):
            if s.ndim != 2:
                raise ValueError(f"model {which} layer {i}: states must be [n, d], got shape {tuple(s.shape)}")
            if self.device is None:
                self.device = s.device
            out.append(s.detach().to(self.device))  # dtype kept; upcast where it is used
        return out

    def update(self, states_a: Sequence[torch.Tensor], states_b: Sequence[torch.Tensor]) -> None:
        A = self._prepare(states_a, self.La, "A")                     # La x [n, d_a], input dtype
        B = self._prepare(states_b, self.Lb, "B")
        ns = {s.shape[0] for s in A + B}
        if len(ns) != 1:
            raise ValueError(f"all layer states of one batch must have the same number of rows, got {sorted(ns)}")
        n = ns.pop()
        dims_a, dims_b = [s.shape[1] for s in A], [s.shape[1] for s in B]
        if self._dims_a is None:
            self._dims_a, self._dims_b = dims_a, dims_b
        elif dims_a != self._dims_a or dims_b != self._dims_b:
            raise ValueError(f"layer widths changed between batches: A {self._dims_a} -> {dims_a}, "
                             f"B {self._dims_b} -> {dims_b}")
        self.n_batches += 1
        self.n += n
        if n == 0:
            return
        if self.estimator == "linear":
            self._update_linear(A, B)
        elif self.minibatch_size is None:
            _check_unbiased_n(n)
            self._add_minibatch(A, B)
        else:
            self._buf_a.append(torch.cat([a.to(F64) for a in A], 1))  # [n, sum d_a]
            self._buf_b.append(torch.cat([b.to(F64) for b in B], 1))
            have = sum(x.shape[0] for x in self._buf_a)
            if have >= self.minibatch_size:
                Xa, Xb = torch.cat(self._buf_a), torch.cat(self._buf_b)
                m = self.minibatch_size
                full = have // m * m
                for s in range(0, full, m):
                    self._add_minibatch(self._split(Xa[s:s + m], "a"), self._split(Xb[s:s + m], "b"))
                self._buf_a, self._buf_b = [Xa[full:]], [Xb[full:]]

    def _split(self, X: torch.Tensor, which: str) -> list[torch.Tensor]:
        dims = self._dims_a if which == "a" else self._dims_b
        return list(torch.split(X, dims, dim=1))

    # ---------------------------------------------------------------- linear (streamed)
    @staticmethod
    def _shifted(states: list[torch.Tensor], shifts: list[torch.Tensor]) -> torch.Tensor:
        """L x [n, d_l] (any dtype) -> [n, sum d_l] float64 of (state - shift), one copy."""
        n = states[0].shape[0]
        out = torch.empty(n, sum(s.shape[1] for s in states), dtype=F64, device=states[0].device)
        o = 0
        for s, m in zip(states, shifts):
            torch.sub(s, m, out=out[:, o:o + s.shape[1]])  # upcasts into the float64 slice
            o += s.shape[1]
        return out

    def _update_linear(self, A: list[torch.Tensor], B: list[torch.Tensor]) -> None:
        if self._stats is None:
            # shift by the first batch's mean: centring is shift-invariant, and it keeps
            # the final analytic centring free of cancellation with large feature means
            Da, Db = sum(self._dims_a), sum(self._dims_b)
            self._stats = {
                "shift_a": [s.to(F64).mean(0) for s in A], "shift_b": [s.to(F64).mean(0) for s in B],
                "sum_a": torch.zeros(Da, dtype=F64, device=self.device),
                "sum_b": torch.zeros(Db, dtype=F64, device=self.device),
                "cross": torch.zeros(Da, Db, dtype=F64, device=self.device),
                "aa": [torch.zeros(d, d, dtype=F64, device=self.device) for d in self._dims_a],
                "bb": [torch.zeros(d, d, dtype=F64, device=self.device) for d in self._dims_b],
            }
        st = self._stats
        Xa = self._shifted(A, st["shift_a"])                          # [n, Da] float64
        Xb = self._shifted(B, st["shift_b"])                          # [n, Db]
        st["sum_a"] += Xa.sum(0)
        st["sum_b"] += Xb.sum(0)
        st["cross"].addmm_(Xa.T, Xb)                                  # += X^T Y  [Da, Db]
        for acc, X in zip(st["aa"], torch.split(Xa, self._dims_a, 1)):
            acc.addmm_(X.T, X)                                        # += X_l^T X_l
        for acc, X in zip(st["bb"], torch.split(Xb, self._dims_b, 1)):
            acc.addmm_(X.T, X)

    def _compute_linear(self) -> torch.Tensor:
        st = self._stats
        n = self.n
        mu_a, mu_b = st["sum_a"] / n, st["sum_b"] / n                 # [Da], [Db]
        S = torch.addr(st["cross"], mu_a, mu_b, alpha=-n).square_()    # (X_c^T Y_c)^2  [Da, Db]
        dev = S.device
        ia = torch.repeat_interleave(torch.arange(self.La, device=dev),
                                     torch.tensor(self._dims_a, device=dev))  # [Da] layer id of each row
        ib = torch.repeat_interleave(torch.arange(self.Lb, device=dev),
                                     torch.tensor(self._dims_b, device=dev))  # [Db]
        rows = torch.zeros(self.La, S.shape[1], dtype=F64, device=dev).index_add_(0, ia, S)  # [La, Db]
        hxy = torch.zeros(self.La, self.Lb, dtype=F64, device=dev).index_add_(1, ib, rows)  # [La, Lb]
        hxx = torch.stack([torch.addr(G, m, m, alpha=-n).square_().sum()
                           for G, m in zip(st["aa"], torch.split(mu_a, self._dims_a))])  # [La]
        hyy = torch.stack([torch.addr(G, m, m, alpha=-n).square_().sum()
                           for G, m in zip(st["bb"], torch.split(mu_b, self._dims_b))])  # [Lb]
        return cka_from_hsic(hxy, hxx, hyy)

    # ---------------------------------------------------------------- minibatch (unbiased)
    def _grams(self, states: list[torch.Tensor]) -> torch.Tensor:
        kernel = "rbf" if self.estimator == "rbf" else "linear"
        return torch.stack([_gram(s, kernel, self.rbf_factor) for s in states])  # [L, n, n]

    def _minibatch_terms(self, A: list[torch.Tensor], B: list[torch.Tensor]):
        Ka, Kb = self._grams(A), self._grams(B)                       # [La, n, n], [Lb, n, n]
        return hsic_unbiased_pairs(Ka, Kb), hsic_unbiased_self(Ka), hsic_unbiased_self(Kb)

    def _add_minibatch(self, A: list[torch.Tensor], B: list[torch.Tensor]) -> None:
        terms = self._minibatch_terms(A, B)
        self._h = terms if self._h is None else tuple(h + t for h, t in zip(self._h, terms))
        self.n_minibatches += 1

    # ---------------------------------------------------------------- result
    def compute(self) -> torch.Tensor:
        """[La, Lb] float64 CKA matrix on the CPU (does not change the accumulator)."""
        if self.estimator == "linear":
            if self._stats is None or self.n < 2:
                raise ValueError(f"linear CKA needs at least 2 samples, got {self.n}")
            return self._compute_linear().cpu()
        h, count = self._h, self.n_minibatches
        rest = sum(x.shape[0] for x in self._buf_a)
        if rest >= 4:  # a final, smaller minibatch (not stored: compute() stays side-effect free)
            Xa, Xb = torch.cat(self._buf_a), torch.cat(self._buf_b)
            t = self._minibatch_terms(self._split(Xa, "a"), self._split(Xb, "b"))
            h = t if h is None else tuple(a + b for a, b in zip(h, t))
            count += 1
        if h is None:
            raise ValueError(f"{self.estimator} CKA needs at least one minibatch of >= 4 samples, got {self.n} samples")
        hxy, hxx, hyy = (x / count for x in h)
        return cka_from_hsic(hxy, hxx, hyy).cpu()

    @property
    def minibatches(self) -> int:
        """Minibatches that enter compute() (including a final partial one of >= 4 rows)."""
        rest = sum(x.shape[0] for x in self._buf_a)
        return self.n_minibatches + (1 if rest >= 4 else 0)

    @property
    def dropped(self) -> int:
        """Samples left out of the minibatch estimate (a final remainder of < 4 rows)."""
        rest = sum(x.shape[0] for x in self._buf_a)
        return rest if 0 < rest < 4 else 0


def matched_layers(n_a: int, n_b: int) -> list[int]:
    """Relative-depth matching: position i of A (of n_a) -> round(i (n_b-1)/(n_a-1)) of B.

    Halves round up.  A single layer of A matches B's last.
    """
    if n_a < 1 or n_b < 1:
        raise ValueError(f"need at least one layer per side, got {n_a} and {n_b}")
    if n_a == 1:
        return [n_b - 1]
    return [(2 * i * (n_b - 1) + (n_a - 1)) // (2 * (n_a - 1)) for i in range(n_a)]


# ============================================================== hidden states of HF models
def select_units(h: torch.Tensor, mask: torch.Tensor | None, unit: str, skip_first: int = 0) -> torch.Tensor:
    """Drop padding and form samples.  h: [B, T, d], mask: [B, T] (1 = real token) or None.

    unit="tokens" -> [n_real_tokens, d]; unit="mean_pool" -> [n_seqs_with_tokens, d]
    (mean of each sequence's real tokens; sequences without any are dropped).
    ``skip_first=k`` also drops the first k real tokens of every sequence (wherever the
    padding is): LLMs put massive activations on the first position (attention sink),
    which otherwise dominate linear CKA -- see docs/cka.md.
    """
    if unit not in UNITS:
        raise ValueError(f"unknown CKA unit {unit!r}; choose one of {', '.join(UNITS)}")
    if h.ndim != 3:
        raise ValueError(f"hidden states must be [batch, seq, dim], got shape {tuple(h.shape)}")
    if mask is None:
        mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
    if mask.shape != h.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match hidden states {tuple(h.shape[:2])}")
    m = mask.to(h.device).bool()
    if skip_first < 0:
        raise ValueError(f"skip_first must be >= 0, got {skip_first}")
    if skip_first:
        m = m & (m.long().cumsum(1) > skip_first)                   # rank among real tokens >= k
    if unit == "tokens":
        return h[m]                                                  # [n_tok, d]
    cnt = m.sum(1)                                                   # [B]
    w = m.to(F64)
    pooled = torch.einsum("btd,bt->bd", h.to(F64), w) / cnt.clamp_min(1)[:, None].to(F64)  # [B, d]
    return pooled[cnt > 0]


def _batch_tensors(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(f"a CKA batch needs 'input_ids' (and optionally 'attention_mask'); got keys {sorted(batch)}")
        ids = torch.as_tensor(batch["input_ids"])
        am = batch.get("attention_mask")
        return ids, (torch.as_tensor(am) if am is not None else None)
    raise ValueError(f"a CKA batch must be a dict with input_ids/attention_mask or an input_ids tensor, "
                     f"got {type(batch).__name__}")


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def resolve_layers(layers: Sequence[int] | None, n_hidden: int) -> list[int]:
    """Layer indices into hidden_states (n_hidden = num_layers + 1 entries).

    None -> 1..num_layers (every decoder layer, no embedding output); negative
    indices count from the end (-1 = last layer, after the final norm).
    """
    if layers is None:
        return list(range(1, n_hidden))
    out = []
    for i in layers:
        j = int(i) + n_hidden if int(i) < 0 else int(i)
        if not 0 <= j < n_hidden:
            raise ValueError(f"layer {i} out of range: this model has hidden states 0..{n_hidden - 1} "
                             f"(0 = embeddings, {n_hidden - 1} = last layer after the final norm)")
        out.append(j)
    return out


@torch.no_grad()
def hidden_for_batch(model, batch: Any, layers: Sequence[int] | None = None, unit: str = "tokens",
                     skip_first: int = 0) -> tuple[list[torch.Tensor], list[int]]:
    """One forward pass -> ([n, d] per chosen layer, resolved layer indices).

    Padding positions (attention_mask == 0) are removed before anything is returned.
    States stay on the model's device in the model's dtype; accumulators upcast.
    """
    if unit not in UNITS:
        raise ValueError(f"unknown CKA unit {unit!r}; choose one of {', '.join(UNITS)}")
    ids, am = _batch_tensors(batch)
    dev = _model_device(model)
    kw: dict[str, Any] = {"input_ids": ids.to(dev), "output_hidden_states": True, "return_dict": True}
    if am is not None:
        kw["attention_mask"] = am.to(dev)
    if _accepts(model, "use_cache"):
        kw["use_cache"] = False
    if _accepts(model, "logits_to_keep"):
        kw["logits_to_keep"] = 1  # the lm-head over the full sequence is not needed
    out = model(**kw)
    hs = out.hidden_states
    if hs is None:
        raise ValueError(f"{type(model).__name__} returned no hidden_states with output_hidden_states=True")
    idx = resolve_layers(layers, len(hs))
    return [select_units(hs[i], am, unit, skip_first) for i in idx], idx


def collect_hidden(model, batches: Iterable[Any], layers: Sequence[int] | None = None,
                   unit: str = "tokens", skip_first: int = 0) -> Iterator[list[torch.Tensor]]:
    """Generator: for each batch, the list of [n, d] states of the chosen layers.

    Runs the model in eval mode under no_grad (restoring its mode afterwards); nothing
    is kept between batches.
    """
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            yield hidden_for_batch(model, batch, layers, unit, skip_first)[0]
    finally:
        model.train(was_training)


def model_cka(model_a, model_b, batches: Iterable[Any], layers_a: Sequence[int] | None = None,
              layers_b: Sequence[int] | None = None, estimator: str = "linear", unit: str = "tokens",
              device: str | torch.device | None = None, minibatch_size: int | None = 1024,
              rbf_factor: float = 1.0, skip_first: int = 0) -> dict:
    """Layer-pair CKA between two HF causal LMs on the same batches (A = rows, B = columns).

    Each batch (dict with input_ids [B, T] and attention_mask [B, T], or an input_ids
    tensor) goes through both models once; hidden states are masked, pooled if
    ``unit="mean_pool"``, fed to a :class:`CKAMatrix` on ``device`` (default: model A's
    device) and dropped.  ``minibatch_size`` applies to the minibatch estimators;
    ``skip_first`` drops the first k real tokens of each sequence (see :func:`select_units`).

    Returns a JSON-ready dict: matrix [La][Lb], matched (CKA of relative-depth matched
    layers, see :func:`matched_layers`), matched_layers [[a, b], ...], mean_matched,
    diagonal (== matched when La == Lb, else None), layers_a, layers_b, estimator, unit,
    n (tokens or sequences), n_batches, n_minibatches, minibatch_size, n_dropped,
    rbf_factor, skip_first, dtype.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown CKA estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if unit not in UNITS:
        raise ValueError(f"unknown CKA unit {unit!r}; choose one of {', '.join(UNITS)}")
    acc: CKAMatrix | None = None
    la = lb = None
    modes = (model_a.training, model_b.training)
    model_a.eval()
    model_b.eval()
    try:
        for batch in batches:
            ha, la = hidden_for_batch(model_a, batch, layers_a, unit, skip_first)
            hb, lb = hidden_for_batch(model_b, batch, layers_b, unit, skip_first)
            if acc is None:
                acc = CKAMatrix(len(la), len(lb), estimator,
                                minibatch_size=minibatch_size if estimator != "linear" else None,
                                rbf_factor=rbf_factor, device=device or ha[0].device)
            acc.update(ha, hb)
            del ha, hb
    finally:
        model_a.train(modes[0])
        model_b.train(modes[1])
    if acc is None:
        raise ValueError("model_cka got no batches")
    M = acc.compute()
    match = matched_layers(len(la), len(lb))
    matched = [float(M[i, j]) for i, j in enumerate(match)]
    return {
        "matrix": M.tolist(),
        "matched": matched,
        "matched_layers": [[la[i], lb[j]] for i, j in enumerate(match)],
        "mean_matched": sum(matched) / len(matched),
        "diagonal": [float(M[i, i]) for i in range(len(la))] if len(la) == len(lb) else None,
        "layers_a": la,
        "layers_b": lb,
        "estimator": estimator,
        "unit": unit,
        "n": acc.n,
        "n_batches": acc.n_batches,
        "n_minibatches": acc.minibatches if estimator != "linear" else None,
        "minibatch_size": minibatch_size if estimator != "linear" else None,
        "n_dropped": acc.dropped if estimator != "linear" else 0,
        "rbf_factor": rbf_factor if estimator == "rbf" else None,
        "skip_first": skip_first,
        "dtype": "float64",
    }


# ============================================================== heatmap
def plot_cka_heatmap(matrix, path: str | Path, title: str = "CKA", *,
                     xlabel: str = "teacher layer", ylabel: str = "student layer",
                     xticklabels: Sequence[Any] | None = None, yticklabels: Sequence[Any] | None = None,
                     annotate: bool | None = None, dpi: int = 150) -> Path:
    """Write a PNG heatmap of a [rows, cols] CKA matrix (rows = y axis = student / model A).

    Colour scale fixed to [0, 1] with a colour bar; layer 0 at the bottom-left so matched
    layers run along the rising diagonal; values printed in the cells when the matrix is
    small (<= 12 x 12) unless ``annotate`` says otherwise.  Written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from scd.core.results import atomic_write_bytes

    M = torch.as_tensor(matrix, dtype=F64).cpu()
    if M.ndim != 2 or M.numel() == 0:
        raise ValueError(f"CKA matrix must be a non-empty 2-D array, got shape {tuple(M.shape)}")
    R, C = M.shape
    xt = list(xticklabels) if xticklabels is not None else list(range(C))
    yt = list(yticklabels) if yticklabels is not None else list(range(R))
    if len(xt) != C or len(yt) != R:
        raise ValueError(f"tick labels ({len(yt)} rows, {len(xt)} cols) do not match the matrix {R}x{C}")
    w = min(14.0, max(4.5, 0.35 * C + 2.5))
    h = min(12.0, max(3.8, 0.35 * R + 1.5))
    fig = Figure(figsize=(w, h), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(M.numpy(), vmin=0.0, vmax=1.0, cmap="magma", origin="lower", aspect="auto",
                   interpolation="nearest")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("CKA")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    step_x, step_y = max(1, math.ceil(C / 16)), max(1, math.ceil(R / 16))
    ax.set_xticks(range(0, C, step_x), [str(t) for t in xt[::step_x]])
    ax.set_yticks(range(0, R, step_y), [str(t) for t in yt[::step_y]])
    if annotate is None:
        annotate = R <= 12 and C <= 12
    if annotate:
        for i in range(R):
            for j in range(C):
                v = float(M[i, j])
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 else "white")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ============================================================== command line
def _read_texts(path: str, field: str, limit: int) -> list[str]:
    """``.jsonl``: the ``field`` of each record (e.g. the shared data records' "input");
    anything else: one text per non-empty line."""
    import json

    texts: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                rec = json.loads(line)
                if field not in rec:
                    raise ValueError(f"{path}:{lineno}: record has no field {field!r} (keys: {sorted(rec)}); "
                                     "choose one with --field")
                texts.append(str(rec[field]))
            else:
                texts.append(line.rstrip("\n"))
            if len(texts) >= limit:
                break
    if not texts:
        raise ValueError(f"{path}: no texts found")
    return texts


def _text_batches(tok, texts: list[str], batch_size: int, max_length: int) -> list[dict]:
    tok.padding_side = "right"  # positions of real tokens do not depend on padding
    return [dict(tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                     max_length=max_length)) for i in range(0, len(texts), batch_size)]


def _parse_layers(spec: str | None) -> list[int] | None:
    if spec in (None, "", "all"):
        return None
    return [int(x) for x in spec.split(",")]


def main(argv: list[str] | None = None) -> int:
    """python -m benchmarks.cka --model-a smollm2-135m --model-b smollm2-135m --random-init-b \\
           --texts ~/.cache/scd/data/multiemo_en/test.jsonl --out results/cka/smollm2_vs_random"""
    import argparse
    import copy
    import json

    from scd.core.results import atomic_write_json
    from scd.models import ModelConfig, build_model, check_same_tokenizer

    ap = argparse.ArgumentParser(prog="python -m benchmarks.cka", description="Layer-pair CKA between two models "
                                 "(A = rows / student, B = columns / teacher); writes cka.json and cka.png.")
    ap.add_argument("--model-a", required=True, help="model name or path (scd.models names, e.g. smollm2-135m)")
    ap.add_argument("--model-b", required=True)
    ap.add_argument("--random-init-b", action="store_true", help="re-initialise model B randomly (same architecture)")
    ap.add_argument("--seed-b", type=int, default=0, help="seed of the random init of B")
    ap.add_argument("--texts", required=True, help=".jsonl (field --field) or a text file with one text per line")
    ap.add_argument("--field", default="input")
    ap.add_argument("--max-examples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--layers-a", default=None, help="comma-separated hidden-state indices (default: all layers)")
    ap.add_argument("--layers-b", default=None)
    ap.add_argument("--estimator", default="linear", choices=ESTIMATORS)
    ap.add_argument("--unit", default="tokens", choices=UNITS)
    ap.add_argument("--minibatch-size", type=int, default=1024)
    ap.add_argument("--skip-first", type=int, default=0,
                    help="drop the first k real tokens of each sequence (attention-sink outliers)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)

    model_a, tok = build_model(ModelConfig(name=args.model_a))
    if args.model_b == args.model_a and not args.random_init_b:
        model_b = model_a
    else:
        model_b, tok_b = build_model(ModelConfig(name=args.model_b))
        check_same_tokenizer(tok, tok_b, "model A", "model B")
    if args.random_init_b:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed_b)
            model_b = type(model_b)(copy.deepcopy(model_b.config))
    model_a.to(args.device)
    model_b.to(args.device)
    texts = _read_texts(os.path.expanduser(args.texts), args.field, args.max_examples)
    batches = _text_batches(tok, texts, args.batch_size, args.max_length)
    res = model_cka(model_a, model_b, batches, _parse_layers(args.layers_a), _parse_layers(args.layers_b),
                    estimator=args.estimator, unit=args.unit, device=args.device, minibatch_size=args.minibatch_size,
                    skip_first=args.skip_first)
    res.update(model_a=args.model_a, model_b=args.model_b + (f" (random init, seed {args.seed_b})"
                                                             if args.random_init_b else ""),
               texts=args.texts, n_texts=len(texts), max_length=args.max_length,
               command="python -m benchmarks.cka " + " ".join(sys.argv[1:] if argv is None else argv))
    out = Path(args.out)
    atomic_write_json(out / "cka.json", res)
    skip = f", first {args.skip_first} skipped" if args.skip_first else ""
    plot_cka_heatmap(res["matrix"], out / "cka.png", f"{args.estimator} CKA ({args.unit}{skip}, n={res['n']})",
                     xlabel=f"model B layer: {res['model_b']}", ylabel=f"model A layer: {args.model_a}",
                     xticklabels=res["layers_b"], yticklabels=res["layers_a"])
    print(json.dumps({k: res[k] for k in ("mean_matched", "n", "estimator", "unit")}))
    print("matched:", " ".join(f"{v:.3f}" for v in res["matched"]))
    print(f"wrote {out / 'cka.json'} and {out / 'cka.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
