"""The suite's scorer and the lm-eval path agree on the same task and model (offline)."""
from __future__ import annotations

import pytest
import yaml

from scd.data.build import unavailable_reason
from tests.conftest import tiny_config

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def lively(smol_tokenizer):
    """Tiny random Llama with the SmolLM2 tokenizer; scaled weights so that label
    log-likelihoods are far apart and greedy generations vary."""
    import torch

    from scd.models import tiny_model

    tok = smol_tokenizer
    m = tiny_model(len(tok), tiny_config(tie_word_embeddings=False), seed=1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(20)
    return m.eval(), tok


def test_export_yaml(tmp_path, smol_tokenizer):
    from benchmarks.evaluate import task_examples
    from benchmarks.lmeval_bridge import export_task

    ex = task_examples("rotten_tomatoes", "test", 4)
    name = export_task("rotten_tomatoes", tmp_path, smol_tokenizer, examples=ex, shots=1)
    cfg = yaml.safe_load((tmp_path / name / f"{name}.yaml").read_text())
    assert cfg["output_type"] == "multiple_choice" and cfg["dataset_path"] == "json"
    assert cfg["doc_to_text"] == "prompt" and cfg["target_delimiter"] == ""
    assert cfg["metadata"]["shots"] == 1 and cfg["metadata"]["chance"] == 0.5
    docs = (tmp_path / name / "docs.jsonl").read_text().splitlines()
    assert len(docs) == 4


def test_suite_and_lm_eval_agree(tmp_path, lively):
    from benchmarks.evaluate import task_examples
    from benchmarks.lmeval_bridge import export_task, results_to_eval, run_lm_eval
    from benchmarks.tasks import SCORERS
    from scd.core.results import new_run_record, validate_run_record

    if unavailable_reason("disfl_qa"):
        pytest.skip(unavailable_reason("disfl_qa"))
    model, tok = lively
    cls = task_examples("rotten_tomatoes", "test", 8)
    qa = task_examples("disfl_qa", "test", 4)
    names = {"rotten_tomatoes": export_task("rotten_tomatoes", tmp_path, tok, examples=cls),
             "disfl_qa": export_task("disfl_qa", tmp_path, tok, examples=qa, max_new_tokens=8)}
    res = run_lm_eval(model, tok, list(names.values()), include_path=tmp_path, batch_size=4)

    # classification: identical per-label log-likelihoods -> identical predictions and accuracy
    sc = SCORERS.build("classification")
    ours = sc.predict(model, tok, cls, scoring="likelihood", batch_size=3, progress=False)
    samples = sorted(res["samples"][names["rotten_tomatoes"]], key=lambda s: s["doc_id"])
    theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    for p, t in zip(ours, theirs):
        assert list(p["logliks"].values()) == pytest.approx(t, rel=1e-4)
    assert [max(range(2), key=lambda j: t[j]) for t in theirs] == \
           [cls[0]["label_set"].index(p["prediction"]) for p in ours]
    acc = sc.score(cls, ours)["accuracy"]["value"]
    assert res["results"][names["rotten_tomatoes"]]["acc,none"] == pytest.approx(acc)

    # generation: identical greedy continuations
    gen = SCORERS.build("qa").predict(model, tok, qa, max_new_tokens=8, batch_size=3, progress=False)
    lm_out = [s["filtered_resps"][0] for s in sorted(res["samples"][names["disfl_qa"]], key=lambda s: s["doc_id"])]
    assert [g["output"] for g in gen] == lm_out
    assert len(set(lm_out)) > 1

    # results -> run.json entries
    entries = results_to_eval(res, names, {"rotten_tomatoes": 0.5, "disfl_qa": 0.0})
    rec = new_run_record(run_id="x", grid=None, method="m", seed=0, recipe="evaluate", config={})
    rec.update(status="ok", eval=entries["eval"], metric_meta=entries["metric_meta"])
    validate_run_record(rec)
    assert rec["eval"]["lm_eval:rotten_tomatoes"]["acc"]["n"] == 8
    assert rec["metric_meta"]["lm_eval:rotten_tomatoes/acc"]["chance"] == 0.5
