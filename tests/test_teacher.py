"""Teacher recipe (SCD step 1) end to end on a tiny random-init Llama and real rotten_tomatoes
data: scheduled checkpoints + sha256 manifest with the best marked, exact resume after a
SIGKILL between a checkpoint save and its manifest entry, LoRA teachers saved merged,
and the online dev-loss-milestone schedule."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scd.core.results import read_metrics
from tests.conftest import TINY_SHAPE, run_config, shipped_yaml, strip_time


def write_cfg(tmp_path, steps=6, schedule=None, lora=None, dev=None, name="t.yaml", **extra):
    """configs/scd/teacher_tiny.yaml on the tests' tiny shape and rotten_tomatoes only, 16 examples,
    batch 2, a checkpoint every 2 steps (``schedule`` default: even_steps, 3 checkpoints)."""
    return shipped_yaml(tmp_path, "configs/scd/teacher_tiny.yaml", {
        "method": "teacher-test", "seed": 1, "model.tiny": TINY_SHAPE, "model.lora": lora,
        "data.tasks": ["rotten_tomatoes"], "data.limit_per_task": 16,
        "train.max_steps": steps, "train.batch_size": 2, "train.max_len": 48, "train.save_every": 2,
        "train.log_every": 1, "schedule": schedule or {"name": "even_steps", "n_checkpoints": 3},
        "dev": dev or {"limit_per_task": 4, "batch_size": 4}, **extra}, name=name)


def run_cli(cfg, run_dir, fault=None):
    return run_config(cfg, run_dir, fault=fault, timeout=600)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    p = run_cli(write_cfg(tmp), tmp / "run")
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp, tmp / "run"


def test_checkpoints_and_manifest(teacher_run):
    from scd.schedule import Manifest

    _, rd = teacher_run
    m = Manifest.read(rd / "checkpoints")
    assert [c.step for c in m.checkpoints] == [2, 4, 6]  # even_steps over 6 steps, N = 3
    assert [c.epoch for c in m.checkpoints] == [0.25, 0.5, 0.75]  # 16 examples, batch 2
    m.verify()  # sha256 of every weight file matches
    for c in m.checkpoints:
        assert (m.resolve(c.index) / "model.safetensors").is_file()
        assert (m.resolve(c.index) / "tokenizer.json").is_file()
        assert c.dev_loss is not None and c.dev_score is None  # no eval tasks -> dev loss only
    # the best checkpoint is the lowest dev loss, written into the file as well
    raw = json.loads((rd / "checkpoints" / "manifest.json").read_text())
    assert raw["best_index"] == min(range(3), key=lambda i: m.checkpoints[i].dev_loss)
    rec = json.loads((rd / "run.json").read_text())
    assert rec["status"] == "ok" and rec["train"]["checkpoint_steps"] == [2, 4, 6]
    assert rec["artifacts"]["model"].endswith("ckpt-6")
    assert not (rd / "ckpt" / "last").exists()  # resumable state cleared when finished
    # the dev loss recorded is the model's: recompute it from the saved final checkpoint
    from transformers import AutoModelForCausalLM

    from scd.core.train import tokenize_sft
    from scd.data_config import DataConfig, load_training_pairs
    from scd.models import load_tokenizer
    from scd.teacher import dev_loss

    tok = load_tokenizer(str(m.resolve(2)))
    model = AutoModelForCausalLM.from_pretrained(str(m.resolve(2)))
    dev = [tokenize_sft(tok, p, t, 48) for p, t in
           load_training_pairs(DataConfig(tasks=("rotten_tomatoes",), split="dev", limit_per_task=4), tok)]
    assert dev_loss(model, dev, tok.pad_token_id) == pytest.approx(m.checkpoints[2].dev_loss, rel=1e-5)
    rows = [r for r in read_metrics(rd / "metrics.jsonl") if r.get("event") == "checkpoint"]
    assert [r["step"] for r in rows] == [2, 4, 6]


@pytest.mark.parametrize("fault", ["teacher_ckpt:2"])
def test_resume_after_kill_equals_uninterrupted(teacher_run, fault):
    """SIGKILL after checkpoint 2's weights are written but before its manifest entry:
    the resumed run re-saves it and every checkpoint's sha256 equals the uninterrupted run's."""
    tmp, ref = teacher_run
    killed = tmp / f"killed-{fault.replace(':', '-')}"
    p = run_cli(write_cfg(tmp), killed, fault=fault)
    assert p.returncode == -9, p.stderr[-2000:]
    partial = json.loads((killed / "checkpoints" / "manifest.json").read_text())
    assert [c["step"] for c in partial["checkpoints"]] == [2]
    p = run_cli(write_cfg(tmp), killed)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed at step" in p.stdout + p.stderr
    a = json.loads((ref / "checkpoints" / "manifest.json").read_text())
    b = json.loads((killed / "checkpoints" / "manifest.json").read_text())
    strip = [{k: v for k, v in c.items() if k not in ("extra",)} for c in a["checkpoints"]]
    assert strip == [{k: v for k, v in c.items() if k not in ("extra",)} for c in b["checkpoints"]]
    assert a["best_index"] == b["best_index"]
    assert strip_time(read_metrics(ref / "metrics.jsonl")) == strip_time(read_metrics(killed / "metrics.jsonl"))


def test_lora_teacher_saves_merged_full_checkpoints(tmp_path, monkeypatch):
    """(Also: a relative run directory, as the grid and `scd run` use, gives a valid manifest.)"""
    from transformers import AutoModelForCausalLM

    from scd.core.config import load_config
    from scd.schedule import Manifest
    from scd.teacher import run

    cfg = load_config(write_cfg(tmp_path, steps=2, schedule={"name": "even_steps", "n_checkpoints": 1},
                                lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}))
    monkeypatch.chdir(tmp_path)
    run(cfg, Path("results") / "run")
    m = Manifest.read(tmp_path / "results" / "run" / "checkpoints")
    assert m.checkpoints[0].path == "ckpt-2"
    m.verify()
    path = m.resolve(0)
    w = load_file(str(path / "model.safetensors"))
    assert not any("lora" in k for k in w), "adapters must be merged into plain weights"
    model = AutoModelForCausalLM.from_pretrained(str(path))  # a plain model, no peft needed
    # merged q_proj differs from the random init it started from (the adapter was trained)
    from scd.models import build_model

    base, _ = build_model(cfg.model.__class__(name="tiny", tiny=cfg.model.tiny), seed=cfg.seed)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(model.state_dict()[q], base.state_dict()[q])


def test_dev_loss_milestone_schedule(tmp_path):
    """Online schedule: dev loss every step; a checkpoint where half the improvement
    towards the floor is reached, plus the final step."""
    from scd.core.config import load_config
    from scd.schedule import Manifest, dev_loss_milestones
    from scd.teacher import run

    cfg = load_config(write_cfg(tmp_path, steps=4, schedule={"name": "dev_loss_milestones", "eval_every": 1,
                                                             "params": {"fractions": [0.5], "floor": 0.0}}))
    run(cfg, tmp_path / "run")
    hist = [tuple(h) for h in json.loads((tmp_path / "run" / "checkpoints" / "dev_history.json").read_text())]
    assert [s for s, _ in hist] == [0, 1, 2, 3, 4]
    want = dev_loss_milestones(4, dev_history=hist, fractions=[0.5], floor=0.0)
    m = Manifest.read(tmp_path / "run" / "checkpoints")
    assert [c.step for c in m.checkpoints] == want and want[-1] == 4
    for c in m.checkpoints:  # the checkpoint's dev loss is the history's value at its step
        assert c.dev_loss == pytest.approx(dict(hist)[c.step])


def test_dev_score_is_the_primary_metric_of_the_checkpoint(tmp_path):
    """dev.tasks set: each checkpoint gets a dev score = mean primary metric on the dev split,
    equal to an independent evaluation of the saved checkpoint; best_index follows the score."""
    from transformers import AutoModelForCausalLM

    from benchmarks.evaluate import evaluate_model
    from scd.core.config import load_config
    from scd.models import load_tokenizer
    from scd.schedule import Manifest
    from scd.teacher import primary_score, run

    cfg = write_cfg(tmp_path, steps=2, schedule={"name": "even_steps", "n_checkpoints": 1},
                    dev={"limit_per_task": 4, "batch_size": 4, "tasks": ["rotten_tomatoes"], "score_limit": 6},
                    eval={"scoring": "likelihood", "batch_size": 4})
    run(load_config(cfg), tmp_path / "run")
    m = Manifest.read(tmp_path / "run" / "checkpoints")
    entry = m.checkpoints[0]
    assert m.score_name == "mean(rotten_tomatoes/accuracy)" and m.higher_is_better
    path = m.resolve(0)
    ref = evaluate_model(AutoModelForCausalLM.from_pretrained(str(path)).eval(), load_tokenizer(str(path)),
                         tasks=["rotten_tomatoes"], split="dev", limit=6, scoring="likelihood", batch_size=4,
                         progress=False)
    assert entry.dev_score == pytest.approx(ref["eval"]["rotten_tomatoes"]["accuracy"]["value"])
    assert primary_score(ref)[0] == pytest.approx(entry.dev_score)
    assert m.best_index == 0
