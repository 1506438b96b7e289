"""Per-run recovery deltas with review-paired CIs, for results/recovery_study_cpu/README.md.

Reads only run.json files and saved predictions. For every SD / SFT run: Δ accuracy = after − before on the
same 200 test reviews, CI = percentile bootstrap over reviews (10 000 resamples, seed 0), where "before" is
the degraded model's predictions saved by the `none` run of the same degradation (its
``before/predictions``; the recovery runs record the same before-accuracy in ``eval_before``). Also
prints after − original against the original model's predictions.

    python results/recovery_study_cpu/compare.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.leaderboard import load_records

GRID = Path(__file__).resolve().parent
TASK = "rotten_tomatoes"


def correct(path: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in path.open()]
    return {str(r["id"]): float(r["prediction"] == r["gold"]) for r in rows}


def paired(a: dict[str, float], b: dict[str, float], rng: np.random.Generator) -> tuple[float, float, float]:
    ids = sorted(a)
    assert sorted(b) == ids, "prediction files cover different reviews"
    d = np.array([a[i] - b[i] for i in ids])  # (reviews,)
    boot = d[rng.integers(0, d.size, size=(10_000, d.size))].mean(axis=1)  # (B,)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return float(d.mean()), float(lo), float(hi)


def main() -> int:
    records, _, _ = load_records(GRID)
    key = lambda r: (r["config"]["degradation"]["name"], float(r["config"]["degradation"]["strength"]))
    before = {key(r): correct(GRID / r["run_id"] / "before" / "predictions" / f"{TASK}.jsonl")
              for r in records if r["status"] == "ok" and r["method"] == "none"}
    originals = list(GRID.glob(f"*/original/predictions/{TASK}.jsonl"))
    original = correct(originals[0]) if originals else None
    rng = np.random.default_rng(0)
    print("| degradation | strength | method | steps | before | after | Δ after − before [95% CI] | Δ after − original [95% CI] |")
    print("|---|---:|---|---:|---:|---:|---|---|")
    rows = sorted((r for r in records if r["status"] == "ok" and r["method"] != "none"),
                  key=lambda r: (*key(r), r["method"], r["config"]["train"]["max_steps"]))
    for r in rows:
        after = correct(GRID / r["run_id"] / "predictions" / f"{TASK}.jsonl")
        b = before[key(r)]
        d, lo, hi = paired(after, b, rng)
        cell = "—"
        if original is not None:
            o, olo, ohi = paired(after, original, rng)
            cell = f"{o:+.3f} [{olo:+.3f}, {ohi:+.3f}]"
        name, strength = key(r)
        print(f"| {name} | {strength:g} | {r['method']} | {r['config']['train']['max_steps']} | "
              f"{np.mean(list(b.values())):.3f} | {np.mean(list(after.values())):.3f} | "
              f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}] | {cell} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
