"""In-context teacher (the teacher provider of plain self-distillation).

UniSD (arXiv 2605.06597) and on-policy SDFT (Shenfeld et al.): the teacher is the
same model -- a frozen copy made at the start of training, or the EMA copy when the
``ema_teacher`` component is on (it updates ``ctx.teacher`` in place) -- that sees
the reference answer in its prompt (:mod:`unisd.prompts`; ``template`` released, as the
released UniSD code words it, or ours).  Completions are sampled
from the student at ``temperature`` (batched, seeded per step); the teacher scores
the same completion tokens after its own prompt, and the recipe's per-token
divergence compares both distributions with logits divided by ``temperature``.

Options beyond UniSD:

* ``on_policy_fraction`` (GKD's lambda, Agarwal et al. 2024): the probability that a
  micro-batch uses student samples; otherwise the completion is the reference answer
  (supervised / off-policy distillation).  1.0 = always on-policy (UniSD, SDFT).
* ``skip_first_tokens``: the first n completion tokens are left out of every loss term
  (SDFT masks 3).
"""
from __future__ import annotations

import dataclasses
import random

from benchmarks.tasks.base import task_max_new_tokens
from scd.data.prompts import render_target
from unisd.components.base import Component, Targets, added_param, register_component
from unisd.prompts import check_template, teacher_prompt


@register_component("in_context_teacher")
class InContextTeacher(Component):
    needs = frozenset({"teacher_model", "completions"})
    provides_teacher = True

    @dataclasses.dataclass(frozen=True)
    class Params:
        temperature: float = 0.7  # sampling temperature; the loss divides logits by it too
        max_new_tokens: int | None = 64  # None: each task's generation budget (scd.data.tasks)
        on_policy_fraction: float = 1.0
        skip_first_tokens: int = 0
        generation_batch_size: int = 16
        max_teacher_prompt_len: int = 1024  # tokens; teacher prompts are left-truncated to it
        # released | ours | a text with {input} and {reference} (unisd.prompts.TEMPLATES); runs before issue 20: ours
        template: str = added_param(default="released", legacy="ours")

        def __post_init__(self) -> None:
            if not self.temperature > 0:
                raise ValueError(f"temperature must be > 0, got {self.temperature}")
            if self.max_new_tokens is not None and self.max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
            if not 0.0 <= self.on_policy_fraction <= 1.0:
                raise ValueError(f"on_policy_fraction must be in [0, 1], got {self.on_policy_fraction}")
            if self.skip_first_tokens < 0:
                raise ValueError(f"skip_first_tokens must be >= 0, got {self.skip_first_tokens}")
            check_template(self.template)

    def teacher_targets(self, ctx) -> Targets:
        p = self.params
        b = ctx.batch
        on_policy = random.Random(ctx.sample_seed("on_policy")).random() < p.on_policy_fraction
        budgets = [p.max_new_tokens or task_max_new_tokens(ex["task"]) for ex in b.examples]
        if on_policy:
            completions = ctx.sample_completions(temperature=p.temperature, max_new_tokens=max(budgets),
                                                 batch_size=p.generation_batch_size)
        else:
            completions = [ctx.encode_target(render_target(ex, ctx.tokenizer)) for ex in b.examples]
        completions = [c[:n] for c, n in zip(completions, budgets)]
        ctx.set_completions(completions, skip_first=p.skip_first_tokens, on_policy=on_policy)
        texts = [teacher_prompt(ex, ctx.tokenizer, template=p.template, shots=ctx.shots_for(ex)) for ex in b.examples]
        prompts = ctx.encode(texts, p.max_teacher_prompt_len)
        out = ctx.teacher_forward(prompts, hidden="hidden_states" in ctx.needs)
        ctx.log("in_context_teacher/on_policy", float(on_policy))
        ctx.log("completion_len", float(b.completion_mask.sum(-1).float().mean()))
        return Targets(logits=out.logits, temperature=p.temperature, hidden_states=out.hidden_states)
