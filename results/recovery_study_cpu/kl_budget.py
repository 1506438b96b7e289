"""Provisional defaults of the KL-aware recovery budget (``recovery.budget``, docs/recovery.md), from this study.

Reads only the run.json files of results/recovery_study_cpu/.  Per degradation: KL(original || degraded) on
the probe (from the ``none`` run), Rotten Tomatoes accuracy before and after 16 SD steps, and whether SD gained.
Then the two numbers the budget's defaults come from:

* ``kl_min``: the geometric midpoint between the smallest KL where SD gained accuracy and the largest KL
  below it where SD did not (the largest threshold that skips no degradation SD helped, with a margin);
* ``kl_ref``: the smallest KL where the full learning rate gained accuracy (lr is scaled down below it).

    python results/recovery_study_cpu/kl_budget.py
"""
from __future__ import annotations

import json
import math
from pathlib import Path

GRID = Path(__file__).resolve().parent
TASK, STEPS = "rotten_tomatoes", 16


def runs() -> list[dict]:
    out = []
    for path in sorted(GRID.glob("*/run.json")):
        rec = json.loads(path.read_text())
        if rec.get("status") == "ok" and rec.get("recipe") == "recovery":
            out.append(rec)
    return out


def table(records: list[dict]) -> list[dict]:
    """One row per (degradation, strength): KL before, accuracy before / after SD (16 steps)."""
    rows = {}
    for r in records:
        key = (r["degradation"]["name"], float(r["degradation"]["strength"]))
        row = rows.setdefault(key, {"degradation": key[0], "strength": key[1]})
        if r["recovery"]["method"] == "none":
            row["kl_before"] = r["kl_to_original"]["before"]
            row["acc_before"] = r["eval"][TASK]["accuracy"]["value"]
        elif r["recovery"]["method"] == "sd" and r["recovery"]["budget_steps"] == STEPS:
            row["acc_sd"] = r["eval"][TASK]["accuracy"]["value"]
            row["kl_sd"] = r["kl_to_original"]["after"]
    return sorted((r for r in rows.values() if {"kl_before", "acc_sd"} <= set(r)), key=lambda r: r["kl_before"])


def main() -> int:
    rows = table(runs())
    print(f"| degradation | strength | KL before | acc before | acc after SD ({STEPS}) | delta | KL after SD |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        r["gain"] = r["acc_sd"] - r["acc_before"]
        print(f"| {r['degradation']} | {r['strength']:g} | {r['kl_before']:.4f} | {r['acc_before']:.3f} | "
              f"{r['acc_sd']:.3f} | {r['gain']:+.3f} | {r['kl_sd']:.4f} |")
    gained = [r["kl_before"] for r in rows if r["gain"] > 0]
    lost = [r["kl_before"] for r in rows if r["gain"] <= 0]
    lo = min(gained)
    below = [k for k in lost if k < lo]
    print(f"\nSD gained at KL {sorted(round(k, 4) for k in gained)}; did not at KL {sorted(round(k, 4) for k in lost)}")
    if below:
        print(f"kl_min = sqrt({max(below):.4f} * {lo:.4f}) = {math.sqrt(max(below) * lo):.4f}")
    print(f"kl_ref = {lo:.4f}")
    overlap = [k for k in lost if k > lo]
    if overlap:
        print(f"no threshold separates them: SD also lost accuracy at KL {sorted(round(k, 4) for k in overlap)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
