"""UniSD components: pure math against hand-computed cases, component behaviour on a tiny
model, the one-provider rule, and a meta-test that every built-in component has a test."""
import copy
import dataclasses
import math

import pytest
import torch

import unisd.components  # noqa: F401  (registers the built-ins)
from tests.unisd_tiny import setup_run, step_once
from scd.core.config import ConfigError
from unisd.components.base import (COMPONENTS, Component, Targets, build_component, build_components,
                                   components_table, register_component)
from unisd.reduction import sequence_mean
from unisd.components.divergence_clipping import clip_divergence
from unisd.components.ema_teacher import ema_update_, trained_pairs
from unisd.components.feature_matching import hidden_mse_per_token, make_projection
from unisd.components.in_context_teacher import InContextTeacher
from unisd.components.multi_teacher_agreement import (choose_demos, sequence_agreement_weights,
                                                      token_agreement_weights)
from unisd.components.token_contrastive import contrastive_loss, contrastive_per_token


# ----------------------------------------------------------------------------- reduction
def test_sequence_mean_matches_a_loop():
    torch.manual_seed(0)
    l, m = torch.rand(3, 5), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    w = torch.rand(3, 5)
    expect = 0.0
    for b in range(3):
        num = sum(float(w[b, t] * l[b, t]) for t in range(5) if m[b, t])
        den = max(sum(float(w[b, t]) for t in range(5) if m[b, t]), 1.0)
        expect += num / den
    assert float(sequence_mean(l, m, w)) == pytest.approx(expect / 3, rel=1e-6)
    # accumulation: two halves with n_total = 3 sum to the full-batch value
    parts = sequence_mean(l[:1], m[:1], w[:1], 3) + sequence_mean(l[1:], m[1:], w[1:], 3)
    assert float(parts) == pytest.approx(float(sequence_mean(l, m, w)), rel=1e-6)
    # padding may hold inf without leaking
    l2 = l.clone()
    l2[0, 4] = float("inf")
    assert float(sequence_mean(l2, m)) == pytest.approx(float(sequence_mean(l, m)))


# ----------------------------------------------------------------------------- clipping
def test_clipping_never_raises_a_term_above_its_cap():
    torch.manual_seed(0)
    l = torch.rand(4, 16) * 50
    m = torch.ones(4, 16)
    m[:, 12:] = 0
    out, c = clip_divergence(l, m, cap=10.0)
    assert c == 10.0 and float(out.max()) <= 10.0
    assert torch.equal(out[l <= 10], l[l <= 10])  # values below the cap are untouched
    l[:, 12:] = 1e9  # padding must not move the quantile
    out, c = clip_divergence(l, m, quantile=0.9)
    assert c == pytest.approx(float(torch.quantile(l[:, :12].reshape(-1), 0.9)))
    assert float(out.max()) <= c + 1e-6 and torch.all(out <= l)


def _clip_component_case():
    comp = build_component("divergence_clipping", {"cap": 0.5})
    ctx = type("Ctx", (), {})()
    ctx.per_token = torch.tensor([[0.1, 2.0, 0.7]], requires_grad=True)
    ctx.batch = type("B", (), {"loss_mask": torch.tensor([[1, 1, 1]])})()
    ctx.log = lambda *a: None
    before = ctx.per_token
    comp.loss_terms(ctx, None)
    return before, ctx.per_token


def test_divergence_clipping_component():
    before, after = _clip_component_case()
    assert after[0].tolist() == pytest.approx([0.1, 0.5, 0.5])
    after.sum().backward()
    assert before.grad[0].tolist() == [1.0, 0.0, 0.0]  # clipped tokens get no gradient


