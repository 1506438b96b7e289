"""Bad input -> one clear line naming the file / line / key (and a hint), exit code != 0,
never a traceback from deep inside torch.  docs/reliability.md lists every case and its
message (the strings asserted here).

Most cases run the real CLI in-process (``scd.cli.main``, stderr captured: an uncaught
exception would fail the test with its traceback); a few run ``python -m ...`` in a
subprocess to check what a user sees.  Data cases use a private cache (``SCD_CACHE``) whose
models/raw assets are symlinks to the real cache and whose task JSONL files are edited.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from scd.cli import main as cli_main
from tests.reliability._helpers import REPO, SHAPE, run_cli

SFT = f"""\
recipe: sft
method: sft-bad
seed: 0
model: {{name: tiny, tiny: {SHAPE}}}
data: {{tasks: [rotten_tomatoes], limit_per_task: 8}}
train:
  lr: 1.0e-3
  max_steps: 1
  batch_size: 2
  max_len: 64
eval: {{tasks: []}}
"""


def write(tmp: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def one_line_error(err: str) -> str:
    """The last stderr line; asserts there is no traceback at all."""
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines, "no error message on stderr"
    return lines[-1]


def run_inproc(capsys, *argv) -> tuple[int, str]:
    rc = cli_main([str(a) for a in argv])
    msg = one_line_error(capsys.readouterr().err)
    print(f"MESSAGE rc={rc} {msg}")  # `pytest -s`: the messages copied into docs/reliability.md
    return rc, msg


# ------------------------------------------------------------------------ config errors
def test_unknown_config_key_names_file_line_key_and_suggests(tmp_path, capsys):
    cfg = write(tmp_path, SFT.replace("  max_len: 64", "  max_lenght: 64"))
    rc, msg = run_inproc(capsys, "run", cfg, "--run-dir", tmp_path / "r")
    assert rc == 2
    assert msg == f"error: {cfg}:10: key 'train.max_lenght': unknown key in TrainConfig (did you mean 'max_len'?)"
    assert not (tmp_path / "r").exists()  # nothing written for a config error


def test_unknown_override_key(tmp_path, capsys):
    rc, msg = run_inproc(capsys, "run", write(tmp_path, SFT), "train.lrr=1", "--run-dir", tmp_path / "r")
    assert rc == 2 and "key 'train.lrr': unknown key in TrainConfig (did you mean 'lr'?)" in msg


@pytest.mark.parametrize("override, key, expect", [
    ("train.lr=abc", "train.lr", "expected a number, got 'abc'"),
    ("model.tiny.hidden_size=wide", "model.tiny.hidden_size", "expected an integer, got 'wide'"),
    ("train.max_steps=0", "train", "train.max_steps must be >= 1, got 0"),
    ("data.limit_per_task=0", "data", "data.limit_per_task must be >= 1"),
])
def test_wrong_types_and_values(tmp_path, capsys, override, key, expect):
    cfg = write(tmp_path, SFT)
    rc, msg = run_inproc(capsys, "run", cfg, override, "--run-dir", tmp_path / "r")
    assert rc == 2 and str(cfg) in msg and f"key '{key}'" in msg and expect in msg, msg


def test_unknown_unisd_component_did_you_mean(tmp_path, capsys):
    cfg = REPO / "configs" / "unisd" / "base_tiny.yaml"
    rc, msg = run_inproc(capsys, "run", cfg, "components.ema_teachr=true", "--run-dir", tmp_path / "r")
    assert rc == 2
    assert msg.startswith(f"error: {cfg}: components.ema_teachr: unknown component 'ema_teachr' "
                          "(did you mean 'ema_teacher'?); known: ")
    assert "list its module in `plugins:`" in msg


@pytest.mark.parametrize("config, override, expect", [
    ("scd/kd_tiny.yaml", "loss.divergence=forward_kll",
     "key 'loss': loss.divergence: unknown loss 'forward_kll' (did you mean 'forward_kl'?)"),
    ("unisd/base_tiny.yaml", "loss.divergence=revers_kl",
     "key 'loss': loss.divergence: unknown loss 'revers_kl' (did you mean 'reverse_kl'?)"),
    ("scd/kd_tiny.yaml", "stages.selection=scd_selekt",
     "key 'stages': stages.selection: unknown selection 'scd_selekt' (did you mean 'scd_select'?)"),
    ("scd/kd_tiny.yaml", "weighting.name=awx",
     "key 'weighting': weighting.name: unknown weighting 'awx' (did you mean 'aw'?)"),
    ("recovery/prune_tiny.yaml", "degradation.name=prunee",
     "'prunee'"),
])
def test_unknown_component_names(tmp_path, capsys, config, override, expect):
    cfg = REPO / "configs" / config
    rc, msg = run_inproc(capsys, "run", cfg, override, "--run-dir", tmp_path / "r")
    assert rc == 2 and str(cfg) in msg and expect in msg, msg
    if "degradation" in override:
        assert "degradation" in msg and "did you mean 'prune'" in msg, msg


@pytest.mark.parametrize("overrides, expect", [
    (["weighting.name=aw", "weighting.anchor_config=null"],
     "key 'weighting': weighting 'aw' needs a student anchor: set weighting.anchor_run_dir"),
    (["weighting.anchor_run_dir=/x"], "weighting: give either anchor_run_dir or anchor_config, not both"),
    (["teacher.run_dir=/x"], "key 'teacher': teacher: give either run_dir or config, not both"),
    (["teacher.config=null"], "teacher: set teacher.run_dir (a teacher run) or teacher.config"),
    (["mode=eval_teacher", "stages.selection=scd_select"],
     "mode eval_teacher scores one checkpoint: stages.selection must be final or best"),
])
def test_contradictory_distill_options(tmp_path, capsys, overrides, expect):
    cfg = REPO / "configs" / "scd" / "kd_tiny.yaml"
    rc, msg = run_inproc(capsys, "run", cfg, *overrides, "--run-dir", tmp_path / "r")
    assert rc == 2 and str(cfg) in msg and expect in msg, msg


def test_two_teacher_providers_in_unisd(tmp_path, capsys):
    """Only one registered component provides teacher targets, so register a second one."""
    from unisd.components.base import COMPONENTS, register_component
    from unisd.components.in_context_teacher import InContextTeacher

    if "second_teacher_test" not in COMPONENTS:
        register_component("second_teacher_test")(type("SecondTeacher", (InContextTeacher,), {}))
    cfg = REPO / "configs" / "unisd" / "base_tiny.yaml"
    rc, msg = run_inproc(capsys, "run", cfg, "components.second_teacher_test=true", "--run-dir", tmp_path / "r")
    assert rc == 2
    assert msg == (f"error: {cfg}: components: in_context_teacher and second_teacher_test both provide teacher "
                   "targets; enable exactly one teacher provider")
    rc, msg = run_inproc(capsys, "run", cfg, "components.in_context_teacher=false", "--run-dir", tmp_path / "r")
    assert rc == 2 and "components: no teacher provider is enabled; add one of" in msg


def test_missing_recipe_key_and_unknown_recipe(tmp_path, capsys):
    cfg = write(tmp_path, SFT.replace("recipe: sft\n", ""))
    rc, msg = run_inproc(capsys, "run", cfg, "--run-dir", tmp_path / "r")
    assert rc == 2 and msg.startswith(f"error: {cfg}:1: missing top-level key 'recipe'")
    cfg = write(tmp_path, SFT.replace("recipe: sft", "recipe: sfft"))
    rc, msg = run_inproc(capsys, "run", cfg, "--run-dir", tmp_path / "r")
    assert rc == 2 and f"{cfg}:1: key 'recipe': unknown recipe 'sfft'" in msg and "did you mean 'sft'" in msg


def test_validate_reports_every_bad_file(tmp_path, capsys):
    good, bad = write(tmp_path, SFT, "good.yaml"), write(tmp_path, SFT + "bogus: 1\n", "bad.yaml")
    rc = cli_main(["validate", str(good), str(bad)])
    cap = capsys.readouterr()
    assert rc == 1 and cap.out.strip().splitlines() == [f"ok    {good} (sft)"]
    assert cap.err.strip().splitlines() == [f"error {bad}:12: key 'bogus': unknown key in SFTConfig"]


def test_subprocess_cli_and_grid_give_one_line(tmp_path):
    """What a user sees from ``python -m scd run`` and ``python -m benchmarks.grid``."""
    cfg = write(tmp_path, SFT.replace("  lr: 1.0e-3", "  lr: fast"))
    p = run_cli(["scd", "run", cfg, "--run-dir", tmp_path / "r"], tmp_path)
    assert p.returncode == 2
    assert one_line_error(p.stderr) == f"error: {cfg}:7: key 'train.lr': expected a number, got 'fast'"
    grid = write(tmp_path, f"recipe: grid\nname: g\nbase: {cfg}\nseeds: [0]\nrunz: []\n", "g.yaml")
    p = run_cli(["benchmarks.grid", grid, "--results-dir", tmp_path / "res", "--dry-run"], tmp_path)
    assert p.returncode != 0
    msg = one_line_error(p.stderr)
    assert str(grid) in msg and "runz" in msg and "did you mean 'runs'" in msg, msg


# -------------------------------------------------------------------------- data errors
@pytest.fixture()
def private_cache(tmp_path, monkeypatch):
    """SCD_CACHE with the real models/raw assets (symlinks) and copies of two tasks' data."""
    from scd.core.assets import cache_root

    real = cache_root()
    if not (real / "data" / "rotten_tomatoes" / "meta.json").exists():
        pytest.skip("task data not built (python -m scd.data.build)")
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in ("models", "raw", "downloads", "embeddings"):
        if (real / name).exists():
            (cache / name).symlink_to(real / name)
    for task in ("rotten_tomatoes", "wnut16"):
        shutil.copytree(real / "data" / task, cache / "data" / task)
    monkeypatch.setenv("SCD_CACHE", str(cache))
    return cache


