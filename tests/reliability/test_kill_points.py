"""SIGKILL at seeded random fault points, then resume: the result equals an uninterrupted run.

Every fault point a recipe reaches (``fault_point(...)`` in scd/ and benchmarks/, armed by
``SCD_FAULT=<point>:<n>``, see scd/core/faults.py) is counted once in an uninterrupted
reference run (a subprocess whose ``fault_point`` is replaced by a counter), so the
randomized choices ``(point, n)`` are always reachable.  For each choice the same config
is run in a fresh directory with the fault armed (the process dies with SIGKILL), the
partial state is checked (every file under its final name parses: no half-written
run.json / manifest / safetensors / metrics row is ever visible), then the run is started
again without the fault and its artifacts are compared with the reference:

* model / teacher-checkpoint safetensors: every tensor bit-identical,
* metrics.jsonl: equal row for row ignoring wall-clock fields (no duplicate, no lost row),
* teacher manifest: same steps, sha256, dev losses and best checkpoint,
* run.json: status ok, same run_id / config / train stats (timings aside) / eval.

The distill config trains its teacher on demand in the same process, so its kill points
also fall inside the teacher's training.  Default suite: 3 kill points over SFT (one
shared reference).  ``-m slow``: >= 20 points over SFT, teacher and distill.
Also: a kill inside the leaderboard write (grid with the fake recipe), then a rebuild.
"""
from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import pytest

from tests.reliability._helpers import (assert_complete_files, assert_tensors_equal, leftover_temps, metric_rows,
                                        run_cli, run_recipe, strip, write_configs)

COUNTER = """\
import atexit, collections, json, sys
import scd.core.faults as F
counts = collections.Counter()
def counting_fault_point(point):
    counts[point] += 1
F.fault_point = counting_fault_point  # before the recipes import it by name
atexit.register(lambda: open(sys.argv[1], "w").write(json.dumps(counts)))
from scd.cli import main
raise SystemExit(main(sys.argv[2:]))
"""

RUN_KEYS = ("run_id", "recipe", "method", "seed", "config", "hparams", "components", "eval", "metric_meta")


class Reference:
    def __init__(self, recipe: str, cfg: Path, cwd: Path, counts: dict[str, int]):
        self.recipe, self.cfg, self.cwd, self.counts = recipe, cfg, cwd, counts

    @property
    def run_dir(self) -> Path:
        return self.cwd / "run"


def make_reference(tmp: Path, recipe: str) -> Reference:
    cfgs = write_configs(tmp / "configs")
    cwd = tmp / f"ref-{recipe}"
    cwd.mkdir()
    (tmp / "counter.py").write_text(COUNTER)
    p = run_cli_script(tmp / "counter.py", [cwd / "counts.json", "run", cfgs[recipe], "--run-dir", cwd / "run"], cwd)
    assert p.returncode == 0, p.stderr[-3000:]
    counts = json.loads((cwd / "counts.json").read_text())
    return Reference(recipe, cfgs[recipe], cwd, counts)


def run_cli_script(script: Path, args: list, cwd: Path):
    import subprocess

    from tests.reliability._helpers import sub_env

    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, env=sub_env(),
                          capture_output=True, text=True, timeout=600)


def teacher_dirs(cwd: Path, recipe: str) -> list[Path]:
    """The teacher run directories of a reference/killed cwd (relative names, comparable)."""
    if recipe == "teacher":
        return [cwd / "run"]
    if recipe == "distill":
        return sorted((cwd / "results" / "runs").glob("teacher-rel-*"))
    return []


def compare_runs(ref: Path, got: Path, *, teacher: bool = False) -> None:
    a, b = json.loads((ref / "run.json").read_text()), json.loads((got / "run.json").read_text())
    assert b["status"] == "ok", b.get("error")
    for k in RUN_KEYS:
        assert strip(a.get(k)) == strip(b.get(k)), f"run.json key {k} differs"
    assert strip(a["train"]) == strip(b["train"])
    assert metric_rows(ref / "metrics.jsonl") == metric_rows(got / "metrics.jsonl")
    if teacher:
        ma = json.loads((ref / "checkpoints" / "manifest.json").read_text())
        mb = json.loads((got / "checkpoints" / "manifest.json").read_text())
        keep = ("index", "step", "epoch", "path", "sha256", "dev_loss", "dev_score", "files")
        assert [{k: c[k] for k in keep} for c in ma["checkpoints"]] == \
            [{k: c[k] for k in keep} for c in mb["checkpoints"]]
        assert ma["best_index"] == mb["best_index"]
        for c in mb["checkpoints"]:
            assert_tensors_equal(ref / "checkpoints" / c["path"] / "model.safetensors",
                                 got / "checkpoints" / c["path"] / "model.safetensors")
    else:
        assert_tensors_equal(ref / "model" / "model.safetensors", got / "model" / "model.safetensors")
    assert not (got / "ckpt" / "last").exists(), "resumable state not cleared after success"


