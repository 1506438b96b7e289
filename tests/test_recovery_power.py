"""Seeded recovery statistics (benchmarks.recovery_power): configuration-level correlations with bootstrap CIs,
review-and-seed-paired recovery deltas, and the sd-kl labelling of budgeted runs."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from benchmarks.recovery_power import correlation_views, corr_ci, paired_deltas
from benchmarks.recovery_study import run_row
from benchmarks.stats import resample_indices


def test_corr_ci_matches_scipy_and_a_slow_bootstrap():
    x = [0.1, 0.4, 0.35, 0.8, 0.6, 0.7, 0.2]
    y = [0.2, 0.1, 0.5, 0.9, 0.4, 0.8, 0.3]
    got = corr_ci(x, y, n_boot=300, seed=3)
    assert got["n"] == 7
    assert got["pearson_r"] == pytest.approx(stats.pearsonr(x, y).statistic)
    assert got["spearman_rho"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert got["spearman_p"] == pytest.approx(stats.spearmanr(x, y).pvalue)
    # slow reference: the same resamples, scipy on each, constant resamples dropped, percentile CI
    xs, ys = np.array(x), np.array(y)
    ref = []
    for block in resample_indices(7, 300, 3):
        for idx in block:
            a, b = xs[idx], ys[idx]
            if np.ptp(a) > 0 and np.ptp(b) > 0:
                ref.append(stats.spearmanr(a, b).statistic)
    assert got["spearman_ci"] == pytest.approx(list(np.quantile(ref, [0.025, 0.975])))
    assert got["spearman_ci"][0] <= got["spearman_rho"] <= got["spearman_ci"][1]
    assert math.isnan(corr_ci([1, 2], [3, 4])["pearson_r"])
    assert math.isnan(corr_ci([1, 1, 1], [3, 4, 5])["spearman_rho"])
    assert math.isnan(corr_ci(x, y, n_boot=0)["pearson_ci"][0])  # no CI asked


def test_recovered_view_leaves_out_none_and_budget_skipped_configurations():
    configs = [{"degradation": "q", "method": m, "cka_after": c, "score_after": c, "skipped_share": sk}
               for m, c, sk in (("none", 0.1, 0), ("sd", 0.5, 0), ("sd-kl", 0.7, 1.0), ("sd-kl", 0.9, 0.5),
                                ("sft", 0.3, 0))]
    views = {(v["view"], v["family"]): v for v in correlation_views(configs, [], n_boot=50)}
    assert views[("all", "all")]["configs"]["n"] == 5
    assert views[("recovered", "all")]["configs"]["n"] == 3  # none and the all-skipped sd-kl are not recovered
    assert views[("recovered", "q")]["configs"]["n"] == 3 and views[("all", "all")]["runs"]["n"] == 0


def _preds(path, correct):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "prediction": "a" if c else "b", "gold": "a"}) + "\n"
                            for i, c in enumerate(correct)))


def test_paired_deltas_pool_seeds_per_review(tmp_path):
    # 2 seeds x 10 reviews; the degraded model is right on reviews 0-4 (seed 0) / 0-5 (seed 1)
    runs = []
    for seed, (bef, aft) in enumerate([([1] * 5 + [0] * 5, [1] * 8 + [0] * 2), ([1] * 6 + [0] * 4, [1] * 6 + [0] * 4)]):
        none_dir, sd_dir, kl_dir = (tmp_path / f"{m}{seed}" for m in ("none", "sd", "kl"))
        _preds(none_dir / "before/predictions/t.jsonl", bef)
        _preds(sd_dir / "predictions/t.jsonl", aft)
        base = {"degradation": "q", "strength": 4, "seed": seed, "budget": 16, "eval_info": {}}
        runs += [{**base, "method": "none", "budget": 0, "run_dir": none_dir},
                 {**base, "method": "sd", "run_dir": sd_dir, "steps": 16, "constant": seed == 1,
                  "eval_info": {"t": {"predictions": "predictions/t.jsonl"}}},
                 {**base, "method": "sd-kl", "run_dir": kl_dir, "skipped": True, "steps": 0}]
    by = {d["method"]: d for d in paired_deltas(runs, "t", n_boot=200)}
    sd = by["sd"]
    assert sd["seeds"] == 2 and sd["n"] == 10
    assert sd["before"] == pytest.approx((5 + 6) / 20) and sd["after"] == pytest.approx((8 + 6) / 20)
    assert sd["delta"] == pytest.approx(3 / 20) and sd["delta_ci"][0] <= sd["delta"] <= sd["delta_ci"][1]
    assert sd["harm"] is False and sd["steps"] == [16, 16] and sd["constant"] == 1
    kl = by["sd-kl"]  # skipped by the budget: it is the degraded model itself
    assert kl["skipped"] == 2 and kl["delta"] == 0.0 and kl["after"] == pytest.approx(kl["before"])
    assert "none" not in by


def test_run_row_labels_budgeted_runs():
    rec = {"run_id": "x", "seed": 1, "degradation": {"name": "prune", "strength": 0.3},
           "recovery": {"method": "sd", "budget_steps": 16, "budget": {"skipped": True, "kl_before": 0.3}},
           "train": {"steps": 0}, "eval": {}, "eval_before": {}, "eval_original": {}}
    row = run_row(rec, "/tmp/x")
    assert row["method"] == "sd-kl" and row["skipped"] is True and row["steps"] == 0 and row["run_dir"] == "/tmp/x"
    rec["recovery"] = {"method": "sd", "budget_steps": 16}
    assert run_row(rec)["method"] == "sd" and run_row(rec)["skipped"] is False
    assert run_row(rec)["constant"] is False  # no classification task scored: nothing to flag


def test_run_row_flags_a_constant_predictor_by_the_evaluation_rule():
    from benchmarks.tasks.classification import prediction_profile

    def rec(shares):  # eval_info as the classification scorer writes it, for 1000 predictions per task
        info = {}
        for i, s in enumerate(shares):
            k = round(s * 1000)
            profile = prediction_profile(["a", "b"] * 500, ["a"] * k + ["b"] * (1000 - k), ["a", "b"])
            info[f"t{i}"] = {"extra": {"accuracy": profile}}
        info["qa"] = {"extra": {}}  # a task without labels is ignored
        return {"degradation": {"name": "q", "strength": 4}, "recovery": {"method": "sd"}, "eval_info": info}
    assert run_row(rec([0.6, 0.949]))["constant"] is False and run_row(rec([0.6, 0.949]))["label_share"] == 0.949
    assert run_row(rec([0.6, 0.95]))["constant"] is True  # >= CONSTANT_SHARE, as the leaderboard's rule
