"""The student recipe (issue 18): greedy layer removal by dev KL, healing by KD at every position,
dev-KL early stop, resume, and other recipes taking the healed student as their model.

The fast greedy search (one model, layers swapped in place, the base's log-probs cached, padded
batches, fp32) is checked against a slow, obviously-correct one (a fresh copy of the model per
candidate via ``student_from_teacher``, every example on its own without padding, float64)."""
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from scd.core.config import ConfigError, load_config, to_dict
from scd.data_config import DataConfig
from scd.sft import run as sft_run
from scd.models import ModelConfig, StudentSource, build_model, student_from_teacher, tiny_model
from scd.student import DevKL, dev_sample, greedy_drop, layer_view, position_kd, resolve_model, text_batch
from scd.student import run as student_run
from scd.core.results import read_metrics, run_id
from tests.conftest import TINY_SHAPE, load_shipped, run_config, shipped_yaml, strip_time, tiny_config

SCALES = (1.0, 9.0, 3.0, 6.0)  # per-layer output scale: layers of clearly different importance


@pytest.fixture(scope="module")
def base(smol_tokenizer):
    """A random-init 4-layer Llama whose layers matter unequally (their MLP outputs scaled)."""
    tok = smol_tokenizer
    m = tiny_model(len(tok), tiny_config(num_hidden_layers=4), seed=0, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        for layer, s in zip(m.model.layers, SCALES):
            layer.mlp.down_proj.weight.mul_(s)
            layer.self_attn.o_proj.weight.mul_(s)
    return m.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def dev(smol_tokenizer):
    """6 dev examples of RT + WNUT (prompt + answer text), of different lengths."""
    enc = dev_sample(DataConfig(tasks=("rotten_tomatoes", "wnut16")), smol_tokenizer, "dev", 6, 96)
    assert len({len(e["input_ids"]) for e in enc}) > 1  # padding is exercised
    return enc


# ------------------------------------------------------------------------ slow reference
def slow_kl(base, pruned, encoded) -> float:
    """KL(base || pruned) in float64, token mean over every position with a next token, one unpadded
    example at a time."""
    num, den = 0.0, 0
    for e in encoded:
        ids = torch.tensor([e["input_ids"]])
        with torch.no_grad():
            p = base(input_ids=ids, use_cache=False).logits[0, :-1].double().log_softmax(-1)  # [L-1, V]
            q = pruned(input_ids=ids, use_cache=False).logits[0, :-1].double().log_softmax(-1)
        num += float((p.exp() * (p - q)).sum())
        den += ids.shape[1] - 1
    return num / den


def slow_greedy(base, encoded, n_keep):
    """The greedy removal written out: a fresh pruned copy per candidate, ties to the lowest index."""
    kept, steps = list(range(base.config.num_hidden_layers)), []
    while len(kept) > n_keep:
        scores = {i: slow_kl(base, student_from_teacher(base, [j for j in kept if j != i]).eval(), encoded)
                  for i in kept}
        drop = min(kept, key=lambda i: (scores[i], i))
        kept.remove(drop)
        steps.append((drop, scores[drop], scores))
    return kept, steps


# ------------------------------------------------------------------------------- the cut
def test_layer_view_runs_the_kept_layers_and_restores(base, dev, smol_tokenizer):
    batch = text_batch(dev[:3], smol_tokenizer.pad_token_id)
    args = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    with torch.no_grad():
        full = base(**args).logits
        copy = student_from_teacher(base, [0, 2]).eval()(**args).logits
        with layer_view(base, [0, 2]):
            view = base(**args).logits
            assert base.config.num_hidden_layers == 2
        after = base(**args).logits
    torch.testing.assert_close(view, copy, rtol=0, atol=1e-5)
    assert (view - full).abs().max() > 1e-2  # the cut changes the output ...
    assert torch.equal(after, full) and base.config.num_hidden_layers == 4 and len(base.model.layers) == 4


def test_dev_kl_matches_float64_unpadded_reference(base, dev, smol_tokenizer):
    kl = DevKL(base, dev, smol_tokenizer.pad_token_id, 4, torch.device("cpu"))
    assert kl.n_tokens == sum(len(e["input_ids"]) - 1 for e in dev)
    assert abs(kl(base)) < 1e-6  # the base against itself
    for keep in ([0, 1, 2], [1, 3], [3]):
        want = slow_kl(base, student_from_teacher(base, keep).eval(), dev)
        assert want > 1e-3
        assert kl.of_layers(base, keep) == pytest.approx(want, rel=1e-4)


def test_greedy_search_equals_slow_reference(base, dev, smol_tokenizer):
    kl = DevKL(base, dev, smol_tokenizer.pad_token_id, 4, torch.device("cpu"))
    kept, trace = greedy_drop(4, 2, lambda keep: kl.drop_each(base, keep))
    want_kept, want_steps = slow_greedy(base, dev, 2)
    assert kept == want_kept and [t["drop"] for t in trace] == [s[0] for s in want_steps]
    for t, (_, score, scores) in zip(trace, want_steps):
        assert t["kl"] == pytest.approx(score, rel=1e-4)
        assert {i: s for i, s in t["candidates"]} == pytest.approx(scores, rel=1e-4)
        gaps = sorted(scores.values())
        assert gaps[1] - gaps[0] > 1e-3 * gaps[0]  # the choice is not decided by float rounding
    assert kept != [0, 3]  # importance, not even spacing, decides (layer 1 matters most here)
    assert 1 in kept


def test_drop_each_shares_prefixes_and_equals_each_trial_run_alone(base, dev, smol_tokenizer):
    kl = DevKL(base, dev, smol_tokenizer.pad_token_id, 4, torch.device("cpu"))
    for kept in ([0, 1, 2, 3], [0, 2, 3], [1, 3], [2]):
        want = [kl.of_layers(base, [j for j in kept if j != i]) for i in kept]
        assert kl.drop_each(base, kept) == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert len(base.model.layers) == 4 and not base.model.layers[0]._forward_pre_hooks  # restored, unhooked


def each(score):
    """``drop_each`` from a ``score(kept)``: the slow form greedy_drop documents."""
    return lambda kept: [score([j for j in kept if j != i]) for i in kept]


def test_greedy_drop_pure():
    importance = {0: 5.0, 1: 0.5, 2: 2.0, 3: 0.5, 4: 9.0}  # additive: drops the least important first
    kept, trace = greedy_drop(5, 2, each(lambda keep: sum(importance[i] for i in range(5) if i not in keep)))
    assert kept == [0, 4] and [t["drop"] for t in trace] == [1, 3, 2]  # tie 1 / 3 -> lower index first
    assert [t["kl"] for t in trace] == [0.5, 1.0, 3.0]
    assert [i for i, _ in trace[0]["candidates"]] == [0, 1, 2, 3, 4] and len(trace[2]["candidates"]) == 3
    # interaction: dropping 0 alone is cheapest, but once 2 is gone 0 becomes essential
    inter = lambda keep: (0 not in keep) * (0.1 if 2 in keep else 50.0) + (2 not in keep) * 0.2 + (1 not in keep)
    assert greedy_drop(3, 1, each(inter))[0] == [2]  # drop 0 (0.1), then 1 (1.1 < 50.2)
    assert greedy_drop(3, 3, each(inter)) == ([0, 1, 2], [])
    with pytest.raises(ValueError, match=r"cut.keep must be in \[1, 3\]"):
        greedy_drop(3, 4, each(inter))
    with pytest.raises(ValueError, match="returned 1 scores for 3 kept layers"):
        greedy_drop(3, 1, lambda kept: [0.0])


def test_greedy_drop_resumes_from_saved_steps():
    importance = {0: 5.0, 1: 0.5, 2: 2.0, 3: 0.7, 4: 9.0}
    score = each(lambda keep: sum(importance[i] for i in range(5) if i not in keep))
    saved, calls = [], []
    full = greedy_drop(5, 2, score, on_step=lambda trace: saved.append([dict(t) for t in trace]))
    assert [len(t) for t in saved] == [1, 2, 3] and saved[-1] == full[1]
    counted = lambda kept: (calls.append(list(kept)), score(kept))[1]
    assert greedy_drop(5, 2, counted, trace=saved[1]) == full  # killed after two removals
    assert calls == [[0, 2, 4]]  # only the missing step is searched
    with pytest.raises(ValueError, match="distinct layers"):
        greedy_drop(5, 2, score, trace=[{"drop": 1}, {"drop": 1}])


# ------------------------------------------------------------------------------- healing
def test_position_kd_is_forward_kl_at_every_position(base, dev, smol_tokenizer):
    batch = text_batch(dev[:3], smol_tokenizer.pad_token_id)
    student = student_from_teacher(base, [0, 1, 3]).eval()
    kd = position_kd(student, base, batch)
    ref = []
    for e in dev[:3]:  # float64, unpadded: positions 0 .. L-2 of every example
        ids = torch.tensor([e["input_ids"]])
        with torch.no_grad():
            p = base(input_ids=ids, use_cache=False).logits[0, :-1].double().log_softmax(-1)
            q = student(input_ids=ids, use_cache=False).logits[0, :-1].double().log_softmax(-1)
        ref.append((p.exp() * (p - q)).sum(-1))
    ref = torch.cat(ref)
    assert ref.mean() > 1e-3 and kd.shape == ref.shape
    torch.testing.assert_close(kd.double(), ref, rtol=1e-3, atol=1e-5)  # fp32 logits vs float64
    assert float(kd.detach().double().sum()) == pytest.approx(float(ref.sum()), rel=1e-4)


def tiny_student(tmp_path, name="student.yaml", **over):
    """configs/student/student_tiny.yaml on the tests' tiny shape, 16 examples per task, 6 steps."""
    return shipped_yaml(tmp_path, "configs/student/student_tiny.yaml", {
        "method": "student-test", "base.tiny": tiny_shape_4(), "data.limit_per_task": 16, "dev.n": 6,
        "train.max_steps": 6, "train.max_len": 64, "train.save_every": 2, "train.log_every": 1,
        "heal.eval_every": 2, **over}, name=name)


def tiny_shape_4():
    return {**TINY_SHAPE, "num_hidden_layers": 4}


def test_run_records_cut_and_curve_and_ends_on_best(tmp_path):
    cfg = load_config(tiny_student(tmp_path, **{"heal.patience": 10}))
    rec = student_run(cfg, tmp_path / "run")
    s = rec["student"]
    assert rec["status"] == "ok" and s["n_layers"] == 4 and len(s["kept_layers"]) == 2
    assert sorted(s["kept_layers"] + s["dropped_in_order"]) == [0, 1, 2, 3]
    assert s["dropped_in_order"][0] == min(s["single_drop_kl"], key=lambda c: (c[1], c[0]))[0]
    assert s["kl_before"] == pytest.approx(s["kl_cut"], rel=1e-5)  # the copy measures as the layer view did
    assert s["greedy_kl"][-1] == s["kl_cut"]
    assert [c["step"] for c in s["curve"]] == [0, 2, 4, 6] and s["heal_steps"] == 6 and not s["stopped_early"]
    best = min(s["curve"], key=lambda c: c["dev_kl"])
    assert s["best_step"] == best["step"] and s["kl_after"] == best["dev_kl"]
    assert s["kl_after"] < 0.9 * s["kl_before"]  # healing works (lr 1e-3 of the shipped tiny config)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "dev_kl" in r]
    assert [r["dev_kl"] for r in rows] == [c["dev_kl"] for c in s["curve"]]
    # the saved model is the best measurement's: re-measured from model/ it gives kl_after
    model, tok = build_model(ModelConfig(name=str(tmp_path / "run" / "model")))
    assert model.config.num_hidden_layers == 2
    base, _ = build_model(cfg.base, seed=cfg.seed)
    dev = DevKL(base.eval(), dev_sample(cfg.data, tok, "dev", 6, 64), tok.pad_token_id, cfg.dev.batch_size, "cpu")
    assert dev(model.eval()) == pytest.approx(s["kl_after"], rel=1e-4)
    assert not (tmp_path / "run" / "heal_best.safetensors").exists() and not (tmp_path / "run" / "ckpt").exists()


def test_early_stop_when_dev_kl_stops_falling(tmp_path):
    """min_delta larger than any KL: no measurement after step 0 is a new best -> stop after `patience`."""
    cfg = load_config(tiny_student(tmp_path, **{"heal.patience": 1, "heal.min_delta": 100.0}))
    rec = student_run(cfg, tmp_path / "run")
    s = rec["student"]
    assert rec["train"]["steps"] == 2 and s["stopped_early"] and [c["step"] for c in s["curve"]] == [0, 2]
    assert s["best_step"] == 0 and s["kl_after"] == s["kl_before"]  # the unhealed cut's weights are restored
    ref = student_from_teacher(build_model(cfg.base, seed=cfg.seed)[0], s["kept_layers"]).state_dict()
    got = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    for k, v in got.items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0)


