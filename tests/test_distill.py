"""Distillation recipe (KD / CD / SCD / SCD+AW) on tiny random-init Llamas and real
rotten_tomatoes data: loss math through the recipe's own functions, AW limits,
batch x accumulation invariance, scd_select end to end against an independent KL
reference, in-place teacher switches, exact resume after SIGKILL, and the start-up
errors (edited checkpoint, tokenizer mismatch), NaN -> diverged."""
import hashlib
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from scd.cli import main as cli_main
from scd.core.config import ConfigError, load_config, to_dict
from scd.core.results import read_metrics
from scd.distill import run as distill_run
from tests.conftest import TINY_SHAPE, run_config, shipped_yaml, strip_time, tiny_config

TINY_DATA = {"data.tasks": ["rotten_tomatoes"], "data.limit_per_task": 16}
STUDENT = {"name": "student", "init_from": "tiny", "keep_layers": [1], "tiny": TINY_SHAPE}  # layer 1 of the base


def teacher_cfg(tmp):
    """configs/scd/teacher_tiny.yaml on the tiny shape: 6 steps of batch 2, 3 checkpoints, no resumable state."""
    return shipped_yaml(tmp, "configs/scd/teacher_tiny.yaml", {
        "method": "teacher-test", "model.tiny": TINY_SHAPE, **TINY_DATA, "train.max_steps": 6,
        "train.batch_size": 2, "train.max_len": 48, "train.save_every": 0, "train.log_every": 1,
        "dev": {"limit_per_task": 4, "batch_size": 4}}, name="teacher.yaml")


def anchor_cfg(tmp):
    """configs/scd/sft_anchor_tiny.yaml with the tests' student: 3 steps of batch 4."""
    return shipped_yaml(tmp, "configs/scd/sft_anchor_tiny.yaml", {
        "method": "anchor-test", "model": STUDENT, **TINY_DATA, "train.max_steps": 3, "train.max_len": 48,
        "train.save_every": 0, "train.log_every": 1}, name="anchor.yaml")


def distill_cfg(tmp, teacher, name="c.yaml", *, method="kd", n_stages=1, sps=2, selection="final",
                divergence="forward_kl", temperature=1.0, weighting=None, bs=4, accum=1, save_every=0,
                model=None, **extra):
    """configs/scd/kd_tiny.yaml with the tests' student, the teacher run ``teacher`` (None: none),
    rotten_tomatoes only and no evaluation; ``extra``: more dotted overrides."""
    return shipped_yaml(tmp, "configs/scd/kd_tiny.yaml", {
        "method": method, "model": model or STUDENT, "teacher": {} if teacher is None else {"run_dir": teacher},
        "stages.n_stages": n_stages, "stages.steps_per_stage": sps, "stages.selection": selection,
        "loss.divergence": divergence, "loss.temperature": temperature,
        "weighting": weighting or {"name": "none", "alpha": 1.0}, "probe": {"n": 6, "batch_size": 3}, **TINY_DATA,
        "train.batch_size": bs, "train.grad_accum": accum, "train.max_len": 48, "train.save_every": save_every,
        "train.log_every": 1, "train.grad_clip": 1000.0, "eval.tasks": [], **extra}, name=name)