def kill_and_resume(ref: Reference, point: str, n: int, where: Path) -> str:
    """Run ``ref``'s config killed at ``point:n`` in ``where``, check, resume, compare."""
    where.mkdir(parents=True)
    run_dir = where / "run"
    p = run_recipe(ref.cfg, run_dir, where, fault=f"{point}:{n}")
    assert p.returncode == -9, f"{point}:{n} was counted in the reference but not reached: {p.stderr[-2000:]}"
    # the partial state: nothing half-written under a final name; run.json never says ok
    assert_complete_files(where)
    for d in [run_dir, *teacher_dirs(where, ref.recipe)]:
        if (d / "run.json").exists():
            assert json.loads((d / "run.json").read_text())["status"] in ("running", "ok")
    if (run_dir / "run.json").exists():
        assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    p = run_recipe(ref.cfg, run_dir, where)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_complete_files(where)
    compare_runs(ref.run_dir, run_dir, teacher=ref.recipe == "teacher")
    for t_ref, t_got in zip(teacher_dirs(ref.cwd, ref.recipe), teacher_dirs(where, ref.recipe)):
        assert t_ref.name == t_got.name
        if ref.recipe == "distill":
            compare_runs(t_ref, t_got, teacher=True)
    return ", ".join(leftover_temps(where)) or "-"


def choose(rng: random.Random, ref: Reference, points: tuple[str, ...]) -> tuple[str, int]:
    reachable = [pt for pt in points if ref.counts.get(pt, 0) > 0]
    point = rng.choice(reachable)
    return point, rng.randint(1, ref.counts[point])


# ----------------------------------------------------------------------- default suite
@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory) -> Reference:
    return make_reference(tmp_path_factory.mktemp("kill"), "sft")


def test_reference_counts_every_training_point(sft_reference):
    c = sft_reference.counts
    assert c["step"] == 6 and c["ckpt_write"] == 2  # save_every 2 over 6 steps: ckpts at 2 and 4
    assert c["run_json"] >= 2 and "leaderboard" not in c


@pytest.mark.parametrize("i", range(3))
def test_sigkill_at_random_point_then_resume_equals_uninterrupted(sft_reference, tmp_path, i):
    rng = random.Random(1000)
    point = rng.sample(("step", "ckpt_write", "run_json", "atomic_write"), 3)[i]  # 3 distinct points
    n = random.Random(1000 + i).randint(1, sft_reference.counts[point])
    print(f"kill point {i}: sft {point}:{n}")
    left = kill_and_resume(sft_reference, point, n, tmp_path / "k")
    print(f"  temp files left: {left}")


# ---------------------------------------------------------------------------- slow suite
SLOW_POINTS = {"sft": ("step", "ckpt_write", "run_json", "atomic_write"),
               "teacher": ("step", "ckpt_write", "run_json", "teacher_ckpt", "atomic_write"),
               "distill": ("step", "ckpt_write", "run_json", "teacher_ckpt", "stage", "atomic_write")}


@pytest.mark.slow
def test_twenty_four_seeded_random_kill_points(tmp_path):
    rng = random.Random(20240609)
    refs = {r: make_reference(tmp_path / f"ref-{r}", r) for r in SLOW_POINTS}
    for r, ref in refs.items():
        print(f"reference {r}: reachable fault points {dict(sorted(ref.counts.items()))}")
    plan = [(r, *choose(rng, refs[r], SLOW_POINTS[r])) for r in ("sft", "teacher", "distill") for _ in range(8)]
    print("kill plan (seed 20240609): " + "; ".join(f"{r} {pt}:{n}" for r, pt, n in plan))
    for i, (r, point, n) in enumerate(plan):
        left = kill_and_resume(refs[r], point, n, tmp_path / f"k{i:02d}")
        print(f"  ok {i:2d}: {r:8s} {point}:{n}  (temp files left: {left})")
        shutil.rmtree(tmp_path / f"k{i:02d}")
    assert len(plan) >= 20


