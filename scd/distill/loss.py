"""Loss math of the distillation recipe (pure functions on tensors).

    loss = sum over target tokens t of  w(x_t) * D(p_T || p_S)_t + (1 - w(x_t)) * CE_t
           / (target tokens in the whole accumulated batch)
"""
from __future__ import annotations

import torch

from scd.distill.config import DistillLossConfig, WeightingConfig
from scd.losses import ce_per_token, per_token_divergence, reduce_tokens
from scd.weighting import combine, sample_weights


def token_terms(student_logits, teacher_logits, labels, loss: DistillLossConfig, vocab: int | None = None):
    """Per-target-token KD and CE terms of one micro-batch.

    student_logits [B, T, Vs], teacher_logits [B, T, Vt] or None, labels [B, T] (-100 =
    not a target).  Position t predicts labels[:, t+1].  Returns kd [N], ce [N], rows [N]
    (the batch row of each of the N target tokens).  KD compares the first ``vocab``
    logits of both (shared tokenizer ids); CE uses the student's full head.
    """
    lab = labels[:, 1:]  # [B, T-1]
    mask = lab != -100
    rows = mask.nonzero()[:, 0]  # [N]
    s = student_logits[:, :-1][mask]  # [N, Vs]
    ce = ce_per_token(s, lab[mask])  # [N]
    if teacher_logits is None:
        return torch.zeros_like(ce), ce, rows
    v = vocab or min(s.shape[-1], teacher_logits.shape[-1])
    t = teacher_logits[:, :-1][mask]  # [N, Vt]
    kd = per_token_divergence(loss.divergence, s[..., :v], t[..., :v].detach(), loss.temperature, **loss.params)
    return kd, ce, rows


def kd_weights(weighting: WeightingConfig, batch_size: int, *, anchor_loss=None, teacher_loss=None, device=None):
    """Per-sample weight w of the KD term [B] (see scd.weighting)."""
    dummy = torch.zeros(batch_size, device=device)
    if not weighting.needs_losses:
        return sample_weights(weighting.name, dummy, alpha=weighting.alpha)
    return sample_weights(weighting.name, dummy, student_anchor_loss=anchor_loss, teacher_ckpt_loss=teacher_loss)


def micro_batch_loss(kd, ce, rows, w, n_tokens_total):
    """sum_t [w kd_t + (1 - w) ce_t] / n_tokens_total.  kd, ce, rows [N]; w [B] -> scalar."""
    return reduce_tokens(combine(kd, ce, w[rows]), None, n_tokens_total)
