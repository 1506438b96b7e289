"""Task data: parsers on tricky rows, deterministic splits, JSONL validation, spec loading.

Parser tests use small synthetic raw files under tmp_path; split/alignment tests
use the real cached assets (``make assets``), written to tmp_path.
"""
from __future__ import annotations

import bz2
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scd.core.assets import raw_dir
from scd.data.build import build_task, dedupe, split_items, task_dir, unavailable_reason
from scd.data.load import as_hf_dataset, load_split, read_jsonl
from scd.data.records import DataError, bio_to_entities, find_span, labels_to_bio, make_record, record_problem
from scd.data.tasks import (MULTIEMO_LANGS, POLISH_NAM_TYPES, SENTIMENT_LABELS, TASKS, SplitSizes, get_task,
                            multiemo_label, split_question)


def _bigbench(tmp_path: Path, examples: list, name: str = "task.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps({"name": "x", "examples": examples}, ensure_ascii=False), encoding="utf-8")
    return p


def _need(task: str) -> Path:
    """The task's raw file, or skip with why it is missing (bigbench: no longer served by PyPI)."""
    reason = unavailable_reason(task)
    if reason:
        pytest.skip(reason)
    return get_task(task).raw_path()


# ------------------------------------------------------------------------ registry
def test_registry_has_all_tasks():
    expected = {"disfl_qa", "hindi_qa", "parsinlu_rc", "wnut16", "polish_ner", "rotten_tomatoes",
                *(f"multiemo_{lang}" for lang in MULTIEMO_LANGS)}
    assert expected <= set(TASKS.names())
    assert len(MULTIEMO_LANGS) == 11
    for name in expected:
        spec = get_task(name)
        assert spec.family in ("qa", "ner", "classification") and spec.instruction and spec.max_new_tokens > 0
        assert (spec.label_set is not None) == (spec.family == "classification")
    with pytest.raises(KeyError, match="did you mean 'wnut16'"):
        get_task("wnut61")


# ---------------------------------------------------------------------- splitting
def test_split_sizes_targets():
    assert SplitSizes().targets(518) == (362, 52, 104)
    assert SplitSizes().targets(12752) == (5000, 200, 500)
    assert SplitSizes().targets(0) == (0, 0, 0)


def _items(n: int, group_size: int = 3) -> list[tuple[str, dict]]:
    return [(f"g{i // group_size}", {"input": f"text {i}", "i": i}) for i in range(n)]


def test_split_items_deterministic_disjoint_grouped():
    items = _items(1000)
    a = split_items(items, SplitSizes(), seed=0, salt="t")
    b = split_items(items, SplitSizes(), seed=0, salt="t")
    c = split_items(items, SplitSizes(), seed=1, salt="t")
    assert a == b
    assert a["test"] != c["test"]
    ids = {s: {r["i"] for r in recs} for s, recs in a.items()}
    assert not (ids["train"] & ids["dev"] or ids["train"] & ids["test"] or ids["dev"] & ids["test"])
    assert 200 <= len(a["test"]) < 203 and 100 <= len(a["dev"]) < 103  # whole groups of 3
    groups = {s: {r["i"] // 3 for r in recs} for s, recs in a.items()}
    assert not (groups["train"] & groups["test"] or groups["dev"] & groups["test"] or groups["train"] & groups["dev"])
    assert len(a["train"]) == 1000 - len(a["test"]) - len(a["dev"])
    capped = split_items(items, SplitSizes(train_max=50), seed=0, salt="t")
    assert len(capped["train"]) == 50


def test_dedupe_keeps_first():
    items = [("a", {"input": "x", "k": 1}), ("b", {"input": "y", "k": 2}), ("c", {"input": "x", "k": 3})]
    kept, n = dedupe(items)
    assert n == 1 and [r["k"] for _, r in kept] == [1, 2]


def test_build_same_seed_identical_other_seed_differs(tmp_path):
    _need("parsinlu_rc")
    a = build_task("parsinlu_rc", tmp_path / "a", seed=0, quiet=True)
    b = build_task("parsinlu_rc", tmp_path / "b", seed=0, quiet=True)
    c = build_task("parsinlu_rc", tmp_path / "c", seed=1, quiet=True)
    for split in ("train", "dev", "test"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
    assert (tmp_path / "a" / "test.jsonl").read_bytes() != (tmp_path / "c" / "test.jsonl").read_bytes()
    assert a["files"] == b["files"] != c["files"]
    assert a["sizes"] == {"train": 362, "dev": 52, "test": 104}, a["sizes"]
    recs = {s: read_jsonl(tmp_path / "a" / f"{s}.jsonl", "qa") for s in ("train", "dev", "test")}
    ctx = {s: {r["context"] for r in rs} for s, rs in recs.items()}  # passages never straddle splits
    assert not (ctx["train"] & ctx["test"] or ctx["train"] & ctx["dev"] or ctx["dev"] & ctx["test"])
    assert [r["id"] for r in recs["test"][:2]] == ["parsinlu_rc-test-0", "parsinlu_rc-test-1"]
    assert a["source"]["sha256"] and a["counts"] == {}


def test_split_independent_of_python_hash_seed(tmp_path):
    _need("parsinlu_rc")
    code = ("import sys; from scd.data.build import build_task; "
            "print(build_task('parsinlu_rc', sys.argv[1], quiet=True)['files']['test'])")
    outs = []
    for hs in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hs}
        outs.append(subprocess.run([sys.executable, "-c", code, str(tmp_path / hs)], env=env, check=True,
                                   capture_output=True, text=True).stdout.strip())
    assert outs[0] == outs[1] and len(outs[0]) == 64


def test_build_skips_when_current_and_rebuilds_when_changed(tmp_path, capsys):
    _need("parsinlu_rc")
    out = tmp_path / "p"
    build_task("parsinlu_rc", out)
    assert "train 362" in capsys.readouterr().err
    mtime = (out / "train.jsonl").stat().st_mtime_ns
    build_task("parsinlu_rc", out)
    assert "up to date" in capsys.readouterr().err
    assert (out / "train.jsonl").stat().st_mtime_ns == mtime
    (out / "dev.jsonl").write_text("tampered\n")
    build_task("parsinlu_rc", out)
    assert "up to date" not in capsys.readouterr().err
    assert read_jsonl(out / "dev.jsonl", "qa")[0]["task"] == "parsinlu_rc"


def test_task_dir_per_seed(tmp_path):
    assert task_dir("wnut16", 0, tmp_path) == tmp_path / "wnut16"
    assert task_dir("wnut16", 3, tmp_path) == tmp_path / "wnut16" / "seed3"


def test_multiemo_splits_aligned_across_languages(tmp_path):
    _need("multiemo_en")
    _need("multiemo_pl")
    metas = {lang: build_task(f"multiemo_{lang}", tmp_path / lang, quiet=True) for lang in ("en", "pl")}
    en = {r["source_row"]: r["label"] for r in read_jsonl(tmp_path / "en" / "test.jsonl", "classification")}
    pl = {r["source_row"]: r["label"] for r in read_jsonl(tmp_path / "pl" / "test.jsonl", "classification")}
    pl_aligned = {(k if k < 6428 else k - 1): v for k, v in pl.items() if k != 6428}  # pl has one extra row
    shared = set(en) & set(pl_aligned)
    assert len(shared) >= 495  # the same reviews (translations) are in both test sets
    assert all(en[k] == pl_aligned[k] for k in shared)
    assert set(metas["en"]["label_counts"]["train"]) == set(SENTIMENT_LABELS)


# ------------------------------------------------------------------------- parsers
def test_disfl_qa_parser_tricky_rows(tmp_path):
    p = _bigbench(tmp_path, [
        {"input": "What is uh no who is the CEO ?  \ncontext: Apple Inc . is led by Tim Cook .", "target": "Apple Inc."},
        {"input": "When um what year ?  \ncontext: Nothing about it here .", "target": "unknown"},
        {"input": "# VALUE !  \ncontext: Some context .", "target": "context"},
        {"input": "Où est Zoë ?  \ncontext: Zoë est à Paris — près de la Seine .", "target": "à Paris"},
    ])
    parsed = get_task("disfl_qa").parse(p)
    recs = [r for _, r in parsed.items]
    assert parsed.counts == {"no_question": 1}
    assert recs[0]["answers"] == ["Apple Inc .", "Apple Inc."] and recs[0]["target"] == "Apple Inc ."
    assert recs[0]["question"] == "What is uh no who is the CEO ?" and recs[0]["answer_start"] == 0
    assert recs[1]["answers"] == ["unanswerable"] and recs[1]["answerable"] is False
    assert recs[1]["answer_start"] == -1
    assert recs[2]["target"] == "à Paris" and recs[2]["context"].startswith("Zoë")
    assert all(record_problem({**r, "id": "x"}) is None for r in recs)
    bad = _bigbench(tmp_path, [{"input": "Q ?  \ncontext: C .", "target": "C"},
                               {"input": "Q ?  \ncontext: C .", "target": "  "}], "bad.json")
    with pytest.raises(DataError, match=r"bad\.json: example 1: empty answer"):
        get_task("disfl_qa").parse(bad)
    assert get_task("disfl_qa").parse(bad, skip_malformed=True).counts == {"malformed": 1}


def test_find_span_whitespace_insensitive():
    assert find_span("a b c", "b") == (2, 3)
    ctx = "led by Tim  Cook ."
    s = find_span(ctx, "Tim Cook.")
    assert s is not None and ctx[s[0]:s[1]] == "Tim  Cook ."
    assert find_span("abc", "") is None and find_span("abc", "xyz") is None


def test_hindi_question_split_and_span_filter(tmp_path):
    text = "भारत एक देश है। इसकी राजधानी नई दिल्ली है। भारत की राजधानी क्या है?"
    assert split_question(text) == ("भारत एक देश है। इसकी राजधानी नई दिल्ली है।", "भारत की राजधानी क्या है?")
    assert split_question('वह बोला, "चलो." फिर क्या हुआ?') == ('वह बोला, "चलो."', "फिर क्या हुआ?")
    assert split_question("केवल एक वाक्य?") is None
    p = _bigbench(tmp_path, [
        {"input": text, "target": "नई दिल्ली"},
        {"input": text, "target": "मुंबई"},  # not a span of the passage
        {"input": "केवल एक वाक्य?", "target": "x"},  # no passage
    ])
    parsed = get_task("hindi_qa").parse(p)
    assert parsed.counts == {"answer_not_in_context": 1, "no_question_boundary": 1}
    (g, rec), = parsed.items
    assert rec["question"] == "भारत की राजधानी क्या है?" and rec["target"] == "नई दिल्ली" and g == rec["context"]
    assert rec["input"] == f"Context: {rec['context']}\nQuestion: {rec['question']}"


def test_parsinlu_answers_list(tmp_path):
    p = _bigbench(tmp_path, [
        {"input": "passage: 'گندم در هوای خنک رشد می\u200cکند.' question: 'گندم کجا رشد می\u200cکند؟'",
         "target": ["هوای خنک", "در هوای خنک", "جای دیگر"]},
        {"input": "passage: 'متن' question: 'سوال؟'", "target": []},
    ])
    with pytest.raises(DataError, match="example 1: empty answer"):
        get_task("parsinlu_rc").parse(p)
    parsed = get_task("parsinlu_rc").parse(p, skip_malformed=True)
    (_, rec), = parsed.items
    assert rec["answers"] == ["هوای خنک", "در هوای خنک"] and rec["target"] == "هوای خنک"
    assert parsed.counts == {"answers_not_in_context_removed": 1, "malformed": 1}
    assert "example 1" in parsed.malformed_examples[0]


def test_polish_nam_to_bio_hand_example():
    labels = "nam_liv nam_liv O nam_loc t3_date action nam_org nam_org nam_loc nam_num2".split()
    assert labels_to_bio(labels, POLISH_NAM_TYPES) == [
        "B-living", "I-living", "O", "B-location", "O", "O", "B-organization", "I-organization", "B-location",
        "B-number"]
    # adjacent entities of one type merge (the prefix-less source cannot separate them)
    assert labels_to_bio(["nam_liv"] * 4, POLISH_NAM_TYPES) == ["B-living"] + ["I-living"] * 3


def test_polish_parser_length_mismatch(tmp_path):
    rows = [{"input": "Jan Kowalski mieszka w Łodzi", "target": "nam_liv nam_liv state O nam_loc"},
            {"input": "Ala ma kota", "target": "nam_liv O"},
            {"input": "", "target": ""}]
    p = _bigbench(tmp_path, rows, "polish.json")
    with pytest.raises(DataError) as e:
        get_task("polish_ner").parse(p)
    msg = str(e.value)
    assert "polish.json: example 1: 3 tokens but 2 labels" in msg and "skip_malformed" in msg and "\n" not in msg
    parsed = get_task("polish_ner").parse(p, skip_malformed=True)
    assert parsed.counts == {"empty": 1, "malformed": 1}
    (_, rec), = parsed.items
    assert rec["tags"] == ["B-living", "I-living", "O", "O", "B-location"]
    assert rec["target"] == "living: Jan Kowalski; location: Łodzi"
    assert rec["entities"][1] == {"type": "location", "text": "Łodzi", "start": 4, "end": 5}


def test_wnut_parser(tmp_path):
    p = tmp_path / "ner.txt"
    p.write_text("Empire\tB-facility\nState\tI-facility\nBuilding\tI-facility\nrocks\tO\n\t\n"
                 "Zoë\tB-person\nin\tO\nMünchen\tB-geo-loc\n\n", encoding="utf-8")
    parsed = get_task("wnut16").parse(p)
    recs = [r for _, r in parsed.items]
    assert [r["target"] for r in recs] == ["facility: Empire State Building", "person: Zoë; geo-loc: München"]
    assert recs[1]["source_row"] == 6
    p.write_text("a\tO\nb\tO\textra\nc\tB-notatype\n\nd\tO\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"ner\.txt: line 2: expected 'token<TAB>tag'"):
        get_task("wnut16").parse(p)
    parsed = get_task("wnut16").parse(p, skip_malformed=True)
    assert parsed.counts == {"malformed": 2} and [r["tokens"] for _, r in parsed.items] == [["d"]]


def test_multiemo_label_extraction(tmp_path):
    assert multiemo_label({"ambivalent": 0, "positive": 1, "negative": 0, "neutral": 0}, SENTIMENT_LABELS) == "positive"
    with pytest.raises(ValueError, match="exactly one"):
        multiemo_label({"positive": 1, "negative": 1}, SENTIMENT_LABELS)
    with pytest.raises(ValueError, match="not in label_set"):
        multiemo_label({"joyful": 1, "negative": 0}, SENTIMENT_LABELS)
    p = _bigbench(tmp_path, [{"input": "素晴らしい！", "target_scores": {"positive": 1, "negative": 0}},
                             {"input": "meh", "target_scores": {"sarcastic": 1}},
                             {"input": "  ", "target_scores": {"neutral": 1}}])
    with pytest.raises(DataError, match="example 1: label 'sarcastic' is not in label_set"):
        get_task("multiemo_ja").parse(p)
    parsed = get_task("multiemo_ja").parse(p, skip_malformed=True)
    assert parsed.counts == {"empty_text": 1, "malformed": 1}
    (_, rec), = parsed.items
    assert rec["label"] == rec["target"] == "positive" and rec["label_set"] == list(SENTIMENT_LABELS)


def test_rotten_tomatoes_csv(tmp_path):
    p = tmp_path / "rt.csv.bz2"
    csv_text = ('category,text,movie_name,has_plot_and_reviews\n'
                'plot,"A plot, with commas.",m1,True\n'
                'fresh,"Witty, warm — and “unmissable”.",m1,True\n'
                'rotten,Dull.,m2,False\n')
    p.write_bytes(bz2.compress(csv_text.encode("utf-8")))
    parsed = get_task("rotten_tomatoes").parse(p)
    assert parsed.counts == {"plot_rows": 1}
    assert [(r["label"], r["text"]) for _, r in parsed.items] == [("fresh", "Witty, warm — and “unmissable”."),
                                                                   ("rotten", "Dull.")]
    p.write_bytes(bz2.compress((csv_text + "great,Loved it.,m3,False\n").encode("utf-8")))
    with pytest.raises(DataError, match=r"rt\.csv\.bz2: line 5: category 'great'"):
        get_task("rotten_tomatoes").parse(p)
    p.write_bytes(bz2.compress(b"label,review\nfresh,x\n"))
    with pytest.raises(DataError, match="missing column"):
        get_task("rotten_tomatoes").parse(p)


def test_real_rotten_tomatoes_labels():
    raw = _need("rotten_tomatoes")
    parsed = get_task("rotten_tomatoes").parse(raw)
    labels = [r["label"] for _, r in parsed.items]
    assert set(labels) == {"fresh", "rotten"} and parsed.counts["plot_rows"] > 1000
    assert labels.count("fresh") > labels.count("rotten") > 5000


def test_bio_to_entities():
    toks = ["Paris", "Hilton", "in", "New", "York", "x"]
    tags = ["B-person", "I-person", "O", "I-geo-loc", "I-geo-loc", "B-other"]  # lenient I- start
    assert [(e["type"], e["text"], e["start"], e["end"]) for e in bio_to_entities(toks, tags)] == [
        ("person", "Paris Hilton", 0, 2), ("geo-loc", "New York", 3, 5), ("other", "x", 5, 6)]


# --------------------------------------------------------------------- JSONL loader
def _rec(family: str, **kw) -> dict:
    base = {"qa": dict(context="Ada lived in London.", question="Where?", answers=["London"]),
            "ner": dict(tokens=["Ada", "Lovelace"], tags=["B-person", "I-person"]),
            "classification": dict(text="good", label="positive", label_set=["positive", "negative"])}[family]
    rec = make_record(family, task="t", lang="en", instruction="Do it.", **{**base, **kw})
    rec["id"] = "t-test-0"
    return rec


@pytest.mark.parametrize("family,broken,problem", [
    ("qa", {"answers": [""], "target": ""}, "empty target"),
    ("qa", {"answers": ["London", " "]}, "empty answer"),
    ("ner", {"tags": ["B-person"]}, "2 tokens but 1 tags"),
    ("ner", {"tags": ["B-person", "person"]}, "is not BIO"),
    ("classification", {"label": "meh"}, "label 'meh' is not in label_set"),
    ("classification", {"label_set": None}, "label_set"),
])
def test_read_jsonl_malformed_rows(tmp_path, family, broken, problem):
    good = _rec(family)
    bad = {**good, **broken}
    p = tmp_path / "split.jsonl"
    p.write_text(json.dumps(good) + "\n" + json.dumps(bad, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_jsonl(p, family)
    assert f"split.jsonl:2: " in str(e.value) and problem in str(e.value) and "\n" not in str(e.value)
    counts: dict = {}
    assert read_jsonl(p, family, skip_malformed=True, counts=counts) == [good]
    assert counts == {"malformed": 1}


def test_read_jsonl_bad_json_and_missing_keys(tmp_path):
    good = _rec("ner", tokens=["Zoë", "in", "Zürich"], tags=["B-person", "O", "B-geo-loc"])
    assert good["target"] == "person: Zoë; geo-loc: Zürich"
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps(good, ensure_ascii=False) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"x\.jsonl:3: invalid JSON"):
        read_jsonl(p)
    missing = {k: v for k, v in good.items() if k != "tags"}
    p.write_text(json.dumps(missing) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"x\.jsonl:1: missing key\(s\) tags for a ner record"):
        read_jsonl(p)
    assert read_jsonl(p, skip_malformed=True) == []


@pytest.fixture()
def cache_with_raw(tmp_path, monkeypatch):
    """An empty SCD_CACHE whose raw/ points at the real raw assets."""
    real = raw_dir("x").parent
    _need("parsinlu_rc")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "raw").symlink_to(real, target_is_directory=True)
    monkeypatch.setenv("SCD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_load_split_builds_on_first_use(cache_with_raw):
    assert not (cache_with_raw / "data" / "parsinlu_rc").exists()
    recs = load_split("parsinlu_rc", "dev", limit=5)
    assert len(recs) == 5 and recs[0]["id"] == "parsinlu_rc-dev-0" and recs[0]["lang"] == "fa"
    assert (cache_with_raw / "data" / "parsinlu_rc" / "meta.json").exists()
    assert len(load_split("parsinlu_rc", "test")) == 104
    assert load_split("parsinlu_rc", "test", seed=2)[0] != load_split("parsinlu_rc", "test")[0]
    assert (cache_with_raw / "data" / "parsinlu_rc" / "seed2" / "test.jsonl").exists()
    with pytest.raises(DataError, match="unknown split 'valid'"):
        load_split("parsinlu_rc", "valid")
    ds = as_hf_dataset("parsinlu_rc", "dev")
    assert len(ds) == 52 and ds[0]["answers"] == recs[0]["answers"]


def test_spec_json_path_with_mapping(tmp_path):
    p = tmp_path / "reviews_test.jsonl"
    rows = [{"sentence": "Très bien", "meta": {"y": "pos"}}, {"sentence": "Nul", "meta": {"y": "neg"}}]
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    spec = f"json:{tmp_path}/reviews_{{split}}.jsonl"
    recs = load_split(spec, "test", family="classification", mapping={"text": "sentence", "label": "meta.y"},
                      label_set=["pos", "neg"], lang="fr")
    assert [(r["input"], r["target"]) for r in recs] == [("Très bien", "pos"), ("Nul", "neg")]
    assert recs[0]["id"] == f"{spec}-test-0" and "pos, neg" in recs[0]["instruction"]
    with pytest.raises(DataError, match=r"row 1: label 'neg' is not in label_set"):
        load_split(spec, "test", family="classification", mapping={"text": "sentence", "label": "meta.y"},
                   label_set=["pos"])
    with pytest.raises(DataError, match="row 0: missing column 'text'"):
        load_split(spec, "test", family="classification")


def test_spec_csv_ner_and_passthrough(tmp_path):
    p = tmp_path / "ner.csv"
    p.write_text('words,labels\n"Ada Lovelace wrote","B-PER I-PER O"\n"Bad row","O"\n', encoding="utf-8")
    with pytest.raises(DataError, match="row 1: 2 tokens but 1 tags"):
        load_split(f"csv:{p}", "test", family="ner", mapping={"tokens": "words", "tags": "labels"})
    counts: dict = {}
    recs = load_split(f"csv:{p}", "test", family="ner", mapping={"tokens": "words", "tags": "labels"},
                      skip_malformed=True, counts=counts)
    assert counts == {"malformed": 1} and recs[0]["target"] == "PER: Ada Lovelace"
    # a JSONL already in the shared schema passes through unchanged
    q = tmp_path / "built.jsonl"
    q.write_text(json.dumps(_rec("qa")) + "\n", encoding="utf-8")
    assert load_split(f"json:{q}", "test") == [_rec("qa")]
    with pytest.raises(DataError, match="not found"):
        load_split(f"json:{tmp_path}/nope.jsonl", "test")


def test_spec_class_label_ids_are_mapped_to_names(monkeypatch):
    import datasets

    import scd.data.load as load_mod

    feats = datasets.Features({"words": datasets.Sequence(datasets.Value("string")),
                               "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER", "I-PER"])),
                               "sentence": datasets.Value("string"),
                               "stars": datasets.ClassLabel(names=["neg", "pos"])})
    ds = datasets.Dataset.from_dict({"words": [["Ada", "Lovelace", "!"]], "ner_tags": [[1, 2, 0]],
                                     "sentence": ["Ada Lovelace !"], "stars": [1]}, features=feats)
    monkeypatch.setattr(load_mod, "_load_hf", lambda spec, split: ds)
    ner, = load_split("hub:someone/ner", "test", family="ner", mapping={"tokens": "words", "tags": "ner_tags"})
    assert ner["tags"] == ["B-PER", "I-PER", "O"] and ner["target"] == "PER: Ada Lovelace"
    assert "Types: PER." in ner["instruction"]
    cls, = load_split("hub:someone/cls", "test", family="classification",
                      mapping={"text": "sentence", "label": "stars"})
    assert cls["label"] == "pos" and cls["label_set"] == ["neg", "pos"] and cls["input"] == "Ada Lovelace !"
    with pytest.raises(DataError, match="row 0: 'input' should be a string, got list"):
        load_split("hub:someone/cls", "test", family="classification", mapping={"text": "words", "label": "stars"})


def test_keep_empty_thins_only_the_empty_answers_of_the_train_split():
    from scd.data_config import DataConfig, has_empty_answer, keep_share
    ner = [{"id": f"n{i}", "family": "ner", "entities": [] if i % 3 else [["person", "x"]]} for i in range(300)]
    qa = [{"id": "q0", "family": "qa", "answers": [], "answerable": False},
          {"id": "q1", "family": "qa", "answers": ["a"], "answerable": True}]
    assert [has_empty_answer(r) for r in ner[:3]] == [False, True, True]
    assert [has_empty_answer(r) for r in qa] == [True, False]
    assert not has_empty_answer({"id": "c", "family": "classification", "label": "positive"})
    kept = keep_share(ner, 0.3)
    assert [r for r in kept if not has_empty_answer(r)] == [r for r in ner if not has_empty_answer(r)]  # all kept
    n_empty = sum(has_empty_answer(r) for r in kept)
    assert 0.2 * 200 < n_empty < 0.4 * 200  # about 30 % of the 200 empty ones
    assert [r["id"] for r in keep_share(list(reversed(ner)), 0.3)] == [r["id"] for r in reversed(kept)]  # by id
    assert keep_share(ner, 1.0) is ner
    assert {r["id"] for r in keep_share(ner, 0.1)} < {r["id"] for r in kept}  # nested: a smaller share is a subset
    with pytest.raises(ValueError, match=r"data.keep_empty must be in \(0, 1\]"):
        DataConfig(tasks=("wnut16",), keep_empty=0.0)


def test_load_examples_thins_train_but_never_dev_or_test(monkeypatch):
    import scd.data_config as dc
    rows = [{"id": f"n{i}", "task": "wnut16", "family": "ner", "entities": []} for i in range(100)]
    monkeypatch.setattr(dc, "load_split", lambda task, split, **kw: list(rows))
    cfg = dc.DataConfig(tasks=("wnut16",), keep_empty=0.5)
    assert 30 < len(dc.load_examples(cfg)) < 70
    assert len(dc.load_examples(cfg, "dev")) == len(dc.load_examples(cfg, "test")) == 100
