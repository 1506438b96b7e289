"""The self-distillation baselines of the UniSD grid, as the grid runs them: on-policy SDFT
(Shenfeld et al.: in-context teacher, first 3 completion tokens masked, EMA teacher every
step, forward KL) and GKD-style JSD (Agarwal et al. 2024: on-policy fraction 0.5, sampling
temperature 1, generalized JSD with beta 0.5).

Each preset's configuration is taken from configs/grids/unisd_ablation.yaml through the
grid planner; its distillation loss on a tiny model is compared with a slow reference
(one unpadded forward per example, divergences written out in float64 over
probabilities), and one optimiser step must change the student (and, for SDFT, move the
EMA teacher by exactly decay).
"""
import random

import pytest
import torch

import unisd.components  # noqa: F401  (first: importing unisd.context first hits an import cycle)
from unisd.context import stable_seed
from tests.unisd_tiny import preset, setup_run, step_once, step_recording_teacher


def _divergence_ref(zs: torch.Tensor, zt: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """Per-token divergence from probabilities in float64.  [L, V], [L, V] -> [L].

    alpha 0: KL(p_T || p_S); otherwise alpha KL(p_T || M) + (1 - alpha) KL(p_S || M),
    M = (1 - alpha) p_S + alpha p_T (GKD's generalized JSD with beta = alpha).
    """
    ps = torch.softmax(zs.double() / temperature, -1)
    pt = torch.softmax(zt.double() / temperature, -1)
    if alpha == 0.0:
        return (pt * (pt.log() - ps.log())).sum(-1)
    m = (1 - alpha) * ps + alpha * pt
    return alpha * (pt * (pt.log() - m.log())).sum(-1) + (1 - alpha) * (ps * (ps.log() - m.log())).sum(-1)


def _completion_logits(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Logits predicting each completion token after ``prompt``: one unpadded forward.  -> [C, V]."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]  # [P + C, V]
    return logits[len(prompt) - 1:len(prompt) - 1 + len(completion)]


def kd_reference(student, teacher, s_prompts, t_prompts, comp_ids, comp_mask, loss_mask, alpha, temperature,
                 n_total) -> float:
    """sum_b (masked mean over b's loss tokens of the divergence) / n_total, example by example."""
    total = 0.0
    for b in range(len(s_prompts)):
        comp = [int(x) for x, m in zip(comp_ids[b], comp_mask[b]) if m]
        d = _divergence_ref(_completion_logits(student, s_prompts[b], comp),
                            _completion_logits(teacher, t_prompts[b], comp), alpha, temperature)
        keep = [t for t in range(len(comp)) if loss_mask[b, t]]
        total += sum(float(d[t]) for t in keep) / max(len(keep), 1)
    return total / n_total


def _recording_step(run):
    """step_once that also returns the teacher prompts the step used."""
    seen = []
    terms, n_tok = step_recording_teacher(run, lambda prompt_ids: seen.append([list(p) for p in prompt_ids]))
    assert len(seen) == 1  # one teacher pass per micro-batch
    return terms, n_tok, seen[0]


def _check_kd(run, alpha, temperature):
    """One step's kd term against the reference.  The teacher copy is perturbed first: at step 0
    it equals the student, and for two near-equal distributions forward and reverse KL agree to
    second order, so the check could not see a wrong direction (or mixture weight)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in run.ctx.teacher.parameters():
            p.mul_(1 + 0.5 * torch.randn(p.shape, generator=g))
    terms, n_tok, t_prompts = _recording_step(run)
    b, ctx = run.ctx.batch, run.ctx
    for ex, p in zip(b.examples, t_prompts):  # the in-context teacher sees the reference answer
        assert ex["target"] in run.ctx.tokenizer.decode(p)

    def ref(a, tau, mask):
        return kd_reference(run.ctx.model, ctx.teacher, b.prompt_ids, t_prompts, b.completion_ids, b.completion_mask,
                            mask, a, tau, ctx.n_seq_total)

    expect = ref(alpha, temperature, b.loss_mask)
    # float32 sums over a 49k vocabulary against float64: 1e-3 relative
    assert terms["kd"] == pytest.approx(expect, rel=1e-3)
    # the check tells the preset from its neighbours: mixture weight, temperature, loss mask
    for other in (ref(0.3 if alpha else 0.5, temperature, b.loss_mask), ref(alpha, 1.7 * temperature, b.loss_mask),
                  ref(alpha, temperature, b.completion_mask)):
        assert abs(other - expect) > 1e-2 * expect or torch.equal(b.loss_mask, b.completion_mask)
    return terms, b


def _comp(run, name):
    return next(c for c in run.components if c.name == name).params


def _params(module) -> dict:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _past_warmup(run) -> None:
    """Drop the checked step's gradients; take the warmup steps, whose learning rate is 0
    (transformers' warmup starts at 0: a run's first step with warmup_ratio > 0 moves nothing)."""
    backend = run.engine.backend
    backend.opt.zero_grad(set_to_none=True)
    while backend.sched.get_last_lr()[0] == 0.0:
        step_once(run, update=True)


def test_sdft_onpolicy_loss_matches_reference_and_step_updates(smol_tokenizer):
    cfg = preset("sdft_onpolicy")
    run = setup_run(smol_tokenizer, {}, cfg=cfg)
    ict, ema = _comp(run, "in_context_teacher"), _comp(run, "ema_teacher")
    assert cfg.loss.alpha == 0.0 and ict.skip_first_tokens == 3 and ict.on_policy_fraction == 1.0
    assert (ema.decay, ema.every) == (0.98, 1) and len(run.components) == 2
    terms, b = _check_kd(run, alpha=0.0, temperature=ict.temperature)
    assert set(terms) == {"kd"} and b.on_policy
    assert b.loss_mask[:, :3].sum() == 0 and torch.equal(b.loss_mask[:, 3:], b.completion_mask[:, 3:])
    # one optimiser step: the student moves, then the EMA teacher moves towards it by exactly 1 - decay
    _past_warmup(run)
    s0, t0 = _params(run.ctx.model), _params(run.ctx.teacher)
    step_once(run, update=True)
    s1, t1 = _params(run.ctx.model), _params(run.ctx.teacher)
    assert max(float((s1[n] - s0[n]).abs().max()) for n in s0) > 0
    for n in t0:
        assert torch.allclose(t1[n], 0.98 * t0[n] + 0.02 * s1[n], atol=1e-6), n
    assert any(not torch.equal(t1[n], t0[n]) for n in t0)


def _step_with_policy(cfg, on_policy: bool) -> int:
    """A step whose (seeded) on-policy draw at fraction 0.5 gives ``on_policy``."""
    for step in range(64):
        if (random.Random(stable_seed(cfg.seed, step, 0, "on_policy")).random() < 0.5) == on_policy:
            return step
    raise AssertionError("no such step")


@pytest.mark.parametrize("on_policy", [True, False])
def test_gkd_jsd_loss_matches_reference_and_step_updates(smol_tokenizer, on_policy):
    cfg = preset("gkd_jsd")
    run = setup_run(smol_tokenizer, {}, cfg=cfg)
    ict = _comp(run, "in_context_teacher")
    assert cfg.loss.alpha == 0.5 and ict.on_policy_fraction == 0.5 and ict.temperature == 1.0
    assert len(run.components) == 1
    run.engine.step = _step_with_policy(cfg, on_policy)
    terms, b = _check_kd(run, alpha=0.5, temperature=1.0)
    assert set(terms) == {"kd"} and b.on_policy == on_policy
    if not on_policy:  # off-policy micro-batches distil on the reference answers
        for ex, ids, m in zip(b.examples, b.completion_ids, b.completion_mask):
            assert ex["target"] in run.ctx.tokenizer.decode([int(x) for x, k in zip(ids, m) if k])
    _past_warmup(run)
    s0, t0 = _params(run.ctx.model), _params(run.ctx.teacher)
    step_once(run, update=True)
    s1, t1 = _params(run.ctx.model), _params(run.ctx.teacher)
    assert max(float((s1[n] - s0[n]).abs().max()) for n in s0) > 0
    assert all(torch.equal(t1[n], t0[n]) for n in t0)  # GKD's teacher stays fixed
