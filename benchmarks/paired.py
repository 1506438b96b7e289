"""Per-example correctness from saved predictions, and paired differences with bootstrap CIs.

A predictions file (``<run>/predictions/<task>.jsonl``, written by :mod:`benchmarks.evaluate`) has one
JSON object per example with ``id``, ``prediction``, ``gold`` and, for classification and extractive
tasks, ``scores`` (``correct``).  Paired comparisons of two runs (or of one run's seeds against another
row's) use the examples both scored, so a difference is never confounded by which examples were drawn.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from benchmarks.stats import bootstrap_ci
from scd.core.results import atomic_write_json, atomic_write_text, iter_run_jsons, read_json


def correctness(path: str | Path) -> dict[str, float]:
    """{example id: 1.0 when correct else 0.0}: ``scores.correct`` when the scorer wrote it, else
    prediction == gold."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        correct = (r.get("scores") or {}).get("correct")
        out[str(r["id"])] = float(correct) if correct is not None else float(r["prediction"] == r["gold"])
    return out


def common_ids(*maps: dict[str, float]) -> list[str]:
    """Example ids present in every map, sorted."""
    return sorted(set.intersection(*(set(m) for m in maps))) if maps else []


def paired_delta(a: Sequence[dict[str, float]], b: Sequence[dict[str, float]], n_boot: int = 10_000,
                 seed: int = 0) -> dict:
    """Mean of A − B over examples, A and B each averaged over their seeds first (``a[i]``, ``b[i]`` =
    seed i's correctness maps; the seeds are paired by position), with a percentile-bootstrap 95 % CI
    over examples.  -> {n, a, b, delta, ci}."""
    if not a or not b:
        return {"n": 0, "a": float("nan"), "b": float("nan"), "delta": float("nan"), "ci": [float("nan")] * 2}
    ids = common_ids(*a, *b)
    va = np.array([[m[i] for i in ids] for m in a]).mean(axis=0)  # (examples,)
    vb = np.array([[m[i] for i in ids] for m in b]).mean(axis=0)  # (examples,)
    d = va - vb
    return {"n": len(ids), "a": float(va.mean()), "b": float(vb.mean()), "delta": float(d.mean()),
            "ci": list(bootstrap_ci(d, n_boot=n_boot, seed=seed))}


# --------------------------------------------------------------------------- grids
def load_rows(root: Path, task: str) -> dict[str, dict[int, dict]]:
    """{method: {seed: {correct: {id: 0/1}, accuracy, constant, top_share, majority, wall_s, selection_steps,
    run_id}}} of the finished runs (``top_share``: the share of the most predicted label; ``majority``: the split's
    majority rate; ``selection_steps``: a staged distillation's teacher checkpoint (its step) per stage)."""
    rows: dict[str, dict[int, dict]] = {}
    for path in iter_run_jsons(root):
        rec = read_json(path)
        info = (rec.get("eval_info") or {}).get(task) or {}
        if rec.get("status") != "ok" or not info.get("predictions"):
            continue
        pred = Path(path).parent / info["predictions"]
        if not pred.exists():
            continue
        acc = (rec.get("eval") or {}).get(task, {}).get("accuracy", {})
        extra = (info.get("extra") or {}).get("accuracy") or {}
        rows.setdefault(rec["method"], {})[int(rec.get("seed", 0))] = {
            "correct": correctness(pred), "accuracy": acc.get("value"), "constant": bool(extra.get("constant")),
            "top_share": extra.get("max_label_share"), "majority": extra.get("majority_baseline"),
            "wall_s": (rec.get("train") or {}).get("wall_s"),
            "selection_steps": (rec.get("train") or {}).get("selection_steps"),
            "run_id": rec.get("run_id")}
    return rows


def mean_sd(vals: list[float]) -> tuple[float, float]:
    """(mean, sample sd) of the non-None values; sd 0 for one value, NaN for none."""
    v = [x for x in vals if x is not None]
    if not v:
        return float("nan"), float("nan")
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def verdict(delta: dict, op: str) -> str:
    """The verdict on ``A op B`` from the CI of A − B: ``>`` is supported when the CI lies above 0, contradicted
    below 0, else not distinguishable; ``>=`` is contradicted only when the CI lies below 0."""
    lo, hi = delta["ci"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "not measurable"
    if op == ">":
        return "supported" if lo > 0 else ("contradicted" if hi < 0 else "not distinguishable (CI includes 0)")
    return "contradicted" if hi < 0 else ("supported (strictly better)" if lo > 0 else
                                          "supported (not distinguishable, CI includes 0)")


def write_study(root: Path, name: str, res: dict, markdown: str) -> None:
    """A study's analysis -> ``root/<name>.json`` and ``root/<name>.md`` (atomic)."""
    atomic_write_json(Path(root) / f"{name}.json", res)
    atomic_write_text(Path(root) / f"{name}.md", markdown)


def study_cli(name: str, grid_dir: str, run: Callable[[], dict]) -> int:
    """Run a study's ``run()`` (analyse + write) for its CLI: print each claim's verdict; 2 on a missing input."""
    try:
        res = run()
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for c in res["claims"]:
        print(f"[{name}] {c['claim']}: {c['verdict']}")
    print(f"wrote {Path(grid_dir) / f'{name}.md'}")
    return 0


# --------------------------------------------------------------------------- reporting
def fmt(v, digits: int = 3, sign: bool = False) -> str:
    """A number for a markdown table ("-" for None / NaN / inf); ``sign``: always with its sign."""
    if v is None or not math.isfinite(float(v)):
        return "-"
    return f"{float(v):+.{digits}f}" if sign else f"{float(v):.{digits}f}"


def fmt_ci(ci: Sequence[float], sign: bool = False) -> str:
    """``[lo, hi]`` ("" when the interval is missing or not finite)."""
    return f"[{fmt(ci[0], sign=sign)}, {fmt(ci[1], sign=sign)}]" if ci and all(math.isfinite(v) for v in ci) else ""


def fmt_p(p) -> str:
    """A p-value: two significant digits, scientific below 1e-4 ("-" when missing)."""
    if p is None or not math.isfinite(float(p)):
        return "-"
    return f"{float(p):.2g}" if float(p) >= 1e-4 else f"{float(p):.1e}"
