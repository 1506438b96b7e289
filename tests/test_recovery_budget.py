"""KL-aware recovery budget (recovery.budget, unisd/budget.py): skip a nearly intact model, scale the lr with
the probe KL, stop early when the probe KL stops falling; resume is exact around the stop; run.json records it."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file

from scd.core.config import ConfigError, from_dict, load_config, to_dict
from scd.core.engine import Engine
from scd.core.results import MetricsWriter, read_metrics
from scd.models import build_model
from tests.test_recovery import HELD, TRAIN, _recipe_cfg, _teacher, _train_cfg
from unisd.budget import BudgetConfig, EarlyStopConfig, KLEarlyStop, decide, lr_factor
from unisd.degrade import prune_model
import unisd.recovery as R
from unisd.recovery import RecoveryConfig, RecoveryRecipe, RecoverySpec, recover, token_kl


# ------------------------------------------------------------------------------ config
def test_budget_block_is_off_by_default_and_keeps_run_ids():
    assert RecoverySpec().budget is None
    assert "budget" not in to_dict(RecoverySpec())  # added_field: committed configs hash as before
    cfg = from_dict(RecoveryConfig, {"recovery": {"method": "sd", "budget": {"kl_min": 0.2,
                                                                             "early_stop": {"every": 3}}}})
    b = cfg.recovery.budget
    assert b == BudgetConfig(kl_min=0.2, early_stop=EarlyStopConfig(every=3))
    assert to_dict(cfg)["recovery"]["budget"] == {"kl_min": 0.2, "lr_scale": "none", "kl_ref": 1.0,
                                                  "early_stop": {"every": 3, "patience": 2, "min_rel_drop": 0.05}}


@pytest.mark.parametrize("block, key", [("{lr_scale: cubic}", "lr_scale"), ("{kl_min: -1}", "kl_min"),
                                        ("{kl_ref: 0}", "kl_ref"), ("{early_stop: {every: 0}}", "every"),
                                        ("{early_stop: {min_rel_drop: 1.5}}", "min_rel_drop"),
                                        ("{kl_minn: 0.1}", "kl_minn"), ("{tokens: answer}", "tokens")])
def test_budget_config_errors_name_the_key(tmp_path, block, key):
    p = tmp_path / "c.yaml"
    p.write_text(f"recipe: recovery\nrecovery:\n  method: sd\n  budget: {block}\n")
    with pytest.raises(ConfigError, match=key):
        load_config(p)


def test_budget_tokens_default_is_left_out_of_the_config():
    cfg = from_dict(RecoveryConfig, {"recovery": {"method": "sd", "budget": {"tokens": "completion"}}})
    assert cfg.recovery.budget.tokens == "completion" and to_dict(cfg)["recovery"]["budget"]["tokens"] == "completion"
    assert "tokens" not in to_dict(BudgetConfig())  # committed sd-kl runs keep their ids


# -------------------------------------------------------------------------- decisions
def test_lr_factor_and_decision():
    assert lr_factor(0.25, 1.0, "none") == 1.0
    assert lr_factor(0.25, 1.0, "linear") == pytest.approx(0.25)
    assert lr_factor(0.25, 1.0, "sqrt") == pytest.approx(0.5)
    assert lr_factor(3.0, 1.0, "linear") == 1.0 and lr_factor(3.0, 2.0, "sqrt") == 1.0  # capped at train.lr
    d = decide(BudgetConfig(kl_min=0.01, lr_scale="sqrt", kl_ref=0.64), 0.16, 1e-4)
    assert d["skipped"] is False and d["reason"] is None
    assert d["lr_factor"] == pytest.approx(0.5) and d["lr"] == pytest.approx(5e-5)
    s = decide(BudgetConfig(kl_min=0.01), 0.003, 1e-4)
    assert s["skipped"] is True and s["lr"] is None and "0.003 < kl_min 0.01" in s["reason"]
    assert decide(BudgetConfig(kl_min=0.0), 0.0, 1e-4)["skipped"] is False  # kl_min 0: never skip


def _expected_stop(curve, patience, min_rel_drop):
    """Reference: walk the (step, kl) points; best starts at the first; stop after `patience` misses in a row."""
    best, misses = curve[0][1], 0
    for step, kl in curve[1:]:
        if kl < best * (1 - min_rel_drop):
            best, misses = kl, 0
        else:
            best, misses = min(best, kl), misses + 1
        if misses >= patience:
            return step
    return None


def test_early_stop_rule_on_a_constructed_curve():
    kls = iter([0.9, 0.88, 0.95, 0.5])  # improves, then two misses (small drop, then a rise) -> stop at step 6
    st = KLEarlyStop(EarlyStopConfig(every=2, patience=2, min_rel_drop=0.05), 1.0, lambda: next(kls))
    for step in range(1, 9):
        st.observe(step)
        if st.stopped:
            break
    assert st.stopped_at == 6 and st.curve == [[0, 1.0], [2, 0.9], [4, 0.88], [6, 0.95]]
    assert st.best == 0.88 and _expected_stop(st.curve, 2, 0.05) == 6
    again = KLEarlyStop(EarlyStopConfig(every=2, patience=2, min_rel_drop=0.05), 1.0, lambda: 0.0)
    again.load_state(st.state())  # the checkpointed state restores the decision
    assert again.state() == st.state() and again.stopped


# ------------------------------------------------------------------ recover(): early stop
def _pruned(teacher):
    s = copy.deepcopy(teacher).requires_grad_(True)
    return s, prune_model(s, 0.6)


ES = EarlyStopConfig(every=2, patience=2, min_rel_drop=0.03)  # the KL of this model falls < 3 % / 2 steps by step 16


def test_early_stop_when_probe_kl_plateaus_and_resume_is_exact(tmp_path):
    teacher = _teacher()
    cfg = _train_cfg(max_steps=30, save_every=4, log_every=5)
    ref, c_ref = _pruned(teacher)
    kl0 = token_kl(ref, teacher, HELD)
    st_ref = KLEarlyStop(ES, kl0, lambda: token_kl(ref, teacher, HELD))
    stats = recover(ref, teacher, TRAIN, cfg, method="sd", constraint=c_ref, seed=3, stopper=st_ref)
    stop = st_ref.stopped_at
    assert stop is not None and 4 < stop < 30 and stats["steps"] == stop  # stopped early, at an evaluation
    assert stop == _expected_stop(st_ref.curve, ES.patience, ES.min_rel_drop)
    assert [s for s, _ in st_ref.curve] == list(range(0, stop + 1, 2))
    assert st_ref.curve[-1][1] < kl0  # it did recover before the plateau
    assert st_ref.curve[-1][1] == pytest.approx(token_kl(ref, teacher, HELD), rel=1e-9)  # weights of the stop step

    # killed two steps before the stop (checkpoint at the multiple of 4 before it), resumed in a "new process"
    kill = stop - 1

    class Boom(MetricsWriter):
        def log(self, rec):
            super().log(rec)
            if rec["step"] == kill:
                raise KeyboardInterrupt

    cfg1 = _train_cfg(max_steps=30, save_every=4, log_every=1)
    s1, c1 = _pruned(teacher)
    with pytest.raises(KeyboardInterrupt):
        recover(s1, teacher, TRAIN, cfg1, method="sd", constraint=c1, seed=3, run_dir=tmp_path,
                metrics=Boom(tmp_path / "metrics.jsonl"),
                stopper=KLEarlyStop(ES, kl0, lambda: token_kl(s1, teacher, HELD)))
    assert (tmp_path / "ckpt" / "last").exists()
    saved_wall = torch.load(tmp_path / "ckpt" / "last" / "state.pt", weights_only=False)["extra"]["wall_s"]
    assert saved_wall > 0  # the first session's training time travels with the checkpoint
    s2, c2 = _pruned(teacher)
    st2 = KLEarlyStop(ES, kl0, lambda: token_kl(s2, teacher, HELD))
    stats2 = recover(s2, teacher, TRAIN, cfg1, method="sd", constraint=c2, seed=3, run_dir=tmp_path,
                     metrics=MetricsWriter(tmp_path / "metrics.jsonl"), stopper=st2)
    assert stats2["steps"] == stop and st2.state() == st_ref.state()
    assert stats2["wall_s"] > saved_wall  # wall time summed over both sessions, not the last one alone
    for (n, p), (_, q) in zip(ref.named_parameters(), s2.named_parameters()):
        assert torch.equal(p, q), n
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, stop + 1))


def test_engine_should_stop_is_checked_after_every_step(tmp_path):
    """Engine.fit asks recipe.should_stop(step) after on_step_end: the stop step is logged, not checkpointed."""
    teacher = _teacher()
    student = copy.deepcopy(teacher).requires_grad_(True)

    class StopAt3(RecoveryRecipe):
        def should_stop(self, step):
            return step == 3

    engine = Engine(student, _train_cfg(max_steps=8, save_every=3, log_every=2), run_dir=tmp_path,
                    metrics=MetricsWriter(tmp_path / "m.jsonl"))
    stats = engine.fit(StopAt3(engine, teacher, TRAIN, method="sd"), 8)
    assert stats["steps"] == 3 and engine.step == 3
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [2, 3]
    assert not (tmp_path / "ckpt" / "last").exists()  # no checkpoint at the stop step (resume would not stop)


# ------------------------------------------------------------------------ the recipe
def test_recipe_skips_an_intact_model_and_leaves_it_bit_identical(tmp_path):
    cfg = _recipe_cfg(tmp_path, degradation={"name": "prune", "strength": 0.0, "options": {"method": "magnitude"}},
                      recovery={"method": "sd", "budget": {"kl_min": 1e-6}}, save_model=True)
    rec = R.run(cfg, tmp_path / "run")
    b = rec["recovery"]["budget"]
    assert b["skipped"] is True and b["steps_trained"] == 0 and b["lr"] is None and b["early_stop"] is None
    assert b["kl_before"] == rec["kl_to_original"]["before"] < 1e-6 and "< kl_min" in b["reason"]
    assert rec["train"]["steps"] == 0 and rec["train"]["tokens"] == 0
    assert rec["kl_to_original"]["after"] == rec["kl_to_original"]["before"]
    assert rec["eval"] == rec["eval_before"]
    original, _ = build_model(cfg.model, seed=cfg.seed)
    saved = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    ref = original.state_dict()
    assert saved and all(torch.equal(v, ref[k]) for k, v in saved.items())  # bit-identical to the original


def test_recipe_with_budget_still_recovers_a_degraded_model(tmp_path):
    budget = {"kl_min": 1e-5, "lr_scale": "sqrt", "kl_ref": 4e-4, "early_stop": {"every": 1, "patience": 3,
                                                                                   "min_rel_drop": 0.0}}
    cfg = _recipe_cfg(tmp_path, recovery={"method": "sd", "budget": budget},
                      train={"warmup_ratio": 0.0, "schedule": "constant"})
    rec = R.run(cfg, tmp_path / "run")
    b, kl = rec["recovery"]["budget"], rec["kl_to_original"]
    assert b["skipped"] is False and b["kl_before"] == kl["before"] > 1e-5
    assert b["lr"] == pytest.approx(cfg.train.lr * min(1.0, math.sqrt(kl["before"] / 4e-4)))
    assert b["steps_trained"] == rec["train"]["steps"] == 3  # KL kept falling: no early stop
    es = b["early_stop"]
    assert es["stopped_at"] is None and [s for s, _ in es["curve"]] == [0, 1, 2, 3]
    assert es["curve"][0][1] == kl["before"] and es["curve"][-1][1] == pytest.approx(kl["after"], rel=1e-6)
    assert kl["after"] < kl["before"]  # recovered with the budget on
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[0]["lr"] == pytest.approx(b["lr"])  # trained at the budget's lr


def test_recipe_budget_on_the_answer_tokens(tmp_path):
    """budget.tokens: completion: the skip decision and the early stop read the probe KL at the reference
    answers' tokens only (not every position, which kl_to_original keeps reporting)."""
    budget = {"kl_min": 1e-6, "tokens": "completion", "early_stop": {"every": 1, "patience": 3, "min_rel_drop": 0.0}}
    seen = []
    original = R.token_kl

    def spy(student, teacher, batches, loss="forward_kl", tokens="all"):
        seen.append(tokens)
        return original(student, teacher, batches, loss, tokens)

    cfg = _recipe_cfg(tmp_path, recovery={"method": "sd", "budget": budget},
                      train={"warmup_ratio": 0.0, "schedule": "constant"})
    R.token_kl, saved = spy, R.token_kl
    try:
        rec = R.run(cfg, tmp_path / "run")
    finally:
        R.token_kl = saved
    b, kl = rec["recovery"]["budget"], rec["kl_to_original"]
    assert b["tokens"] == "completion" and b["skipped"] is False and b["steps_trained"] == 3
    assert seen.count("completion") == 1 + 3  # the decision, then the early stop after each step
    assert b["kl_before"] > 0 and b["kl_before"] != pytest.approx(kl["before"])  # not the all-position KL
    assert b["early_stop"]["curve"][0][1] == b["kl_before"]

