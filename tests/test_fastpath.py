"""Completion-only output layer (scd.heads + scd.completion_loss) against the full-logit path.

Reference: the model's full logits [B, T, V] (its own forward), shifted and masked as
every recipe does today, through scd.losses.per_token_divergence / ce_per_token.
"""
import pytest
import torch

from scd.completion_loss import fused_kd_ce
from scd.heads import (backbone_hidden, head_weight, num_targets, target_hidden, target_labels, target_logits,
                       target_positions, unwrap)
from scd.completion_loss import chunked_divergence
from scd.losses import ce_per_token, per_token_divergence, teacher_topk
from scd.models import TinyConfig, tiny_model

V = 101
SHAPE = TinyConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                   num_key_value_heads=2)


def make_batch(seed=0, lengths=(9, 12, 7), completion=(3, 1, 4)):
    """Right-padded batch: prompt labels and padding are -100, the last `completion` tokens are targets."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    labels = torch.full((len(lengths), T), -100, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, (n, c) in enumerate(zip(lengths, completion)):
        ids[i, :n] = torch.randint(1, V, (n,), generator=g)
        labels[i, n - c:n] = ids[i, n - c:n]
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def full_reference(student, teacher, batch, name, **params):
    """Today's path: full logits of both models, then [:, :-1][mask] (per-token kd, ce)."""
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lab = batch["labels"][:, 1:]
    m = lab != -100
    s, t = s[:, :-1][m], t[:, :-1][m]
    return per_token_divergence(name, s, t, **params), ce_per_token(s, lab[m])


def fast_path(student, teacher, batch, name, head_dtype=None, chunk_size=4, **params):
    h = target_hidden(student, batch)  # [N, H]
    w, b = head_weight(student)
    with torch.no_grad():
        th = target_hidden(teacher, batch)
    tw, tb = head_weight(teacher)
    return fused_kd_ce(h, w, bias=b, labels=target_labels(batch["labels"]), teacher=th, teacher_weight=tw,
                       teacher_bias=tb, name=name, head_dtype=head_dtype, chunk_size=chunk_size, **params)


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_target_positions_order_matches_mask():
    batch = make_batch()
    rows, cols = target_positions(batch["labels"])
    assert num_targets(batch["labels"]) == 8 == len(rows)
    # row 0 (length 9, 3 targets at positions 6..8) is predicted from positions 5..7
    assert rows.tolist()[:3] == [0, 0, 0] and cols.tolist()[:3] == [5, 6, 7]
    assert torch.equal(batch["labels"][rows, cols + 1], target_labels(batch["labels"]))


def test_target_logits_equal_full_logits():
    model = tiny_model(V, SHAPE, seed=1).eval()
    batch = make_batch()
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    m = batch["labels"][:, 1:] != -100
    torch.testing.assert_close(target_logits(model, batch), full[:, :-1][m], rtol=1e-5, atol=1e-5)
    h = backbone_hidden(model, batch["input_ids"], batch["attention_mask"])
    assert h.shape == (3, 12, SHAPE.hidden_size)


@pytest.mark.parametrize("name,params", [("forward_kl", {}), ("jsd", {"beta": 0.5}), ("reverse_kl", {}),
                                         ("forward_kl", {"keep_logits_mb": 0}), ("jsd", {"keep_logits_mb": 0})])
def test_fused_loss_and_grads_equal_full_path(name, params):
    """keep_logits_mb 0: the backward recomputes every chunk's logits; default: kept from the forward."""
    student, teacher = tiny_model(V, SHAPE, seed=1), tiny_model(V, SHAPE, seed=2).eval()
    batch = make_batch()
    n = num_targets(batch["labels"])
    kd_ref, ce_ref = full_reference(student, teacher, batch, name,
                                    **{k: v for k, v in params.items() if k != "keep_logits_mb"})
    loss_ref = (0.7 * kd_ref + 0.3 * ce_ref).sum() / n
    g_ref = grads(student, loss_ref)
    kd, ce = fast_path(student, teacher, batch, name, **params)
    torch.testing.assert_close(kd, kd_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, ce_ref, rtol=1e-5, atol=1e-6)
    assert float(kd_ref.detach().min()) > 1e-4 and float(ce_ref.detach().min()) > 1.0  # not a trivially zero loss
    g = grads(student, (0.7 * kd + 0.3 * ce).sum() / n)
    assert g.keys() == g_ref.keys() and "model.embed_tokens.weight" in g  # tied head + embedding
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-4, atol=1e-6, msg=k)