# ----------------------------------------------------------------------------- agreement
def test_token_agreement_weights_hand_case():
    # K = 3 teachers, one sequence of 4 tokens; the last token is padding
    logps = torch.tensor([[[-1.0, -2.0, -0.5, -9.0]],
                          [[-1.0, -1.0, -0.5, -1.0]],
                          [[-1.0, -3.0, -2.0, -5.0]]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # sample variances (K - 1): token 0: 0; token 1: mean -2, sq devs 0+1+1 -> 1.0;
    # token 2: mean -1, devs .25+.25+1 -> 1.5/2 = 0.75
    d = [0.0, 1.0, 0.75]
    # 0.95-quantile of [0, 0.75, 1] (linear): position 0.95 * 2 = 1.9 -> 0.75 + 0.9 * 0.25 = 0.975
    s = 0.975
    gamma = 2.0
    expect = [max(1 / (1 + gamma * min(x / s, 10.0)), 0.01) for x in d]
    w, dd = token_agreement_weights(logps, mask, gamma)
    assert dd[0, :3].tolist() == pytest.approx(d)
    assert w[0, :3].tolist() == pytest.approx(expect, rel=1e-6)
    assert expect[0] == 1.0 and expect[1] == pytest.approx(1 / (1 + 2 / 0.975))
    # the cap and the floor
    w, _ = token_agreement_weights(logps, mask, gamma=1000.0, cap=10.0, floor=0.01)
    assert float(w[0, 1]) == pytest.approx(0.01)
    # loss = sum w l m / clamp(sum w m, 1)
    l = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    w, _ = token_agreement_weights(logps, mask, gamma)
    num = sum(expect[t] * [1.0, 2.0, 3.0][t] for t in range(3))
    assert float(sequence_mean(l, mask, w)) == pytest.approx(num / max(sum(expect), 1.0), rel=1e-6)


def test_sequence_agreement_weights_hand_case():
    logps = torch.tensor([[[-1.0, -3.0], [-2.0, -2.0]],
                          [[-1.0, -1.0], [-2.0, -2.0]]])  # K=2, B=2, L=2
    mask = torch.tensor([[1, 1], [1, 0]])
    # seq 0: means -2 and -1 -> population var 0.25; seq 1: means -2, -2 -> 0
    w, d = sequence_agreement_weights(logps, mask, gamma=2.0)
    assert d.tolist() == pytest.approx([0.25, 0.0])
    assert w.tolist() == pytest.approx([math.exp(-0.5), 1.0])
    # applied to per-sequence means (the reference's renormalisation would cancel them)
    l = torch.tensor([[1.0, 3.0], [5.0, 0.0]])
    assert float(sequence_mean(l, mask, None, None, w)) == pytest.approx((math.exp(-0.5) * 2.0 + 5.0) / 2)
    per_token_w = w[:, None].expand(2, 2)
    assert float(sequence_mean(l, mask, per_token_w)) == pytest.approx((2.0 + 5.0) / 2)  # cancels


def test_choose_demos_disjoint_and_excludes_self():
    exs = [{"id": str(i), "task": "a" if i < 8 else "b", "target": "x"} for i in range(12)]
    groups = choose_demos(3, exs, k=3, shots=2, seed=0)
    flat = [j for g in groups for j in g]
    assert len(groups) == 3 and all(len(g) == 2 for g in groups)
    assert len(set(flat)) == 6 and 3 not in flat and all(j < 8 for j in flat)
    assert groups == choose_demos(3, exs, k=3, shots=2, seed=0)
    with pytest.raises(ValueError, match="lower k or shots"):
        choose_demos(9, exs, k=3, shots=2, seed=0)  # task b has 3 other examples


def test_retrieval_neighbours():
    from unisd.retrieval import mean_pool, nearest

    h = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]]])
    assert mean_pool(h, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 1.0]]
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [1.0, 0.05]]),
                                        dim=-1)
    nb = nearest(emb, 2, groups=["a", "a", "a", "a", "b"])
    assert nb[0] == [1, 3] and nb[2] == [3, 1] and nb[4] == []


@pytest.mark.slow
def test_minilm_embeddings_rank_paraphrases_first():
    from unisd.retrieval import encode_texts

    emb = encode_texts(["The movie was wonderful.", "A truly great film.", "The stock market fell today."],
                       cache=False)
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2])


def _agreement_component_case(smol_tokenizer):
    run = setup_run(smol_tokenizer, {"in_context_teacher": {"max_new_tokens": 4},
                                     "multi_teacher_agreement": {"k": 3, "shots": 1, "gamma": 1.0}})
    step_once(run)
    ctx = run.ctx
    assert ctx.token_weights is not None and ctx.token_weights.shape == ctx.batch.loss_mask.shape
    m = ctx.batch.loss_mask.bool()
    assert float(ctx.token_weights[m].min()) >= 0.01 and float(ctx.token_weights[m].max()) <= 1.0
    assert ctx.teacher_passes == 1 + 3  # the provider + K agreement contexts


