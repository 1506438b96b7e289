"""The fast path wired into the recipes: completion-only output layer (SFT, distillation), the
shared teacher-logit cache (``teacher.cache``), ``train.dtype``.

Reference: the same recipe with ``train.completion_only: false`` (full logits at every position,
as before) and without ``teacher.cache`` (the live teacher at every step).  Tolerance: float32
rounding of a different summation order -- losses rel 1e-5, weights after the run atol 1e-5
(the updates are lr * O(1) steps of AdamW, whose first steps amplify gradient rounding of
near-zero entries, so weights are compared absolutely; measured: 2.2e-06 on the tied embedding with
2 CPU threads, below 1e-6 with one)."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from scd.core.config import ConfigError, load_config
from scd.core.engine import Engine, deepspeed_config
from scd.core.results import read_metrics
from scd.core.train import TrainConfig
from scd.models import TinyConfig, tiny_model
from scd.sft import SFTRecipe

V = 101
SHAPE = "{num_hidden_layers: 2, hidden_size: 32, intermediate_size: 64, num_attention_heads: 2, num_key_value_heads: 1}"


def encoded_examples(n=12, seed=0):
    """Random (prompt, completion) examples: 5-12 prompt tokens, 1-4 target tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, c = int(torch.randint(5, 13, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        ids = torch.randint(1, V, (p + c,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


def sft_step(completion_only, head=None, untied=False):
    """(loss, grads) of one engine step (accumulate: forward + backward, no update) of the SFT recipe."""
    model = tiny_model(V, TinyConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                     tie_word_embeddings=not untied), seed=3)
    if head is not None:
        model.lm_head = head(model.lm_head)
    train = TrainConfig(batch_size=4, grad_accum=2, device="cpu", completion_only=completion_only)
    engine = Engine(model, train, run_dir=None)
    engine.new_schedule(1)
    out = engine.accumulate(SFTRecipe(engine, encoded_examples(), pad_id=0, seed=0), 0)
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class ScaledHead(nn.Linear):
    """Not a plain nn.Linear (as a LoRA-adapted head): the recipe calls it as a module."""

    def __init__(self, lin):
        super().__init__(lin.in_features, lin.out_features, bias=False)
        self.weight = lin.weight

    def forward(self, x):
        return super().forward(x) * 1.5


@pytest.mark.parametrize("head,untied", [(None, False), (None, True), (ScaledHead, False)])
def test_sft_engine_step_completion_only_equals_full_logits(head, untied):
    fast, g_fast = sft_step(True, head, untied)
    full, g_full = sft_step(False, head, untied)
    assert fast["ce"] == pytest.approx(full["ce"], rel=1e-6) and fast["n_tokens"] == full["n_tokens"] > 8
    assert set(g_fast) == set(g_full) and len(g_fast) > 10
    for n in g_full:
        torch.testing.assert_close(g_fast[n], g_full[n], rtol=1e-4, atol=1e-7, msg=n)


def test_train_dtype_and_bf16_alias(tmp_path):
    assert not TrainConfig().use_bf16 and TrainConfig(bf16=True).use_bf16 and TrainConfig(dtype="bf16").use_bf16
    assert not TrainConfig(dtype="fp32").use_bf16
    p = tmp_path / "c.yaml"
    p.write_text("recipe: sft\ntrain: {dtype: fp32, bf16: true}\n")
    with pytest.raises(ConfigError, match="train.dtype is fp32 but train.bf16 is true"):
        load_config(p)
    p.write_text("recipe: sft\ntrain: {dtype: fp16}\n")
    with pytest.raises(ConfigError, match="train.dtype must be one of fp32, bf16"):
        load_config(p)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"bf16": {"enabled": "auto"}}))
    assert deepspeed_config(str(ds), TrainConfig(dtype="bf16"), 1)["bf16"]["enabled"] is True
    assert deepspeed_config(str(ds), TrainConfig(bf16=True), 1)["bf16"]["enabled"] is True
    assert deepspeed_config(str(ds), TrainConfig(), 1)["bf16"]["enabled"] is False


def test_bf16_engine_step_fp32_master_weights_and_loss():
    """dtype bf16: weights and gradients stay fp32; the loss is within bf16 rounding of fp32's."""
    outs = {}
    for dtype in ("fp32", "bf16"):
        model = tiny_model(V, TinyConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64), seed=3)
        engine = Engine(model, TrainConfig(batch_size=4, device="cpu", dtype=dtype), run_dir=None)
        engine.new_schedule(1)
        outs[dtype] = engine.train_step(SFTRecipe(engine, encoded_examples(), pad_id=0, seed=0), 0)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(s["exp_avg"].dtype == torch.float32 for s in engine.backend.opt.state.values())
    assert outs["bf16"]["ce"] == pytest.approx(outs["fp32"]["ce"], rel=2e-2)
    assert outs["bf16"]["ce"] != outs["fp32"]["ce"]  # the forward did run in bf16


