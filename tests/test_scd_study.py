"""benchmarks.scd_study: SFS/TFS subsets, paired claims and verdicts, constant rows never judged."""
from __future__ import annotations

import json

import pytest

from benchmarks.paired import judge, judged, median_wall, verdict
from benchmarks.scd_study import favoured_subsets, main, study
from scd.core.results import atomic_write_json

GOLD = ["a", "b"] * 10  # 20 examples, balanced


def fake_run(root, method, seed, correct, constant=False, selection_steps=None, dependencies=None):
    d = root / f"{method}{seed}"
    (d / "predictions").mkdir(parents=True)
    preds = [g if c else ("b" if g == "a" else "a") for g, c in zip(GOLD, correct)]
    (d / "predictions" / "t.jsonl").write_text("".join(
        json.dumps({"id": i, "prediction": p, "gold": g, "scores": {"correct": float(p == g)}}) + "\n"
        for i, (p, g) in enumerate(zip(preds, GOLD))))
    acc = sum(correct) / len(correct)
    atomic_write_json(d / "run.json", {
        "run_id": f"{method}{seed}", "method": method, "seed": seed, "status": "ok",
        "train": {"wall_s": 10.0, **({"selection_steps": selection_steps} if selection_steps else {})},
        "eval": {"t": {"accuracy": {"value": acc, "n": 20}}},
        "eval_info": {"t": {"predictions": "predictions/t.jsonl",
                            "extra": {"accuracy": {"constant": constant, "max_label_share": 0.5}}}},
        **({"dependencies": dependencies} if dependencies is not None else {})})


def test_favoured_subsets():
    anchor = {"0": 1.0, "1": 0.0, "2": 1.0, "3": 0.0}
    teacher = {"0": 0.0, "1": 1.0, "2": 1.0, "3": 0.0}
    assert favoured_subsets(anchor, teacher) == (["0"], ["1"])


def test_row_wall_time_is_the_median_over_seeds():
    # one paused seed (its wall clock ran on) must not set the row's time; a run without a time is skipped
    runs = {0: {"wall_s": 400.0}, 1: {"wall_s": 5000.0}, 2: {"wall_s": 420.0}, 3: {"wall_s": None}}
    assert median_wall(runs, [0, 1, 2, 3]) == 420.0
    assert median_wall(runs, [0, 1]) == 2700.0
    assert median_wall(runs, [3]) != median_wall(runs, [3])  # nan


def _row(*seeds):  # {seed: load_rows entry} from (n right of 20, constant)
    return {s: {"score": k / 20, "correct": {str(i): float(i < k) for i in range(20)}, "counts": None,
                "predictions": {str(i): "r" if i < k else "w" for i in range(20)}, "constant": c}
            for s, (k, c) in enumerate(seeds)}


def test_a_constant_predictor_is_never_the_winner():
    rows = {"a": _row((16, False), (16, False)), "b": _row((10, False), (8, True)),
            "c": _row((19, True), (19, False)), "d": _row((10, False), (5, True))}
    # A clearly beats B, which is constant in seed 1: the verdict stands and says what A beat
    ab = judge(rows, "a", ">", "b", 500)
    assert ab["delta"] == pytest.approx(0.35) and ab["seed_deltas"] == pytest.approx([0.3, 0.4])
    assert ab["verdict"] == "supported (b is a constant predictor in seed 1)"
    # the constant row claimed better and clearly behind: contradicted, said so
    ba = judge(rows, "b", ">=", "a", 500)
    assert ba["verdict"] == "contradicted (b is a constant predictor in seed 1)" and ba["delta"] == pytest.approx(-0.35)
    # a constant row ahead: never a winner, however far ahead; the Δ is still reported
    ca = judge(rows, "c", ">", "a", 500)
    assert ca["verdict"] == "not measurable (constant predictor: c seed 0)" and ca["delta"] == pytest.approx(0.15)
    # both rows constant somewhere: no verdict
    assert judge(rows, "b", ">", "d", 500)["verdict"] == "not measurable (constant predictor: b seed 1, d seed 1)"
    assert judge(rows, "a", ">", "zz", 500)["verdict"] == "not measurable (row missing)"
    assert judged(ab) and judged(ba) and not judged(ca) and not judged(judge(rows, "a", ">", "zz", 500))
    # a shared row (one teacher for every seed of A) that is constant: one run, named once by its own seed
    rows["t"] = {0: _row((5, True))[0]}
    at = judge(rows, "a", ">", "t", 500, shared="t")
    assert at["verdict"] == "supported (t is a constant predictor in seed 0)" and at["seeds"] == [0, 1]


