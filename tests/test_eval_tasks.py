"""Scorers (QA / NER / classification), bootstrap CIs, batched generation and likelihood scoring."""
from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.stats import (balanced_accuracy_sums, bootstrap_ci, f1_from_counts, kappa_sums, macro_f1_sums,
                              micro_f1_sums, resample_indices)
import benchmarks.evaluate.rescore as rescore_module
from benchmarks.tasks import SCORERS
from benchmarks.tasks.classification import class_counts, map_label, prediction_profile, uniform_guess_macro_f1
from benchmarks.tasks.ner import ner_counts, parse_ner_output
from benchmarks.tasks.qa import normalize_answer, qa_scores, token_f1
from tests.conftest import tiny_config


# ----------------------------------------------------------------------------- QA
@pytest.mark.parametrize("text, lang, expected", [
    ("The  Eiffel-Tower!", "en", "eiffeltower"),            # punctuation deleted (SQuAD), article dropped
    ("An apple a day", "en", "apple day"),
    ("An apple a day", "hi", "an apple a day"),             # articles only stripped for English
    ("  Hello,\u00a0WORLD  ", "fr", "hello world"),         # NBSP is whitespace; casefold
    ("STRASSE", "de", "strasse"),
    ("Straße", "de", "strasse"),                            # casefold (not lower): ß -> ss
    ("भारत की राजधानी नई दिल्ली है।", "hi", "भारत की राजधानी नई दिल्ली है"),  # danda removed, matras kept
    ("“नई दिल्ली”", "hi", "नई दिल्ली"),
    ("\u0643\u062a\u0627\u0628\u200c\u0647\u0627", "fa", "\u06a9\u062a\u0627\u0628 \u0647\u0627"),  # kaf->keheh, ZWNJ->space
    ("\u0639\u0644\u064a", "fa", "\u0639\u0644\u06cc"),      # Arabic yeh -> Farsi yeh
    ("\u06a9\u0640\u062a\u0627\u0628", "fa", "\u06a9\u062a\u0627\u0628"),  # tatweel removed
    ("\u06a9\u0650\u062a\u0627\u0628", "fa", "\u06a9\u062a\u0627\u0628"),  # kasra (diacritic) removed
    ("\u06f1\u06f2\u06f3 \u0633\u0627\u0644\u061f", "fa", "123 \u0633\u0627\u0644"),  # Persian digits, ؟ removed
    ("\u0627\u0644\u0641\u060c \u0628", "fa", "\u0627\u0644\u0641 \u0628"),  # Persian comma removed
])
def test_normalize_answer(text, lang, expected):
    assert normalize_answer(text, lang) == expected


def test_devanagari_combining_marks_survive():
    s = normalize_answer("दिल्ली", "hi")
    assert s == "दिल्ली" and "\u094d" in s and "\u0940" in s  # virama and vowel sign ii kept


def test_token_f1_by_hand():
    assert token_f1("a b b", "b b c") == pytest.approx(2 / 3)  # overlap 2, P = R = 2/3
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("x", "y") == 0.0


def test_em_f1_max_over_answers():
    em, f1 = qa_scores("the Eiffel Tower", ["Eiffel Tower in Paris", "tower"], "en")
    # "eiffel tower" vs "eiffel tower in paris": P 1, R 1/2 -> 2/3; vs "tower": P 1/2, R 1 -> 2/3
    assert em == 0.0 and f1 == pytest.approx(2 / 3)
    assert qa_scores("Eiffel Tower.", ["the eiffel tower"], "en") == (1.0, 1.0)
    assert qa_scores("नई दिल्ली।", ["नई दिल्ली"], "hi") == (1.0, 1.0)
    assert qa_scores("\u0639\u0644\u064a", ["\u0639\u0644\u06cc"], "fa") == (1.0, 1.0)
    # article stripping is English-only: "the" is a content token elsewhere
    assert qa_scores("the tower", ["tower"], "hi")[0] == 0.0


def test_unanswerable():
    assert qa_scores("Unanswerable.", ["unanswerable"], "en", unanswerable=True) == (1.0, 1.0)
    assert qa_scores("Paris", ["unanswerable"], "en", unanswerable=True) == (0.0, 0.0)
    assert qa_scores("unanswerable", ["Paris"], "en") == (0.0, 0.0)


def _qa(i, answers, lang="en", answerable=True):
    return {"id": f"t-test-{i}", "task": "t", "family": "qa", "lang": lang, "answers": answers,
            "answerable": answerable, "target": answers[0]}


