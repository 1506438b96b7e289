"""Baselines of the UniSD grid.

Objectives of the ``unisd`` recipe (one grid holds every method, since a grid
variant cannot change the recipe):

* ``objective: sft``  -- plain SFT on the reference answers: the ``sft`` recipe's
  :func:`scd.sft.train_sft` on an :class:`~scd.core.engine.Engine` (DeepSpeed with
  ``deepspeed:``, like every recipe).
* ``objective: sdft_rewrite``  -- SDFT of Yang et al. 2024 ("Self-Distillation Bridges
  Distribution Gap in Language Model Fine-Tuning", arXiv 2402.13669): the model at
  step 0 rewrites each reference answer in its own words given the reference
  (greedy decoding, prompt: ``rewrite.template``); a rewrite is kept only when the
  task's own scorer counts it as a correct answer (classification: the label mapping
  of benchmarks.tasks.classification, which accepts a generation naming the label;
  QA: exact match after the SQuAD-style normalisation of its first line; NER: the
  exact entity set); a rejected rewrite keeps the original answer.  Then the
  ``sft`` loop on the rewritten set.  The rewrites are saved to ``rewrites.jsonl``
  in the run directory (reused on resume).

Presets of the self-distillation objective (configs/unisd/*.yaml):

* on-policy SDFT (Shenfeld et al. 2026): ``in_context_teacher`` (demonstration in the
  teacher prompt, first 3 completion tokens masked) + ``ema_teacher`` (rate 0.02,
  every step) with forward per-token KL (``loss.alpha: 0``).
* GKD-style JSD distillation (Agarwal et al. 2024): ``in_context_teacher`` with
  ``on_policy_fraction: 0.5`` (student samples half the time, references otherwise),
  sampling temperature 1.0, generalized JSD with beta 0.5 (``loss.alpha: 0.5``).
  GKD's teacher is a separate larger model; here it is the in-context teacher, the
  only teacher of a self-distillation grid.

These presets are configurations of :class:`unisd.train.UniSDRecipe`: they have no loop
of their own.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks.tasks import scorer_for
from benchmarks.tasks.generate import greedy_generate
from scd.core.engine import Engine, barrier, init_distributed
from scd.core.results import RunDir, atomic_write_text
from scd.core.train import seed_everything
from scd.data.prompts import render_prompt, render_target
from scd.data_config import load_examples, load_shots, load_training_pairs
from scd.models import build_model, save_model
from scd.sft import train_sft
from unisd.components.base import components_table


def rewrite_matches(example: dict, output: str) -> bool:
    """Does ``output`` answer ``example`` correctly under the task's own scorer?"""
    family = example["family"]
    scorer = scorer_for(family, n_boot=1)
    preds = scorer.predictions_from_outputs([example], [output])
    row = scorer.per_example([example], preds)[0]
    if family == "classification":
        return row["correct"] == 1.0
    if family == "qa":
        return row["exact_match"] == 1.0
    if family == "ner":
        return not row["parse_failed"] and row["tp"] == row["n_pred"] == row["n_gold"]
    raise ValueError(f"sdft_rewrite: no acceptance rule for task family '{family}'")


def rewrite_prompt(example: dict, tokenizer, template: str, shots=()) -> str:
    text = template.replace("{input}", example["input"]).replace("{reference}", example["target"])
    return render_prompt({**example, "input": text}, tokenizer, shots=tuple(shots))


def make_rewrites(model, tokenizer, examples: list[dict], cfg, shots_by_task: dict | None = None) -> list[dict]:
    """[{id, original, rewrite, accepted, target}] with target = rewrite if accepted else original."""
    shots_by_task = shots_by_task or {}
    prompts = [rewrite_prompt(ex, tokenizer, cfg.template, shots_by_task.get(ex["task"], ())) for ex in examples]
    outputs = greedy_generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                              batch_size=cfg.batch_size, desc="rewrite")
    rows = []
    for ex, out in zip(examples, outputs):
        text = out.strip()
        ok = bool(text) and rewrite_matches(ex, text)
        rows.append({"id": ex.get("id"), "original": ex["target"], "rewrite": text, "accepted": ok,
                     "target": text if ok else ex["target"]})
    return rows


def _sft_pairs(cfg, tok, targets: list[str] | None = None) -> list[tuple[str, str]]:
    """(prompt, target) pairs as the sft recipe builds them, optionally with replaced targets."""
    pairs = load_training_pairs(cfg.data, tok)
    if targets is None:
        return pairs
    rows = load_examples(cfg.data)
    if len(rows) != len(pairs) or len(targets) != len(rows):
        raise RuntimeError("sdft_rewrite: rewritten targets do not align with the training pairs")
    return [(p, render_target({**ex, "target": t}, tok)) for (p, _), ex, t in zip(pairs, rows, targets)]


def rewritten_targets(cfg, model, tok, run_dir: Path, rank: int = 0) -> tuple[list[str], dict]:
    """SDFT-rewrite targets of the step-0 model, kept in ``run_dir/rewrites.jsonl`` (reused on
    resume; rank 0 writes it, every rank reads it) -> (targets, summary for run.json)."""
    path = run_dir / "rewrites.jsonl"
    examples = load_examples(cfg.data)
    if rank == 0 and not path.exists():
        rows = make_rewrites(model, tok, examples, cfg.rewrite, load_shots(cfg.data))
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    barrier()
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if [r["id"] for r in rows] != [ex.get("id") for ex in examples]:
        raise RuntimeError(f"{path} does not match the training examples; delete it to rewrite again")
    n_ok = sum(r["accepted"] for r in rows)
    if rank == 0:
        print(f"[sdft_rewrite] accepted {n_ok}/{len(rows)} rewrites", flush=True)
    summary = {"n": len(rows), "accepted": n_ok, "accept_rate": round(n_ok / max(len(rows), 1), 4)}
    return [r["target"] for r in rows], summary


def run_baseline(cfg, run_dir: Path, hparams: dict) -> dict:
    """``objective: sft`` / ``sdft_rewrite`` of the unisd recipe (see module doc); ``hparams``
    for run.json (:func:`unisd.train.hparams`)."""
    run_dir = Path(run_dir)
    dist = init_distributed(cfg.train, cfg.deepspeed)
    rd = RunDir(run_dir)
    if dist.rank == 0:
        rd.start(cfg, recipe="unisd", components=components_table({}), hparams=hparams)
    seed_everything(cfg.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    model, tok = build_model(cfg.model, seed=cfg.seed)
    model.to(dist.device)
    targets, extra = None, {}
    if cfg.objective == "sdft_rewrite":
        targets, extra["rewrite"] = rewritten_targets(cfg, model, tok, run_dir, dist.rank)
    pairs = _sft_pairs(cfg, tok, targets)
    engine = Engine(model, cfg.train, run_dir=run_dir, metrics=rd.metrics(enabled=dist.rank == 0), dist=dist,
                    deepspeed=cfg.deepspeed, name=cfg.objective)
    stats = train_sft(engine, tok, pairs, seed=cfg.seed)
    model = engine.final_module(lambda: build_model(cfg.model, seed=cfg.seed)[0])
    if dist.rank != 0:
        return {}
    stats.update(extra, world_size=dist.world)
    artifacts = {}
    if cfg.save_model:
        artifacts["model"] = str(save_model(model, tok, run_dir / "model"))
    evaluation = cfg.eval.run(model, tok, run_dir)
    engine.clear_state()
    return rd.finish(train=stats, artifacts=artifacts, **evaluation)
