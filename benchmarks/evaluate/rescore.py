"""Re-score finished runs from their saved predictions with the current scorers (no model needed)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Sequence

from benchmarks.evaluate.model_eval import _split_entry
from benchmarks.evaluate.model_io import task_file
from benchmarks.tasks import scorer_for
from benchmarks.tasks.suite import task_examples
from scd.core.assets import AssetError
from scd.core.results import RunDir, read_json


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
        RunDir(run_dir).write(rec)
    return added


def _rescore_examples(task: str, info: dict, rows: list[dict]) -> tuple[list[dict], str | None]:
    """The examples a run scored: its split reloaded; when the task's data is not available here, a
    likelihood-scored classification run's examples are rebuilt from its saved rows (gold label, label
    set = the scored labels), and the metrics it has must still re-score identically."""
    try:
        return task_examples(task, info.get("split", "test"), info.get("limit")), None
    except AssetError:
        if info.get("family") != "classification" or not rows or \
                not all(isinstance(r.get("logliks"), dict) and "gold" in r for r in rows):
            raise
    return [{"id": r.get("id"), "task": task, "family": "classification", "label": r["gold"],
             "label_set": list(r["logliks"])} for r in rows], "saved predictions (task data not available)"


def _merge_extra(info: dict, name: str, extra, where: str) -> list[str]:
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