def test_qa_scorer_from_outputs():
    sc = SCORERS.build("qa", n_boot=200, seed=0)
    exs = [_qa(0, ["Paris"]), _qa(1, ["blue whale"]), _qa(2, ["unanswerable"], answerable=False),
           _qa(3, ["नई दिल्ली"], "hi")]
    outs = ["Answer: Paris\nBecause it is the capital.", "the whale", "unanswerable", "दिल्ली"]
    preds = sc.predictions_from_outputs(exs, outs)
    assert preds[0]["prediction"] == "Paris"  # first line, "Answer:" label removed
    res = sc.score(exs, preds)
    assert res["exact_match"]["value"] == pytest.approx(0.5) and res["exact_match"]["n"] == 4
    # F1: 1, "whale" vs "blue whale" = 2/3, 1, "दिल्ली" vs "नई दिल्ली" = 2/3
    assert res["f1"]["value"] == pytest.approx((1 + 2 / 3 + 1 + 2 / 3) / 4, abs=1e-6)
    assert res["exact_match"]["primary"] and not res["f1"]["primary"]
    assert res["exact_match"]["chance"] == 0.0 and res["exact_match"]["higher_is_better"]
    lo, hi = res["f1"]["ci"]
    assert lo <= res["f1"]["value"] <= hi


# ---------------------------------------------------------------------------- NER
def _ner(i, tokens, tags):
    return {"id": f"n-test-{i}", "task": "n", "family": "ner", "lang": "en", "tokens": tokens, "tags": tags}


NER_EXAMPLES = [
    _ner(0, ["John", "lives", "in", "New", "York", "."], ["B-person", "O", "O", "B-geo-loc", "I-geo-loc", "O"]),
    _ner(1, ["Apple", "makes", "iPhones"], ["B-company", "O", "B-product"]),
    _ner(2, ["I", "saw", "Paris"], ["O", "O", "B-geo-loc"]),
    _ner(3, ["hello", "world"], ["O", "O"]),
]
NER_OUTPUTS = ["person: John; geo-loc: New York", "company: Apple; person: iPhones", "I could not find any",
               "none"]


def test_parse_ner_output():
    p = parse_ner_output("person: John; geo-loc: new york", NER_EXAMPLES[0]["tokens"])
    assert p["tags"] == ["B-person", "O", "O", "B-geo-loc", "I-geo-loc", "O"] and not p["failed"]
    assert parse_ner_output("none", ["a"])["failed"] is False
    assert parse_ner_output("", ["a"])["failed"] is True
    bad = parse_ner_output("the entities are unclear", ["a", "b"])
    assert bad["failed"] and bad["tags"] == ["O", "O"]
    miss = parse_ner_output("person: Mary", ["John"])  # parsed but not in the sentence
    assert not miss["failed"] and miss["unplaced"] == 1 and miss["tags"] == ["O"]
    assert miss["unplaced_types"] == ["person"]
    # the second "John" has no unused span left: unplaced, in predicted order
    two = parse_ner_output("person: John; geo-loc: Oslo; person: John; org: lives", ["John", "lives"])
    assert two["tags"] == ["B-person", "B-org"] and two["unplaced_types"] == ["geo-loc", "person"]


def test_ner_unplaced_entities_are_false_positives():
    # hand counts: sentence 0 has 2 gold, 2 placed correct + 1 hallucinated person;
    # sentence 1 has no gold and 1 hallucinated company
    examples = [_ner(0, ["John", "lives", "in", "Paris"], ["B-person", "O", "O", "B-geo-loc"]),
                _ner(1, ["hello", "world"], ["O", "O"])]
    outputs = ["person: John; geo-loc: Paris; person: Mary", "company: Acme"]
    sc = SCORERS.build("ner", n_boot=200, seed=0)
    preds = sc.predictions_from_outputs(examples, outputs)
    assert [p["unplaced_types"] for p in preds] == [["person"], ["company"]]
    res = sc.score(examples, preds)
    # tp 2, predicted 2 + 1 + 1 = 4, gold 2 -> F1 = 2 * 2 / (4 + 2) (was 1.0 when they were dropped)
    assert res["f1_micro"]["value"] == pytest.approx(4 / 6, abs=1e-6)
    # person: tp 1, pred 2, gold 1 -> 2/3; geo-loc 1; company: tp 0, pred 1 -> 0; macro = 5/9
    assert res["f1_macro"]["value"] == pytest.approx(5 / 9, abs=1e-6)
    extra = res["f1_micro"]["extra"]
    assert extra["unplaced_rate"] == pytest.approx(2 / 4) and extra["n_unplaced_entities"] == 2
    assert extra["n_pred_entities"] == 4 and extra["n_gold_entities"] == 2
    assert extra["per_type"]["person"] == {"precision": 0.5, "recall": 1.0, "f1-score": round(2 / 3, 6), "support": 1}
    assert extra["per_type"]["company"] == {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0}
    rows = sc.per_example(examples, preds)
    assert [(r["tp"], r["n_pred"], r["n_gold"]) for r in rows] == [(2, 3, 2), (0, 1, 0)]
    # predictions stored before unplaced types were recorded are re-parsed from their output
    old = [{k: v for k, v in p.items() if k != "unplaced_types"} for p in preds]
    assert sc.score(examples, old)["f1_micro"]["value"] == pytest.approx(4 / 6, abs=1e-6)