def test_multi_teacher_agreement_component(smol_tokenizer):
    _agreement_component_case(smol_tokenizer)


# ----------------------------------------------------------------------------- contrastive
def test_contrastive_loss_hand_case():
    s = torch.tensor([[-1.0, -2.0, -4.0]])
    pos = torch.tensor([[-1.2, -2.0, 0.0]])
    neg = torch.tensor([[-3.0, -2.1, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    per = contrastive_per_token(s, pos, neg, margin=0.5)
    # token 0: relu(0.5 + 0.2 - 2.0) = 0; token 1: relu(0.5 + 0 - 0.1) = 0.4
    assert per[0, :2].tolist() == pytest.approx([0.0, 0.4])
    assert float(contrastive_loss(s, pos, neg, mask, 0.5)) == pytest.approx(0.2)


def test_wrong_demonstration_is_another_answer_of_the_same_task():
    from unisd.prompts import wrong_reference_table

    exs = [{"task": "a", "target": "fresh"}, {"task": "a", "target": "rotten"}, {"task": "a", "target": "fresh"},
           {"task": "b", "target": "x"}]
    table = wrong_reference_table(exs, seed=0)
    assert table[0] == 1 and table[2] == 1 and table[1] in (0, 2) and table[3] is None


def _contrastive_component_case(smol_tokenizer):
    run = setup_run(smol_tokenizer, {"in_context_teacher": {"max_new_tokens": 4},
                                     "token_contrastive": {"weight": 0.1, "margin": 0.5}})
    terms, _ = step_once(run)
    assert terms["token_contrastive"] > 0.0 and run.ctx.teacher_passes == 2
    assert "token_contrastive/pos_dist" in run.ctx.stats


def test_token_contrastive_component(smol_tokenizer):
    _contrastive_component_case(smol_tokenizer)


# ----------------------------------------------------------------------------- feature matching
def test_feature_projection_shapes():
    proj = make_projection(32, 64)
    assert tuple(proj.weight.shape) == (64, 32)
    assert tuple(proj(torch.zeros(2, 3, 32)).shape) == (2, 3, 64)
    assert make_projection(32, 32) is None
    ident = make_projection(8, 8, "always")
    x = torch.randn(2, 8)
    assert torch.allclose(ident(x), x)
    with pytest.raises(ValueError, match="projection: auto"):
        make_projection(8, 16, "none")
    s, t = torch.zeros(1, 2, 4), torch.ones(1, 2, 4)
    assert hidden_mse_per_token(s, t).tolist() == [[1.0, 1.0]]


def _feature_component_case(smol_tokenizer):
    from unisd.components.feature_matching import FeatureMatching

    comp = build_component("feature_matching", {"weight": 1.0, "layers": [1, -1]})
    assert isinstance(comp, FeatureMatching)

    class Cfg:  # a teacher twice as wide as the student
        hidden_size = 16

    ctx = type("Ctx", (), {})()
    ctx.model = type("M", (), {"config": type("C", (), {"hidden_size": 8})()})()
    ctx.teacher = type("T", (), {"config": Cfg()})()
    ctx.device = torch.device("cpu")
    ctx.n_seq_total = 2
    ctx.log = lambda *a: None
    comp.setup(ctx)
    assert set(comp.trainable_modules()["projections"].keys()) == {"1_1", "m1_m1"}
    ctx.batch = type("B", (), {"loss_mask": torch.ones(2, 3), "examples": [0, 1]})()
    hs = tuple(torch.randn(2, 3, 8, requires_grad=True) for _ in range(3))
    ctx.student = type("S", (), {"hidden_states": hs})()
    targets = Targets(logits=None, hidden_states=tuple(torch.randn(2, 3, 16) for _ in range(3)))
    loss = comp.loss_terms(ctx, targets)["feature_matching"]
    loss.backward()
    assert comp.projections["1_1"].weight.grad is not None and hs[1].grad is not None and hs[0].grad is None


def test_feature_matching_component(smol_tokenizer):
    _feature_component_case(smol_tokenizer)


def _fm_reference(hs, ht, mask, pairs, weight, n_total, projs=None):
    """Feature-matching loss by plain loops in float64: for each (student, teacher) layer pair
    and each sequence, the mean over its masked tokens of mean_h (W s - t)^2; summed over
    sequences / n_total; averaged over pairs; times weight."""
    total = 0.0
    for k, (i, j) in enumerate(pairs):
        s, t = hs[i].detach().double(), ht[j].double()
        if projs is not None:
            s = s @ projs[k].detach().double().T
        pair = 0.0
        for b in range(s.shape[0]):
            toks = [float(((s[b, l] - t[b, l]) ** 2).mean()) for l in range(s.shape[1]) if mask[b, l]]
            pair += sum(toks) / max(len(toks), 1)
        total += pair / n_total
    return weight * total / len(pairs)


def test_feature_matching_value_against_loops():
    from unisd.components.feature_matching import FeatureMatching

    torch.manual_seed(3)
    comp = build_component("feature_matching", {"weight": 0.3, "layers": [0, 2], "teacher_layers": [1, -1]})
    assert isinstance(comp, FeatureMatching)
    ctx = type("Ctx", (), {})()
    ctx.model = type("M", (), {"config": type("C", (), {"hidden_size": 8})()})()
    ctx.teacher = type("T", (), {"config": type("C", (), {"hidden_size": 5})()})()
    ctx.device, ctx.n_seq_total, logged = torch.device("cpu"), 4, {}  # a micro-batch of 3 of 4 sequences
    ctx.log = lambda name, value: logged.__setitem__(name, float(torch.as_tensor(value).detach()))
    comp.setup(ctx)
    projs = [comp.projections["0_1"].weight, comp.projections["2_m1"].weight]  # [5, 8] each
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]])  # the last sequence has no completion
    ctx.batch = type("B", (), {"loss_mask": mask, "examples": [0, 1, 2]})()
    hs = tuple(torch.randn(3, 4, 8) for _ in range(3))
    ht = tuple(torch.randn(3, 4, 5) for _ in range(3))
    hs[0][0, 3] = float("nan")  # padding may hold anything
    ctx.student = type("S", (), {"hidden_states": hs})()
    loss = comp.loss_terms(ctx, Targets(logits=None, hidden_states=ht))["feature_matching"]
    expect = _fm_reference(hs, ht, mask, [(0, 1), (2, 2)], 0.3, 4, projs)
    assert float(loss.detach()) == pytest.approx(expect, rel=1e-5)
    # the logged mse is the unweighted mean over this micro-batch's sequences
    assert logged["feature_matching/mse"] == pytest.approx(expect / 0.3 * 4 / 3, rel=1e-5)
    # equal widths, final layer, no projection: weight * masked MSE of the last states
    same = build_component("feature_matching", {"weight": 0.1})
    ctx.teacher = None
    same.setup(ctx)
    assert len(same.projections) == 0
    ht8 = tuple(torch.randn(3, 4, 8) for _ in range(3))
    got = float(same.loss_terms(ctx, Targets(logits=None, hidden_states=ht8))["feature_matching"])
    assert got == pytest.approx(_fm_reference(hs, ht8, mask, [(-1, -1)], 0.1, 4), rel=1e-5)


