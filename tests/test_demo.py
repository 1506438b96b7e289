"""``make demo`` (benchmarks.demo): reading demo runs, the reference file, the tolerance checks, the
side-by-side table, and (slow) the whole pipeline at a tiny size."""
import json
from pathlib import Path

import pytest
import yaml

from benchmarks import demo

ROOT = Path(__file__).resolve().parents[1]


def _run_json(gdir: Path, run_id: str, method: str, *, acc: float, ci, majority: float, share: float,
              label: str = "fresh", started="2026-12-01T10:00:00+0000", finished="2026-12-01T10:01:40+0000",
              manifest: str | None = None, status: str = "ok") -> None:
    d = gdir / run_id
    d.mkdir(parents=True)
    rec = {"run_id": run_id, "method": method, "status": status, "started": started, "finished": finished,
           "git_sha": "abc123", "artifacts": {"teacher_manifest": manifest} if manifest else {},
           "eval": {"rotten_tomatoes": {"accuracy": {"value": acc, "n": 200, "ci": list(ci)}}},
           "eval_info": {"rotten_tomatoes": {"extra": {"accuracy": {
               "majority_baseline": majority, "max_label_share": share, "most_predicted": label,
               "constant": share >= 0.95}}}}}
    (d / "run.json").write_text(json.dumps(rec))


def _grid(tmp_path: Path, *, kd_share: float = 0.7, sft_share: float = 0.97, teacher_ci=(0.74, 0.85)) -> Path:
    gdir = tmp_path / "demo"
    teacher_run = gdir / "runs" / "demo-teacher-x"
    (teacher_run / "checkpoints").mkdir(parents=True)
    (teacher_run / "run.json").write_text(json.dumps({"method": "demo-teacher", "run_id": "x", "status": "ok",
                                                      "started": "2026-12-01T09:58:00+0000",
                                                      "finished": "2026-12-01T10:00:00+0000"}))
    manifest = str(teacher_run / "checkpoints" / "manifest.json")
    # the teacher row trained the teacher on demand: its wall time includes the teacher's 120 s
    _run_json(gdir, "t1", "teacher", acc=0.8, ci=teacher_ci, majority=0.55, share=0.6,
              started="2026-12-01T09:57:50+0000", finished="2026-12-01T10:00:30+0000", manifest=manifest)
    _run_json(gdir, "s1", "sft", acc=0.56, ci=(0.49, 0.63), majority=0.55, share=sft_share)
    _run_json(gdir, "k1", "kd", acc=0.7, ci=(0.64, 0.76), majority=0.55, share=kd_share, manifest=manifest)
    (gdir / "plan.json").write_text(json.dumps({"grid": "demo", "runs": [
        {"run_id": "t1", "method": "teacher"}, {"run_id": "s1", "method": "sft"}, {"run_id": "k1", "method": "kd"}]}))
    return gdir


def test_read_rows_and_reference(tmp_path):
    gdir = _grid(tmp_path)
    rows = demo.read_rows(gdir)
    assert [r.method for r in rows] == ["teacher", "sft", "kd"]
    sft = rows[1]
    assert (sft.value, sft.ci, sft.n, sft.majority, sft.max_label_share) == (0.56, (0.49, 0.63), 200, 0.55, 0.97)
    assert sft.constant and not rows[2].constant and rows[2].wall_s == 100.0
    ref = demo.make_reference(rows, grid="demo", git_sha="abc123")
    # tolerance = half-width of each row's own 95% CI
    assert ref["rows"]["teacher"]["tolerance"] == pytest.approx(0.055)
    assert ref["rows"]["sft"]["tolerance"] == pytest.approx(0.07)
    assert ref["rows"]["kd"]["tolerance"] == pytest.approx(0.06)
    assert ref["rows"]["kd"]["value"] == 0.7 and ref["git_sha"] == "abc123"


def test_reference_refuses_unfinished_runs(tmp_path):
    gdir = _grid(tmp_path)
    rows = demo.read_rows(gdir)
    rows[2] = demo.Row(method="kd", run_id="k1", status="failed")
    with pytest.raises(ValueError, match="kd"):
        demo.make_reference(rows, grid="demo", git_sha=None)


def test_checks_pass_and_fail(tmp_path):
    rows = demo.read_rows(_grid(tmp_path))
    ref = demo.make_reference(rows, grid="demo", git_sha="abc123")
    assert all(c.ok for c in demo.checks(rows, ref))
    # one row moves by more than its tolerance (0.06): that row fails, the others still pass
    moved = [r if r.method != "kd" else demo.Row(**{**r.__dict__, "value": 0.7 - 0.061}) for r in rows]
    res = {c.name: c.ok for c in demo.checks(moved, ref)}
    assert res == {"teacher vs reference": True, "sft vs reference": True, "kd vs reference": False,
                   "teacher beats chance": True, "a student is not constant": True}
    inside = [r if r.method != "kd" else demo.Row(**{**r.__dict__, "value": 0.7 - 0.059}) for r in rows]
    assert all(c.ok for c in demo.checks(inside, ref))


