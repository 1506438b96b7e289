"""UniSD's loss reduction (pure math, shared by the step context and the components)."""
from __future__ import annotations

import torch


def sequence_mean(per_token, mask, weights=None, n_sequences_total: int | None = None, sequence_weights=None):
    """UniSD reduction.  per_token, mask[, weights] [B, L][, sequence_weights [B]] -> scalar.

    Per sequence b: r_b = sum_t w_t l_t m_t / clamp(sum_t w_t m_t, 1)  (w = 1 without weights);
    result = sum_b s_b r_b / n_sequences_total (s = 1 without sequence weights; n default B).
    With gradient accumulation pass the number of sequences of the whole accumulated
    batch: the micro-batch results then sum to the full-batch mean, whatever the split.
    """
    m = mask.to(per_token.dtype)
    w = m if weights is None else weights.to(per_token.dtype) * m
    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    num = torch.where(w != 0, per_token * w, zero).sum(-1)  # [B]  (masked entries may hold inf)
    den = w.sum(-1).clamp(min=1.0)  # [B]
    r = num / den  # [B]
    if sequence_weights is not None:
        r = r * sequence_weights.to(r.dtype)
    n = per_token.shape[0] if n_sequences_total is None else n_sequences_total
    return r.sum() / max(float(n), 1.0)
