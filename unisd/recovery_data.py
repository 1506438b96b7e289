"""Recovery data: the recovery sequences (reference targets or the original's greedy continuations) and the
fixed probe set of the KL / CKA measurements (see unisd/recovery.py, docs/recovery.md)."""
from __future__ import annotations

import torch

from scd.core.train import collate, tokenize_sft
from scd.data.load import load_split
from scd.data.prompts import render_prompt, render_target


def encode_reference(pairs: list[tuple[str, str]], tokenizer, max_len: int) -> list[dict]:
    return [tokenize_sft(tokenizer, p, t, max_len) for p, t in pairs]


def teacher_continuations(teacher, tokenizer, prompts: list[str], *, max_new_tokens: int, max_len: int,
                          batch_size: int, device) -> list[dict]:
    """Prompt + the original model's greedy continuation (cut after eos), labels on the continuation."""
    eos = tokenizer.eos_token_id
    out: list[dict] = []
    old = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            enc = tokenizer(chunk, add_special_tokens=False, return_tensors="pt", padding=True, truncation=True,
                            max_length=max(8, max_len - max_new_tokens))
            with torch.no_grad():
                gen = teacher.generate(input_ids=enc["input_ids"].to(device),
                                       attention_mask=enc["attention_mask"].to(device), do_sample=False,
                                       max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            new = gen[:, enc["input_ids"].shape[1]:].tolist()
            for row, ids, am in zip(new, enc["input_ids"].tolist(), enc["attention_mask"].tolist()):
                p = [t for t, m in zip(ids, am) if m]
                c = row[: row.index(eos) + 1] if eos in row else row
                c = c or [eos]
                out.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    finally:
        tokenizer.padding_side = old
    return out


def probe_batches(encoded: list[dict], batch_size: int, pad_id: int) -> list[dict]:
    return [collate(encoded[i:i + batch_size], pad_id) for i in range(0, len(encoded), batch_size)]


def load_probe(cfg, tokenizer) -> list[dict]:
    """The probe set of a RecoveryConfig ``cfg``: ``probe.n_examples`` examples of the ``probe.split``
    split of the probe tasks (default ``data.tasks``), prompt (+ reference target) tokenized."""
    tasks = list(cfg.probe.tasks) or list(cfg.data.tasks)
    per_task = -(-cfg.probe.n_examples // len(tasks))
    items = []
    for task in tasks:
        for ex in load_split(task, cfg.probe.split, limit=per_task):
            p = render_prompt(ex, tokenizer)
            if cfg.probe.with_target:
                items.append(tokenize_sft(tokenizer, p, render_target(ex, tokenizer), cfg.probe.max_len))
            else:
                ids = tokenizer(p, add_special_tokens=False)["input_ids"][-cfg.probe.max_len:]
                items.append({"input_ids": ids, "labels": [-100] * len(ids)})
    if not items:
        raise ValueError(f"probe set is empty (tasks {tasks}, split {cfg.probe.split})")
    return items[: cfg.probe.n_examples]
