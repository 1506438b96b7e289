"""Grid runner: expansion, slots, claims, failures, resume after kill -9, shards, Slurm.

Runs use the pure-Python fake recipe (tests/fake_recipe.py) through a configurable
launch command, so no test needs torch or the real CLI.
"""
from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import grid as G  # noqa: E402
from scd.core.config import ConfigError, from_dict, load_config, load_yaml  # noqa: E402
from scd.core import results as R  # noqa: E402
from scd.core.results import config_hash, read_json, read_metrics, run_id  # noqa: E402
from tests import fake_recipe  # noqa: E402  (registers recipe "fake")
from tests._gitrepo import make_dirty, make_repo  # noqa: E402

CMD = "{python} -m tests.fake_recipe {config} --run-dir {run_dir}"


def make_grid(tmp_path: Path, name: str = "g", *, sleep: float = 0.0, steps: int = 3, fname: str = "g",
              **keys) -> Path:
    base = tmp_path / "base.yaml"
    base.write_text(f"recipe: fake\nmethod: kd\ntrain: {{steps: {steps}, sleep_s: {sleep}}}\n")
    grid = {"recipe": "grid", "name": name, "base": str(base), "baseline": "kd", "seeds": [0, 1],
            "runs": [{"method": "kd"}, {"method": "scd", "quality": 0.6, "components": {"ema": True}}]}
    grid.update(keys)
    path = tmp_path / f"{fname}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def counts(count_dir: Path, kind: str = "start") -> collections.Counter:
    return collections.Counter(p.name.split(".")[0] for p in count_dir.glob(f"*.{kind}"))


def grid_main(path: Path, results: Path, *extra: str) -> int:
    return G.main([str(path), "--results-dir", str(results), "--command", CMD, "--import", "tests.fake_recipe",
                   "--progress-every", "0.5", *extra])


def runner_cmd(path: Path, results: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.grid", str(path), "--results-dir", str(results), "--command", CMD,
            "--import", "tests.fake_recipe", *extra]


def sub_env(**kw: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), **kw)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


# ------------------------------------------------------------------------ grid file + expansion
def test_expansion_is_deterministic_validated_and_written_before_start(tmp_path):
    path = make_grid(tmp_path, seeds=[0, 1, 2], runs=[{"method": "kd"}, {"method": "scd", "train.lr": 3e-3,
                                                                        "train": {"steps": 5}}],
                     product={"quality": [0.4, 0.6]}, zip={"train.sleep_s": [0.0, 0.01], "eval.limit": [10, 20]},
                     eval={"tasks": ["qa"]})
    grid = G.load_grid(path)
    plan1, plan2 = G.expand_grid(grid, path), G.expand_grid(G.load_grid(path), path)
    assert len(plan1.runs) == 3 * 2 * 2 * 2  # seeds x variants x product x zip
    assert [r.run_id for r in plan1.runs] == [r.run_id for r in plan2.runs]
    assert len({r.run_id for r in plan1.runs}) == len(plan1.runs)
    assert [r.seed for r in plan1.runs[:8]] == [0] * 8  # seed-major order
    scd = next(r for r in plan1.runs if r.method == "scd")
    assert scd.config["train"] == {"lr": 3e-3, "steps": 5, "sleep_s": scd.axes["train.sleep_s"]}  # dotted + nested
    assert scd.config["eval"]["tasks"] == ["qa"] and scd.config["grid"] == "g"  # grid eval block merged
    for r in plan1.runs:  # run_id = hash of the resolved config (without the grid name)
        assert r.run_id == config_hash({k: v for k, v in r.config.items() if k != "grid"}) == run_id(r.config)
    # the id does not depend on the grid name or on other variants
    other = make_grid(tmp_path, name="h", fname="h", seeds=[0], runs=[{"method": "kd"}], product={"quality": [0.4]},
                      zip={"train.sleep_s": [0.0], "eval.limit": [10]}, eval={"tasks": ["qa"]})
    kd0 = next(r for r in plan1.runs if r.method == "kd" and r.seed == 0 and r.axes["quality"] == 0.4
               and r.axes["eval.limit"] == 10)
    assert G.expand_grid(G.load_grid(other), other).runs[0].run_id == kd0.run_id
    # written to disk before anything starts: each config.yaml validates back to the same run_id
    gdir = G.write_plan(plan1, tmp_path / "results")
    plan_json = read_json(gdir / "plan.json")
    assert [r["run_id"] for r in plan_json["runs"]] == [r.run_id for r in plan1.runs]
    assert plan_json["baseline"] == "kd"
    for r in plan1.runs:
        cfg = from_dict(fake_recipe.FakeConfig, *load_yaml(gdir / r.run_id / "config.yaml"))
        assert isinstance(cfg, fake_recipe.FakeConfig)
        from scd.core.config import to_dict
        assert config_hash({k: v for k, v in to_dict(cfg).items() if k != "grid"}) == r.run_id
    assert not list(gdir.glob("*/run.json"))  # nothing ran


