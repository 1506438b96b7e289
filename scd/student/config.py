"""Configuration of the student recipe: :class:`StudentConfig` and its blocks.

Unknown keys fail with a did-you-mean hint (``scd.core.config``); a misspelt cut rule too
(``cut.rule`` is a Literal).  Every field is part of the run id, so a student run is reused by
every config that names the same (base model, cut, dev sample, heal, data, train, seed).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from benchmarks.evaluate import EvalSpec
from scd.core.train import TrainConfig
from scd.data_config import DataConfig
from scd.models import ModelConfig


@dataclasses.dataclass(frozen=True)
class CutConfig:
    """Which decoder layers of the base model the student keeps."""

    # greedy_kl: drop, one at a time, the layer whose removal raises the dev KL(base || pruned) least;
    # fixed: the layers of `layers` (a keep_layers spec: [0, 3, ...], "every_k:K", "first:N")
    rule: Literal["greedy_kl", "fixed"] = "greedy_kl"
    keep: int = 16  # greedy_kl: layers kept
    layers: Any = None  # fixed: the keep_layers spec

    def __post_init__(self) -> None:
        if self.rule == "greedy_kl" and self.layers is not None:
            raise ValueError("cut.layers is the kept set of rule 'fixed'; rule 'greedy_kl' chooses them "
                             "(set cut.keep, the number kept)")
        if self.rule == "fixed" and self.layers is None:
            raise ValueError("cut.rule 'fixed' needs cut.layers (e.g. every_k:3 or [0, 5, 11])")
        if self.keep < 1:
            raise ValueError(f"cut.keep must be >= 1, got {self.keep}")


@dataclasses.dataclass(frozen=True)
class DevSampleConfig:
    """The fixed dev sample of every KL measurement (the cut's greedy steps and the heal curve):
    ``n`` examples of ``split`` over ``data.tasks`` (a seeded subset independent of the run's seed),
    prompt + answer text, all positions, truncated to ``train.max_len``."""

    split: str = "dev"
    n: int = 32
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.n < 1 or self.batch_size < 1:
            raise ValueError("dev.n and dev.batch_size must be >= 1")


@dataclasses.dataclass(frozen=True)
class HealConfig:
    """Healing: KD from the full base model at every position; early stop on the dev KL."""

    eval_every: int = 10  # optimiser steps between dev-KL measurements (also measured at step 0 and the end)
    patience: int = 3  # stop after this many measurements without a new best
    min_delta: float = 0.0  # a new best must be below the best so far by more than this (nats/token)
    restore_best: bool = True  # end with the weights of the best measurement (else the last)

    def __post_init__(self) -> None:
        if self.eval_every < 1 or self.patience < 1:
            raise ValueError("heal.eval_every and heal.patience must be >= 1")
        if self.min_delta < 0:
            raise ValueError(f"heal.min_delta must be >= 0, got {self.min_delta}")


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    recipe: str = "student"
    method: str = "student"
    grid: str | None = None
    seed: int = 0
    base: ModelConfig = ModelConfig()  # the full model the student is cut from and distilled from
    cut: CutConfig = CutConfig()
    dev: DevSampleConfig = DevSampleConfig()
    heal: HealConfig = HealConfig()
    data: DataConfig = DataConfig()  # general text: prompt + answer of data.tasks' `split` examples
    train: TrainConfig = TrainConfig()  # max_steps bounds healing; batch_size, max_len, lr, dtype
    eval: EvalSpec = EvalSpec()  # optional: score the healed student

    def __post_init__(self) -> None:
        if self.base.student is not None:
            raise ValueError("base.student: the base of a student is a full model, not another student run")
        if self.base.lora:
            raise ValueError("base.lora: the student is cut from the base's plain weights; remove it")
