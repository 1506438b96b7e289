"""Leaderboard on synthetic run.json files: every number checked against a hand
computation (plain Python, exact bootstrap by enumeration), bad files skipped, figures."""
from __future__ import annotations

import csv
import io
import itertools
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

from benchmarks import leaderboard as LB
from scd.core.results import atomic_write_json

TASK_META = {"qa/f1": {"higher_is_better": True, "chance": 0.0, "primary": True},
             "qa/em": {"higher_is_better": True, "chance": 0.0, "primary": False},
             "cls/acc": {"higher_is_better": True, "chance": 0.5, "primary": True},
             "lm/perplexity": {"higher_is_better": False, "chance": 0.0, "primary": True}}


def rec(method: str, seed: int, qa=None, cls=None, ppl=None, *, status="ok", components=None, cka=None,
        lr=1e-3, ci=None, error=None) -> dict:
    """A run.json as the recipes write it (scd.core.results.new_run_record keys)."""
    ci = ci or {}
    ev = {}
    if qa is not None:
        ev["qa"] = {"f1": {"value": qa, "n": 100, "ci": ci.get("qa", [qa - 0.05, qa + 0.05])},
                    "em": {"value": qa / 2, "n": 100, "ci": [0, 1]}}
    if cls is not None:
        ev["cls"] = {"acc": {"value": cls, "n": 100, "ci": ci.get("cls", [cls - 0.05, cls + 0.05])}}
    if ppl is not None:
        ev["lm"] = {"perplexity": {"value": ppl, "n": 100, "ci": [ppl - 1, ppl + 1]}}
    config = {"recipe": "fake", "method": method, "seed": seed, "grid": "syn", "train": {"lr": lr},
              "components": components or {}}
    return {"schema_version": 1, "run_id": f"{method}-{seed}-{lr}", "grid": "syn", "recipe": "fake",
            "method": method, "seed": seed, "git_sha": None, "status": status, "error": error,
            "started": None, "finished": None, "env": {}, "components": components or {},
            "hparams": {"lr": lr}, "config": config, "train": {"tokens": 10, "wall_s": 1.0, "peak_mem": None},
            "eval": ev, "cka": cka or {}, "metric_meta": TASK_META if ev else {}, "artifacts": {}}


def write_runs(gdir: Path, recs: list[dict], plan: dict | None = None) -> None:
    for r in recs:
        atomic_write_json(gdir / r["run_id"] / "run.json", r)
    if plan is not None:
        atomic_write_json(gdir / "plan.json", plan)