def _edit_first_row(path: Path, **changes) -> None:
    lines = path.read_text().splitlines()
    row = json.loads(lines[0])
    row.update(changes)
    lines[0] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")


def test_empty_dataset(tmp_path, capsys, private_cache):
    (private_cache / "data" / "rotten_tomatoes" / "train.jsonl").write_text("")
    rc, msg = run_inproc(capsys, "run", write(tmp_path, SFT), "--run-dir", tmp_path / "r")
    assert rc == 1
    assert msg == ("error: run failed: ValueError: task 'rotten_tomatoes' split 'train' is empty "
                   f"(details in {tmp_path / 'r'}/run.json)")
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "failed"


def test_malformed_jsonl_row_names_file_and_line(tmp_path, capsys, private_cache):
    f = private_cache / "data" / "rotten_tomatoes" / "train.jsonl"
    lines = f.read_text().splitlines()
    lines[2] = lines[2][:40]  # a torn row
    f.write_text("\n".join(lines) + "\n")
    rc, msg = run_inproc(capsys, "run", write(tmp_path, SFT), "--run-dir", tmp_path / "r")
    assert rc == 1 and f"DataError: {f}:3: invalid JSON (" in msg
    assert "fix the file, rebuild it (python -m scd.data.build --force) or pass skip_malformed=True" in msg
    # the hint works: data.skip_malformed=true skips (and reports) the row
    rc = cli_main(["run", str(write(tmp_path, SFT)), "data.skip_malformed=true", "--run-dir", str(tmp_path / "r2")])
    assert rc == 0
    assert "[data] skipped 1 malformed row(s)" in capsys.readouterr().err


