"""Per-example correctness from saved predictions, and paired differences with bootstrap CIs.

A predictions file (``<run>/predictions/<task>.jsonl``, written by :mod:`benchmarks.evaluate`) has one
JSON object per example with ``id``, ``prediction``, ``gold`` and, for classification and extractive
tasks, ``scores`` (``correct``).  Paired comparisons of two runs (or of one run's seeds against another
row's) use the examples both scored, so a difference is never confounded by which examples were drawn.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from benchmarks.stats import bootstrap_ci


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
