"""Reading run.json files: validation, configuration keys, and the per-run numbers a leaderboard uses.

Per run and task (all from run.json, never from predictions or logs):

* the primary metric's value and CI (``eval``), its direction and uniform chance (``metric_meta``);
* the **floor** the metric is normalised against: the majority rate of the scored split when the
  scorer stored one (``eval_info[task].extra[metric].majority_baseline``: what a model that always
  answers the most frequent gold label scores), else ``metric_meta`` chance;
* the **constant-predictor flag** (``eval_info[task].extra[metric].constant``, with
  ``max_label_share`` and ``most_predicted``): the run put >= 95% of its predictions on one label.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.leaderboard.statistics import chance_normalise, finite
from scd.core.results import read_json, validate_run_record


class LeaderboardWarning(UserWarning):
    """A run.json was skipped (unreadable or not matching the schema)."""


def load_records(grid_dir: str | os.PathLike, *, plan_only: bool = True) -> tuple[list[dict], list[str], int]:
    """Valid run.json records of a grid directory (each with ``_path``), the skip warnings,
    and the number of runs ignored because they are not in the grid's current plan.json."""
    gdir = Path(grid_dir)
    planned = None
    if plan_only and (gdir / "plan.json").exists():
        try:
            planned = {r["run_id"] for r in read_json(gdir / "plan.json")["runs"]}
        except (OSError, ValueError, KeyError, TypeError):
            planned = None
    records, problems, stale = [], [], 0
    for p in sorted(gdir.glob("*/run.json")):
        rel = f"{gdir.name}/{p.parent.name}/run.json"
        try:
            rec = read_json(p)
            if not isinstance(rec, dict):
                raise ValueError(f"{rel}: top level should be an object")
            validate_run_record(rec, rel)
        except (OSError, ValueError) as e:
            msg = str(e) if rel in str(e) else f"{rel}: {e}"
            problems.append(msg)
            warnings.warn(f"skipping {msg}", LeaderboardWarning, stacklevel=2)
            continue
        if planned is not None and p.parent.name not in planned:
            stale += 1
            continue
        rec = dict(rec)
        rec["_path"] = str(p)
        rec["_dir"] = p.parent.name
        records.append(rec)
    return records, problems, stale


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists kept as values; an empty mapping sets nothing (like an
    absent key: ``prompts: {}`` and no ``prompts`` are the same configuration)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict):
                out.update(flatten(v, key))
            else:
                out[key] = v
    return out


_NOT_HPARAMS = {"seed", "grid", "method", "recipe"}
# top-level keys that say how a run was executed, not what was computed (benchmarks.evaluate records
# its output folder, thread count, device and progress flag in its config)
_EXECUTION_KEYS = {"out", "progress", "num_threads", "device"}


def config_of(rec: dict) -> dict[str, Any]:
    """Flattened configuration that identifies the group (``config`` if present, else
    ``hparams``), without seed/grid/method/recipe and the top-level execution keys.  A run that
    recorded zero optimiser steps (``train.steps == 0``, e.g. recovery method ``none``) drops its
    ``train.*`` settings: they did not touch its result, and a table should not show them."""
    cfg = rec.get("config") if isinstance(rec.get("config"), dict) and rec.get("config") else rec["hparams"]
    untrained = (rec.get("train") or {}).get("steps") == 0
    return {k: v for k, v in flatten(cfg).items()
            if k.split(".")[0] not in _NOT_HPARAMS and k not in _EXECUTION_KEYS
            and not (untrained and k.startswith("train."))}


def canon(v: Any) -> str:
    """Canonical JSON text of a value (for grouping and comparing configurations)."""
    return json.dumps(v, sort_keys=True, separators=(",", ":"), default=str)


# ============================================================================ metrics
@dataclasses.dataclass
class TaskMetric:
    task: str
    metric: str
    higher_is_better: bool = True
    chance: float | None = None  # metric_meta chance: uniform guessing (1/|labels| for accuracy)
    normalisable: bool = False
    floors: tuple[float, ...] = ()  # the distinct majority floors stored by the runs (empty: none)

    @property
    def key(self) -> str:
        return f"{self.task}/{self.metric}"


def metric_meta(rec: dict, task: str, metric: str) -> dict:
    """metric_meta entry: key "task/metric" (documented), falling back to the bare metric name."""
    mm = rec.get("metric_meta") or {}
    m = mm.get(f"{task}/{metric}")
    if not isinstance(m, dict):
        m = mm.get(metric)
    return m if isinstance(m, dict) else {}


def metric_extra(rec: dict, task: str, metric: str) -> dict:
    """``eval_info[task].extra[metric]``: details a scorer stored next to a metric (or {})."""
    info = (rec.get("eval_info") or {}).get(task)
    extra = (info.get("extra") if isinstance(info, dict) else None) or {}
    out = extra.get(metric) if isinstance(extra, dict) else None
    return out if isinstance(out, dict) else {}


