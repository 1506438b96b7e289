"""CUDA checks (``pytest -m gpu``; skipped without a CUDA device).

What they prove, on one GPU with a tiny 2-layer student distilled from a tiny teacher
through the real CLI (``python -m scd run``):

* bf16 autocast (``train.bf16: true``) computes the same training step as float32 within
  the tolerance below, and it is really active (the losses are not bit-identical);
* DeepSpeed on a single GPU (each of configs/deepspeed/*.json, one process, no launcher)
  trains: the run finishes ok, the student's weights move, and its per-step losses,
  gradient norms and final weights equal the plain PyTorch path in float32.

Tolerances (stated, not tuned to pass): bf16 keeps 8 mantissa bits (relative rounding
2^-9 = 0.2% per value); the losses are means over ~100 tokens of log-softmax terms of a
49k vocabulary, so 2% relative on a loss and 10% on a gradient norm bound bf16 rounding with
room, while a wrong step (a missing term, a wrong scale or direction) moves them by far more.
"""
import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scd.core.config import load_config
from scd.core.results import read_metrics
from scd.models import build_model
from tests.conftest import ROOT, free_port, run_config, shipped_yaml

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEEPSPEED_CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs" / "deepspeed").glob("*.json"))
BF16_REL_LOSS, BF16_REL_GRAD_NORM = 2e-2, 1e-1
# the shipped tiny configs' width (hidden 64, 4 heads) with 2 layers: a wider model than the CPU tests'
TINY_DATA = {"data.tasks": ["rotten_tomatoes"], "data.limit_per_task": 16}


def teacher_cfg(tmp: Path) -> Path:
    """configs/scd/teacher_tiny.yaml with 2 layers on CUDA: 4 steps of batch 4, 2 checkpoints."""
    return shipped_yaml(tmp, "configs/scd/teacher_tiny.yaml", {
        "method": "teacher-gpu-test", "model.tiny.num_hidden_layers": 2, **TINY_DATA, "train.lr": 2.0e-2,
        "train.max_steps": 4, "train.max_len": 64, "train.save_every": 0, "train.log_every": 1,
        "train.device": "cuda", "schedule.n_checkpoints": 2, "dev": {"limit_per_task": 4, "batch_size": 4}},
        name="teacher.yaml")


def distill_cfg(tmp: Path, name: str, teacher: Path, *, bf16: bool, deepspeed: str | None) -> Path:
    """configs/scd/kd_tiny.yaml: layer 1 of teacher_cfg's base distilled for 2 steps (alpha 0.5) on CUDA."""
    return shipped_yaml(tmp, "configs/scd/kd_tiny.yaml", {
        "method": "gpu-test", "model.keep_layers": [1], "model.tiny.num_hidden_layers": 2,
        "teacher": {"run_dir": teacher}, "stages": {"n_stages": 1, "steps_per_stage": 2, "selection": "final"},
        "weighting": {"name": "none", "alpha": 0.5}, **TINY_DATA, "train.max_len": 64, "train.save_every": 0,
        "train.log_every": 1, "train.grad_clip": 1000.0, "train.device": "cuda", "train.bf16": bf16,
        "eval.tasks": [], "deepspeed": deepspeed}, name=f"{name}.yaml")


def scd_run(cfg: Path, run_dir: Path, *, deepspeed: bool = False) -> subprocess.CompletedProcess:
    env = dict.fromkeys(("WORLD_SIZE", "RANK", "LOCAL_RANK"))  # None: removed
    if deepspeed:  # one process, torchrun-style variables as a launcher would set them
        env.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    p = run_config(cfg, run_dir, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def loss_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A CUDA teacher, then the plain float32 distillation run every test compares with."""
    tmp = tmp_path_factory.mktemp("gpu")
    scd_run(teacher_cfg(tmp), tmp / "teacher")

    def distill(name: str, *, bf16: bool = False, deepspeed: str | None = None) -> Path:
        cfg = distill_cfg(tmp, name, tmp / "teacher", bf16=bf16, deepspeed=deepspeed)
        scd_run(cfg, tmp / name, deepspeed=deepspeed is not None)
        return tmp / name

    return {"distill": distill, "fp32": distill("fp32"), "tmp": tmp}


def test_bf16_autocast_step_equals_fp32(runs):
    bf = runs["distill"]("bf16", bf16=True)
    rb, rf = loss_rows(bf), loss_rows(runs["fp32"])
    assert [r["step"] for r in rb] == [r["step"] for r in rf] == [1, 2]
    for x, y in zip(rb, rf):
        for key in ("loss", "kd", "ce"):
            assert x[key] == pytest.approx(y[key], rel=BF16_REL_LOSS), (x["step"], key)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=BF16_REL_GRAD_NORM), x["step"]
        assert x["tokens"] == y["tokens"]
    # bf16 is really on: float32 would reproduce the losses bit for bit
    assert any(x[k] != y[k] for x, y in zip(rb, rf) for k in ("loss", "kd", "ce"))
    rec = json.loads((bf / "run.json").read_text())
    assert rec["status"] == "ok"


@pytest.mark.parametrize("ds_json", DEEPSPEED_CONFIGS)
def test_deepspeed_single_gpu_trains(runs, ds_json):
    assert DEEPSPEED_CONFIGS, "no configs/deepspeed/*.json"
    name = Path(ds_json).stem
    ds = runs["distill"](f"ds-{name}", deepspeed=ds_json)
    rec = json.loads((ds / "run.json").read_text())
    assert rec["status"] == "ok" and rec["train"]["world_size"] == 1 and rec["train"]["deepspeed"] == ds_json
    rd, rf = loss_rows(ds), loss_rows(runs["fp32"])
    assert [r["step"] for r in rd] == [r["step"] for r in rf] == [1, 2]
    for x, y in zip(rd, rf):
        for key in ("loss", "kd", "ce"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-7), (x["step"], key)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3), x["step"]
    # it trained: the saved student differs from the one it started from (built as the recipe builds it)
    cfg = load_config(runs["tmp"] / f"ds-{name}.yaml")
    start = {k: v.detach().float().cpu() for k, v in build_model(cfg.model, seed=cfg.seed)[0].state_dict().items()}
    wd, wf = weights(ds), weights(runs["fp32"])
    moved = [k for k in wd if k in start and not torch.equal(wd[k].float().cpu(), start[k])]
    assert len(moved) >= len(wd) // 2, f"only {len(moved)} of {len(wd)} tensors moved"
    # and it is the plain path's result
    assert wd.keys() == wf.keys()
    for k in wd:
        torch.testing.assert_close(wd[k].float(), wf[k].float(), rtol=1e-4, atol=1e-4)
