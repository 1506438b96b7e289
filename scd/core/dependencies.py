"""Runs a recipe depends on, named by a config and trained on demand.

A distillation config names its teacher and AW anchor (``teacher.config``,
``weighting.anchor_config``), and any recipe's ``model.student.config`` names a pruned,
healed student (``recipe: student``).  :func:`ensure_dependency` gives the run directory
``python -m scd run CONFIG seed=N`` uses, reusing a finished run and otherwise training it
here, once, under a file lock.  :func:`build_record` says which build of a dependency a run
used (run.json ``dependencies``).  Core layer: it calls the registered recipe by name
(``scd.core.config.RECIPES``) and imports no recipe.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from scd.core.config import RECIPES, load_config
from scd.core.locks import file_lock
from scd.core.results import RunDir, default_run_dir, read_json, safe_join

ROOT = Path(__file__).resolve().parents[2]  # the repository root (relative dependency configs)


@contextlib.contextmanager
def _single_process():
    """A dependency run trains on rank 0 alone: the launcher's WORLD_SIZE / RANK are hidden from it."""
    saved = {k: os.environ.pop(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def dependency_config_path(config_path: str) -> Path:
    """A dependency config path: as given when it exists (or is absolute), else relative to the repository."""
    path = Path(config_path)
    if not path.is_absolute() and not path.exists():
        path = ROOT / config_path
    return path


def ensure_dependency(config_path: str, seed: int, results_dir: str, what: str, rank: int = 0,
                      recipe: str | None = None) -> Path:
    """Run directory of the ``config_path`` run with ``seed``; trained here if not finished.
    ``recipe``: the recipe the config must name (ValueError otherwise).

    The path is the one ``python -m scd run CONFIG seed=N`` uses
    (``<results_dir>/<grid or runs>/<method>-<run_id>``), so a run made by hand is
    reused.  A file lock (released even on SIGKILL) makes concurrent grid workers
    train it once; ranks > 0 of a distributed run wait for rank 0.
    """
    cfg = load_config(dependency_config_path(config_path), [f"seed={seed}"])
    if recipe is not None and cfg.recipe != recipe:
        raise ValueError(f"{config_path}: a `recipe: {recipe}` config is needed as the {what}, got recipe "
                         f"'{cfg.recipe}'")
    run_dir = safe_join(results_dir, *default_run_dir(cfg, ".").parts)
    rd = RunDir(run_dir)
    if rd.is_finished():
        return run_dir
    if rank != 0:
        while not rd.is_finished():
            if rd.status() in ("failed", "diverged"):
                raise RuntimeError(f"{what} run {run_dir} {rd.status()} (see its run.json)")
            time.sleep(5)
        return run_dir
    with file_lock(run_dir.parent / f".{run_dir.name}.lock"):
        if not rd.is_finished():
            print(f"[dependency] {what} run missing: training it -> {run_dir}", flush=True)
            try:
                with _single_process():
                    RECIPES.get(cfg.recipe).run(cfg, run_dir)
            except Exception as e:
                rd.fail(e)
                raise RuntimeError(f"{what} run {run_dir} ({config_path}) failed: {type(e).__name__}: {e}") from e
    return run_dir


def build_record(path: str | os.PathLike, **extra) -> dict:
    """Which build of a dependency a run used, for its run.json ``dependencies.<role>``.

    ``path``: the dependency's run directory, or a model folder inside one (``<run>/model``), or a plain model
    folder.  Returns {"path", "run": run directory name, "finished", "git_sha" (from its run.json; absent for a
    plain folder)} + ``extra`` (the recipes add the weights' digest, ``weights_sha256``, or the teacher's
    ``checkpoints_sha256``).  Dependency runs live on the machine that trained them (``results/runs/`` is not
    committed), so a grid resumed on a new machine retrains them under the same name: a new build, equal to the
    first only up to float rounding across CPUs.  This record is how a study tells its runs' builds apart.
    """
    path = Path(path)
    run_dir = next((d for d in (path, path.parent) if (d / "run.json").is_file()), None)
    out: dict = {"path": str(path)}
    if run_dir is not None:
        rec = read_json(run_dir / "run.json")
        out.update(run=run_dir.name, finished=rec.get("finished"), git_sha=rec.get("git_sha"))
    return {**out, **extra}