def test_verdicts():
    assert verdict({"ci": [0.01, 0.05]}, ">") == "supported"
    assert verdict({"ci": [-0.05, -0.01]}, ">") == "contradicted"
    assert verdict({"ci": [-0.01, 0.05]}, ">").startswith("not distinguishable")
    assert verdict({"ci": [-0.01, 0.05]}, ">=").startswith("supported (not distinguishable")
    assert verdict({"ci": [-0.05, -0.01]}, ">=") == "contradicted"
    assert verdict({"ci": [0.01, 0.05]}, "!=") == "A higher" and verdict({"ci": [-0.05, -0.01]}, "!=") == "A lower"
    assert verdict({"ci": [-0.01, 0.05]}, "!=").startswith("not distinguishable")


def test_study_on_a_synthetic_grid(tmp_path):
    # one shared teacher (seed 0): right on 0-13; the SFT anchor: right on 6-19
    teacher = [i < 14 for i in range(20)]
    for seed in (0, 1):
        fake_run(tmp_path, "sft", seed, [i >= 6 for i in range(20)])
        fake_run(tmp_path, "kd", seed, [True] * 20)  # better than sft on every seed
        fake_run(tmp_path, "cd", seed, [i % 2 == 0 for i in range(20)], constant=True,
                 selection_steps=[30, 60] if seed == 0 else [60, 60])
    fake_run(tmp_path, "teacher", 0, teacher)
    res = study(tmp_path, task="t", n_boot=500)
    rows = {r["method"]: r for r in res["rows"]}
    # SFS: anchor right, teacher wrong = 14..19 (6 per seed); TFS = 0..5
    assert rows["kd"]["sfs_n"] == 12 and rows["kd"]["tfs_n"] == 12
    assert rows["kd"]["sfs_score"] == 1.0 and rows["kd"]["tfs_score"] == 1.0
    assert rows["sft"]["sfs_score"] == 1.0 and rows["sft"]["tfs_score"] == 0.0
    assert rows["kd"]["vs_teacher"]["delta"] == pytest.approx(1.0 - 0.7)
    assert rows["kd"]["beats_teacher_seeds"] == 2 and rows["cd"]["constant_runs"] == 2
    by = {c["claim"].split(" (")[0]: c for c in res["claims"]}
    assert by["kd > sft"]["delta"] == pytest.approx(1.0 - 0.7) and by["kd > sft"]["verdict"] == "supported"
    assert by["kd > sft"]["seed_deltas"] == pytest.approx([0.3, 0.3])  # the seed-to-seed spread, beside the CI
    # cd is constant and clearly behind: the claim is contradicted, never won by a constant predictor
    assert by["cd >= kd"]["verdict"] == "contradicted (cd is a constant predictor in seed 0, 1)"
    assert by["scd_aw > cd"]["verdict"] == "not measurable (row missing)"
    assert by["kd >= teacher"]["verdict"].startswith("supported")  # the best clean student is kd
    comp = {c["claim"]: c for c in res["comparisons"]}
    assert comp["scd > cd"]["verdict"] == "not measurable (row missing)"
    assert "kd_ce > kd" in comp and not any("teacher" in c for c in comp)  # no best-vs-teacher row here
    md = (tmp_path / "scd_study.md").read_text()
    assert "| cd ⚠ 2 constant |" in md and "| kd > sft | +0.300" in md
    assert "| +0.300 / +0.300 (A ahead in 2/2 seeds) | supported |" in md
    assert rows["cd"]["selections"] == {0: [30, 60], 1: [60, 60]} and rows["kd"]["selections"] == {}
    assert "| cd | 30 → 60 | 60 → 60 |" in md
    assert "## What each ingredient adds" in md and "| scd_aw > kd_ce | - | - | not measurable (row missing) |" in md
    assert main([str(tmp_path), "--task", "t"]) == 0 and main([str(tmp_path), "--task", "nope"]) == 2
    assert res["builds"] == [{"builds": "all not recorded", "runs": [f"{m} seed {s}" for m in ("teacher", "sft", "kd",
                                                                                            "cd") for s in (0, 1)
                                                                  if (m, s) != ("teacher", 1)]}]
    assert "## Dependency builds" not in md  # one build: nothing to tell apart