def test_a_committed_cut_of_the_same_run_is_reused_not_searched(tmp_path, monkeypatch):
    """A new machine without the run's directory takes the finished cut from the run's committed record (same run
    id), as the resumed run of a killed search would; another config's record is not taken."""
    import scd.student.recipe as recipe

    cfg = load_config(tiny_student(tmp_path, **{"heal.patience": 10}))
    first = student_run(cfg, tmp_path / "records" / "study" / "student-first")  # a committed record
    (tmp_path / "records" / "study" / "student-first" / "model").rename(tmp_path / "weights-not-committed")
    monkeypatch.setattr(recipe, "RECORDS", tmp_path / "records")
    monkeypatch.setattr(recipe, "greedy_drop", lambda *a, **k: pytest.fail("the greedy search ran again"))
    again = student_run(cfg, tmp_path / "new-machine")
    record = tmp_path / "records" / "study" / "student-first" / "cut.json"
    assert again["student"]["kept_layers"] == first["student"]["kept_layers"]
    assert again["student"]["greedy_kl"] == first["student"]["greedy_kl"]
    assert again["student"]["cut_from"] == str(record) and first["student"]["cut_from"] is None
    other = load_config(tiny_student(tmp_path, "other.yaml", **{"heal.patience": 9}))  # another run id
    assert recipe.committed_cut(run_id(to_dict(other)), tmp_path / "records") is None
    assert recipe.committed_cut(first["run_id"], tmp_path / "records") == record


