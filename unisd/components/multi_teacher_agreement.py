"""Multi-teacher agreement: down-weight tokens (or sequences) the teacher is unsure about.

UniSD (arXiv 2605.06597): K teachers are the same teacher model under K different
few-shot contexts, each with ``shots`` demonstrations chosen at random or by MiniLM
retrieval of the most similar training examples of the same task (context k gets
neighbours k*shots .. (k+1)*shots-1).  Each scores the completion tokens (at
``temperature``, 1.0 as in the reference code).  ``context``:

* ``released`` (default; Ahren09/UniSD src/data/scienceqa.py:151-202 and
  src/trainers/unisd_trainer.py:260-295): the demonstrations are solved examples of OTHER
  questions inside the user turn ("## Reference Samples (DO NOT SOLVE THESE)" ...), then
  the student's prompt -- no reference answer of the example itself, so the K teachers'
  disagreement is the teacher's uncertainty about the completion
  (:func:`unisd.prompts.agreement_prompt`);
* ``with_reference`` (every run before issue 20): each context is the in-context teacher's
  prompt (the reference answer block, worded by ``template``) with the demonstrations as
  few-shot chat turns; the K teachers all know the answer, so their disagreement measures
  sensitivity to the demonstrations.

Token level (``level: token``), per completion token t::

    d_t = var_k log p_k(y_t)                       (sample variance, as torch.var)
    s   = max(quantile_q(d over loss tokens), 1e-6)    q = 0.95
    w_t = max(1 / (1 + gamma * min(d_t / s, cap)), floor)   cap = 10, floor = 0.01

and the distillation term becomes sum_t w_t l_t m_t / clamp(sum_t w_t m_t, 1) per
sequence (``ctx.token_weights``; the recipe reduces).

Sequence level (``level: sequence``): d_b = var_k (mean_t log p_k) (population
variance), w_b = max(exp(-gamma d_b), 1e-6).  The reference code multiplies the
per-token loss by w_b and then divides by sum_t w_b m_t, which cancels w_b whenever
w_b * n_b >= 1 (nearly always): its sequence weights have no effect.  We apply w_b to
the per-sequence means instead (``ctx.sequence_weights``): sum_b w_b r_b / B.
"""
from __future__ import annotations

import dataclasses
import random

import torch

from scd.core.registry import did_you_mean
from unisd.components.base import Component, added_param, register_component
from unisd.prompts import agreement_prompt, check_template, teacher_prompt
from unisd.retrieval import encode_texts, nearest

CONTEXTS = ("released", "with_reference")