def load(tmp, teacher, name="c.yaml", **kw):
    return load_config(distill_cfg(tmp, teacher, name, **kw))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny teacher run (3 checkpoints) and an SFT anchor run, shared by the tests."""
    from scd.sft import run as run_sft
    from scd.teacher import run as run_teacher

    tmp = tmp_path_factory.mktemp("distill")
    run_teacher(load_config(teacher_cfg(tmp)), tmp / "teacher")
    run_sft(load_config(anchor_cfg(tmp)), tmp / "anchor")
    return tmp, tmp / "teacher", tmp / "anchor"


# ----------------------------------------------------------------------------- loss math
def test_kl_direction_and_values_hand_computed():
    """One target token, vocab 2: p_S = (1/2, 1/2), p_T = (3/4, 1/4), gold label 0."""
    from scd.distill import DistillLossConfig as LossConfig, token_terms

    s = torch.log(torch.tensor([[[0.5, 0.5], [0.3, 0.7]]]))  # [B=1, T=2, V=2]; position 0 predicts token 1
    t = torch.log(torch.tensor([[[0.75, 0.25], [0.1, 0.9]]]))
    labels = torch.tensor([[-100, 0]])
    fkl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(p_T || p_S) = 0.130812
    rkl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(p_S || p_T) = 0.143841
    kd, ce, rows = token_terms(s, t, labels, LossConfig(divergence="forward_kl"))
    assert kd.tolist() == pytest.approx([fkl], abs=1e-6) and fkl == pytest.approx(0.130812, abs=1e-6)
    assert ce.tolist() == pytest.approx([math.log(2)], abs=1e-6) and rows.tolist() == [0]
    kd, _, _ = token_terms(s, t, labels, LossConfig(divergence="reverse_kl"))
    assert kd.tolist() == pytest.approx([rkl], abs=1e-6) and rkl == pytest.approx(0.143841, abs=1e-6)
    # temperature 2: both distributions softened (p ** (1/2), renormalised), loss times 4
    pt = [math.sqrt(0.75), math.sqrt(0.25)]
    pt = [x / sum(pt) for x in pt]
    want = 4 * sum(p * math.log(p / 0.5) for p in pt)
    kd, ce, _ = token_terms(s, t, labels, LossConfig(divergence="forward_kl", temperature=2.0))
    assert kd.tolist() == pytest.approx([want], abs=1e-6)
    assert ce.tolist() == pytest.approx([math.log(2)], abs=1e-6)  # CE never sees the temperature


def test_aw_weight_limits_through_the_recipe():
    from scd.distill import WeightingConfig, kd_weights as sample_weights, micro_batch_loss

    aw = WeightingConfig(name="aw", anchor_run_dir="unused")
    anchor = torch.tensor([1e-4, 5.0, 2.0, 0.0])  # L_S: student anchor far better / far worse / equal / perfect
    teacher = torch.tensor([5.0, 1e-4, 2.0, 1.0])  # L_Tc
    w = sample_weights(aw, 4, anchor_loss=anchor, teacher_loss=teacher)
    assert w[0] < 1e-4 and w[1] > 1 - 1e-4 and w[2] == 0.5 and w[3] == 0.0
    assert w.tolist() == pytest.approx((anchor / (anchor + teacher)).nan_to_num(0.0).tolist(), abs=1e-6)
    # student far better on every sample -> the loss is (almost) plain CE; teacher far better -> KD
    kd, ce, rows = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0]), torch.tensor([0, 0, 1])
    w_small = sample_weights(aw, 2, anchor_loss=torch.tensor([1e-6, 1e-6]), teacher_loss=torch.tensor([3.0, 3.0]))
    assert float(micro_batch_loss(kd, ce, rows, w_small, 3)) == pytest.approx(20.0, rel=1e-5)
    w_big = sample_weights(aw, 2, anchor_loss=torch.tensor([3.0, 3.0]), teacher_loss=torch.tensor([1e-6, 1e-6]))
    assert float(micro_batch_loss(kd, ce, rows, w_big, 3)) == pytest.approx(2.0, rel=1e-5)
    # `none`: a constant alpha
    w = sample_weights(WeightingConfig(name="none", alpha=0.25), 3)
    assert w.tolist() == [0.25] * 3
    assert float(micro_batch_loss(kd, ce, rows, w, 6)) == pytest.approx((0.25 * 6 + 0.75 * 60) / 6)


def test_config_errors_are_one_line_with_hints(tmp_path):
    bad = {
        "aw": "needs a student anchor",
        "aww": "did you mean 'aw'",
    }
    for weighting, msg in bad.items():
        with pytest.raises(ConfigError, match=msg):
            load(tmp_path, "t", weighting={"name": weighting})
    with pytest.raises(ConfigError, match="did you mean 'scd_select'"):
        load(tmp_path, "t", selection="scd_selct")
    with pytest.raises(ConfigError, match="did you mean 'forward_kl'"):
        load(tmp_path, "t", divergence="forwrd_kl")
    with pytest.raises(ConfigError, match="stages.selection must be final or best"):
        load(tmp_path, "t", selection="scd_select", mode="eval_teacher")


def test_teacher_config_must_name_a_teacher_recipe(tmp_path):
    """teacher.config naming another recipe fails at start-up, before anything is trained."""
    results = tmp_path / "results"
    cfg = load_config(distill_cfg(tmp_path, None, **{"teacher.config": "configs/scd/sft_tiny.yaml",
                                                      "teacher.results_dir": str(results)}))
    with pytest.raises(ValueError, match="`recipe: teacher` config is needed as the teacher.config, got recipe 'sft'"):
        distill_run(cfg, tmp_path / "run")
    assert not results.exists()  # nothing trained


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("reduce", ["token", "sample"])
def test_batch8_accum1_equals_batch4_accum2(runs, reduce):
    """Same parameters, loss, KD/CE means and gradient norm after one optimiser step: the loss is
    normalised by the target tokens (or samples, ``weighting.reduce: sample``) of the whole accumulated
    batch (a per-micro-batch mean would change loss and gradient norm)."""
    from scd.distill import run

    tmp, teacher, _ = runs
    out = []
    for bs, accum in [(8, 1), (4, 2)]:
        cfg = load(tmp, teacher, f"acc{bs}{reduce}.yaml", sps=1, bs=bs, accum=accum, temperature=2.0,
                   weighting={"name": "none", "alpha": 0.5, "reduce": reduce})
        run(cfg, tmp / f"acc{bs}{reduce}")
        row = [r for r in read_metrics(tmp / f"acc{bs}{reduce}" / "metrics.jsonl") if "loss" in r][0]
        out.append((row, load_file(str(tmp / f"acc{bs}{reduce}" / "model" / "model.safetensors"))))
    (r8, w8), (r4, w4) = out
    for key in ("loss", "kd", "ce", "grad_norm", "tokens"):
        assert r8[key] == pytest.approx(r4[key], rel=1e-5), key
    for k in w8:
        torch.testing.assert_close(w8[k], w4[k], rtol=1e-5, atol=1e-6)


def test_sample_reduction_against_a_slow_loop():
    """weighting.reduce: sample = mean over samples of w KD(x) + (1 - w) CE(x), KD(x) and CE(x) the means
    over x's target tokens; token = the mean over target tokens (long answers weigh more)."""
    from scd.distill.loss import micro_batch_loss, micro_batch_loss_by_sample, per_sample_means
    from scd.heads import num_samples_with_targets

    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([0, 0, 0, 2, 3, 3])  # sample 1 has no target
    kd, ce = torch.rand(6, generator=g, dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64)
    w = torch.tensor([0.2, 0.9, 0.5, 1.0], dtype=torch.float64)
    ref, n = 0.0, 0
    for b in range(4):
        toks = [i for i in range(6) if rows[i] == b]
        if toks:
            kd_b, ce_b = sum(kd[i] for i in toks) / len(toks), sum(ce[i] for i in toks) / len(toks)
            ref, n = ref + w[b] * kd_b + (1 - w[b]) * ce_b, n + 1
    loss, kd_b, ce_b = micro_batch_loss_by_sample(kd, ce, rows, w, n)
    assert float(loss) == pytest.approx(float(ref / n), rel=1e-12)
    assert float(kd_b[0]) == pytest.approx(float(kd[:3].mean())) and float(kd_b[1]) == 0.0
    assert per_sample_means(ce, rows, 4)[3] == pytest.approx(float(ce[4:].mean()))
    tok = micro_batch_loss(kd, ce, rows, w, 6)  # token mean: sample 0 (3 tokens) weighs 3x sample 2
    assert float(tok) == pytest.approx(float(sum(w[rows[i]] * kd[i] + (1 - w[rows[i]]) * ce[i] for i in range(6)) / 6))
    assert float(tok) != pytest.approx(float(loss))
    labels = torch.tensor([[-100, 5, 6], [-100, -100, -100], [-100, -100, 7]])
    assert num_samples_with_targets(labels) == 2