def test_ner_flags_a_run_that_answers_none_for_nearly_every_sentence():
    sc = SCORERS.build("ner", n_boot=50, seed=0)
    examples = [_ner(i, ["John", "ran"], ["B-person", "O"] if i < 5 else ["O", "O"]) for i in range(20)]
    outputs = ["none"] * 19 + ["person: John"]
    extra = sc.score(examples, sc.predictions_from_outputs(examples, outputs))["f1_micro"]["extra"]
    assert (extra["max_label_share"], extra["most_predicted"], extra["constant"]) == (0.95, "none", True)
    # 18 of 20 "none" (90 %) is not constant; the same entity list counts as one answer
    outputs = ["none"] * 18 + ["person: John", "person: John"]
    extra = sc.score(examples, sc.predictions_from_outputs(examples, outputs))["f1_micro"]["extra"]
    assert (extra["max_label_share"], extra["constant"]) == (0.9, False)
    # predictions saved without the parsed list are read from their output
    old = [{"id": ex["id"], "output": "none"} for ex in examples]
    assert sc.score(examples, old)["f1_micro"]["extra"]["constant"] is True


def test_ner_scores_by_hand():
    sc = SCORERS.build("ner", n_boot=200, seed=0)
    preds = sc.predictions_from_outputs(NER_EXAMPLES, NER_OUTPUTS)
    res = sc.score(NER_EXAMPLES, preds)
    # tp = 2 + 1 + 0 + 0 = 3, predicted = 2 + 2 = 4, gold = 2 + 2 + 1 = 5 -> F1 = 6/9
    assert res["f1_micro"]["value"] == pytest.approx(2 / 3, abs=1e-6)
    # person 2/3 (1 of 2 predicted, 1 gold), geo-loc 2/3, company 1, product 0 -> 7/12
    assert res["f1_macro"]["value"] == pytest.approx(7 / 12, abs=1e-6)
    assert res["parse_failure_rate"]["value"] == pytest.approx(0.25)
    assert res["parse_failure_rate"]["higher_is_better"] is False
    per_type = res["f1_micro"]["extra"]["per_type"]
    assert per_type["company"]["f1-score"] == pytest.approx(1.0) and per_type["product"]["support"] == 1
    for m in res.values():
        assert m["ci"][0] <= m["value"] <= m["ci"][1] and m["n"] == 4
    # nothing unplaced here: the same as seqeval on the placed tags
    from seqeval.metrics import f1_score

    gold, tags = [ex["tags"] for ex in NER_EXAMPLES], [p["tags"] for p in preds]
    assert res["f1_micro"]["value"] == pytest.approx(f1_score(gold, tags, average="micro"), abs=1e-6)
    assert res["f1_macro"]["value"] == pytest.approx(f1_score(gold, tags, average="macro"), abs=1e-6)


def test_ner_counts_match_seqeval():
    from seqeval.metrics import f1_score

    rng = np.random.default_rng(1)
    vocab = ["O", "B-a", "I-a", "B-b", "I-b"]
    gold = [[vocab[i] for i in rng.integers(0, 5, size=rng.integers(1, 9))] for _ in range(40)]
    pred = [[vocab[i] for i in rng.integers(0, 5, size=len(g))] for g in gold]
    micro, per_type, types = ner_counts(gold, pred)
    assert micro_f1_sums(micro.sum(0, keepdims=True))[0] == pytest.approx(f1_score(gold, pred, average="micro"))
    got = macro_f1_sums(len(types))(per_type.sum(0, keepdims=True))[0]
    assert got == pytest.approx(f1_score(gold, pred, average="macro"))


# ----------------------------------------------------------------- classification
LABELS = ["positive", "negative", "neutral"]


@pytest.mark.parametrize("output, label, rule", [
    ("positive", "positive", "exact"),
    ("  Negative. ", "negative", "normalised"),
    ("The sentiment is negative.", "negative", "word"),
    ("positive, not negative", "positive", "word"),        # first mentioned wins
    ("It's NEUTRAL!\nMore text", "neutral", "word"),
    ("neutrality", None, "invalid"),                      # whole words only
    ("pos", None, "invalid"),
    ("", None, "invalid"),
])
def test_map_label(output, label, rule):
    assert map_label(output, LABELS) == (label, rule)


def test_map_label_multiword():
    assert map_label("this is very good indeed", ["good", "very good"]) == ("very good", "word")


def _cls(i, label, label_set=("a", "b")):
    return {"id": f"c-test-{i}", "task": "c", "family": "classification", "lang": "en", "label": label,
            "label_set": list(label_set), "target": label}


