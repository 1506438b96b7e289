"""Recovery by self-distillation: constraints kept through training, KL reduced, the recipe, the study."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from scd.core.train import TrainConfig, collate
from unisd.degrade import fake_quant, prune_model, quantize_model
from unisd.recovery import next_token_mask, recover, recovery_loss_sum, token_kl

VOCAB = 64


def _teacher(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, initializer_range=0.2)  # peaked outputs: degradation is visible
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def _seqs(n, seed, T=16):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (T,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
    return out


def _train_cfg(**kw):
    base = dict(lr=3e-3, max_steps=6, batch_size=8, warmup_ratio=0.0, schedule="constant", log_every=1,
                save_every=0)
    base.update(kw)
    return TrainConfig(**base)


TRAIN = _seqs(64, seed=1)
HELD = [collate(_seqs(16, seed=2)[i:i + 8], 0) for i in (0, 8)]


# -------------------------------------------------------------- constraints through recovery
@pytest.mark.parametrize("method", ["sd", "sft"])
def test_masks_preserved_through_recovery(method):
    teacher = _teacher()
    student = copy.deepcopy(teacher).requires_grad_(True)
    c = prune_model(student, 0.5, method="magnitude")
    before = {n: student.get_submodule(n).weight.detach().clone() for n in c.masks}
    recover(student, teacher, TRAIN, _train_cfg(lr=1e-2), method=method, constraint=c)
    changed = 0
    for name, keep in c.masks.items():
        w = student.get_submodule(name).weight
        assert (w[~keep] == 0).all(), f"{name}: a pruned weight came back"
        changed += int((w[keep] != before[name][keep]).sum())
    assert changed > 0  # the kept weights were trained (the test is not vacuous)
    assert c.violation(student) == 0.0 and abs(c.sparsity() - 0.5) < 1e-9


def test_without_projection_masks_would_be_lost():
    # the same training without the constraint revives pruned weights: projection is what keeps them at 0
    teacher = _teacher()
    student = copy.deepcopy(teacher).requires_grad_(True)
    c = prune_model(student, 0.5, method="magnitude")
    recover(student, teacher, TRAIN, _train_cfg(lr=1e-2, max_steps=2), method="sd", constraint=None)
    assert c.violation(student) > 0


@pytest.mark.parametrize("latent", [True, False])
def test_quant_grid_preserved_through_recovery(latent):
    teacher = _teacher()
    student = copy.deepcopy(teacher).requires_grad_(True)
    c = quantize_model(student, 3, symmetric=False, group_size=16, latent=latent)
    before = {n: student.get_submodule(n).weight.detach().clone() for n in c.grids}
    # plain re-rounding only moves a weight when one update exceeds half a step (~0.05 here)
    recover(student, teacher, TRAIN, _train_cfg(lr=1e-2 if latent else 1e-1), method="sd", constraint=c)
    moved = 0
    for name, grid in c.grids.items():
        w = student.get_submodule(name).weight.detach()
        assert torch.equal(fake_quant(w, grid), w), f"{name} left its quantization grid"
        moved += int((w != before[name]).sum())
        # still at most 2^bits levels per group
        g = grid.group_size
        assert all(len(torch.unique(w[r, s:s + g])) <= 8 for r in range(0, w.shape[0], 7)
                   for s in range(0, w.shape[1], g))
    assert moved > 0 and c.violation(student) == 0.0


def test_latent_weights_accumulate_small_updates():
    # lr far below half a quantization step: plain re-rounding freezes the quantized weights,
    # latent (straight-through) training moves some of them to neighbouring grid points
    teacher = _teacher()
    moved = {}
    for latent in (False, True):
        student = copy.deepcopy(teacher).requires_grad_(True)
        c = quantize_model(student, 4, group_size=16, latent=latent)
        start = {n: student.get_submodule(n).weight.detach().clone() for n in c.grids}
        recover(student, teacher, TRAIN, _train_cfg(lr=2e-3, max_steps=12), method="sd", constraint=c)
        moved[latent] = sum(int((student.get_submodule(n).weight != start[n]).sum()) for n in c.grids)
        assert c.violation(student) == 0.0
    assert moved[False] == 0 and moved[True] > 0


# ------------------------------------------------------------------------ recovery works
@pytest.mark.parametrize("degradation", ["prune", "quantize"])
def test_recovery_reduces_kl_to_original_on_held_out(degradation):
    teacher = _teacher()
    student = copy.deepcopy(teacher).requires_grad_(True)
    c = prune_model(student, 0.6) if degradation == "prune" else quantize_model(student, 3, group_size=0)
    kl_before = token_kl(student, teacher, HELD)
    assert kl_before > 0.05
    recover(student, teacher, TRAIN, _train_cfg(max_steps=30), method="sd", constraint=c)
    kl_after = token_kl(student, teacher, HELD)
    assert kl_after < 0.8 * kl_before, (kl_before, kl_after)
    assert c.violation(student) == 0.0


def test_probe_cka_skips_the_first_tokens():
    """The recovery probe's CKA leaves the attention-sink position out (probe.skip_first, default 1)."""
    from benchmarks.cka import model_cka
    from unisd.recovery import RecoveryProbeConfig as ProbeConfig, cka_to_original

    a, b = _teacher(), _teacher(seed=3)
    for k in (0, 1, 3):
        probe = ProbeConfig(skip_first=k, n_examples=16, heatmap=False)
        got = cka_to_original(a, b, HELD, probe)
        ref = model_cka(a, b, HELD, estimator="linear", unit="tokens", skip_first=k)
        assert got["skip_first"] == k and got["per_layer"] == pytest.approx(ref["matched"])
        assert got["n"] == 16 * (16 - k)  # tokens: 16 sequences of 16, k left out of each
    assert ProbeConfig().skip_first == 1
    with pytest.raises(ValueError, match="skip_first"):
        ProbeConfig(skip_first=-1)


