"""Recipe ``student``: cut the base model's layers by measured importance, heal the cut by KD.

    python -m scd run configs/student/smollm2_keep16.yaml

Reads top to bottom: base model (frozen, eval) -> fixed dev sample and the base's log-probs on it ->
cut (``cut.rule``; the greedy search is cached in ``run_dir/cut.json``, so a resumed run does not
redo it, and a run whose committed record holds its cut -- the same run id under ``results/``, e.g. the
study's dev folder -- takes it from there: hours of search on a new machine) -> student = the kept
layers, embeddings, norm and head copied -> the engine heals it (KD at every position, dev-KL early
stop, checkpoint / resume) -> best weights -> ``model/`` -> evaluation -> run.json (``student``: kept
layers, greedy trace, KL before / after, curve, steps, wall times).

Other recipes take the healed student as their model with ``model.student: {config: ...}``
(:func:`resolve_model`): the run is trained on demand, like ``teacher.config``.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from scd.core.config import register_recipe
from scd.core.dependencies import ROOT, ensure_dependency
from scd.core.engine import Engine, autocast, init_distributed
from scd.core.results import RunDir, atomic_write_json, read_json
from scd.core.train import seed_everything
from scd.models import ModelConfig, build_model, keep_layer_indices, save_model, student_from_teacher
from scd.student.config import StudentConfig
from scd.student.cut import DevKL, dev_sample, encode_texts, greedy_drop
from scd.student.heal import HealRecipe

CUT_FILE, CUT_PARTIAL = "cut.json", "cut.partial.json"
RECORDS = ROOT / "results"  # committed run records (without weights) searched for this run's finished cut


def committed_cut(run_id: str, records: Path) -> Path | None:
    """A finished ``cut.json`` committed under ``records`` by a run with this ``run_id`` (its sibling run.json
    says so), e.g. the first build of a study's student; None if there is none."""
    for path in sorted(records.glob(f"**/{CUT_FILE}")):
        rec = path.parent / "run.json"
        if rec.is_file() and read_json(rec).get("run_id") == run_id:
            return path
    return None


def choose_layers(cfg: StudentConfig, base, dev: DevKL, run_dir: Path) -> dict:
    """{"kept", "trace", "kl", "wall_s"} of the cut (``cut.rule``), from ``run_dir/cut.json`` when a
    killed attempt of this run already searched (same run dir = same config), else from the committed record of
    this run id (:func:`committed_cut`; ``"from"`` names it).  The greedy search saves each step to
    ``cut.partial.json`` and a killed search goes on from its last step."""
    path, partial = run_dir / CUT_FILE, run_dir / CUT_PARTIAL
    if path.is_file():
        return read_json(path)
    record = committed_cut(read_json(run_dir / "run.json")["run_id"], RECORDS) if not partial.is_file() else None
    if record is not None:
        print(f"[student] greedy cut of this run taken from its committed record {record}", flush=True)
        atomic_write_json(path, {**read_json(record), "from": str(record)})
        return read_json(path)
    done = read_json(partial) if partial.is_file() else {"trace": [], "wall_s": 0.0}
    t0 = time.time() - done["wall_s"]
    n = base.config.num_hidden_layers
    if cfg.cut.rule == "greedy_kl":
        save = lambda trace: atomic_write_json(partial, {"trace": trace, "wall_s": round(time.time() - t0, 2)})
        steps = tqdm(total=n - cfg.cut.keep, initial=len(done["trace"]), desc="greedy cut (layers dropped)",
                     disable=None)
        kept, trace = greedy_drop(n, cfg.cut.keep, lambda kept: dev.drop_each(base, kept), done["trace"],
                                  lambda trace: (save(trace), steps.update(1)))
        steps.close()
        kl = trace[-1]["kl"] if trace else dev(base)
    else:
        kept, trace = keep_layer_indices(cfg.cut.layers, n), []
        kl = dev.of_layers(base, kept)
    out = {"n_layers": n, "kept": kept, "dropped": [t["drop"] for t in trace], "trace": trace, "kl": kl,
           "wall_s": round(time.time() - t0, 2)}
    atomic_write_json(path, out)
    partial.unlink(missing_ok=True)
    return out


