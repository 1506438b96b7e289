"""Evaluate a saved run or a model on the suite's tasks; results go into run.json.

    python -m benchmarks.evaluate RUN_DIR_OR_MODEL --tasks multiemo_en rotten_tomatoes \\
        [--split test] [--limit N] [--shots K] [--batch-size B] [--max-new-tokens T] \\
        [--scoring generate|likelihood|calibrated] [--config configs/eval/x.yaml] [--out DIR] \\
        [--lm-eval TASK ...] [--cka-reference MODEL_OR_RUN] [key=value ...]
    python -m benchmarks.evaluate --rescore RUN_OR_GRID_DIR ...   # saved predictions, current scorers

* RUN_DIR: a directory with ``run.json``; the model is ``run.json["artifacts"]["model"]``
  or ``RUN_DIR/model``.  Results are merged into that run.json.
* MODEL: anything :mod:`scd.models` understands (``smollm2-135m``, an HF folder,
  ``tiny``).  A run directory is created (default ``results/eval/<model>-<hash>/``,
  or ``--out``) with a fresh run.json (recipe ``evaluate``, method = model name).

Written (atomically; existing entries for other tasks are kept)::

    run.json  eval        {task: {metric: {"value": float, "n": int, "ci": [lo, hi]}}}
              metric_meta {"<task>/<metric>": {"higher_is_better", "chance", "primary"}}
              eval_info   {task: {split, limit, n, shots, shot_ids, scoring, max_new_tokens,
                                  wall_s, predictions, n_boot, boot_seed, extra[, rescored]}}
              cka         {"<reference>": model_cka(...) result}   (with --cka-reference)
    predictions/<task>.jsonl   one line per example: id, output, prediction, gold, scores

Tasks may be task names, family names (``qa``, ``ner``, ``classification``) or
``all``.  Few-shot demonstrations are drawn deterministically from the task's
train split (see :func:`select_shots`).  ``--lm-eval`` names go through
:mod:`benchmarks.lmeval_bridge` (suite task names are exported as local lm-eval
tasks; any other name is an lm-eval task, which needs its dataset hub).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Literal, Sequence

from benchmarks.tasks.classification import LabelWords, unverbalize, verbalize
from scd.core.assets import AssetError
from scd.core.config import (ConfigError, added_field, apply_overrides, from_dict, load_yaml, register_recipe,
                             to_dict)
from scd.core.registry import did_you_mean

FAMILIES = ("qa", "ner", "classification")
DEFAULT_ROOT = Path("results") / "eval"


# --------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class CKAOptions:
    """Layer-wise CKA between the evaluated model and ``reference`` (off when None)."""

    reference: str | None = None  # model name/path or run dir (e.g. the teacher / pre-degradation model)
    tasks: tuple[str, ...] = ()  # probe prompts come from these tasks (default: the eval tasks)
    split: str = "test"
    n_examples: int = 64  # probe prompts in total
    max_length: int = 128  # tokens per probe prompt (right-truncated)
    batch_size: int = 8
    layers: tuple[int, ...] | None = None  # hidden-state indices of the evaluated model (None: all)
    reference_layers: tuple[int, ...] | None = None
    estimator: str = "linear"  # see benchmarks.cka.ESTIMATORS
    unit: str = "tokens"  # see benchmarks.cka.UNITS
    minibatch_size: int | None = 1024
    heatmap: bool = True

    def __post_init__(self) -> None:
        if self.n_examples < 4:
            raise ValueError("cka.n_examples must be >= 4")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    recipe: str = "evaluate"
    model: str | None = None  # run dir or model name/path (the CLI positional argument wins)
    tasks: tuple[str, ...] = ()
    split: Literal["train", "dev", "test"] = "test"
    limit: int | None = None  # first N examples of the split (None: all)
    shots: int = 0
    shot_seed: int = 0
    batch_size: int = 8
    max_new_tokens: int | None = None  # None: each task's own budget (TaskSpec.max_new_tokens)
    scoring: Literal["generate", "likelihood", "calibrated"] = "generate"  # classification tasks only
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_limit: int | None = None  # None: same as limit
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str | None = None  # None: cuda if available, else cpu
    num_threads: int | None = None
    n_boot: int = 1000
    seed: int = 0  # bootstrap seed
    out: str | None = None  # run dir for a bare model (default results/eval/<model>-<hash>)
    progress: bool = True
    cka: CKAOptions = CKAOptions()
    # per-task prompt variants of classification tasks: label words (verbalizer) and instruction,
    # e.g. {rotten_tomatoes: {label_words: {fresh: positive, rotten: negative}}}; suite scorer only
    prompts: dict[str, LabelWords] = added_field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.recipe != "evaluate":
            raise ValueError(f"recipe must be 'evaluate', got {self.recipe!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1 (or null for all examples)")
        if self.shots < 0:
            raise ValueError("shots must be >= 0")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.n_boot < 1:
            raise ValueError("n_boot must be >= 1")
        check_prompts(self.prompts, self.tasks)


# ----------------------------------------------------------------------------- data
def expand_tasks(names: Sequence[str]) -> list[str]:
    """Task names, family names (qa/ner/classification), ``all`` or dataset specs
    (``json:<path with {split}>`` etc., see ``scd.data.load``) -> task names."""
    from scd.data.load import is_spec
    from scd.data.tasks import TASKS

    out: list[str] = []
    for name in names:
        if is_spec(name):
            new = [name]
        elif name == "all":
            new = TASKS.names()
        elif name in FAMILIES and name not in TASKS:
            new = [t for t in TASKS.names() if TASKS.get(t).family == name]
        else:
            TASKS.get(name)  # unknown -> did-you-mean error
            new = [name]
        out.extend(t for t in new if t not in out)
    return out


def load_examples(task: str, split: str, limit: int | None = None) -> list[dict]:
    from scd.data.load import load_split

    rows = load_split(task, split, limit=limit)
    if not rows:
        raise ValueError(f"task '{task}' split '{split}' has no examples")
    return rows


def check_prompts(prompts: dict | None, tasks: Sequence[str]) -> None:
    """Every ``prompts`` key must be one of the evaluated ``tasks`` (expanded: family names count), and
    a classification task where the registry knows its family (dataset specs are checked when their
    data loads, in :func:`evaluate_task`)."""
    from scd.data.tasks import TASKS

    if not prompts:
        return
    tasks = expand_tasks(tasks)
    for name in prompts:
        if name not in tasks:
            raise ConfigError(f"key 'prompts.{name}': not among the evaluated tasks {list(tasks)}"
                              f"{did_you_mean(name, tasks)}")
        if name in TASKS and TASKS.get(name).family != "classification":
            raise ConfigError(f"key 'prompts.{name}': label words apply to classification tasks, '{name}' is "
                              f"{TASKS.get(name).family}")


def _task_seed(task: str, seed: int) -> list[int]:
    return [seed, zlib.crc32(task.encode())]


def select_shots(task: str, k: int, seed: int = 0, exclude_ids: Sequence[str] = (),
                 pool: Sequence[dict] | None = None) -> list[dict]:
    """``k`` demonstrations from the task's train split, deterministic in (task, seed).

    Candidates are the train examples whose input is at most the median input length
    (keeps prompts short), in the seeded order of ``scd.data.prompts.select_shots``.
    Classification shots cycle through the label set in its order (so every label is
    shown when k >= |labels|) and are then put in a seeded random order; other
    families take the first k.
    """
    import numpy as np
    from scd.data.prompts import select_shots as seeded_order

    if k <= 0:
        return []
    rows = list(pool) if pool is not None else load_examples(task, "train")
    excl = set(exclude_ids)
    rows = [r for r in rows if r.get("id") not in excl]
    if len(rows) < k:
        raise ValueError(f"task '{task}': {k} shots requested but the train split has {len(rows)} examples")
    lengths = sorted(len(r["input"]) for r in rows)
    median = lengths[(len(lengths) - 1) // 2]
    short = [r for r in rows if len(r["input"]) <= median]
    ordered = seeded_order(short if len(short) >= k else rows, len(rows), seed=seed)
    if ordered[0].get("family") != "classification":
        return ordered[:k]
    by_label: dict[str, list[dict]] = {}
    for r in ordered:
        by_label.setdefault(r["label"], []).append(r)
    labels = [lab for lab in ordered[0]["label_set"] if by_label.get(lab)]
    chosen: list[dict] = []
    depth = 0
    while len(chosen) < k:
        added = False
        for lab in labels:
            if depth < len(by_label[lab]) and len(chosen) < k:
                chosen.append(by_label[lab][depth])
                added = True
        if not added:
            break
        depth += 1
    rng = np.random.default_rng(_task_seed(task, seed))
    return [chosen[i] for i in rng.permutation(len(chosen))]


# ---------------------------------------------------------------------------- models
def resolve_device(device: str | None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_model_path(run_dir: Path) -> Path:
    """The saved model folder of a run directory."""
    from scd.core.results import read_json

    rec = read_json(run_dir / "run.json")
    recorded = (rec.get("artifacts") or {}).get("model")
    candidates = []
    if recorded:
        p = Path(recorded).expanduser()
        candidates += [p] if p.is_absolute() else [run_dir / p, Path.cwd() / p, run_dir / p.name]
    candidates.append(run_dir / "model")
    for c in candidates:
        if (c / "config.json").exists():
            return c
    raise FileNotFoundError(f"{run_dir}/run.json: no saved model (artifacts.model = {recorded!r}, no "
                            f"{run_dir / 'model'} folder); train with save_model: true or pass a model path")


def load_model(name_or_path: str, dtype: str = "float32", device: str = "cpu"):
    from scd.models import ModelConfig, build_model

    model, tok = build_model(ModelConfig(name=str(name_or_path), dtype=dtype))
    model.to(device)
    model.eval()
    return model, tok


def task_file(task: str) -> str:
    """A file-name-safe form of a task name (dataset specs contain '/' and ':')."""
    return task if re.fullmatch(r"[A-Za-z0-9._-]+", task) else slug(task.replace(":", "-"))


def slug(name: str) -> str:
    base = Path(name.rstrip("/")).name if ("/" in name or Path(name).exists()) else name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-") or "model"


# -------------------------------------------------------------------------- evaluate
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
    predictions are mapped back to the task's labels before scoring (see benchmarks.tasks.classification)."""
    from benchmarks.tasks.base import scorer_for, task_max_new_tokens

    t0 = time.time()
    examples = list(examples) if examples is not None else load_examples(task, split, limit)
    family = examples[0]["family"]
    scorer = scorer_for(family, n_boot=n_boot, seed=seed)
    task_scoring = scoring if scoring in scorer.scorings else "generate"
    demos = select_shots(task, shots, shot_seed, exclude_ids=[e["id"] for e in examples]) if shots else []
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
    from scd.core.results import atomic_write_text, dumps

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
        from benchmarks.lmeval_bridge import evaluate_lm_eval

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