def test_checks_teacher_at_chance_and_constant_students(tmp_path):
    rows = demo.read_rows(_grid(tmp_path / "a", kd_share=0.96, teacher_ci=(0.54, 0.7)))
    ref = demo.make_reference(rows, grid="demo", git_sha=None)
    res = {c.name: c for c in demo.checks(rows, ref)}
    assert not res["teacher beats chance"].ok  # CI low 0.54 <= majority 0.55
    assert not res["a student is not constant"].ok  # sft 97%, kd 96% on one label
    assert "none" in res["a student is not constant"].detail
    # a student missing from the demo fails its reference row
    res = {c.name: c.ok for c in demo.checks(rows[:2], ref)}
    assert res["kd vs reference"] is False


def test_render_side_by_side(tmp_path):
    rows = demo.read_rows(_grid(tmp_path))
    ref = demo.make_reference(rows, grid="demo", git_sha="abc123")
    text = demo.render(rows, ref, demo.checks(rows, ref))
    lines = text.splitlines()
    kd = next(line for line in lines if line.startswith("| kd |"))
    assert kd == "| kd | 0.700 [0.640, 0.760] | 0.550 | 70% 'fresh' | 0.700 [0.640, 0.760] | ± 0.060 | PASS |"
    sft = next(line for line in lines if line.startswith("| sft |"))
    assert "97% 'fresh' ⚠ constant" in sft
    assert "PASS  teacher beats chance: 95% CI low 0.740 vs majority rate 0.550" in lines


def test_phase_timing_subtracts_the_teacher(tmp_path):
    gdir = _grid(tmp_path)
    rows = demo.read_rows(gdir)
    deps = demo.dependency_runs(gdir)
    assert deps == [gdir / "runs" / "demo-teacher-x" / "run.json"]
    t = demo.phase_timing(rows, deps, total_s=500.0)
    assert t["cpu_s"] is None
    assert t["phases"] == {"train demo-teacher": 120.0, "run teacher": 40.0, "run sft": 100.0, "run kd": 100.0,
                           "other (start-up, leaderboard)": 140.0}
    assert "Wall time: 500 s in all (train demo-teacher 120 s;" in demo.render_timing(t)


def test_leaderboard_table_is_the_first_table():
    md = "# L\n\ntext\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n## Other\n\n| c |\n|---|\n"
    assert demo.leaderboard_table(md) == "| a | b |\n|---|---|\n| 1 | 2 |"


def test_fresh_output_deletes_only_grid_outputs(tmp_path):
    gdir = _grid(tmp_path)
    demo.fresh_output(gdir)
    assert not gdir.exists()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "x.txt").write_text("keep")
    with pytest.raises(SystemExit, match="not a grid output"):
        demo.fresh_output(other)
    ref = _grid(tmp_path / "ref")
    with pytest.raises(SystemExit, match="committed reference"):
        demo.fresh_output(ref, protect=[ref])
    assert (other / "x.txt").exists() and (ref / "plan.json").exists()


def test_reference_command_writes_file(tmp_path, capsys):
    gdir = _grid(tmp_path)
    (gdir / "timing.json").write_text(json.dumps({"total_s": 321.0, "phases": {}}))
    assert demo.main(["reference", str(gdir), "--out", str(tmp_path / "ref.json")]) == 0
    ref = json.loads((tmp_path / "ref.json").read_text())
    assert ref["timing"]["total_s"] == 321.0 and set(ref["rows"]) == {"teacher", "sft", "kd"}


def test_committed_reference_matches_its_runs():
    """results/demo/reference.json is what `python -m benchmarks.demo reference results/demo` makes from the
    committed run.json files, and the committed reference passes its own checks."""
    gdir = ROOT / "results" / "demo"
    ref = json.loads((gdir / "reference.json").read_text())
    rows = demo.read_rows(gdir)
    timing = json.loads((gdir / "timing.json").read_text())
    assert ref == demo.make_reference(rows, grid="demo", git_sha=ref["git_sha"], timing=timing)
    assert not ref["git_sha"].endswith("-dirty")
    assert all(c.ok for c in demo.checks(rows, ref))