def test_grid_file_is_a_registered_recipe(tmp_path):
    path = make_grid(tmp_path)
    cfg = load_config(path)  # `scd validate` works on grid files
    assert isinstance(cfg, G.GridConfig) and cfg.name == "g"


def test_a_variant_can_run_for_some_seeds_only(tmp_path):
    path = make_grid(tmp_path, seeds=[0, 1, 2], runs=[{"method": "teacher", "seeds": [0]}, {"method": "kd"}])
    plan = G.expand_grid(G.load_grid(path), path)
    assert [(r.method, r.seed) for r in plan.runs] == [("teacher", 0), ("kd", 0), ("kd", 1), ("kd", 2)]
    teacher = plan.runs[0]
    assert "seeds" not in teacher.config and "seeds" not in teacher.overrides
    # the narrowed variant has the id it would have without `seeds`
    plain = make_grid(tmp_path, name="h", fname="h", seeds=[0], runs=[{"method": "teacher"}], baseline="teacher")
    assert G.expand_grid(G.load_grid(plain), plain).runs[0].run_id == teacher.run_id


@pytest.mark.parametrize("keys, match", [
    ({"seeds": [0, 0]}, r"g\.yaml:\d+: key 'seeds': seeds must be unique"),
    ({"zip": {"quality": [0.1, 0.2], "train.lr": [0.1]}}, r"key 'zip': zipped axes must have equal lengths"),
    ({"baseline": "kdd"}, r"key 'baseline': no run has method 'kdd' \(did you mean 'kd'\?\)"),
    ({"runs": [{"method": "kd", "train.lrr": 1}]},
     r"runs\[0\] seed=0: key 'train\.lrr': unknown key.*did you mean 'lr'"),
    ({"runs": [{"method": "kd", "quality": "high"}]}, r"runs\[0\] seed=0: key 'quality': expected a number"),
    ({"seedz": [1]}, r"g\.yaml:\d+: key 'seedz': unknown key in GridConfig \(did you mean 'seeds'\?\)"),
    ({"launcher": "slurm"}, r"key 'launcher': must be one of \['local', 'torchrun', 'deepspeed'\]"),
    ({"base": "nope.yaml"}, r"key 'base': config file 'nope.yaml' not found"),
    ({"runs": [{"method": "kd"}, {"method": "kd"}]}, r"resolves to the same config as runs\[0\]"),
    ({"name": "../escape"}, r"g\.yaml:\d+: key 'name': '\.\./escape' must be a plain directory name"),
    ({"seeds": [0, 1], "runs": [{"method": "kd", "seeds": [2]}]},
     r"key 'runs\[0\]\.seeds': a variant's seeds must be a non-empty subset of the grid's seeds \[0, 1\]"),
])
def test_bad_grid_files_give_one_line_errors(tmp_path, keys, match):
    path = make_grid(tmp_path, **keys)
    with pytest.raises(ConfigError, match=match) as e:
        G.expand_grid(G.load_grid(path), path)
    assert "\n" not in str(e.value)


def test_shards_partition_sorted_run_ids(tmp_path):
    path = make_grid(tmp_path, seeds=[0, 1, 2, 3, 4])
    plan = G.expand_grid(G.load_grid(path), path)
    shards = [plan.shard(i, 3) for i in range(3)]
    ids = [r.run_id for s in shards for r in s]
    assert sorted(ids) == sorted(r.run_id for r in plan.runs)  # disjoint, complete
    assert all(len(s) in (3, 4) for s in shards)
    assert [r.run_id for r in plan.shard(1, 3)] == [r.run_id for r in shards[1]]  # deterministic
    assert G.parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "1-2", "0/0"):
        with pytest.raises(Exception, match="i/N"):
            G.parse_shard(bad)


