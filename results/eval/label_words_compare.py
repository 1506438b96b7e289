"""Rotten Tomatoes test (500 reviews), SmolLM2-135M: label words vs the dataset's own words.

Reads only the saved predictions. Per run: accuracy, prediction share of "fresh", ROC-AUC of the raw label
margin log p(fresh-word) - log p(rotten-word); paired Δ accuracy against the own-words run on the same reviews
(percentile bootstrap over reviews, 10 000 resamples, seed 0). For results/eval/smollm2-135m-label-words/README.md.

    python results/eval/label_words_compare.py
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

HERE = Path(__file__).resolve().parent
RUNS = {"own words fresh/rotten, 2 shots": "smollm2-135m-rt-own-words",
        "label words positive/negative, 2 shots": "smollm2-135m-label-words",
        "label words positive/negative, 0 shots": "smollm2-135m-label-words-0shot"}


def rows(run: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / run / "predictions" / "rotten_tomatoes.jsonl").open()]


def main() -> int:
    base = {r["id"]: float(r["prediction"] == r["gold"]) for r in rows(RUNS["own words fresh/rotten, 2 shots"])}
    rng = np.random.default_rng(0)
    print("| prompt | accuracy | Δ vs own words [95% CI] | predicted fresh | label-margin ROC-AUC |")
    print("|---|---:|---|---:|---:|")
    for name, run in RUNS.items():
        rs = rows(run)
        assert sorted(r["id"] for r in rs) == sorted(base), f"{run}: different reviews"
        acc = np.mean([r["prediction"] == r["gold"] for r in rs])
        d = np.array([float(r["prediction"] == r["gold"]) - base[r["id"]] for r in rs])  # (reviews,)
        boot = d[rng.integers(0, d.size, size=(10_000, d.size))].mean(axis=1)  # (B,)
        lo, hi = np.quantile(boot, [0.025, 0.975])
        fresh = np.mean([r["prediction"] == "fresh" for r in rs])
        auc = roc_auc_score([r["gold"] == "fresh" for r in rs],
                            [r["logliks"]["fresh"] - r["logliks"]["rotten"] for r in rs])
        delta = "—" if run == RUNS["own words fresh/rotten, 2 shots"] else f"{d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]"
        print(f"| {name} | {acc:.3f} | {delta} | {fresh:.2f} | {auc:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