def _tasks_metrics(records: list[dict]) -> dict[str, list[str]]:
    tasks: dict[str, list[str]] = {}
    for rec in records:
        for task, metrics in rec["eval"].items():
            lst = tasks.setdefault(task, [])
            lst.extend(m for m in metrics if m not in lst)
    return tasks


def _task_metric(records: list[dict], task: str, m: str) -> TaskMetric:
    meta = next((metric_meta(r, task, m) for r in records if metric_meta(r, task, m)), {})
    tm = TaskMetric(task, m, bool(meta.get("higher_is_better", True)),
                    float(meta["chance"]) if finite(meta.get("chance")) else None)
    floors = {float(metric_extra(r, task, m)["majority_baseline"]) for r in records
              if finite(metric_extra(r, task, m).get("majority_baseline"))}
    tm.floors = tuple(sorted(floors))
    return tm


def primary_metrics(records: list[dict]) -> tuple[list[TaskMetric], list[str]]:
    """Per task: the metric flagged ``primary`` (else the only one, else the first)."""
    notes: list[str] = []
    out = []
    for task, metrics in _tasks_metrics(records).items():
        flagged = [m for m in metrics if any(metric_meta(r, task, m).get("primary") for r in records)]
        if flagged:
            m = flagged[0]
        else:
            m = metrics[0]
            if len(metrics) > 1:
                notes.append(f"task {task}: no metric flagged primary in metric_meta; using '{m}'")
        tm = _task_metric(records, task, m)
        values = [v for v in (value_of(r, tm) for r in records) if v is not None]
        chance = tm.chance if tm.chance is not None else 0.0
        tm.normalisable = (tm.higher_is_better and chance < 1.0 and bool(values)
                           and all(0.0 <= v <= 1.0 for v in values))
        if not tm.normalisable:
            notes.append(f"{tm.key}: left out of avg (normalisation needs a higher-is-better metric in [0, 1])")
        out.append(tm)
    return out, notes


def secondary_metrics(records: list[dict], tms: list[TaskMetric]) -> list[TaskMetric]:
    """Every reported metric that is not a task's primary one (e.g. f1_macro, label_nll)."""
    primary = {tm.key for tm in tms}
    out = [_task_metric(records, task, m) for task, metrics in _tasks_metrics(records).items()
           for m in metrics if f"{task}/{m}" not in primary]
    return out


def value_of(rec: dict, tm: TaskMetric) -> float | None:
    v = ((rec["eval"].get(tm.task) or {}).get(tm.metric) or {}).get("value")
    return float(v) if finite(v) else None


def run_ci(rec: dict, tm: TaskMetric) -> tuple[float, float] | None:
    ci = ((rec["eval"].get(tm.task) or {}).get(tm.metric) or {}).get("ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(finite(c) for c in ci):
        return (float(ci[0]), float(ci[1]))
    return None


def run_floor(rec: dict, tm: TaskMetric, *, uniform: bool = False) -> float:
    """The score a run is normalised against: its split's majority rate when stored (unless
    ``uniform``), else the metric's chance (0 when unknown)."""
    maj = metric_extra(rec, tm.task, tm.metric).get("majority_baseline")
    if not uniform and finite(maj):
        return float(maj)
    return tm.chance if tm.chance is not None else 0.0


def label_share(rec: dict, task: str) -> dict | None:
    """``{"share", "label", "constant"}``: the share of the run's predictions on its most predicted label
    for ``task``, that label and the scorer's constant-predictor flag (None when not stored)."""
    info = (rec.get("eval_info") or {}).get(task)
    extra = (info.get("extra") if isinstance(info, dict) else None) or {}
    for entry in (extra.values() if isinstance(extra, dict) else ()):
        if isinstance(entry, dict) and finite(entry.get("max_label_share")):
            return {"share": float(entry["max_label_share"]), "label": entry.get("most_predicted"),
                    "constant": entry.get("constant") is True}
    return None


def run_constant(rec: dict, task: str) -> dict | None:
    """``label_share`` when the run answered (nearly) one label for ``task`` (a constant predictor)."""
    info = label_share(rec, task)
    return info if info is not None and info["constant"] else None


def run_avg(rec: dict, tms: list[TaskMetric], *, uniform: bool = False
            ) -> tuple[float | None, tuple[float, float] | None]:
    """A run's mean over normalisable tasks of the floor-normalised primary metric
    (x - floor) / (1 - floor), and the same mean of its normalised CI bounds (conservative;
    used for single-seed groups).  ``uniform``: against uniform chance instead of the majority floor."""
    norm = [tm for tm in tms if tm.normalisable]
    if not norm:
        return None, None
    vals, los, his = [], [], []
    for tm in norm:
        v = value_of(rec, tm)
        c = run_floor(rec, tm, uniform=uniform)
        if v is None or c >= 1.0:
            return None, None
        vals.append(chance_normalise(v, c))
        ci = run_ci(rec, tm)
        if ci is not None:
            los.append(chance_normalise(ci[0], c))
            his.append(chance_normalise(ci[1], c))
    ci_out = (float(np.mean(los)), float(np.mean(his))) if len(los) == len(norm) else None
    return float(np.mean(vals)), ci_out
