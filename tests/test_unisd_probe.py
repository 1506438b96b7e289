"""The teacher-advantage probe (python -m unisd.probe) on the tiny model, against slow references."""
import json
import math

import numpy as np
import pytest

from benchmarks.stats import bootstrap_ci
from benchmarks.tasks.generate import encode_pair, loglik_reference
from scd.data.label_words import LabelWords, verbalize
from scd.data.load import load_split
from scd.data.prompts import render_prompt, render_target
from scd.models import ModelConfig, build_model
from unisd import probe as P
from unisd.prompts import teacher_prompt


def test_label_probs_hand_case():
    p = P.label_probs([math.log(1.0), math.log(3.0)])
    assert p.tolist() == pytest.approx([0.25, 0.75])


@pytest.fixture(scope="module")
def tiny(request):
    tok = request.getfixturevalue("smol_tokenizer")
    model, tok = build_model(ModelConfig(name="tiny"), seed=0, tokenizer=tok)
    return model.eval(), tok


def test_probe_matches_a_slow_reference(tiny):
    model, tok = tiny
    exs = load_split("rotten_tomatoes", "dev", limit=6)
    rep = P.probe(model, tok, exs, template="ours", batch_size=4, n_boot=200, seed=3)
    ref = {"student": {"correct": [], "p_gold": [], "nll": []}, "teacher": {"correct": [], "p_gold": [], "nll": []}}
    for ex in exs:
        labels = list(ex["label_set"])
        g = labels.index(ex["target"])
        for row, ctx in (("student", render_prompt(ex, tok)), ("teacher", teacher_prompt(ex, tok, template="ours"))):
            conts = [render_target({**ex, "target": lab}, tok) for lab in labels]
            ll = [loglik_reference(model, tok, ctx, c) for c in conts]
            z = np.exp(np.array(ll) - max(ll))
            ref[row]["correct"].append(float(int(np.argmax(ll)) == g))
            ref[row]["p_gold"].append(z[g] / z.sum())
            ref[row]["nll"].append(-ll[g] / len(encode_pair(tok, ctx, conts[g])[1]))
    for row in ("student", "teacher"):
        for name, key in (("accuracy", "correct"), ("p_gold", "p_gold"), ("nll", "nll")):
            assert rep[row][name]["value"] == pytest.approx(float(np.mean(ref[row][key])), abs=1e-4), (row, name)
    diff = np.array(ref["teacher"]["nll"]) - np.array(ref["student"]["nll"])
    assert rep["difference"]["nll"]["value"] == pytest.approx(float(diff.mean()), abs=1e-4)
    lo, hi = bootstrap_ci(diff, n_boot=200, seed=3)  # paired: the bootstrap of per-example differences
    assert rep["difference"]["nll"]["ci"] == pytest.approx([lo, hi], abs=1e-4)
    assert sum(e["n"] for e in rep["by_label"].values()) == 6
    gold = [ex["target"] for ex in exs]
    assert rep["majority_rate"] == max(gold.count(lab) for lab in set(gold)) / 6