def test_classification_scores_by_hand():
    from sklearn.metrics import f1_score

    sc = SCORERS.build("classification", n_boot=300, seed=0)
    exs = [_cls(0, "a"), _cls(1, "b"), _cls(2, "a"), _cls(3, "b")]
    preds = sc.predictions_from_outputs(exs, ["a", "I don't know", "b", "The answer: b"])
    assert [p["prediction"] for p in preds] == ["a", None, "b", "b"]
    res = sc.score(exs, preds)
    assert res["accuracy"]["value"] == pytest.approx(0.5)
    assert res["invalid_rate"]["value"] == pytest.approx(0.25) and not res["invalid_rate"]["higher_is_better"]
    # a: tp 1, pred 1, gold 2 -> 2/3; b: tp 1, pred 2, gold 2 -> 1/2
    assert res["f1_macro"]["value"] == pytest.approx((2 / 3 + 1 / 2) / 2, abs=1e-6)
    assert res["f1_macro"]["value"] == pytest.approx(
        f1_score(["a", "b", "a", "b"], ["a", "x", "b", "b"], labels=["a", "b"], average="macro"), abs=1e-6)
    assert res["accuracy"]["chance"] == 0.5 and res["f1_macro"]["chance"] == pytest.approx(0.5)
    assert res["accuracy"]["primary"] and not res["f1_macro"]["primary"]


def test_class_counts_macro_equals_sklearn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    labels = ["x", "y", "z", "w"]
    gold = list(rng.choice(labels[:3], 50))
    pred = [None if r < 0.1 else labels[k] for r, k in zip(rng.random(50), rng.integers(0, 4, 50))]
    counts = class_counts(gold, pred, labels)
    present = [lab for lab in labels if lab in gold or lab in pred]
    ref = f1_score(gold, ["\0" if p is None else p for p in pred], labels=present, average="macro", zero_division=0)
    assert macro_f1_sums(4)(counts.sum(0, keepdims=True))[0] == pytest.approx(ref)


def test_uniform_guess_macro_f1():
    assert uniform_guess_macro_f1(["a", "b", "c", "d"], "abcd") == pytest.approx(0.25)
    # p = (3/4, 1/4), q = 1/2: (2*.75*.5/1.25 + 2*.25*.5/.75) / 2
    assert uniform_guess_macro_f1(["a", "a", "a", "b"], "ab") == pytest.approx((0.6 + 1 / 3) / 2)


def test_kappa_and_balanced_accuracy_by_hand():
    """gold a a a b b c, predictions a a b b (invalid) a over labels a, b, c."""
    sc = SCORERS.build("classification", n_boot=200, seed=0)
    exs = [_cls(i, g, "abc") for i, g in enumerate("aaabbc")]
    preds = sc.predictions_from_outputs(exs, ["a", "a", "b", "b", "no idea", "a"])
    res = sc.score(exs, preds)
    # p_o = 3/6; marginals gold (3, 2, 1), predicted (3, 2, 0) + 1 invalid: p_e = (9 + 4 + 0) / 36
    po, pe = 3 / 6, 13 / 36
    assert res["cohen_kappa"]["value"] == pytest.approx((po - pe) / (1 - pe), abs=1e-6)  # 5/23
    assert res["balanced_accuracy"]["value"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3, abs=1e-6)  # recalls a, b, c
    assert res["cohen_kappa"]["chance"] == 0.0 and res["balanced_accuracy"]["chance"] == pytest.approx(1 / 3, abs=1e-6)
    for m in ("cohen_kappa", "balanced_accuracy"):
        lo, hi = res[m]["ci"]
        assert lo <= res[m]["value"] <= hi and hi - lo > 0.1 and not res[m]["primary"] and res[m]["higher_is_better"]
    # the bootstrap statistics equal the full-sample values on the full sample
    counts = class_counts(list("aaabbc"), ["a", "a", "b", "b", None, "a"], list("abc")).sum(0, keepdims=True)
    assert kappa_sums(3)(counts)[0] == pytest.approx(5 / 23)
    assert balanced_accuracy_sums(3)(counts)[0] == pytest.approx(7 / 18)


def test_kappa_and_balanced_accuracy_sums_equal_sklearn_on_random_labels():
    from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score

    rng = np.random.default_rng(1)
    labels = ["x", "y", "z", "w"]
    for _ in range(5):
        gold = list(rng.choice(labels[:3], 40))
        pred = [None if r < 0.1 else labels[k] for r, k in zip(rng.random(40), rng.integers(0, 4, 40))]
        pred_s = ["\0" if p is None else p for p in pred]
        counts = class_counts(gold, pred, labels).sum(0, keepdims=True)
        assert kappa_sums(4)(counts)[0] == pytest.approx(cohen_kappa_score(gold, pred_s))
        with pytest.warns(UserWarning):  # sklearn: predicted classes absent from gold
            ref = balanced_accuracy_score(gold, pred_s)
        assert balanced_accuracy_sums(4)(counts)[0] == pytest.approx(ref)