def test_feature_matching_value_in_a_training_step(smol_tokenizer):
    # the term of a real step equals the loop reference on the states that step used
    run = setup_run(smol_tokenizer, {"in_context_teacher": {"max_new_tokens": 4},
                                     "feature_matching": {"weight": 0.5}})
    provider = next(c for c in run.components if c.provides_teacher)
    seen = []
    original = provider.teacher_targets

    def record(ctx):
        targets = original(ctx)
        seen.append(targets)
        return targets

    provider.teacher_targets = record
    terms, _ = step_once(run)
    (targets,), ctx = seen, run.ctx
    mask = ctx.batch.loss_mask
    assert mask.sum() > 0 and targets.hidden_states[-1].shape == ctx.student.hidden_states[-1].shape
    expect = _fm_reference(ctx.student.hidden_states, targets.hidden_states, mask, [(-1, -1)], 0.5,
                           ctx.n_seq_total)
    assert expect > 0 and terms["feature_matching"] == pytest.approx(expect, rel=1e-4)


def test_feature_matching_requests_hidden_states_only_when_on(smol_tokenizer):
    base = setup_run(smol_tokenizer, {"in_context_teacher": {"max_new_tokens": 4}})
    step_once(base)
    assert base.ctx.student.hidden_states is None and base.ctx.teacher_passes == 1
    fm = setup_run(smol_tokenizer, {"in_context_teacher": {"max_new_tokens": 4}, "feature_matching": {"weight": 0.1}})
    terms, _ = step_once(fm)
    assert fm.ctx.student.hidden_states is not None and terms["feature_matching"] > 0


