"""Recipe: supervised fine-tuning on the task mixture (students, baselines, demo).

    python -m scd run configs/scd/sft_student.yaml --run-dir results/manual/sft

Reads top to bottom: build model -> training examples -> resume -> train loop
(gradient accumulation, loss normalised by the target tokens of the whole
accumulated batch) -> save model -> evaluate -> run.json.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from benchmarks.evaluate import EvalSpec
from scd.core.config import register_recipe
from scd.core.faults import fault_point
from scd.core.train import (Checkpointer, TrainConfig, autocast, batch_indices, check_finite, collate,
                            finish_run, make_optimizer, peak_memory, resolve_device, seed_everything,
                            start_run, tokenize_sft)
from scd.data_config import DataConfig, load_training_pairs
from scd.models import ModelConfig, build_model, save_model


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    recipe: str = "sft"
    method: str = "sft"
    grid: str | None = None
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalSpec = EvalSpec()
    save_model: bool = True


def sft_loss_sum(model, batch):
    """Sum over target tokens of the next-token cross-entropy, and the token count.

    batch: input_ids/attention_mask/labels [B, T]; returns (scalar sum, int count).
    """
    import torch.nn.functional as F

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1].float()  # [B, T-1, V]
    labels = batch["labels"][:, 1:]  # [B, T-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


def train_sft(model, tokenizer, pairs, cfg: TrainConfig, *, seed: int, run_dir: Path, metrics,
              device, on_save=None, save_steps: set[int] | None = None) -> dict:
    """The SFT loop (shared by the teacher recipe).  Returns train stats.

    ``save_steps``: extra optimiser steps after which ``on_save(step)`` is called
    (teacher checkpoint schedule).  Resumes from ``run_dir/ckpt/last``.
    """
    import torch

    encoded = [tokenize_sft(tokenizer, p, t, cfg.max_len) for p, t in pairs]
    model.to(device).train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    opt, sched = make_optimizer(model, cfg)
    ckpt = Checkpointer(run_dir)
    start_step, tokens = 0, 0
    if ckpt.exists():
        start_step, extra = ckpt.load(model, opt, sched)
        tokens = int(extra.get("tokens", 0))
        metrics.drop_after(start_step)
        print(f"[sft] resumed at step {start_step}/{cfg.max_steps}", flush=True)
    else:
        metrics.drop_after(0)  # killed before the first checkpoint: forget rows logged then
    t0 = time.time()
    from tqdm.auto import tqdm

    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="sft",
               mininterval=5, disable=None)
    for step in bar:
        micro_batches = [collate([encoded[i] for i in batch_indices(len(encoded), cfg.batch_size, step, m,
                                                                     cfg.grad_accum, seed)],
                                 tokenizer.pad_token_id) for m in range(cfg.grad_accum)]
        n_tok = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches)
        total = 0.0
        for mb in micro_batches:
            mb = {k: v.to(device) for k, v in mb.items()}
            with autocast(cfg, device):
                loss_sum, _ = sft_loss_sum(model, mb)
            loss = loss_sum / max(n_tok, 1)  # normalised by the whole accumulated batch
            loss.backward()
            total += float(loss.detach())
        check_finite(total, step + 1, "ce")
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += n_tok
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            metrics.log({"step": done, "loss": total, "ce": total, "lr": sched.get_last_lr()[0],
                         "grad_norm": float(gnorm), "tokens": tokens})
            bar.set_postfix(loss=f"{total:.3f}")
        if save_steps and done in save_steps and on_save is not None:
            on_save(done)
        if (cfg.save_every and done % cfg.save_every == 0) and done < cfg.max_steps:
            ckpt.save(model, opt, sched, done, {"tokens": tokens})
        fault_point("step")
    bar.close()
    return {"tokens": tokens, "steps": cfg.max_steps, "wall_s": round(time.time() - t0, 2),
            "peak_mem": peak_memory(device)}


def run(cfg: SFTConfig, run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    rd = start_run(cfg, run_dir, recipe="sft", hparams={"lr": cfg.train.lr, "max_steps": cfg.train.max_steps})
    seed_everything(cfg.seed)
    device = resolve_device(cfg.train.device)
    if cfg.train.num_threads:
        import torch

        torch.set_num_threads(cfg.train.num_threads)
    model, tok = build_model(cfg.model, seed=cfg.seed)
    pairs = load_training_pairs(cfg.data, tok)
    stats = train_sft(model, tok, pairs, cfg.train, seed=cfg.seed, run_dir=run_dir, metrics=rd.metrics(),
                      device=device)
    artifacts = {}
    if cfg.save_model:
        artifacts["model"] = str(save_model(model, tok, run_dir / "model"))
    evaluation = cfg.eval.run(model, tok, run_dir)
    Checkpointer(run_dir).clear()
    return finish_run(rd, train=stats, artifacts=artifacts, **evaluation)


register_recipe("sft", SFTConfig, run)
