"""benchmarks.unisd_study: roles from the grid's names, Δ vs base paired by example, leave-one-out, claims."""
from __future__ import annotations

import pytest

from benchmarks.unisd_study import groups, main, study
from tests.test_scd_study import fake_run

N = 20


def test_groups_follow_the_grid_names():
    g = groups(["base", "+ema", "+agreement", "unisd_star", "unisd_star-ema", "sft", "gkd_jsd"], "base", "unisd_star")
    assert g == {"base": ["base"], "single": ["+agreement", "+ema"], "full": ["unisd_star"],
                 "leave_one_out": ["unisd_star-ema"], "baselines": ["gkd_jsd", "sft"]}


def test_study_on_a_synthetic_grid(tmp_path):
    for seed in (0, 1):
        fake_run(tmp_path, "base", seed, [i < 10 for i in range(N)])            # 0.50
        fake_run(tmp_path, "+ema", seed, [i < 12 for i in range(N)])            # 0.60: the best clean single
        fake_run(tmp_path, "+agreement", seed, [i < 16 for i in range(N)], constant=True)  # never "best"
        fake_run(tmp_path, "unisd_star", seed, [i < 18 for i in range(N)])      # 0.90
        fake_run(tmp_path, "unisd_star-ema", seed, [i < 10 for i in range(N)])  # removing EMA costs 0.40
        fake_run(tmp_path, "unisd_star-agreement", seed, [i < 17 for i in range(N)])  # costs 0.05
        fake_run(tmp_path, "sft", seed, [True] * N)
        fake_run(tmp_path, "sdft_rewrite", seed, [True] * N)  # SFT on rewrites that equal the gold answers
    res = study(tmp_path, task="t", n_boot=500)
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["base"]["vs_base"] is None and rows["base"]["role"] == "base"
    assert rows["+ema"]["vs_base"]["delta"] == pytest.approx(0.1) and rows["+ema"]["beats_base_seeds"] == 2
    assert rows["sft"]["role"] == "baselines" and rows["sft"]["vs_base"]["delta"] == pytest.approx(0.5)
    loo = {r["component"]: r for r in res["leave_one_out"]}
    assert loo["ema"]["delta"] == pytest.approx(0.4) and loo["ema"]["verdict"] == "supported"
    assert loo["agreement"]["delta"] == pytest.approx(0.05)
    # predictions that differ, per seed: i < 18 vs i < 10 disagree on 8 reviews, i < 18 vs i < 17 on 1
    assert loo["ema"]["changed"] == [8, 8] and loo["agreement"]["changed"] == [1, 1]
    assert rows["sft"]["vs_base"]["changed"] == [10, 10]
    (cmp,) = res["comparisons"]
    assert cmp["claim"].startswith("sdft_rewrite vs sft") and cmp["changed"] == [0, 0] and cmp["delta"] == 0
    by = {c["claim"]: c for c in res["claims"]}
    assert by["unisd_star > +ema (best single component)"]["delta"] == pytest.approx(0.3)
    assert by["+ema (best single component) > base"]["delta"] == pytest.approx(0.1)
    assert by["unisd_star > base"]["verdict"] == "supported"
    assert by["the component driving the gain"]["verdict"].startswith("ema ")
    md = (tmp_path / "unisd_study.md").read_text()
    assert "| single | +agreement ⚠ 2 constant |" in md and "| ema | +0.400" in md
    assert main([str(tmp_path), "--task", "t"]) == 0 and main([str(tmp_path), "--task", "nope"]) == 2


def test_no_driver_is_named_when_every_leave_one_out_ci_includes_zero(tmp_path):
    for seed in (0, 1, 2):
        fake_run(tmp_path, "base", seed, [i < 10 for i in range(N)])
        fake_run(tmp_path, "unisd_star", seed, [i < 10 for i in range(N)])
        fake_run(tmp_path, "unisd_star-ema", seed, [i < 10 for i in range(N)])
    res = study(tmp_path, task="t", n_boot=500)
    by = {c["claim"]: c for c in res["claims"]}
    assert by["the component driving the gain"]["verdict"].startswith("none identified")
    assert by["unisd_star > best single component"]["verdict"].startswith("not measurable")
    assert by["unisd_star > base"]["verdict"].startswith("not distinguishable")
    # identical predictions: the table says so, seed by seed
    md = (tmp_path / "unisd_study.md").read_text()
    assert "| ema | +0.000 [+0.000, +0.000] | +0.000 / +0.000 / +0.000 (A ahead in 0/3 seeds) | 0 / 0 / 0 of 20 |" in md