def token_agreement_weights(logps: torch.Tensor, mask: torch.Tensor, gamma: float, quantile: float = 0.95,
                            cap: float = 10.0, floor: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Token weights from K teachers' log-probs.  logps [K, B, L], mask [B, L] -> (w [B, L], d [B, L])."""
    d = logps.float().var(dim=0)  # [B, L] (unbiased, K - 1)
    m = mask.bool()
    flat = d[m]
    if flat.numel() == 0:
        return torch.ones_like(d), d
    s = torch.quantile(flat, quantile).clamp(min=1e-6)
    d_norm = (d / s).clamp(max=cap)
    w = (1.0 / (1.0 + gamma * d_norm)).clamp(min=floor)
    return w, d


def sequence_agreement_weights(logps: torch.Tensor, mask: torch.Tensor, gamma: float,
                               floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence weights.  logps [K, B, L], mask [B, L] -> (w [B], d [B])."""
    m = mask.to(logps.dtype).unsqueeze(0)  # [1, B, L]
    mean_lp = (logps * m).sum(-1) / m.sum(-1).clamp(min=1.0)  # [K, B]
    d = mean_lp.float().var(dim=0, unbiased=False)  # [B]
    return torch.exp(-gamma * d).clamp(min=floor), d


def choose_demos(i: int, examples, k: int, shots: int, *, seed: int, neighbours=None,
                 pool_by_task: dict | None = None) -> list[list[int]]:
    """K disjoint groups of ``shots`` demonstration indices for example i (never i itself)."""
    if neighbours is not None:
        nb = list(neighbours[i])
    else:
        task = examples[i].get("task")
        pool = (pool_by_task or {}).get(task)
        if pool is None:
            pool = [j for j, e in enumerate(examples) if e.get("task") == task]
        pool = [j for j in pool if j != i]
        rng = random.Random(f"demos\x00{seed}\x00{i}")
        nb = rng.sample(pool, min(k * shots, len(pool)))
    if len(nb) < k * shots:
        raise ValueError(f"multi_teacher_agreement: example {examples[i].get('id')} has only {len(nb)} other "
                         f"examples of its task, needs k*shots = {k * shots}; lower k or shots")
    return [nb[c * shots:(c + 1) * shots] for c in range(k)]


@register_component("multi_teacher_agreement")
class MultiTeacherAgreement(Component):
    needs = frozenset({"teacher_model", "extra_teacher_passes"})

    @dataclasses.dataclass(frozen=True)
    class Params:
        k: int = 3  # number of contexts (teachers)
        shots: int = 1  # demonstrations per context
        demos: str = "random"  # random | retrieval (MiniLM)
        level: str = "token"  # token | sequence
        gamma: float = 1.0
        quantile: float = 0.95
        cap: float = 10.0
        floor: float = 0.01  # token level; sequence level uses 1e-6
        temperature: float = 1.0  # temperature of the agreement passes
        max_teacher_prompt_len: int = 1024
        context: str = added_param(default="released", legacy="with_reference")  # released | with_reference
        template: str = added_param(default="released", legacy="ours")  # the reference wording (with_reference)
        encoder: str | None = None  # sentence encoder folder (default: the packaged MiniLM)

        def __post_init__(self) -> None:
            if self.k < 2:
                raise ValueError(f"k must be >= 2 (agreement needs several teachers), got {self.k}")
            if self.shots < 1:
                raise ValueError(f"shots must be >= 1 (K contexts differ by their demonstrations), got {self.shots}")
            if self.demos not in ("random", "retrieval"):
                raise ValueError(f"demos must be random or retrieval, got {self.demos!r}")
            if self.level not in ("token", "sequence"):
                raise ValueError(f"level must be token or sequence, got {self.level!r}")
            if self.gamma < 0 or not 0 < self.quantile <= 1 or self.cap <= 0 or not 0 <= self.floor <= 1:
                raise ValueError("need gamma >= 0, 0 < quantile <= 1, cap > 0, 0 <= floor <= 1")
            if self.context not in CONTEXTS:
                raise ValueError(f"context must be one of {', '.join(CONTEXTS)}, got {self.context!r}"
                                 f"{did_you_mean(str(self.context), CONTEXTS)}")
            check_template(self.template)

    def setup(self, ctx) -> None:
        p = self.params
        exs = ctx.examples
        neighbours = None
        if p.demos == "retrieval":
            emb = encode_texts([f"{e['instruction']}\n{e['input']}" for e in exs], p.encoder, device=ctx.device)
            neighbours = nearest(emb, p.k * p.shots, groups=[e.get("task") for e in exs])
        by_task: dict = {}
        for j, e in enumerate(exs):
            by_task.setdefault(e.get("task"), []).append(j)
        self.demos = [choose_demos(i, exs, p.k, p.shots, seed=ctx.seed, neighbours=neighbours, pool_by_task=by_task)
                      for i in range(len(exs))]

    def prompt(self, ctx, example: dict, demos: list[dict]) -> str:
        """Context text of one agreement teacher (see ``context`` in the module doc)."""
        if self.params.context == "released":
            return agreement_prompt(example, demos, ctx.tokenizer, shots=ctx.shots_for(example))
        return teacher_prompt(example, ctx.tokenizer, template=self.params.template, shots=demos)

    def loss_terms(self, ctx, targets) -> dict:
        p = self.params
        b = ctx.batch
        logps = []
        for c in range(p.k):
            texts = [self.prompt(ctx, ex, [ctx.examples[j] for j in self.demos[i][c]])
                     for ex, i in zip(b.examples, b.indices)]
            logps.append(ctx.teacher_token_logps(ctx.encode(texts, p.max_teacher_prompt_len), p.temperature))
        stacked = torch.stack(logps)  # [K, B, L]
        m = b.loss_mask.bool()
        if p.level == "token":
            w, d = token_agreement_weights(stacked, b.loss_mask, p.gamma, p.quantile, p.cap, p.floor)
            ctx.token_weights = w if ctx.token_weights is None else ctx.token_weights * w
            if m.any():
                ctx.log("multi_teacher_agreement/weight_mean", w[m].mean())
                ctx.log("multi_teacher_agreement/disagreement_mean", d[m].mean())
        else:
            w, d = sequence_agreement_weights(stacked, b.loss_mask, p.gamma)
            ctx.sequence_weights = w if ctx.sequence_weights is None else ctx.sequence_weights * w
            ctx.log("multi_teacher_agreement/weight_mean", w.mean())
            ctx.log("multi_teacher_agreement/disagreement_mean", d.mean())
        return {}
