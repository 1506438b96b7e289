"""Streaming [La, Lb] CKA matrices between the layers of two models, and relative-depth layer matching."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.cka.estimators import (ESTIMATORS, F64, _check_unbiased_n, _gram, cka_from_hsic, hsic_unbiased_pairs,
                                       hsic_unbiased_self)


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
