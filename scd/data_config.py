"""The recipes' data block: which task data to train on, and loading it as records or prompt pairs.

``prompts`` shows classification tasks to the model in other label words (and instruction) while it
trains, e.g. ``{rotten_tomatoes: {label_words: {fresh: positive, rotten: negative}}}``; give the eval
block the same ``prompts`` so the model is scored on the words it was trained on.

(The recipes' ``eval:`` block is :class:`benchmarks.evaluate.EvalSpec`, the one evaluation config.)"""
from __future__ import annotations

import dataclasses
import hashlib

from scd.core.config import added_field
from scd.core.registry import RegistryError
from scd.data.load import is_spec, load_split
from scd.data.prompts import render_prompt, render_target
from scd.data.tasks import TASKS
from scd.data.label_words import LabelWords, verbalize


@dataclasses.dataclass(frozen=True)
class DataConfig:
    tasks: tuple[str, ...] = ("rotten_tomatoes",)
    split: str = "train"
    limit_per_task: int | None = None  # cap on training examples per task (None: all)
    shots: int = 0  # few-shot demonstrations in each training prompt
    skip_malformed: bool = False  # skip (and count) malformed rows instead of failing
    # share of the train split's examples with an empty answer (NER: no entity, QA: unanswerable) that is kept,
    # chosen by a hash of the example id (the same subset for every seed and row); 1.0 keeps all.  Dev and test
    # are never filtered.  For tasks where "none" dominates (62 % of WNUT-16 train tweets) and small models
    # learn to answer it for everything.
    keep_empty: float = added_field(default=1.0)
    # per-task label words (and instruction) of classification tasks, as the eval block's `prompts`
    prompts: dict[str, LabelWords] = added_field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("data.tasks is empty: name at least one task")
        if self.limit_per_task is not None and self.limit_per_task < 1:
            raise ValueError("data.limit_per_task must be >= 1")
        if not 0.0 < self.keep_empty <= 1.0:
            raise ValueError(f"data.keep_empty must be in (0, 1], got {self.keep_empty}")
        check_task_names(self.tasks, "data.tasks")
        for name in self.prompts:
            if name not in self.tasks:
                raise ValueError(f"data.prompts.{name}: not among data.tasks {list(self.tasks)}")
            if not is_spec(name) and TASKS.get(name).family != "classification":
                raise ValueError(f"data.prompts.{name}: label words apply to classification tasks, "
                                 f"'{name}' is {TASKS.get(name).family}")


def check_task_names(tasks, key: str) -> None:
    """Unknown task names fail at config time (with did-you-mean), not mid-run."""
    for task in tasks:
        if is_spec(task):
            continue
        try:
            TASKS.get(task)
        except RegistryError as e:
            raise ValueError(f"{key}: {e}") from None


def has_empty_answer(example: dict) -> bool:
    """A NER example without an entity or a QA example without an answer (classification: never)."""
    family = example.get("family")
    if family == "ner":
        return not example.get("entities")
    if family == "qa":
        return example.get("answerable") is False or not example.get("answers")
    return False


def keep_share(rows: list[dict], keep: float) -> list[dict]:
    """``rows`` with only a ``keep`` share of the empty-answer ones: an example is kept when the sha256 of its id,
    read as a number in [0, 1), is below ``keep`` (stable across runs, seeds and the order of ``rows``)."""
    if keep >= 1.0:
        return rows
    return [r for r in rows if not has_empty_answer(r)
            or int(hashlib.sha256(str(r["id"]).encode("utf-8")).hexdigest()[:12], 16) / 16 ** 12 < keep]


def load_examples(cfg: DataConfig, split: str | None = None) -> list[dict]:
    """The examples of ``cfg.tasks`` on ``split`` (default ``cfg.split``); the train split is thinned by
    ``cfg.keep_empty``."""
    split = split or cfg.split
    out: list[dict] = []
    for task in cfg.tasks:
        if not is_spec(task):
            TASKS.get(task)  # unknown task -> did-you-mean error
        rows = load_split(task, split, limit=cfg.limit_per_task, skip_malformed=cfg.skip_malformed)
        if not rows:
            raise ValueError(f"task '{task}' split '{split}' is empty")
        if split == "train":
            rows = keep_share(rows, cfg.keep_empty)
        if task in cfg.prompts:
            rows = [verbalize(r, cfg.prompts[task]) for r in rows]
        out.extend(rows)
    return out


def task_shots(task: str, n: int, words: LabelWords | None = None) -> list[dict]:
    """The few-shot demonstrations of ``task``'s training prompts: its first ``n`` dev examples, shown in the label
    ``words`` (when given) like the examples themselves."""
    shots = load_split(task, "dev", limit=n) if n else []
    return [verbalize(r, words) for r in shots] if words is not None else shots


def load_shots(cfg: DataConfig) -> dict[str, list[dict]]:
    """{task: :func:`task_shots` of ``cfg.shots`` in the task's label words (``cfg.prompts``)}; {} without ``shots``."""
    if not cfg.shots:
        return {}
    return {task: task_shots(task, cfg.shots, cfg.prompts.get(task)) for task in cfg.tasks}


def load_training_pairs(cfg: DataConfig, tokenizer, split: str | None = None) -> list[tuple[str, str]]:
    """(prompt text, target text) pairs rendered with the tokenizer's chat template."""
    rows = load_examples(cfg, split)
    shots_by_task = load_shots(cfg)
    return [(render_prompt(r, tokenizer, shots=shots_by_task.get(r["task"], ())), render_target(r, tokenizer))
            for r in rows]
