"""CKA math: centering, Gram matrices, biased/unbiased HSIC, RBF kernels, scalar CKA and the
streaming minibatch estimator of one pair (pure functions on float64 tensors; see the package doc)."""
from __future__ import annotations

import math
from typing import Any

import torch

ESTIMATORS = ("linear", "unbiased_minibatch", "rbf")
UNITS = ("tokens", "mean_pool")
F64 = torch.float64


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
