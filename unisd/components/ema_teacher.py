"""EMA teacher: every ``every`` optimiser steps, theta_T <- decay * theta_T + (1 - decay) * theta_S.

UniSD (arXiv 2605.06597): decay 0.9 every 10 steps (UniSD*: 0.98).  On-policy SDFT
(Shenfeld et al.) uses an EMA rate 1 - decay of 0.01-0.05 every step.

What is averaged is *whatever is trained* (every student parameter with ``requires_grad``,
paired by name with the teacher copy's).  With LoRA, ``adapters`` says how the adapters
take part:

* ``average`` (default): the teacher's weights are the average of the student's *effective*
  weights W0 + s B A.  The average of several rank-r products B_i A_i is not a rank-r product,
  and averaging A and B separately is not averaging B A (``factors``), so the teacher copy's
  adapters are merged into its base weights once (``merge()`` of each PEFT LoRA layer, same
  objects, same memory as the copy already takes) and every update averages the merged weight
  with the student's W0 + ``get_delta_weight()``:  W_T <- decay W_T + (1 - decay)(W0 + s B_S A_S).
  Exact; the EMA state in checkpoints is the merged weights of the adapted layers.
* ``skip``: adapters are left out, as the released UniSD code does (src/trainers/base_trainer.py:
  125-128 skips lora_A/lora_B by name and averages the frozen base weights, which equal the
  teacher's): with LoRA the released EMA teacher never changes.  Reproduces the released runs.
* ``factors``: A and B averaged separately (every run before issue 20).  Not an average of
  weights: decay B_T A_T + ... mixes B_T A_S cross terms; kept to reproduce those runs.

decay = 0 copies the student exactly; decay = 1 keeps the frozen teacher.
"""
from __future__ import annotations

import dataclasses

import torch

from scd.core.registry import did_you_mean
from unisd.components.base import Component, added_param, register_component

ADAPTERS = ("average", "skip", "factors")
LORA_KEYS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")  # released base_trainer.py:127


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


def is_adapter(name: str) -> bool:
    return any(k in name for k in LORA_KEYS)


def trained_pairs(student, teacher, *, skip_adapters: bool = False) -> list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]]:
    """(name, teacher param, student param) for every trained student parameter (adapters left out on request)."""
    t_params = dict(teacher.named_parameters())
    out = []
    for name, s in student.named_parameters():
        if not s.requires_grad or (skip_adapters and is_adapter(name)):
            continue
        if name not in t_params or t_params[name].shape != s.shape:
            raise ValueError(f"EMA teacher has no parameter matching the trained '{name}' "
                             "(the teacher must be a copy of the student)")
        out.append((name, t_params[name], s))
    return out


def lora_layers(model) -> dict:
    """{module name: PEFT LoRA layer} (duck-typed: ``base_layer``, ``lora_A``, ``get_delta_weight``)."""
    return {n: m for n, m in model.named_modules()
            if hasattr(m, "base_layer") and hasattr(m, "lora_A") and hasattr(m, "get_delta_weight")}


@torch.no_grad()
def effective_weight(layer) -> torch.Tensor:
    """W0 + sum over active adapters of s B A, in the base weight's layout and dtype."""
    w = layer.base_layer.weight
    out = w.detach().clone()
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            out += layer.get_delta_weight(adapter).to(out.dtype)
    return out


@register_component("ema_teacher")
class EMATeacher(Component):
    needs = frozenset({"teacher_model"})

    @dataclasses.dataclass(frozen=True)
    class Params:
        decay: float = 0.9
        every: int = 10  # optimiser steps between updates
        adapters: str = added_param(default="average", legacy="factors")  # average | skip | factors (LoRA)

        def __post_init__(self) -> None:
            if not 0.0 <= self.decay <= 1.0:
                raise ValueError(f"decay must be in [0, 1], got {self.decay}")
            if self.every < 1:
                raise ValueError(f"every must be >= 1, got {self.every}")
            if self.adapters not in ADAPTERS:
                raise ValueError(f"adapters must be one of {', '.join(ADAPTERS)}, got {self.adapters!r}"
                                 f"{did_you_mean(str(self.adapters), ADAPTERS)}")

    def setup(self, ctx) -> None:
        mode = self.params.adapters
        s_layers = lora_layers(ctx.model) if mode == "average" else {}
        skip = mode == "skip" or (mode == "average" and bool(s_layers))  # "average": adapters via the merged weights
        self.pairs = trained_pairs(ctx.model, ctx.teacher, skip_adapters=skip)
        t_layers = lora_layers(ctx.teacher)
        self.merged = []  # (name, teacher merged weight, student LoRA layer)
        for name, layer in s_layers.items():
            t = t_layers[name]
            t.merge()  # W_T = W0 + s B A of the copy; its forward now skips the adapters
            self.merged.append((name, t.base_layer.weight, layer))
        if not self.pairs and not self.merged and mode != "skip":
            raise ValueError("EMA teacher: the student has no trained parameters")

    @torch.no_grad()
    def on_step_end(self, ctx) -> None:
        if ctx.step % self.params.every:
            return
        d = self.params.decay
        ema_update_([t for _, t, _ in self.pairs], [s for _, _, s in self.pairs], d)
        gap = sum(float((t.float() - s.float()).pow(2).sum()) for _, t, s in self.pairs)
        for _, t, layer in self.merged:
            target = effective_weight(layer)
            ema_update_([t], [target], d)
            gap += float((t.float() - target.float()).pow(2).sum())
        if self.pairs or self.merged:
            ctx.log("ema_teacher/distance", gap ** 0.5)  # ||theta_T - theta_S|| over the averaged weights

    def _own(self) -> dict:
        return {**{name: t for name, t, _ in self.pairs}, **{f"{name}.merged": t for name, t, _ in self.merged}}

    def state_dict(self) -> dict:
        return {name: t.detach().cpu().clone() for name, t in self._own().items()}

    def load_state_dict(self, state: dict) -> None:
        own = self._own()
        if set(state) != set(own):
            raise ValueError("EMA teacher checkpoint does not match the averaged parameters "
                             f"(e.g. {sorted(set(state) ^ set(own))[:3]}; was it saved with another `adapters`?)")
        with torch.no_grad():
            for name, t in own.items():
                t.copy_(state[name].to(t.device, t.dtype))
