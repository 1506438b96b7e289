"""Pruning scores and keep-masks of weight tensors: magnitude / Wanda scores, unstructured and N:M
masks (pure functions; rules in the package doc)."""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def prune_scores(w: Tensor, act_norm: Tensor | None = None) -> Tensor:
    """Importance of each weight, [out, in]: |W| (magnitude) or |W| * ||X_j|| (Wanda).

    act_norm: [in] L2 norm of each input feature over the calibration tokens.
    """
    s = w.detach().float().abs()
    if act_norm is None:
        return s
    if act_norm.shape != (w.shape[1],):
        raise ValueError(f"activation norms {tuple(act_norm.shape)} do not match the weight's "
                         f"{w.shape[1]} input features")
    return s * act_norm.float().to(s.device)[None, :]


def unstructured_mask(scores: Tensor, sparsity: float, scope: str = "layer") -> Tensor:
    """Keep-mask [out, in] (True = kept) pruning the lowest-scoring weights.

    scope "layer": exactly round(sparsity * numel) weights pruned over the matrix;
    scope "row":   exactly round(sparsity * in) pruned in every output row (Wanda).
    Ties are broken by position (stable sort), so the count is always exact.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in ("layer", "row"):
        raise ValueError(f"pruning scope must be 'layer' or 'row', got {scope!r}")
    rows = scores.reshape(1, -1) if scope == "layer" else scores  # [R, C]
    k = int(round(sparsity * rows.shape[1]))
    keep = torch.ones_like(rows, dtype=torch.bool)
    if k > 0:
        order = torch.sort(rows, dim=1, stable=True).indices[:, :k]  # lowest k per comparison row
        keep.scatter_(1, order, False)
    return keep.reshape(scores.shape)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """"unstructured" -> None; "N:M" -> (N, M) with 0 < N < M."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(x) for x in str(pattern).split(":"))
    except ValueError:
        raise ValueError(f"pruning pattern must be 'unstructured' or 'N:M' (e.g. '2:4'), got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"pruning pattern {pattern!r} needs 0 < N < M")
    return n, m


def nm_mask(scores: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Keep-mask [out, in] keeping the ``n`` highest scores of every ``m`` consecutive inputs."""
    out, n_in = scores.shape
    if n_in % m:
        raise ValueError(f"{n}:{m} sparsity needs in_features divisible by {m}, got {n_in}")
    g = scores.reshape(out, n_in // m, m)
    order = torch.sort(g, dim=-1, stable=True, descending=True).indices[..., :n]  # n best per group
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, order, True)
    return keep.reshape(out, n_in)