# ------------------------------------------------------------------------- distillation
TEACHER = f"""
recipe: teacher
method: teacher-fast
seed: 0
model: {{name: tiny, tiny: {SHAPE}}}
data: {{tasks: [rotten_tomatoes], limit_per_task: 12}}
train: {{lr: 1.0e-2, max_steps: 4, batch_size: 2, max_len: 48, save_every: 0, log_every: 1}}
schedule: {{name: even_steps, n_checkpoints: 2}}
dev: {{limit_per_task: 4, batch_size: 4}}
"""

DISTILL = """
recipe: distill
method: {method}
seed: 0
model: {{name: student, init_from: tiny, keep_layers: [1], tiny: {shape}}}
teacher: {{run_dir: {teacher}{cache}}}
stages: {{n_stages: {n_stages}, steps_per_stage: 2, selection: {selection}}}
loss: {{divergence: forward_kl, temperature: 2.0}}
weighting: {weighting}
probe: {{n: 6, batch_size: 4}}
data: {{tasks: [rotten_tomatoes], limit_per_task: 12}}
train: {{lr: 5.0e-3, batch_size: 4, max_len: {max_len}, save_every: 0, log_every: 1, completion_only: {fast}{train}}}
eval: {{tasks: []}}
save_model: true
"""


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    from scd.teacher import run as run_teacher

    tmp = tmp_path_factory.mktemp("fastint")
    (tmp / "t.yaml").write_text(TEACHER)
    run_teacher(load_config(tmp / "t.yaml"), tmp / "teacher")
    (tmp / "anchor").mkdir()
    return tmp


def distill(tmp, name, *, fast=True, cache=None, method="kd", n_stages=1, selection="final",
            weighting="{name: none, alpha: 0.5}", max_len=48, train=""):
    """Run the distill recipe -> (loss rows, final weights, run.json)."""
    from scd.distill import run

    text = DISTILL.format(method=method, shape=SHAPE, teacher=tmp / "teacher", n_stages=n_stages,
                          selection=selection, weighting=weighting, fast=str(fast).lower(),
                          cache="" if cache is None else f", cache: {cache}", max_len=max_len,
                          train=f", {train}" if train else "")
    (tmp / f"{name}.yaml").write_text(text)
    rec = run(load_config(tmp / f"{name}.yaml"), tmp / name)
    rows = [r for r in read_metrics(tmp / name / "metrics.jsonl") if "loss" in r]
    return rows, load_file(str(tmp / name / "model" / "model.safetensors")), rec


def full_cache(tmp):
    return f"{{k: full, root: {tmp / 'tl'}}}"


def assert_same_run(a, b, rel=1e-5, atol=1e-5):
    """Same logged terms (relative ``rel``; 1e-6 absolute for terms near 0, e.g. a KD of 5e-3 whose float32 rounding
    differs by 4e-7 between the shared-prefix and plain paths on some CPUs) and weights within ``atol``."""
    (ra, wa, _), (rb, wb, _) = a, b
    assert len(ra) == len(rb) >= 2
    for x, y in zip(ra, rb):
        for key in ("loss", "kd", "ce", "w_mean", "tokens"):
            assert x[key] == pytest.approx(y[key], rel=rel, abs=1e-6), key
    for k in wa:
        diff = float((wa[k].double() - wb[k].double()).abs().max())
        assert diff <= atol, f"{k}: max |diff| {diff:.3g} > {atol}"


@pytest.fixture(scope="module")
def live_kd(teacher_run):
    return distill(teacher_run, "kd-live")


def test_distill_completion_only_equals_full_logits(teacher_run, live_kd):
    full = distill(teacher_run, "kd-full", fast=False)
    assert_same_run(live_kd, full)
    assert live_kd[2]["train"]["teacher_forwards_train"] == 2 and live_kd[2]["train"]["teacher_loads"] == 1


def test_distill_with_a_shared_prompt_prefix_equals_the_plain_run(teacher_run, monkeypatch):
    """train.share_prefix: the RT prompts' common prefix (system prompt + instruction) runs once per
    batch for the student and the live teacher; same losses and weights as the plain run."""
    import scd.heads

    shared = []
    original = scd.heads.shared_prefix_len
    monkeypatch.setattr(scd.heads, "shared_prefix_len", lambda *a: shared.append(original(*a)) or shared[-1])
    plain = distill(teacher_run, "kd-plain128", max_len=128)
    assert shared == []  # off by default
    share = distill(teacher_run, "kd-share128", max_len=128, train="share_prefix: true")
    assert len(shared) >= 4 and min(shared) >= scd.heads.MIN_SHARED_PREFIX  # student and teacher, every step
    assert_same_run(share, plain)