@pytest.mark.slow  # three CLI runs: ~35 s on 2 idle CPU cores
def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    cfg = tiny_student(tmp_path, **{"heal.patience": 10})
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert run_config(cfg, ref, timeout=600).returncode == 0
    p = run_config(cfg, killed, fault="step:3", timeout=600)
    assert p.returncode == -9, p.stderr[-2000:]
    assert (killed / "cut.json").is_file()  # the greedy search is not redone
    p = run_config(cfg, killed, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed at step 2" in p.stdout + p.stderr
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (ref, killed))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    ra, rb = (json.loads((d / "run.json").read_text())["student"] for d in (ref, killed))
    assert ra["curve"] == rb["curve"] and ra["kept_layers"] == rb["kept_layers"]
    assert strip_time(read_metrics(ref / "metrics.jsonl")) == strip_time(read_metrics(killed / "metrics.jsonl"))


# ------------------------------------------------------------------ as another recipe's model
def test_sft_trains_on_the_student_run_trained_on_demand(tmp_path):
    student_cfg = tiny_student(tmp_path, **{"train.max_steps": 2})
    results = tmp_path / "results"
    over = {"model": {"student": {"config": str(student_cfg), "seed": 0, "results_dir": str(results)}},
            "data.limit_per_task": 8, "train.max_steps": 2, "train.max_len": 64, "eval.tasks": []}
    cfg = load_shipped("configs/scd/sft_tiny.yaml", over)
    rec = sft_run(cfg, tmp_path / "sft")
    assert rec["status"] == "ok"
    (student_dir,) = [p for p in (results / "runs").iterdir() if p.is_dir()]
    assert student_dir.name.startswith("student-test-")
    assert json.loads((student_dir / "run.json").read_text())["status"] == "ok"
    sft_model = load_file(str(tmp_path / "sft" / "model" / "model.safetensors"))
    assert not any(".layers.2." in k for k in sft_model)  # the 2-layer student was trained
    mtime = (student_dir / "run.json").stat().st_mtime_ns
    resolved = resolve_model(cfg.model, 0)  # reused, not retrained
    assert resolved.name == str(student_dir / "model") and resolved.student is None
    assert (student_dir / "run.json").stat().st_mtime_ns == mtime
    built = json.loads((student_dir / "run.json").read_text())
    file_sha = hashlib.sha256((student_dir / "model" / "model.safetensors").read_bytes()).hexdigest()
    assert rec["dependencies"] == {"student": {  # which build: a student retrained elsewhere is another build
        "path": str(student_dir / "model"), "run": student_dir.name, "finished": built["finished"],
        "git_sha": built["git_sha"], "weights_sha256": file_sha}}  # one weight file: its sha256sum