def _record(cfg: StudentConfig, cut: dict, recipe: HealRecipe, kl_end: float, stats: dict) -> dict:
    """run.json's ``student`` block."""
    first = cut["trace"][0]["candidates"] if cut["trace"] else []
    return {"base": cfg.base.name, "rule": cfg.cut.rule, "n_layers": cut["n_layers"], "kept_layers": cut["kept"],
            "dropped_in_order": cut["dropped"], "greedy_kl": [t["kl"] for t in cut["trace"]],
            "single_drop_kl": first, "kl_cut": cut["kl"], "kl_before": recipe.curve[0]["dev_kl"],
            "kl_after": kl_end, "curve": recipe.curve, "best_step": recipe.best_step,
            "stopped_early": stats["steps"] < cfg.train.max_steps, "heal_steps": stats["steps"],
            "cut_wall_s": cut["wall_s"], "cut_from": cut.get("from"), "heal_wall_s": stats["wall_s"],
            "dev_tokens": recipe.dev.n_tokens}


def run(cfg: StudentConfig, run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    dist = init_distributed(cfg.train, None)
    rd = RunDir(run_dir).start(cfg, recipe="student", hparams={
        "rule": cfg.cut.rule, "keep": cfg.cut.keep, "lr": cfg.train.lr, "max_steps": cfg.train.max_steps,
        "patience": cfg.heal.patience, "eval_every": cfg.heal.eval_every})
    seed_everything(cfg.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    base, tok = build_model(cfg.base, seed=cfg.seed)
    base = base.to(dist.device).eval().requires_grad_(False)
    encoded_dev = dev_sample(cfg.data, tok, cfg.dev.split, cfg.dev.n, cfg.train.max_len)
    dev = DevKL(base, encoded_dev, tok.pad_token_id, cfg.dev.batch_size, dist.device,
                lambda: autocast(cfg.train, dist.device))
    cut = choose_layers(cfg, base, dev, run_dir)
    student = student_from_teacher(base, cut["kept"]).requires_grad_(True)
    engine = Engine(student, cfg.train, run_dir=run_dir, metrics=rd.metrics(), dist=dist, name="student")
    recipe = HealRecipe(engine, base, encode_texts(cfg.data, tok, cfg.train.max_len), dev, tok.pad_token_id,
                        cfg.seed, cfg.heal, cfg.train.max_steps)
    stats = engine.fit(recipe, cfg.train.max_steps)
    student = engine.module
    kl_end = recipe.finish(student)
    student.eval()
    artifacts = {"model": str(save_model(student, tok, run_dir / "model"))}
    evaluation = cfg.eval.run(student, tok, run_dir)
    engine.clear_state()
    recipe.clear()
    return rd.finish(train=stats, student=_record(cfg, cut, recipe, kl_end, stats), artifacts=artifacts,
                     **evaluation)


def resolve_model(model: ModelConfig, seed: int, rank: int = 0) -> ModelConfig:
    """``model`` with ``model.student`` resolved: the student run (trained here if missing, like
    ``teacher.config``) becomes ``name: <run>/model``.  Any other model config is returned as is."""
    src = model.student
    if src is None:
        return model
    run = ensure_dependency(src.config, src.seed if src.seed is not None else seed, src.results_dir,
                            "model.student", rank, recipe="student")
    model_dir = Path(read_json(run / "run.json").get("artifacts", {}).get("model") or run / "model")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"student run {run}: no saved model at {model_dir}")
    return dataclasses.replace(model, name=str(model_dir), student=None)


register_recipe("student", StudentConfig, run)
