"""Token-level contrastive loss against a negative teacher.

UniSD (arXiv 2605.06597): a negative teacher is the same teacher model given a
plausible but wrong demonstration.  Ours builds it from another training example's
answer of the same task with a different target (:func:`unisd.prompts.wrong_reference_index`);
UniSD generated or curated wrong demonstrations, which we do not (no generation step).
With lp = log p(y_t) of the sampled completion tokens, at the loss temperature::

    pos_t = |lp_S - lp_T+|        distance to the positive (in-context) teacher
    neg_t = |lp_S - lp_T-|        distance to the negative teacher
    L_c   = masked mean of relu(margin + pos_t - neg_t)   (per sequence, then over sequences)

added to the loss as ``weight * L_c``.  margin 0.5, weight 0.1 (UniSD*: 0.1, 0.01).
Gradients flow only through the student's log-probs.
"""
from __future__ import annotations

import dataclasses

import torch

from unisd.components.base import Component, added_param, register_component
from unisd.reduction import sequence_mean
from unisd.context import token_logps
from unisd.prompts import check_template, teacher_prompt, wrong_reference_table


def contrastive_per_token(student_lp: torch.Tensor, pos_lp: torch.Tensor, neg_lp: torch.Tensor,
                          margin: float) -> torch.Tensor:
    """relu(margin + |s - pos| - |s - neg|).  [B, L] x3 -> [B, L]."""
    return torch.relu(margin + (student_lp - pos_lp).abs() - (student_lp - neg_lp).abs())


def contrastive_loss(student_lp, pos_lp, neg_lp, mask, margin: float, n_sequences_total: int | None = None):
    """Masked mean (per sequence, then over sequences) of :func:`contrastive_per_token`.  -> scalar."""
    return sequence_mean(contrastive_per_token(student_lp, pos_lp, neg_lp, margin), mask, None, n_sequences_total)


@register_component("token_contrastive")
class TokenContrastive(Component):
    needs = frozenset({"teacher_model", "extra_teacher_passes"})

    @dataclasses.dataclass(frozen=True)
    class Params:
        margin: float = 0.5
        weight: float = 0.1
        max_teacher_prompt_len: int = 1024
        # the negative teacher's wording (unisd.prompts.TEMPLATES; use the provider's); runs before issue 20: ours
        template: str = added_param(default="released", legacy="ours")

        def __post_init__(self) -> None:
            if self.margin < 0 or self.weight < 0:
                raise ValueError("margin and weight must be >= 0")
            check_template(self.template)

    def setup(self, ctx) -> None:
        self.wrong = wrong_reference_table(ctx.examples, ctx.seed)
        missing = [ctx.examples[i].get("task") for i, j in enumerate(self.wrong) if j is None]
        if missing:
            raise ValueError(f"token_contrastive: task '{missing[0]}' has no example with a different target to "
                             "use as a wrong demonstration (need at least two distinct answers per task)")

    def loss_terms(self, ctx, targets) -> dict:
        p = self.params
        b = ctx.batch
        T = targets.temperature
        student_lp = ctx.student_token_logps(T)  # [B, L], with gradient
        with torch.no_grad():
            pos_lp = token_logps(targets.logits, b.completion_ids, T)
        texts = [teacher_prompt(ex, ctx.tokenizer, reference=ctx.examples[self.wrong[i]]["target"],
                                template=p.template, shots=ctx.shots_for(ex)) for ex, i in zip(b.examples, b.indices)]
        neg_lp = ctx.teacher_token_logps(ctx.encode(texts, p.max_teacher_prompt_len), T)
        loss = contrastive_loss(student_lp, pos_lp, neg_lp, b.loss_mask, p.margin, ctx.n_seq_total)
        m = b.loss_mask.bool()
        if m.any():
            with torch.no_grad():
                ctx.log("token_contrastive/pos_dist", (student_lp - pos_lp).abs()[m].mean())
                ctx.log("token_contrastive/neg_dist", (student_lp - neg_lp).abs()[m].mean())
        return {self.name: p.weight * loss}
