"""Fidelity to the released UniSD code (issue 20): the teacher wording, the agreement teachers'
context, exclusive clipping settings, and run ids that survive the changed defaults."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import unisd.components  # noqa: F401  (registers the built-ins)
from tests.unisd_tiny import setup_run, step_once
from scd.core.config import ConfigError, dump_yaml, from_dict, load_config, to_dict
from scd.core.results import config_hash, run_id
from unisd.components.base import build_component
from unisd.prompts import TEMPLATES, agreement_prompt, check_template
from unisd.train import UniSDConfig

ROOT = Path(__file__).resolve().parents[1]
EX = {"instruction": "Classify.", "input": "A fine film.", "target": "fresh", "task": "t"}
DEMOS = [{"instruction": "Classify.", "input": "Dull.", "target": "rotten", "task": "t"},
         {"instruction": "Classify.", "input": "Great fun.", "target": "fresh", "task": "t"}]


def test_template_names_texts_and_did_you_mean():
    assert check_template("released") == "released" and check_template("ours") == "ours"
    assert check_template("Q: {input} A: {reference}") == "Q: {input} A: {reference}"
    with pytest.raises(ValueError, match="did you mean 'released'"):
        check_template("relased")
    with pytest.raises(ValueError, match="must contain {reference}"):
        check_template("{input} only")
    with pytest.raises(ConfigError, match=r"components\.in_context_teacher: .*did you mean 'ours'"):
        build_component("in_context_teacher", {"template": "our"})
    assert "This is an example for a response to the question" in TEMPLATES["released"]


def test_agreement_context_released_has_demos_and_no_reference(smol_tokenizer):
    text = agreement_prompt(EX, DEMOS, smol_tokenizer)
    user = text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    assert user == ("## Reference Samples (DO NOT SOLVE THESE)\n"
                    "The following are solved examples from OTHER questions, provided only as reference.\n"
                    "Do NOT copy their answers. Do NOT mention these examples in your final answer.\n\n"
                    "### [REFERENCE ONLY #1]\nReference Question:\nDull.\n\nReference Answer:\nrotten\n\n"
                    "### [REFERENCE ONLY #2]\nReference Question:\nGreat fun.\n\nReference Answer:\nfresh\n"
                    "\n-----\n## Task to Solve (ONLY ANSWER THIS TASK)\n"
                    "Now solve ONLY the following task. Output ONLY the answer for THIS task.\n\n"
                    "Classify.\n\nA fine film.")
    plain = agreement_prompt(EX, DEMOS[:1], None)  # no chat template: the plain format
    assert plain.startswith("## Reference Samples") and plain.endswith("Classify.\n\nA fine film.\n\nAnswer:")


def _agreement_texts(smol_tokenizer, params: dict) -> list[str]:
    run = setup_run(smol_tokenizer, {"in_context_teacher": {"max_new_tokens": 4},
                                     "multi_teacher_agreement": {"k": 2, "shots": 1, **params}})
    comp = next(c for c in run.components if c.name == "multi_teacher_agreement")
    ex = run.ctx.examples[0]
    return [comp.prompt(run.ctx, ex, [run.ctx.examples[j] for j in comp.demos[0][c]]) for c in range(2)], ex


def test_agreement_teachers_see_no_reference_by_default(smol_tokenizer):
    (t0, t1), ex = _agreement_texts(smol_tokenizer, {})
    for t in (t0, t1):
        assert "Reference Samples" in t and "This is an example for a response" not in t
        assert t.rstrip().endswith(f"{ex['input']}<|im_end|>\n<|im_start|>assistant")
    assert t0 != t1  # K contexts differ by their demonstrations
    (w0, _), _ = _agreement_texts(smol_tokenizer, {"context": "with_reference", "template": "ours"})
    assert f"A reference answer to this request:\n{ex['target']}" in w0 and "Reference Samples" not in w0
    with pytest.raises(ConfigError, match="did you mean 'released'"):
        build_component("multi_teacher_agreement", {"context": "releasd"})


def test_clipping_cap_and_quantile_are_exclusive():
    with pytest.raises(ConfigError, match=r"components\.divergence_clipping: .*cap .*quantile.*not both"):
        build_component("divergence_clipping", {"cap": 5.0, "quantile": 0.99})
    assert build_component("divergence_clipping", True).params.cap == 10.0  # released default
    q = build_component("divergence_clipping", {"quantile": 0.99}).params
    assert q.cap is None and q.quantile == 0.99


def test_ema_adapters_values(smol_tokenizer):
    with pytest.raises(ConfigError, match="did you mean 'skip'"):
        build_component("ema_teacher", {"adapters": "skp"})
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj"]}
    comps = {"in_context_teacher": {"max_new_tokens": 4}, "ema_teacher": {"decay": 0.5, "every": 1}}
    run = setup_run(smol_tokenizer, comps, lora=lora, lr=1e-2)
    step_once(run, update=True)
    ema = next(c for c in run.components if c.name == "ema_teacher")
    state = ema.state_dict()
    assert sorted(state) == [f"base_model.model.model.layers.{i}.self_attn.q_proj.merged" for i in range(2)]
    fresh = setup_run(smol_tokenizer, comps, lora=lora, lr=1e-2)  # resume: the merged EMA weights come back
    fresh_ema = next(c for c in fresh.components if c.name == "ema_teacher")
    fresh_ema.load_state_dict(state)
    ids = torch.randint(0, 500, (1, 6))
    with torch.no_grad():
        assert torch.equal(fresh.ctx.teacher(ids).logits, run.ctx.teacher(ids).logits)


# ----------------------------------------------------------------------------- run ids
def _cfg(components: dict) -> UniSDConfig:
    return from_dict(UniSDConfig, {"components": components})


def test_pinned_legacy_values_keep_the_recorded_run_id():
    pinned = _cfg({"in_context_teacher": {"temperature": 0.5, "template": "ours"},
                   "ema_teacher": {"decay": 0.9, "adapters": "factors"},
                   "multi_teacher_agreement": {"k": 2, "context": "with_reference", "template": "ours"},
                   "token_contrastive": {"template": "ours"}})
    resolved = to_dict(pinned)
    assert resolved["components"]["in_context_teacher"] == {"temperature": 0.5, "template": "ours"}
    # the id of the same config as recorded before the parameters existed (hashed as written)
    before = {**resolved, "components": {"in_context_teacher": {"temperature": 0.5}, "ema_teacher": {"decay": 0.9},
                                         "multi_teacher_agreement": {"k": 2}, "token_contrastive": {}}}
    assert run_id(resolved) == config_hash({k: v for k, v in before.items() if k != "grid"})
    new = to_dict(_cfg({"in_context_teacher": {"temperature": 0.5}}))  # says nothing: the released defaults
    assert new["components"]["in_context_teacher"] == {"temperature": 0.5, "template": "released"}
    legacy = to_dict(_cfg({"in_context_teacher": {"temperature": 0.5, "template": "ours"}}))
    assert run_id(new) != run_id(legacy)


def test_resolved_config_reloads_to_the_same_run(tmp_path):
    cfg = _cfg({"in_context_teacher": True, "ema_teacher": {"decay": 0.98}})
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))  # what a run directory keeps (and the grid runner launches)
    again = load_config(path)
    assert again.components == cfg.components and run_id(to_dict(again)) == run_id(to_dict(cfg))
    assert cfg.components["ema_teacher"] == {"decay": 0.98, "adapters": "average"}
    assert cfg.components["in_context_teacher"] == {"template": "released"}


@pytest.mark.parametrize("name, template", [("base_cpu", "ours"), ("base_tiny", "released"),
                                            ("base_smollm2", "released"), ("unisd_star_smollm2", "released")])
def test_shipped_unisd_configs_choose_wording_and_betas(name, template):
    path = ROOT / "configs" / "unisd" / f"{name}.yaml"
    cfg = load_config(path)
    assert cfg.components["in_context_teacher"]["template"] == template
    assert "betas" in yaml.safe_load(path.read_text())["train"]  # chosen in the file, not inherited
    assert cfg.train.betas[1] == (0.95 if name in ("base_cpu", "base_tiny") else 0.999)


def test_run_id_does_not_depend_on_which_recipes_are_imported(tmp_path):
    """run_id applies the recipe's id_view; a fresh process that has not imported unisd yet must hash a
    unisd config to the same id (scd.core.results.run_id imports the built-in recipe first)."""
    resolved = to_dict(load_config("configs/unisd/base_cpu.yaml"))
    code = "import json,sys; from scd.core.results import run_id; print(run_id(json.loads(sys.stdin.read())))"
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(resolved), capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == run_id(resolved)