def test_label_outside_label_set(tmp_path, capsys, private_cache):
    f = private_cache / "data" / "rotten_tomatoes" / "train.jsonl"
    _edit_first_row(f, label="so-so")
    rc, msg = run_inproc(capsys, "run", write(tmp_path, SFT), "--run-dir", tmp_path / "r")
    assert rc == 1 and f"{f}:1: label 'so-so' is not in label_set" in msg


def test_bio_tags_tokens_length_mismatch(tmp_path, capsys, private_cache):
    f = private_cache / "data" / "wnut16" / "train.jsonl"
    row = json.loads(f.read_text().splitlines()[0])
    _edit_first_row(f, tags=row["tags"][:-1])
    cfg = write(tmp_path, SFT.replace("[rotten_tomatoes]", "[wnut16]"))
    rc, msg = run_inproc(capsys, "run", cfg, "--run-dir", tmp_path / "r")
    assert rc == 1 and f"{f}:1: {len(row['tokens'])} tokens but {len(row['tags']) - 1} tags" in msg, msg
    _edit_first_row(f, tags=["Q-person"] + row["tags"][1:])  # right length, not BIO
    rc, msg = run_inproc(capsys, "run", cfg, "--run-dir", tmp_path / "r2")
    assert rc == 1 and f"{f}:1: tag 'Q-person' is not BIO (O, B-TYPE or I-TYPE)" in msg