@pytest.mark.slow
def test_two_kills_in_a_row_then_resume(tmp_path):
    """A resumed run killed again (at a later step) still ends like the uninterrupted one."""
    ref = make_reference(tmp_path / "ref", "distill")
    where = tmp_path / "k"
    where.mkdir()
    for fault in ("step:4", "step:5", "stage:2"):  # teacher step 4; then the resumed teacher + distill
        p = run_recipe(ref.cfg, where / "run", where, fault=fault)
        assert p.returncode == -9, (fault, p.stderr[-2000:])
        assert_complete_files(where)
    assert run_recipe(ref.cfg, where / "run", where).returncode == 0
    compare_runs(ref.run_dir, where / "run")
    for t_ref, t_got in zip(teacher_dirs(ref.cwd, "distill"), teacher_dirs(where, "distill")):
        compare_runs(t_ref, t_got, teacher=True)


# ------------------------------------------------------------------------- temp leftovers
def test_no_checkpoint_temp_dir_left_after_resume(tmp_path, tiny_cfg):
    import torch

    from scd.core.engine import Checkpointer, make_optimizer, make_scheduler
    from scd.core.train import TrainConfig
    from scd.models import build_model

    model, _ = build_model(tiny_cfg)
    opt = make_optimizer(model, TrainConfig(max_steps=2))
    sched = make_scheduler(opt, TrainConfig(max_steps=2), 2)
    ck = Checkpointer(tmp_path)
    dead = ck.dir / ".last.tmp-999999"  # what a SIGKILL at ckpt_write leaves (pid of the dead process)
    dead.mkdir(parents=True)
    torch.save({"step": 1}, dead / "state.pt")
    ck.save(model, opt, sched, 1)  # the resumed process saves again ...
    ck.clear()  # ... and finishes
    assert not ck.dir.exists(), leftover_temps(tmp_path)


# ------------------------------------------------------------------------------ leaderboard
GRID_CMD = "{python} -m tests.fake_recipe {config} --run-dir {run_dir}"


def _grid(tmp: Path) -> Path:
    import yaml

    base = tmp / "base.yaml"
    base.write_text("recipe: fake\nmethod: kd\ntrain: {steps: 2}\n")
    grid = {"recipe": "grid", "name": "g", "base": str(base), "baseline": "kd", "seeds": [0, 1],
            "runs": [{"method": "kd"}, {"method": "scd", "quality": 0.6}]}
    path = tmp / "g.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def _grid_cli(path: Path, res: Path, cwd: Path, fault: str | None = None):
    return run_cli(["benchmarks.grid", path, "--results-dir", res, "--command", GRID_CMD,
                    "--import", "tests.fake_recipe", "--workers", "2"], cwd, fault=fault)


LB_FILES = ("leaderboard.csv", "leaderboard.md", "leaderboard.json", "runs.parquet")


def _lb_state(gdir: Path) -> dict:
    import polars as pl

    out = {f: (gdir / f).read_text() for f in ("leaderboard.csv", "leaderboard.md")}
    out["json"] = strip(json.loads((gdir / "leaderboard.json").read_text()), {"generated"})
    df = pl.read_parquet(gdir / "runs.parquet")
    assert df["run_id"].n_unique() == df.height, "duplicate rows in runs.parquet"
    out["runs"] = sorted(df["run_id"].to_list())
    return out


def test_sigkill_in_leaderboard_write_then_rebuild(tmp_path, repo):
    path = _grid(tmp_path)
    ref = _grid_cli(path, tmp_path / "ref", repo)
    assert ref.returncode == 0, ref.stderr[-2000:]
    res = tmp_path / "res"
    p = _grid_cli(path, res, repo, fault="leaderboard:1")
    assert p.returncode == -9, p.stderr[-2000:]
    gdir = res / "g"
    # killed between leaderboard.csv and leaderboard.md: what exists is complete
    assert (gdir / "leaderboard.csv").exists() and not (gdir / "leaderboard.md").exists()
    assert_complete_files(gdir)
    assert all(json.loads(r.read_text())["status"] == "ok" for r in gdir.glob("*/run.json"))
    # a rerun of the grid skips the finished runs and rebuilds the whole leaderboard
    p = _grid_cli(path, res, repo)
    assert p.returncode == 0, p.stderr[-2000:]
    assert _lb_state(gdir) == _lb_state(tmp_path / "ref" / "g")
    # so does the leaderboard command alone, killed mid-write a second time
    p = run_cli(["benchmarks.leaderboard", gdir], repo, fault="leaderboard:1")
    assert p.returncode == -9
    p = run_cli(["benchmarks.leaderboard", gdir], repo)
    assert p.returncode == 0, p.stderr[-2000:]
    assert _lb_state(gdir) == _lb_state(tmp_path / "ref" / "g")
