"""SFT recipe end to end (tiny model, real rotten_tomatoes data): CLI, skip-if-finished,
exact resume after SIGKILL, accumulation equivalence, divergence handling."""
import json

import pytest
import torch
from safetensors.torch import load_file

from scd.cli import main as cli_main
from scd.core.results import read_metrics
from tests.conftest import TINY_SHAPE, run_config, shipped_yaml, strip_time


def write_cfg(tmp_path, steps=6, bs=4, accum=1, name="c.yaml"):
    """configs/scd/sft_tiny.yaml on the tests' tiny shape, 40 examples, no evaluation."""
    return shipped_yaml(tmp_path, "configs/scd/sft_tiny.yaml", {
        "method": "sft-test", "seed": 3, "model.tiny": TINY_SHAPE, "data.limit_per_task": 40,
        "train.max_steps": steps, "train.batch_size": bs, "train.grad_accum": accum, "train.max_len": 96,
        "train.save_every": 3, "train.log_every": 1, "eval.tasks": []}, name=name)


def test_cli_run_writes_results_and_skips_when_finished(tmp_path, capsys):
    cfg = write_cfg(tmp_path, steps=2)
    rd = tmp_path / "run"
    assert cli_main(["run", str(cfg), "--run-dir", str(rd)]) == 0
    rec = json.loads((rd / "run.json").read_text())
    assert rec["status"] == "ok" and rec["method"] == "sft-test" and rec["seed"] == 3
    assert rec["train"]["steps"] == 2 and rec["train"]["tokens"] > 0
    assert (rd / "model" / "model.safetensors").exists() and (rd / "config.yaml").exists()
    assert [r["step"] for r in read_metrics(rd / "metrics.jsonl")] == [1, 2]
    mtime = (rd / "run.json").stat().st_mtime_ns
    assert cli_main(["run", str(cfg), "--run-dir", str(rd)]) == 0
    assert "already finished" in capsys.readouterr().out
    assert (rd / "run.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("fault", ["step:4", "ckpt_write:2"])
def test_resume_after_sigkill_equals_uninterrupted(tmp_path, fault):
    cfg = write_cfg(tmp_path, steps=7)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert run_config(cfg, ref, timeout=300).returncode == 0
    p = run_config(cfg, killed, fault=fault, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    assert json.loads((killed / "run.json").read_text())["status"] == "running"
    p = run_config(cfg, killed, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed at step" in p.stdout + p.stderr
    a = load_file(str(ref / "model" / "model.safetensors"))
    b = load_file(str(killed / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert strip_time(read_metrics(ref / "metrics.jsonl")) == strip_time(read_metrics(killed / "metrics.jsonl"))


def test_batch8_accum1_equals_batch4_accum2(tmp_path):
    from scd.core.config import load_config
    from scd.sft import run

    params = []
    for bs, accum in [(8, 1), (4, 2)]:
        cfg = load_config(write_cfg(tmp_path, steps=1, bs=bs, accum=accum, name=f"c{bs}.yaml"))
        run(cfg, tmp_path / f"r{bs}")
        params.append(load_file(str(tmp_path / f"r{bs}" / "model" / "model.safetensors")))
    for k in params[0]:
        torch.testing.assert_close(params[0][k], params[1][k], rtol=1e-5, atol=1e-6)


def test_nan_loss_marks_run_diverged(tmp_path, monkeypatch, capsys):
    import scd.sft as sft

    real = sft.sft_loss_sum
    calls = {"n": 0}

    def poisoned(model, batch, **kw):
        calls["n"] += 1
        loss, n = real(model, batch, **kw)
        return (loss * float("nan") if calls["n"] == 2 else loss), n

    monkeypatch.setattr(sft, "sft_loss_sum", poisoned)
    rd = tmp_path / "run"
    assert cli_main(["run", str(write_cfg(tmp_path, steps=4)), "--run-dir", str(rd)]) == 1
    rec = json.loads((rd / "run.json").read_text())
    assert rec["status"] == "diverged"
    assert rec["diverged_at"]["step"] == 2 and rec["diverged_at"]["term"] == "ce"
    assert "run diverged" in capsys.readouterr().err