def test_token_kl_zero_for_identical_models_and_matches_reference():
    teacher = _teacher()
    assert token_kl(copy.deepcopy(teacher), teacher, HELD) == pytest.approx(0.0, abs=1e-6)
    other = _teacher(seed=5)
    got = token_kl(other, teacher, HELD)
    # reference: explicit p_T (log p_T - log p_S) over the real next-token positions
    tot, n = 0.0, 0
    with torch.no_grad():
        for b in HELD:
            lt = torch.log_softmax(teacher(input_ids=b["input_ids"]).logits[:, :-1].double(), -1)
            ls = torch.log_softmax(other(input_ids=b["input_ids"]).logits[:, :-1].double(), -1)
            kl = (lt.exp() * (lt - ls)).sum(-1)
            m = b["attention_mask"][:, 1:].bool()
            tot += float(kl[m].sum())
            n += int(m.sum())
    assert got == pytest.approx(tot / n, rel=1e-4)


def test_loss_masks_and_token_counts():
    teacher = _teacher()
    b = collate(_seqs(3, seed=3, T=10)[:2] + [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}], 0)
    assert int(next_token_mask(b, "all").sum()) == 9 + 9 + 2
    assert int(next_token_mask(b, "completion").sum()) == 6 + 6 + 2
    _, n_all = recovery_loss_sum(teacher, teacher, b, method="sd", kl_tokens="all")
    loss, n_c = recovery_loss_sum(teacher, teacher, b, method="sd", kl_tokens="completion")
    assert (n_all, n_c) == (20, 14) and float(loss) == pytest.approx(0.0, abs=1e-5)
    ce, n_sft = recovery_loss_sum(teacher, teacher, b, method="sft")
    assert n_sft == 14 and float(ce) > 0


