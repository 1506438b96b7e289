"""benchmarks.evaluate: CLI end to end on a tiny saved model, run.json merging, configs, shots."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scd.core.results import new_run_record, read_json, validate_run_record
from scd.data.build import unavailable_reason
from tests.conftest import shipped_yaml, tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_saved(tmp_path_factory, smol_tokenizer):
    from scd.models import save_model, tiny_model

    tok = smol_tokenizer
    m = tiny_model(len(tok), tiny_config(), seed=0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id)
    return save_model(m, tok, tmp_path_factory.mktemp("m") / "tiny")


def _lines(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines()]


def test_cli_end_to_end_and_merge(tmp_path, tiny_saved):
    from benchmarks.evaluate import main

    out = tmp_path / "out"
    rc = main([str(tiny_saved), "--tasks", "rotten_tomatoes", "wnut16", "--limit", "8", "--shots", "1",
               "--scoring", "likelihood", "--max-new-tokens", "6", "--out", str(out), "--no-progress",
               "--n-boot", "100", "--batch-size", "4"])
    assert rc == 0
    rec = validate_run_record(read_json(out / "run.json"))
    assert rec["status"] == "ok" and rec["recipe"] == "evaluate" and rec["method"] == "tiny"
    assert set(rec["eval"]) == {"rotten_tomatoes", "wnut16"}
    for task, metrics in rec["eval"].items():
        for name, m in metrics.items():
            assert set(m) == {"value", "n", "ci"} and m["n"] == 8
            upper = float("inf") if name == "label_nll" else 1.0  # an NLL is unbounded above
            assert 0.0 <= m["value"] <= upper and m["ci"][0] <= m["value"] <= m["ci"][1]
            meta = rec["metric_meta"][f"{task}/{name}"]
            assert set(meta) == {"higher_is_better", "chance", "primary"}
    assert rec["metric_meta"]["rotten_tomatoes/accuracy"] == {"higher_is_better": True, "chance": 0.5,
                                                             "primary": True}
    assert rec["eval"]["rotten_tomatoes"]["invalid_rate"]["value"] == 0.0  # likelihood scoring
    assert rec["eval_info"]["rotten_tomatoes"]["scoring"] == "likelihood"
    assert rec["eval_info"]["wnut16"]["scoring"] == "generate"  # NER always generates
    assert rec["eval_info"]["wnut16"]["max_new_tokens"] == 6
    assert len(rec["eval_info"]["rotten_tomatoes"]["shot_ids"]) == 1
    rows = _lines(out / "predictions" / "rotten_tomatoes.jsonl")
    assert [r["id"] for r in rows] == [f"rotten_tomatoes-test-{i}" for i in range(8)]
    acc = sum(r["scores"]["correct"] for r in rows) / 8
    assert rec["eval"]["rotten_tomatoes"]["accuracy"]["value"] == pytest.approx(acc)

    # a second call adds a task and keeps the others untouched
    if unavailable_reason("disfl_qa"):
        pytest.skip(unavailable_reason("disfl_qa"))
    before = rec["eval"]["rotten_tomatoes"]
    assert main([str(tiny_saved), "--tasks", "disfl_qa", "--limit", "4", "--max-new-tokens", "4", "--out", str(out),
                 "--no-progress", "--n-boot", "50"]) == 0
    rec2 = validate_run_record(read_json(out / "run.json"))
    assert set(rec2["eval"]) == {"rotten_tomatoes", "wnut16", "disfl_qa"}
    assert rec2["eval"]["rotten_tomatoes"] == before and rec2["eval"]["disfl_qa"]["exact_match"]["n"] == 4


def test_evaluate_run_dir(tmp_path, tiny_saved):
    import shutil

    from benchmarks.evaluate import main

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_saved, run_dir / "model")
    rec = new_run_record(run_id="abc", grid="g", method="sft-tiny", seed=3, recipe="sft", config={})
    rec.update(status="ok", train={"tokens": 10}, artifacts={"model": "model"},
               eval={"old_task": {"acc": {"value": 0.1, "n": 5, "ci": [0.0, 0.2]}}})
    (run_dir / "run.json").write_text(json.dumps(rec))
    assert main([str(run_dir), "--tasks", "rotten_tomatoes", "--limit", "4", "--scoring", "likelihood",
                 "--no-progress", "--n-boot", "50"]) == 0
    got = validate_run_record(read_json(run_dir / "run.json"))
    assert got["method"] == "sft-tiny" and got["train"] == {"tokens": 10} and got["status"] == "ok"
    assert set(got["eval"]) == {"old_task", "rotten_tomatoes"}
    assert (run_dir / "predictions" / "rotten_tomatoes.jsonl").exists()


def test_cli_errors(tmp_path, tiny_saved, capsys):
    from benchmarks.evaluate import main

    assert main([str(tiny_saved), "--tasks", "roten_tomatoes", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "did you mean 'rotten_tomatoes'" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "run.json").write_text(json.dumps(new_run_record(run_id="x", grid=None, method="m", seed=0,
                                                              recipe="sft", config={})))
    assert main([str(empty), "--tasks", "rotten_tomatoes"]) == 2
    assert "no saved model" in capsys.readouterr().err
    assert main([str(tiny_saved)]) == 2
    assert "no tasks" in capsys.readouterr().err


def test_eval_configs_validate():
    from benchmarks.evaluate import EvalConfig
    from scd.core.config import ConfigError, load_config

    files = sorted((ROOT / "configs" / "eval").glob("*.yaml"))
    assert files
    for f in files:
        assert f.read_text().startswith("# Purpose:"), f
        cfg = load_config(f)
        assert isinstance(cfg, EvalConfig), f
    with pytest.raises(ConfigError, match="scoring"):
        load_config(files[0], ["scoring=likelyhood"])


def test_recipe_run_with_lm_eval_and_cka(tmp_path):
    """configs/eval/tiny_smoke.yaml through the recipe entry point (scd run)."""
    from scd.core.config import RECIPES, load_config

    cfg = load_config(ROOT / "configs" / "eval" / "tiny_smoke.yaml",
                      ["limit=4", "tasks=[rotten_tomatoes]", "cka.n_examples=4", "n_boot=50"])
    rec = RECIPES.get("evaluate").run(cfg, tmp_path / "r")
    validate_run_record(rec)
    assert set(rec["eval"]) == {"rotten_tomatoes", "lm_eval:rotten_tomatoes"}
    assert rec["eval"]["lm_eval:rotten_tomatoes"]["acc"]["n"] == 4
    cka = rec["cka"]["tiny"]
    assert cka["diagonal"] == pytest.approx([1.0] * len(cka["diagonal"]), abs=1e-6)  # identical copy
    assert (tmp_path / "r" / cka["heatmap"]).exists()


def test_label_words_from_config(tmp_path, tiny_saved, capsys):
    """prompts.<task>.label_words: validated, recorded in eval_info, predictions stay in the task's labels."""
    from benchmarks.evaluate import main

    cfg = shipped_yaml(tmp_path, "configs/eval/tiny_smoke.yaml", {
        "model": None, "out": None, "tasks": ["rotten_tomatoes"], "limit": 6, "scoring": "calibrated", "shots": 2,
        "max_new_tokens": None, "batch_size": 16, "lm_eval_tasks": [], "cka": {}, "n_boot": 50,
        "prompts": {"rotten_tomatoes": {"label_words": {"fresh": "positive", "rotten": "negative"}}}}, name="lw.yaml")
    out = tmp_path / "out"
    assert main([str(tiny_saved), "--config", str(cfg), "--out", str(out)]) == 0
    rec = validate_run_record(read_json(out / "run.json"))
    info = rec["eval_info"]["rotten_tomatoes"]
    assert info["label_words"] == {"fresh": "positive", "rotten": "negative"}
    assert info["instruction"].endswith("Answer with exactly one of: positive, negative.")
    assert rec["config"]["prompts"] == {"rotten_tomatoes": {"label_words": {"fresh": "positive", "rotten": "negative"},
                                                            "instruction": None}}
    rows = _lines(out / "predictions" / "rotten_tomatoes.jsonl")
    assert {r["prediction"] for r in rows} <= {"fresh", "rotten"} and {r["gold"] for r in rows} <= {"fresh", "rotten"}
    assert all(set(r["logliks"]) == {"fresh", "rotten"} == set(r["calibration"]) for r in rows)
    assert rec["eval"]["rotten_tomatoes"]["accuracy"]["value"] == pytest.approx(
        sum(r["prediction"] == r["gold"] for r in rows) / 6)

    # errors name the key: a task that is not evaluated, a label the task lacks, a non-classification task
    assert main([str(tiny_saved), "--config", str(cfg), "--tasks", "wnut16", "--out", str(tmp_path / "e1")]) == 2
    assert "prompts.rotten_tomatoes" in capsys.readouterr().err
    assert main([str(tiny_saved), "prompts.rotten_tomatoes.label_words={fresh: positive}", "--config", str(cfg),
                 "--out", str(tmp_path / "e2")]) == 2
    assert "missing ['rotten']" in capsys.readouterr().err
    assert main([str(tiny_saved), "prompts={wnut16: {label_words: {a: b}}}", "--tasks", "wnut16", "--limit", "2",
                 "--out", str(tmp_path / "e3")]) == 2
    assert "classification" in capsys.readouterr().err
    assert main([str(tiny_saved), "prompts.rotten_tomatoes.label_word={fresh: positive}", "--config", str(cfg),
                 "--out", str(tmp_path / "e4")]) == 2
    assert "did you mean 'label_words'" in capsys.readouterr().err