# ------------------------------------------------------------------------------- CKA
def cka_batches(tokenizer, texts: Sequence[str], batch_size: int, max_length: int, device: str):
    """Right-padded, right-truncated probe batches {input_ids, attention_mask}."""
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        yield {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def run_cka(model, tokenizer, opts: CKAOptions, *, default_tasks: Sequence[str] = (), out_dir: Path | None = None,
            reference_model=None) -> dict:
    """CKA(evaluated model layers x reference model layers) on probe texts: the ``input``
    field (no instruction, no chat template, so probes do not share a long common
    prefix) of the first examples of each probe task."""
    try:
        from benchmarks.cka import model_cka, plot_cka_heatmap
    except ImportError as e:  # pragma: no cover - benchmarks.cka is part of the suite
        raise RuntimeError(f"CKA requested but benchmarks.cka is unavailable ({e})") from None
    tasks = list(opts.tasks) or list(default_tasks)
    if not tasks:
        raise ValueError("cka: no probe tasks (set cka.tasks or evaluate at least one task)")
    per_task = max(1, -(-opts.n_examples // len(tasks)))
    texts = []
    for task in expand_tasks(tasks):
        texts += [ex["input"] for ex in load_examples(task, opts.split, per_task)]
    texts = texts[:opts.n_examples]
    device = str(next(model.parameters()).device)
    ref_name = opts.reference
    if reference_model is None:
        ref_path = run_model_path(Path(ref_name)) if (Path(ref_name) / "run.json").exists() else ref_name
        reference_model, ref_tok = load_model(str(ref_path), dtype=str(next(model.parameters()).dtype)
                                              .replace("torch.", ""), device=device)
        from scd.models import check_same_tokenizer

        check_same_tokenizer(ref_tok, tokenizer, "reference", "model")
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        res = model_cka(model, reference_model, cka_batches(tokenizer, texts, opts.batch_size, opts.max_length,
                                                            device),
                        layers_a=list(opts.layers) if opts.layers is not None else None,
                        layers_b=list(opts.reference_layers) if opts.reference_layers is not None else None,
                        estimator=opts.estimator, unit=opts.unit, minibatch_size=opts.minibatch_size)
    finally:
        tokenizer.padding_side = old_side
    res["reference"] = ref_name
    res["probe"] = {"tasks": tasks, "split": opts.split, "n_texts": len(texts), "max_length": opts.max_length}
    if opts.heatmap and out_dir is not None:
        png = out_dir / f"cka_{slug(ref_name)}.png"
        plot_cka_heatmap(res["matrix"], png, title=f"CKA: model (rows) vs {slug(ref_name)} (cols)")
        res["heatmap"] = png.name
    return {slug(ref_name): res}


# ---------------------------------------------------------------------------- run.json
def merge_into_run(run_json: Path, result: dict) -> dict:
    """Merge eval/metric_meta/eval_info/cka into an existing run.json, atomically."""
    from scd.core.results import atomic_write_json, read_json, validate_run_record

    rec = read_json(run_json)
    for key in ("eval", "metric_meta", "eval_info", "cka"):
        if key in result:
            cur = rec.get(key) or {}
            cur.update(result[key])
            rec[key] = cur
    validate_run_record(rec, str(run_json))
    atomic_write_json(run_json, rec)
    return rec


def _fresh_record(cfg: EvalConfig, target: str, model_path: str) -> dict:
    from scd.core.results import config_hash, new_run_record

    rec = new_run_record(run_id=config_hash({"model": target}), grid=None, method=slug(target), seed=cfg.seed,
                         recipe="evaluate", config={**to_dict(cfg), "model": target})
    rec["artifacts"] = {"model": model_path}
    return rec


def evaluate(cfg: EvalConfig, target: str | None = None, run_dir: str | Path | None = None) -> Path:
    """Evaluate ``target`` (run dir or model; default ``cfg.model``).  Returns the run dir written."""
    import torch
    from scd.core.results import atomic_write_json, config_hash

    target = target or cfg.model
    if not target:
        raise ConfigError("nothing to evaluate: pass RUN_DIR_OR_MODEL (or set `model:` in the config)")
    if not cfg.tasks and not cfg.lm_eval_tasks and cfg.cka.reference is None:
        raise ConfigError("no tasks: pass --tasks (or set `tasks:` / `lm_eval_tasks:` in the config)")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    tpath = Path(target).expanduser()
    if (tpath / "run.json").exists():
        if cfg.out or run_dir:
            out = Path(run_dir or cfg.out)
            if out.resolve() != tpath.resolve():
                raise ConfigError(f"{target} is a run directory: its results go into {tpath}/run.json; "
                                  "drop --out")
        out = tpath
        model_path = str(run_model_path(tpath))
        fresh = None
    else:
        from scd.models import resolve

        model_path = resolve(target)
        out = Path(run_dir or cfg.out or DEFAULT_ROOT / f"{slug(target)}-{config_hash({'model': target}, 8)}")
        fresh = None if (out / "run.json").exists() else _fresh_record(cfg, target, model_path)
    model, tok = load_model(model_path, cfg.dtype, device)
    out.mkdir(parents=True, exist_ok=True)
    if fresh is not None:
        fresh["status"] = "running"
        atomic_write_json(out / "run.json", fresh)
    t0 = time.time()
    try:
        result = evaluate_model(model, tok, tasks=cfg.tasks, split=cfg.split, limit=cfg.limit, shots=cfg.shots,
                                shot_seed=cfg.shot_seed, batch_size=cfg.batch_size, scoring=cfg.scoring,
                                max_new_tokens=cfg.max_new_tokens, lm_eval_tasks=cfg.lm_eval_tasks,
                                lm_eval_limit=cfg.lm_eval_limit, out_dir=out, n_boot=cfg.n_boot, seed=cfg.seed,
                                progress=cfg.progress, cka=cfg.cka, prompts=cfg.prompts)
    except BaseException as e:
        if fresh is not None:  # our own run.json: record the failure (a trained run's status is left alone)
            from scd.core.results import read_json

            rec = read_json(out / "run.json")
            rec.update(status="failed", error=f"{type(e).__name__}: {e}",
                       finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            atomic_write_json(out / "run.json", rec)
        raise
    for info in result["eval_info"].values():
        info.setdefault("device", device)
        info.setdefault("threads", torch.get_num_threads() if device == "cpu" else None)
    rec = merge_into_run(out / "run.json", result)
    if fresh is not None:
        rec["status"] = "ok"
        rec["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        rec.setdefault("train", {})
        rec["eval_wall_s"] = round(time.time() - t0, 2)
        atomic_write_json(out / "run.json", rec)
    return out


def run(cfg: EvalConfig, run_dir: Path) -> dict:
    """Recipe entry (``python -m scd run configs/eval/x.yaml``): evaluate ``cfg.model``
    into ``run_dir``, or the run at ``run_dir`` itself when ``cfg.model`` is unset."""
    from scd.core.results import read_json

    run_dir = Path(run_dir)
    if cfg.model is None:
        out = evaluate(cfg, str(run_dir))
    else:
        out = evaluate(cfg, cfg.model, run_dir=run_dir)
    return read_json(out / "run.json")


register_recipe("evaluate", EvalConfig, run)


# ------------------------------------------------------------------------------- CLI
def build_config(args: argparse.Namespace) -> EvalConfig:
    from scd.core.config import Source

    data: dict = {}
    source = Source()
    if args.config:
        data, source = load_yaml(args.config)
        data.setdefault("recipe", "evaluate")
        if data["recipe"] != "evaluate":
            raise ConfigError(f"{args.config}: recipe is '{data['recipe']}', expected 'evaluate'")
    cli = {"tasks": args.tasks, "split": args.split, "limit": args.limit, "shots": args.shots,
           "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "scoring": args.scoring,
           "lm_eval_tasks": args.lm_eval, "out": args.out, "device": args.device, "dtype": args.dtype,
           "num_threads": args.threads, "n_boot": args.n_boot, "model": args.target}
    for k, v in cli.items():
        if v is not None:
            data[k] = list(v) if isinstance(v, (list, tuple)) else v
    if args.no_progress:
        data["progress"] = False
    if args.cka_reference:
        data.setdefault("cka", {})["reference"] = args.cka_reference
    data = apply_overrides(data, args.overrides)
    return from_dict(EvalConfig, data, source)


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", nargs="?", help="run directory (with run.json) or model name/path")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. cka.n_examples=32")
    ap.add_argument("--tasks", nargs="+", help="task names, family names (qa, ner, classification) or all")
    ap.add_argument("--split", choices=("train", "dev", "test"))
    ap.add_argument("--limit", type=int, help="first N examples per task")
    ap.add_argument("--shots", type=int, help="few-shot demonstrations from the train split")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--max-new-tokens", type=int, help="override every task's generation budget")
    ap.add_argument("--scoring", choices=("generate", "likelihood", "calibrated"), help="classification scoring")
    ap.add_argument("--config", help="configs/eval/*.yaml (recipe: evaluate); CLI flags override it")
    ap.add_argument("--out", help="run directory to write (bare model only)")
    ap.add_argument("--lm-eval", nargs="+", help="suite task names (exported) or lm-eval task names")
    ap.add_argument("--cka-reference", help="model or run dir to compare layer-wise with CKA")
    ap.add_argument("--device")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--n-boot", type=int, help="bootstrap resamples for the CIs (default 1000)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


# ----------------------------------------------------------------------------- rescore
def rescore_run(run_dir: str | Path, n_boot: int = 1000, seed: int = 0) -> list[str]:
    # n_boot / seed: the bootstrap settings of runs that predate eval_info's n_boot / boot_seed
    """Re-score a finished run's saved predictions with the current scorers (no model needed).

    For every task of ``run.json["eval_info"]`` whose ``predictions/<task>.jsonl`` exists, the
    examples are reloaded (same split and limit; ids must match) and scored again.  Metrics the
    run already has must come out identical (else ``ValueError``: the data or the scorer changed);
    metrics it lacks (added to a scorer later, e.g. ``label_nll``) are added to ``eval`` and
    ``metric_meta``, details it lacks to ``eval_info[task]["extra"]`` (e.g. accuracy's
    ``max_label_share``; details it has must reproduce too), and ``eval_info[task]["rescored"]``
    records when and what.  Returns the added ``task/metric`` keys; run.json is rewritten
    atomically only when something was added.
    """
    from benchmarks.tasks.base import scorer_for
    from scd.core.results import atomic_write_json, read_json

    run_dir = Path(run_dir)
    rec = read_json(run_dir / "run.json")
    added: list[str] = []
    for task, info in (rec.get("eval_info") or {}).items():
        if not isinstance(info, dict) or "family" not in info:
            continue
        pred_path = run_dir / (info.get("predictions") or f"predictions/{task_file(task)}.jsonl")
        if not pred_path.exists():
            continue
        rows = [json.loads(line) for line in pred_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        examples, source = _rescore_examples(task, info, rows)
        if [e.get("id") for e in examples] != [r.get("id") for r in rows]:
            raise ValueError(f"{pred_path}: example ids differ from {task} {info.get('split')} "
                             f"(limit {info.get('limit')}): the data changed since the run")
        scorer = scorer_for(info["family"], n_boot=int(info.get("n_boot", n_boot)), seed=int(info.get("boot_seed", seed)))
        scores = scorer.score(examples, rows)
        have = rec["eval"].setdefault(task, {})
        new = []
        for name, entry in scores.items():
            value, meta, extra = _split_entry(entry)
            new += _merge_extra(info, name, extra, f"{run_dir / 'run.json'}: {task}/{name}")
            if name in have:
                if have[name] != value:
                    raise ValueError(f"{run_dir / 'run.json'}: {task}/{name} re-scores to {value}, "
                                     f"run.json has {have[name]} (scorer or data changed)")
                continue
            have[name] = value
            rec.setdefault("metric_meta", {})[f"{task}/{name}"] = meta
            new.append(name)
        if new:
            before = (info.get("rescored") or {}).get("added") or []
            info["rescored"] = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "added": [*before, *new]}
            if source:
                info["rescored"]["examples"] = source
            added += [f"{task}/{m}" for m in new]
    if added:
        atomic_write_json(run_dir / "run.json", rec)
    return added


def _rescore_examples(task: str, info: dict, rows: list[dict]) -> tuple[list[dict], str | None]:
    """The examples a run scored: its split reloaded; when the task's data is not available here, a
    likelihood-scored classification run's examples are rebuilt from its saved rows (gold label, label
    set = the scored labels), and the metrics it has must still re-score identically."""
    try:
        return load_examples(task, info.get("split", "test"), info.get("limit")), None
    except AssetError:
        if info.get("family") != "classification" or not rows or \
                not all(isinstance(r.get("logliks"), dict) and "gold" in r for r in rows):
            raise
    return [{"id": r.get("id"), "task": task, "family": "classification", "label": r["gold"],
             "label_set": list(r["logliks"])} for r in rows], "saved predictions (task data not available)"


def _merge_extra(info: dict, name: str, extra: Any, where: str) -> list[str]:
    """Add the keys of a re-scored metric's ``extra`` that ``info["extra"][name]`` lacks (e.g. accuracy's
    ``max_label_share``); keys it has must re-score to the same value.  Returns the added ``name.key``s."""
    if not isinstance(extra, dict) or not extra:
        return []
    have = info.setdefault("extra", {}).setdefault(name, {})
    added = []
    for key, v in json.loads(json.dumps(extra)).items():
        if key not in have:
            have[key] = v
            added.append(f"{name}.{key}")
        elif have[key] != v:
            raise ValueError(f"{where}: extra '{key}' re-scores to {v!r}, run.json has {have[key]!r} "
                             "(scorer or data changed)")
    return added


def rescore_main(paths: Sequence[str]) -> int:
    """``--rescore DIR...``: every run.json under each DIR (a run or a grid directory)."""
    runs = sorted({p.parent for d in paths for p in
                   ([Path(d) / "run.json"] if (Path(d) / "run.json").exists() else Path(d).rglob("run.json"))})
    if not runs:
        print(f"error: no run.json under {', '.join(paths)}", file=sys.stderr)
        return 2
    bad = 0
    for rd in runs:
        try:
            added = rescore_run(rd)
        except (ValueError, OSError, KeyError, AssetError) as e:
            print(f"error: {rd}: {e}", file=sys.stderr)
            bad += 1
            continue
        print(f"[rescore] {rd}: {'added ' + ', '.join(added) if added else 'up to date'}", flush=True)
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--rescore":
        return rescore_main(argv[1:])
    args = make_parser().parse_args(argv)
    # a positional that looks like key=value is an override, not the target
    if args.target and "=" in args.target and not Path(args.target).exists():
        args.overrides = [args.target, *args.overrides]
        args.target = None
    try:
        cfg = build_config(args)
        out = evaluate(cfg)
    except (ConfigError, ValueError, FileNotFoundError, KeyError, OSError, AssetError) as e:
        if os.environ.get("SCD_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[eval] results -> {out / 'run.json'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
