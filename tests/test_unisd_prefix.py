"""UniSD's shared-prompt-prefix path (``share_prefix``): the common prefix of a micro-batch's prompts
(system prompt, instruction, few-shot demonstrations) runs once and its KV cache is repeated over the
batch.  It must give the same logits, hidden states and gradients as the plain left-padded forward,
the same greedy samples, and the same UniSD step (dropout off)."""
import pytest
import torch

from scd.models import build_model
from scd.tokens import right_pad
from unisd.context import completion_forward
from scd.heads import MIN_SHARED_PREFIX
from unisd.sampling import sample_completions, shared_prefix_len
from tests.conftest import tiny_config
from tests.unisd_tiny import setup_run, step_once

PAD = 0


def test_shared_prefix_len():
    a = list(range(1, 40))
    assert shared_prefix_len([a, a[:30] + [99], a[:25] + [7, 8]]) == 25
    assert shared_prefix_len([a, a]) == len(a) - 1  # every prompt keeps one token of its own
    assert shared_prefix_len([a]) == 0  # one prompt: nothing to share
    short = a[:MIN_SHARED_PREFIX - 1]
    assert shared_prefix_len([short + [5, 6], short + [7]]) == 0  # too short to be worth a forward
    assert shared_prefix_len([a[:MIN_SHARED_PREFIX] + [5], a[:MIN_SHARED_PREFIX] + [6]]) == MIN_SHARED_PREFIX


@pytest.fixture(scope="module")
def lora_model(smol_tokenizer):
    """A tiny Llama with a LoRA adapter whose B is non-zero (the adapter changes the outputs)."""
    from scd.models import ModelConfig
    cfg = ModelConfig(name="tiny", tiny=tiny_config(num_hidden_layers=3),
                      lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    model, _ = build_model(cfg, seed=0, tokenizer=smol_tokenizer)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(5, 400, (MIN_SHARED_PREFIX + 9,), generator=g).tolist()
    prompts = [prefix + torch.randint(5, 400, (n,), generator=g).tolist() for n in (1, 4, 2, 7)]
    comps = [torch.randint(5, 400, (n,), generator=g).tolist() for n in (3, 1, 5, 2)]
    ids, mask = right_pad(comps, PAD)
    return prompts, ids, mask


@pytest.mark.parametrize("hidden", [False, True])
def test_completion_forward_with_a_shared_prefix_equals_the_plain_forward(lora_model, hidden):
    prompts, ids, mask = _batch()
    assert shared_prefix_len(prompts) == MIN_SHARED_PREFIX + 9
    lora_model.train()
    outs, grads = [], []
    for share in (False, True):
        lora_model.zero_grad()
        out = completion_forward(lora_model, prompts, ids, mask, PAD, hidden=hidden, share_prefix=share)
        w = torch.linspace(-1, 1, out.logits.shape[-1])
        loss = (out.logits * w * mask[..., None]).sum()
        if hidden:
            loss = loss + sum((h * mask[..., None]).pow(2).sum() for h in out.hidden_states)
        loss.backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in lora_model.named_parameters() if p.requires_grad})
    plain, shared = outs
    m = mask.bool()
    torch.testing.assert_close(shared.logits[m], plain.logits[m], rtol=1e-4, atol=1e-5)
    if hidden:
        assert len(shared.hidden_states) == len(plain.hidden_states)
        for a, b in zip(shared.hidden_states, plain.hidden_states):
            torch.testing.assert_close(a[m], b[m], rtol=1e-4, atol=1e-5)
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-3, atol=1e-5, msg=n)
    assert any(g.abs().max() > 0 for n, g in grads[0].items() if "lora_A" in n)  # the prefix's gradient flows


def test_sampling_with_a_shared_prefix_draws_the_same_tokens(lora_model):
    prompts, _, _ = _batch(1)
    kw = dict(max_new_tokens=4, pad_id=PAD, stop_ids=[2], seed=3)
    for temperature in (0.0, 1.0):
        plain = sample_completions(lora_model, prompts, temperature=temperature, **kw)
        shared = sample_completions(lora_model, prompts, temperature=temperature, share_prefix=True, **kw)
        assert shared == plain and all(1 <= len(c) <= 4 for c in plain)


def test_unisd_step_with_a_shared_prefix_equals_the_plain_step(smol_tokenizer, monkeypatch):
    """Student samples, the in-context teacher and the loss of one step, with 2 few-shot demonstrations
    in every prompt (a long shared prefix): the shared run takes the prefix path for sampling, the
    teacher and the student forward, and its step equals the plain one."""
    import unisd.context
    import unisd.sampling
    calls = []

    def counting(where, fn):
        def wrapped(model, prefix, batch, device):
            calls.append((where, len(prefix), batch))
            return fn(model, prefix, batch, device)
        return wrapped

    monkeypatch.setattr(unisd.context, "prefix_cache", counting("forward", unisd.context.prefix_cache))
    monkeypatch.setattr(unisd.sampling, "prefix_cache", counting("sample", unisd.sampling.prefix_cache))
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    comps = {"in_context_teacher": {"max_new_tokens": 3}}
    runs = [setup_run(smol_tokenizer, comps, lora=lora, batch_size=4, **{"data.shots": 2, "train.share_prefix": s})
            for s in (False, True)]
    for r in runs:
        with torch.no_grad():
            for n, p in r.engine.module.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.full_like(p, 0.01))
    plain, n_plain = step_once(runs[0])
    assert calls == []
    shared, n_shared = step_once(runs[1])
    assert [w for w, _, _ in calls] == ["sample", "forward", "forward"]  # sampling, teacher, student
    assert all(n >= MIN_SHARED_PREFIX and b == 4 for _, n, b in calls)
    assert runs[1].ctx.share_prefix and shared_prefix_len(runs[1].ctx.batch.prompt_ids) > MIN_SHARED_PREFIX
    assert n_shared == n_plain and set(shared) == set(plain)
    for k in plain:
        assert shared[k] == pytest.approx(plain[k], rel=1e-4, abs=1e-6), k
