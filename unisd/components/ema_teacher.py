"""EMA teacher: every ``every`` optimiser steps, theta_T <- decay * theta_T + (1 - decay) * theta_S.

UniSD (arXiv 2605.06597): decay 0.9 every 10 steps (UniSD*: 0.98).  On-policy SDFT
(Shenfeld et al.) uses an EMA rate 1 - decay of 0.01-0.05 every step.

What is averaged is *whatever is trained*: every student parameter with
``requires_grad`` is paired by name with the teacher copy's parameter.  With LoRA the
trained parameters are the adapters, so the adapters are averaged.  (The released
UniSD code skips ``lora_A``/``lora_B`` by name and only averages frozen base weights,
which are identical in student and teacher: its EMA teacher never changes with LoRA
on.  ``tests/test_unisd_components.py`` checks that ours does.)

decay = 0 copies the student exactly; decay = 1 keeps the frozen teacher.
"""
from __future__ import annotations

import dataclasses

import torch

from unisd.components.base import Component, register_component


@torch.no_grad()
def ema_update_(teacher: list[torch.Tensor], student: list[torch.Tensor], decay: float) -> None:
    """In place, per pair: t <- decay * t + (1 - decay) * s  (decay 0: t <- s exactly)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    for t, s in zip(teacher, student, strict=True):
        if decay == 0.0:
            t.copy_(s)
        elif decay != 1.0:
            t.mul_(decay).add_(s.to(t.dtype), alpha=1.0 - decay)


def trained_pairs(student, teacher) -> list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]]:
    """(name, teacher param, student param) for every trained student parameter."""
    t_params = dict(teacher.named_parameters())
    out = []
    for name, s in student.named_parameters():
        if not s.requires_grad:
            continue
        if name not in t_params or t_params[name].shape != s.shape:
            raise ValueError(f"EMA teacher has no parameter matching the trained '{name}' "
                             "(the teacher must be a copy of the student)")
        out.append((name, t_params[name], s))
    if not out:
        raise ValueError("EMA teacher: the student has no trained parameters")
    return out


@register_component("ema_teacher")
class EMATeacher(Component):
    needs = frozenset({"teacher_model"})

    @dataclasses.dataclass(frozen=True)
    class Params:
        decay: float = 0.9
        every: int = 10  # optimiser steps between updates

        def __post_init__(self) -> None:
            if not 0.0 <= self.decay <= 1.0:
                raise ValueError(f"decay must be in [0, 1], got {self.decay}")
            if self.every < 1:
                raise ValueError(f"every must be >= 1, got {self.every}")

    def setup(self, ctx) -> None:
        self.pairs = trained_pairs(ctx.model, ctx.teacher)

    def on_step_end(self, ctx) -> None:
        if ctx.step % self.params.every:
            return
        ema_update_([t for _, t, _ in self.pairs], [s for _, _, s in self.pairs], self.params.decay)
        with torch.no_grad():
            gap = sum(float((t.float() - s.float()).pow(2).sum()) for _, t, s in self.pairs) ** 0.5
        ctx.log("ema_teacher/distance", gap)  # ||theta_T - theta_S|| over the trained parameters

    def state_dict(self) -> dict:
        return {name: t.detach().cpu().clone() for name, t, _ in self.pairs}

    def load_state_dict(self, state: dict) -> None:
        own = {name: t for name, t, _ in self.pairs}
        if set(state) != set(own):
            raise ValueError("EMA teacher checkpoint does not match the trained parameters "
                             f"(e.g. {sorted(set(state) ^ set(own))[:3]})")
        with torch.no_grad():
            for name, t in own.items():
                t.copy_(state[name].to(t.device, t.dtype))
