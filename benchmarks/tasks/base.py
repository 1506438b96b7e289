"""Scorer interface shared by the task families (registry kind ``"scorer"``).

A scorer turns a model + examples into predictions and predictions into metrics::

    scorer = SCORERS.build("classification")          # or qa, ner
    preds = scorer.predict(model, tok, examples, shots=shots, batch_size=8)
    metrics = scorer.score(examples, preds)
    # {"accuracy": {"value", "n", "ci", "higher_is_better", "chance", "primary"}, ...}

``predict`` returns one dict per example, in order, with at least ``id``,
``output`` (the raw decoded generation, or ``None`` for likelihood scoring) and
``prediction`` (the parsed answer / label / entity list).  ``score`` is a pure
function of (examples, predictions); a metric entry may carry ``extra`` (details
that are not a number, e.g. the NER per-type report).  ``per_example`` gives the
per-example scores written next to the predictions.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from benchmarks.stats import bootstrap_ci, metric_entry
from benchmarks.tasks.generate import greedy_generate
from scd.core.registry import registry
from scd.data.prompts import render_prompt
from scd.data.tasks import TASKS

SCORERS = registry("scorer")
META_KEYS = ("higher_is_better", "chance", "primary")


class Scorer:
    family: str = ""
    scorings: tuple[str, ...] = ("generate",)

    def __init__(self, n_boot: int = 1000, seed: int = 0):
        self.n_boot, self.seed = n_boot, seed

    # ------------------------------------------------------------------ prompts
    def prompts(self, examples: Sequence[dict], tokenizer, shots: Sequence[dict] = ()) -> list[str]:
        return [render_prompt(ex, tokenizer, shots=tuple(shots)) for ex in examples]

    def generate(self, model, tokenizer, examples: Sequence[dict], *, shots: Sequence[dict] = (),
                 batch_size: int = 8, max_new_tokens: int | None = None, progress: bool = True) -> list[str]:
        if not examples:
            return []
        budget = max_new_tokens or task_max_new_tokens(examples[0]["task"])
        return greedy_generate(model, tokenizer, self.prompts(examples, tokenizer, shots), max_new_tokens=budget,
                               batch_size=batch_size, progress=progress, desc=f"{examples[0]['task']}")

    def predict(self, model, tokenizer, examples: Sequence[dict], *, shots: Sequence[dict] = (),
                batch_size: int = 8, max_new_tokens: int | None = None, scoring: str = "generate",
                progress: bool = True) -> list[dict]:
        self.check_scoring(scoring)
        outputs = self.generate(model, tokenizer, examples, shots=shots, batch_size=batch_size,
                                max_new_tokens=max_new_tokens, progress=progress)
        return self.predictions_from_outputs(examples, outputs)

    def predictions_from_outputs(self, examples: Sequence[dict], outputs: Sequence[str]) -> list[dict]:
        """Parse raw generations (e.g. from lm-eval) into prediction dicts."""
        if len(outputs) != len(examples):
            raise ValueError(f"{len(outputs)} outputs for {len(examples)} examples")
        return [{"id": ex.get("id"), "output": out, "prediction": self.parse(ex, out)}
                for ex, out in zip(examples, outputs)]

    def parse(self, example: dict, output: str) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_scoring(self, scoring: str) -> None:
        if scoring not in self.scorings:
            raise ValueError(f"scoring '{scoring}' is not available for {self.family} tasks "
                             f"(choose from {', '.join(self.scorings)})")

    # ------------------------------------------------------------------ scores
    def score(self, examples: Sequence[dict], predictions: Sequence[dict]) -> dict[str, dict]:
        raise NotImplementedError  # pragma: no cover

    def per_example(self, examples: Sequence[dict], predictions: Sequence[dict]) -> list[dict]:
        raise NotImplementedError  # pragma: no cover

    def _check(self, examples: Sequence[dict], predictions: Sequence[dict]) -> None:
        if len(examples) != len(predictions):
            raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
        for ex, p in zip(examples, predictions):
            if p.get("id") is not None and ex.get("id") is not None and p["id"] != ex["id"]:
                raise ValueError(f"prediction id {p['id']!r} does not match example id {ex['id']!r} "
                                 "(predictions must be in example order)")

    def mean_metric(self, values, *, higher_is_better: bool, chance: float, primary: bool) -> dict:
        """A metric that is the mean of per-example values, with its bootstrap CI."""
        v = np.asarray(values, dtype=np.float64)
        value = float(v.mean()) if v.size else float("nan")
        ci = bootstrap_ci(v, n_boot=self.n_boot, seed=self.seed)
        return {**metric_entry(value, v.size, ci), "higher_is_better": higher_is_better, "chance": chance,
                "primary": primary}


def task_max_new_tokens(task: str, default: int = 32) -> int:
    try:
        return int(TASKS.get(task).max_new_tokens)
    except KeyError:
        return default


def first_line(text: str) -> str:
    """The first non-empty line of a generation, stripped."""
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""