def test_weighting_reduce_is_validated_and_keeps_run_ids(tmp_path):
    cfg = load(tmp_path, "t", weighting={"name": "none", "alpha": 1.0})
    assert "reduce" not in to_dict(cfg)["weighting"]  # the default is left out of run ids (committed runs)
    assert to_dict(load(tmp_path, "t", "s.yaml", weighting={"name": "none", "reduce": "sample"}))["weighting"][
        "reduce"] == "sample"
    with pytest.raises(ConfigError, match="weighting.reduce must be one of"):
        load(tmp_path, "t", "bad.yaml", weighting={"name": "none", "reduce": "samples"})


def test_kd_at_all_positions(runs):
    """loss.positions: all = KD at every position with a next token (prompt included), CE at the targets:
    the completion-only path equals the full-logit reference (loss, KD, CE, weights) and batch 8 x 1 equals
    batch 4 x 2; its KD mean differs from KD at the targets only."""
    from scd.distill import run
    from scd.heads import all_position_labels

    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert all_position_labels(ids, mask).tolist() == [[-100, 5, 6, 7], [-100, 8, -100, -100]]
    tmp, teacher, _ = runs
    out = {}
    for name, extra in {"fast": {}, "ref": {"train.completion_only": False}, "acc": {"bs": 4, "accum": 2},
                        "target": {"loss.positions": "target"}}.items():
        kw = {"bs": 8, "accum": 1, "loss.positions": "all", **extra}
        cfg = load(tmp, teacher, f"all{name}.yaml", sps=1, temperature=2.0,
                   weighting={"name": "none", "alpha": 0.5, "reduce": "sample"}, **kw)
        run(cfg, tmp / f"all{name}")
        row = [r for r in read_metrics(tmp / f"all{name}" / "metrics.jsonl") if "loss" in r][0]
        out[name] = (row, load_file(str(tmp / f"all{name}" / "model" / "model.safetensors")))
    for other in ("ref", "acc"):
        for key in ("loss", "kd", "ce", "grad_norm"):
            assert out[other][0][key] == pytest.approx(out["fast"][0][key], rel=1e-4), (other, key)
        for k, v in out["fast"][1].items():
            torch.testing.assert_close(out[other][1][k], v, rtol=1e-4, atol=1e-6)
    assert out["target"][0]["ce"] == pytest.approx(out["fast"][0]["ce"], rel=1e-5)  # CE: the same targets
    assert out["target"][0]["kd"] != pytest.approx(out["fast"][0]["kd"], rel=1e-3)  # KD: more positions
    with pytest.raises(ConfigError, match="set weighting.reduce: sample"):
        load(tmp, teacher, "bad1.yaml", **{"loss.positions": "all"})
    with pytest.raises(ConfigError, match="loss.positions must be one of"):
        load(tmp, teacher, "bad2.yaml", **{"loss.positions": "every"})


