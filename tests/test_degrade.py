"""Degradations: RTN fake quantization, magnitude / Wanda / N:M pruning, forgetting."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from unisd.degrade import (DEGRADATIONS, DegradeContext, MaskConstraint, QuantConstraint, degrade, fake_quant,
                           input_feature_norms, linear_modules, nm_mask, parse_pattern, prune_model, prune_scores,
                           quant_grid, quantize_model, quantize_weight, unstructured_mask)
from tests.conftest import tiny_config


def _llama(vocab=64, layers=2, hidden=32, inter=64, seed=0, init=0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, initializer_range=init)
    return LlamaForCausalLM(cfg).eval()


# ------------------------------------------------------------------ slow reference
def _ref_quant(w: torch.Tensor, bits: int, symmetric: bool, group: int) -> torch.Tensor:
    """Element-by-element RTN with Python floats (independent of the vectorised code)."""
    out = torch.empty_like(w, dtype=torch.float64)
    n_out, n_in = w.shape
    g = n_in if group <= 0 or group >= n_in else group
    for r in range(n_out):
        for start in range(0, n_in, g):
            vals = [float(v) for v in w[r, start:start + g]]
            if symmetric:
                qmax = 2 ** (bits - 1) - 1
                s = max(abs(v) for v in vals) / qmax
                s = s if s > 0 else 1.0
                qs = [min(max(round(v / s), -qmax - 1), qmax) * s for v in vals]
            else:
                lo, hi = min(min(vals), 0.0), max(max(vals), 0.0)
                s = (hi - lo) / (2 ** bits - 1)
                s = s if s > 0 else 1.0
                z = round(-lo / s)
                qs = [(min(max(round(v / s) + z, 0), 2 ** bits - 1) - z) * s for v in vals]
            out[r, start:start + g] = torch.tensor(qs, dtype=torch.float64)
    return out


CASES = list(itertools.product([8, 4, 3], [True, False], [0, 16, 24]))


@pytest.mark.parametrize("bits,symmetric,group", CASES)
def test_quant_error_at_most_half_a_step(bits, symmetric, group):
    torch.manual_seed(bits * 7 + group)
    w = torch.randn(12, 40) * torch.rand(12, 1) * 3  # rows of different scale; 40 % 24 != 0 (padded group)
    w[3, :8] = 0.0  # an all-zero group
    q, grid = quantize_weight(w, bits, symmetric, group)
    step = grid.step()
    assert q.shape == w.shape and q.dtype == w.dtype
    assert ((w - q).abs() <= step / 2 * (1 + 1e-5) + 1e-12).all()
    # at most 2^bits distinct values per group
    g = grid.group_size
    for r in range(w.shape[0]):
        for s in range(0, w.shape[1], g):
            assert len(torch.unique(q[r, s:s + g])) <= 2 ** bits
    # same values as the slow element-wise reference
    torch.testing.assert_close(q.double(), _ref_quant(w, bits, symmetric, group), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits,symmetric,group", CASES[::2])
def test_quant_idempotent(bits, symmetric, group):
    torch.manual_seed(1)
    w = torch.randn(8, 48)
    q, grid = quantize_weight(w, bits, symmetric, group)
    assert torch.equal(fake_quant(q, grid), q)  # re-applying the stored grid changes nothing
    q2, _ = quantize_weight(q, bits, symmetric, group)  # re-quantizing from scratch gives the same weights
    torch.testing.assert_close(q2, q, rtol=0, atol=1e-6)


def test_quant_zero_is_exact_and_error_decreases_with_bits():
    torch.manual_seed(2)
    w = torch.randn(16, 64)
    w[:, ::5] = 0.0
    errs = []
    for bits in (3, 4, 8):
        q, _ = quantize_weight(w, bits, symmetric=False, group_size=16)
        assert (q[:, ::5] == 0).all()
        errs.append(float((w - q).abs().mean()))
    assert errs[0] > errs[1] > errs[2]


def test_quant_grid_rejects_bad_bits_and_shapes():
    with pytest.raises(ValueError, match="bits"):
        quant_grid(torch.randn(2, 4), 1)
    with pytest.raises(ValueError, match="2-D"):
        quant_grid(torch.randn(4), 4)
    _, grid = quantize_weight(torch.randn(2, 4), 4)
    with pytest.raises(ValueError, match="does not match"):
        fake_quant(torch.randn(3, 4), grid)


def test_quantize_model_skips_head_and_embeddings():
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c = quantize_model(model, 3, symmetric=True, group_size=16)
    names = {n for n, _ in linear_modules(model)}
    assert set(c.grids) == names and not any("lm_head" in n for n in names)
    for k, v in model.state_dict().items():
        mod = k.rsplit(".", 1)[0]
        if mod in names and k.endswith("weight"):
            assert not torch.equal(v, before[k])
        else:  # embeddings (tied head), norms untouched
            assert torch.equal(v, before[k]), k
    assert c.violation(model) == 0.0
    # the latent copies are the pre-quantization weights
    n0 = sorted(names)[0]
    assert torch.equal(c.latent[n0], before[n0 + ".weight"])
    # the constraint round-trips through its tensors
    c2 = QuantConstraint.from_tensors(c.tensors())
    assert c2.violation(model) == 0.0 and set(c2.grids) == names


# ------------------------------------------------------------------------ pruning
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("scope", ["layer", "row"])
def test_unstructured_mask_exact_sparsity_and_keeps_largest(sparsity, scope):
    torch.manual_seed(3)
    scores = torch.rand(10, 30)
    keep = unstructured_mask(scores, sparsity, scope)
    if scope == "layer":
        assert int((~keep).sum()) == round(sparsity * 300)
        assert scores[keep].min() >= scores[~keep].max()
    else:
        assert ((~keep).sum(1) == round(sparsity * 30)).all()
        for r in range(10):
            assert scores[r][keep[r]].min() >= scores[r][~keep[r]].max()


def test_unstructured_mask_exact_with_ties():
    keep = unstructured_mask(torch.zeros(4, 10), 0.5, "layer")
    assert int((~keep).sum()) == 20


def test_wanda_hand_case():
    # W rows: magnitude alone would prune column 1 in row 0 (|0.5| < |1|) ...
    w = torch.tensor([[1.0, 0.5],
                      [-2.0, 1.0]])
    norms = torch.tensor([0.1, 10.0])  # ... but column 1's inputs are 100x larger
    s = prune_scores(w, norms)
    torch.testing.assert_close(s, torch.tensor([[0.1, 5.0], [0.2, 10.0]]))
    keep = unstructured_mask(s, 0.5, "row")
    assert keep.tolist() == [[False, True], [False, True]]  # Wanda: keep column 1 in each row
    keep_mag = unstructured_mask(prune_scores(w), 0.5, "row")
    assert keep_mag.tolist() == [[True, False], [True, False]]  # magnitude: the opposite


def test_nm_mask_pattern():
    torch.manual_seed(4)
    scores = torch.rand(6, 16)
    keep = nm_mask(scores, 2, 4)
    groups = keep.reshape(6, 4, 4)
    assert (groups.sum(-1) == 2).all()
    sg = scores.reshape(6, 4, 4)
    assert (sg.masked_fill(~groups, -1).amax(-1) >= sg.masked_fill(groups, -1).amax(-1)).all()
    kept_min = sg.masked_fill(~groups, 2).amin(-1)
    pruned_max = sg.masked_fill(groups, -1).amax(-1)
    assert (kept_min >= pruned_max).all()
    with pytest.raises(ValueError, match="divisible"):
        nm_mask(torch.rand(2, 6), 2, 4)
    assert parse_pattern("2:4") == (2, 4) and parse_pattern("unstructured") is None
    with pytest.raises(ValueError):
        parse_pattern("4:2")


def test_input_feature_norms_match_manual_and_skip_padding():
    model = _llama()
    ids = torch.randint(0, 64, (2, 7))
    am = torch.ones(2, 7, dtype=torch.long)
    am[1, 4:] = 0
    name = "model.layers.0.mlp.down_proj"
    captured = []
    h = model.get_submodule(name).register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am)
    h.remove()
    x = captured[0][am.bool()]  # [n_real, in]
    ref = x.square().sum(0).sqrt()
    got = input_feature_norms(model, [name], [{"input_ids": ids, "attention_mask": am}])[name]
    torch.testing.assert_close(got, ref)
    # padding positions really are excluded
    all_tok = captured[0].reshape(-1, captured[0].shape[-1]).square().sum(0).sqrt()
    assert not torch.allclose(got, all_tok)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_prune_model_sparsity_and_masks(method):
    model = _llama()
    batches = [{"input_ids": torch.randint(0, 64, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}]
    c = prune_model(model, 0.5, method=method, calib_batches=batches if method == "wanda" else None)
    assert isinstance(c, MaskConstraint)
    for name, keep in c.masks.items():
        w = model.get_submodule(name).weight
        assert int((~keep).sum()) == round(0.5 * keep.numel()) if method == "magnitude" else \
            ((~keep).sum(1) == round(0.5 * keep.shape[1])).all()
        assert (w[~keep] == 0).all()
    assert abs(c.sparsity() - 0.5) < 1e-9 and c.violation(model) == 0.0
    assert MaskConstraint.from_tensors(c.tensors()).sparsity() == c.sparsity()


def test_prune_model_2_4():
    model = _llama()
    c = prune_model(model, 0.0, method="magnitude", pattern="2:4")
    for name, keep in c.masks.items():
        assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all()
        assert (model.get_submodule(name).weight.reshape(keep.shape[0], -1, 4).ne(0).sum(-1) <= 2).all()


def test_wanda_needs_calibration():
    with pytest.raises(ValueError, match="calibration"):
        prune_model(_llama(), 0.5, method="wanda")


# --------------------------------------------------------------------- registry
def test_registry_and_options_validation():
    assert {"quantize", "prune", "forget"} <= set(DEGRADATIONS.names())
    with pytest.raises(ValueError, match="group_sise"):
        DEGRADATIONS.get("quantize").options({"group_sise": 4})
    with pytest.raises(ValueError, match="method"):
        DEGRADATIONS.get("prune").options({"method": "random"})
    model = _llama()
    c = degrade(model, "quantize", 4, {"group_size": 16})
    assert isinstance(c, QuantConstraint) and c.summary()["bits"] == 4
    with pytest.raises(ValueError, match="bits"):
        degrade(_llama(), "quantize", 4.5)


def test_forget_runs_sft_and_changes_weights(smol_tokenizer, tmp_path):
    from scd.models import tiny_model

    tok = smol_tokenizer
    model = tiny_model(len(tok), tiny_config(), seed=0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}

    def load_pairs(tasks, limit):
        seen["tasks"] = tasks
        return [("Tag entities: Ada went to Paris\n", "person: Ada; geo-loc: Paris<|im_end|>")] * 4

    ctx = DegradeContext(tokenizer=tok, device=torch.device("cpu"), run_dir=tmp_path, load_pairs=load_pairs)
    c = degrade(model, "forget", 3, {"tasks": ["wnut16"], "lr": 1e-2, "batch_size": 2, "max_len": 32}, ctx)
    assert c.name == "none" and seen["tasks"] == ("wnut16",)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    lines = (tmp_path / "degrade" / "metrics.jsonl").read_text().strip().splitlines()
    assert lines and '"step": 3' in lines[-1]
    # strength 0: nothing happens
    m2 = tiny_model(len(tok), tiny_config(), seed=0)
    s2 = {k: v.clone() for k, v in m2.state_dict().items()}
    degrade(m2, "forget", 0, {}, DegradeContext())
    assert all(torch.equal(v, s2[k]) for k, v in m2.state_dict().items())
    with pytest.raises(ValueError, match="integer"):
        degrade(m2, "forget", 2.5, {}, DegradeContext())


def test_error_bound_is_tight_enough_to_matter():
    # guard against a vacuous bound: the error is not identically 0 and reaches near half a step
    torch.manual_seed(5)
    w = torch.randn(32, 64)
    q, grid = quantize_weight(w, 3, True, 16)
    ratio = (w - q).abs() / grid.step()
    assert 0.45 < float(ratio.max()) <= 0.5 + 1e-5
    assert math.isclose(float(ratio.mean()), 0.25, abs_tol=0.05)