def test_select_shots_deterministic_and_balanced():
    from benchmarks.evaluate import few_shot_examples

    if unavailable_reason("multiemo_en"):
        pytest.skip(unavailable_reason("multiemo_en"))
    a = few_shot_examples("multiemo_en", 4, seed=0)
    assert [s["id"] for s in a] == [s["id"] for s in few_shot_examples("multiemo_en", 4, seed=0)]
    assert sorted(s["label"] for s in a) == sorted(a[0]["label_set"])  # one per label
    assert all(s["id"].startswith("multiemo_en-train-") for s in a)
    b = few_shot_examples("multiemo_en", 4, seed=1)
    assert [s["id"] for s in a] != [s["id"] for s in b]
    excl = few_shot_examples("multiemo_en", 4, seed=0, exclude_ids=[a[0]["id"]])
    assert a[0]["id"] not in [s["id"] for s in excl]
    assert few_shot_examples("wnut16", 0) == []
    assert len(few_shot_examples("wnut16", 3, seed=0)) == 3


def test_expand_tasks():
    from benchmarks.evaluate import expand_tasks
    from scd.core.registry import RegistryError

    cls = expand_tasks(["classification"])
    assert "rotten_tomatoes" in cls and "multiemo_en" in cls and "wnut16" not in cls
    assert expand_tasks(["wnut16", "ner"])[0] == "wnut16" and len(set(expand_tasks(["ner", "ner"]))) == len(
        expand_tasks(["ner"]))
    with pytest.raises(RegistryError):
        expand_tasks(["nope"])