def test_constant_predictor_profile():
    """12 'a' and 8 'b' gold; 19 of 20 answers 'b': a constant predictor (share 0.95), whatever its accuracy."""
    gold = ["a"] * 12 + ["b"] * 8
    prof = prediction_profile(gold, ["b"] * 19 + ["a"], ["a", "b"])
    assert prof == {"majority_baseline": 0.6, "max_label_share": 0.95, "most_predicted": "b", "constant": True}
    prof = prediction_profile(gold, ["b"] * 18 + ["a", "a"], ["a", "b"])
    assert prof["max_label_share"] == 0.9 and not prof["constant"]
    # invalid answers are nobody's label; ties go to the first label
    assert prediction_profile(gold, [None] * 20, ["a", "b"])["most_predicted"] is None
    assert prediction_profile(["a", "b"], ["b", "a"], ["a", "b"])["most_predicted"] == "a"
    # through the scorer: the profile is accuracy's extra; a constant answer has kappa 0 and balanced accuracy 1/2
    sc = SCORERS.build("classification", n_boot=50, seed=0)
    exs = [_cls(i, g) for i, g in enumerate(gold)]
    res = sc.score(exs, sc.predictions_from_outputs(exs, ["a"] * 20))
    assert res["accuracy"]["extra"] == {"majority_baseline": 0.6, "max_label_share": 1.0, "most_predicted": "a",
                                        "constant": True}
    assert res["accuracy"]["value"] == pytest.approx(0.6) and res["cohen_kappa"]["value"] == 0.0
    assert res["balanced_accuracy"]["value"] == pytest.approx(0.5)


def test_label_nll_by_hand_and_only_with_likelihoods():
    scorer = SCORERS.build("classification")
    exs = [_cls(0, "a"), _cls(1, "b")]
    preds = scorer.predictions_from_logliks(exs, [[math.log(0.75), math.log(0.25)], [-3.0, -3.0]])
    got = scorer.score(exs, preds)["label_nll"]
    assert got["value"] == pytest.approx((-math.log(0.75) + math.log(2)) / 2, abs=1e-6)
    assert got["chance"] == pytest.approx(math.log(2), abs=1e-6) and got["higher_is_better"] is False
    assert got["n"] == 2 and not got["primary"]
    # generation scoring has no label probabilities: no label_nll
    gen = scorer.predictions_from_outputs(exs, ["a", "b"])
    assert "label_nll" not in scorer.score(exs, gen)


def test_likelihood_predictions_pick_argmax():
    exs = [_cls(0, "a"), _cls(1, "b")]
    preds = SCORERS.build("classification").predictions_from_logliks(exs, [[-1.0, -2.0], [-3.0, -3.0]])
    assert [p["prediction"] for p in preds] == ["a", "a"]  # tie -> first label


def test_contextual_calibration_by_hand():
    from benchmarks.tasks.classification import calibrate, content_free_distribution

    # content-free log-likelihoods -> softmax rows (0.8, 0.2) and (0.6, 0.4) -> mean (0.7, 0.3)
    p_cf = content_free_distribution([[math.log(0.8), math.log(0.2)], [math.log(3.0), math.log(2.0)]])
    assert p_cf == pytest.approx([0.7, 0.3])
    # the raw argmax says "a" (0.6 vs 0.4); after dividing by the prompt's bias "b" wins: 0.6/0.7 < 0.4/0.3
    cal = calibrate([math.log(0.6), math.log(0.4)], p_cf)
    assert cal == pytest.approx([math.log(0.6 / 0.7), math.log(0.4 / 0.3)])
    assert int(np.argmax(cal)) == 1
    # a uniform bias changes nothing; unnormalised log-likelihoods are normalised first
    assert calibrate([-5.0, -7.0], [0.5, 0.5]) == pytest.approx(np.log([1 / (1 + math.exp(-2)),
                                                                       math.exp(-2) / (1 + math.exp(-2))]) - np.log(0.5))
    with pytest.raises(ValueError, match="n_content_free"):
        content_free_distribution([0.1, 0.2])


# -------------------------------------------------------------------------- stats
def test_bootstrap_mean_ci_brackets_and_is_deterministic():
    rng = np.random.default_rng(0)
    v = (rng.random(200) < 0.7).astype(float)
    ci = bootstrap_ci(v, n_boot=500, seed=3)
    assert ci[0] < v.mean() < ci[1]
    assert ci == bootstrap_ci(v, n_boot=500, seed=3)
    assert ci != bootstrap_ci(v, n_boot=500, seed=4)
    # more data -> narrower interval
    wide = bootstrap_ci(v[:20], n_boot=500, seed=3)
    assert (ci[1] - ci[0]) < (wide[1] - wide[0])
    assert bootstrap_ci(np.ones(10)) == (1.0, 1.0)
    assert all(math.isnan(x) for x in bootstrap_ci([]))


def test_bootstrap_matches_slow_reference():
    rng = np.random.default_rng(5)
    v = rng.normal(size=37)
    idx = next(resample_indices(37, 300, seed=9))  # one block: (300, 37)
    slow = np.array([np.mean([v[j] for j in row]) for row in idx])
    assert bootstrap_ci(v, n_boot=300, seed=9) == pytest.approx(tuple(np.quantile(slow, [0.025, 0.975])))


