"""Checkpoint selection before each stage, and scd_select's probe KLs.

scd_select picks ``argmin_c KL(best || c) + KL(student || c)`` with both KLs measured on
a fixed held-out probe set (``probe.*``); KL(best || c) does not change during a run and
is measured once (kept in ``kl_best``, part of the resumable state).
"""
from __future__ import annotations

import dataclasses
import time

import torch

from scd.core.train import collate, tokenize_sft
from scd.data_config import load_training_pairs
from scd.distill.config import DistillConfig
from scd.distill.teacher_slot import TeacherSlot
from scd.losses import kl_divergence
from scd.schedule import select_checkpoint


def student_logits(engine, batch):
    """The trained student's logits [B, T, V] (through the DeepSpeed engine under DeepSpeed)."""
    with engine.autocast():
        return engine.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def probe_encoded(cfg: DistillConfig, tok) -> list[dict]:
    """A fixed, seeded subset of ``probe.split`` over all data.tasks (same for every run)."""
    pairs = load_training_pairs(dataclasses.replace(cfg.data, split=cfg.probe.split, limit_per_task=None), tok)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(1234)).tolist()
    keep = sorted(order[:cfg.probe.n])
    return [tokenize_sft(tok, *pairs[i], cfg.train.max_len) for i in keep]


def probe_logprobs(forward, encoded: list[dict], pad_id: int, batch_size: int, device, vocab: int) -> list:
    """Log-probs at the probe's target positions, per batch: [[N_b, vocab] float32 on CPU]."""
    out = []
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            b = {k: v.to(device) for k, v in collate(encoded[start:start + batch_size], pad_id).items()}
            mask = b["labels"][:, 1:] != -100
            logits = forward(b)[:, :-1][mask][..., :vocab]
            out.append(torch.log_softmax(logits.float(), -1).cpu())
    return out


def probe_kl(p_batches: list, q_batches: list) -> float:
    """Token-averaged KL(p || q) over the probe (lists of [N_b, V] log-probs)."""
    total, n = 0.0, 0
    for p, q in zip(p_batches, q_batches):
        total += float(kl_divergence(p, q).sum())
        n += p.shape[0]
    return total / max(n, 1)


def _probe_kls(engine, slot: TeacherSlot, manifest, probe, cfg: DistillConfig, tok, vocab: int,
               kl_best: dict, teacher_lp=None) -> tuple[dict, float]:
    """KL(student || c) for every checkpoint c (and KL(best || c) once per run) on the probe set.

    One teacher is resident at a time: the best checkpoint's probe log-probs are kept
    on the CPU, then each checkpoint is switched in and compared with them and with
    the student's.  ``teacher_lp(c)`` (the recipe's teacher-logit cache) gives checkpoint
    c's probe log-probs in the batches of :func:`probe_logprobs`, instead of a live forward.
    """
    t0 = time.time()
    bs, pad, device = cfg.probe.batch_size, tok.pad_token_id, engine.device
    model = engine.module
    was = model.training
    model.eval()
    student_lp = probe_logprobs(lambda b: student_logits(engine, b), probe, pad, bs, device, vocab)
    model.train(was)
    best = manifest.best_index
    if best is None:
        raise ValueError("selection scd_select needs the teacher's best checkpoint, but no checkpoint in the "
                         "manifest has a dev loss or dev score")
    if teacher_lp is None:
        def teacher_lp(c):
            slot.ensure(c)
            return probe_logprobs(slot.logits, probe, pad, bs, device, vocab)
    best_lp = teacher_lp(best) if set(kl_best) != set(manifest.indices) else None
    kl_student = {}
    order = sorted(manifest.indices, key=lambda i: (i != slot.index, i))  # the resident one first
    for c in order:
        c_lp = teacher_lp(c)
        kl_student[c] = probe_kl(student_lp, c_lp)
        if c not in kl_best:
            kl_best[c] = probe_kl(best_lp, c_lp)
    return kl_student, time.time() - t0


def select_stage(stage: int, n_stages: int, g0: int, cfg: DistillConfig, manifest, slot: TeacherSlot, engine,
                 probe, tok, vocab: int, kl_best: dict, metrics, teacher_lp=None) -> int:
    """The checkpoint index for ``stage`` under ``stages.selection``; logs a ``select`` row.

    scd_select first measures KL(best || c) (once per run, kept in ``kl_best``) and
    KL(student || c) for every checkpoint c on the probe set."""
    kl_student, n_loads, probe_s = None, len(slot.loads), 0.0
    if probe is not None:
        kl_student, probe_s = _probe_kls(engine, slot, manifest, probe, cfg, tok, vocab, kl_best, teacher_lp)
    choice = int(select_checkpoint(cfg.stages.selection, stage, n_stages, manifest,
                                   kl_best_to=kl_best if probe is not None else None, kl_student_to=kl_student))
    row = {"step": g0, "event": "select", "stage": stage, "checkpoint": choice,
           "checkpoint_step": manifest[choice].step, "rule": cfg.stages.selection}
    if probe is not None:
        row.update(kl_best={str(k): v for k, v in kl_best.items()},
                   kl_student={str(k): v for k, v in kl_student.items()}, probe_s=round(probe_s, 3),
                   probe_loads=len(slot.loads) - n_loads,
                   probe_load_s=round(sum(x[1] for x in slot.loads[n_loads:]), 4))
    metrics.log(row)
    return choice
