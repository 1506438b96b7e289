"""Results notes quote numbers recomputed from the committed raw files (benchmarks.note_numbers)."""
import json
import shutil

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from benchmarks import note_numbers as N


def test_every_note_quotes_its_recomputed_numbers(capsys):
    found = N.entries()
    notes = {e.note for e in found}
    assert {"README.md", "results/scd_baselines_cpu/README.md", "results/recovery_study_cpu/README.md",
            "results/eval/smollm2-135m/README.md", "results/eval/smollm2-135m-calibrated/README.md"} <= notes
    assert N.main(["--check"]) == 0, capsys.readouterr().err
    assert N.missing() == []


def test_recomputed_values_from_the_raw_files():
    by = {(e.note, e.name): e.value for e in N.entries()}
    scd = "results/scd_baselines_cpu/README.md"
    # label NLL of the teacher rows: the mean over all three seeds, not over seeds 1-2
    assert by[(scd, "teacher macro-F1 / label NLL, mean over 3 seeds")] == pytest.approx(
        (0.614759 + 0.651033 + 0.870227) / 3, abs=1e-6)
    rec = "results/recovery_study_cpu/README.md"
    assert by[(rec, "score vs mean CKA, recovered runs (method != none)")] == pytest.approx(0.567, abs=5e-4)
    cal = "results/eval/smollm2-135m-calibrated/README.md"
    assert by[(cal, "best-threshold accuracy of the label margin")] == pytest.approx(0.605)


def test_seeded_recovery_verdicts_wait_for_every_seed():
    """Nothing is quoted from the seeded recovery study until its configurations have all their seeds;
    with the bar at one seed, the verdict phrases are built from the committed runs."""
    assert N.recovery_seeded(N.REPO, seeds=4) == []
    found = N.recovery_seeded(N.REPO, seeds=1)
    deltas = [e for e in found if " Δ accuracy on " in e.name]
    assert len(deltas) == 2 * len(N.MILD + N.GAINS)
    assert all(e.phrase.startswith(("sd on ", "sd-kl on ")) and " degraded, Δ " in e.phrase for e in deltas)
    assert all(e.phrase.endswith(" seeds") and ("harm, constant in " in e.phrase) for e in deltas)
    corr = [e for e in found if e.name.startswith("score vs mean CKA")]
    assert {e.note for e in corr} == {"README.md", f"{N.SEEDED}/README.md"} and len(corr) == 4
    assert all(-1 <= e.value <= 1 and "configurations" in e.phrase for e in corr)


def _study_run(grid, method, seed, correct, constant=False):
    d = grid / f"{method}{seed}"
    (d / "predictions").mkdir(parents=True)
    (d / "predictions" / "rt.jsonl").write_text("".join(
        json.dumps({"id": i, "prediction": "x" if c else "y", "gold": "x", "scores": {"correct": float(c)}}) + "\n"
        for i, c in enumerate(correct)))
    (d / "run.json").write_text(json.dumps({
        "run_id": f"{method}{seed}", "method": method, "seed": seed, "status": "ok", "train": {"wall_s": 1.0},
        "eval": {"rotten_tomatoes": {"accuracy": {"value": sum(correct) / len(correct), "n": len(correct)}}},
        "eval_info": {"rotten_tomatoes": {"predictions": "predictions/rt.jsonl",
                                          "extra": {"accuracy": {"constant": constant, "max_label_share":
                                                                 0.97 if constant else 0.5, "most_predicted": "y",
                                                                 "majority_baseline": 0.5}}}}}))


