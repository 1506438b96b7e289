"""The degradation registry: :class:`DegradationSpec` entries, their context, :func:`degrade`."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

from scd.core.config import ConfigError, from_dict
from scd.core.registry import registry
from unisd.degrade.constraints import Constraint

DEGRADATIONS = registry("degradation")


@dataclasses.dataclass
class DegradeContext:
    """What a degradation may need besides the model (filled in by the recipe).

    calib_batches(n) -> list of {input_ids, attention_mask} batches (Wanda calibration);
    load_pairs(tasks, limit) -> [(prompt, target)] (forgetting SFT data).
    """

    tokenizer: Any = None
    device: Any = None
    seed: int = 0
    run_dir: Path | None = None
    calib_batches: Callable[[int], list[dict]] | None = None
    load_pairs: Callable[[tuple[str, ...], int | None], list[tuple[str, str]]] | None = None


@dataclasses.dataclass(frozen=True)
class DegradationSpec:
    name: str
    options_cls: type
    apply: Callable[[Any, float, Any, DegradeContext], Constraint]
    strength_meaning: str
    doc: str = ""

    def options(self, data: dict | None):
        """Validate an ``options`` mapping into this degradation's options dataclass."""
        try:
            return from_dict(self.options_cls, dict(data or {}))
        except ConfigError as e:
            raise ValueError(f"degradation '{self.name}' options: {e}") from None


def register_degradation(spec: DegradationSpec, override: bool = False) -> DegradationSpec:
    return DEGRADATIONS.add(spec.name, spec, override=override)



def degrade(model, name: str, strength: float, options: dict | None = None,
            ctx: DegradeContext | None = None) -> Constraint:
    """Apply the registered degradation ``name`` to ``model`` in place; return its constraint."""
    spec = DEGRADATIONS.get(name)
    return spec.apply(model, strength, spec.options(options), ctx or DegradeContext())


def degradation_summary(constraint: Constraint, model=None) -> dict:
    out = dict(constraint.summary())
    if model is not None:
        out["violation"] = constraint.violation(model)
    return {k: (round(v, 8) if isinstance(v, float) and math.isfinite(v) else v) for k, v in out.items()}
