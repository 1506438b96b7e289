"""Divergence clipping: l_t <- min(l_t, c) on the per-token divergence.

UniSD (arXiv 2605.06597): ``cap`` fixed or, with ``quantile`` q, c = the
q-quantile of the batch's l_t over loss tokens (e.g. 0.99), computed without
gradient.  Set one of them: both is a config error, neither means ``cap: 10.0`` (as the
released code: src/train/train_args.py:166-172).  Applied after the vocabulary sum and before any weighting (the recipe
reduces with the agreement weights only after every hook ran).  Clipped tokens get
no gradient (``clamp``).  Not part of UniSD*.
"""
from __future__ import annotations

import dataclasses

import torch

from unisd.components.base import Component, register_component


def clip_divergence(per_token: torch.Tensor, mask: torch.Tensor, cap: float | None = None,
                    quantile: float | None = None) -> tuple[torch.Tensor, float | None]:
    """(min(l, c), c).  per_token, mask [B, L].  One of ``cap``/``quantile``; no loss tokens -> unchanged."""
    if cap is not None and quantile is not None:
        raise ValueError("clip_divergence: give cap or quantile, not both")
    if quantile is not None:
        flat = per_token.detach()[mask.bool()].float()
        if flat.numel() == 0:
            return per_token, None
        c = float(torch.quantile(flat, quantile).clamp(min=1e-6))
    elif cap is not None:
        c = float(cap)
    else:
        return per_token, None
    return per_token.clamp(max=c), c


@register_component("divergence_clipping")
class DivergenceClipping(Component):
    @dataclasses.dataclass(frozen=True)
    class Params:
        cap: float | None = None  # 10.0 unless quantile is set
        quantile: float | None = None  # e.g. 0.99: the cap is the batch quantile instead

        def __post_init__(self) -> None:
            if self.cap is not None and self.quantile is not None:
                raise ValueError(f"set cap ({self.cap}) or quantile ({self.quantile}), not both: "
                                 "quantile makes the cap the batch's q-quantile of l_t")
            if self.cap is None and self.quantile is None:
                object.__setattr__(self, "cap", 10.0)
            if self.cap is not None and not self.cap > 0:
                raise ValueError(f"cap must be > 0, got {self.cap}")
            if self.quantile is not None and not 0 < self.quantile <= 1:
                raise ValueError(f"quantile must be in (0, 1], got {self.quantile}")

    def loss_terms(self, ctx, targets) -> dict:
        before = ctx.per_token
        ctx.per_token, c = clip_divergence(before, ctx.batch.loss_mask, self.params.cap, self.params.quantile)
        m = ctx.batch.loss_mask.bool()
        if c is not None and m.any():
            ctx.log("divergence_clipping/cap", c)
            ctx.log("divergence_clipping/clipped_frac", (before.detach()[m] > c).float().mean())
        return {}