# ----------------------------------------------------------------------------- EMA
def test_ema_update_math():
    t, s = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 6.0])]
    ema_update_(t, s, 0.75)
    assert t[0].tolist() == [1.5, 3.0]
    ema_update_(t, s, 0.0)
    assert torch.equal(t[0], s[0])
    with pytest.raises(ValueError):
        ema_update_(t, s, 1.5)


def _ema_decay0_case(smol_tokenizer):
    run = setup_run(smol_tokenizer, {"in_context_teacher": {"max_new_tokens": 4},
                                     "ema_teacher": {"decay": 0.0, "every": 1}})
    step_once(run, update=True)
    student, teacher = dict(run.ctx.model.named_parameters()), dict(run.ctx.teacher.named_parameters())
    changed = [n for n in student if not torch.equal(student[n], teacher[n])]
    assert changed == []  # decay 0: the teacher IS the student after the update
    ids = torch.randint(0, 500, (1, 6))
    with torch.no_grad():
        assert torch.equal(run.ctx.model(ids).logits, run.ctx.teacher(ids).logits)


def test_ema_decay_zero_copies_the_student(smol_tokenizer):
    _ema_decay0_case(smol_tokenizer)


LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def _lora_ema_run(smol_tokenizer, adapters: str, steps: int = 2):
    run = setup_run(smol_tokenizer, {"in_context_teacher": {"max_new_tokens": 4},
                                     "ema_teacher": {"decay": 0.5, "every": 1, "adapters": adapters}},
                    lora=LORA, lr=1e-2)
    before = {n: t.detach().clone() for n, t in run.ctx.teacher.named_parameters()}
    for _ in range(steps):
        step_once(run, update=True)
    return run, before


@torch.no_grad()
def _dense_effective(model) -> dict:
    """{layer: W0 + (alpha / r) B A} in float64, computed by hand from the parameters (the slow reference)."""
    p = dict(model.named_parameters())
    out = {}
    for name in p:
        if name.endswith(".base_layer.weight"):
            layer = name[: -len(".base_layer.weight")]
            a, b = p[f"{layer}.lora_A.default.weight"], p[f"{layer}.lora_B.default.weight"]
            out[layer] = p[name].double() + (LORA["lora_alpha"] / LORA["r"]) * (b.double() @ a.double())
    return out


def test_ema_with_lora_averages_the_merged_weights(smol_tokenizer):
    """adapters: average = EMA of the student's effective weights W0 + s B A, against a float64 reference."""
    run = setup_run(smol_tokenizer, {"in_context_teacher": {"max_new_tokens": 4},
                                     "ema_teacher": {"decay": 0.5, "every": 1}}, lora=LORA, lr=1e-2)
    ref = _dense_effective(run.ctx.model)  # the teacher at step 0 is the student (B = 0: W0)
    for _ in range(3):
        step_once(run, update=True)
        ref = {k: 0.5 * v + 0.5 * _dense_effective(run.ctx.model)[k] for k, v in ref.items()}
    t = dict(run.ctx.teacher.named_parameters())
    assert len(ref) == 4 and max(float((ref[k] - _dense_effective(run.ctx.model)[k]).abs().max()) for k in ref) > 1e-4
    for k, v in ref.items():
        assert torch.allclose(t[f"{k}.base_layer.weight"].double(), v, atol=1e-6), k
    dense = copy.deepcopy(run.ctx.model).merge_and_unload()  # a plain model holding the reference weights
    with torch.no_grad():
        for k, v in ref.items():
            dense.get_submodule(k.removeprefix("base_model.model.")).weight.copy_(v.float())
        ids = torch.randint(0, 500, (2, 7))
        assert torch.allclose(run.ctx.teacher(ids).logits, dense(ids).logits, atol=1e-5)
    assert run.stats["ema_teacher/distance"] > 0  # ||W_T - W_S|| after the last update


