"""Configuration of the distillation recipe: :class:`DistillConfig` and its blocks.

Validated when loaded (``python -m scd validate``): unknown selection / weighting /
divergence names fail with a did-you-mean hint from their registries.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import scd.schedule  # noqa: F401  (registers selection rules)
import scd.weighting  # noqa: F401  (registers weighting rules)
from benchmarks.evaluate import EvalSpec
from scd.core.config import added_field
from scd.core.registry import RegistryError, registry
from scd.core.train import TrainConfig
from scd.data_config import DataConfig
from scd.losses import resolve_divergence
from scd.models import ModelConfig


def _check_registered(kind: str, name: str, key: str) -> None:
    try:
        registry(kind).get(name)
    except RegistryError as e:
        raise ValueError(f"{key}: {e}") from None


@dataclasses.dataclass(frozen=True)
class TeacherCacheConfig:
    """Teacher-logit cache (``scd.teacher_cache``): each teacher checkpoint's outputs at the training
    set's target positions, computed once and shared by every method, seed and grid using it."""

    k: int | str = 64  # top-k log-probs + the log-mass of the rest; "full": all logits (exact)
    root: str | None = None  # shared cache root (None: $SCD_CACHE/teacher_logits)
    dtype: str = "float32"  # storage dtype: float32 | bfloat16 | float16

    def __post_init__(self) -> None:
        if self.k != "full" and not (isinstance(self.k, int) and not isinstance(self.k, bool) and self.k >= 1):
            raise ValueError(f"teacher.cache.k must be a positive integer or 'full', got {self.k!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"teacher.cache.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


@dataclasses.dataclass(frozen=True)
class TeacherSource:
    """Where the teacher's checkpoints come from: an existing run, or a config to run first."""

    run_dir: str | None = None  # a teacher run (checkpoints/manifest.json) or a manifest directory
    config: str | None = None  # a teacher config: trained once at <results_dir>/runs/<method>-<run_id>, then reused
    seed: int | None = None  # seed of the `config` teacher (None: this run's seed)
    results_dir: str = "results"  # root for `config` teachers (same path `python -m scd run` would use)
    allow_vocab_prefix: bool = False  # accept a teacher vocab that extends the student's (logits sliced)
    dtype: str = "float32"  # teacher weights on the device (bfloat16 on GPUs)
    # teacher-logit cache ({k: 64} | {k: full}); None: the live teacher runs at every step
    cache: TeacherCacheConfig | None = added_field(default=None)

    def __post_init__(self) -> None:
        if self.run_dir and self.config:
            raise ValueError("teacher: give either run_dir or config, not both")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"teacher.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    @property
    def given(self) -> bool:
        return bool(self.run_dir or self.config)


@dataclasses.dataclass(frozen=True)
class StagesConfig:
    n_stages: int = 1  # 0: one stage per teacher checkpoint (SCD's setting)
    steps_per_stage: int = 0  # optimiser steps per stage (0: epochs_per_stage, else train.max_steps // n_stages)
    epochs_per_stage: float = 0.0  # passes over the training set per stage (paper: 2)
    selection: str = "final"  # final | best | fixed_order | scd_select (registry "selection")
    reset_optimizer: bool = True  # fresh AdamW state + LR schedule per stage (paper); else one schedule overall

    def __post_init__(self) -> None:
        if self.n_stages < 0:
            raise ValueError(f"stages.n_stages must be >= 0 (0: one per teacher checkpoint), got {self.n_stages}")
        if self.steps_per_stage < 0 or self.epochs_per_stage < 0:
            raise ValueError("stages.steps_per_stage and stages.epochs_per_stage must be >= 0")
        _check_registered("selection", self.selection, "stages.selection")


REDUCTIONS = ("token", "sample")
KD_POSITIONS = ("target", "all")


@dataclasses.dataclass(frozen=True)
class DistillLossConfig:
    divergence: str = "forward_kl"  # registry "loss": forward_kl | reverse_kl | jsd | skew_kl | skew_rkl
    temperature: float = 1.0  # logits / tau, loss * tau^2
    params: dict = dataclasses.field(default_factory=dict)  # e.g. {beta: 0.5} for jsd, {lam: 0.1} for skew_kl
    # where the KD term is computed: "target" = the answer tokens (CE's positions); "all" = every
    # position with a next token, prompt included (CE stays on the targets; needs weighting.reduce: sample)
    positions: str = added_field(default="target")

    def __post_init__(self) -> None:
        if self.positions not in KD_POSITIONS:
            raise ValueError(f"loss.positions must be one of {list(KD_POSITIONS)}, got {self.positions!r}")
        try:
            resolve_divergence(self.divergence, self.params)
        except RegistryError as e:
            raise ValueError(f"loss.divergence: {e}") from None
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"loss.temperature must be > 0, got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class WeightingConfig:
    name: str = "none"  # none (constant alpha) | aw (Adaptive Weighting)
    alpha: float = 1.0  # `none`: weight of the KD term (1: pure KD, 0: gold labels only = SFT)
    anchor_run_dir: str | None = None  # `aw`: an SFT student run (its model/) or an HF model folder
    anchor_config: str | None = None  # `aw`: or an SFT config, trained once at <teacher.results_dir>/runs/...
    anchor_seed: int | None = None  # seed of the `anchor_config` run (None: this run's seed)
    # how w KD + (1 - w) CE is averaged: "sample" = the paper's mean over samples of each sample's
    # per-token means; "token" = a sum over target tokens / target tokens (long answers weigh more).
    # The default stays "token" so that every committed run id keeps meaning what it computed;
    # SCD study configs set "sample" (docs/scd.md, "Loss reduction").
    reduce: str = added_field(default="token")

    def __post_init__(self) -> None:
        _check_registered("weighting", self.name, "weighting.name")
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"weighting.reduce must be one of {list(REDUCTIONS)}, got {self.reduce!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"weighting.alpha must be in [0, 1], got {self.alpha}")
        if self.anchor_run_dir and self.anchor_config:
            raise ValueError("weighting: give either anchor_run_dir or anchor_config, not both")
        if self.needs_losses and not (self.anchor_run_dir or self.anchor_config):
            raise ValueError(f"weighting '{self.name}' needs a student anchor: set weighting.anchor_run_dir (an SFT "
                             "student run) or weighting.anchor_config (e.g. configs/scd/sft_anchor_tiny.yaml)")

    @property
    def gold_only(self) -> bool:
        return self.name == "none" and self.alpha == 0.0

    @property
    def needs_losses(self) -> bool:
        """The rule takes per-sample anchor / checkpoint losses (``aw``, or a registered rule flagged so)."""
        return bool(getattr(registry("weighting").get(self.name), "needs_losses", False))


@dataclasses.dataclass(frozen=True)
class SelectionProbeConfig:
    """Held-out probe set for scd_select's KLs."""

    split: str = "dev"
    n: int = 64  # probe examples (a fixed seeded subset of the split over all data.tasks)
    batch_size: int = 8


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    recipe: str = "distill"
    method: str = "kd"
    grid: str | None = None
    seed: int = 0
    mode: Literal["distill", "eval_teacher"] = "distill"  # eval_teacher: score the selected teacher checkpoint
    model: ModelConfig = ModelConfig()  # the student
    teacher: TeacherSource = TeacherSource()
    stages: StagesConfig = StagesConfig()
    loss: DistillLossConfig = DistillLossConfig()
    weighting: WeightingConfig = WeightingConfig()
    probe: SelectionProbeConfig = SelectionProbeConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalSpec = EvalSpec()
    deepspeed: str | None = None  # DeepSpeed JSON (configs/deepspeed/zero2.json | zero3.json); None: plain PyTorch
    save_model: bool = True

    def __post_init__(self) -> None:
        if not self.teacher.given and not (self.mode == "distill" and self.weighting.gold_only):
            raise ValueError("teacher: set teacher.run_dir (a teacher run) or teacher.config (a teacher config)")
        if self.mode == "eval_teacher" and self.stages.selection not in ("final", "best"):
            raise ValueError("mode eval_teacher scores one checkpoint: stages.selection must be final or best")
        if self.deepspeed is not None and not self.deepspeed.endswith(".json"):
            raise ValueError(f"deepspeed: expected a DeepSpeed JSON file, got {self.deepspeed!r}")
        if self.loss.positions == "all":
            if self.weighting.reduce != "sample":
                raise ValueError("loss.positions: all puts KD on every position and CE on the targets, so the two "
                                 "terms have different token counts: set weighting.reduce: sample")
            if self.teacher.cache is not None:
                raise ValueError("loss.positions: all needs the teacher at every position; the teacher-logit cache "
                                 "holds the target positions only: remove teacher.cache")
