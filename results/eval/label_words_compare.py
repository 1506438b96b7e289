"""Label words vs each task's own words, SmolLM2-135M, all test examples (Rotten Tomatoes 500, multiemo_en 500).

Reads only the saved predictions. Per run: accuracy, and Δ accuracy against the task's own-words control on the
same examples (percentile bootstrap over examples, 10 000 resamples, seed 0); for Rotten Tomatoes also the share
predicted "fresh" and the ROC-AUC of the raw label margin log p(fresh word) - log p(rotten word). For
results/eval/smollm2-135m-label-words/README.md.

    python results/eval/label_words_compare.py
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

HERE = Path(__file__).resolve().parent
# task -> (control run, {name: run})
RUNS = {
    "rotten_tomatoes": ("smollm2-135m-rt-own-words", {
        "own words fresh/rotten, 2 shots, calibrated": "smollm2-135m-rt-own-words",
        "positive/negative, 2 shots, calibrated": "smollm2-135m-label-words",
        "positive/negative, 0 shots, calibrated": "smollm2-135m-label-words-0shot"}),
    "multiemo_en": ("smollm2-135m-multiemo-own-0shot", {
        "own words, 0 shots, likelihood": "smollm2-135m-multiemo-own-0shot",
        "ambivalent as mixed, 2 shots, likelihood": "smollm2-135m-multiemo-label-words",
        "ambivalent as mixed, 0 shots, likelihood": "smollm2-135m-multiemo-label-words-0shot"}),
}


def rows(run: str, task: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / run / "predictions" / f"{task}.jsonl").open()]


def main() -> int:
    for task, (control, runs) in RUNS.items():
        base = {r["id"]: float(r["prediction"] == r["gold"]) for r in rows(control, task)}
        rng = np.random.default_rng(0)
        print(f"\n{task}\n")
        print("| prompt | accuracy | Δ vs own words [95% CI] | predicted fresh | label-margin ROC-AUC |")
        print("|---|---:|---|---:|---:|")
        for name, run in runs.items():
            rs = rows(run, task)
            assert sorted(r["id"] for r in rs) == sorted(base), f"{run}: different examples"
            acc = np.mean([r["prediction"] == r["gold"] for r in rs])
            d = np.array([float(r["prediction"] == r["gold"]) - base[r["id"]] for r in rs])  # (examples,)
            boot = d[rng.integers(0, d.size, size=(10_000, d.size))].mean(axis=1)  # (B,)
            lo, hi = np.quantile(boot, [0.025, 0.975])
            delta = "—" if run == control else f"{d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]"
            fresh = auc = "—"
            if task == "rotten_tomatoes":
                fresh = f"{np.mean([r['prediction'] == 'fresh' for r in rs]):.2f}"
                auc = f"{roc_auc_score([r['gold'] == 'fresh' for r in rs], [r['logliks']['fresh'] - r['logliks']['rotten'] for r in rs]):.3f}"
            print(f"| {name} | {acc:.3f} | {delta} | {fresh} | {auc} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