def test_recover_resumes_exactly(tmp_path):
    from scd.core.results import MetricsWriter, read_metrics

    teacher = _teacher()

    def fresh():
        s = copy.deepcopy(teacher).requires_grad_(True)
        return s, quantize_model(s, 3, group_size=16, latent=True)

    cfg = _train_cfg(max_steps=4, save_every=2, schedule="cosine", warmup_ratio=0.25)
    ref, c_ref = fresh()
    recover(ref, teacher, TRAIN, cfg, method="sd", constraint=c_ref, seed=3)

    class Boom(MetricsWriter):
        def log(self, rec):
            super().log(rec)
            if rec["step"] == 3:
                raise KeyboardInterrupt

    s1, c1 = fresh()
    with pytest.raises(KeyboardInterrupt):
        recover(s1, teacher, TRAIN, cfg, method="sd", constraint=c1, seed=3, run_dir=tmp_path,
                metrics=Boom(tmp_path / "metrics.jsonl"))
    s2, c2 = fresh()  # a new process: degraded model rebuilt, training state from the checkpoint
    recover(s2, teacher, TRAIN, cfg, method="sd", constraint=c2, seed=3, run_dir=tmp_path,
            metrics=MetricsWriter(tmp_path / "metrics.jsonl"))
    for (n, p), (_, q) in zip(ref.named_parameters(), s2.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
    for n in c_ref.latent:
        torch.testing.assert_close(c_ref.latent[n], c2.latent[n], rtol=0, atol=1e-6)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


# ------------------------------------------------------------------------- config / recipe
def test_config_errors_name_the_key(tmp_path):
    from scd.core.config import ConfigError, load_config

    p = tmp_path / "c.yaml"
    p.write_text("recipe: recovery\ndegradation: {name: quantise, strength: 4}\n")
    with pytest.raises(ConfigError, match="did you mean 'quantize'"):
        load_config(p)
    p.write_text("recipe: recovery\ndegradation: {name: prune, strength: 0.5, options: {metod: wanda}}\n")
    with pytest.raises(ConfigError, match="metod"):
        load_config(p)
    p.write_text("recipe: recovery\nrecovery: {method: distill}\n")
    with pytest.raises(ConfigError, match="recovery.method"):
        load_config(p)


def test_shipped_configs_validate():
    from pathlib import Path

    from scd.core.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs" / "recovery"
    files = sorted(root.glob("*.yaml"))
    assert files
    for f in files:
        assert load_config(f).recipe == "recovery"


def _recipe_cfg(tmp_path, **over):
    from scd.core.config import from_dict

    from unisd.recovery import RecoveryConfig

    data = {
        "recipe": "recovery", "method": "t", "seed": 0,
        "model": {"name": "tiny", "tiny": {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64,
                                           "num_attention_heads": 4, "num_key_value_heads": 2}},
        "data": {"tasks": ["rotten_tomatoes"], "limit_per_task": 8},
        "degradation": {"name": "prune", "strength": 0.5, "options": {"method": "wanda", "calib_batches": 1}},
        "recovery": {"method": "sd"},
        "train": {"lr": 1e-3, "max_steps": 3, "batch_size": 2, "max_len": 64, "save_every": 1, "log_every": 1},
        "eval": {"tasks": ["rotten_tomatoes"], "limit": 4, "scoring": "likelihood", "batch_size": 4},
        "probe": {"n_examples": 4, "batch_size": 4, "max_len": 64},
    }
    for k, v in over.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) else v
    return from_dict(RecoveryConfig, data)


