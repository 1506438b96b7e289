"""Token ids: padding id lists into batches.

Shared by everything that batches prompts or completions by hand (the UniSD step
context, its sampler).  Pure functions of token id lists; no model, no tokenizer.
"""
from __future__ import annotations

from typing import Sequence

import torch


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids [B, P], mask [B, P]) left-padded."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for r, s in enumerate(seqs):
        if not s:
            raise ValueError("empty prompt: every prompt needs at least one token")
        ids[r, P - len(s):] = torch.tensor(list(s), dtype=torch.long)
        mask[r, P - len(s):] = 1
    return ids, mask


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids [B, L], mask [B, L]) right-padded (L >= 1)."""
    L = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for r, s in enumerate(seqs):
        if s:
            ids[r, :len(s)] = torch.tensor(list(s), dtype=torch.long)
            mask[r, :len(s)] = 1
    return ids, mask