def test_rescore_adds_new_metrics_and_checks_old_ones(tmp_path, tiny_saved, capsys):
    """--rescore: saved predictions + current scorers; existing metrics must reproduce exactly."""
    from benchmarks.evaluate import main, rescore_run
    from scd.core.results import atomic_write_json

    out = tmp_path / "out"
    assert main([str(tiny_saved), "--tasks", "rotten_tomatoes", "--limit", "6", "--scoring", "likelihood",
                 "--out", str(out), "--no-progress", "--n-boot", "50", "--batch-size", "3"]) == 0
    full = read_json(out / "run.json")
    assert rescore_run(out) == []  # nothing new: untouched
    old = json.loads(json.dumps(full))
    del old["eval"]["rotten_tomatoes"]["label_nll"], old["metric_meta"]["rotten_tomatoes/label_nll"]
    atomic_write_json(out / "run.json", old)  # a run made before label_nll existed
    assert main(["--rescore", str(tmp_path)]) == 0
    assert "added rotten_tomatoes/label_nll" in capsys.readouterr().out
    new = read_json(out / "run.json")
    assert new["eval"] == full["eval"] and new["metric_meta"] == full["metric_meta"]
    assert new["eval_info"]["rotten_tomatoes"]["rescored"]["added"] == ["label_nll"]
    bad = json.loads(json.dumps(new))
    bad["eval"]["rotten_tomatoes"]["accuracy"]["value"] = 0.123
    atomic_write_json(out / "run.json", bad)
    with pytest.raises(ValueError, match="accuracy re-scores to"):
        rescore_run(out)
    assert main(["--rescore", str(out)]) == 1