def test_unknown_task_names_the_key(tmp_path, capsys):
    cfg = write(tmp_path, SFT)
    rc, msg = run_inproc(capsys, "run", cfg, "data.tasks=[rotten_tomatos]", "--run-dir", tmp_path / "r")
    assert "did you mean 'rotten_tomatoes'" in msg  # true today
    assert rc == 2 and "data.tasks" in msg and str(cfg) in msg


def test_target_longer_than_the_context(tmp_path, capsys):
    rc, msg = run_inproc(capsys, "run", write(tmp_path, SFT), "train.max_len=2", "--run-dir", tmp_path / "r")
    assert rc == 1
    assert msg == ("error: run failed: ValueError: target of 2 tokens does not fit max_len=2 "
                   f"(details in {tmp_path / 'r'}/run.json)")


def test_prompt_longer_than_the_context_is_left_truncated(smol_tokenizer):
    """Documented behaviour (not an error): the prompt loses its start, the target is kept."""
    from scd.core.train import tokenize_sft

    out = tokenize_sft(smol_tokenizer, "a very long prompt " * 50, "positive", 8)
    t = smol_tokenizer("positive", add_special_tokens=False)["input_ids"]
    assert len(out["input_ids"]) == 8 and out["input_ids"][-len(t):] == t
    assert out["labels"] == [-100] * (8 - len(t)) + t


# ------------------------------------------------------------------- models and assets
def test_missing_assets_give_the_fetch_command(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    monkeypatch.setenv("SCD_CACHE", str(empty))
    rc, msg = run_inproc(capsys, "run", write(tmp_path, SFT), "--run-dir", tmp_path / "r")
    assert rc == 1
    assert f"AssetError: model 'smollm2-135m' not found at {empty}/models/smollm2-135m" in msg
    assert "python -m scd.assets fetch smollm2" in msg


def test_unknown_model_name_is_one_line(tmp_path, capsys):
    cfg = write(tmp_path, SFT)
    rc = cli_main(["run", str(cfg), "model.name=smollm2-135mm", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc != 0
    assert len([ln for ln in err.strip().splitlines() if ln.startswith("error") or "huggingface" in ln]) == 1
    assert "model.name" in err and "smollm2-135m" in err


def test_teacher_student_tokenizer_mismatch(tmp_path, capsys):
    from scd.core.assets import raw_dir

    bert = raw_dir("minilm") / "model"
    if not (bert / "tokenizer.json").exists():
        pytest.skip("MiniLM asset not fetched")
    teacher = write(tmp_path, f"""\
recipe: teacher
method: teacher-bert-vocab
model: {{name: tiny, tokenizer: {bert}, tiny: {SHAPE}}}
data: {{tasks: [rotten_tomatoes], limit_per_task: 4}}
train: {{max_steps: 1, batch_size: 2, max_len: 64}}
schedule: {{n_checkpoints: 1}}
dev: {{limit_per_task: 2, score: false}}
""", "teacher.yaml")
    assert cli_main(["run", str(teacher), "--run-dir", str(tmp_path / "t")]) == 0
    capsys.readouterr()
    kd = write(tmp_path, f"""\
recipe: distill
method: kd-mismatch
model: {{name: tiny, tiny: {SHAPE}}}
teacher: {{run_dir: {tmp_path / 't'}}}
data: {{tasks: [rotten_tomatoes], limit_per_task: 4}}
train: {{max_steps: 1, batch_size: 2, max_len: 64}}
""", "kd.yaml")
    rc, msg = run_inproc(capsys, "run", kd, "--run-dir", tmp_path / "r")
    assert rc == 1
    assert msg.startswith("error: run failed: ValueError: teacher and student tokenizers differ (30522 vs 49152 "
                          "tokens; first differing token "), msg
    assert "distillation needs shared token ids" in msg
