"""The UniSD recipe: invariances (all components off = plain self-distillation, neutral
components = base, batch x accumulation), resume, run.json/metrics, and the baselines."""
import json

import pytest
import torch
import torch.nn.functional as F

from scd.core.results import read_metrics
from scd.data.label_words import LabelWords, verbalize
from scd.data.load import load_split
from scd.data.prompts import render_prompt
from unisd.prompts import teacher_prompt
from tests.unisd_tiny import grads, setup_run, step_once, step_recording_teacher, tiny_unisd_cfg

BASE = {"in_context_teacher": {"max_new_tokens": 6, "temperature": 0.7}}


def plain_self_distillation_reference(student, teacher, tok, examples, completions, temperature, alpha):
    """Obviously-correct UniSD loss: one unpadded float64 forward per example and model.

    l_t = forward KL (alpha 0), reverse KL (alpha 1) or alpha KL(p_T||M) + (1-alpha) KL(p_S||M), M = (1-alpha) p_S + alpha p_T,
    with logits / temperature; loss = mean over sequences of the token mean.
    """
    from scd.tokens import encode
    from scd.data.prompts import render_prompt
    from unisd.prompts import teacher_prompt

    per_seq = []
    for ex, comp in zip(examples, completions):
        rows = []
        for model, prompt in ((student, render_prompt(ex, tok)), (teacher, teacher_prompt(ex, tok))):
            p = encode(tok, prompt)
            with torch.no_grad():
                logits = model(torch.tensor([p + comp])).logits[0]  # [T, V] float64
            rows.append(F.log_softmax(logits[len(p) - 1:len(p) - 1 + len(comp)] / temperature, dim=-1))
        log_s, log_t = rows
        ps, pt = log_s.exp(), log_t.exp()
        if alpha == 0:
            l = (pt * (log_t - log_s)).sum(-1)
        elif alpha == 1:
            l = (ps * (log_s - log_t)).sum(-1)
        else:
            m = (1 - alpha) * ps + alpha * pt
            l = alpha * (pt * (log_t - m.log())).sum(-1) + (1 - alpha) * (ps * (log_s - m.log())).sum(-1)
        per_seq.append(l.mean())
    return float(torch.stack(per_seq).mean())


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_all_components_off_equals_plain_self_distillation(smol_tokenizer, alpha):
    run = setup_run(smol_tokenizer, {**BASE, "ema_teacher": False, "multi_teacher_agreement": False,
                                     "token_contrastive": False, "feature_matching": False,
                                     "divergence_clipping": False}, batch_size=3, **{"loss.alpha": alpha})
    run.ctx.model.double()  # float64 end to end: the pipeline must match the reference to rounding
    run.ctx.teacher.double()
    teacher0 = __import__("copy").deepcopy(run.ctx.teacher)
    torch.manual_seed(1)
    with torch.no_grad():  # move the student away from its frozen copy so the divergence is not ~0
        for p in run.ctx.model.parameters():
            p.add_(0.5 * p.std() * torch.randn_like(p))
    terms, _ = step_once(run)
    assert set(terms) == {"kd"}
    b = run.ctx.batch
    completions = [b.completion_ids[i, :int(b.completion_mask[i].sum())].tolist() for i in range(3)]
    assert any(len(c) > 1 for c in completions)
    ref = plain_self_distillation_reference(run.ctx.model, teacher0, run.ctx.tokenizer, b.examples, completions,
                                            0.7, alpha)
    assert ref > 1e-3
    assert terms["kd"] == pytest.approx(ref, rel=1e-9)


NEUTRAL = {"multi_teacher_agreement": {"gamma": 0.0, "k": 2, "shots": 1},
           "token_contrastive": {"weight": 0.0},
           "ema_teacher": {"decay": 1.0, "every": 1},
           "feature_matching": {"weight": 0.0},
           "divergence_clipping": {"cap": 1.0e30}}


def test_neutral_components_equal_the_base_exactly(smol_tokenizer):
    base = setup_run(smol_tokenizer, BASE)
    t_base, _ = step_once(base)
    g_base = grads(base.ctx.model)
    full = setup_run(smol_tokenizer, {**BASE, **NEUTRAL})
    t_full, _ = step_once(full)
    g_full = grads(full.ctx.model)
    assert t_full["kd"] == t_base["kd"]  # bitwise
    assert sum(t_full.values()) == t_base["kd"]
    assert set(g_base) == set(g_full) and all(torch.equal(g_base[n], g_full[n]) for n in g_base)
    assert full.ctx.teacher_passes == 1 + 2 + 1  # provider + K agreement contexts + negative teacher


def test_batch_times_accumulation_invariance(smol_tokenizer):
    comps = {"in_context_teacher": {"on_policy_fraction": 0.0, "max_new_tokens": 16},
             "token_contrastive": {"weight": 0.5}}
    runs = []
    for bs, accum in ((4, 1), (2, 2)):
        r = setup_run(smol_tokenizer, comps, batch_size=bs, grad_accum=accum)
        r.ctx.model.double()  # float64: padding widths differ between the splits
        r.ctx.teacher.double()
        runs.append((r, *step_once(r)))
    (one, t1, n1), (two, t2, n2) = runs
    assert n1 == n2 and set(t1) == {"kd", "token_contrastive"}
    for k in t1:
        assert t2[k] == pytest.approx(t1[k], rel=1e-9)
    g1, g2 = grads(one.ctx.model), grads(two.ctx.model)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-7, atol=1e-12)


def _recipe_cfg(tmp_path, components, **extra):
    return tiny_unisd_cfg(components, **{"train.max_steps": 4, "train.save_every": 2, "train.log_every": 1,
                                        "save_model": False, **extra})


