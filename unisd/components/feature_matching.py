"""Feature matching: per-token MSE between student and teacher hidden states.

UniSD (arXiv 2605.06597) matches the final layer: per completion token the mean over
the hidden dimension of (h_S - h_T)^2, masked mean over the completion (per sequence,
then over sequences), added as ``weight * L_hid`` (0.1; UniSD*: 0.01).

Ours also takes chosen layers (``layers: [i, ...]`` indexes the transformers
``hidden_states`` tuple: 0 = embeddings, -1 = the last entry) with the teacher's
layers given separately when they differ (``teacher_layers``), averaging the pairs.
When the widths differ (a teacher of another size), a learned linear projection
W [H_T, H_S] maps the student's states (``projection: auto``); it is trained with the
model (registered as a trainable module, so the optimiser and checkpoints hold it).
``projection: always`` adds it even for equal widths (initialised to the identity).
The teacher states carry no gradient.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from unisd.components.base import Component, register_component
from unisd.reduction import sequence_mean


def hidden_mse_per_token(student_h: torch.Tensor, teacher_h: torch.Tensor) -> torch.Tensor:
    """mean_h (s - t)^2.  [B, L, H], [B, L, H] -> [B, L] (float32)."""
    if student_h.shape != teacher_h.shape:
        raise ValueError(f"hidden states differ in shape {tuple(student_h.shape)} vs {tuple(teacher_h.shape)}; "
                         "project the student's first")
    dt = torch.promote_types(student_h.dtype, torch.float32)  # float64 stays float64
    return (student_h.to(dt) - teacher_h.to(dt).detach()).pow(2).mean(-1)


def make_projection(student_width: int, teacher_width: int, mode: str = "auto") -> torch.nn.Module | None:
    """A linear map student -> teacher width (None when not needed).  'always' at equal width starts as identity."""
    if mode == "none":
        if student_width != teacher_width:
            raise ValueError(f"hidden widths differ ({student_width} vs {teacher_width}); "
                             "feature matching needs projection: auto")
        return None
    if mode == "auto" and student_width == teacher_width:
        return None
    proj = torch.nn.Linear(student_width, teacher_width, bias=False)
    if student_width == teacher_width:
        with torch.no_grad():
            proj.weight.copy_(torch.eye(student_width))
    return proj


def _hidden_size(model) -> int:
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "hidden_size", None)
    if size is None and hasattr(model, "get_base_model"):
        size = model.get_base_model().config.hidden_size
    return int(size)


@register_component("feature_matching")
class FeatureMatching(Component):
    needs = frozenset({"hidden_states"})

    @dataclasses.dataclass(frozen=True)
    class Params:
        weight: float = 0.1
        layers: Any = "final"  # "final" or a list of hidden_states indices
        teacher_layers: Any = None  # default: the same indices as `layers`
        projection: str = "auto"  # auto | always | none

        def __post_init__(self) -> None:
            if self.weight < 0:
                raise ValueError(f"weight must be >= 0, got {self.weight}")
            if self.projection not in ("auto", "always", "none"):
                raise ValueError(f"projection must be auto, always or none, got {self.projection!r}")
            for key in ("layers", "teacher_layers"):
                v = getattr(self, key)
                if v is None and key == "teacher_layers":
                    continue
                if v != "final" and not (isinstance(v, (list, tuple)) and v
                                         and all(isinstance(i, int) and not isinstance(i, bool) for i in v)):
                    raise ValueError(f"{key} must be 'final' or a non-empty list of layer indices, got {v!r}")
            if self.teacher_layers is not None and self.teacher_layers != "final" and self.layers != "final":
                if len(self.teacher_layers) != len(self.layers):
                    raise ValueError("teacher_layers must pair one to one with layers")

    def pairs(self) -> list[tuple[int, int]]:
        s = [-1] if self.params.layers == "final" else list(self.params.layers)
        t_spec = self.params.teacher_layers if self.params.teacher_layers is not None else self.params.layers
        t = [-1] if t_spec == "final" else list(t_spec)
        if len(t) != len(s):
            raise ValueError("feature_matching: teacher_layers must pair one to one with layers")
        return list(zip(s, t))

    def setup(self, ctx) -> None:
        self.layer_pairs = self.pairs()
        ws = _hidden_size(ctx.model)
        wt = _hidden_size(ctx.teacher) if ctx.teacher is not None else ws
        projs = {f"{i}_{j}".replace("-", "m"): make_projection(ws, wt, self.params.projection)
                 for i, j in self.layer_pairs}
        self.projections = torch.nn.ModuleDict({k: v for k, v in projs.items() if v is not None})
        self.projections.to(ctx.device)

    def trainable_modules(self) -> dict:
        return {"projections": self.projections} if len(self.projections) else {}

    def loss_terms(self, ctx, targets) -> dict:
        if targets.hidden_states is None or ctx.student.hidden_states is None:
            raise RuntimeError("feature_matching: the forwards returned no hidden states")
        total = 0.0
        for i, j in self.layer_pairs:
            hs = ctx.student.hidden_states[i]  # [B, L, H_S]
            key = f"{i}_{j}".replace("-", "m")
            if key in self.projections:
                hs = self.projections[key](hs.to(self.projections[key].weight.dtype))
            per_token = hidden_mse_per_token(hs, targets.hidden_states[j])  # [B, L]
            total = total + sequence_mean(per_token, ctx.batch.loss_mask, None, ctx.n_seq_total)
        loss = total / len(self.layer_pairs)
        ctx.log("feature_matching/mse", loss * ctx.n_seq_total / max(len(ctx.batch.examples), 1))
        return {self.name: self.params.weight * loss}
