"""Evaluate a run directory or a model into run.json; the ``evaluate`` recipe entry (``scd run``).

run.json is written through :class:`scd.core.results.RunDir` only: an evaluation of a run directory
merges its sections into that run's record; an evaluation of a model gets a record of its own
(begin -> finish, or fail).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.evaluate.config import EvalConfig
from benchmarks.evaluate.model_eval import evaluate_model
from benchmarks.evaluate.model_io import load_model, run_model_path, slug
from scd.core.config import ConfigError, register_recipe, to_dict
from scd.core.results import RunDir, config_hash, new_run_record
from scd.core.train import resolve_device
from scd.models import resolve

DEFAULT_ROOT = Path("results") / "eval"


def merge_into_run(run_json: Path, result: dict) -> dict:
    """Merge eval/metric_meta/eval_info/cka into an existing run.json, atomically."""
    return RunDir(Path(run_json).parent).merge({k: result[k] for k in ("eval", "metric_meta", "eval_info", "cka")
                                                if k in result})


def _fresh_record(cfg: EvalConfig, target: str, model_path: str) -> dict:
    rec = new_run_record(run_id=config_hash({"model": target}), grid=None, method=slug(target), seed=cfg.seed,
                         recipe="evaluate", config={**to_dict(cfg), "model": target})
    rec["artifacts"] = {"model": model_path}
    return rec


def evaluate(cfg: EvalConfig, target: str | None = None, run_dir: str | Path | None = None) -> Path:
    """Evaluate ``target`` (run dir or model; default ``cfg.model``).  Returns the run dir written."""
    target = target or cfg.model
    if not target:
        raise ConfigError("nothing to evaluate: pass RUN_DIR_OR_MODEL (or set `model:` in the config)")
    if not cfg.tasks and not cfg.lm_eval_tasks and cfg.cka.reference is None:
        raise ConfigError("no tasks: pass --tasks (or set `tasks:` / `lm_eval_tasks:` in the config)")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = str(resolve_device(cfg.device or "auto"))  # recorded in eval_info
    tpath = Path(target).expanduser()
    if RunDir(tpath).exists():
        if cfg.out or run_dir:
            out = Path(run_dir or cfg.out)
            if out.resolve() != tpath.resolve():
                raise ConfigError(f"{target} is a run directory: its results go into {tpath}/run.json; "
                                  "drop --out")
        out = tpath
        model_path = str(run_model_path(tpath))
        fresh = None
    else:
        model_path = resolve(target)
        out = Path(run_dir or cfg.out or DEFAULT_ROOT / f"{slug(target)}-{config_hash({'model': target}, 8)}")
        fresh = None if RunDir(out).exists() else _fresh_record(cfg, target, model_path)
    model, tok = load_model(model_path, cfg.dtype, device)
    out.mkdir(parents=True, exist_ok=True)
    rd = RunDir(out)
    if fresh is not None:
        rd.begin(fresh)
    t0 = time.time()
    try:
        result = evaluate_model(model, tok, tasks=cfg.tasks, split=cfg.split, limit=cfg.limit, shots=cfg.shots,
                                shot_seed=cfg.shot_seed, batch_size=cfg.batch_size, scoring=cfg.scoring,
                                max_new_tokens=cfg.max_new_tokens, lm_eval_tasks=cfg.lm_eval_tasks,
                                lm_eval_limit=cfg.lm_eval_limit, out_dir=out, n_boot=cfg.n_boot, seed=cfg.seed,
                                progress=cfg.progress, cka=cfg.cka, prompts=cfg.prompts)
    except BaseException as e:
        if fresh is not None:  # our own run.json: record the failure (a trained run's status is left alone)
            rd.fail(e)
        raise
    for info in result["eval_info"].values():
        info.setdefault("device", device)
        info.setdefault("threads", torch.get_num_threads() if device == "cpu" else None)
    rec = merge_into_run(rd.run_json, result)
    if fresh is not None:
        rd.finish(eval_wall_s=round(time.time() - t0, 2), train=rec.get("train") or {})
    return out


def run(cfg: EvalConfig, run_dir: Path) -> dict:
    """Recipe entry (``python -m scd run configs/eval/x.yaml``): evaluate ``cfg.model``
    into ``run_dir``, or the run at ``run_dir`` itself when ``cfg.model`` is unset."""
    run_dir = Path(run_dir)
    if cfg.model is None:
        out = evaluate(cfg, str(run_dir))
    else:
        out = evaluate(cfg, cfg.model, run_dir=run_dir)
    return RunDir(out).read()


register_recipe("evaluate", EvalConfig, run)