def test_training_recipes_eval_block_takes_label_words(tmp_path, tiny_saved):
    """`eval.prompts` in a training config: validated against eval.tasks, used by the end-of-run
    evaluation, and dropped for tasks a dev-score copy (teacher) does not evaluate."""
    from scd.core.config import ConfigError, from_dict
    from benchmarks.evaluate import EvalSpec
    from scd.models import ModelConfig, build_model

    words = {"rotten_tomatoes": {"label_words": {"fresh": "positive", "rotten": "negative"}}}
    spec = from_dict(EvalSpec, {"tasks": ["classification"], "limit": 3, "scoring": "likelihood", "prompts": words})
    with pytest.raises(ConfigError, match="prompts.rotten_tomatoes"):
        from_dict(EvalSpec, {"tasks": ["wnut16"], "prompts": words})
    dev = spec.with_tasks(("wnut16",), split="dev")
    assert dev.prompts == {} and dev.split == "dev" and spec.with_tasks(("rotten_tomatoes",)).prompts == spec.prompts
    model, tok = build_model(ModelConfig(name=str(tiny_saved)))
    res = spec.with_tasks(("rotten_tomatoes",)).run(model, tok, tmp_path)
    assert res["eval_info"]["rotten_tomatoes"]["label_words"] == {"fresh": "positive", "rotten": "negative"}
    rows = _lines(tmp_path / "predictions" / "rotten_tomatoes.jsonl")
    assert len(rows) == 3 and all(set(r["logliks"]) == {"fresh", "rotten"} for r in rows)


def test_one_evaluation_config_for_recipes_and_the_standalone_evaluator():
    """EvalSpec is the `eval:` block of every training recipe and the base of the standalone EvalConfig:
    one set of fields, defaults and checks.  Its resolved form at the defaults is pinned: the recipes'
    run ids hash it."""
    import dataclasses
    import typing

    from benchmarks.evaluate import EvalConfig, EvalSpec
    from scd import recipes
    from scd.core.config import RECIPES, ConfigError, from_dict, to_dict

    assert to_dict(EvalSpec()) == {"tasks": [], "split": "test", "limit": 200, "shots": 0, "batch_size": 16,
                                   "scoring": "generate", "max_new_tokens": None, "lm_eval_tasks": []}
    recipes.ensure_all()
    for name in ("sft", "teacher", "distill", "unisd", "recovery", "student"):  # the training recipes
        assert typing.get_type_hints(RECIPES.get(name).config_cls)["eval"] is EvalSpec, name
    shared = {f.name: f for f in dataclasses.fields(EvalSpec)}
    standalone = {f.name: f for f in dataclasses.fields(EvalConfig)}
    assert issubclass(EvalConfig, EvalSpec) and list(standalone)[:len(shared)] == list(shared)
    assert all(standalone[k].default == f.default for k, f in shared.items())
    cfg = from_dict(EvalConfig, {"recipe": "evaluate", "tasks": ["rotten_tomatoes"]})
    assert (cfg.limit, cfg.batch_size) == (200, 16)
    assert from_dict(EvalConfig, {"tasks": ["rotten_tomatoes"], "limit": None}).limit is None
    for cls in (EvalSpec, EvalConfig):  # the shared checks apply to both
        with pytest.raises(ConfigError, match="batch_size must be >= 1"):
            from_dict(cls, {"batch_size": 0})
        with pytest.raises(ConfigError, match="scoring"):
            from_dict(cls, {"scoring": "likelyhood"})
    with pytest.raises(ConfigError, match="n_boot"):
        from_dict(EvalConfig, {"n_boot": 0})


@pytest.mark.parametrize("module", ["benchmarks.evaluate", "benchmarks.cka"])
def test_documented_module_commands_start(module):
    """`python -m benchmarks.evaluate` / `python -m benchmarks.cka` (README) run their package's __main__."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"usage: python -m {module}")
