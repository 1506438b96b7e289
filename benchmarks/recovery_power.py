"""Statistics of a seeded recovery study (issue 19), used by :mod:`benchmarks.recovery_study`.

Seeds are handled by **averaging per configuration first**: a configuration is (degradation,
strength, method, budget); its score, CKA and KL are the means over its seeds.  Correlations
are computed over configurations, with percentile-bootstrap 95 % CIs over configurations
(resampling configurations with replacement).  The run-level correlation (every seed a point)
is printed beside it for comparison only: runs of one configuration share a degraded model and
are not independent.

Three views of "score after recovery vs mean CKA to the original":

* ``all``        every configuration (the ``none`` rows are the degraded models themselves);
* ``recovered``  configurations that trained (method != none, and not skipped by the KL-aware
                 budget in every seed);
* per family     each degradation alone (all its configurations, and the recovered ones).

Recovery deltas are **paired by review and seed**: for each configuration, the per-review
correctness after recovery minus the degraded model's (same seed), averaged over the seeds, then
bootstrapped over reviews.  The degraded model's predictions are the ``before/predictions`` saved
by any run of the same (degradation, strength, seed) (they share one degraded model).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import stats

from benchmarks.paired import common_ids, correctness, fmt, fmt_ci, fmt_p, paired_delta
from benchmarks.stats import bootstrap_ci

N_BOOT_CORR = 2000
N_BOOT_DELTA = 10_000


# ---------------------------------------------------------------------------- correlations
def _finite_pairs(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    xs = np.asarray([float(a) for a in x], dtype=np.float64)
    ys = np.asarray([float(b) for b in y], dtype=np.float64)
    keep = np.isfinite(xs) & np.isfinite(ys)
    return xs[keep], ys[keep]


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    return _pearson(stats.rankdata(x), stats.rankdata(y)) if x.size >= 3 else float("nan")


def corr_ci(x: Sequence[float], y: Sequence[float], n_boot: int = N_BOOT_CORR, seed: int = 0) -> dict:
    """Pearson r and Spearman rho of (x, y) with scipy p-values and percentile-bootstrap 95 % CIs over the
    points (resamples where one side is constant give no correlation and are dropped; ``n_boot=0``: no CI)."""
    xs, ys = _finite_pairs(x, y)
    out = {"n": int(xs.size), "pearson_r": _pearson(xs, ys), "spearman_rho": _spearman(xs, ys),
           "pearson_ci": [float("nan")] * 2, "spearman_ci": [float("nan")] * 2,
           "pearson_p": float("nan"), "spearman_p": float("nan")}
    if xs.size < 3 or not math.isfinite(out["pearson_r"]):
        return out
    out["pearson_p"] = float(stats.pearsonr(xs, ys).pvalue)
    out["spearman_p"] = float(stats.spearmanr(xs, ys).pvalue)
    if n_boot == 0:
        return out
    for key, fn in (("pearson_ci", _pearson), ("spearman_ci", _spearman)):
        out[key] = list(bootstrap_ci((xs, ys), metric_fn=lambda a, b, f=fn: f(a.astype(float), b.astype(float)),
                                     n_boot=n_boot, seed=seed))
    return out


def _recovered(r: dict) -> bool:
    return r["method"] != "none" and not r.get("skipped_share", 0.0) >= 1.0 and not r.get("skipped", False)


def correlation_views(configs: list[dict], runs: list[dict], x: str = "cka_after", y: str = "score_after",
                      n_boot: int = N_BOOT_CORR, families: bool = True) -> list[dict]:
    """Rows {view, family, configs: corr_ci over configurations, runs: corr_ci over runs (no CI)}: all and
    recovered configurations, then (``families``) the same per degradation family."""
    views: list[tuple[str, str, Callable[[dict], bool]]] = [("all", "all", lambda r: True),
                                                            ("recovered", "all", _recovered)]
    for fam in sorted({str(r["degradation"]) for r in configs}) if families else ():
        views += [("all", fam, lambda r, f=fam: str(r["degradation"]) == f),
                  ("recovered", fam, lambda r, f=fam: str(r["degradation"]) == f and _recovered(r))]
    out = []
    for view, fam, keep in views:
        cs, rs = [r for r in configs if keep(r)], [r for r in runs if keep(r)]
        out.append({"view": view, "family": fam,
                    "configs": corr_ci([r[x] for r in cs], [r[y] for r in cs], n_boot=n_boot),
                    "runs": corr_ci([r[x] for r in rs], [r[y] for r in rs], n_boot=0)})
    return out


# ------------------------------------------------------------------------- paired deltas
def _key(r: dict) -> tuple:
    return (r["degradation"], float(r["strength"]), r["seed"])


def before_predictions(runs: list[dict], task: str) -> dict[tuple, Path]:
    """{(degradation, strength, seed): the degraded model's predictions file} from any run that saved it."""
    out: dict[tuple, Path] = {}
    for r in runs:
        p = Path(r["run_dir"]) / "before" / "predictions" / f"{task}.jsonl"
        if _key(r) not in out and p.exists():
            out[_key(r)] = p
    return out


def after_predictions(r: dict, task: str, before: dict[tuple, Path]) -> Path | None:
    """The recovered model's predictions: the run's own eval files; a run that trained 0 steps (none,
    or skipped by the budget) is the degraded model itself."""
    if r["method"] == "none" or r.get("skipped"):
        return before.get(_key(r))
    rel = ((r.get("eval_info") or {}).get(task) or {}).get("predictions")
    p = Path(r["run_dir"]) / rel if rel else None
    return p if p is not None and p.exists() else None


def paired_deltas(runs: list[dict], task: str, n_boot: int = N_BOOT_DELTA, seed: int = 0) -> list[dict]:
    """Per configuration with method != none: before / after accuracy (mean over seeds), the degraded
    model's 95 % CI and Δ = after − before [95 % CI], paired by review and seed, bootstrapped over reviews."""
    before = before_predictions(runs, task)
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r["method"] != "none":
            groups.setdefault((r["degradation"], float(r["strength"]), r["method"], r["budget"]), []).append(r)
    out = []
    for (deg, strength, method, budget), rs in groups.items():
        pairs = []
        for r in sorted(rs, key=lambda r: r["seed"]):
            a, b = after_predictions(r, task, before), before.get(_key(r))
            if a is not None and b is not None:
                pairs.append((correctness(a), correctness(b)))
        row = {"degradation": deg, "strength": strength, "method": method, "budget": budget,
               "seeds": len(pairs), "skipped": sum(bool(r.get("skipped")) for r in rs),
               "constant": sum(bool(r.get("constant")) for r in rs),  # recovered runs that are constant predictors
               "steps": [r.get("steps") for r in sorted(rs, key=lambda r: r["seed"])]}
        if pairs:
            d = paired_delta([a for a, _ in pairs], [b for _, b in pairs], n_boot=n_boot, seed=seed)
            ids = common_ids(*(m for pair in pairs for m in pair))
            bef = np.array([[b[i] for i in ids] for _, b in pairs]).mean(axis=0)  # (reviews,) mean over seeds
            b_lo, b_hi = bootstrap_ci(bef, n_boot=n_boot, seed=seed)
            row.update(n=d["n"], before=d["b"], before_ci=[b_lo, b_hi], after=d["a"], delta=d["delta"],
                       delta_ci=d["ci"], harm=bool(d["a"] < b_lo))  # lost accuracy beyond the degraded model's CI
        out.append(row)
    return out


# ------------------------------------------------------------------------------ markdown
def correlation_markdown(views: list[dict], title: str) -> list[str]:
    lines = ["", f"## Correlation: {title}", "",
             "Configurations = mean over seeds first; 95 % CI = percentile bootstrap over configurations. "
             "The run-level columns (every seed a point, not independent) are for comparison.", "",
             "| view | family | configs | Pearson r [95% CI] | Spearman rho [95% CI] | p (Spearman) | runs | "
             "Spearman rho (runs) |", "|---|---|---:|---|---|---:|---:|---:|"]
    for v in views:
        c, r = v["configs"], v["runs"]
        lines.append(f"| {v['view']} | {v['family']} | {c['n']} | {fmt(c['pearson_r'])} {fmt_ci(c['pearson_ci'])} | "
                     f"{fmt(c['spearman_rho'])} {fmt_ci(c['spearman_ci'])} | {fmt_p(c['spearman_p'])} | {r['n']} | "
                     f"{fmt(r['spearman_rho'])} |")
    return lines


def deltas_markdown(deltas: list[dict], task: str, order: Callable[[dict], tuple]) -> list[str]:
    lines = ["", f"## Recovery Δ on {task}, paired by review and seed", "",
             "before / after = accuracy, mean over seeds; degraded CI = 95 % bootstrap CI of the degraded model "
             "(seed-averaged per review); Δ = after − before [95 % CI over reviews]; *harm* = after below the "
             "degraded model's CI; steps = optimiser steps trained per seed (0: skipped by the KL-aware budget); "
             "constant = seeds whose recovered model is a constant predictor (no gain of such a row is a win).",
             "", "| degradation | strength | method | budget | seeds | steps | before [95% CI] | after | constant | "
             "Δ after − before [95% CI] | harm |", "|---|---:|---|---:|---:|---|---|---:|---:|---|:-:|"]
    for d in sorted(deltas, key=order):
        steps = "/".join("-" if s is None else str(s) for s in d["steps"])
        lines.append(f"| {d['degradation']} | {d['strength']:g} | {d['method']} | {d['budget']} | {d['seeds']} | "
                     f"{steps} | {fmt(d.get('before'))} {fmt_ci(d.get('before_ci') or [])} | {fmt(d.get('after'))} | "
                     f"{d.get('constant', 0)}/{len(d['steps'])} | "
                     f"{fmt(d.get('delta'), sign=True)} {fmt_ci(d.get('delta_ci') or [], sign=True)} | "
                     f"{'yes' if d.get('harm') else ('no' if 'harm' in d else '-')} |")
    return lines
