"""Loss math of the distillation recipe (pure functions on tensors).

``weighting.reduce: token``:
    loss = sum over target tokens t of  w(x_t) * D(p_T || p_S)_t + (1 - w(x_t)) * CE_t
           / (target tokens in the whole accumulated batch)
``weighting.reduce: sample`` (the SCD paper's formula):
    loss = sum over samples x of  w(x) * KD(x) + (1 - w(x)) * CE(x)
           / (samples with a target in the whole accumulated batch),
    KD(x), CE(x) = means over the target tokens of x
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


def per_sample_means(x, rows, batch_size: int):
    """Mean of the per-token values x [N] over each sample's target tokens -> [B] (0 for a sample
    without targets).  rows [N] = the batch row of each token."""
    sums = torch.zeros(batch_size, dtype=x.dtype, device=x.device).index_add(0, rows, x)  # [B]
    counts = torch.bincount(rows, minlength=batch_size).to(x.dtype)  # [B]
    return sums / counts.clamp(min=1)


def micro_batch_loss_by_sample(kd, ce, rows, w, n_samples_total, kd_rows=None):
    """sum_b [w_b KD_b + (1 - w_b) CE_b] / n_samples_total with KD_b, CE_b the means over sample b's
    target tokens.  kd [M], ce [N], rows [N] (the batch row of each CE token), kd_rows [M] (of each KD
    token; None: ``rows``, KD and CE at the same positions); w [B] -> (scalar loss, KD_b [B], CE_b [B])."""
    kd_rows = rows if kd_rows is None else kd_rows
    kd_b, ce_b = per_sample_means(kd, kd_rows, w.shape[0]), per_sample_means(ce, rows, w.shape[0])  # [B]
    return combine(kd_b, ce_b, w).sum() / n_samples_total, kd_b, ce_b