def test_selection_terms_come_from_the_select_events(tmp_path):
    """The two terms of scd_select's score, read from the runs' metrics.jsonl: the largest KL(best || c) and the
    smallest KL(student || c) over checkpoints, stages and seeds; other rules' events and other lines ignored."""
    events = {0: [{"event": "select", "rule": "scd_select", "kl_best": {"0": 0.2, "1": 0.0},
                   "kl_student": {"0": 5.0, "1": 6.0}},
                  {"step": 10, "loss": 1.0},
                  {"event": "select", "rule": "scd_select", "kl_best": {"0": 0.2, "1": 0.0},
                   "kl_student": {"0": 0.9, "1": 1.1}}],
              1: [{"event": "select", "rule": "scd_select", "kl_best": {"0": 0.3, "1": 0.0},
                   "kl_student": {"0": 1.5, "1": 0.7}},
                  {"event": "select", "rule": "fixed", "kl_best": {"0": 9.0}, "kl_student": {"0": 0.01}}]}
    for seed, evs in events.items():
        fake_run(tmp_path, "scd", seed, [True] * 20, selection_steps=[50, 50])
        (tmp_path / f"scd{seed}" / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evs))
        fake_run(tmp_path, "cd", seed, [True] * 20, selection_steps=[50, 100])  # no metrics.jsonl: no terms
    fake_run(tmp_path, "teacher", 0, [True] * 20)
    rows = {r["method"]: r for r in study(tmp_path, task="t", n_boot=50)["rows"]}
    assert rows["scd"]["selection_terms"] == {"kl_best_max": 0.3, "kl_student_min": 0.7, "choices": 3}
    assert rows["cd"]["selection_terms"] is None and rows["teacher"]["selection_terms"] is None
    md = (tmp_path / "scd_study.md").read_text()
    assert "* `scd`: KL(best ‖ c) at most 0.300, KL(student ‖ c) at least 0.700 over its 3 choices" in md


def test_runs_are_grouped_by_the_builds_of_their_dependencies(tmp_path):
    """A grid resumed on a new machine: its runs name two builds of the teacher and the student."""
    first = {"teacher": {"finished": "T1"}, "student": {"finished": "S1", "path": "/m"}}
    second = {"teacher": {"finished": "T2"}, "student": {"finished": "S2"}}
    fake_run(tmp_path, "teacher", 0, [True] * 20, dependencies={"teacher": {"finished": "T1"}})
    fake_run(tmp_path, "kd", 0, [True] * 20, dependencies=first)
    fake_run(tmp_path, "kd", 1, [True] * 20, dependencies=second)
    fake_run(tmp_path, "sft", 0, [True] * 20)  # predates run.json dependencies
    res = study(tmp_path, task="t", n_boot=50)
    assert res["builds"] == [{"builds": "teacher T1", "runs": ["teacher seed 0"]},
                             {"builds": "all not recorded", "runs": ["sft seed 0"]},
                             {"builds": "student S1; teacher T1", "runs": ["kd seed 0"]},
                             {"builds": "student S2; teacher T2", "runs": ["kd seed 1"]}]
    md = (tmp_path / "scd_study.md").read_text()
    assert "## Dependency builds" in md and "| student S2; teacher T2 | kd seed 1 |" in md