def test_recipe_end_to_end_and_resume(tmp_path, monkeypatch):
    import unisd.recovery as R

    cfg = _recipe_cfg(tmp_path)
    ref = R.run(cfg, tmp_path / "a" / "run")
    assert ref["status"] == "ok" and ref["constraint_violation"] == 0.0
    assert ref["degradation"]["name"] == "prune" and ref["degradation"]["summary"]["sparsity"] == 0.5
    assert ref["recovery"] == {"method": "sd", "budget_steps": 3, "tokens": ref["train"]["tokens"],
                               "loss": "forward_kl", "continuation": "reference", "kl_tokens": "all"}
    assert set(ref["eval"]) == set(ref["eval_before"]) == set(ref["eval_original"]) == {"rotten_tomatoes"}
    cka = ref["cka"]
    assert len(cka["per_layer"]) == 2 and 0 < cka["mean_matched"] <= 1 + 1e-9
    assert {"estimator", "unit", "n", "matrix"} <= set(cka) and "mean_matched" in ref["cka_before"]
    assert set(ref["kl_to_original"]) >= {"before", "after"}
    assert not (tmp_path / "a" / "run" / "degraded").exists() and not (tmp_path / "a" / "run" / "ckpt").exists()
    assert (tmp_path / "a" / "run" / "cka.png").exists() and (tmp_path / "a" / "run" / "cka_before.png").exists()
    assert len(list((tmp_path / "a" / ".shared").glob("*.json"))) == 3  # original eval, before eval, before probe

    # interrupted during training (after the checkpoint of step 1), then resumed in a fresh call
    from scd.core.results import MetricsWriter

    real = R.recover

    class Boom(MetricsWriter):
        def log(self, rec):
            super().log(rec)
            if rec["step"] == 2:
                raise KeyboardInterrupt

    def crashing(*a, **kw):
        kw["metrics"] = Boom(kw["metrics"].path)
        return real(*a, **kw)

    monkeypatch.setattr(R, "recover", crashing)
    with pytest.raises(KeyboardInterrupt):
        R.run(cfg, tmp_path / "b" / "run")
    assert (tmp_path / "b" / "run" / "degraded" / "done.json").exists()
    assert (tmp_path / "b" / "run" / "ckpt" / "last").exists()
    monkeypatch.setattr(R, "recover", real)
    res = R.run(cfg, tmp_path / "b" / "run")
    assert res["constraint_violation"] == 0.0
    for key in ("eval", "eval_before"):
        assert json.dumps(res[key], sort_keys=True) == json.dumps(ref[key], sort_keys=True), key
    for key in ("before", "after"):
        assert res["kl_to_original"][key] == pytest.approx(ref["kl_to_original"][key], rel=1e-6)
    assert res["cka"]["per_layer"] == pytest.approx(ref["cka"]["per_layer"], abs=1e-9)


def test_recipe_none_and_forget(tmp_path):
    import unisd.recovery as R

    cfg = _recipe_cfg(tmp_path, recovery={"method": "none"},
                      degradation={"name": "forget", "strength": 2,
                                   "options": {"tasks": ["wnut16"], "limit_per_task": 8, "lr": 1e-2,
                                               "batch_size": 2, "max_len": 64}})
    rec = R.run(cfg, tmp_path / "n")
    assert rec["recovery"]["budget_steps"] == 0 and rec["train"]["tokens"] == 0 and rec["train"]["steps"] == 0
    assert rec["eval"] == rec["eval_before"]
    for info in rec["eval_info"].values():  # the degraded model's predictions, written under before/
        assert info["predictions"].startswith("before/") and (tmp_path / "n" / info["predictions"]).is_file()
    assert rec["kl_to_original"]["before"] == rec["kl_to_original"]["after"] > 0  # forgetting moved the model
    assert rec["degradation"]["summary"]["constraint"] == "none"
    # a second run of the grid reuses the shared evaluation (<grid>/.shared) and still holds the prediction
    # files its run.json names (copied from the cache), identical to the first run's
    rec2 = R.run(cfg, tmp_path / "n2")
    assert rec2["eval_before"] == rec["eval_before"]
    for info in rec2["eval_info"].values():
        path = tmp_path / "n2" / info["predictions"]
        assert path.is_file() and path.read_text() == (tmp_path / "n" / info["predictions"]).read_text()


# ---------------------------------------------------------------------------- the study
def _write_run(root, i, *, deg, strength, method, before, after, orig, cka, budget=10, status="ok"):
    from scd.core.results import atomic_write_json

    ev = lambda v: {"task_a": {"accuracy": {"value": v, "n": 10, "ci": [v, v]},  # noqa: E731
                               "f1": {"value": 1 - v, "n": 10, "ci": [0, 1]}}}
    rec = {"schema_version": 1, "run_id": f"r{i}", "recipe": "recovery", "method": method, "seed": i % 2,
           "status": status, "eval": ev(after), "eval_before": ev(before), "eval_original": ev(orig),
           "metric_meta": {"task_a/accuracy": {"primary": True, "higher_is_better": True, "chance": 0.5},
                           "task_a/f1": {"primary": False}},
           "cka": {"mean_matched": cka, "per_layer": [cka, cka], "estimator": "linear", "unit": "tokens", "n": 9},
           "cka_before": {"mean_matched": cka - 0.1, "per_layer": [cka - 0.1] * 2},
           "kl_to_original": {"before": 1.0, "after": 0.5},
           "degradation": {"name": deg, "strength": strength}, "recovery": {"method": method, "budget_steps": budget},
           "constraint_violation": 0.0, "train": {}, "components": {}, "hparams": {}}
    atomic_write_json(root / f"run{i}" / "run.json", rec)


