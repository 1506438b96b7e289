"""Every shipped tiny training config (configs/**/*_tiny.yaml) trains end to end through the CLI
(``scd run CONFIG key=value ...``, in process, CPU) with tiny limits given as command-line
overrides: a few optimiser steps, a few examples, a short evaluation.  Each run must finish
with status ok, the steps it was asked for, and an eval block holding exactly the configured
tasks, each metric over the configured number of examples.

Tasks whose raw data is missing here (the bigbench tasks; scd.data.build.unavailable_reason)
are dropped from data/eval task lists (rotten_tomatoes if none is left).  The teacher / SFT
anchor a distillation config names (teacher.config, weighting.anchor_config), and the student
run any config names as its model (model.student.config), is the shipped config with the same
limits, trained on demand once per module.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.grid import expand_grid, load_grid
from scd.cli import main as cli_main
from scd.core.config import load_yaml, to_dict
from scd.core.results import read_metrics, run_id
from scd.data.build import unavailable_reason
from tests.conftest import ROOT, dotted, load_shipped, shipped_data, shipped_yaml

STEPS, LIMIT, EVAL_LIMIT = 3, 8, 4
TRAINING = ("sft", "teacher", "distill", "unisd", "recovery", "student")  # recipes with a training loop
SLOW = {"configs/recovery/forget_tiny.yaml", "configs/recovery/prune_tiny.yaml",  # 2 SmolLM2 layers: a 49k x 576
        "configs/recovery/quantize_tiny.yaml",                                     # embedding, several evaluations
        "configs/recovery/prune_budget_tiny.yaml"}
NOT_TRAINED = {  # tiny configs of other recipes, and where they are exercised
    "configs/grids/recovery_study_tiny.yaml": "expanded by test_tiny_grid_expands below",
}


def rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


TINY = sorted(rel(p) for p in (ROOT / "configs").rglob("*_tiny.yaml"))
TRAIN = [p for p in TINY if load_yaml(ROOT / p)[0].get("recipe") in TRAINING]


def available(tasks) -> list[str]:
    kept = [t for t in tasks if unavailable_reason(t) is None]
    return kept or ["rotten_tomatoes"]


def tiny_limits(path: str, deps: dict[str, Path] | None = None) -> dict:
    """Overrides that make the shipped config ``path`` a few-second CPU run (``deps``: shipped
    dependency config -> its tiny copy, for teacher.config / weighting.anchor_config / model.student.config)."""
    data = shipped_data(path)
    out = {"data.tasks": available(data["data"]["tasks"]), "data.limit_per_task": LIMIT,
           "train.max_steps": STEPS, "train.batch_size": 2, "train.max_len": 64, "train.log_every": 1,
           "train.save_every": 2}
    if data.get("eval", {}).get("tasks"):
        out.update({"eval.tasks": available(data["eval"]["tasks"]), "eval.limit": EVAL_LIMIT,
                    "eval.batch_size": 4})
    recipe = data["recipe"]
    if recipe == "teacher":
        out.update({"dev.limit_per_task": 4, "dev.batch_size": 4, "dev.score_limit": 4})
    if recipe == "distill":
        if data.get("probe"):
            out.update({"probe.n": 4, "probe.batch_size": 4})
        for key in ("teacher.config", "weighting.anchor_config"):
            block, name = key.split(".")
            dep = data.get(block, {}).get(name)
            if dep:
                out[key] = deps[dep]
    if recipe == "student":  # patience >= STEPS: never stops before the steps asked for
        out.update({"dev.n": 4, "dev.batch_size": 4, "heal.eval_every": 1, "heal.patience": STEPS})
    student = (data.get("model") or {}).get("student")
    if student and deps is not None:
        out["model.student.config"] = deps[student["config"]]
    if recipe == "recovery":
        out.update({"probe.n_examples": 4, "probe.batch_size": 4, "probe.max_len": 64})
        if data["degradation"]["name"] == "forget":
            out.update({"degradation.strength": 2, "degradation.options.limit_per_task": LIMIT})
        if data["degradation"]["name"] == "prune":
            out["degradation.options.calib_batches"] = 1
    return out


@pytest.fixture(scope="module")
def deps(tmp_path_factory):
    """Shipped dependency config -> its tiny copy, and the results dir its runs are trained into."""
    tmp = tmp_path_factory.mktemp("deps")
    out = {}
    for path in TRAIN:
        data = shipped_data(path)
        for block, name in (("teacher", "config"), ("weighting", "anchor_config")):
            dep = data.get(block, {}).get(name)
            if dep and dep not in out:
                out[dep] = shipped_yaml(tmp, dep, tiny_limits(dep), name=Path(dep).name)
        dep = ((data.get("model") or {}).get("student") or {}).get("config")
        if dep and dep not in out:
            out[dep] = shipped_yaml(tmp, dep, tiny_limits(dep), name=Path(dep).name)
    return out, tmp / "results"


def test_every_tiny_config_is_covered():
    assert TRAIN, "no configs/**/*_tiny.yaml training config"
    assert sorted(set(TINY) - set(TRAIN)) == sorted(NOT_TRAINED), "a tiny config that no test runs"


@pytest.mark.parametrize("path", [pytest.param(p, marks=[pytest.mark.slow] if p in SLOW else []) for p in TRAIN])
def test_shipped_tiny_config_trains(path, deps, tmp_path):
    dep_files, dep_results = deps
    over = tiny_limits(path, dep_files)
    if shipped_data(path)["recipe"] == "distill":
        over["teacher.results_dir"] = dep_results  # the teacher / anchor: trained once, shared
    if (shipped_data(path).get("model") or {}).get("student"):
        over["model.student.results_dir"] = dep_results
    rd = tmp_path / "run"
    assert cli_main(["run", str(ROOT / path), *dotted(over), "--run-dir", str(rd)]) == 0
    rec = json.loads((rd / "run.json").read_text())
    assert rec["status"] == "ok", rec.get("error")
    assert rec["recipe"] == shipped_data(path)["recipe"] and rec["method"] == shipped_data(path)["method"]
    assert rec["run_id"] == run_id(to_dict(load_shipped(path, over)))  # the config it ran: shipped + overrides
    assert rec["train"]["steps"] == STEPS and rec["train"]["tokens"] > 0
    steps = [r["step"] for r in read_metrics(rd / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, STEPS + 1))
    want = over.get("eval.tasks", [])
    assert sorted(rec.get("eval") or {}) == sorted(want)
    for task in want:
        metrics = rec["eval"][task]
        assert metrics and all(m["n"] == EVAL_LIMIT for m in metrics.values()), (task, metrics)


def test_tiny_grid_expands():
    """recovery_study_tiny.yaml: 3 recovery methods x 9 degradations (its header: 27 runs), each a valid
    recovery config on the base configs/recovery/quantize_tiny.yaml (trained above)."""
    path = ROOT / "configs/grids/recovery_study_tiny.yaml"
    plan = expand_grid(load_grid(path), path)
    assert len(plan.runs) == 27 and len({r.run_id for r in plan.runs}) == 27
    assert {r.method for r in plan.runs} == {"none", "sft", "sd"}
    assert sorted({(r.config["degradation"]["name"], r.config["degradation"]["strength"]) for r in plan.runs}) == \
        sorted({("quantize", 8), ("quantize", 4), ("quantize", 3), ("prune", 0.3), ("prune", 0.5), ("prune", 0.7),
                ("forget", 2), ("forget", 4), ("forget", 8)})
