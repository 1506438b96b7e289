"""Extension: a component registered from OUTSIDE the unisd package, named in a config.

The component below is the worked example of docs/unisd.md ("Adding a component"):
one file, one registered class.  A config names this file under ``plugins:`` and the
component under ``components:``; the tests run it through the recipe and in a grid.
"""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unisd.components.base import Component, register_component
from unisd.context import token_logps

THIS_FILE = Path(__file__).resolve()
REPO = THIS_FILE.parents[1]


@register_component("teacher_confidence")
class TeacherConfidence(Component):
    """Weight each completion token by the teacher's probability of it: w_t = p_T(y_t) ** power."""

    needs = frozenset()  # uses only the provider's targets: no extra passes, no hidden states

    @dataclasses.dataclass(frozen=True)
    class Params:
        power: float = 1.0

    def loss_terms(self, ctx, targets):
        with torch.no_grad():
            lp = token_logps(targets.logits, ctx.batch.completion_ids, targets.temperature)  # [B, L]
            w = torch.exp(self.params.power * lp)
        ctx.token_weights = w if ctx.token_weights is None else ctx.token_weights * w
        m = ctx.batch.loss_mask.bool()
        if m.any():
            ctx.log("teacher_confidence/weight_mean", w[m].mean())
        return {}


# ------------------------------------------------------------------------------ tests
def test_the_plugin_is_registered_and_gets_a_results_column():
    from unisd.components.base import COMPONENTS, components_table

    assert COMPONENTS.get("teacher_confidence") is TeacherConfidence
    assert TeacherConfidence.__module__ != "unisd" and not TeacherConfidence.__module__.startswith("unisd.")
    assert components_table({"in_context_teacher": {}, "teacher_confidence": {}})["teacher_confidence"] is True


def test_config_with_plugins_validates(tmp_path):
    from scd.core.config import ConfigError, from_dict
    from unisd.train import UniSDConfig

    cfg = from_dict(UniSDConfig, {"plugins": [str(THIS_FILE)],
                                  "components": {"in_context_teacher": {}, "teacher_confidence": {"power": 2}}})
    assert cfg.components["teacher_confidence"] == {"power": 2}
    with pytest.raises(ConfigError, match="did you mean 'power'"):
        from_dict(UniSDConfig, {"components": {"in_context_teacher": {}, "teacher_confidence": {"powr": 2}}})
    with pytest.raises(ConfigError, match="not found"):
        from_dict(UniSDConfig, {"plugins": [str(tmp_path / "nope.py")]})


def test_power_zero_is_the_base_loss(smol_tokenizer):
    from tests.unisd_tiny import setup_run, step_once

    base = setup_run(smol_tokenizer, {"in_context_teacher": {"max_new_tokens": 4}})
    t0, _ = step_once(base)
    ext = setup_run(smol_tokenizer, {"in_context_teacher": {"max_new_tokens": 4}, "teacher_confidence": {"power": 0}})
    t1, _ = step_once(ext)
    assert t1["kd"] == t0["kd"]
    ext2 = setup_run(smol_tokenizer, {"in_context_teacher": {"max_new_tokens": 4}, "teacher_confidence": {}})
    t2, _ = step_once(ext2)
    assert t2["kd"] != t0["kd"] and float(ext2.ctx.token_weights.max()) <= 1.0


def test_plugin_runs_through_the_recipe(smol_tokenizer, tmp_path):
    from scd.core.results import read_metrics
    from tests.unisd_tiny import tiny_unisd_cfg
    from unisd.train import run

    cfg = tiny_unisd_cfg({"in_context_teacher": {"max_new_tokens": 4}, "teacher_confidence": {"power": 1.0}},
                         plugins=[str(THIS_FILE)], **{"train.max_steps": 2, "train.log_every": 1,
                                                      "save_model": False})
    rec = run(cfg, tmp_path / "run")
    assert rec["status"] == "ok" and rec["components"]["teacher_confidence"] is True
    assert rec["hparams"]["teacher_confidence.power"] == 1.0
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all("teacher_confidence/weight_mean" in r for r in rows)


GRID = """
recipe: grid
name: unisd_plugin_test
baseline: base
seeds: [0]
base: {base}
runs:
  - {{method: base}}
  - {{method: confidence, components.teacher_confidence: {{power: 1.0}}}}
"""


@pytest.mark.slow
def test_plugin_runs_in_a_grid(tmp_path):
    import json

    base = tmp_path / "base.yaml"
    base.write_text((REPO / "configs" / "unisd" / "base_tiny.yaml").read_text()
                    .replace("max_steps: 6", "max_steps: 2").replace("limit: 16", "limit: 4")
                    + f"plugins: [{os.path.relpath(THIS_FILE, REPO)}]\n")  # relative to the repo root (cwd)
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID.format(base=base))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.grid", str(grid), "--results-dir", str(tmp_path / "res"),
                          "--no-leaderboard"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    recs = [json.loads(p.read_text()) for p in (tmp_path / "res" / "unisd_plugin_test").glob("*/run.json")]
    by_method = {r["method"]: r for r in recs}
    assert set(by_method) == {"base", "confidence"} and all(r["status"] == "ok" for r in recs)
    assert by_method["confidence"]["components"]["teacher_confidence"] is True
    assert by_method["base"]["components"]["in_context_teacher"] is True
    assert by_method["base"]["components"]["teacher_confidence"] is False  # a column for every run
