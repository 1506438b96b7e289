"""Evaluate a saved run or a model on the suite's tasks; results go into run.json.

One evaluation config, :class:`EvalSpec` (the training recipes' ``eval:`` block), which the
standalone evaluator's :class:`EvalConfig` extends.  Command line and run.json contents: see
:mod:`benchmarks.evaluate.cli` (``python -m benchmarks.evaluate --help``).

Modules, lowest first (task/example selection lives below, in :mod:`benchmarks.tasks.suite`):
``model_io`` (run-dir models, loading, slugs), ``probe`` (CKA against a reference model),
``model_eval`` (evaluate an in-memory model), ``config`` (EvalSpec, EvalConfig), ``runner``
(evaluate a run dir or model into run.json; recipe ``evaluate``), ``rescore``, ``cli``.
"""
from __future__ import annotations

from benchmarks.evaluate.cli import build_config, main, make_parser
from benchmarks.evaluate.config import EvalConfig, EvalSpec
from benchmarks.evaluate.model_eval import evaluate_model, evaluate_task, write_predictions
from benchmarks.evaluate.model_io import load_model, run_model_path, slug, task_file
from benchmarks.evaluate.probe import CKAOptions, cka_batches, run_cka
from benchmarks.evaluate.rescore import rescore_main, rescore_run
from benchmarks.evaluate.runner import DEFAULT_ROOT, evaluate, merge_into_run, run
from benchmarks.tasks.suite import FAMILIES, check_prompts, expand_tasks, few_shot_examples, task_examples

__all__ = ["CKAOptions", "DEFAULT_ROOT", "EvalConfig", "EvalSpec", "FAMILIES", "build_config", "check_prompts",
           "cka_batches", "evaluate", "evaluate_model", "evaluate_task", "expand_tasks", "few_shot_examples",
           "load_model", "main", "make_parser", "merge_into_run", "rescore_main", "rescore_run", "run",
           "run_cka", "run_model_path", "slug", "task_examples", "task_file", "write_predictions"]