# ------------------------------------------------------------------------------ slots + commands
def test_slots_and_launch_commands():
    assert G.make_slots(G.detect_gpus(4), 2, 1) == [G.Slot(0, ("0", "1")), G.Slot(1, ("2", "3"))]
    assert G.detect_gpus(env={"CUDA_VISIBLE_DEVICES": "3,5"}) == ["3", "5"]
    assert G.detect_gpus(env={"CUDA_VISIBLE_DEVICES": ""}) == []
    assert G.make_slots([], 1, 3) == [G.Slot(0), G.Slot(1), G.Slot(2)]
    with pytest.raises(ConfigError, match="gpus_per_run is 4 but only 2 GPU"):
        G.make_slots(["0", "1"], 4, 1)
    slot = G.Slot(1, ("2", "3"))
    cfg, rd = Path("/r/g/abc/config.yaml"), Path("/r/g/abc")
    tr = G.build_command(G.command_template("torchrun", None, slot), config=cfg, run_dir=rd, slot=slot, nproc=2)
    assert tr[:7] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    assert tr[-5:] == ["scd", "run", str(cfg), "--run-dir", str(rd)]
    ds = G.build_command(G.command_template("deepspeed", None, slot), config=cfg, run_dir=rd, slot=slot, nproc=2)
    assert "--include" in ds and ds[ds.index("--include") + 1] == "localhost:2,3"
    assert ds[ds.index("--master_port") + 1].isdigit() and ds[ds.index("--module") + 1] == "scd"
    local = G.build_command(G.command_template("local", None, G.Slot(0)), config=cfg, run_dir=rd, slot=G.Slot(0),
                            nproc=1)
    assert local == [sys.executable, "-m", "scd", "run", str(cfg), "--run-dir", str(rd)]
    env = G.child_env(slot, 2, G.PlannedRun("abc", 0, 0, "kd", 0, {}, {}, "fake", {}, ""), "g", base={})
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["SCD_RUN_ID"] == "abc"


def test_gpus_listed_by_the_driver_without_cuda(tmp_path, monkeypatch):
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\n[ \"$1\" = --query-gpu=index ] && [ \"$2\" = --format=csv,noheader ] || exit 9\n"
                   "printf '0\\n1\\n2\\n'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}:{os.environ['PATH']}")
    assert G.detect_gpus(env={}) == ["0", "1", "2"]
    assert G.detect_gpus(env={"CUDA_VISIBLE_DEVICES": "1"}) == ["1"]  # the environment wins
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")  # broken driver: CPU
    assert G.detect_gpus(env={}) == []
    # the parent never touches CUDA (a CUDA context in the runner would pin memory on every GPU):
    # with torch.cuda poisoned, detection still answers from the driver
    probe = ("import torch, benchmarks.grid as g\n"
             "def poisoned(*a, **k):\n    raise RuntimeError('torch.cuda touched')\n"
             "torch.cuda.device_count = torch.cuda.is_available = torch.cuda.init = poisoned\n"
             "print(g.detect_gpus())")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=sub_env(PATH=os.environ["PATH"]),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_fake_gpu_slots_are_exclusive_and_kept_busy(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_COUNT_DIR", str(tmp_path / "count"))
    path = make_grid(tmp_path, sleep=0.1, seeds=[0, 1, 2], gpus_per_run=2)
    assert grid_main(path, tmp_path / "res", "--fake-gpus", "4", "--no-leaderboard") == 0
    recs = [read_json(p) for p in (tmp_path / "res" / "g").glob("*/run.json")]
    assert len(recs) == 6 and all(r["status"] == "ok" for r in recs)
    spans = collections.defaultdict(list)
    for r in recs:
        a = r["artifacts"]
        spans[a["cuda_visible_devices"]].append((a["t_start"], a["t_end"]))
    assert set(spans) == {"0,1", "2,3"}  # each run saw exactly its slot's GPUs
    for dev, iv in spans.items():  # one run at a time per slot
        iv.sort()
        assert all(e1 <= s2 for (_, e1), (s2, _) in zip(iv, iv[1:])), dev
    # both slots busy at the same time (the queue never waits on one slot)
    a, b = spans["0,1"], spans["2,3"]
    assert any(s1 < e2 and s2 < e1 for s1, e1 in a for s2, e2 in b)
    assert sum(counts(tmp_path / "count").values()) == 6


# ------------------------------------------------------------------------------------ claims
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_claims_are_exclusive_and_stale_ones_reclaimed(tmp_path):
    rd = tmp_path / "g" / "run1"
    c1 = G.Claim.acquire(rd)
    assert c1 is not None and json.loads((rd / ".lock").read_text())["pid"] == os.getpid()
    assert G.Claim.acquire(rd) is None  # held by a live process
    c1.release()
    assert not (rd / ".lock").exists()
    host = socket.gethostname()
    lock = rd / ".lock"
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": host, "token": "x"}))  # dead runner, same host
    c2 = G.Claim.acquire(rd)
    assert c2 is not None and json.loads(lock.read_text())["token"] == c2.info["token"]
    c2.release()
    lock.write_text(json.dumps({"pid": os.getpid(), "host": host, "start": 1, "token": "y"}))  # pid reused
    assert G.Claim.acquire(rd) is not None
    lock.unlink()
    lock.write_text("")  # torn claim: fresh -> respected, old -> reclaimed
    assert G.Claim.acquire(rd) is None
    os.utime(lock, (time.time() - 60, time.time() - 60))
    assert G.Claim.acquire(rd) is not None
    lock.unlink()
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "z"}))  # other host: heartbeat age
    assert G.Claim.acquire(rd, stale_after_s=30) is None
    os.utime(lock, (time.time() - 60, time.time() - 60))
    assert G.Claim.acquire(rd, stale_after_s=30) is not None
    assert not list(rd.glob(".lock.stale-*"))