def _with_head(seed, head_seed, vocab, tok, head=None):
    """A tiny untied Llama (body from ``seed``) with its own random lm-head (std 0.3) or ``head``."""
    from scd.models import tiny_model

    m = tiny_model(vocab, tiny_config(tie_word_embeddings=False), seed, pad_token_id=tok.pad_token_id,
                   eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        if head is None:
            g = torch.Generator().manual_seed(head_seed)
            head = torch.randn(m.lm_head.weight.shape, generator=g) * 0.3
        m.lm_head.weight.copy_(head)
    return m


def test_scd_select_end_to_end_matches_independent_reference(tmp_path, smol_tokenizer):
    """Constructed teacher: three checkpoints with the same body and different lm-heads W0, W1, W2,
    W1 = (W0 + W2) / 2 (so c1's logits are exactly the midpoint of c0's and c2's).  c2 is the best
    (lowest dev loss), the student starts as c0.  KL(best || c) alone picks c2, KL(student || c)
    alone picks c0; their sum is smallest at the midpoint c1.  The recipe's probe KLs and its
    choice must equal a full-vocabulary float64 reference computed here."""
    from transformers import AutoModelForCausalLM

    from scd.distill import probe_encoded, run
    from scd.models import save_model
    from scd.schedule import Manifest

    tok = smol_tokenizer
    c0, c2 = _with_head(11, 1, len(tok), tok), _with_head(11, 2, len(tok), tok)
    c1 = _with_head(11, 0, len(tok), tok, head=(c0.lm_head.weight + c2.lm_head.weight) / 2)
    tdir = tmp_path / "teacher"
    m = Manifest()
    m.root = tdir
    for i, (model, dl) in enumerate([(c0, 3.0), (c1, 2.0), (c2, 1.0)]):
        save_model(model, tok, tdir / f"ckpt-{i + 1}")
        m.add(step=i + 1, epoch=0.1 * (i + 1), path=tdir / f"ckpt-{i + 1}", dev_loss=dl)
    m.write(tdir)
    cfg = load(tmp_path, tdir, method="scd", n_stages=2, sps=1, selection="scd_select",
               model={"name": "student", "init_from": tdir / "ckpt-1", "keep_layers": "first:2"})
    run(cfg, tmp_path / "run")

    models = [AutoModelForCausalLM.from_pretrained(str(tdir / f"ckpt-{i}")).double().eval() for i in (1, 2, 3)]
    probe = probe_encoded(cfg, tok)
    lps = [[] for _ in models]
    with torch.no_grad():
        for ex in probe:
            ids = torch.tensor([ex["input_ids"]])
            tgt = torch.tensor(ex["labels"][1:]) != -100
            for j, mdl in enumerate(models):
                lps[j].append(F.log_softmax(mdl(input_ids=ids).logits[0, :-1][tgt], -1))
    lps = [torch.cat(x) for x in lps]  # [N_tokens, V] per checkpoint

    def kl(p, q):  # KL(p || q), token average: F.kl_div(input=log q, target=log p) is KL(p || q)
        return float(F.kl_div(q, p, log_target=True, reduction="sum")) / p.shape[0]

    ref_best = {c: kl(lps[2], lps[c]) for c in range(3)}
    ref_student = {c: kl(lps[0], lps[c]) for c in range(3)}  # the student is c0 at stage 0
    scores = {c: ref_best[c] + ref_student[c] for c in range(3)}
    assert min(scores, key=scores.get) == 1  # the constructed case is discriminative:
    assert min(ref_best, key=ref_best.get) == 2 and min(ref_student, key=ref_student.get) == 0
    sel = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "select"]
    assert [r["stage"] for r in sel] == [0, 1]
    assert sel[0]["checkpoint"] == 1
    for c in range(3):
        assert sel[0]["kl_best"][str(c)] == pytest.approx(ref_best[c], rel=1e-3, abs=1e-6)
        assert sel[0]["kl_student"][str(c)] == pytest.approx(ref_student[c], rel=1e-3, abs=1e-6)
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert rec["status"] == "ok" and rec["train"]["selections"][0] == 1
    switches = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "teacher_switch"]
    assert len(switches) == 2 and all("switch_s" in r for r in switches)


