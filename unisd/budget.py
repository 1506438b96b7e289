"""KL-aware recovery budget (``recovery.budget``): recovery that does no harm to a model that is nearly intact.

Fixed-lr Adam steps toward the original push a model that is already close to it away
(results/recovery_study_cpu: 8-bit KL 0.003 -> 0.065 after 16 SD steps).  The budget uses
KL(original || degraded) on the probe, measured before recovery anyway, to

``tokens`` chooses the probe positions of that KL: ``all`` (prompt + reference answer) or ``completion``
(the answer's tokens only, what the task scores; measured here, not before recovery).

1. **skip** recovery (0 steps) when it is below ``kl_min``;
2. **scale the learning rate** with it (``lr_scale``): ``lr = train.lr * f(kl / kl_ref)``,
   ``f(x) = min(1, x)`` (linear) or ``min(1, sqrt(x))`` (sqrt), ``none``: ``f = 1``;
3. **stop early** (``early_stop``) when the probe KL stops falling: every ``every`` optimiser
   steps the probe KL is measured; an evaluation *improves* when KL < best * (1 - min_rel_drop)
   (best starts at the KL before recovery); after ``patience`` evaluations in a row without
   improvement training stops.  The weights of the stop step are the result (no roll-back).

:func:`decide` is the pure decision (1, 2); :class:`KLEarlyStop` is the state of (3): it lives
in the recovery recipe's checkpointed ``state()``, so a resumed run stops at the same step.
Defaults are provisional (docs/recovery.md, "KL-aware budget").
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch.distributed as torch_dist

from scd.core.config import added_field

LR_SCALES = ("none", "linear", "sqrt")
BUDGET_TOKENS = ("all", "completion")


@dataclasses.dataclass(frozen=True)
class EarlyStopConfig:
    every: int = 4  # measure the probe KL every k optimiser steps
    patience: int = 2  # stop after this many measurements in a row without improvement
    min_rel_drop: float = 0.05  # improvement: KL < best * (1 - min_rel_drop)

    def __post_init__(self) -> None:
        if self.every < 1 or self.patience < 1:
            raise ValueError(f"recovery.budget.early_stop: every and patience must be >= 1, got "
                             f"{self.every}, {self.patience}")
        if not 0 <= self.min_rel_drop < 1:
            raise ValueError(f"recovery.budget.early_stop.min_rel_drop must be in [0, 1), got {self.min_rel_drop}")


@dataclasses.dataclass(frozen=True)
class BudgetConfig:
    kl_min: float = 0.5  # skip recovery when KL(original || degraded) on the probe is below (0: never skip)
    lr_scale: str = "none"  # none | linear | sqrt: lr = train.lr * min(1, (kl / kl_ref) ** {1, 1/2})
    kl_ref: float = 1.0  # KL at and above which the full train.lr is used
    early_stop: EarlyStopConfig | None = None  # stop when the probe KL stops falling (None: never)
    # which probe positions the budget's KL is measured on (skip decision and early stop): all (prompt +
    # answer, the default) | completion (the reference answer's tokens only: what the task scores)
    tokens: str = added_field(default="all")

    def __post_init__(self) -> None:
        if not self.kl_min >= 0:
            raise ValueError(f"recovery.budget.kl_min must be >= 0, got {self.kl_min}")
        if self.lr_scale not in LR_SCALES:
            raise ValueError(f"recovery.budget.lr_scale must be one of {list(LR_SCALES)}, got {self.lr_scale!r}")
        if not self.kl_ref > 0:
            raise ValueError(f"recovery.budget.kl_ref must be > 0, got {self.kl_ref}")
        if self.tokens not in BUDGET_TOKENS:
            raise ValueError(f"recovery.budget.tokens must be one of {list(BUDGET_TOKENS)}, got {self.tokens!r}")


def shared_value(x):
    """Rank 0's ``x`` on every rank (a broadcast when a process group is initialised): every rank then
    takes the same skip / lr / stop decision."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        box = [x]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]
    return x


def lr_factor(kl: float, kl_ref: float, mode: str) -> float:
    """Multiplier of train.lr: 1 (none), min(1, kl/kl_ref) (linear), min(1, sqrt(kl/kl_ref)) (sqrt)."""
    if mode == "none":
        return 1.0
    x = max(kl, 0.0) / kl_ref
    return min(1.0, x if mode == "linear" else math.sqrt(x))


def decide(budget: BudgetConfig, kl_before: float, lr: float) -> dict:
    """The budget decision for a degraded model at ``kl_before`` (-> run.json ``recovery.budget``).

    {kl_before, kl_min, skipped, reason, lr_scale, kl_ref, lr_factor, lr}: ``lr`` is the
    learning rate to train with (None when skipped).
    """
    skipped = kl_before < budget.kl_min
    factor = lr_factor(kl_before, budget.kl_ref, budget.lr_scale)
    reason = f"kl_before {kl_before:.4g} < kl_min {budget.kl_min:g}" if skipped else None
    return {"kl_before": kl_before, "kl_min": budget.kl_min, "skipped": skipped, "reason": reason,
            "lr_scale": budget.lr_scale, "kl_ref": budget.kl_ref, "lr_factor": factor,
            "lr": None if skipped else lr * factor}


class KLEarlyStop:
    """Probe-KL early stopping: ``observe(step)`` after every optimiser step, ``stopped`` says when to stop.

    ``measure()`` returns the probe KL of the model now.  State (curve, best, bad, stopped_at)
    is plain Python: :meth:`state` / :meth:`load_state` carry it through a checkpoint.
    """

    def __init__(self, cfg: EarlyStopConfig, kl_start: float, measure: Callable[[], float]):
        self.cfg, self.measure = cfg, measure
        self.curve: list[list[float]] = [[0, float(kl_start)]]  # [step, probe KL]; step 0 = before recovery
        self.best, self.bad, self.stopped_at = float(kl_start), 0, None

    def update(self, step: int, kl: float) -> bool:
        """Record the probe KL at ``step`` -> whether to stop now."""
        self.curve.append([step, float(kl)])
        if kl < self.best * (1 - self.cfg.min_rel_drop):
            self.best, self.bad = float(kl), 0
        else:
            self.best, self.bad = min(self.best, float(kl)), self.bad + 1
        if self.bad >= self.cfg.patience:
            self.stopped_at = step
        return self.stopped_at is not None

    def observe(self, step: int) -> None:
        if self.stopped_at is None and step % self.cfg.every == 0:
            self.update(step, self.measure())

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None

    def state(self) -> dict:
        return {"curve": [list(p) for p in self.curve], "best": self.best, "bad": self.bad,
                "stopped_at": self.stopped_at}

    def load_state(self, state: dict) -> None:
        if state:
            self.curve = [[int(s), float(k)] for s, k in state["curve"]]
            self.best, self.bad, self.stopped_at = float(state["best"]), int(state["bad"]), state["stopped_at"]

    def summary(self) -> dict:
        """-> run.json ``recovery.budget.early_stop``."""
        return {**dataclasses.asdict(self.cfg), "stopped_at": self.stopped_at, "best_kl": self.best,
                "curve": [list(p) for p in self.curve]}
