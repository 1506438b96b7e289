"""Small, shared pieces of every training recipe (the loop itself is scd.core.engine).

Recipes stay readable top to bottom and call these helpers:

* :class:`TrainConfig`                optimiser / schedule / batch settings
* :func:`seed_everything`             python, numpy, torch
* :func:`batch_indices`               the data order as a pure function of (seed, step),
                                      so a resumed run sees exactly the same batches
* :func:`collate_sft`                 prompt + target -> input_ids / labels (prompt masked)
* :func:`rank_batches`                this rank's micro-batches of a step

A run's record (run.json) is written by :class:`scd.core.results.RunDir` only.
"""
from __future__ import annotations

import dataclasses
import math
import random

from scd.core.config import added_field
from scd.core.results import DivergedError

DTYPES = ("fp32", "bf16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.95)
    warmup_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | constant
    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    max_len: int = 512
    grad_clip: float = 1.0
    log_every: int = 10
    save_every: int = 50  # resumable checkpoint every k optimiser steps (0: only at the end)
    bf16: bool = False  # alias of dtype: bf16 (kept for existing configs)
    gradient_checkpointing: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int = 0  # torch CPU threads (0: leave torch's default)
    # fp32 | bf16: bf16 autocast of the forward with fp32 master weights, optimiser state and loss math.
    # null: fp32, or bf16 when the alias `bf16: true` is set.  bf16 helps on GPUs and on CPUs with
    # AVX512-BF16 / AMX only (README, "bf16").
    dtype: str | None = added_field(default=None)
    # the output layer (lm-head) only at the target positions (scd.heads, scd.completion_loss); false:
    # full logits at every position (the reference path; same loss and gradients to float tolerance)
    completion_only: bool = added_field(default=True)
    # run the batch's common prompt prefix (system prompt, instruction, few-shot demos: >= 16 tokens) once,
    # batch 1, and its KV cache repeated over the batch (scd.heads.backbone_hidden, unisd.context); same
    # outputs and gradients to float rounding; with dropout the prefix draws one mask for the whole batch
    share_prefix: bool = added_field(default=False)

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("train.batch_size and train.grad_accum must be >= 1")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"train.schedule must be cosine or constant, got {self.schedule!r}")
        if len(self.betas) != 2:
            raise ValueError("train.betas must have two values")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"train.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.bf16 and self.dtype == "fp32":
            raise ValueError("train.dtype is fp32 but train.bf16 is true (an alias of train.dtype: bf16): "
                             "set one of them")

    @property
    def use_bf16(self) -> bool:
        """bf16 autocast (``dtype: bf16`` or the alias ``bf16: true``)."""
        return self.dtype == "bf16" or (self.dtype is None and self.bf16)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str = "auto"):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def batch_indices(n_examples: int, batch_size: int, step: int, micro: int, grad_accum: int,
                  seed: int) -> list[int]:
    """Example indices of micro-batch ``micro`` of optimiser step ``step``.

    Epoch e uses the permutation ``randperm(n, generator=seed + e)``; consecutive
    micro-batches walk through it.  Pure function of its arguments: resuming at
    ``step`` reproduces the data order of an uninterrupted run.
    """
    import torch

    if n_examples == 0:
        raise ValueError("the training set is empty")
    start = (step * grad_accum + micro) * batch_size
    perms: dict[int, list[int]] = {}  # one permutation per epoch touched by this micro-batch
    out = []
    for pos in range(start, start + batch_size):
        epoch, offset = divmod(pos, n_examples)
        if epoch not in perms:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            perms[epoch] = torch.randperm(n_examples, generator=g).tolist()
        out.append(perms[epoch][offset])
    return out


def rank_batches(n_examples: int, train: TrainConfig, step: int, seed: int, world: int = 1,
                 rank: int = 0) -> list[list[int]]:
    """This rank's example indices of every micro-batch of optimiser step ``step``.

    The global micro-batch (``batch_size * world`` examples) is :func:`batch_indices`;
    rank r takes its r-th slice, so 1 rank x batch 8 and 2 ranks x batch 4 see the same data.
    """
    bs = train.batch_size
    return [batch_indices(n_examples, bs * world, step, m, train.grad_accum, seed)[rank * bs:(rank + 1) * bs]
            for m in range(train.grad_accum)]


def tokenize_sft(tokenizer, prompt: str, target: str, max_len: int) -> dict:
    """Token ids of prompt + target and labels with the prompt masked (-100).

    The prompt is truncated from the left when prompt + target exceed ``max_len``
    (the target is kept); a target alone longer than ``max_len`` raises.
    """
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    t = tokenizer(target, add_special_tokens=False)["input_ids"]
    if len(t) >= max_len:
        raise ValueError(f"target of {len(t)} tokens does not fit max_len={max_len}")
    if len(p) + len(t) > max_len:
        p = p[len(p) + len(t) - max_len:]
    return {"input_ids": p + t, "labels": [-100] * len(p) + t}


def collate(items: list[dict], pad_id: int) -> dict:
    """Right-pad a list of {input_ids, labels[, ...]} into tensors [B, T]."""
    import torch

    T = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    labels = torch.full((len(items), T), -100, dtype=torch.long)
    mask = torch.zeros((len(items), T), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, :n] = torch.tensor(it["input_ids"])
        labels[i, :n] = torch.tensor(it["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def check_finite(value: float, step: int, term: str) -> float:
    if not math.isfinite(value):
        raise DivergedError(step=step, term=term, value=value)
    return value


def peak_memory(device) -> int | None:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return None

