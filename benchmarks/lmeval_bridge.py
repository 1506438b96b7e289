"""Bridge to lm-evaluation-harness (lm-eval 0.4.x): export suite tasks, evaluate models.

Export (offline): each suite task becomes a directory with ``docs.jsonl`` (one row
per example: ``id``, ``prompt`` = the suite's rendered prompt, shots included,
``golds``, and for classification ``choices`` / ``gold``) and ``<name>.yaml``::

    task: scd_rotten_tomatoes
    dataset_path: json
    dataset_kwargs: {data_files: {test: /abs/.../docs.jsonl}}
    test_split: test
    doc_to_text: prompt               # a column name: used verbatim, no Jinja
    # classification
    output_type: multiple_choice
    doc_to_choice: choices            # label + end-of-turn text, as the suite scores them
    doc_to_target: gold               # index of the gold label
    target_delimiter: ""
    metric_list: [{metric: acc}]
    # qa / ner
    output_type: generate_until
    doc_to_target: golds              # all gold strings (max over them)
    generation_kwargs: {until: [<end-of-turn strings>], max_gen_toks: N, do_sample: false,
                        eos_token_id: [<stop ids>]}
    metric_list: [{metric: exact_match, ignore_case: true, ignore_punctuation: true}]

The prompts are rendered with the evaluated model's tokenizer (chat template), so
an export belongs to one tokenizer; few-shot demonstrations are part of the
prompt and lm-eval runs with ``num_fewshot=0``.

Evaluate: :func:`run_lm_eval` wraps an in-memory model in
``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tok)`` and calls
``lm_eval.simple_evaluate`` with ``TaskManager(include_path=export_dir,
include_defaults=False)`` -- fully offline.  Any other lm-eval task name can be
mixed in (``include_defaults=True`` then; its dataset must be reachable).

Results land in run.json as ``eval["lm_eval:<task>"] = {metric: {value, n, ci}}``
with ``ci = value +- 1.96 * stderr`` (lm-eval's bootstrap/analytic stderr) and
``metric_meta["lm_eval:<task>/<metric>"]`` (``chance`` known for exported
classification tasks, ``null`` otherwise).
"""
from __future__ import annotations

import logging
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks.tasks import scorer_for
from benchmarks.tasks.base import task_max_new_tokens
from benchmarks.tasks.suite import expand_tasks, few_shot_examples, task_examples
from scd.core.results import atomic_write_text, dumps
from scd.data.tasks import TASKS
from scd.tokens import stop_token_ids

PREFIX = "scd_"
EVAL_PREFIX = "lm_eval:"


def lm_eval_name(task: str) -> str:
    return PREFIX + re.sub(r"[^A-Za-z0-9_]+", "_", task)


def _yaml_dump(obj: dict) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True)


