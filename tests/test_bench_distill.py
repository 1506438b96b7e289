"""benchmarks/perf/bench_distill.py --quick: runs, writes the documented JSON schema, prints ratios."""
import json

import pytest

from benchmarks.perf import bench_distill
from benchmarks.perf.e2e_kd import teacher_config

ROW_KEYS = {"name", "tokens_per_s", "total_tokens_per_s", "peak_mem_mb", "tokens_per_s_min", "tokens_per_s_max",
            "step_s", "phases_s", "target_tokens", "total_tokens"}


def test_quick_run_schema_and_ratios(tmp_path, capsys):
    out = tmp_path / "perf" / "distill_step.json"
    assert bench_distill.main(["--quick", "--repeats", "1", "--dtypes", "fp32", "bf16", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    printed = capsys.readouterr().out
    names = [r["name"] for r in res["rows"]]
    expected = ["ours_naive", "ours_fast", "ours_cached"] + (["trl"] if res["versions"]["trl"] else [])
    assert names == expected
    assert res["dtype"] == "fp32" and res["device"].startswith("CPU") and res["versions"]["torch"]
    for r in res["rows"]:
        assert ROW_KEYS <= set(r) and r["tokens_per_s"] > 0 and r["peak_mem_mb"] >= 0
        assert r["tokens_per_s_min"] <= r["tokens_per_s"] <= r["tokens_per_s_max"]
        assert r["target_tokens"] == 4 * 4 and r["total_tokens"] == 4 * 32  # quick: batch 4 x 32, 4 targets each
        assert r["total_tokens_per_s"] == pytest.approx(r["tokens_per_s"] * 8)
    assert res["rows"][2]["phases_s"]["teacher"] < res["rows"][1]["phases_s"]["teacher"] + 0.05  # cached: no teacher
    assert set(res["tables"]) == {"fp32", "bf16"} and set(res["tables"]["bf16"]) == {"short", "long"}
    assert res["tables"]["fp32"]["short"]["rows"] == res["rows"]
    r = res["tables"]["fp32"]["short"]["ratios"]
    assert r["fast_over_naive"] == pytest.approx(res["rows"][1]["tokens_per_s"] / res["rows"][0]["tokens_per_s"])
    assert "ratios: fast_over_naive" in printed and printed.count("ratios:") == 4
    readme = (tmp_path / "perf" / "README.md").read_text()
    assert "python -m benchmarks.perf.bench_distill --quick" in readme and "| ours_cached |" in readme
    assert bench_distill.PHASES_NOTE in readme
    (tmp_path / "perf" / "README.md").unlink()  # --readme-only: the same text from the JSON, nothing measured
    assert bench_distill.main(["--readme-only", "--out", str(out)]) == 0
    assert (tmp_path / "perf" / "README.md").read_text() == readme and json.loads(out.read_text()) == res


def test_bf16_table_only_where_bf16_is_fast():
    import torch

    cpu = torch.device("cpu")
    assert bench_distill.choose_dtypes(None, cpu, {"fp32": 20.0, "bf16": 44.0}) == (["fp32", "bf16"], {})
    dtypes, skipped = bench_distill.choose_dtypes(None, cpu, {"fp32": 20.0, "bf16": 0.5})
    assert dtypes == ["fp32"] and "0.5 GFLOP/s vs fp32 20.0" in skipped["bf16"]
    assert bench_distill.choose_dtypes(["bf16"], cpu, {"fp32": 20.0, "bf16": 0.5}) == (["fp32", "bf16"], {})


def test_e2e_trains_the_teacher_the_kd_row_names():
    """benchmarks.perf.e2e_kd trains the row's own teacher before the variants (no variant's wall time may
    include teacher training): the demo grid's KD row names demo_teacher.yaml, the older kd_demo row
    teacher_demo.yaml."""
    assert teacher_config("configs/scd/demo_student.yaml") == "configs/scd/demo_teacher.yaml"
    assert teacher_config("configs/scd/kd_demo.yaml") == "configs/scd/teacher_demo.yaml"
