"""A tiny, pure-Python recipe for the grid/leaderboard tests (no torch).

    python -m tests.fake_recipe CONFIG.yaml --run-dir DIR

Behaves like ``python -m scd run`` with a real recipe: writes run.json (status
running, then ok), metrics.jsonl and a checkpoint per step under ``ckpt/``, resumes
from the checkpoint (dropping metrics logged after it), and records an exception as
status failed/diverged with the error and log tail.  Its eval numbers are a
deterministic function of (quality, task, seed), so two runs of the same grid give the
same leaderboard.

Test hooks (environment):
  FAKE_COUNT_DIR   each start / completion touches ``<dir>/<run_id>.<pid>.<rand>.start|done``
  FAKE_NO_FAIL=1   ignore ``fail:`` (to test --retry-failed)
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import time
import traceback
import uuid
from pathlib import Path

from scd.core.config import from_dict, load_yaml, register_recipe, to_dict
from scd.core.results import (SCHEMA_VERSION, DivergedError, MetricsWriter, RunDir, atomic_write_json,
                              config_hash, read_json)

TASKS = {"qa": {"metric": "f1", "chance": 0.0, "offset": 0.0},
         "cls": {"metric": "acc", "chance": 0.5, "offset": 0.3}}


@dataclasses.dataclass(frozen=True)
class FakeTrain:
    lr: float = 1e-3
    steps: int = 3
    sleep_s: float = 0.0  # per step


@dataclasses.dataclass(frozen=True)
class FakeEval:
    tasks: tuple[str, ...] = ("qa", "cls")
    limit: int = 100


@dataclasses.dataclass(frozen=True)
class FakeConfig:
    recipe: str = "fake"
    method: str = "fake"
    grid: str | None = None
    seed: int = 0
    quality: float = 0.5  # the method's "true" score
    train: FakeTrain = FakeTrain()
    eval: FakeEval = FakeEval()
    components: dict[str, bool] = dataclasses.field(default_factory=dict)
    fail: str = "none"  # none | raise | exit | diverge
    cka: bool = False  # write cka.mean_matched and a small cka.matrix


def fake_score(quality: float, task: str, seed: int, lr: float) -> float:
    """Deterministic 'eval' value in [0, 1]: quality + task offset + seed noise + lr effect."""
    h = int(hashlib.sha256(f"{task}:{seed}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF  # [0, 1]
    v = quality * (1 - TASKS[task]["offset"]) + TASKS[task]["offset"] + (h - 0.5) * 0.06 + (lr - 1e-3) * 10
    return round(min(1.0, max(0.0, v)), 6)


def run(cfg: FakeConfig, run_dir: Path) -> None:
    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    resolved = to_dict(cfg)
    run_id = config_hash({k: v for k, v in resolved.items() if k != "grid"})
    count_dir = os.environ.get("FAKE_COUNT_DIR")
    tag = f"{run_id}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
    if count_dir:
        Path(count_dir).mkdir(parents=True, exist_ok=True)
        (Path(count_dir) / f"{tag}.start").write_text(os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    t0 = time.time()
    rec = {"schema_version": SCHEMA_VERSION, "run_id": run_id, "grid": cfg.grid, "recipe": "fake",
           "method": cfg.method, "seed": cfg.seed, "git_sha": None, "status": "running", "error": None,
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "finished": None, "env": {"host": "fake"},
           "components": dict(cfg.components), "hparams": {"lr": cfg.train.lr}, "config": resolved,
           "train": {}, "eval": {}, "cka": {}, "metric_meta": {}, "artifacts": {}}
    if rd.exists():  # like scd.core.train.start_run: update the existing record in place
        old = rd.read()
        old.update(status="running", error=None)
        rec = old
    rd.write(rec)
    print(f"[fake] run {run_id} pid {os.getpid()} CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}",
          flush=True)
    (run_dir / "fake.pid").write_text(str(os.getpid()))
    metrics = MetricsWriter(run_dir / "metrics.jsonl")
    state_path = run_dir / "ckpt" / "state.json"
    step = int(read_json(state_path)["step"]) if state_path.exists() else 0
    metrics.drop_after(step)  # also when no checkpoint exists yet: rows logged before a kill go
    if step:
        print(f"[fake] resumed at step {step}", flush=True)
    fail = "none" if os.environ.get("FAKE_NO_FAIL") == "1" else cfg.fail
    while step < cfg.train.steps:
        time.sleep(cfg.train.sleep_s)
        step += 1
        loss = 1.0 / step
        if fail == "diverge" and step == 2:
            raise DivergedError(step=step, term="kd", value=float("nan"))
        if fail == "raise" and step == 2:
            print("[fake] about to fail on purpose", flush=True)
            raise RuntimeError("boom: the fake recipe was told to fail")
        if fail == "exit" and step == 2:
            print("[fake] exiting without writing run.json", flush=True)
            os._exit(3)
        metrics.log({"step": step, "loss": loss})
        atomic_write_json(state_path, {"step": step})
    lr = cfg.train.lr
    ev, meta = {}, {}
    for task in cfg.eval.tasks:
        m = TASKS[task]["metric"]
        v = fake_score(cfg.quality, task, cfg.seed, lr)
        ev[task] = {m: {"value": v, "n": cfg.eval.limit, "ci": [round(v - 0.05, 6), round(v + 0.05, 6)]},
                    "invalid_rate": {"value": 0.0, "n": cfg.eval.limit, "ci": [0.0, 0.0]}}
        meta[f"{task}/{m}"] = {"higher_is_better": True, "chance": TASKS[task]["chance"], "primary": True}
        meta[f"{task}/invalid_rate"] = {"higher_is_better": False, "chance": 0.0, "primary": False}
    rec = rd.read()
    rec.update(status="ok", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), eval=ev, metric_meta=meta,
               train={"tokens": 100 * cfg.train.steps, "wall_s": round(time.time() - t0, 3), "peak_mem": None},
               artifacts={"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                          "t_start": t0, "t_end": time.time()})
    if cfg.cka:
        mm = round(0.4 + 0.5 * cfg.quality + 0.01 * cfg.seed, 6)
        rec["cka"] = {"mean_matched": mm,
                      "matrix": [[round(mm if i == j else mm * 0.5 / (1 + abs(i - j)), 4) for j in range(4)]
                                 for i in range(4)]}
    rd.write(rec)
    if count_dir:
        (Path(count_dir) / f"{tag}.done").write_text("")


register_recipe("fake", FakeConfig, run)


def main(argv: list[str] | None = None) -> int:
    """Mimics ``scd run CONFIG --run-dir DIR`` (skip finished runs, record exceptions)."""
    argv = sys.argv[1:] if argv is None else argv
    config, run_dir = argv[0], Path(argv[argv.index("--run-dir") + 1])
    data, source = load_yaml(config)
    cfg = from_dict(FakeConfig, data, source)
    rd = RunDir(run_dir)
    if rd.is_finished():
        return 0
    try:
        run(cfg, run_dir)
    except Exception as e:  # noqa: BLE001
        rec = rd.read()
        rec["status"] = "diverged" if isinstance(e, DivergedError) else "failed"
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["traceback_tail"] = traceback.format_exc()[-2000:]
        rd.write(rec)
        print(f"error: {rec['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
