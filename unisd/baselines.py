"""Baselines of the UniSD grid.

Objectives of the ``unisd`` recipe (one grid holds every method, since a grid
variant cannot change the recipe):

* ``objective: sft``  -- plain SFT on the reference answers.  Runs the training loop
  of the ``sft`` recipe (:func:`scd.sft.train_sft`) unchanged.
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
"""
from __future__ import annotations

import json
from pathlib import Path

from scd.core.results import atomic_write_text
from scd.core.train import (Checkpointer, finish_run, resolve_device, seed_everything, start_run)


def rewrite_matches(example: dict, output: str) -> bool:
    """Does ``output`` answer ``example`` correctly under the task's own scorer?"""
    from benchmarks.tasks import scorer_for

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
    from scd.data.prompts import render_prompt

    text = template.replace("{input}", example["input"]).replace("{reference}", example["target"])
    return render_prompt({**example, "input": text}, tokenizer, shots=tuple(shots))


def make_rewrites(model, tokenizer, examples: list[dict], cfg, shots_by_task: dict | None = None) -> list[dict]:
    """[{id, original, rewrite, accepted, target}] with target = rewrite if accepted else original."""
    from benchmarks.tasks.generate import greedy_generate

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
    from scd.data.prompts import render_target
    from scd.data_config import load_examples, load_training_pairs

    pairs = load_training_pairs(cfg.data, tok)
    if targets is None:
        return pairs
    rows = load_examples(cfg.data)
    if len(rows) != len(pairs) or len(targets) != len(rows):
        raise RuntimeError("sdft_rewrite: rewritten targets do not align with the training pairs")
    return [(p, render_target({**ex, "target": t}, tok)) for (p, _), ex, t in zip(pairs, rows, targets)]


def run_baseline(cfg, run_dir: Path) -> dict:
    """``objective: sft`` / ``sdft_rewrite`` of the unisd recipe (see module doc)."""
    import torch

    from scd.data_config import load_examples
    from scd.models import build_model, save_model
    from scd.sft import train_sft
    from unisd.components.base import components_table
    from unisd.train import hparams, shots_by_task

    run_dir = Path(run_dir)
    rd = start_run(cfg, run_dir, recipe="unisd", components=components_table({}), hparams=hparams(cfg))
    seed_everything(cfg.seed)
    device = resolve_device(cfg.train.device)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    model, tok = build_model(cfg.model, seed=cfg.seed)
    model.to(device)
    targets = None
    extra: dict = {}
    if cfg.objective == "sdft_rewrite":
        path = run_dir / "rewrites.jsonl"
        examples = load_examples(cfg.data)
        if path.exists():  # resume: the rewrites of the step-0 model
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            rows = make_rewrites(model, tok, examples, cfg.rewrite, shots_by_task(cfg.data))
            atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        if [r["id"] for r in rows] != [ex.get("id") for ex in examples]:
            raise RuntimeError(f"{path} does not match the training examples; delete it to rewrite again")
        targets = [r["target"] for r in rows]
        n_ok = sum(r["accepted"] for r in rows)
        extra["rewrite"] = {"n": len(rows), "accepted": n_ok, "accept_rate": round(n_ok / max(len(rows), 1), 4)}
        print(f"[sdft_rewrite] accepted {n_ok}/{len(rows)} rewrites", flush=True)
    pairs = _sft_pairs(cfg, tok, targets)
    stats = train_sft(model, tok, pairs, cfg.train, seed=cfg.seed, run_dir=run_dir, metrics=rd.metrics(),
                      device=device)
    stats.update(extra)
    artifacts = {}
    if cfg.save_model:
        artifacts["model"] = str(save_model(model, tok, run_dir / "model"))
    evaluation = cfg.eval.run(model, tok, run_dir)
    Checkpointer(run_dir).clear()
    return finish_run(rd, train=stats, artifacts=artifacts, **evaluation)