def test_bootstrap_sum_fn_equals_metric_fn():
    rng = np.random.default_rng(2)
    counts = rng.integers(0, 4, size=(60, 3)).astype(float)

    def f1_rows(c):
        s = np.asarray(c, dtype=float).sum(0)
        return f1_from_counts(s[0], s[1], s[2])

    a = bootstrap_ci(counts, sum_fn=micro_f1_sums, n_boot=200, seed=1)
    b = bootstrap_ci((counts,), metric_fn=f1_rows, n_boot=200, seed=1)
    assert a == pytest.approx(b)


# --------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def lively_model(smol_tokenizer):
    """A tiny random Llama whose greedy outputs vary (scaled weights, untied head)."""
    import torch

    from scd.models import tiny_model

    tok = smol_tokenizer
    m = tiny_model(len(tok), tiny_config(tie_word_embeddings=False), seed=0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(20)
    return m.eval()


def _prompts(tok, sizes=(1, 7, 3, 15, 0)):
    return [tok.apply_chat_template([{"role": "user", "content": "x " * n + "hello"}], tokenize=False,
                                    add_generation_prompt=True) for n in sizes]


def test_batched_generation_equals_unbatched(lively_model, smol_tokenizer):
    from benchmarks.tasks.generate import greedy_generate

    prompts = _prompts(smol_tokenizer)
    batched = greedy_generate(lively_model, smol_tokenizer, prompts, max_new_tokens=10, batch_size=3, progress=False)
    single = [greedy_generate(lively_model, smol_tokenizer, [p], max_new_tokens=10, batch_size=1, progress=False)[0]
              for p in prompts]
    assert batched == single
    assert len(set(batched)) == len(batched) and all(batched)  # outputs differ: the check is not vacuous
    again = greedy_generate(lively_model, smol_tokenizer, prompts, max_new_tokens=10, batch_size=2, progress=False)
    assert again == batched  # deterministic, independent of the batch size
    for p, out in zip(prompts, batched):
        assert len(smol_tokenizer(out, add_special_tokens=False).input_ids) <= 11  # budget (re-tokenising may merge)


def test_generation_stops_at_stop_token(lively_model, smol_tokenizer):
    import torch

    from benchmarks.tasks.generate import greedy_generate
    from scd.tokens import encode

    tok = smol_tokenizer
    prompt = _prompts(tok, (2,))[0]
    ids = torch.tensor([encode(tok, prompt)])
    full = lively_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                 do_sample=False, eos_token_id=[], pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
    stop = int(full[3])
    assert stop not in full[:3].tolist()
    out = greedy_generate(lively_model, tok, [prompt], max_new_tokens=8, stop_ids=[stop], progress=False)[0]
    assert out == tok.decode(full[:3], skip_special_tokens=True)


def test_loglik_choices_match_reference(lively_model, smol_tokenizer):
    from benchmarks.tasks.generate import loglik_choices, loglik_reference

    prompts = _prompts(smol_tokenizer)
    choices = [["positive", "negative"], ["a", "bb c", "neutral<|im_end|>"], ["x"], ["fresh", "rotten"], ["q", "r"]]
    got = loglik_choices(lively_model, smol_tokenizer, prompts, choices, batch_size=2, progress=False)
    ref = [[loglik_reference(lively_model, smol_tokenizer, p, c) for c in cs] for p, cs in zip(prompts, choices)]
    for g, r in zip(got, ref):
        assert g == pytest.approx(r, rel=1e-5, abs=1e-3)
    same_count = loglik_choices(lively_model, smol_tokenizer, prompts[:2], [["a", "b"], ["c", "d"]], batch_size=2,
                                progress=False)
    assert same_count[1] == pytest.approx([loglik_reference(lively_model, smol_tokenizer, prompts[1], c)
                                           for c in ("c", "d")], rel=1e-5, abs=1e-3)


def test_loglik_choices_share_the_demonstrations_prefix(lively_model, smol_tokenizer):
    """Few-shot contexts share their demonstrations: the common prefix runs once and the rest of each context is
    left-padded after it ([prefix | pad | suffix]); the sums still equal the one-string-at-a-time reference."""
    from benchmarks.tasks.generate import encode_pair, loglik_choices, loglik_reference
    from scd.heads import prompts_shared_prefix_len

    demos = "Review: a gem. Answer: positive\nReview: a mess. Answer: negative\nReview: loved it. Answer: positive\n"
    prompts = [smol_tokenizer.apply_chat_template([{"role": "user", "content": demos + "Review: " + "x " * n + "ok"}],
                                                  tokenize=False, add_generation_prompt=True) for n in (9, 0, 4, 1)]
    ctxs = [encode_pair(smol_tokenizer, p, "positive")[0] for p in prompts]
    s = prompts_shared_prefix_len(ctxs)
    assert s >= 30 and len({len(c) for c in ctxs}) == 4  # a real shared prefix; suffixes of 4 lengths (padding)
    assert prompts_shared_prefix_len(ctxs[:1]) == 0 and prompts_shared_prefix_len([[1] * 40, [2] * 40]) == 0
    choices = [["positive", "negative"]] * 4
    got = loglik_choices(lively_model, smol_tokenizer, prompts, choices, batch_size=4, progress=False)
    ref = [[loglik_reference(lively_model, smol_tokenizer, p, c) for c in cs] for p, cs in zip(prompts, choices)]
    for g, r in zip(got, ref):
        assert g == pytest.approx(r, rel=1e-5, abs=1e-3)
    assert len({round(g[0], 3) for g in got}) == 4  # the contexts' endings matter: the check is not vacuous


def test_calibrated_scoring_matches_slow_reference(lively_model, smol_tokenizer):
    """scoring='calibrated' = argmax of log p(l|x) - log mean_cf p(l|cf), recomputed here one string at a time."""
    from benchmarks.tasks.classification import CONTENT_FREE
    from benchmarks.tasks.generate import loglik_reference
    from scd.data.prompts import render_prompt, render_target

    scorer = SCORERS.build("classification")
    labels = ("positive", "negative", "neutral")
    exs = [{**_cls(i, labels[i % 3], labels), "instruction": "Sentiment?", "input": text}
           for i, text in enumerate(["great film", "dull and long", "it exists", "loved it", "meh"])]
    shots = [{**_cls(9, "negative", labels), "instruction": "Sentiment?", "input": "awful", "target": "negative"}]
    preds = scorer.predict(lively_model, smol_tokenizer, exs, shots=shots, batch_size=2, scoring="calibrated",
                           progress=False)

    def ll(ex):
        prompt = render_prompt(ex, smol_tokenizer, shots)
        return np.array([loglik_reference(lively_model, smol_tokenizer, prompt,
                                          render_target({**ex, "target": lab}, smol_tokenizer)) for lab in labels])

    def softmax(v):
        e = np.exp(v - v.max())
        return e / e.sum()

    p_cf = np.mean([softmax(ll({**exs[0], "input": t})) for t in CONTENT_FREE], axis=0)
    for ex, p in zip(exs, preds):
        ref = np.log(softmax(ll(ex))) - np.log(p_cf)
        assert p["prediction"] == labels[int(np.argmax(ref))]
        assert [p["calibrated"][lab] for lab in labels] == pytest.approx(ref.tolist(), abs=1e-3)
        assert [p["calibration"][lab] for lab in labels] == pytest.approx(p_cf.tolist(), abs=1e-4)
        assert p["rule"] == "calibrated"


def test_label_words_verbalize_and_back():
    from scd.data.label_words import LabelWords, unverbalize, verbalize

    lw = LabelWords(label_words={"fresh": "positive", "rotten": "negative"})
    ex = {**_cls(0, "rotten", ("fresh", "rotten")),
          "instruction": "Classify it. Fresh means good. Answer with exactly one of: fresh, rotten."}
    v = verbalize(ex, lw)
    assert v["label_set"] == ["positive", "negative"] and v["label"] == v["target"] == "negative"
    assert v["instruction"] == "Classify it. Fresh means good. Answer with exactly one of: positive, negative."
    assert ex["label"] == "rotten" and ex["label_set"] == ["fresh", "rotten"]  # input untouched
    assert verbalize(ex, LabelWords(lw.label_words, instruction="Sentiment?"))["instruction"] == "Sentiment?"
    pred = {"id": "c-test-0", "prediction": "positive", "rule": "calibrated", "logliks": {"positive": -1.0,
            "negative": -2.0}, "calibrated": {"positive": 0.1, "negative": -0.1},
            "calibration": {"positive": 0.7, "negative": 0.3}}
    back = unverbalize(pred, lw)
    assert back["prediction"] == "fresh" and back["rule"] == "calibrated"
    assert back["logliks"] == {"fresh": -1.0, "rotten": -2.0} and back["calibration"] == {"fresh": 0.7, "rotten": 0.3}
    assert unverbalize({"id": "x", "prediction": None, "output": "?"}, lw)["prediction"] is None  # invalid stays
    with pytest.raises(ValueError, match=r"missing \['rotten'\]"):
        verbalize(ex, LabelWords({"fresh": "positive"}))
    with pytest.raises(ValueError, match=r"unknown \['meh'\]"):
        verbalize(ex, LabelWords({"fresh": "positive", "rotten": "negative", "meh": "neutral"}))
    with pytest.raises(ValueError, match="share a word"):
        LabelWords({"fresh": "Good", "rotten": "good!"})
    with pytest.raises(ValueError, match="give `instruction`"):
        verbalize({**ex, "instruction": "Classify it."}, lw)


def test_label_words_scoring_matches_slow_reference(lively_model, smol_tokenizer):
    """evaluate_task with label words = argmax over the words' log-likelihoods given the reworded prompt,
    recomputed one string at a time; predictions and metrics come back in the task's labels."""
    from benchmarks.evaluate import evaluate_task
    from scd.data.label_words import LabelWords
    from benchmarks.tasks.generate import loglik_reference
    from scd.data.prompts import render_prompt, render_target

    labels, words = ("fresh", "rotten"), {"fresh": "positive", "rotten": "negative"}
    texts = ["great film", "dull and long", "it exists", "loved it", "meh", "a mess"]
    exs = [{**_cls(i, labels[i % 2], labels), "task": "rotten_tomatoes", "input": t,
            "instruction": "Movie review. Answer with exactly one of: fresh, rotten."} for i, t in enumerate(texts)]
    r = evaluate_task(lively_model, smol_tokenizer, "rotten_tomatoes", examples=exs, scoring="likelihood",
                      batch_size=4, n_boot=50, progress=False, prompt=LabelWords(words))
    plain = evaluate_task(lively_model, smol_tokenizer, "rotten_tomatoes", examples=exs, scoring="likelihood",
                          batch_size=4, n_boot=50, progress=False)
    reworded = "Movie review. Answer with exactly one of: positive, negative."
    assert r["info"]["label_words"] == words and r["info"]["instruction"] == reworded
    changed = False
    for ex, row, row0 in zip(exs, r["rows"], plain["rows"]):
        prompt = render_prompt({**ex, "instruction": reworded}, smol_tokenizer)
        ref = {lab: loglik_reference(lively_model, smol_tokenizer, prompt,
                                     render_target({**ex, "target": words[lab]}, smol_tokenizer)) for lab in labels}
        assert row["logliks"] == pytest.approx(ref, rel=1e-5, abs=1e-3)
        assert row["prediction"] == max(labels, key=ref.get) and row["gold"] == ex["label"]
        changed |= row["logliks"] != pytest.approx(row0["logliks"], abs=1e-3)
    assert changed  # the words really change what is scored
    acc = np.mean([row["prediction"] == ex["label"] for ex, row in zip(exs, r["rows"])])
    assert r["metrics"]["accuracy"]["value"] == pytest.approx(acc)


def test_encode_pair_moves_trailing_whitespace(smol_tokenizer):
    from benchmarks.tasks.generate import encode_pair

    ctx, cont = encode_pair(smol_tokenizer, "Answer: ", "yes")
    assert smol_tokenizer.decode(ctx) == "Answer:" and smol_tokenizer.decode(cont) == " yes"


def test_rescore_adds_the_prediction_profile_and_rebuilds_examples_from_saved_rows(tmp_path, monkeypatch):
    """A likelihood-scored run made before balanced accuracy, kappa and the prediction profile existed,
    rescored where its task data is not available: examples come from the saved rows (gold, scored labels),
    the metrics it has re-score identically, the new ones are added."""
    import json

    import benchmarks.evaluate as E
    from scd.core.assets import AssetError
    from scd.core.results import atomic_write_json, read_json

    sc = SCORERS.build("classification", n_boot=100, seed=0)
    exs = [_cls(i, g, "abc") for i, g in enumerate("aabbcab")]
    preds = sc.predictions_from_logliks(exs, [[-1.0, -2.0, -3.0]] * 6 + [[-3.0, -1.0, -2.0]])
    scores = sc.score(exs, preds)
    old = {"accuracy", "f1_macro", "invalid_rate", "label_nll"}
    rec = {"eval": {"c": {m: {k: scores[m][k] for k in ("value", "n", "ci")} for m in old}},
           "metric_meta": {f"c/{m}": {k: scores[m][k] for k in ("higher_is_better", "chance", "primary")} for m in old},
           "eval_info": {"c": {"family": "classification", "split": "test", "limit": None, "n_boot": 100,
                               "boot_seed": 0, "predictions": "predictions/c.jsonl",
                               "extra": {"accuracy": {"majority_baseline": 0.428571}}}}}
    atomic_write_json(tmp_path / "run.json", rec)
    rows = [{**p, "gold": ex["label"]} for ex, p in zip(exs, preds)]
    (tmp_path / "predictions").mkdir()
    (tmp_path / "predictions" / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def unavailable(*a, **k):
        raise AssetError("raw data for task 'c' not found")
    monkeypatch.setattr(rescore_module, "task_examples", unavailable)
    added = E.rescore_run(tmp_path)
    assert added == ["c/accuracy.max_label_share", "c/accuracy.most_predicted", "c/accuracy.constant",
                     "c/balanced_accuracy", "c/cohen_kappa"]
    new = read_json(tmp_path / "run.json")
    info = new["eval_info"]["c"]
    assert info["extra"]["accuracy"] == {"majority_baseline": round(3 / 7, 6), "max_label_share": round(6 / 7, 6),
                                         "most_predicted": "a", "constant": False}
    assert info["rescored"]["examples"].startswith("saved predictions")
    assert new["eval"]["c"]["cohen_kappa"]["value"] == scores["cohen_kappa"]["value"]
    assert E.rescore_run(tmp_path) == []  # now up to date
    # a stored detail that no longer reproduces is an error, like a metric
    new["eval_info"]["c"]["extra"]["accuracy"]["max_label_share"] = 0.5
    atomic_write_json(tmp_path / "run.json", new)
    with pytest.raises(ValueError, match="max_label_share"):
        E.rescore_run(tmp_path)