def test_scd_study_verdicts_wait_for_the_whole_grid(tmp_path):
    """Nothing is quoted from the SCD study until every run of its plan finished ok; then each claim is
    quoted in the study's README and the README Status with its paired Δ, CI and verdict."""
    grid = tmp_path / N.SCD_STUDY
    grid.mkdir(parents=True)
    plan = [("teacher", 0), ("sft", 0), ("sft", 1), ("kd", 0), ("kd", 1)]
    (grid / "plan.json").write_text(json.dumps({"runs": [{"run_id": f"{m}{s}"} for m, s in plan]}))
    for m, s in plan[:-1]:
        _study_run(grid, m, s, [i < {"teacher": 16, "sft": 10, "kd": 20}[m] for i in range(20)])
    assert N.scd_study(tmp_path) == []
    _study_run(grid, "kd", 1, [True] * 20)
    found = N.scd_study(tmp_path)
    kd = next(e for e in found if e.name == "claim kd > sft: Δ score")
    assert kd.value == pytest.approx(0.5) and kd.phrase.startswith("kd > sft: Δ +0.500 [")
    assert kd.phrase.endswith("], supported")
    per_seed = next(e for e in found if e.name == "claim kd > sft: Δ per seed")
    assert per_seed.note == f"{N.SCD_STUDY}/README.md"
    assert per_seed.phrase == "kd > sft: per seed +0.500 / +0.500 (A ahead in 2/2 seeds)"
    assert {e.note for e in found if e.name.startswith("claim kd > sft")} == {"README.md", f"{N.SCD_STUDY}/README.md"}
    assert any(e.phrase == "`kd` 1.000 ± 0.000 over 2 seeds" for e in found)
    # the teacher is right wherever the SFT anchor is: no student-favoured example; 6 teacher-favoured per seed
    assert any(e.phrase == "`kd` n/a on SFS (0), 1.000 on TFS (12), beats the teacher in 2/2 seeds" for e in found)
    assert any(e.phrase == "scd_aw > cd: not measurable (row missing)" for e in found)
    assert any(e.phrase == "0 of the 5 runs put >= 95 % of their predictions on one label (the largest share of one "
                           "label in any run: 50 %)" for e in found)
    assert any(e.phrase == "the largest share of one answer in any run of the row: `teacher` 50 %, `sft` 50 %, "
                           "`kd` 50 %" for e in found)
    gate = [e for e in found if e.name == "the SFT student above the test majority rate"]
    assert {e.note for e in gate} == {"README.md", f"{N.SCD_STUDY}/README.md"}
    assert gate[0].phrase == "test majority rate 0.500; `sft` is +0.000 above it"
    comp = [e for e in found if e.name.startswith("claim scd > cd")]  # a comparison: the study's README only
    assert [e.note for e in comp] == [f"{N.SCD_STUDY}/README.md"]
    # a second task's study: the same entries, named after its task (README Status quotes both studies' claims)
    shutil.copytree(grid, tmp_path / "results" / "second")
    second = N.scd_study(tmp_path, "results/second", "rotten_tomatoes")
    assert sorted(e.name for e in second) == sorted(f"rotten_tomatoes: {e.name}" for e in found)


def test_unisd_study_verdicts_wait_for_the_whole_grid(tmp_path):
    """Nothing is quoted from the UniSD study before its grid is launched or while a run is unfinished; then
    each row (with Δ vs base), each leave-one-out cost and each claim is quoted."""
    grid = tmp_path / N.UNISD_STUDY
    assert N.unisd_study(tmp_path) == []  # not launched: no folder, no plan
    grid.mkdir(parents=True)
    plan = [("base", 0), ("+ema", 0), ("unisd_star", 0), ("unisd_star-ema", 0), ("+agreement", 0)]
    (grid / "plan.json").write_text(json.dumps({"runs": [{"run_id": f"{m}{s}"} for m, s in plan]}))
    right = {"base": 10, "+ema": 12, "unisd_star": 20, "unisd_star-ema": 10}
    for m, s in plan[:3]:
        _study_run(grid, m, s, [i < right[m] for i in range(20)])
    _study_run(grid, "+agreement", 0, [i < 1 for i in range(20)], constant=True)
    assert N.unisd_study(tmp_path) == []
    _study_run(grid, "unisd_star-ema", 0, [i < 10 for i in range(20)])
    found = N.unisd_study(tmp_path)
    assert any(e.phrase.startswith("`+ema` 0.600 (1 seed), Δ vs base +0.100 [") for e in found)
    assert any(e.phrase == "`base` 0.500 (1 seed)" for e in found)
    loo = next(e for e in found if e.name == "claim unisd_star > unisd_star-ema: Δ score")
    assert loo.value == pytest.approx(0.5) and loo.note == f"{N.UNISD_STUDY}/README.md"
    drive = [e for e in found if e.name.startswith("claim the component driving the gain")]
    assert {e.note for e in drive} == {"README.md", f"{N.UNISD_STUDY}/README.md"}
    assert drive[0].phrase.endswith("], ema (removing it from unisd_star costs the most; CI above 0)")
    const = next(e for e in found if e.name == "seed 0: constant-predictor runs")
    assert const.phrase == "seed 0: 1 constant runs (`+agreement`; y for 97.0 % of the test reviews)"
    changed = next(e for e in found if e.name == "removing ema from `unisd_star`: test predictions changed")
    assert changed.value == 10 and changed.phrase.endswith(": 10 of 20 test predictions change (per seed)")


