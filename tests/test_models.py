import pytest
import torch

from scd.models import (ModelConfig, build_model, check_same_tokenizer, keep_layer_indices, save_model,
                        student_from_teacher)


def test_keep_layer_indices():
    assert keep_layer_indices("every_k:2", 6) == [0, 2, 4, 5]
    assert keep_layer_indices("every_k:3", 7) == [0, 3, 6]
    assert keep_layer_indices("first:2", 6) == [0, 1]
    assert keep_layer_indices([4, 1], 6) == [1, 4]
    with pytest.raises(ValueError, match="invalid indices"):
        keep_layer_indices([0, 9], 6)
    with pytest.raises(ValueError, match="every_k"):
        keep_layer_indices("half", 6)


def test_tiny_model_is_seeded(tiny_cfg):
    a, tok = build_model(tiny_cfg, seed=1)
    b, _ = build_model(tiny_cfg, seed=1, tokenizer=tok)
    c, _ = build_model(tiny_cfg, seed=2, tokenizer=tok)
    assert a.config.vocab_size == len(tok) and a.config.num_hidden_layers == 2
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    k = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(sa[k], sb[k]) and not torch.equal(sa[k], sc[k])


def test_student_with_all_layers_equals_teacher(tiny_cfg):
    teacher, tok = build_model(tiny_cfg, seed=0)
    student = student_from_teacher(teacher, [0, 1])
    ids = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        assert torch.allclose(teacher(ids).logits, student(ids).logits, atol=1e-6)


def test_student_keeps_chosen_layers(tiny_cfg):
    import dataclasses

    cfg4 = dataclasses.replace(tiny_cfg, tiny=dataclasses.replace(tiny_cfg.tiny, num_hidden_layers=4))
    teacher, tok = build_model(cfg4, seed=0)
    student = student_from_teacher(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["model.layers.1.mlp.up_proj.weight"], t["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])


def test_student_from_saved_teacher_via_config(tiny_cfg, tmp_path):
    import dataclasses

    cfg4 = dataclasses.replace(tiny_cfg, tiny=dataclasses.replace(tiny_cfg.tiny, num_hidden_layers=4))
    teacher, tok = build_model(cfg4, seed=0)
    save_model(teacher, tok, tmp_path / "teacher")
    student, _ = build_model(ModelConfig(name="x", init_from=str(tmp_path / "teacher"), keep_layers="every_k:2"))
    assert student.config.num_hidden_layers == 3  # layers 0, 2 and the last (3)


def test_tokenizer_mismatch_is_detected(smol_tokenizer):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2},
                                                                                 unk_token="[UNK]")))
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_same_tokenizer(smol_tokenizer, other)
    assert check_same_tokenizer(smol_tokenizer, smol_tokenizer) == len(smol_tokenizer.get_vocab())


def test_config_rejects_keep_layers_without_teacher():
    with pytest.raises(ValueError, match="keep_layers needs init_from"):
        ModelConfig(name="tiny", keep_layers="every_k:2")


@pytest.mark.slow
def test_smollm2_is_a_plain_checkpoint_that_can_be_saved_again(tmp_path):
    """Fine-tuned copies must be savable: no GGUF quantizer survives the conversion."""
    import json

    model, tok = build_model(ModelConfig(name="smollm2-135m"))
    assert "quantization_config" not in json.loads(model.config.to_json_string())
    save_model(model, tok, tmp_path / "copy")
    assert "quantization_config" not in json.loads((tmp_path / "copy" / "config.json").read_text())


@pytest.mark.slow
def test_smollm2_greedy_answer_and_loss():
    """Converted SmolLM2-135M-Instruct: fixed greedy answer, and loss on a fixed sentence.

    Reference loss measured here (CPU, float32, transformers 5.23): 4.011655.
    Tolerance 1e-3 absorbs BLAS differences between machines.
    """
    model, tok = build_model(ModelConfig(name="smollm2-135m"))
    model.eval()
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer == "The capital of France is Paris."
    s = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**s, labels=s["input_ids"]).loss.item()
    assert loss == pytest.approx(4.011655, abs=1e-3)