def _ner_run(root, method, seed, counts):
    """A finished NER run: per-example entity counts [tp, n_pred, n_gold] as benchmarks.tasks.ner writes them."""
    d = root / f"{method}{seed}"
    (d / "predictions").mkdir(parents=True)
    (d / "predictions" / "n.jsonl").write_text("".join(
        json.dumps({"id": i, "prediction": [], "gold": [], "scores": {"tp": c[0], "n_pred": c[1], "n_gold": c[2]}})
        + "\n" for i, c in enumerate(counts)))
    tp, npred, ngold = (sum(c[k] for c in counts) for k in range(3))
    atomic_write_json(d / "run.json", {
        "run_id": f"{method}{seed}", "method": method, "seed": seed, "status": "ok", "train": {"wall_s": 1.0},
        "eval": {"n": {"f1_micro": {"value": 2 * tp / (npred + ngold), "n": len(counts)}}},
        "eval_info": {"n": {"predictions": "predictions/n.jsonl"}}})


def test_entity_f1_rows_are_paired_by_resampling_examples(tmp_path):
    """An NER study is scored by entity micro-F1: Δ and its CI come from resampled per-example counts (checked
    against a slow loop over the same resamples), SFS / TFS by micro-F1 on the subsets."""
    import numpy as np

    from benchmarks.paired import load_rows, paired_f1_delta
    from benchmarks.stats import resample_indices

    rng = np.random.default_rng(0)
    gold = rng.integers(0, 3, size=30)

    def counts(p_hit):
        hit = [int(rng.binomial(g, p_hit)) for g in gold]
        return [[h, h + int(rng.integers(0, 2)), int(g)] for h, g in zip(hit, gold)]

    for seed in (0, 1):
        _ner_run(tmp_path, "sft", seed, counts(0.4))
        _ner_run(tmp_path, "kd", seed, counts(0.7))
    _ner_run(tmp_path, "teacher", 0, counts(0.9))
    rows = load_rows(tmp_path, "n")
    assert rows["kd"][0]["metric"] == "f1_micro" and rows["kd"][0]["counts"] is not None
    a, b = [rows["kd"][s]["counts"] for s in (0, 1)], [rows["sft"][s]["counts"] for s in (0, 1)]
    d = paired_f1_delta(a, b, n_boot=300, seed=0)

    order = sorted(str(i) for i in range(len(gold)))  # the examples in paired_f1_delta's order (common_ids)

    def f1(maps, idx):  # slow: the mean over seeds of each seed's micro-F1 on the resampled examples
        ids = [order[i] for i in idx]
        out = []
        for m in maps:
            tp, npred, ngold = (sum(m[i][k] for i in ids) for k in range(3))
            out.append(2 * tp / (npred + ngold) if npred + ngold else 0.0)
        return sum(out) / len(out)

    all_ids = range(len(gold))
    assert d["delta"] == pytest.approx(f1(a, all_ids) - f1(b, all_ids))
    slow = [f1(a, idx) - f1(b, idx) for block in resample_indices(len(gold), 300, 0) for idx in block]
    assert d["ci"] == pytest.approx([float(np.percentile(slow, 2.5)), float(np.percentile(slow, 97.5))])
    res = study(tmp_path, task="n", n_boot=300)
    r = {x["method"]: x for x in res["rows"]}
    assert res["metric"] == "f1_micro" and r["kd"]["vs_teacher"]["n"] == len(gold)
    assert r["kd"]["score"] == pytest.approx(np.mean([rows["kd"][s]["score"] for s in (0, 1)]))
    by = {c["claim"]: c for c in res["claims"]}
    assert by["kd > sft"]["delta"] == pytest.approx(d["delta"], abs=1e-12)
    assert "| method | seeds | f1_micro (mean ± sd) |" in (tmp_path / "scd_study.md").read_text()
    from benchmarks.paired import pooled_score
    k0, k1 = rows["kd"][0], rows["kd"][1]
    tot = np.sum([k0["counts"]["1"], k0["counts"]["2"], k1["counts"]["2"]], axis=0)
    assert pooled_score([(k0, ["1", "2"]), (k1, ["2"])]) == (pytest.approx(2 * tot[0] / (tot[1] + tot[2])), 3)
    assert pooled_score([(k0, [])])[1] == 0