def test_teacher_switch_is_in_place_and_exact(runs):
    from transformers import AutoModelForCausalLM

    from scd.distill import TeacherSlot
    from scd.schedule import Manifest

    _, teacher, _ = runs
    m = Manifest.read(teacher / "checkpoints")
    slot = TeacherSlot(m, "float32", torch.device("cpu"))
    slot.ensure(0)
    params = {n: p for n, p in slot.model.named_parameters()}
    secs, in_place = slot.ensure(2)
    assert in_place and secs >= 0 and slot.index == 2
    assert all(p is params[n] for n, p in slot.model.named_parameters())  # same tensors, new values
    ref = AutoModelForCausalLM.from_pretrained(str(m.resolve(2))).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    torch.testing.assert_close(slot.logits(batch), ref(**batch).logits, rtol=0, atol=0)
    assert not slot.model.training and not any(p.requires_grad for p in slot.model.parameters())


def _run_cli(cfg, run_dir, fault=None):
    return run_config(cfg, run_dir, fault=fault, timeout=900)


@pytest.fixture(scope="module")
def aw_reference(runs):
    """Uninterrupted SCD+AW run: 2 stages x 2 steps, resumable state after every step.

    A subprocess like the killed runs below, so that both use the same thread count: an in-process
    reference (2 threads) differed from 1-thread runs in the 5th digit on some CPUs."""
    tmp, teacher, anchor = runs
    cfg = distill_cfg(tmp, teacher, "aw.yaml", method="scd_aw", n_stages=2, sps=2, selection="scd_select",
                      weighting={"name": "aw", "anchor_run_dir": anchor}, save_every=1)
    p = _run_cli(cfg, tmp / "aw-ref")
    assert p.returncode == 0, p.stderr[-3000:]
    return cfg, tmp / "aw-ref"