# ------------------------------------------------------------------------------ end to end (tiny)
def _tiny_configs(tmp_path: Path) -> Path:
    """The demo grid with tiny random-init models (same recipe, rows, label words, scoring)."""
    tiny = {"name": "tiny", "tokenizer": "smollm2-135m",
            "tiny": {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64,
                     "num_attention_heads": 4, "num_key_value_heads": 2}}
    teacher = yaml.safe_load((ROOT / "configs/scd/demo_teacher.yaml").read_text())
    teacher["model"] = {**tiny, "lora": None}
    teacher["data"]["limit_per_task"] = 16
    teacher["train"].update(max_steps=2, batch_size=4, max_len=96)
    teacher["dev"]["limit_per_task"] = 4
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(teacher))
    student = yaml.safe_load((ROOT / "configs/scd/demo_student.yaml").read_text())
    student["model"] = {**tiny, "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}}
    student["teacher"] = {"config": str(tmp_path / "teacher.yaml"), "results_dir": str(tmp_path / "out" / "demo")}
    student["data"]["limit_per_task"] = 16
    student["train"].update(max_steps=2, batch_size=4, max_len=96)
    student["eval"].update(limit=12)
    (tmp_path / "student.yaml").write_text(yaml.safe_dump(student))
    grid = yaml.safe_load((ROOT / "configs/grids/demo.yaml").read_text())
    grid["base"] = str(tmp_path / "student.yaml")
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    return tmp_path / "grid.yaml"


@pytest.mark.slow
def test_demo_pipeline_end_to_end_tiny(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    grid = _tiny_configs(tmp_path)
    out, ref = tmp_path / "out", tmp_path / "ref"
    ref.mkdir()
    (ref / "reference.json").write_text(json.dumps({"rows": {}, "git_sha": None}))
    args = ["--grid", str(grid), "--results-dir", str(out), "--reference", str(ref / "reference.json")]
    code = demo.main(args)
    gdir = out / "demo"
    rows = demo.read_rows(gdir)
    assert [(r.method, r.status, r.n) for r in rows] == [("teacher", "ok", 12), ("sft", "ok", 12), ("kd", "ok", 12)]
    teacher_runs = list((gdir / "runs").glob("demo-teacher-*/run.json"))
    assert len(teacher_runs) == 1  # trained on demand, inside the demo folder
    timing = json.loads((gdir / "timing.json").read_text())
    assert set(timing["phases"]) >= {"train demo-teacher", "run teacher", "run sft", "run kd"}
    printed = capsys.readouterr().out
    assert "== Demo leaderboard" in printed and "| rank | method |" in printed
    assert code == (0 if "[demo] PASS" in printed else 1)
    # a reference made from this run; the next call starts from an empty folder and matches it
    assert demo.main(["reference", str(gdir), "--out", str(ref / "reference.json")]) == 0
    (gdir / "marker").write_text("old output")
    code2 = demo.main(args)
    printed = capsys.readouterr().out
    assert not (gdir / "marker").exists()  # the previous output was deleted: everything trained again
    assert len(list((gdir / "runs").glob("demo-teacher-*/run.json"))) == 1
    for method in ("teacher", "sft", "kd"):
        assert f"PASS  {method} vs reference" in printed  # same seed, same machine: within tolerance
    assert code2 == (0 if "[demo] PASS" in printed else 1)


# ------------------------------------------------------------------------------ training label words
def test_training_label_words_match_scoring(smol_tokenizer):
    """data.prompts: the demo trains on the words (and instruction) it is scored on; single-token words."""
    from benchmarks.evaluate import EvalSpec
    from scd.core.config import to_dict
    from scd.data.load import load_split
    from scd.data.prompts import render_prompt
    from scd.data_config import DataConfig, load_training_pairs
    from scd.data.label_words import LabelWords, verbalize

    assert EvalSpec.__dataclass_fields__["prompts"].type in ("dict[str, LabelWords]", dict[str, LabelWords])  # one class for training and scoring
    student = yaml.safe_load((ROOT / "configs/scd/demo_student.yaml").read_text())
    spec = student["data"]["prompts"]["rotten_tomatoes"]
    assert student["eval"]["prompts"]["rotten_tomatoes"] == spec
    lw = LabelWords(**spec)
    for word in lw.label_words.values():
        assert len(smol_tokenizer(word, add_special_tokens=False)["input_ids"]) == 1
    cfg = DataConfig(tasks=("rotten_tomatoes",), limit_per_task=6, prompts={"rotten_tomatoes": lw})
    rows = load_split("rotten_tomatoes", "train", limit=6)
    pairs = load_training_pairs(cfg, smol_tokenizer)
    for row, (prompt, target) in zip(rows, pairs):
        word = {"fresh": "positive", "rotten": "negative"}[row["label"]]
        assert target.startswith(word) and row["input"] in prompt
        assert prompt == render_prompt(verbalize(row, lw), smol_tokenizer)  # what the scorer renders
        assert "Answer with exactly one of: positive, negative." in prompt and "fresh" not in target
    assert "prompts" not in to_dict(DataConfig())  # run ids of configs without it do not change
    with pytest.raises(ValueError, match="not among data.tasks"):
        DataConfig(tasks=("rotten_tomatoes",), prompts={"multiemo_en": lw})