# ------------------------------------------------------------- independent reference maths
def ref_quantile(sorted_vals: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default), by hand."""
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (pos - lo) * (sorted_vals[hi] - sorted_vals[lo])


def ref_boot_ci(values: list[float]) -> tuple[float, float]:
    """Exact bootstrap: the mean of every ordered resample, each equally likely."""
    n = len(values)
    means = sorted(sum(values[i] for i in idx) / n for idx in itertools.product(range(n), repeat=n))
    return ref_quantile(means, 0.025), ref_quantile(means, 0.975)


def ref_avg(qa: float, cls: float) -> float:
    return ((qa - 0.0) / (1 - 0.0) + (cls - 0.5) / (1 - 0.5)) / 2  # chance-normalised, perplexity left out


KD = {"qa": [0.50, 0.60, 0.70], "cls": [0.60, 0.70, 0.80], "ppl": [10.0, 12.0, 11.0]}
SCD = {"qa": [0.55, 0.70, 0.72], "cls": [0.75, 0.70, 0.90], "ppl": [9.0, 9.0, 10.0]}


@pytest.fixture()
def grid(tmp_path):
    gdir = tmp_path / "results" / "syn"
    recs = [rec("kd", s, KD["qa"][s], KD["cls"][s], KD["ppl"][s]) for s in range(3)]
    recs += [rec("scd", s, SCD["qa"][s], SCD["cls"][s], SCD["ppl"][s], components={"aw": False, "sched": True},
                 cka={"mean_matched": 0.6 + 0.1 * s, "matrix": [[0.9, 0.2], [0.3, 0.8 + 0.05 * s]],
                      "layers_a": [0, 1], "layers_b": [0, 2]})
             for s in range(3)]
    recs.append(rec("scd+aw", 0, 0.80, 0.90, 8.0, components={"aw": True, "sched": True},
                    ci={"qa": [0.74, 0.86], "cls": [0.85, 0.95]}, cka={"mean_matched": 0.9}))
    recs.append(rec("scd", 3, 0.99, 0.99, 1.0, status="failed", components={"aw": False, "sched": True},
                    error="RuntimeError: CUDA out of memory\ntraceback..."))
    recs.append(rec("kd", 4, status="running"))
    write_runs(gdir, recs, plan={"grid": "syn", "baseline": "kd", "description": "synthetic test grid",
                                 "runs": [{"run_id": r["run_id"]} for r in recs]})
    return gdir


def read_csv(path: Path) -> dict[str, dict]:
    return {row["label"]: row for row in csv.DictReader(io.StringIO(path.read_text()))}


def test_pure_statistics_match_hand_computation():
    vals = [0.35, 0.5, 0.65]
    assert LB.bootstrap_mean_ci(vals) == pytest.approx(ref_boot_ci(vals), abs=1e-12)
    assert LB.bootstrap_mean_ci([0.5, 0.7]) == pytest.approx(ref_boot_ci([0.5, 0.7]), abs=1e-12)
    assert LB.bootstrap_mean_ci([0.4]) == (0.4, 0.4)
    big = [0.1 * i for i in range(8)]  # 8^8 resamples: Monte Carlo via benchmarks.stats
    lo, hi = LB.bootstrap_mean_ci(big)
    m, se = statistics.mean(big), statistics.pstdev(big) / math.sqrt(8)
    assert lo < m < hi and hi - lo == pytest.approx(2 * 1.96 * se, rel=0.25)
    assert LB.chance_normalise(0.75, 0.5) == 0.5 and LB.chance_normalise(0.25, 0.25) == 0.0
    assert LB.mean_std([1.0, 2.0, 4.0]) == (pytest.approx(7 / 3), pytest.approx(statistics.stdev([1, 2, 4])))
    # delta: paired when >= 2 seeds are shared
    d = LB.delta_vs_baseline({0: 0.6, 1: 0.9, 2: 0.7}, {0: 0.5, 1: 0.6, 2: 0.7, 9: 0.1})
    assert d.how == "paired (3 seeds)" and d.value == pytest.approx((0.1 + 0.3 + 0.0) / 3)
    assert (d.lo, d.hi) == pytest.approx(ref_boot_ci([0.1, 0.3, 0.0]))
    # unpaired when the seeds differ
    d = LB.delta_vs_baseline({5: 0.6, 6: 0.7}, {0: 0.5, 1: 0.6, 2: 0.7})
    assert d.how == "unpaired" and d.value == pytest.approx(0.05) and d.lo < 0.05 < d.hi
    # one seed: the runs' own CIs, combined in quadrature
    d = LB.delta_vs_baseline({0: 0.8}, {0: 0.5}, (0.7, 0.9), (0.45, 0.55))
    assert d.how == "run CIs" and (d.lo, d.hi) == pytest.approx((0.3 - math.hypot(0.1, 0.05),
                                                                 0.3 + math.hypot(0.1, 0.05)))


def test_leaderboard_numbers_match_hand_computation(grid, monkeypatch):
    monkeypatch.setitem(sys.modules, "benchmarks.cka", None)  # matplotlib fallback (no torch import here)
    md_path = LB.build_leaderboard(grid)
    rows = read_csv(grid / "leaderboard.csv")
    assert list(rows) == ["scd+aw", "scd", "kd"]  # ranked by avg; failed-only configs absent
    kd, scd, aw = rows["kd"], rows["scd"], rows["scd+aw"]
    f = float
    # per-task primary metric: mean, std (ddof 1), exact bootstrap CI over seeds
    assert f(kd["qa/f1"]) == pytest.approx(0.6, abs=1e-6)
    assert f(kd["qa/f1_std"]) == pytest.approx(statistics.stdev(KD["qa"]), abs=1e-6)
    assert (f(kd["qa/f1_ci_lo"]), f(kd["qa/f1_ci_hi"])) == pytest.approx(ref_boot_ci(KD["qa"]), abs=1e-6)
    assert (f(scd["cls/acc_ci_lo"]), f(scd["cls/acc_ci_hi"])) == pytest.approx(ref_boot_ci(SCD["cls"]), abs=1e-6)
    assert f(kd["lm/perplexity"]) == pytest.approx(11.0)  # lower-is-better: reported, not in avg
    # single seed: the run's own CI
    assert (f(aw["qa/f1_ci_lo"]), f(aw["qa/f1_ci_hi"])) == pytest.approx((0.74, 0.86), abs=1e-6)
    assert aw["qa/f1_std"] == ""
    # chance-normalised average over tasks (failed seed 3 with 0.99 is not averaged)
    kd_avg = [ref_avg(q, c) for q, c in zip(KD["qa"], KD["cls"])]
    scd_avg = [ref_avg(q, c) for q, c in zip(SCD["qa"], SCD["cls"])]
    assert f(kd["avg_norm"]) == pytest.approx(statistics.mean(kd_avg), abs=1e-6)
    assert f(scd["avg_norm"]) == pytest.approx(statistics.mean(scd_avg), abs=1e-6)
    assert f(scd["avg_norm_std"]) == pytest.approx(statistics.stdev(scd_avg), abs=1e-6)
    assert (f(scd["avg_norm_ci_lo"]), f(scd["avg_norm_ci_hi"])) == pytest.approx(ref_boot_ci(scd_avg), abs=1e-6)
    assert f(aw["avg_norm"]) == pytest.approx(ref_avg(0.8, 0.9), abs=1e-6)
    aw_ci = ((0.74 + (0.85 - 0.5) / 0.5) / 2, (0.86 + (0.95 - 0.5) / 0.5) / 2)
    assert (f(aw["avg_norm_ci_lo"]), f(aw["avg_norm_ci_hi"])) == pytest.approx(aw_ci, abs=1e-6)
    # delta vs the baseline, paired by seed, with an exact bootstrap CI of the differences
    diffs = [a - b for a, b in zip(scd_avg, kd_avg)]
    assert f(scd["delta"]) == pytest.approx(statistics.mean(diffs), abs=1e-6)
    assert (f(scd["delta_ci_lo"]), f(scd["delta_ci_hi"])) == pytest.approx(ref_boot_ci(diffs), abs=1e-6)
    assert scd["delta_how"] == "paired (3 seeds)"
    qa_diffs = [a - b for a, b in zip(SCD["qa"], KD["qa"])]
    assert f(scd["qa/f1_delta"]) == pytest.approx(statistics.mean(qa_diffs), abs=1e-6)
    kd_ci = ref_boot_ci(kd_avg)
    h = math.hypot((aw_ci[1] - aw_ci[0]) / 2, (kd_ci[1] - kd_ci[0]) / 2)
    d_aw = ref_avg(0.8, 0.9) - statistics.mean(kd_avg)
    assert (f(aw["delta"]), f(aw["delta_ci_lo"]), f(aw["delta_ci_hi"])) == pytest.approx(
        (d_aw, d_aw - h, d_aw + h), abs=1e-6)
    assert f(kd["delta"]) == 0.0
    # rank, seeds, status counts, components, CKA
    assert [r["rank"] for r in rows.values()] == ["1", "2", "3"]
    assert (scd["n_seeds"], scd["n_ok"], scd["n_failed"]) == ("3", "3", "1")
    assert (kd["n_ok"], kd["n_running"]) == ("3", "1")
    assert (aw["components.aw"], scd["components.aw"], scd["components.sched"]) == ("true", "false", "true")
    assert f(scd["cka_mean_matched"]) == pytest.approx(0.7) and kd["cka_mean_matched"] == ""
    # markdown: same numbers, failures in their own section, notes
    md = md_path.read_text()
    assert "Baseline: **kd**" in md and "synthetic test grid" in md
    assert f"{statistics.mean(scd_avg):.3f} ± {statistics.stdev(scd_avg):.3f}" in md
    assert f"{statistics.mean(diffs):+.3f}" in md and "(baseline)" in md
    failed = md.split("## Failed and incomplete runs")[1]
    assert "RuntimeError: CUDA out of memory" in failed and "traceback" not in failed and "running" in failed
    assert "lm/perplexity: left out of avg" in md
    # figures
    for name in ("tasks.png", "component_deltas.png", "recovery_vs_cka.png"):
        assert (grid / "figures" / name).stat().st_size > 5000, name
    assert len(list((grid / "figures").glob("cka_*.png"))) == 1  # only scd has matrices


def test_runs_parquet_has_one_row_per_run(grid):
    import polars as pl

    LB.build_leaderboard(grid, figures=False)
    df = pl.read_parquet(grid / "runs.parquet")
    assert df.height == 9 and df["run_id"].n_unique() == 9
    assert sorted(df["status"].to_list()).count("ok") == 7
    kd0 = df.filter((pl.col("method") == "kd") & (pl.col("seed") == 0)).row(0, named=True)
    assert kd0["qa/f1"] == 0.5 and kd0["qa/em"] == 0.25 and kd0["qa/f1.ci_lo"] == pytest.approx(0.45)
    assert kd0["avg_norm"] == pytest.approx(ref_avg(0.5, 0.6))
    assert df.filter(pl.col("method") == "scd+aw")["components.aw"].to_list() == [True]


def test_bad_run_json_is_skipped_with_a_warning(grid):
    (grid / "torn").mkdir()
    (grid / "torn" / "run.json").write_text('{"schema_version": 1, "run_id": ')
    bad = rec("kd", 7, 0.1, 0.6)
    del bad["seed"]
    write_runs(grid, [bad])
    wrong = rec("kd", 8, 0.1, 0.6)
    wrong["eval"]["qa"]["f1"] = 0.1  # not {value, n, ci}
    wrong["run_id"] = "wrong"
    write_runs(grid, [wrong])
    with pytest.warns(LB.LeaderboardWarning) as w:
        LB.build_leaderboard(grid, figures=False, plan_only=False)
    msgs = " ".join(str(x.message) for x in w)
    assert "syn/torn/run.json" in msgs and "missing key 'seed'" in msgs and "eval.qa.f1" in msgs
    md = (grid / "leaderboard.md").read_text()
    assert "## Skipped files" in md and "missing key 'seed'" in md
    assert read_csv(grid / "leaderboard.csv")["kd"]["n_seeds"] == "3"  # bad ones not counted


def test_runs_outside_the_plan_are_left_out(grid):
    write_runs(grid, [rec("old", 0, 0.9, 0.9, lr=0.5)])  # a run dir from an earlier version of the grid
    LB.build_leaderboard(grid, figures=False)
    assert "old" not in read_csv(grid / "leaderboard.csv")
    assert "not in the current plan.json" in (grid / "leaderboard.md").read_text()
    LB.build_leaderboard(grid, figures=False, plan_only=False)
    assert "old" in read_csv(grid / "leaderboard.csv")


def test_sweep_rows_are_labelled_and_compared_with_the_matching_baseline(tmp_path):
    gdir = tmp_path / "sweep"
    recs = [rec(m, s, q + s * 0.01 + (0.05 if lr == 2e-3 else 0), 0.7, lr=lr)
            for m, q in (("kd", 0.5), ("scd", 0.6)) for lr in (1e-3, 2e-3) for s in range(2)]
    write_runs(gdir, recs, plan={"grid": "sweep", "baseline": "kd", "runs": [{"run_id": r["run_id"]} for r in recs]})
    LB.build_leaderboard(gdir, figures=False)
    rows = read_csv(gdir / "leaderboard.csv")
    assert set(rows) == {"kd lr=0.001", "kd lr=0.002", "scd lr=0.001", "scd lr=0.002"}
    assert rows["scd lr=0.002"]["train.lr"] == "0.002"
    for lr in ("0.001", "0.002"):  # like-with-like: scd at lr X vs kd at lr X
        assert rows[f"scd lr={lr}"]["baseline_config_id"] == rows[f"kd lr={lr}"]["config_id"]
        assert float(rows[f"scd lr={lr}"]["qa/f1_delta"]) == pytest.approx(0.1, abs=1e-6)


def test_index_links_every_grid_and_cli(grid, tmp_path, capsys):
    other = grid.parent / "other"
    write_runs(other, [rec("kd", 0, 0.4, 0.6)])
    write_runs(grid.parent / "runs", [rec("kd", 0, 0.4, 0.6)])  # hand-made / dependency runs: not indexed
    (other / "README.md").write_text("# Other study, 3 seeds\n\nbody\n")
    assert LB.main(["--results-dir", str(grid.parent), "--no-figures"]) == 0
    index = (grid.parent / "README.md").read_text()
    assert "(runs/leaderboard.md)" not in index and "`runs/`" in index
    assert "- [other](other/README.md): Other study, 3 seeds" in index
    assert "[syn](syn/leaderboard.md) — synthetic test grid: 3 configs, 9 runs (1 failed) (1 unfinished); " \
           "best: scd+aw" in index
    assert "[other](other/leaderboard.md)" in index and "Updated " in index
    assert json.loads((grid / "leaderboard.json").read_text())["best"]["label"] == "scd+aw"
    assert LB.main(["--results-dir", str(tmp_path / "nowhere")]) == 2
    assert "no grid results" in capsys.readouterr().err


def test_cka_heatmap_uses_benchmarks_cka(grid):
    pytest.importorskip("benchmarks.cka")
    g = next(g for g in LB.make_groups(LB.load_records(grid)[0]) if g.method == "scd")
    out = grid / "figures" / "cka.png"
    assert LB.plot_cka(g, out) and out.stat().st_size > 5000


def test_other_metrics_table_with_paired_deltas(grid):
    """Non-primary metrics (here qa/em = f1 / 2) get their own table, with deltas vs the baseline."""
    assert LB.main(["--results-dir", str(grid.parent), "--no-figures"]) == 0
    md = (grid / "leaderboard.md").read_text()
    assert "## Other metrics" in md
    section = md.split("## Other metrics", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in section.splitlines() if line.startswith("| scd |"))
    em = [SCD["qa"][s] / 2 for s in range(3)]
    d = sum(SCD["qa"][s] / 2 - KD["qa"][s] / 2 for s in range(3)) / 3
    assert f"{sum(em) / 3:.3f}" in row and f"(Δ {d:+.3f} [" in row
    kd_row = next(line for line in section.splitlines() if line.startswith("| kd |"))
    assert "(Δ" not in kd_row  # the baseline has no delta against itself
    assert "qa em ↑" in section and "qa f1" not in section  # the primary metric stays in the main table


def test_sub_options_of_one_choice_are_left_out_of_labels_but_kept_in_the_csv():
    """Recovery-style rows: options that belong to one degradation only (None for the others) are
    determined by the degradation name, so the label and markdown table show name and strength only."""
    def row(method, name, strength, options):
        r = rec(method, 0, cls=0.6)
        r["config"]["degradation"] = {"name": name, "strength": strength, "options": options}
        return r
    quant, forget = {"group_size": 64}, {"lr": 3e-4}
    recs = [row(m, n, s, o) for m in ("none", "sd")
            for n, s, o in (("quantize", 8, quant), ("quantize", 4, quant), ("forget", 8, forget))]
    groups = LB.make_groups(recs)
    labels = sorted(g.label for g in groups)
    assert labels[0] == "none name=forget strength=8", labels
    assert all("None" not in g.label and "group_size" not in g.label for g in groups)
    assert all(set(g.shown) == {"degradation.name", "degradation.strength"} for g in groups)
    # the csv columns keep every varying key
    assert {"degradation.options.group_size", "degradation.options.lr"} <= set(groups[0].hparams)
    # a zipped key that is never unset is not a sub-option, even when another key determines it
    recs = [rec("kd", 0, cls=0.6, lr=lr) for lr in (1e-3, 1e-4)]
    for r, w in zip(recs, (10, 20)):
        r["config"]["train"]["warmup"] = w
    groups = LB.make_groups(recs)
    assert all(set(g.shown) == {"train.lr", "train.warmup"} for g in groups)


def test_execution_keys_do_not_split_configurations():
    """benchmarks.evaluate records its output folder, threads and progress flag in its config: two
    evaluations that differ only there are one configuration, and those keys are not columns."""
    recs = [rec("smollm2", s, cls=0.6) for s in range(2)]
    for r, out, threads in zip(recs, ("results/eval/a", "/tmp/b"), (1, 2)):
        r["config"].update(out=out, num_threads=threads, progress=bool(threads - 1), device=None)
    (g,) = LB.make_groups(recs)
    assert not {"out", "num_threads", "progress", "device"} & set(LB.config_of(recs[0]))
    assert len(g.records) == 2 and g.label == "smollm2"


def test_empty_mapping_is_the_same_configuration_as_an_absent_key():
    """`prompts: {}` (the default) and a run without the key are one configuration; a run that sets
    label words is labelled by them, not by a `prompts={}` column."""
    assert LB.flatten({"a": {}, "b": {"c": {}, "d": 1}}) == {"b.d": 1}
    plain, empty, words = (rec("smollm2", s, cls=0.6) for s in range(3))
    empty["config"]["prompts"] = {}
    words["config"]["prompts"] = {"rt": {"label_words": {"fresh": "positive", "rotten": "negative"}}}
    groups = LB.make_groups([plain, empty, words])
    assert sorted(len(g.records) for g in groups) == [1, 2]
    assert {tuple(g.shown) for g in groups} == {("prompts.rt.label_words.fresh",)}


def test_heatmaps_of_configurations_no_longer_in_the_table_are_removed(grid):
    LB.build_leaderboard(grid)
    stale = grid / "figures" / "cka_00000000.png"
    stale.write_bytes(b"old")
    keep = sorted((grid / "figures").glob("cka_*.png"))
    LB.build_leaderboard(grid)
    assert not stale.exists()
    assert sorted((grid / "figures").glob("cka_*.png")) == [p for p in keep if p != stale]


# ------------------------------------------------------------------ honest floors and constant predictors
def profile(r: dict, majority: float, share: float, label: str = "pos") -> dict:
    """What the classification scorer stores next to accuracy (eval_info[task].extra.<metric>)."""
    r["eval_info"] = {"cls": {"family": "classification", "extra": {"acc": {
        "majority_baseline": majority, "max_label_share": share, "most_predicted": label,
        "constant": share >= 0.95}}}}
    return r


def plan_for(gdir: Path, recs: list[dict], baseline: str = "kd") -> None:
    write_runs(gdir, recs, plan={"grid": gdir.name, "baseline": baseline,
                                 "runs": [{"run_id": r["run_id"]} for r in recs]})


def md_row(md: str, start: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(start))


def test_accuracy_is_normalised_against_the_majority_floor(tmp_path):
    """avg uses the split's majority rate (0.6 here), avg (uniform) the metric's chance 1/|labels| (0.5)."""
    gdir = tmp_path / "floor"
    plan_for(gdir, [profile(rec("kd", s, KD["qa"][s], KD["cls"][s]), 0.6, 0.7) for s in range(3)])
    LB.build_leaderboard(gdir, figures=False)
    kd = read_csv(gdir / "leaderboard.csv")["kd"]
    majority = [(q + (c - 0.6) / 0.4) / 2 for q, c in zip(KD["qa"], KD["cls"])]
    uniform = [ref_avg(q, c) for q, c in zip(KD["qa"], KD["cls"])]
    assert float(kd["avg_norm"]) == pytest.approx(statistics.mean(majority), abs=1e-6)
    assert (float(kd["avg_norm_ci_lo"]), float(kd["avg_norm_ci_hi"])) == pytest.approx(ref_boot_ci(majority), abs=1e-6)
    assert float(kd["avg_norm_uniform"]) == pytest.approx(statistics.mean(uniform), abs=1e-6)
    assert (float(kd["cls/acc_floor"]), float(kd["cls/acc_chance_uniform"])) == (0.6, 0.5)
    md = (gdir / "leaderboard.md").read_text()
    assert "- cls acc: majority floor 0.600; uniform chance 0.500" in md and "avg (uniform)" in md
    # a model that always answers the majority label scores exactly 0
    assert LB.run_avg(profile(rec("kd", 0, 0.0, 0.6), 0.6, 1.0), LB.primary_metrics([rec("kd", 0, 0.0, 0.6)])[0]
                      )[0] == pytest.approx(0.0)


def test_constant_predictor_is_marked_and_never_ranked_first_or_best(tmp_path):
    """The constant configuration has the highest score, yet it is unranked, marked in every table and
    not named best; one constant seed out of three marks the configuration too."""
    gdir = tmp_path / "const"
    recs = [profile(rec("kd", s, KD["qa"][s], KD["cls"][s]), 0.55, 0.6) for s in range(3)]
    recs += [profile(rec("scd", s, SCD["qa"][s], SCD["cls"][s]), 0.55, 0.97 if s == 1 else 0.7, "neg")
             for s in range(3)]
    recs.append(profile(rec("const", 0, 0.9, 0.9), 0.55, 0.991))
    plan_for(gdir, recs)
    LB.build_leaderboard(gdir)
    rows = read_csv(gdir / "leaderboard.csv")
    assert [(k, r["rank"]) for k, r in rows.items()] == [("kd", "1"), ("const", ""), ("scd", "")]
    assert rows["const"]["constant"] == "true" and rows["kd"]["constant"] == "false"
    assert rows["const"]["constant_note"] == "⚠ cls: constant (99% 'pos')"
    assert rows["scd"]["constant_note"] == "⚠ cls: constant in 1/3 seeds (97% 'neg')"
    md = (gdir / "leaderboard.md").read_text()
    main_table = md.split("## Other metrics")[0]
    assert md_row(main_table, "| — | const ⚠ cls: constant (99% 'pos') |")
    assert md_row(main_table, "| — | scd ⚠ cls: constant in 1/3 seeds (97% 'neg') |")
    assert md_row(md.split("## Other metrics")[1], "| const ⚠ cls: constant (99% 'pos') |")
    summary = json.loads((gdir / "leaderboard.json").read_text())
    assert summary["best"]["label"] == "kd" and summary["n_constant"] == 2
    LB.update_index(gdir.parent)
    assert "2 constant-predictor configs (⚠); best: kd (avg" in (gdir.parent / "README.md").read_text()


def _index_line(tmp_path: Path, name: str, recs: list[dict]) -> str:
    plan_for(tmp_path / name, recs)
    LB.build_leaderboard(tmp_path / name, figures=False, index=True)
    return md_row((tmp_path / "README.md").read_text(), f"- [{name}]")


def test_index_names_no_best_for_constant_tied_or_floor_rows(tmp_path):
    everyone_constant = [profile(rec(m, s, cls=0.55), 0.55, 1.0) for m in ("kd", "scd") for s in range(2)]
    line = _index_line(tmp_path, "allc", everyone_constant)
    assert "no best: all 2 scored configurations are constant predictors." in line
    note = read_csv(tmp_path / "allc" / "leaderboard.csv")["kd"]["constant_note"]
    assert note == "⚠ constant in 2/2 seeds (100% 'pos')"
    tied = [profile(rec(m, 0, cls=0.7), 0.55, 0.6) for m in ("kd", "scd", "aw")]
    tied.append(profile(rec("low", 0, cls=0.6), 0.55, 0.6))
    assert "no best: 3 configurations tie at the top (aw, kd, scd)." in _index_line(tmp_path, "tied", tied)
    floor = [profile(rec(m, 0, cls=c), 0.55, 0.6) for m, c in (("kd", 0.55), ("scd", 0.5))]
    floor.append(profile(rec("const", 0, cls=0.9), 0.55, 0.96))
    line = _index_line(tmp_path, "floor", floor)
    assert "no best: no configuration scores above the floor (1 constant, 2 at or below it)." in line
    # the rank-1 row of a tie is still ranked (ties share the rank), just not named best
    assert [r["rank"] for r in read_csv(tmp_path / "tied" / "leaderboard.csv").values()] == ["1", "1", "1", "4"]
    assert json.loads((tmp_path / "tied" / "leaderboard.json").read_text())["best"] is None
    # a grid of one configuration names no best: there is nothing to compare it with
    line = _index_line(tmp_path, "single", [profile(rec("kd", s, cls=0.8), 0.55, 0.6) for s in range(2)])
    assert "no best: one scored configuration: nothing to compare it with." in line


def test_unchanged_leaderboard_is_not_rewritten(grid):
    LB.main(["--results-dir", str(grid.parent)])
    files = [grid / f for f in ("leaderboard.md", "leaderboard.csv", "leaderboard.json", "runs.parquet")]
    files += sorted((grid / "figures").glob("*.png")) + [grid.parent / "README.md"]
    summary = json.loads((grid / "leaderboard.json").read_text())
    summary["generated"] = "2000-01-01T00:00:00+0000"  # an old build; only the timestamp differs
    atomic_write_json(grid / "leaderboard.json", summary)
    LB.update_index(grid.parent)
    stamps = {p: p.stat().st_mtime_ns for p in files}
    LB.main(["--results-dir", str(grid.parent)])
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    assert "Updated 2000-01-01T00:00:00+0000." in (grid.parent / "README.md").read_text()
    # a changed run rewrites what depends on it, with a new timestamp
    r = json.loads((grid / "kd-0-0.001" / "run.json").read_text())
    r["eval"]["qa"]["f1"]["value"] = 0.55
    atomic_write_json(grid / "kd-0-0.001" / "run.json", r)
    LB.main(["--results-dir", str(grid.parent), "--no-figures"])
    assert json.loads((grid / "leaderboard.json").read_text())["generated"] != "2000-01-01T00:00:00+0000"
    assert (grid / "leaderboard.md").stat().st_mtime_ns != stamps[grid / "leaderboard.md"]
    assert "Updated 2000-01-01" not in (grid.parent / "README.md").read_text()


REPO = Path(__file__).resolve().parents[1]
COMMITTED = sorted(p.parent for p in (REPO / "results").glob("*/leaderboard.csv"))


def _share_from_predictions(run_dir: Path, rel: str) -> float | None:
    """Share of a run's saved predictions on its most predicted label, counted from the jsonl itself."""
    path = run_dir / rel
    if not path.exists():
        return None
    preds = [json.loads(line)["prediction"] for line in path.read_text().splitlines() if line.strip()]
    labels = [p for p in preds if isinstance(p, str)]
    return max(labels.count(lab) for lab in set(labels)) / len(preds) if labels else 0.0