def test_constant_share_leaves_out_running_grids(tmp_path):
    """The README's count of constant predictors covers finished studies only: a folder whose plan has an
    unfinished run is skipped, so landing a running grid's runs cannot make the committed note stale."""
    def run(folder, rid, status, constant):
        d = tmp_path / "results" / folder / rid
        d.mkdir(parents=True)
        extra = {} if constant is None else {"accuracy": {"constant": constant,
                                                          "max_label_share": 0.99 if constant else 0.6}}
        (d / "run.json").write_text(json.dumps({"run_id": rid, "status": status, "eval_info": {
            "t": {"extra": extra}}}))

    run("done", "a", "ok", True)
    run("done", "b", "ok", False)
    run("done", "c", "failed", None)
    run("busy", "d", "ok", True)
    run("busy", "e", "running", False)
    run("runs", "f", "ok", True)  # the local cache of shared runs: not committed, not counted
    for folder, ids in (("done", "abc"), ("busy", "de")):
        (tmp_path / "results" / folder / "plan.json").write_text(json.dumps({"runs": [{"run_id": i} for i in ids]}))
    (e,) = N.constant_share(tmp_path)
    assert e.value == 1 and e.phrase == "1 of the 2 scored runs of the finished studies are constant"


def test_a_stale_note_is_reported(tmp_path):
    for rel in {e.note for e in N.entries()}:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(N.REPO / rel, tmp_path / rel)
    found = N.entries()
    assert N.missing(tmp_path, found) == []
    note = tmp_path / "results/scd_baselines_cpu/README.md"
    note.write_text(note.read_text().replace("| 0.541 | 0.712 |", "| 0.541 | 0.761 |"))
    stale = N.missing(tmp_path, found)
    assert [e.name for e in stale] == ["teacher macro-F1 / label NLL, mean over 3 seeds"]


def test_auc_and_best_threshold_against_independent_references():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=300), 1)  # ties included
    y = rng.random(300) < 1 / (1 + np.exp(-2 * scores))
    assert N.auc(scores, y) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    brute = max(np.mean((scores > t) == y) for t in np.concatenate([[-np.inf], scores]))
    assert N.best_threshold_accuracy(scores, y) == pytest.approx(brute)
    # hand case: perfectly separable, and all-equal scores (only the constant rules remain)
    assert N.best_threshold_accuracy([0.1, 0.2, 0.9], [False, False, True]) == 1.0
    assert N.best_threshold_accuracy([0.5, 0.5, 0.5], [True, False, False]) == pytest.approx(2 / 3)


def test_committed_prediction_paths_exist():
    # the raw files the notes are recomputed from: every run.json points at predictions that exist
    import json

    runs = sorted((N.REPO / "results").rglob("run.json"))
    paths = [(p, i["predictions"]) for p in runs
             for i in (json.loads(p.read_text()).get("eval_info") or {}).values() if i.get("predictions")]
    assert len(paths) >= 100
    assert [(str(p), rel) for p, rel in paths if not (p.parent / rel).is_file()] == []


