"""Disk full (ENOSPC) / permission denied (EACCES) on the results directory.

The tests run as root, where chmod does not block writes, so the failures are injected
by monkeypatching ``os.replace`` / ``os.fsync`` / ``tempfile.mkstemp`` / ``open``.
Guarantees checked: a clear one-line error (exit code != 0, no traceback), the previous
run.json byte-for-byte intact (never truncated or half-written), no temp file left by
the failed write.
"""
from __future__ import annotations

import builtins
import errno
import json
import os
import tempfile
from pathlib import Path

import pytest

import scd.core.results as R
from scd.cli import main as cli_main
from tests.reliability._helpers import SHAPE

SFT = f"""\
recipe: sft
method: sft-disk
model: {{name: tiny, tiny: {SHAPE}}}
data: {{tasks: [rotten_tomatoes], limit_per_task: 4}}
train: {{max_steps: 2, batch_size: 2, max_len: 64, save_every: 1, log_every: 1}}
eval: {{tasks: []}}
"""

ERRS = {"ENOSPC": (errno.ENOSPC, "No space left on device"), "EACCES": (errno.EACCES, "Permission denied")}


def raiser(code: int):
    def f(*a, **k):
        raise OSError(code, os.strerror(code))
    return f


def temps(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob("*") if ".tmp" in p.name)


# --------------------------------------------------------------------- atomic_write_bytes
@pytest.mark.parametrize("err", ERRS)
@pytest.mark.parametrize("where", ["os.replace", "os.fsync", "mkstemp", "write"])
def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path, monkeypatch, err, where):
    code, text = ERRS[err]
    target = tmp_path / "run.json"
    R.atomic_write_json(target, {"status": "ok", "n": 1})
    before = target.read_bytes()
    if where == "os.replace":
        monkeypatch.setattr(os, "replace", raiser(code))
    elif where == "os.fsync":
        monkeypatch.setattr(os, "fsync", raiser(code))
    elif where == "mkstemp":
        monkeypatch.setattr(tempfile, "mkstemp", raiser(code))
    else:  # the data write itself (disk fills while writing)
        real_fdopen = os.fdopen

        class Full:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *a):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(R.ResultsError) as ei:
        R.atomic_write_json(target, {"status": "running", "n": 2})
    assert str(ei.value) == f"cannot write {target}: {text}" and ei.value.errno == code
    assert ei.value.errno == code
    monkeypatch.undo()
    assert target.read_bytes() == before  # the old run.json, whole
    assert temps(tmp_path) == []


def test_metrics_append_failure_is_a_results_error(tmp_path, monkeypatch):
    w = R.MetricsWriter(tmp_path / "metrics.jsonl")
    w.log({"step": 1})
    real_open = builtins.open

    def full_open(path, mode="r", *a, **k):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(R.ResultsError, match=r"cannot append to .*metrics.jsonl: No space left on device"):
        w.log({"step": 2})
    monkeypatch.undo()
    assert [r["step"] for r in R.read_metrics(tmp_path / "metrics.jsonl")] == [1]


# ------------------------------------------------------------------------------- the CLI
def _last_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    return [ln for ln in err.strip().splitlines() if ln.strip()][-1]


@pytest.fixture()
def finished_run(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(SFT)
    rd = tmp_path / "run"
    assert cli_main(["run", str(cfg), "--run-dir", str(rd)]) == 0
    return cfg, rd


@pytest.mark.parametrize("err", ERRS)
def test_rerun_on_full_disk_keeps_the_finished_run_json(finished_run, monkeypatch, capsys, err):
    """--force on a full disk: the first write (run.json, status running) fails."""
    code, text = ERRS[err]
    cfg, rd = finished_run
    before = (rd / "run.json").read_bytes()
    capsys.readouterr()
    monkeypatch.setattr(os, "fsync", raiser(code))
    rc = cli_main(["run", str(cfg), "--run-dir", str(rd), "--force"])
    monkeypatch.undo()
    msg = _last_line(capsys.readouterr().err)
    print(f"MESSAGE rc={rc} {msg}")
    assert rc != 0
    assert f"cannot write {rd}/" in msg and text in msg, msg
    assert (rd / "run.json").read_bytes() == before
    assert json.loads(before)["status"] == "ok"
    assert temps(rd) == []


def test_disk_full_mid_run_one_line_and_run_json_parses(tmp_path, monkeypatch, capsys):
    """The disk fills after the run started: checkpoint / run.json writes fail."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(SFT)
    rd = tmp_path / "run"
    real_replace = os.replace
    calls = {"n": 0}

    def replace(src, dst, *a, **k):
        if calls["n"]:  # everything up to the first run.json (code.patch of a dirty tree, config.yaml) got through
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        calls["n"] += Path(dst).name == "run.json"
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    rc = cli_main(["run", str(cfg), "--run-dir", str(rd)])
    monkeypatch.undo()
    msg = _last_line(capsys.readouterr().err)
    print(f"MESSAGE rc={rc} {msg}")
    assert rc == 1 and msg.startswith("error: run ") and "ResultsError: cannot write" in msg, msg
    assert "No space left on device" in msg
    rec = json.loads((rd / "run.json").read_text())  # whole: the status-running record
    assert rec["status"] == "running" and rec["method"] == "sft-disk"
    # space again: the same command resumes / reruns and finishes
    assert cli_main(["run", str(cfg), "--run-dir", str(rd)]) == 0
    assert json.loads((rd / "run.json").read_text())["status"] == "ok"


def test_results_dir_not_writable(tmp_path, monkeypatch, capsys):
    """Permission denied on a fresh results directory: nothing is written, one line."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(SFT)
    rd = tmp_path / "run"
    monkeypatch.setattr(tempfile, "mkstemp", raiser(errno.EACCES))
    rc = cli_main(["run", str(cfg), "--run-dir", str(rd)])
    monkeypatch.undo()
    msg = _last_line(capsys.readouterr().err)
    print(f"MESSAGE rc={rc} {msg}")
    assert rc != 0 and f"cannot write {rd}/" in msg and "Permission denied" in msg, msg
    assert not (rd / "run.json").exists()


def test_failed_write_is_reported_as_failed(finished_run, monkeypatch, capsys):
    cfg, rd = finished_run
    capsys.readouterr()
    monkeypatch.setattr(os, "fsync", raiser(errno.ENOSPC))
    rc = cli_main(["run", str(cfg), "--run-dir", str(rd), "--force"])
    monkeypatch.undo()
    msg = _last_line(capsys.readouterr().err)
    assert rc == 1 and msg.startswith("error: run failed: ResultsError"), msg