# ------------------------------------------------------------------------------- configs
def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"cut.kep.*did you mean 'keep'"):
        load_config(tiny_student(tmp_path, **{"cut.kep": 2}))
    with pytest.raises(ConfigError, match=r"cut.rule.*did you mean 'greedy_kl'"):
        load_config(tiny_student(tmp_path, **{"cut.rule": "greedy_k"}))
    with pytest.raises(ConfigError, match="rule 'fixed' needs cut.layers"):
        load_config(tiny_student(tmp_path, **{"cut.rule": "fixed"}))
    with pytest.raises(ConfigError, match=r"model.student.confg.*did you mean 'config'"):
        load_shipped("configs/scd/sft_tiny.yaml", {"model.student": {"confg": "x.yaml"}})
    with pytest.raises(ConfigError, match="drop model.init_from"):
        load_shipped("configs/scd/kd_tiny.yaml", {"model.student": {"config": "configs/student/student_tiny.yaml"}})
    with pytest.raises(ValueError, match="recipe: student` config is needed as the model.student, got recipe 'sft'"):
        resolve_model(ModelConfig(student=StudentSource(config="configs/scd/sft_tiny.yaml")), 0)
    with pytest.raises(ValueError, match="resolves first"):
        build_model(ModelConfig(student=StudentSource(config="configs/student/student_tiny.yaml")))


def test_fixed_cut_is_measured_not_searched(tmp_path):
    cfg = load_config(tiny_student(tmp_path, **{"cut.rule": "fixed", "cut.layers": "every_k:3",
                                                 "train.max_steps": 1}))
    s = student_run(cfg, tmp_path / "run")["student"]
    assert s["kept_layers"] == [0, 3] and s["dropped_in_order"] == [] and s["kl_before"] == pytest.approx(s["kl_cut"])