def test_ema_with_lora_skip_keeps_the_teacher_as_released(smol_tokenizer):
    run, before = _lora_ema_run(smol_tokenizer, "skip")
    after = dict(run.ctx.teacher.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # the released EMA teacher never changes
    assert any(not torch.equal(p, before[n]) for n, p in run.ctx.model.named_parameters() if "lora_B" in n)


def test_ema_with_lora_factors_averages_a_and_b_separately(smol_tokenizer):
    run, before = _lora_ema_run(smol_tokenizer, "factors", steps=1)
    pairs = trained_pairs(run.ctx.model, run.ctx.teacher)
    assert pairs and all("lora_" in name for name, _, _ in pairs)  # what is trained are the adapters
    after = dict(run.ctx.teacher.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed)  # the teacher's adapters moved, base weights did not
    s = dict(run.ctx.model.named_parameters())
    n = next(iter(n for n in changed if "lora_B" in n))
    assert torch.allclose(after[n], 0.5 * before[n] + 0.5 * s[n])
    step_once(run, update=True)  # after two updates B_T A_T is not the average of B A (cross terms)
    merged = _lora_ema_run(smol_tokenizer, "average")[0]
    tf, tm = _dense_effective(run.ctx.teacher), dict(merged.ctx.teacher.named_parameters())
    assert max(float((tf[k] - tm[f"{k}.base_layer.weight"].double()).abs().max()) for k in tf) > 1e-7


# ----------------------------------------------------------------------------- in-context teacher
def _in_context_teacher_case(smol_tokenizer):
    from unisd.prompts import teacher_prompt

    ex = {"instruction": "Classify.", "input": "A fine film.", "target": "fresh", "task": "t"}
    text = teacher_prompt(ex, smol_tokenizer)  # the released wording by default
    assert "Classify.\n\nA fine film.\n\nThis is an example for a response to the question:\nfresh\n\n" in text
    assert text.count("Carefully study the reference solution") == 1
    ours = teacher_prompt(ex, smol_tokenizer, template="ours")
    assert "A fine film.\n\nA reference answer to this request:\nfresh\n\nStudy the reference answer" in ours
    run = setup_run(smol_tokenizer, {"in_context_teacher": {"max_new_tokens": 5, "skip_first_tokens": 2}})
    step_once(run)
    b = run.ctx.batch
    assert b.on_policy and b.completion_ids.shape[1] <= 5
    assert int(b.loss_mask[:, :2].sum()) == 0 and torch.equal(b.loss_mask[:, 2:], b.completion_mask[:, 2:])
    first = b.completion_ids.clone()
    again = setup_run(smol_tokenizer, {"in_context_teacher": {"max_new_tokens": 5, "skip_first_tokens": 2}})
    step_once(again)
    assert torch.equal(first, again.ctx.batch.completion_ids)  # seeded per (seed, step, micro)
    off = setup_run(smol_tokenizer, {"in_context_teacher": {"on_policy_fraction": 0.0, "max_new_tokens": 64}})
    step_once(off)
    from scd.data.prompts import render_target

    ex0 = off.ctx.batch.examples[0]
    ref = off.ctx.encode_target(render_target(ex0, smol_tokenizer))
    assert not off.ctx.batch.on_policy
    assert off.ctx.batch.completion_ids[0, :len(ref)].tolist() == ref


def test_in_context_teacher_component(smol_tokenizer):
    _in_context_teacher_case(smol_tokenizer)


def test_sampling_is_seeded_and_stops(smol_tokenizer):
    from scd.models import ModelConfig, TinyConfig, build_model
    from unisd.sampling import cut_at_stop, sample_completions

    assert cut_at_stop([5, 6, 2, 7, 2], [2]) == [5, 6, 2] and cut_at_stop([5, 6], [2]) == [5, 6]
    model, _ = build_model(ModelConfig(name="tiny", tiny=TinyConfig(hidden_size=32, intermediate_size=64)),
                           tokenizer=smol_tokenizer)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    kw = dict(max_new_tokens=6, temperature=1.0, pad_id=0, stop_ids=[2], batch_size=2)
    a = sample_completions(model, prompts, seed=1, **kw)
    assert a == sample_completions(model, prompts, seed=1, **kw)
    assert a != sample_completions(model, prompts, seed=2, **kw)
    assert all(1 <= len(c) <= 6 for c in a)


# ----------------------------------------------------------------------------- config rules
def test_two_teacher_providers_is_a_clear_error():
    @register_component("second_teacher_for_test")
    class SecondTeacher(InContextTeacher):
        pass

    try:
        with pytest.raises(ConfigError, match="in_context_teacher and second_teacher_for_test both provide"):
            build_components({"in_context_teacher": {}, "second_teacher_for_test": {}})
        assert len(build_components({"in_context_teacher": False, "second_teacher_for_test": {}})) == 1
    finally:
        COMPONENTS._items.pop("second_teacher_for_test")


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="no teacher provider"):
        build_components({"ema_teacher": {}})
    with pytest.raises(ConfigError, match="did you mean 'ema_teacher'"):
        build_components({"in_context_teacher": {}, "ema_teachr": {}})
    with pytest.raises(ConfigError, match=r"components.ema_teacher: .*did you mean 'decay'"):
        build_components({"in_context_teacher": {}, "ema_teacher": {"decya": 0.5}})
    with pytest.raises(ConfigError, match="decay must be in"):
        build_components({"in_context_teacher": {}, "ema_teacher": {"decay": 2.0}})
    with pytest.raises(ValueError, match="unknown needs"):
        @register_component("bad_needs_for_test")
        class Bad(Component):
            needs = frozenset({"gpu_magic"})
    assert "bad_needs_for_test" not in COMPONENTS


