"""The one evaluation config: :class:`EvalSpec` says what to evaluate and how (the ``eval:`` block of
every training recipe); :class:`EvalConfig` is the standalone evaluator's config (recipe ``evaluate``,
``configs/eval/*.yaml``): the same fields and defaults plus which model, where and on what device."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from benchmarks.evaluate.model_eval import evaluate_model
from benchmarks.evaluate.probe import CKAOptions
from benchmarks.tasks.suite import check_prompts, expand_tasks
from scd.core.config import added_field
from scd.data.label_words import LabelWords


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """What to evaluate and how.  Training recipes run it on their final model (``run``).

    The recipes' resolved configs (and so their run ids) hash these fields: a new field must be an
    :func:`~scd.core.config.added_field`, and the defaults must not change.
    """

    tasks: tuple[str, ...] = ()  # task names, family names (qa/ner/classification), all; empty: no evaluation
    split: Literal["train", "dev", "test"] = "test"
    limit: int | None = 200  # first N examples of the split (None: all)
    shots: int = 0  # few-shot demonstrations from the train split
    batch_size: int = 16
    scoring: Literal["generate", "likelihood", "calibrated"] = "generate"  # classification tasks only
    max_new_tokens: int | None = None  # None: each task's own budget (TaskSpec.max_new_tokens)
    lm_eval_tasks: tuple[str, ...] = ()
    # per-task prompt variants of classification tasks: label words (verbalizer) and instruction,
    # e.g. {rotten_tomatoes: {label_words: {fresh: positive, rotten: negative}}}; suite scorer only
    prompts: dict[str, LabelWords] = added_field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1 (or null for all examples)")
        if self.shots < 0:
            raise ValueError("shots must be >= 0")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        check_prompts(self.prompts, self.tasks)

    def run(self, model, tokenizer, run_dir: Path) -> dict:
        """Returns {"eval": ..., "metric_meta": ...} for run.json (empty when no tasks)."""
        if not self.tasks and not self.lm_eval_tasks:
            return {}
        model.eval()
        return evaluate_model(model, tokenizer, tasks=list(self.tasks), split=self.split, limit=self.limit,
                              shots=self.shots, batch_size=self.batch_size, scoring=self.scoring,
                              max_new_tokens=self.max_new_tokens, lm_eval_tasks=list(self.lm_eval_tasks),
                              out_dir=Path(run_dir), prompts=self.prompts)

    def with_tasks(self, tasks: tuple[str, ...], **changes) -> "EvalSpec":
        """A copy evaluating ``tasks`` (label words kept for the tasks it still has)."""
        names = expand_tasks(tasks)
        return dataclasses.replace(self, tasks=tuple(tasks), **changes,
                                   prompts={t: p for t, p in self.prompts.items() if t in names})


@dataclasses.dataclass(frozen=True)
class EvalConfig(EvalSpec):
    """The standalone evaluator (``python -m benchmarks.evaluate``, ``scd run configs/eval/x.yaml``):
    :class:`EvalSpec` plus the model, the output folder, the device and the bootstrap/shot seeds.
    Its run id hashes only the model, so these defaults may change without renaming runs."""

    recipe: str = "evaluate"
    model: str | None = None  # run dir or model name/path (the CLI positional argument wins)
    shot_seed: int = 0
    lm_eval_limit: int | None = None  # None: same as limit
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str | None = None  # None: cuda if available, else cpu
    num_threads: int | None = None
    n_boot: int = 1000
    seed: int = 0  # bootstrap seed
    out: str | None = None  # run dir for a bare model (default results/eval/<model>-<hash>)
    progress: bool = True
    cka: CKAOptions = CKAOptions()

    def __post_init__(self) -> None:
        if self.recipe != "evaluate":
            raise ValueError(f"recipe must be 'evaluate', got {self.recipe!r}")
        if self.n_boot < 1:
            raise ValueError("n_boot must be >= 1")
        super().__post_init__()