def test_lora_student_fused_equals_full():
    peft = pytest.importorskip("peft")
    base = tiny_model(V, SHAPE, seed=1)
    student = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                        target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    teacher = tiny_model(V, SHAPE, seed=2).eval()
    assert unwrap(student) is base
    batch = make_batch(seed=3)
    n = num_targets(batch["labels"])
    kd_ref, ce_ref = full_reference(student, teacher, batch, "forward_kl")
    g_ref = grads(student, (kd_ref + ce_ref).sum() / n)
    kd, ce = fast_path(student, teacher, batch, "forward_kl")
    g = grads(student, (kd + ce).sum() / n)
    assert g_ref and all("lora" in k for k in g_ref)
    torch.testing.assert_close(kd, kd_ref, rtol=1e-5, atol=1e-6)
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-4, atol=1e-6, msg=k)


def test_fused_matches_chunked_divergence_with_bias_and_topk_full():
    """Random tensors, a head with bias, teacher logits and a k = V TopKTeacher: all equal."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(13, 16, generator=g, requires_grad=True)
    w = torch.randn(V, 16, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True)
    t_logits = 3 * torch.randn(13, V, generator=g)
    labels = torch.randint(0, V, (13,), generator=g)
    ref = chunked_divergence(h, t_logits, w, bias=b, name="jsd", beta=0.3, chunk_size=5)
    for teacher in (t_logits, teacher_topk(t_logits, V)):
        kd, ce = fused_kd_ce(h, w, bias=b, labels=labels, teacher=teacher, name="jsd", beta=0.3, chunk_size=5)
        torch.testing.assert_close(kd, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, ce_per_token(h @ w.T + b, labels), rtol=1e-5, atol=1e-6)
    gh, gw, gb = torch.autograd.grad((kd + 2 * ce).sum(), (h, w, b))
    z = h @ w.T + b
    rh, rw, rb = torch.autograd.grad((per_token_divergence("jsd", z, t_logits, beta=0.3)
                                      + 2 * ce_per_token(z, labels)).sum(), (h, w, b))
    for a, r in ((gh, rh), (gw, rw), (gb, rb)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_teacher_vocab_prefix_and_ce_only():
    """A teacher with a larger vocab: KD on the shared prefix (as distill.token_terms); teacher None: kd = 0."""
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(6, 8, generator=g), torch.randn(V, 8, generator=g)
    t = torch.randn(6, V + 7, generator=g)
    labels = torch.randint(0, V, (6,), generator=g)
    kd, _ = fused_kd_ce(h, w, labels=labels, teacher=t)
    torch.testing.assert_close(kd, per_token_divergence("forward_kl", h @ w.T, t[:, :V]))
    kd0, ce0 = fused_kd_ce(h, w, labels=labels)
    assert float(kd0.abs().max()) == 0.0 and float(ce0.min()) > 0


def test_bf16_head_close_to_fp32_and_loss_in_fp32():
    student, teacher = tiny_model(V, SHAPE, seed=1), tiny_model(V, SHAPE, seed=2).eval()
    batch = make_batch()
    n = num_targets(batch["labels"])
    kd32, ce32 = fast_path(student, teacher, batch, "forward_kl")
    g32 = grads(student, (kd32 + ce32).sum() / n)
    kd16, ce16 = fast_path(student, teacher, batch, "forward_kl", head_dtype=torch.bfloat16)
    assert kd16.dtype == torch.float32 and ce16.dtype == torch.float32
    g16 = grads(student, (kd16 + ce16).sum() / n)
    assert g16["lm_head.weight" if "lm_head.weight" in g16 else "model.embed_tokens.weight"].dtype == torch.float32
    torch.testing.assert_close(kd16, kd32, rtol=0.05, atol=2e-3)
    torch.testing.assert_close(ce16, ce32, rtol=0.02, atol=2e-2)
    for k in g32:
        rel = float((g16[k] - g32[k]).norm() / g32[k].norm().clamp_min(1e-12))
        assert rel < 0.05, (k, rel)
    # bf16 hidden states in (a bf16 backbone), fp32 loss out
    h = target_hidden(student, batch).detach().to(torch.bfloat16).requires_grad_(True)
    w, _ = head_weight(student)
    kd, ce = fused_kd_ce(h, w.detach().to(torch.bfloat16), labels=target_labels(batch["labels"]),
                         teacher=target_hidden(teacher, batch).detach(), teacher_weight=head_weight(teacher)[0])
    assert kd.dtype == torch.float32
    torch.testing.assert_close(kd, kd32.detach(), rtol=0.05, atol=5e-3)
    (kd.sum() + ce.sum()).backward()
    assert h.grad.dtype == torch.bfloat16 and torch.isfinite(h.grad.float()).all()


def test_bf16_under_autocast_backbone():
    """Autocast bf16 over fp32 weights (the engine's bf16 mode): same targets as fp32 within bf16 tolerance."""
    student = tiny_model(V, SHAPE, seed=1)
    batch = make_batch()
    ref = target_logits(student, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = target_hidden(student, batch)
        w, _ = head_weight(student)
        _, ce = fused_kd_ce(h, w, labels=target_labels(batch["labels"]), head_dtype=torch.bfloat16)
    torch.testing.assert_close(ce, ce_per_token(ref, target_labels(batch["labels"])), rtol=0.03, atol=0.05)


def prefixed_batch(prefix_len=20, seed=0, lengths=(3, 7, 1, 5), completion=(2, 1, 1, 3)):
    """Right-padded batch whose rows share their first ``prefix_len`` tokens, then differ."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(1, V, (prefix_len,), generator=g)
    rows = [torch.cat([prefix, torch.randint(1, V, (n,), generator=g)]) for n in lengths]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (r, c) in enumerate(zip(rows, completion)):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
        labels[i, len(r) - c:len(r)] = r[len(r) - c:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_shared_prefix_len():
    from scd.heads import MIN_SHARED_PREFIX, shared_prefix_len
    b = prefixed_batch(20)
    assert shared_prefix_len(b["input_ids"], b["attention_mask"]) == 20
    assert shared_prefix_len(b["input_ids"][:1], b["attention_mask"][:1]) == 0  # one row
    short = prefixed_batch(MIN_SHARED_PREFIX - 1, seed=1)
    assert shared_prefix_len(short["input_ids"], short["attention_mask"]) == 0
    same = prefixed_batch(20, lengths=(0, 0), completion=(1, 1))  # identical rows: keep one own token
    assert shared_prefix_len(same["input_ids"], same["attention_mask"]) == 19
    left = {k: v.flip(1) for k, v in b.items()}  # padding first: no attended common prefix
    assert shared_prefix_len(left["input_ids"].flip(1).flip(1), left["attention_mask"]) == 0


@pytest.mark.parametrize("all_positions", [False, True])
def test_shared_prefix_hidden_states_and_grads_equal_the_plain_forward(all_positions):
    """backbone_hidden / target_hidden with share_prefix: the prefix once (batch 1, KV cache repeated),
    the rest after it; equal values and gradients, also for targets inside the prefix."""
    from scd.heads import all_position_labels
    model = tiny_model(V, SHAPE, seed=2).train()
    batch = prefixed_batch()
    if all_positions:
        batch["labels"] = all_position_labels(batch["input_ids"], batch["attention_mask"])
    outs = {}
    for share in (False, True):
        h = target_hidden(model, batch, share_prefix=share)  # [N, H]
        loss = (h * torch.linspace(-1, 1, h.shape[-1])).sum() + h.pow(2).sum()
        outs[share] = (h.detach(), grads(model, loss))
    (h0, g0), (h1, g1) = outs[False], outs[True]
    torch.testing.assert_close(h1, h0, rtol=1e-5, atol=1e-5)
    assert set(g0) == set(g1) and len(g0) > 5
    for n in g0:  # float rounding, relative to the gradient's scale
        assert float((g1[n] - g0[n]).abs().max()) <= 1e-5 * float(g0[n].abs().max()), n
    m = batch["attention_mask"].bool()
    torch.testing.assert_close(backbone_hidden(model, batch["input_ids"], batch["attention_mask"], True)[m],
                               backbone_hidden(model, batch["input_ids"], batch["attention_mask"])[m],
                               rtol=1e-5, atol=1e-5)


def test_shape_errors_are_one_line():
    h, w = torch.randn(4, 8), torch.randn(V, 8)
    with pytest.raises(ValueError, match="labels"):
        fused_kd_ce(h, w, labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="teacher covers 5 tokens"):
        fused_kd_ce(h, w, teacher=torch.randn(5, V))
    with pytest.raises(ValueError, match="not a divergence"):
        fused_kd_ce(h, w, teacher=torch.randn(4, V), name="ce")


def test_wrapped_model_like_deepspeed_or_ddp():
    """A wrapper exposing `.module` (DeepSpeedEngine, DDP): lookups unwrap, the forward goes through the wrapper."""
    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module, self.calls = m, 0

        def forward(self, **kw):
            self.calls += 1
            return self.module(**kw)

    model = tiny_model(V, SHAPE, seed=1).eval()
    wrapped = Wrapper(model)
    batch = make_batch()
    assert unwrap(wrapped) is model and head_weight(wrapped)[0] is model.lm_head.weight
    torch.testing.assert_close(target_logits(wrapped, batch), target_logits(model, batch))
    assert wrapped.calls == 1


def test_head_weight_refuses_adapted_head():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model(V, SHAPE, seed=1), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(TypeError, match="use target_logits"):
        head_weight(model)
    assert target_logits(model, make_batch()).shape == (8, V)