def test_recipe_logs_every_term_and_records_components(smol_tokenizer, tmp_path):
    from unisd.train import run

    comps = {**BASE, "token_contrastive": {"weight": 0.1}, "feature_matching": {"weight": 0.1},
             "divergence_clipping": {"quantile": 0.9}, "ema_teacher": False}
    rec = run(_recipe_cfg(tmp_path, comps), tmp_path / "r")
    assert rec["status"] == "ok" and rec["recipe"] == "unisd"
    assert rec["components"]["token_contrastive"] and not rec["components"]["ema_teacher"]
    assert not rec["components"]["multi_teacher_agreement"]
    assert rec["hparams"]["token_contrastive.weight"] == 0.1 and rec["hparams"]["divergence"] == "forward_kl"
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss/kd", "loss/token_contrastive", "loss/feature_matching", "divergence_clipping/cap"):
        assert all(key in r for r in rows), key
    r = rows[-1]
    assert r["loss"] == pytest.approx(r["loss/kd"] + r["loss/token_contrastive"] + r["loss/feature_matching"])
    assert not (tmp_path / "r" / "ckpt" / "last").exists()


def test_resume_equals_uninterrupted(smol_tokenizer, tmp_path, monkeypatch):
    import unisd.train as T

    comps = {**BASE, "ema_teacher": {"decay": 0.5, "every": 1},
             "feature_matching": {"weight": 0.1, "projection": "always"}}
    cfg = _recipe_cfg(tmp_path, comps)
    T.run(cfg, tmp_path / "full")

    real = T.UniSDRecipe.loss_terms

    def dying(self, *a, **k):
        if self.ctx.step == 3:
            raise RuntimeError("killed")
        return real(self, *a, **k)

    monkeypatch.setattr(T.UniSDRecipe, "loss_terms", dying)
    with pytest.raises(RuntimeError, match="killed"):
        T.run(cfg, tmp_path / "cut")
    assert (tmp_path / "cut" / "ckpt" / "last").exists()
    monkeypatch.setattr(T.UniSDRecipe, "loss_terms", real)
    T.run(cfg, tmp_path / "cut")
    a = read_metrics(tmp_path / "full" / "metrics.jsonl")
    b = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("loss", "loss/kd", "loss/feature_matching", "ema_teacher/distance"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5), (ra["step"], key)


def test_rewrite_acceptance_uses_the_task_scorer():
    from unisd.baselines import rewrite_matches

    cls = {"family": "classification", "label": "fresh", "label_set": ["fresh", "rotten"], "target": "fresh",
           "lang": "en"}
    assert rewrite_matches(cls, "Fresh.") and rewrite_matches(cls, "I would say fresh")
    assert not rewrite_matches(cls, "rotten")
    qa = {"family": "qa", "answers": ["the Eiffel Tower"], "target": "the Eiffel Tower", "lang": "en",
          "answerable": True}
    assert rewrite_matches(qa, "Eiffel tower") and not rewrite_matches(qa, "It is the Eiffel Tower in Paris")
    ner = {"family": "ner", "tokens": ["Ada", "visited", "Paris"], "tags": ["B-person", "O", "B-geo-loc"],
           "target": "person: Ada; geo-loc: Paris", "lang": "en", "label_set": None}
    assert rewrite_matches(ner, "person: Ada; geo-loc: Paris")
    assert not rewrite_matches(ner, "person: Ada")


def test_baseline_objectives_run(smol_tokenizer, tmp_path):
    from unisd.train import run

    off = {"in_context_teacher": False}
    rec = run(_recipe_cfg(tmp_path, off, objective="sft", **{"data.limit_per_task": 8}), tmp_path / "sft")
    assert rec["status"] == "ok" and not any(rec["components"].values())
    rec = run(_recipe_cfg(tmp_path, off, objective="sdft_rewrite", **{"data.limit_per_task": 8,
                                                                         "rewrite.max_new_tokens": 4}),
              tmp_path / "rw")
    rows = [json.loads(x) for x in (tmp_path / "rw" / "rewrites.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and rec["train"]["rewrite"]["n"] == 8
    assert all(r["target"] == (r["rewrite"] if r["accepted"] else r["original"]) for r in rows)


def test_few_shot_demos_are_shown_in_the_label_words(smol_tokenizer):
    """With ``data.prompts`` label words, the demonstrations of the training prompts answer in those words, like
    the examples (a regression: UniSD's demos once kept the task's own words, fresh / rotten, under an
    instruction asking for positive / negative), in the student's and the in-context teacher's prompts."""
    lw = LabelWords(label_words={"fresh": "positive", "rotten": "negative"},
                    instruction="Classify the sentiment. Answer with exactly one of: positive, negative.")
    words = {"rotten_tomatoes": {"label_words": lw.label_words, "instruction": lw.instruction}}
    run = setup_run(smol_tokenizer, {"in_context_teacher": {"max_new_tokens": 2}},
                    **{"data.shots": 3, "data.prompts": words})
    expected = [verbalize(r, lw) for r in load_split("rotten_tomatoes", "dev", limit=3)]
    assert run.ctx.shots == {"rotten_tomatoes": expected}
    assert [s["target"] for s in expected] != [s["target"] for s in load_split("rotten_tomatoes", "dev", limit=3)]
    seen = []
    step_recording_teacher(run, lambda ids: seen.extend(list(map(list, ids))))
    exs = run.ctx.batch.examples
    assert run.ctx.batch.prompt_ids == run.ctx.encode([render_prompt(ex, smol_tokenizer, shots=expected) for ex in exs])
    assert seen == run.ctx.encode([teacher_prompt(ex, smol_tokenizer, shots=expected) for ex in exs])
