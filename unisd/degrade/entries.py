"""Registry entries ``quantize`` (strength: bits) and ``prune`` (strength: sparsity)."""
from __future__ import annotations

import dataclasses

from unisd.degrade.constraints import Constraint
from unisd.degrade.model_ops import prune_model, quantize_model
from unisd.degrade.prune import parse_pattern
from unisd.degrade.quantize import _check_bits
from unisd.degrade.registry import DegradationSpec, DegradeContext, register_degradation


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    symmetric: bool = True
    group_size: int = 64  # 0: per output channel
    skip: tuple[str, ...] = ("lm_head",)
    latent: bool = True  # recovery trains latent full-precision weights (STE); False: re-round the weights


def _apply_quantize(model, strength: float, opts: QuantizeOptions, ctx: DegradeContext) -> Constraint:
    return quantize_model(model, _check_bits(strength), opts.symmetric, opts.group_size, opts.skip, opts.latent)


@dataclasses.dataclass(frozen=True)
class PruneOptions:
    method: str = "wanda"  # wanda | magnitude
    pattern: str = "unstructured"  # unstructured | N:M (e.g. 2:4; then the strength is ignored)
    scope: str | None = None  # layer | row (default: layer for magnitude, row for wanda)
    skip: tuple[str, ...] = ("lm_head",)
    calib_batches: int = 4  # Wanda calibration batches (of the recovery prompts)

    def __post_init__(self) -> None:
        if self.method not in ("wanda", "magnitude"):
            raise ValueError(f"prune method must be wanda or magnitude, got {self.method!r}")
        parse_pattern(self.pattern)
        if self.scope not in (None, "layer", "row"):
            raise ValueError(f"prune scope must be layer or row, got {self.scope!r}")


def _apply_prune(model, strength: float, opts: PruneOptions, ctx: DegradeContext) -> Constraint:
    batches = None
    if opts.method == "wanda":
        if ctx.calib_batches is None:
            raise ValueError("Wanda pruning needs calibration batches; the recipe provides them from data.tasks")
        batches = ctx.calib_batches(opts.calib_batches)
    return prune_model(model, float(strength), opts.method, opts.pattern, opts.scope, opts.skip, batches)


register_degradation(DegradationSpec(
    "quantize", QuantizeOptions, _apply_quantize, "bits",
    "round-to-nearest fake quantization of nn.Linear weights (per-channel or per-group)"))
register_degradation(DegradationSpec(
    "prune", PruneOptions, _apply_prune, "sparsity",
    "magnitude or Wanda pruning of nn.Linear weights (unstructured or N:M)"))