# ------------------------------------------------------------------------------ failures + retry
def test_failures_are_recorded_and_do_not_stop_the_grid(tmp_path, monkeypatch):
    count = tmp_path / "count"
    monkeypatch.setenv("FAKE_COUNT_DIR", str(count))
    path = make_grid(tmp_path, seeds=[0], workers=2, runs=[
        {"method": "kd"}, {"method": "exits", "fail": "exit"}, {"method": "raises", "fail": "raise"},
        {"method": "nan", "fail": "diverge"}, {"method": "scd", "quality": 0.7}])
    assert grid_main(path, tmp_path / "res") == 1  # some failed
    gdir = tmp_path / "res" / "g"
    recs = {r["method"]: r for r in (read_json(p) for p in gdir.glob("*/run.json"))}
    assert recs["kd"]["status"] == recs["scd"]["status"] == "ok"
    ex = recs["exits"]  # died without writing run.json: recorded by the runner
    assert ex["status"] == "failed" and ex["error"] == "exit code 3" and ex["exit_code"] == 3
    assert "exiting without writing run.json" in ex["log_tail"]
    assert recs["raises"]["status"] == "failed" and "boom" in recs["raises"]["error"]
    assert "about to fail on purpose" in recs["raises"]["log_tail"]  # log tail added to the child's record
    assert recs["nan"]["status"] == "diverged"
    md = (gdir / "leaderboard.md").read_text()
    assert "## Failed and incomplete runs" in md and "exit code 3" in md
    # a rerun skips finished and failed runs ...
    assert grid_main(path, tmp_path / "res", "--no-leaderboard") == 1
    assert sum(counts(count).values()) == 5
    # ... --retry-failed re-runs exactly the failed/diverged ones
    monkeypatch.setenv("FAKE_NO_FAIL", "1")
    assert grid_main(path, tmp_path / "res", "--retry-failed", "--no-leaderboard") == 0
    c = counts(count)
    assert sum(c.values()) == 8 and c[recs["kd"]["run_id"]] == 1 and c[ex["run_id"]] == 2
    retried = read_json(gdir / ex["run_id"] / "run.json")
    assert retried["status"] == "ok" and retried["error"] is None and "log_tail" not in retried
    assert all(read_json(p)["status"] == "ok" for p in gdir.glob("*/run.json"))