def test_kd_cache_full_equals_live_and_is_reused(teacher_run, live_kd):
    first = distill(teacher_run, "kd-cache1", cache=full_cache(teacher_run))
    assert_same_run(live_kd, first)
    tc = first[2]["train"]["teacher_cache"]
    assert tc["k"] == "full" and Path(tc["root"]) == teacher_run / "tl"
    (c,) = tc["caches"]
    assert c["built_shards"] == 1 and c["teacher_forwards"] > 0 and c["gap_kl_probe"] == 0.0
    assert first[2]["train"]["teacher_forwards_train"] == c["teacher_forwards"]  # the build only, no live step

    second = distill(teacher_run, "kd-cache2", cache=full_cache(teacher_run))  # same teacher, data: no teacher at all
    assert_same_run(first, second, rel=0, atol=0)
    t2 = second[2]["train"]
    assert t2["teacher_forwards_train"] == 0 and t2["teacher_loads"] == 0
    assert t2["teacher_cache"]["caches"][0]["id"] == c["id"] and t2["teacher_cache"]["caches"][0]["built_shards"] == 0

    shard = Path(c["path"]) / "shard-00000.safetensors"  # corrupt it: detected (sha256), rebuilt, same run
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="corrupt"):
        third = distill(teacher_run, "kd-cache3", cache=full_cache(teacher_run))
    assert third[2]["train"]["teacher_cache"]["caches"][0]["built_shards"] == 1
    assert_same_run(first, third, rel=0, atol=0)


def test_topk_cache_records_a_small_positive_gap(teacher_run, live_kd):
    rows, _, rec = distill(teacher_run, "kd-top8", cache=f"{{k: 8, root: {teacher_run / 'tl'}}}")
    (c,) = rec["train"]["teacher_cache"]["caches"]
    assert c["k"] == 8 and 0 < c["gap_kl_probe"] < 5
    assert rows[0]["ce"] == pytest.approx(live_kd[0][0]["ce"], rel=1e-5)  # step 1: same student, same CE
    assert rows[0]["kd"] <= live_kd[0][0]["kd"] + 1e-6  # the bucketed top-k KL is a lower bound


def test_scd_aw_with_cache_equals_live(teacher_run):
    """scd_select probe KLs, AW per-sample teacher losses and every stage's targets from the cache."""
    from scd.sft import run as run_sft

    anchor = teacher_run / "anchor"
    (anchor / "a.yaml").write_text(f"recipe: sft\nmodel: {{name: student, init_from: tiny, keep_layers: [1], "
                                   f"tiny: {SHAPE}}}\ndata: {{tasks: [rotten_tomatoes], limit_per_task: 12}}\n"
                                   "train: {max_steps: 2, batch_size: 4, max_len: 48, save_every: 0}\n"
                                   "eval: {tasks: []}\n")
    run_sft(load_config(anchor / "a.yaml"), anchor / "run")
    kw = dict(method="scd_aw", n_stages=2, selection="scd_select",
              weighting=f"{{name: aw, anchor_run_dir: {anchor / 'run'}}}")
    live = distill(teacher_run, "aw-live", **kw)
    cached = distill(teacher_run, "aw-cache", cache=full_cache(teacher_run), **kw)
    assert_same_run(live, cached)
    sel = [[r for r in read_metrics(teacher_run / d / "metrics.jsonl") if r.get("event") == "select"]
           for d in ("aw-live", "aw-cache")]
    for a, b in zip(*sel):
        assert a["checkpoint"] == b["checkpoint"]
        for key in ("kl_best", "kl_student"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7)
    again = distill(teacher_run, "aw-cache2", cache=full_cache(teacher_run), **kw)
    assert again[2]["train"]["teacher_loads"] == 0 and again[2]["train"]["teacher_forwards_train"] == 0
    assert_same_run(cached, again, rel=0, atol=0)


def test_cache_config_is_an_added_field(tmp_path):
    from scd.core.config import to_dict
    from scd.distill import DistillConfig

    cfg = load_config(_write(tmp_path, "recipe: distill\nteacher: {run_dir: x}\n"))
    assert "cache" not in to_dict(cfg)["teacher"] and "dtype" not in to_dict(cfg)["train"]
    assert "completion_only" not in to_dict(cfg)["train"]
    cfg = load_config(_write(tmp_path, "recipe: distill\nteacher: {run_dir: x, cache: {k: full}}\n"))
    assert to_dict(cfg)["teacher"]["cache"] == {"k": "full", "root": None, "dtype": "float32"}
    with pytest.raises(ConfigError, match="teacher.cache.k must be a positive integer or 'full'"):
        load_config(_write(tmp_path, "recipe: distill\nteacher: {run_dir: x, cache: {k: 0}}\n"))
    assert isinstance(dataclasses.replace(DistillConfig(teacher=cfg.teacher)).teacher.cache.k, str)


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p