def test_study_correlation_on_synthetic_runs(tmp_path):
    from benchmarks.recovery_study import main, mean_primary_metric as primary_score, study

    # known values: score = 2 * cka - 1 exactly (Pearson 1, Spearman 1) for 6 runs
    ckas = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    specs = [("quantize", 8, "sd"), ("quantize", 4, "sd"), ("quantize", 3, "none"),
             ("prune", 0.3, "sft"), ("prune", 0.5, "sd"), ("prune", 0.7, "none")]
    for i, ((deg, s, m), c) in enumerate(zip(specs, ckas)):
        _write_run(tmp_path, i, deg=deg, strength=s, method=m, before=0.4, after=2 * c - 1, orig=0.9, cka=c,
                   budget=0 if m == "none" else 10)
    _write_run(tmp_path, 99, deg="prune", strength=0.9, method="sd", before=0, after=0, orig=0, cka=0.1,
               status="failed")  # ignored
    res = study(tmp_path)
    views = {(v["view"], v["family"]): v for v in res["correlation"]["score_vs_cka"]}
    c = views[("all", "all")]["configs"]
    assert c["n"] == 6 and c["pearson_r"] == pytest.approx(1.0) and c["spearman_rho"] == pytest.approx(1.0)
    assert c["pearson_p"] < 1e-6 and c["spearman_ci"] == [pytest.approx(1.0)] * 2
    assert views[("recovered", "all")]["configs"]["n"] == 4  # the two `none` configurations left out
    assert views[("all", "prune")]["configs"]["n"] == 3 and views[("recovered", "prune")]["configs"]["n"] == 2
    rows = {r["run_id"]: r for r in res["rows"]}
    assert set(rows) == {f"r{i}" for i in range(6)}
    assert rows["r0"]["score_after"] == pytest.approx(0.0) and rows["r5"]["score_after"] == pytest.approx(0.9)
    assert rows["r5"]["recovered_frac"] == pytest.approx((0.9 - 0.4) / (0.9 - 0.4))
    # the primary metric is used, not the first one
    assert primary_score({"t": {"f1": {"value": 0.1}, "acc": {"value": 0.7}}},
                         {"t/acc": {"primary": True}}) == pytest.approx(0.7)
    # outputs
    for name in ("recovery_study.md", "recovery_study.csv", "recovery_runs.csv", "recovery_correlation.json",
                 "recovery_deltas.json", "recovery_scatter.png", "recovery_strength.png", "recovery_cka_layers.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    md = (tmp_path / "recovery_study.md").read_text()
    assert "| quantize | 3 | none | 0 | 1 | 0.00 |" in md and "Pearson" in md
    kl = res["correlation"]["kl_vs_cka"][0]["configs"]
    assert kl["n"] == 6 and math.isnan(kl["pearson_r"])  # every synthetic run has KL after 0.5: constant
    assert json.loads((tmp_path / "recovery_correlation.json").read_text())["score_vs_cka"][0]["configs"]["n"] == 6
    table = res["table"]
    assert [(r["degradation"], r["strength"]) for r in table][:3] == [("prune", 0.3), ("prune", 0.5), ("prune", 0.7)]
    assert [r["strength"] for r in table if r["degradation"] == "quantize"] == [8, 4, 3]  # mild -> severe
    assert main([str(tmp_path), "--no-plots"]) == 0
    assert main([str(tmp_path / "missing")]) == 2