def _ner_run(grid, method, seed, tp):
    """A WNUT-16 study run: 20 tweets with one gold entity each, found (tp 1) on the first ``tp`` tweets."""
    d = grid / f"{method}{seed}"
    (d / "predictions").mkdir(parents=True)
    (d / "predictions" / "wnut16.jsonl").write_text("".join(
        json.dumps({"id": i, "output": "x", "prediction": [["person", "x"]], "gold": "person: x",
                    "scores": {"tp": int(i < tp), "n_pred": 1, "n_gold": 1, "parse_failed": 0.0}}) + "\n"
        for i in range(20)))
    (d / "run.json").write_text(json.dumps({
        "run_id": f"{method}{seed}", "method": method, "seed": seed, "status": "ok", "train": {"wall_s": 1.0},
        "eval": {"wnut16": {"f1_micro": {"value": tp / 20, "n": 20}}},
        "eval_info": {"wnut16": {"predictions": "predictions/wnut16.jsonl",
                                 "extra": {"f1_micro": {"constant": False, "max_label_share": 0.05}}}}}))


def test_scd_study_wnut_section_scores_entity_f1(tmp_path):
    """The second task's section: the same verdicts on entity F1 (paired by resampling per-tweet counts), quoted
    only once its plan has finished, in its own README and the README Status."""
    grid = tmp_path / N.SCD_STUDY_WNUT
    grid.mkdir(parents=True)
    plan = [("teacher", 0), ("sft", 0), ("sft", 1), ("kd", 0), ("kd", 1)]
    (grid / "plan.json").write_text(json.dumps({"runs": [{"run_id": f"{m}{s}"} for m, s in plan]}))
    for m, s in plan:
        _ner_run(grid, m, s, {"teacher": 16, "sft": 10, "kd": 20}[m])
    found = N.SECTIONS["scd_study_wnut"](tmp_path)
    kd = next(e for e in found if e.name.startswith("wnut16: claim kd > sft"))
    assert kd.value == pytest.approx(0.5) and kd.phrase.endswith("], supported")  # F1 1.0 vs 0.5 (tp 10 of 20)
    assert {e.note for e in found if e.name.startswith("wnut16: claim kd > sft")} == {"README.md",
                                                                                   f"{N.SCD_STUDY_WNUT}/README.md"}
    assert any(e.phrase == "`kd` 1.000 ± 0.000 over 2 seeds" for e in found)
    assert not any(e.name.endswith("the SFT student above the test majority rate") for e in found)  # no majority for F1


def _build(d, ck_shas, dev_scores, ce, preds, f1, student_kl=None):
    """A committed dependency-run record: a teacher (manifest, metrics, predictions) or, with ``student_kl``, a
    healed student (run.json ``student.curve``)."""
    d.mkdir(parents=True)
    if student_kl is not None:
        curve = [{"step": 10 * i, "dev_kl": v} for i, v in enumerate(student_kl)]
        (d / "run.json").write_text(json.dumps({"student": {"curve": curve, "kl_after": student_kl[-1],
                                                             "heal_wall_s": 1500.0}}))
        (d / "cut.json").write_text(json.dumps({"wall_s": 9000.0}))
        return
    (d / "manifest.json").write_text(json.dumps({"checkpoints": [{"sha256": s, "dev_score": v}
                                                                 for s, v in zip(ck_shas, dev_scores)]}))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": 10 * (i + 1), "ce": v}) + "\n"
                                             for i, v in enumerate(ce)))
    (d / "predictions").mkdir()
    (d / "predictions" / "wnut16.jsonl").write_text("".join(json.dumps({"id": i, "prediction": p}) + "\n"
                                                            for i, p in enumerate(preds)))
    (d / "run.json").write_text(json.dumps({"train": {"wall_s": 2400.0}, "eval": {"wnut16": {"f1_micro": {
        "value": f1, "ci": [f1 - .1, f1 + .1], "n": len(preds)}}}}))


