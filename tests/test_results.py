import dataclasses
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from scd.core import results
from scd.core.config import load_config, to_dict
from scd.core.results import (DivergedError, MetricsWriter, ResultsError, RunDir, atomic_write_json, code_state,
                              config_hash, default_run_dir, failure_stub, git_sha, new_run_record, read_metrics,
                              run_id, safe_join, validate_run_record)
from tests._gitrepo import git, make_dirty, make_repo


def test_atomic_write_leaves_no_temp_and_replaces(tmp_path):
    p = tmp_path / "a" / "run.json"
    atomic_write_json(p, {"x": 1})
    atomic_write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2}
    assert [f.name for f in p.parent.iterdir()] == ["run.json"]


def test_atomic_write_permission_denied_is_clear(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(ResultsError, match="cannot write"):
            atomic_write_json(d / "run.json", {"x": 1})
    finally:
        d.chmod(0o700)


def test_metrics_torn_tail_is_ignored_and_truncated(tmp_path):
    p = tmp_path / "metrics.jsonl"
    w = MetricsWriter(p)
    w.log({"step": 1, "loss": 2.0})
    with open(p, "a") as f:
        f.write('{"step": 2, "lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(p)] == [1]
    MetricsWriter(p).log({"step": 2, "loss": 1.0})
    assert [r["step"] for r in read_metrics(p)] == [1, 2]


def test_metrics_drop_after_for_resume(tmp_path):
    w = MetricsWriter(tmp_path / "m.jsonl")
    for s in range(1, 6):
        w.log({"step": s})
    w.drop_after(3)
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [1, 2, 3]


def test_config_hash_is_order_independent():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_run_record_validates_and_rejects_bad():
    rec = new_run_record(run_id="x", grid=None, method="m", seed=0, recipe="sft", config={})
    validate_run_record(rec)
    rec["eval"] = {"t": {"acc": 0.5}}
    with pytest.raises(ValueError, match="eval.t.acc"):
        validate_run_record(rec)
    rec2 = dict(rec, eval={}, status="weird")
    with pytest.raises(ValueError, match="status"):
        validate_run_record(rec2)


def test_safe_join_refuses_escape(tmp_path):
    assert safe_join(tmp_path, "a", "b") == (tmp_path / "a" / "b").resolve()
    with pytest.raises(ResultsError, match="escapes"):
        safe_join(tmp_path, "..", "etc")
    with pytest.raises(ResultsError, match="escapes"):
        safe_join(tmp_path, "/etc/passwd")


# ------------------------------------------------------------------------ run ids + run life cycle
@dataclasses.dataclass(frozen=True)
class _Cfg:
    recipe: str = "sft"
    method: str = "kd"
    seed: int = 0
    grid: str | None = None
    lr: float = 1e-3


def test_run_id_is_the_config_hash_without_grid():
    resolved = {"recipe": "sft", "method": "kd", "seed": 0, "grid": "g1", "lr": 0.001}
    canon = json.dumps({k: v for k, v in resolved.items() if k != "grid"}, sort_keys=True, separators=(",", ":"))
    assert run_id(resolved) == hashlib.sha256(canon.encode()).hexdigest()[:12]
    assert run_id(resolved) == run_id({**resolved, "grid": "other"}) == run_id({**resolved, "grid": None})
    assert run_id(resolved) != run_id({**resolved, "seed": 1})
    cfg = _Cfg(grid="g1")
    assert default_run_dir(cfg, "res") == Path("res") / "g1" / f"kd-{run_id(dataclasses.asdict(cfg))}"


def test_run_dir_life_cycle(tmp_path):
    cfg = _Cfg(grid="g")
    rd = RunDir(tmp_path / "run").start(cfg, recipe="sft", hparams={"lr": 1e-3})
    rec = rd.read()
    assert rec["status"] == "running" and rec["run_id"] == run_id(dataclasses.asdict(cfg))
    assert rec["hparams"] == {"lr": 1e-3} and rec["started"] and rec["grid"] == "g"
    assert (rd.path / "config.yaml").read_text().startswith("recipe: sft\nmethod: kd\n")
    validate_run_record(rec)
    # a failure keeps the record and adds the error; a resumed start clears it but keeps the record
    assert rd.fail(DivergedError(step=3, term="kd", value=float("nan"))) is True
    rec = rd.read()
    assert rec["status"] == "diverged" and rec["diverged_at"] == {"step": 3, "term": "kd", "value": "nan"}
    assert rec["error"] == "DivergedError: loss term 'kd' is nan at step 3" and "DivergedError" in rec["traceback_tail"]
    rd.update(train={"partial": 1})
    RunDir(rd.path).start(cfg, recipe="sft")
    rec = rd.read()
    assert rec["status"] == "running" and rec["error"] is None and rec["train"] == {"partial": 1}
    assert "diverged_at" not in rec and "traceback_tail" not in rec and rec["hparams"] == {"lr": 1e-3}
    out = rd.finish(train={"tokens": 10}, eval={"qa": {"f1": {"value": 0.5, "n": 2, "ci": None}}})
    assert out == rd.read() and out["status"] == "ok" and out["finished"] and out["train"] == {"tokens": 10}
    merged = rd.merge({"eval": {"ner": {"f1": {"value": 0.25, "n": 2, "ci": None}}}, "cka": {"a": {"x": 1}}})
    assert sorted(merged["eval"]) == ["ner", "qa"] and rd.read()["cka"] == {"a": {"x": 1}}


def test_failure_before_start_and_grid_failure_records(tmp_path):
    rd = RunDir(tmp_path / "abc123")
    assert rd.fail(RuntimeError("no data")) is True  # nothing written yet: a stub named after the folder
    rec = validate_run_record(rd.read())
    assert (rec["run_id"], rec["method"], rec["status"], rec["error"]) == ("abc123", "?", "failed",
                                                                          "RuntimeError: no data")
    assert rec["started"] is None
    # the recipe then starts for real: a stub is replaced by a full record (hparams kept)
    RunDir(rd.path).start(_Cfg(), recipe="sft", hparams={"lr": 2})
    rec = rd.read()
    assert rec["method"] == "kd" and rec["hparams"] == {"lr": 2} and rec["run_id"] == run_id(dataclasses.asdict(_Cfg()))
    # the grid, seeing the child die: mark failed, then reset before a retry
    rd.mark_failed("exit code 3", log_tail="tail", exit_code=3)
    rec = rd.read()
    assert (rec["status"], rec["error"], rec["exit_code"], rec["log_tail"]) == ("failed", "exit code 3", 3, "tail")
    assert rec["hparams"] == {"lr": 2}  # the child's record is kept
    rd.reset_failed()
    rec = rd.read()
    assert rec["status"] == "running" and rec["error"] is None and "exit_code" not in rec and "log_tail" not in rec
    other = RunDir(tmp_path / "gone")
    other.mark_failed("exit code -9", stub=failure_stub("gone", grid="g", method="kd", seed=4, config={"a": 1}))
    rec = validate_run_record(other.read())
    assert (rec["method"], rec["seed"], rec["grid"], rec["config"], rec["status"]) == ("kd", 4, "g", {"a": 1}, "failed")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "run.json").mkdir()  # cannot be written: fail reports it, never raises
    assert RunDir(tmp_path / "ro").fail(RuntimeError("x")) is False


# --------------------------------------------------------------------------- code state (code.patch)
def test_dirty_tree_run_keeps_code_patch(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    head = make_repo(repo)
    code_files = make_dirty(repo)
    monkeypatch.setattr(results, "CODE_ROOT", repo)
    state = code_state()
    assert state.sha == head and state.label == head + "-dirty" and list(state.files) == code_files
    rd = RunDir(tmp_path / "run").start(_Cfg(), recipe="sft")
    patch = (rd.path / "code.patch").read_bytes()
    rec = rd.read()
    assert rec["git_sha"] == head + "-dirty"
    assert rec["code_patch_sha256"] == hashlib.sha256(patch).hexdigest()
    text = patch.decode()
    assert "diff --git a/scd/mod.py b/scd/mod.py" in text and "-B = 2\n+B = 3\n" in text
    assert "diff --git a/scd/new.py b/scd/new.py\nnew file mode 100644" in text and "+NEW = True\n" in text
    assert "results/" not in text and "notes.txt" not in text and "junk.pyc" not in text
    # the patch on a clean checkout of HEAD reproduces the code that ran
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    git(clone, "apply", str(rd.path / "code.patch"))
    for f in code_files:
        assert (clone / f).read_bytes() == (repo / f).read_bytes()
    assert not [p.name for p in rd.path.iterdir() if p.name.endswith(".tmp")]  # written atomically
    # committed: a resumed start records the clean state and drops the stale patch
    git(repo, "add", "scd")
    git(repo, "commit", "-q", "-m", "code")
    head2 = git(repo, "rev-parse", "HEAD").strip()
    RunDir(rd.path).start(_Cfg(), recipe="sft")
    rec = rd.read()
    assert rec["git_sha"] == head2 and rec["code_patch_sha256"] is None and not (rd.path / "code.patch").exists()
    assert code_state().files == () and git_sha() == head2  # results/ and notes.txt do not count as code


def test_code_state_outside_a_checkout_is_none(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "CODE_ROOT", tmp_path)
    assert code_state() is None and git_sha() is None
    rec = RunDir(tmp_path / "run").start(_Cfg(), recipe="sft").read()
    assert rec["git_sha"] is None and rec["code_patch_sha256"] is None


# folders committed before config fields were added as `added_field`s: their configs re-resolve to other ids (the
# grids are finished smoke studies and are never re-planned); every other committed run must keep its id
LEGACY_RUN_ID_FOLDERS = ("results/unisd_ablation_cpu/", "results/unisd_long_cpu/")


def test_committed_runs_keep_their_run_ids():
    """Every committed run directory's config.yaml re-resolves to its run.json run_id with the current code, so a
    config field added without :func:`scd.core.config.added_field` fails here -- including the standalone
    dependency runs (teachers, students, SFT anchors) that no grid plan covers."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(["git", "ls-files", "results/*config.yaml"], cwd=root, capture_output=True, text=True)
    files = [f for f in out.stdout.split() if f.endswith("/config.yaml") and not f.startswith(LEGACY_RUN_ID_FOLDERS)]
    checked = 0
    for f in files:
        rec = root / Path(f).parent / "run.json"
        if not rec.exists():
            continue
        want = json.loads(rec.read_text(encoding="utf-8"))["run_id"]
        assert run_id(to_dict(load_config(root / f))) == want, f"{f}: its config now resolves to another run id"
        checked += 1
    assert checked > 100