def test_components_table_has_every_registered_component():
    table = components_table({"in_context_teacher": {}, "ema_teacher": False, "feature_matching": True})
    assert set(table) == set(COMPONENTS.names())
    assert table["in_context_teacher"] and table["feature_matching"] and not table["ema_teacher"]


def test_unisd_config_validates_components_and_objective(tmp_path):
    from scd.core.config import from_dict
    from unisd.train import UniSDConfig

    cfg = from_dict(UniSDConfig, {"components": {"in_context_teacher": {}, "ema_teacher": {"decay": 0.98}}})
    assert cfg.components["ema_teacher"]["decay"] == 0.98
    with pytest.raises(ConfigError, match="both provide|did you mean"):
        from_dict(UniSDConfig, {"components": {"in_context_teachr": {}}})
    with pytest.raises(ConfigError, match="components have no effect"):
        from_dict(UniSDConfig, {"objective": "sft"})
    from_dict(UniSDConfig, {"objective": "sft", "components": {"in_context_teacher": False}})
    with pytest.raises(ConfigError, match="loss.divergence"):
        from_dict(UniSDConfig, {"loss": {"divergence": "jsdd"}})


# ----------------------------------------------------------------------------- meta-test
TEST_ENTRIES = {
    "in_context_teacher": test_in_context_teacher_component,
    "ema_teacher": test_ema_with_lora_averages_the_merged_weights,
    "multi_teacher_agreement": test_multi_teacher_agreement_component,
    "token_contrastive": test_token_contrastive_component,
    "feature_matching": test_feature_matching_component,
    "divergence_clipping": test_divergence_clipping_component,
}


def test_every_builtin_component_has_a_test_entry():
    builtin = {n for n, cls in COMPONENTS.items() if cls.__module__.startswith("unisd.")}
    missing = builtin - set(TEST_ENTRIES)
    assert not missing, f"components without a test entry in TEST_ENTRIES: {sorted(missing)}"
    assert set(TEST_ENTRIES) <= set(COMPONENTS.names())
    assert all(callable(f) and f.__name__.startswith("test_") for f in TEST_ENTRIES.values())
    for name in builtin:  # one file per component
        assert COMPONENTS.get(name).__module__ == f"unisd.components.{name}"
        assert dataclasses.is_dataclass(COMPONENTS.get(name).Params)


@pytest.mark.slow
def test_agreement_with_retrieved_demos(smol_tokenizer):
    run = setup_run(smol_tokenizer, {"in_context_teacher": {"max_new_tokens": 4},
                                     "multi_teacher_agreement": {"k": 2, "shots": 2, "demos": "retrieval"}})
    comp = run.components[1]
    for i, groups in enumerate(comp.demos):
        flat = [j for g in groups for j in g]
        assert len(flat) == 4 and len(set(flat)) == 4 and i not in flat
    step_once(run)
    assert run.ctx.teacher_passes == 3