def test_probe_without_labels_reports_the_reference_nll(tiny):
    model, tok = tiny
    exs = [{"instruction": "Answer.", "input": "Who wrote Hamlet?", "target": "Shakespeare", "task": "qa"},
           {"instruction": "Answer.", "input": "Capital of France?", "target": "Paris", "task": "qa"}]
    rep = P.probe(model, tok, exs, n_boot=50)
    assert set(rep["student"]) == {"nll"} and "by_label" not in rep
    ctx = teacher_prompt(exs[1], tok)
    cont = render_target(exs[1], tok)
    one = P.probe(model, tok, exs[1:], n_boot=10)
    expect = -loglik_reference(model, tok, ctx, cont) / len(encode_pair(tok, ctx, cont)[1])
    assert one["teacher"]["nll"]["value"] == pytest.approx(expect, abs=1e-4)


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "p"
    rc = P.main(["--model", "tiny", "--split", "dev", "--limit", "4", "--n-boot", "50", "--out", str(out),
                 "--label-words", "fresh=positive,rotten=negative", "--device", "cpu"])
    assert rc == 0
    rep = json.loads((out / "probe.json").read_text())
    assert rep["n"] == 4 and rep["template"] == "released" and rep["label_words"] == {"fresh": "positive",
                                                                                        "rotten": "negative"}
    assert set(rep["by_label"]) == {"positive", "negative"}
    md = (out / "probe.md").read_text()
    assert f"| teacher − student | {rep['difference']['accuracy']['value']:+.3f}" in md
    assert P.main(["--model", "tiny", "--template", "relesed"]) == 2
    assert "did you mean 'released'" in capsys.readouterr().err
    # the grid of probes: one row per probe folder, numbers from each probe.json
    assert P.main(["--summarize", str(tmp_path)]) == 0
    grid = json.loads((tmp_path / "grid.json").read_text())
    assert [r["setting"] for r in grid] == ["p"] and grid[0]["difference"] == rep["difference"]
    assert "| p | rotten_tomatoes/dev | 4 | released | fresh→positive, rotten→negative | 0 |" in (tmp_path / "grid.md").read_text()
    assert P.main(["--summarize", str(tmp_path / "empty")]) == 2
    # a generation task's probe (nll only) beside a classification one: its accuracy cells are "-"
    assert P.main(["--model", "tiny", "--task", "wnut16", "--split", "dev", "--limit", "2", "--n-boot", "20",
                   "--out", str(tmp_path / "q"), "--device", "cpu"]) == 0
    assert P.main(["--summarize", str(tmp_path)]) == 0
    row = next(line for line in (tmp_path / "grid.md").read_text().splitlines() if line.startswith("| q |"))
    assert row.startswith("| q | wnut16/dev | 2 | released | own | 0 | - | - | - | - | - | ")


def test_cli_probes_a_unisd_configs_training_setting(tmp_path):
    """--config: the config's model, label words + instruction, few-shot demos (both prompts open with them; a dev
    probe starts after them) and teacher template -- the same numbers as probe() given that setting by hand."""
    cfg = tmp_path / "u.yaml"
    cfg.write_text(
        "recipe: unisd\nmodel: {name: tiny}\n"
        "data:\n  tasks: [rotten_tomatoes]\n  shots: 2\n  prompts:\n    rotten_tomatoes:\n"
        "      label_words: {fresh: positive, rotten: negative}\n"
        "      instruction: 'Classify the sentiment. Answer with exactly one of: positive, negative.'\n"
        "components:\n  in_context_teacher: {template: ours}\n")
    out = tmp_path / "p"
    assert P.main(["--config", str(cfg), "--split", "dev", "--limit", "3", "--n-boot", "20", "--out", str(out),
                   "--device", "cpu"]) == 0
    rep = json.loads((out / "probe.json").read_text())
    assert (rep["shots"], rep["skipped_demos"], rep["template"], rep["n"]) == (2, 2, "ours", 3)
    assert rep["instruction"].startswith("Classify the sentiment.")
    words = LabelWords(label_words={"fresh": "positive", "rotten": "negative"},
                       instruction="Classify the sentiment. Answer with exactly one of: positive, negative.")
    dev = [verbalize(ex, words) for ex in load_split("rotten_tomatoes", "dev", limit=5)]
    model, tok = build_model(ModelConfig(name="tiny"), seed=0)
    ref = P.probe(model.eval(), tok, dev[2:], template="ours", shots=dev[:2], n_boot=20)
    for row in ("student", "teacher"):
        assert rep[row]["p_gold"]["value"] == pytest.approx(ref[row]["p_gold"]["value"], abs=1e-5)
    assert P.main(["--config", "configs/scd/study/kd_rt_cpu.yaml"]) == 2  # not a UniSD config
