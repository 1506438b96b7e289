import json
import os

import pytest

from scd.core.results import (MetricsWriter, ResultsError, atomic_write_json, config_hash, new_run_record,
                              read_metrics, safe_join, validate_run_record)


def test_atomic_write_leaves_no_temp_and_replaces(tmp_path):
    p = tmp_path / "a" / "run.json"
    atomic_write_json(p, {"x": 1})
    atomic_write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2}
    assert [f.name for f in p.parent.iterdir()] == ["run.json"]


def test_atomic_write_permission_denied_is_clear(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(ResultsError, match="cannot write"):
            atomic_write_json(d / "run.json", {"x": 1})
    finally:
        d.chmod(0o700)


def test_metrics_torn_tail_is_ignored_and_truncated(tmp_path):
    p = tmp_path / "metrics.jsonl"
    w = MetricsWriter(p)
    w.log({"step": 1, "loss": 2.0})
    with open(p, "a") as f:
        f.write('{"step": 2, "lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(p)] == [1]
    MetricsWriter(p).log({"step": 2, "loss": 1.0})
    assert [r["step"] for r in read_metrics(p)] == [1, 2]


def test_metrics_drop_after_for_resume(tmp_path):
    w = MetricsWriter(tmp_path / "m.jsonl")
    for s in range(1, 6):
        w.log({"step": s})
    w.drop_after(3)
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [1, 2, 3]


def test_config_hash_is_order_independent():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_run_record_validates_and_rejects_bad():
    rec = new_run_record(run_id="x", grid=None, method="m", seed=0, recipe="sft", config={})
    validate_run_record(rec)
    rec["eval"] = {"t": {"acc": 0.5}}
    with pytest.raises(ValueError, match="eval.t.acc"):
        validate_run_record(rec)
    rec2 = dict(rec, eval={}, status="weird")
    with pytest.raises(ValueError, match="status"):
        validate_run_record(rec2)


def test_safe_join_refuses_escape(tmp_path):
    assert safe_join(tmp_path, "a", "b") == (tmp_path / "a" / "b").resolve()
    with pytest.raises(ResultsError, match="escapes"):
        safe_join(tmp_path, "..", "etc")
    with pytest.raises(ResultsError, match="escapes"):
        safe_join(tmp_path, "/etc/passwd")