def test_timeout_kills_and_records(tmp_path):
    path = make_grid(tmp_path, seeds=[0], runs=[{"method": "kd"}], sleep=3.0, steps=5, timeout_s=0.5)
    assert grid_main(path, tmp_path / "res", "--no-leaderboard") == 1
    rec = next(read_json(p) for p in (tmp_path / "res" / "g").glob("*/run.json"))
    assert rec["status"] == "failed" and rec["error"].startswith("timeout: killed after")


def test_dry_run_starts_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_COUNT_DIR", str(tmp_path / "count"))
    path = make_grid(tmp_path)
    assert grid_main(path, tmp_path / "res", "--dry-run", "--fake-gpus", "2") == 0
    out = capsys.readouterr().out
    plan = G.expand_grid(G.load_grid(path), path)
    assert all(r.run_id in out for r in plan.runs)
    assert "Slots: 2 GPU" in out and "nothing started" in out
    assert not (tmp_path / "res").exists() and not (tmp_path / "count").exists()


def test_dirty_tree_warns_loudly_but_runs(tmp_path, monkeypatch, capsys):
    repo = tmp_path / "repo"
    make_repo(repo)
    monkeypatch.setattr(R, "CODE_ROOT", repo)
    path = make_grid(tmp_path, seeds=[0], runs=[{"method": "kd"}])
    assert grid_main(path, tmp_path / "clean", "--no-leaderboard") == 0
    assert "DIRTY" not in capsys.readouterr().err  # a clean tree: no banner
    make_dirty(repo)
    assert grid_main(path, tmp_path / "res", "--dry-run") == 0
    assert "DIRTY" not in capsys.readouterr().err  # nothing runs: no banner
    assert grid_main(path, tmp_path / "res", "--no-leaderboard") == 0
    err = capsys.readouterr().err
    banner = err[:err.index("[grid g ")]  # printed before the runner starts
    lines = banner.splitlines()
    assert lines[0] == lines[-1] == "!" * 88 and len(lines) == 7
    assert "the code tree is DIRTY: 2 file(s) differ from HEAD" in banner and "(scd/mod.py, scd/new.py)" in banner
    assert "code.patch" in banner and "-dirty" in banner
    assert [read_json(p)["status"] for p in (tmp_path / "res" / "g").glob("*/run.json")] == ["ok"]  # still ran


