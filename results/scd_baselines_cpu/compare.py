"""Pairwise comparisons for results/scd_baselines_cpu/README.md (the leaderboard compares with KD only).

Reads only run.json and predictions/rotten_tomatoes.jsonl of the grid's runs. For each pair (A, B):
  * seed-paired delta of test accuracy, CI = exact bootstrap over the 3 per-seed differences
    (benchmarks.leaderboard.delta_vs_baseline, the leaderboard's own rule);
  * example-paired delta pooled over seeds: the same 500 test reviews scored by A and B under the same seed,
    CI = percentile bootstrap over reviews (10 000 resamples, seed 0) of the mean over seeds and reviews. This
    one only covers test-sample noise, not seed-to-seed variation.

    python results/scd_baselines_cpu/compare.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.leaderboard import delta_vs_baseline, load_records

GRID = Path(__file__).resolve().parent
PAIRS = [("scd_aw", "kd"), ("scd_aw", "cd"), ("scd_aw", "scd"), ("scd", "kd"), ("scd", "cd"), ("cd", "kd"),
         ("kd", "sft"), ("scd_aw", "sft"), ("teacher", "kd")]


def correct(run_dir: Path) -> dict[str, float]:
    """Example id -> 1.0 if the prediction equals the gold label."""
    rows = [json.loads(line) for line in (run_dir / "predictions" / "rotten_tomatoes.jsonl").open()]
    return {str(r["id"]): float(r["prediction"] == r["gold"]) for r in rows}


def main() -> int:
    records, _, _ = load_records(GRID)
    by = {}  # (method, seed) -> (accuracy, {id: correct})
    for rec in records:
        if rec["status"] == "ok":
            acc = rec["eval"]["rotten_tomatoes"]["accuracy"]["value"]
            by[(rec["method"], rec["seed"])] = (acc, correct(GRID / rec["run_id"]))
    rng = np.random.default_rng(0)
    print("| A | B | Δ accuracy (A − B), paired by seed [95% CI] | Δ paired by review, pooled over seeds [95% CI] |")
    print("|---|---|---|---|")
    for a, b in PAIRS:
        seeds = sorted({s for m, s in by if m == a} & {s for m, s in by if m == b})
        d = delta_vs_baseline({s: by[(a, s)][0] for s in seeds}, {s: by[(b, s)][0] for s in seeds})
        ids = sorted(by[(a, seeds[0])][1])
        diff = np.array([[by[(a, s)][1][i] - by[(b, s)][1][i] for i in ids] for s in seeds])  # (seeds, reviews)
        idx = rng.integers(0, len(ids), size=(10_000, len(ids)))  # (B, reviews)
        boot = diff[:, idx].mean(axis=(0, 2))  # (B,)
        lo, hi = np.quantile(boot, [0.025, 0.975])
        print(f"| {a} | {b} | {d.value:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}] | {diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
