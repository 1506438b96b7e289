"""Shared helpers of the reliability suites (imported as tests.reliability._helpers) (docs/reliability.md).

Tiny CPU configs for the three training recipes, a subprocess runner of the real CLI
(``python -m scd run``) with optional fault injection (``SCD_FAULT=<point>:<n>``,
scd/core/faults.py), and the comparisons used to check that a killed-then-resumed run
ends exactly like an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHAPE = "{num_hidden_layers: 2, hidden_size: 32, intermediate_size: 64, num_attention_heads: 2, num_key_value_heads: 1}"

SFT_YAML = f"""\
recipe: sft
method: sft-rel
seed: 0
model: {{name: tiny, tiny: {SHAPE}}}
data: {{tasks: [rotten_tomatoes], limit_per_task: 16}}
train: {{lr: 1.0e-3, max_steps: 6, batch_size: 2, max_len: 64, save_every: 2, log_every: 1}}
eval: {{tasks: []}}
"""

TEACHER_YAML = f"""\
recipe: teacher
method: teacher-rel
seed: 0
model: {{name: tiny, tiny: {SHAPE}}}
data: {{tasks: [rotten_tomatoes], limit_per_task: 16}}
train: {{lr: 1.0e-2, max_steps: 6, batch_size: 2, max_len: 64, save_every: 2, log_every: 1}}
schedule: {{name: even_steps, n_checkpoints: 3}}
dev: {{limit_per_task: 4, batch_size: 4, score: false}}
eval: {{tasks: []}}
"""

# 3 stages (one per teacher checkpoint, in save order), alpha 0.5: KD and CE both matter.
# The teacher is trained on demand, in the same process, under <cwd>/results/runs/.
DISTILL_YAML = f"""\
recipe: distill
method: cd-rel
seed: 0
model: {{name: student, init_from: tiny, keep_layers: [1], tiny: {SHAPE}}}
teacher: {{config: {{teacher}}}}
stages: {{n_stages: 3, selection: fixed_order}}
loss: {{divergence: forward_kl}}
weighting: {{name: none, alpha: 0.5}}
data: {{tasks: [rotten_tomatoes], limit_per_task: 16}}
train: {{lr: 5.0e-3, max_steps: 6, batch_size: 2, max_len: 64, save_every: 1, log_every: 1}}
eval: {{tasks: []}}
"""

# Keys whose values are wall-clock measurements (differ between any two runs).
# Counters of the work an attempt did (a resumed run loads its teacher and runs its forwards again) are
# execution facts too, not results: they are left out of the comparison like the timings.
TIMING_KEYS = {"time", "wall_s", "peak_mem", "switch_s", "switch_s_total", "save_s", "probe_s", "started",
               "finished", "teacher_loads", "teacher_forwards_train"}


def write_configs(d: Path) -> dict[str, Path]:
    """The three recipe configs under ``d`` (absolute paths)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "sft.yaml").write_text(SFT_YAML)
    (d / "teacher.yaml").write_text(TEACHER_YAML)
    (d / "distill.yaml").write_text(DISTILL_YAML.replace("{teacher}", str(d / "teacher.yaml")))
    return {"sft": d / "sft.yaml", "teacher": d / "teacher.yaml", "distill": d / "distill.yaml"}


def sub_env(fault: str | None = None, **extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", **extra)
    env.pop("SCD_FAULT", None)
    env.pop("SCD_DEBUG", None)
    if fault:
        env["SCD_FAULT"] = fault
    return env


def run_cli(args: list[str], cwd: Path, fault: str | None = None, timeout: int = 600,
            **env: str) -> subprocess.CompletedProcess:
    """``python -m <args>`` in ``cwd`` (the recipes resolve results/ against it)."""
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd, env=sub_env(fault, **env),
                          capture_output=True, text=True, timeout=timeout)


def run_recipe(cfg: Path, run_dir: Path, cwd: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    return run_cli(["scd", "run", cfg, "--run-dir", run_dir], cwd, fault)


def strip(obj, keys=TIMING_KEYS):
    """``obj`` without wall-clock fields (recursively)."""
    if isinstance(obj, dict):
        return {k: strip(v, keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list):
        return [strip(v, keys) for v in obj]
    return obj


def metric_rows(path: Path) -> list[dict]:
    from scd.core.results import read_metrics

    return strip(read_metrics(path))


def assert_tensors_equal(a: Path, b: Path) -> None:
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys(), (a, b)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0, msg=f"{b}: tensor {k} differs")


def assert_complete_files(root: Path) -> None:
    """No file under a final name is partial: every JSON / JSONL / safetensors parses.

    (Temp files ``.<name>.*.tmp`` and temp dirs ``.last.tmp-<pid>`` may be left by a kill;
    they are never read, so they are skipped here.)
    """
    from safetensors import safe_open

    from scd.core.results import read_metrics

    for p in root.rglob("*"):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".jsonl":
            rows = read_metrics(p)  # a torn last line is allowed (dropped on read, truncated on resume)
            keys = [(r.get("step"), r.get("event"), r.get("stage")) for r in rows]
            assert len(keys) == len(set(keys)), f"{p}: duplicate rows {keys}"
        elif p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                list(f.keys())


def leftover_temps(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" in p.name)

