"""Config blocks shared by the recipes: which task data to train on, how to evaluate."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from benchmarks.tasks.classification import LabelWords
from scd.core.config import added_field


@dataclasses.dataclass(frozen=True)
class DataConfig:
    tasks: tuple[str, ...] = ("rotten_tomatoes",)
    split: str = "train"
    limit_per_task: int | None = None  # cap on training examples per task (None: all)
    shots: int = 0  # few-shot demonstrations in each training prompt
    skip_malformed: bool = False  # skip (and count) malformed rows instead of failing

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("data.tasks is empty: name at least one task")
        if self.limit_per_task is not None and self.limit_per_task < 1:
            raise ValueError("data.limit_per_task must be >= 1")
        check_task_names(self.tasks, "data.tasks")


def check_task_names(tasks, key: str) -> None:
    """Unknown task names fail at config time (with did-you-mean), not mid-run."""
    from scd.core.registry import RegistryError
    from scd.data.load import is_spec
    from scd.data.tasks import TASKS

    for task in tasks:
        if is_spec(task):
            continue
        try:
            TASKS.get(task)
        except RegistryError as e:
            raise ValueError(f"{key}: {e}") from None


def load_examples(cfg: DataConfig, split: str | None = None) -> list[dict]:
    from scd.data.load import is_spec, load_split
    from scd.data.tasks import TASKS

    out: list[dict] = []
    for task in cfg.tasks:
        if not is_spec(task):
            TASKS.get(task)  # unknown task -> did-you-mean error
        rows = load_split(task, split or cfg.split, limit=cfg.limit_per_task,
                          skip_malformed=cfg.skip_malformed)
        if not rows:
            raise ValueError(f"task '{task}' split '{split or cfg.split}' is empty")
        out.extend(rows)
    return out


def load_training_pairs(cfg: DataConfig, tokenizer, split: str | None = None) -> list[tuple[str, str]]:
    """(prompt text, target text) pairs rendered with the tokenizer's chat template."""
    from scd.data.prompts import render_prompt, render_target

    rows = load_examples(cfg, split)
    shots_by_task: dict[str, list[dict]] = {}
    if cfg.shots:
        from scd.data.load import load_split

        for task in cfg.tasks:
            shots_by_task[task] = load_split(task, "dev", limit=cfg.shots)
    return [(render_prompt(r, tokenizer, shots=shots_by_task.get(r["task"], ())), render_target(r, tokenizer))
            for r in rows]


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """Evaluation run at the end of a training recipe (see benchmarks.evaluate)."""

    tasks: tuple[str, ...] = ()  # empty: no evaluation
    split: str = "test"
    limit: int | None = 200
    shots: int = 0
    batch_size: int = 16
    scoring: str = "generate"  # generate | likelihood | calibrated (classification)
    max_new_tokens: int | None = None
    lm_eval_tasks: tuple[str, ...] = ()
    # label words per classification task, as in benchmarks.evaluate (EvalConfig.prompts)
    prompts: dict[str, LabelWords] = added_field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scoring not in ("generate", "likelihood", "calibrated"):
            raise ValueError(f"eval.scoring must be generate, likelihood or calibrated, got {self.scoring!r}")
        if self.prompts:
            from benchmarks.evaluate import check_prompts

            check_prompts(self.prompts, self.tasks)

    def run(self, model, tokenizer, run_dir: Path) -> dict:
        """Returns {"eval": ..., "metric_meta": ...} for run.json (empty when no tasks)."""
        if not self.tasks and not self.lm_eval_tasks:
            return {}
        from benchmarks.evaluate import evaluate_model

        model.eval()
        return evaluate_model(model, tokenizer, tasks=list(self.tasks), split=self.split, limit=self.limit,
                              shots=self.shots, batch_size=self.batch_size, scoring=self.scoring,
                              max_new_tokens=self.max_new_tokens, lm_eval_tasks=list(self.lm_eval_tasks),
                              out_dir=Path(run_dir), prompts=self.prompts)

    def with_tasks(self, tasks: tuple[str, ...], **changes) -> "EvalSpec":
        """A copy evaluating ``tasks`` (label words kept for the tasks it still has)."""
        from benchmarks.evaluate import expand_tasks

        names = expand_tasks(tasks)
        return dataclasses.replace(self, tasks=tuple(tasks), **changes,
                                   prompts={t: p for t, p in self.prompts.items() if t in names})