@pytest.mark.parametrize("fault", ["step:3", pytest.param("stage:1", marks=pytest.mark.slow)])
def test_resume_after_sigkill_equals_uninterrupted(aw_reference, fault):
    cfg, ref = aw_reference
    killed = ref.parent / f"aw-killed-{fault.replace(':', '-')}"
    p = _run_cli(cfg, killed, fault=fault)
    assert p.returncode == -9, p.stderr[-2000:]
    assert json.loads((killed / "run.json").read_text())["status"] == "running"
    p = _run_cli(cfg, killed)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed at step" in p.stdout + p.stderr
    a = load_file(str(ref / "model" / "model.safetensors"))
    b = load_file(str(killed / "model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert strip_time(read_metrics(ref / "metrics.jsonl")) == strip_time(read_metrics(killed / "metrics.jsonl"))
    ra, rb = (json.loads((d / "run.json").read_text())["train"] for d in (ref, killed))
    assert ra["selections"] == rb["selections"] and ra["tokens"] == rb["tokens"]
    # AW losses were computed once per (model, data) and cached
    assert len(list((ref / "cache").glob("ce-*.safetensors"))) == 1 + len(set(ra["selections"]))


def test_run_json_records_the_builds_it_used(aw_reference):
    """run.json ``dependencies``: the teacher run (its checkpoints' sha256 from the manifest) and the AW anchor
    (its run's finished time and the sha256 of its weights, recomputed here with hashlib)."""
    _, ref = aw_reference
    deps = json.loads((ref / "run.json").read_text())["dependencies"]
    teacher, anchor = ref.parent / "teacher", ref.parent / "anchor"
    manifest = json.loads((teacher / "checkpoints" / "manifest.json").read_text())
    assert deps["teacher"]["run"] == "teacher" and "weights_sha256" not in deps["teacher"]
    assert deps["teacher"]["checkpoints_sha256"] == [c["sha256"] for c in manifest["checkpoints"]]
    assert deps["teacher"]["finished"] == json.loads((teacher / "run.json").read_text())["finished"]
    file_sha = hashlib.sha256((anchor / "model" / "model.safetensors").read_bytes()).hexdigest()
    assert deps["anchor"] == {"path": str(anchor / "model"), "run": "anchor",
                              "finished": json.loads((anchor / "run.json").read_text())["finished"],
                              "git_sha": json.loads((anchor / "run.json").read_text())["git_sha"],
                              "weights_sha256": file_sha}  # one weight file: its sha256sum (hash_checkpoint)
    assert "student" not in deps  # the tests' student is built in place, not a dependency run


def test_edited_teacher_checkpoint_fails_before_training(runs, capsys):
    tmp, teacher, _ = runs
    edited = tmp / "teacher-edited"
    shutil.copytree(teacher, edited)
    f = edited / "checkpoints" / "ckpt-4" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF  # one weight byte
    f.write_bytes(bytes(data))
    rd = tmp / "edited-run"
    assert cli_main(["run", str(distill_cfg(tmp, edited, "e.yaml")), "--run-dir", str(rd)]) == 1
    rec = json.loads((rd / "run.json").read_text())
    assert rec["status"] == "failed"
    assert "teacher checkpoint 1 (step 4" in rec["error"] and "modified after the manifest" in rec["error"]
    assert not [r for r in read_metrics(rd / "metrics.jsonl") if "loss" in r]
    assert "modified after the manifest" in capsys.readouterr().err


def test_tokenizer_mismatch_is_a_clear_startup_error(runs):
    from scd.core.assets import raw_dir
    from scd.distill import run

    tmp, teacher, _ = runs
    bert = raw_dir("minilm") / "model"
    if not (bert / "tokenizer.json").exists():
        pytest.skip("MiniLM asset not fetched")
    cfg = load(tmp, teacher, "tok.yaml", model={"name": "tiny", "tokenizer": bert, "tiny": TINY_SHAPE})
    with pytest.raises(ValueError, match="teacher and student tokenizers differ.*shared token ids"):
        run(cfg, tmp / "tok-run")
    assert not (tmp / "tok-run" / "metrics.jsonl").exists() or \
        not [r for r in read_metrics(tmp / "tok-run" / "metrics.jsonl") if "loss" in r]


def test_nan_loss_marks_run_diverged_with_step_and_term(runs, capsys):
    from scd.losses import LOSSES

    def nan_test(student_logits, teacher_logits):
        return (student_logits.sum(-1) * float("nan")).float()

    nan_test.kind = "divergence"
    LOSSES.register("nan_test", override=True)(nan_test)
    tmp, teacher, _ = runs
    rd = tmp / "nan-run"
    assert cli_main(["run", str(distill_cfg(tmp, teacher, "nan.yaml", divergence="nan_test")),
                     "--run-dir", str(rd)]) == 1
    rec = json.loads((rd / "run.json").read_text())
    assert rec["status"] == "diverged"
    assert rec["diverged_at"]["step"] == 1 and rec["diverged_at"]["term"] == "kd:nan_test"
    assert "run diverged" in capsys.readouterr().err


def test_gold_only_baseline_needs_no_teacher(tmp_path):
    """weighting none, alpha 0 = the SFT-only student baseline: the teacher is never loaded."""
    from scd.distill import run

    rec = run(load(tmp_path, None, weighting={"name": "none", "alpha": 0.0}), tmp_path / "run")
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert rec["status"] == "ok" and len(rows) == 2
    assert all(r["kd"] == 0.0 and r["loss"] == pytest.approx(r["ce"], rel=1e-6) for r in rows)
    assert rec["train"]["selections"] == []


def test_eval_teacher_mode_scores_the_selected_checkpoint(runs):
    from scd.distill import run

    tmp, teacher, _ = runs
    rec = run(load(tmp, teacher, "et.yaml", method="teacher", selection="best", mode="eval_teacher"),
              tmp / "eval-teacher")
    m = json.loads((teacher / "checkpoints" / "manifest.json").read_text())
    assert rec["status"] == "ok" and rec["train"]["selections"] == [m["best_index"]]
    assert rec["artifacts"]["model"].endswith(m["checkpoints"][m["best_index"]]["path"])
    assert rec["dependencies"]["teacher"]["checkpoints_sha256"] == [c["sha256"] for c in m["checkpoints"]]
    # the teacher row scores the teacher alone: a healed student named by the config is neither trained nor recorded
    student = {"name": "student", "student": {"config": str(tmp / "no-such-student.yaml"), "seed": 0}}
    rec = run(load(tmp, teacher, "et2.yaml", method="teacher", selection="best", mode="eval_teacher", model=student),
              tmp / "eval-teacher-2")
    assert rec["status"] == "ok" and set(rec["dependencies"]) == {"teacher"}