def export_task(task: str, out_dir: str | Path, tokenizer, *, split: str = "test", limit: int | None = None,
                shots: int = 0, shot_seed: int = 0, max_new_tokens: int | None = None,
                examples: Sequence[dict] | None = None, shot_examples: Sequence[dict] | None = None) -> str:
    """Write ``out_dir/<name>/{docs.jsonl, <name>.yaml}`` for one suite task; returns the lm-eval name."""
    examples = list(examples) if examples is not None else task_examples(task, split, limit)
    family = examples[0]["family"]
    if shot_examples is None:
        shot_examples = (few_shot_examples(task, shots, shot_seed, exclude_ids=[e["id"] for e in examples])
                         if shots else [])
    scorer = scorer_for(family)
    prompts = scorer.prompts(examples, tokenizer, shot_examples)
    name = lm_eval_name(task)
    d = Path(out_dir).resolve() / name
    docs = []
    for ex, prompt in zip(examples, prompts):
        row: dict[str, Any] = {"id": ex["id"], "prompt": prompt}
        if family == "classification":
            row["choices"] = scorer.candidates(ex, tokenizer)
            row["gold"] = list(ex["label_set"]).index(ex["label"])
            row["golds"] = [ex["label"]]
        elif family == "qa":
            row["golds"] = list(ex["answers"])
        else:
            row["golds"] = [ex["target"]]
        docs.append(row)
    atomic_write_text(d / "docs.jsonl", "".join(dumps(r, indent=None) + "\n" for r in docs))
    cfg: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(d / "docs.jsonl")}},
        "test_split": "test",
        "doc_to_text": "prompt",
        "num_fewshot": 0,  # demonstrations are already in the prompt
    }
    if family == "classification":
        cfg.update({"output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "gold",
                    "target_delimiter": "",
                    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]})
    else:
        stop_ids = stop_token_ids(tokenizer)
        cfg.update({"output_type": "generate_until", "doc_to_target": "golds",
                    "generation_kwargs": {"until": [tokenizer.decode([i]) for i in stop_ids],
                                          "max_gen_toks": int(max_new_tokens or task_max_new_tokens(task)),
                                          "do_sample": False, "eos_token_id": stop_ids},
                    "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                     "ignore_case": True, "ignore_punctuation": True}]})
    cfg["metadata"] = {"version": 1.0, "suite_task": task, "family": family, "split": split, "n": len(docs),
                       "shots": len(shot_examples), "shot_ids": [s.get("id") for s in shot_examples],
                       "chance": (1.0 / len(examples[0]["label_set"])) if family == "classification" else None}
    atomic_write_text(d / f"{name}.yaml", _yaml_dump(cfg))
    return name


def export_tasks(tasks: Sequence[str], out_dir: str | Path, tokenizer, **kw: Any) -> dict[str, str]:
    """Export several suite tasks; returns {suite task: lm-eval task name}."""
    return {t: export_task(t, out_dir, tokenizer, **kw) for t in tasks}


def make_lm(model, tokenizer, *, batch_size: int = 8, max_length: int | None = None):
    """An lm-eval HFLM around an in-memory model (its device, dtype and tokenizer)."""
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    kw: dict[str, Any] = {"pretrained": model, "tokenizer": tokenizer, "batch_size": batch_size,
                          "device": device}
    if max_length is not None:
        kw["max_length"] = max_length
    return HFLM(**kw)


def run_lm_eval(model, tokenizer, tasks: Sequence[str], *, include_path: str | Path | None = None,
                include_defaults: bool = False, batch_size: int = 8, limit: int | None = None,
                log_samples: bool = True, lm=None) -> dict:
    """``lm_eval.simple_evaluate`` on an in-memory model; returns lm-eval's results dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    tm = TaskManager(include_path=str(include_path) if include_path is not None else None,
                     include_defaults=include_defaults)
    lm = lm if lm is not None else make_lm(model, tokenizer, batch_size=batch_size)
    was_training = model.training
    model.eval()
    try:
        # num_fewshot=None: each task's own setting (0 for exported suite tasks, whose prompts
        # already hold the demonstrations; the task's default for other lm-eval tasks)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=None, task_manager=tm, limit=limit,
                                      log_samples=log_samples, bootstrap_iters=1000, verbosity="WARNING")
    finally:
        model.train(was_training)
    if out is None:  # non-zero ranks
        return {}
    return out


def results_to_eval(results: dict, names: dict[str, str], chance: dict[str, float | None] | None = None) -> dict:
    """lm-eval results -> {"eval", "metric_meta"} entries keyed ``lm_eval:<task>``.

    ``names`` maps the key to use (suite task or lm-eval task) -> lm-eval task name.
    """
    chance = chance or {}
    ev, meta = {}, {}
    n_samples = results.get("n-samples", {})
    for key, lm_name in names.items():
        res = results.get("results", {}).get(lm_name)
        if res is None:
            continue
        n = int((n_samples.get(lm_name) or {}).get("effective", 0))
        hib = results.get("higher_is_better", {}).get(lm_name, {})
        metrics = {}
        for k, v in res.items():
            if "," not in k or "_stderr" in k or not isinstance(v, (int, float)):
                continue
            metric, filt = k.split(",", 1)
            se = res.get(f"{metric}_stderr,{filt}")
            se = float(se) if isinstance(se, (int, float)) and math.isfinite(float(se)) else None
            mname = metric if filt == "none" else f"{metric}_{filt}"
            ci = [float(v) - 1.96 * se, float(v) + 1.96 * se] if se is not None else [None, None]
            metrics[mname] = {"value": round(float(v), 6), "n": n,
                              "ci": [round(c, 6) if c is not None else None for c in ci]}
            meta[f"{EVAL_PREFIX}{key}/{mname}"] = {"higher_is_better": bool(hib.get(metric, True)),
                                                   "chance": chance.get(key), "primary": len(metrics) == 1}
        ev[f"{EVAL_PREFIX}{key}"] = metrics
    return {"eval": ev, "metric_meta": meta}


def evaluate_lm_eval(model, tokenizer, names: Sequence[str], *, work_dir: str | Path | None = None,
                     split: str = "test", limit: int | None = None, shots: int = 0, shot_seed: int = 0,
                     batch_size: int = 8, max_new_tokens: int | None = None, scoring: str = "generate") -> dict:
    """Run suite tasks (exported) and/or lm-eval task names through lm-eval.

    Returns ``{"eval", "metric_meta", "eval_info"}`` for run.json (see module doc).
    ``scoring`` is unused (exported classification tasks are always multiple_choice).
    """
    t0 = time.time()
    suite = [n for n in names if n in TASKS or n in ("all", "qa", "ner", "classification")]
    external = [n for n in names if n not in suite]
    suite = expand_tasks(suite) if suite else []
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="scd-lmeval-")
        work_dir = tmp.name
    try:
        mapping = export_tasks(suite, Path(work_dir) / "tasks", tokenizer, split=split, limit=limit, shots=shots,
                               shot_seed=shot_seed, max_new_tokens=max_new_tokens) if suite else {}
        chance = {}
        for t in suite:
            spec = TASKS.get(t)
            chance[t] = 1.0 / len(spec.label_set) if spec.family == "classification" and spec.label_set else 0.0
        lm_names = list(mapping.values()) + external
        results = run_lm_eval(model, tokenizer, lm_names, include_path=Path(work_dir) / "tasks" if suite else None,
                              include_defaults=bool(external), batch_size=batch_size,
                              limit=limit if external else None, log_samples=False)
    finally:
        if tmp is not None:
            tmp.cleanup()
    out = results_to_eval(results, {**mapping, **{e: e for e in external}}, chance)
    wall = round(time.time() - t0, 2)
    out["eval_info"] = {f"{EVAL_PREFIX}{k}": {"harness": "lm-eval", "lm_eval_task": v, "split": split,
                                              "limit": limit, "shots": shots if k in mapping else 0,
                                              "wall_s_all": wall}
                        for k, v in {**mapping, **{e: e for e in external}}.items()}
    return out