def test_dependency_builds_compares_a_rebuild_with_the_first_build(tmp_path):
    first, day = tmp_path / N.studies.WNUT_DEV, tmp_path / N.studies.BUILDS / "2026-12-06"
    ent = [["person", "bob"]]
    _build(first / N.studies.WNUT_TEACHER, ["a1", "a2"], [0.2, 0.4], [2.0, 1.0], [[], ent, [], ent], 0.5)
    _build(day / N.studies.WNUT_TEACHER, ["a1", "b2"], [0.2, 0.41], [2.0, 1.001], [[], ent, ent, ent], 0.55)
    _build(first / N.studies.WNUT_STUDENT, None, None, None, None, None, student_kl=[3.0, 0.5])
    _build(day / N.studies.WNUT_STUDENT, None, None, None, None, None, student_kl=[3.0, 0.5002])
    grid = tmp_path / N.SCD_STUDY_WNUT / "r1"  # a run that predates run.json dependencies, from the first build
    grid.mkdir(parents=True)
    (grid / "run.json").write_text(json.dumps({"status": "ok", "train": {"teacher_cache": {"caches": [
        {"teacher_sha256": "a2" + "0" * 62}]}}}))
    (first / N.studies.WNUT_TEACHER / "manifest.json").write_text(json.dumps({"checkpoints": [
        {"sha256": "a1", "dev_score": 0.2}, {"sha256": "a2" + "0" * 62, "dev_score": 0.4}]}))
    by = {e.name: e for e in N.studies.dependency_builds(tmp_path)}
    same = by["2026-12-06: teacher checkpoints with the first build's sha256"]  # a1 == a1, "a2..." != b2
    assert same.value == 1 and "1 of 2 teacher checkpoints bit-identical" in same.phrase
    assert by["2026-12-06: teacher training CE, largest relative gap between builds"].value == pytest.approx(1e-3)
    f1 = by["2026-12-06: teacher test F1, first / rebuilt"]
    assert f1.value == pytest.approx(0.05) and "1 of 4 test predictions differ" in f1.phrase
    kl = by["2026-12-06: student healed dev KL, first / rebuilt"]
    assert kl.value == 0.5002 and "largest gap along the 2-point curve 2.0e-04" in kl.phrase
    assert by["the unrecorded WNUT runs' teacher = the first build"].value == 1.0
    assert by["2026-12-06: rebuild wall time"].phrase == ("the teacher (40 min of training here) and the healed "
                                                          "student, whose greedy layer search alone took 2.5 h the "
                                                          "first time")
    assert by["2026-12-06: healing wall time"].phrase == "only the healing (25 min here) runs again"


def test_fill_writes_each_placeholder_as_its_phrase(tmp_path, capsys):
    """--fill: {{name}} -> the entry's phrase (this note's entry first, then any note's); an unknown name is an
    error naming the line with close names, and the note is left as it was."""
    (tmp_path / "results").mkdir()
    note = tmp_path / "results" / "n.md"
    found = [N.Entry("results/n.md", "acc", 0.5, "accuracy 0.500"), N.Entry("other.md", "acc", 0.6, "accuracy 0.600"),
             N.Entry("other.md", "f1", 0.3, "F1 0.300")]
    note.write_text("Rows: {{acc}}; also {{f1}}. Write `{{entry name}}` to quote one.\n")
    assert N.fill(note, found, tmp_path) == 2
    assert note.read_text() == "Rows: accuracy 0.500; also F1 0.300. Write `{{entry name}}` to quote one.\n"
    note.write_text("ok\nRows: {{acc}} and {{accuracy}}\n")
    with pytest.raises(ValueError, match=r"n.md:2: no entry named 'accuracy' \(did you mean 'acc'\?\)"):
        N.fill(note, found, tmp_path)
    assert note.read_text() == "ok\nRows: {{acc}} and {{accuracy}}\n"
    note.write_text("{{zzz qqq}}\n")  # the command line, on this checkout's entries
    assert N.main(["--fill", str(note)]) == 2
    assert "n.md:1: no entry named 'zzz qqq' (a study's entries appear once its grid has finished)" in \
        capsys.readouterr().err
