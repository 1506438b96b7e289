"""Run from the repo root: .venv/bin/python results/eval/smollm2-135m-calibrated/rescore_likelihood.py

Re-score the calibrated run's raw label log-likelihoods as plain likelihood scoring (same prompts)."""
import json
from collections import Counter

from benchmarks.tasks.base import SCORERS
from scd.data.load import load_split

run = "results/eval/smollm2-135m-calibrated"
scorer = SCORERS.build("classification")
for task in ("multiemo_en", "rotten_tomatoes"):
    rows = [json.loads(l) for l in open(f"{run}/predictions/{task}.jsonl")]
    exs = load_split(task, "test", limit=len(rows))
    assert [e["id"] for e in exs] == [r["id"] for r in rows]
    preds = scorer.predictions_from_logliks(exs, [[r["logliks"][l] for l in e["label_set"]] for e, r in zip(exs, rows)])
    s = scorer.score(exs, preds)
    maj = Counter(e["label"] for e in exs).most_common(1)[0]
    print(task, "likelihood accuracy", s["accuracy"]["value"], s["accuracy"]["ci"], "f1_macro", s["f1_macro"]["value"],
          "| predicted", dict(Counter(p["prediction"] for p in preds)), "| calibrated predicted",
          dict(Counter(r["prediction"] for r in rows)), "| majority", maj[0], maj[1] / len(exs),
          "| p_cf", {k: round(v, 3) for k, v in rows[0]["calibration"].items()})