@pytest.mark.parametrize("gdir", COMMITTED, ids=[p.name for p in COMMITTED])
def test_committed_leaderboards_mark_every_constant_run(gdir):
    """Every committed run that put >= 95% of its predictions on one label (counted from its predictions
    file) carries the scorer's flag, and its configuration is marked, unranked and not named best in the
    committed leaderboard.md / .csv / .json and the results index."""
    records = LB.load_records(gdir)[0]
    groups = {id(r): g for g in LB.make_groups(records) for r in g.records}
    rows = {r["config_id"]: r for r in csv.DictReader(io.StringIO((gdir / "leaderboard.csv").read_text()))}
    md = (gdir / "leaderboard.md").read_text().split("## Other metrics")[0]
    constant_configs = set()
    for rec in (r for r in records if r["status"] == "ok"):
        for task, info in (rec.get("eval_info") or {}).items():
            if info.get("family") != "classification":
                continue
            share = _share_from_predictions(Path(rec["_path"]).parent, info["predictions"])
            profile = (info.get("extra") or {}).get("accuracy") or {}
            assert share is not None and profile.get("max_label_share") == pytest.approx(share, abs=1e-6), \
                f"{rec['_path']}: {task} not rescored (python -m benchmarks.evaluate --rescore)"
            assert profile["constant"] == (share >= 0.95)
            if share >= 0.95:
                constant_configs.add(groups[id(rec)].config_id)
    for cid in constant_configs:
        row = rows[cid]
        assert row["constant"] == "true" and row["rank"] == "", (gdir.name, row["label"])
        assert f"| — | {row['method']} {row['constant_note']} |" in md
    assert {cid for cid, r in rows.items() if r["constant"] == "true"} == constant_configs
    summary = json.loads((gdir / "leaderboard.json").read_text())
    assert summary["n_constant"] == len(constant_configs)
    index = (REPO / "results" / "README.md").read_text()
    line = next(x for x in index.splitlines() if x.startswith(f"- [{gdir.name}]("))
    if summary["best"]:
        best = next(r for r in rows.values() if r["label"] == summary["best"]["label"])
        assert best["config_id"] not in constant_configs and best["rank"] == "1" and float(best["avg_norm"]) > 0
        assert f"best: {best['label']} (avg" in line
    else:
        assert "best:" not in line.replace("no best:", "")


def test_untrained_run_shows_no_training_settings():
    """A run that recorded 0 optimiser steps (recovery method none) is grouped and shown without its
    train.* settings: they did not touch its result (the table showed train.max_steps 16 for 0 steps)."""
    from benchmarks.leaderboard import config_of
    from benchmarks.leaderboard.groups import fmt_v

    cfg = {"method": "none", "seed": 0, "train": {"max_steps": 16, "lr": 1e-4}, "degradation": {"name": "prune"}}
    untrained = {"config": cfg, "train": {"steps": 0, "tokens": 0}}
    trained = {"config": {**cfg, "method": "sd"}, "train": {"steps": 16}}
    assert config_of(untrained) == {"degradation.name": "prune"}
    assert config_of(trained) == {"train.max_steps": 16, "train.lr": 1e-4, "degradation.name": "prune"}
    assert fmt_v(untrained["config"].get("missing")) == "—" and fmt_v(16) == "16"
