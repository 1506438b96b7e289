"""Evaluate an in-memory model: predict + score each task (label words mapped in and out), write
per-example predictions, add lm-eval tasks and CKA; the result merges into run.json."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks.evaluate.model_io import task_file
from benchmarks.evaluate.probe import CKAOptions, run_cka
from benchmarks.lmeval_bridge import evaluate_lm_eval
from benchmarks.tasks import scorer_for
from benchmarks.tasks.base import task_max_new_tokens
from benchmarks.tasks.suite import check_prompts, expand_tasks, few_shot_examples, task_examples
from scd.core.results import atomic_write_text, dumps
from scd.data.label_words import LabelWords, unverbalize, verbalize


def _split_entry(entry: dict) -> tuple[dict, dict, Any]:
    value = {k: entry[k] for k in ("value", "n", "ci")}
    meta = {k: entry[k] for k in ("higher_is_better", "chance", "primary")}
    return value, meta, entry.get("extra")


def evaluate_task(model, tokenizer, task: str, *, split: str = "test", limit: int | None = None, shots: int = 0,
                  shot_seed: int = 0, batch_size: int = 8, max_new_tokens: int | None = None,
                  scoring: str = "generate", n_boot: int = 1000, seed: int = 0, progress: bool = True,
                  examples: Sequence[dict] | None = None, prompt: LabelWords | None = None) -> dict:
    """Predict + score one task.  Returns {metrics, meta, info, rows} (see evaluate_model).

    ``prompt``: a classification prompt variant; the model sees and is scored on its label words,
    predictions are mapped back to the task's labels before scoring (see scd.data.label_words)."""
    t0 = time.time()
    examples = list(examples) if examples is not None else task_examples(task, split, limit)
    family = examples[0]["family"]
    scorer = scorer_for(family, n_boot=n_boot, seed=seed)
    task_scoring = scoring if scoring in scorer.scorings else "generate"
    demos = few_shot_examples(task, shots, shot_seed, exclude_ids=[e["id"] for e in examples]) if shots else []
    budget = max_new_tokens or task_max_new_tokens(task)
    seen, seen_demos = examples, demos
    if prompt is not None:
        if family != "classification":
            raise ValueError(f"prompts.{task}: label words apply to classification tasks, '{task}' is {family}")
        seen, seen_demos = [verbalize(e, prompt) for e in examples], [verbalize(d, prompt) for d in demos]
    preds = scorer.predict(model, tokenizer, seen, shots=seen_demos, batch_size=batch_size,
                           max_new_tokens=budget, scoring=task_scoring, progress=progress)
    if prompt is not None:
        preds = [unverbalize(p, prompt) for p in preds]
    scores = scorer.score(examples, preds)
    per_ex = scorer.per_example(examples, preds)
    metrics, meta, extra = {}, {}, {}
    for name, entry in scores.items():
        metrics[name], meta[name], ex = _split_entry(entry)
        if ex is not None:
            extra[name] = ex
    rows = [{"id": ex.get("id"), "output": p.get("output"), "prediction": p.get("prediction"),
             "gold": ex.get("label", ex.get("answers", ex.get("target"))), **{k: v for k, v in p.items()
                                                                             if k not in ("id", "output", "prediction")},
             "scores": s} for ex, p, s in zip(examples, preds, per_ex)]
    info = {"family": family, "split": split, "limit": limit, "n": len(examples), "shots": len(demos),
            "shot_ids": [d.get("id") for d in demos], "shot_seed": shot_seed, "scoring": task_scoring,
            "max_new_tokens": budget if task_scoring == "generate" else None,
            "wall_s": round(time.time() - t0, 2), "predictions": f"predictions/{task_file(task)}.jsonl",
            "n_boot": n_boot, "boot_seed": seed}
    if prompt is not None:
        info["label_words"] = dict(prompt.label_words)
        info["instruction"] = seen[0].get("instruction")
    if extra:
        info["extra"] = extra
    return {"metrics": metrics, "meta": meta, "info": info, "rows": rows}


def _fmt(x: float | None) -> str:
    return "nan" if x is None else f"{x:.3f}"


def write_predictions(out_dir: Path, task: str, rows: Sequence[dict]) -> Path:
    path = Path(out_dir) / "predictions" / f"{task_file(task)}.jsonl"
    atomic_write_text(path, "".join(dumps(r, indent=None) + "\n" for r in rows))
    return path


def evaluate_model(model, tokenizer, *, tasks: Sequence[str] = (), split: str = "test", limit: int | None = None,
                   shots: int = 0, shot_seed: int = 0, batch_size: int = 8, scoring: str = "generate",
                   max_new_tokens: int | None = None, lm_eval_tasks: Sequence[str] = (),
                   lm_eval_limit: int | None = None, out_dir: str | Path | None = None, n_boot: int = 1000,
                   seed: int = 0, progress: bool = True, cka: CKAOptions | None = None,
                   cka_reference_model=None, prompts: dict[str, LabelWords] | None = None) -> dict:
    """Evaluate an in-memory model.  Returns ``{"eval", "metric_meta", "eval_info"[, "cka"]}``
    ready to merge into run.json; per-example predictions go to ``out_dir/predictions``."""
    result: dict[str, Any] = {"eval": {}, "metric_meta": {}, "eval_info": {}}
    task_names = expand_tasks(tasks)
    check_prompts(prompts, task_names)
    for task in task_names:
        r = evaluate_task(model, tokenizer, task, split=split, limit=limit, shots=shots, shot_seed=shot_seed,
                          batch_size=batch_size, max_new_tokens=max_new_tokens, scoring=scoring, n_boot=n_boot,
                          seed=seed, progress=progress, prompt=(prompts or {}).get(task))
        result["eval"][task] = r["metrics"]
        result["metric_meta"].update({f"{task}/{m}": meta for m, meta in r["meta"].items()})
        result["eval_info"][task] = r["info"]
        if out_dir is not None:
            write_predictions(Path(out_dir), task, r["rows"])
        summary = ", ".join(f"{m}={v['value']:.3f} [{_fmt(v['ci'][0])}, {_fmt(v['ci'][1])}]"
                            for m, v in r["metrics"].items() if v["value"] is not None)
        print(f"[eval] {task} (n={r['info']['n']}, {r['info']['scoring']}, {r['info']['wall_s']} s): {summary}",
              file=sys.stderr, flush=True)
    if lm_eval_tasks:
        work = Path(out_dir) / "lm_eval" if out_dir is not None else None
        lm = evaluate_lm_eval(model, tokenizer, list(lm_eval_tasks), work_dir=work, split=split,
                              limit=lm_eval_limit if lm_eval_limit is not None else limit, shots=shots,
                              shot_seed=shot_seed, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              scoring=scoring)
        for key in ("eval", "metric_meta", "eval_info"):
            result[key].update(lm[key])
    if cka is not None and cka.reference is not None:
        result["cka"] = run_cka(model, tokenizer, cka, default_tasks=expand_tasks(tasks) if tasks else (),
                                out_dir=Path(out_dir) if out_dir is not None else None,
                                reference_model=cka_reference_model)
    return result