def test_slurm_script_is_written_not_submitted(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_COUNT_DIR", str(tmp_path / "count"))
    path = make_grid(tmp_path, slurm={"partition": "gpu", "gpus_per_node": 8, "setup": ["source .venv/bin/activate"]})
    assert grid_main(path, tmp_path / "res", "--slurm", "--shards", "3") == 0
    script = tmp_path / "res" / "g" / "slurm" / "array.sh"
    text = script.read_text()
    assert "#SBATCH --array=0-2" in text and "#SBATCH --partition=gpu" in text
    assert "#SBATCH --gpus-per-node=8" in text and "source .venv/bin/activate" in text
    assert '--shard ${SLURM_ARRAY_TASK_ID}/3' in text and "--import tests.fake_recipe" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert (tmp_path / "res" / "g" / "plan.json").exists()
    assert not list((tmp_path / "res" / "g").glob("*/run.json")) and not (tmp_path / "count").exists()


# --------------------------------------------------------------------- concurrency + kill -9
@pytest.mark.parametrize("mode", ["shards", "workers"])
def test_concurrent_runners_execute_every_run_exactly_once(tmp_path, mode):
    count = tmp_path / "count"
    path = make_grid(tmp_path, sleep=0.05, seeds=[0, 1, 2, 3])
    res = tmp_path / "res"
    args = [["--shard", "0/2"], ["--shard", "1/2"]] if mode == "shards" else [["--workers", "2"]] * 2
    procs = [subprocess.Popen(runner_cmd(path, res, "--no-leaderboard", *a), cwd=REPO,
                              env=sub_env(FAKE_COUNT_DIR=str(count)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for a in args]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    plan = G.expand_grid(G.load_grid(path), path)
    c = counts(count)
    assert set(c) == {r.run_id for r in plan.runs} and set(c.values()) == {1}, (c, outs)
    assert all(read_json(res / "g" / r.run_id / "run.json")["status"] == "ok" for r in plan.runs)
    assert not list((res / "g").glob("*/.lock"))


def test_kill9_mid_grid_then_restart_gives_the_same_leaderboard(tmp_path, monkeypatch):
    path = make_grid(tmp_path, sleep=0.12, steps=4, seeds=[0, 1, 2], workers=2)
    # reference: uninterrupted
    monkeypatch.setenv("FAKE_COUNT_DIR", str(tmp_path / "count_ref"))
    assert grid_main(path, tmp_path / "ref") == 0
    # interrupted: kill -9 the runner while runs are in flight
    count = tmp_path / "count"
    res = tmp_path / "res"
    proc = subprocess.Popen(runner_cmd(path, res), cwd=REPO, env=sub_env(FAKE_COUNT_DIR=str(count)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    running = []
    while time.time() < deadline:
        done = sum(counts(count, "done").values())
        running = [p for p in res.glob("g/*/run.json") if G.run_status(p.parent) == "running"
                   and 1 <= len(read_metrics(p.parent / "metrics.jsonl")) <= 2]  # mid-run, >= 0.2 s left
        if done >= 2 and running:
            break
        time.sleep(0.02)
    assert running, "never saw a run in flight"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    pids = [int((p.parent / "fake.pid").read_text()) for p in running]
    t = time.time()
    while any(G.pid_alive(pid) for pid in pids) and time.time() - t < 5:
        time.sleep(0.05)
    assert not any(G.pid_alive(pid) for pid in pids), "children outlived the killed runner"
    assert any((p.parent / ".lock").exists() for p in running)  # stale claims left behind
    # restart: reclaims the stale claims, resumes the interrupted runs, skips finished ones
    monkeypatch.setenv("FAKE_COUNT_DIR", str(count))
    assert grid_main(path, res) == 0
    ref, out = tmp_path / "ref" / "g", res / "g"
    assert (out / "leaderboard.csv").read_text() == (ref / "leaderboard.csv").read_text()
    assert (out / "leaderboard.md").read_text() == (ref / "leaderboard.md").read_text()
    import polars as pl
    df = pl.read_parquet(out / "runs.parquet")
    assert df.height == 6 and df["run_id"].n_unique() == 6 and set(df["status"]) == {"ok"}
    assert set(counts(count, "done").values()) == {1} and len(counts(count, "done")) == 6
    starts = counts(count, "start")
    # the runs in flight at the kill died with the runner (none finished as an orphan) and ran again
    assert all(starts[p.parent.name] == 2 for p in running), (starts, [p.parent.name for p in running])
    assert max(starts.values()) == 2
    for p in out.glob("*/metrics.jsonl"):  # resumed runs have no duplicate rows
        assert [r["step"] for r in read_metrics(p)] == [1, 2, 3, 4]


def test_sigterm_stops_children_and_releases_claims(tmp_path):
    path = make_grid(tmp_path, sleep=0.2, steps=10, seeds=[0], workers=2)
    res = tmp_path / "res"
    proc = subprocess.Popen(runner_cmd(path, res, "--no-leaderboard"), cwd=REPO, env=sub_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while time.time() < deadline and len(list(res.glob("g/*/fake.pid"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=30)[1]
    assert proc.returncode == 130 and "interrupted" in err
    pids = [int(p.read_text()) for p in res.glob("g/*/fake.pid")]
    assert len(pids) == 2 and not any(G.pid_alive(p) for p in pids)
    assert not list(res.glob("g/*/.lock"))  # claims released: a restart needs no stale-lock wait
    assert {G.run_status(p.parent) for p in res.glob("g/*/run.json")} == {"running"}  # resumable, not failed


def test_committed_grid_results_keep_their_run_ids():
    """Every committed results/<grid>/plan.json re-plans to the same run ids from its grid config: a
    config field added later (scd.core.config.added_field) must not turn finished runs into new ones."""
    import json

    from benchmarks.grid import expand_grid, load_grid

    root = Path(__file__).resolve().parents[1]
    plans = sorted((root / "results").glob("*/plan.json"))
    assert plans
    for p in plans:
        plan = json.loads(p.read_text())
        src = root / plan["source"]
        got = [r.run_id for r in expand_grid(load_grid(src), src).runs]
        assert got == [r["run_id"] for r in plan["runs"]], f"{p}: run ids changed (a new config field?)"
