"""Token ids: text -> ids, the stop tokens of a chat tokenizer, id lists -> padded batches.

Shared by training (the UniSD step context and sampler) and evaluation
(:mod:`benchmarks.tasks.generate`), so both tokenise a prompt the same way.

Text is tokenised without adding special tokens when it already starts with the
tokenizer's BOS text (chat templates usually write it), as lm-eval does.
"""
from __future__ import annotations

from typing import Sequence

import torch

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "<|end_of_text|>", "</s>")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text``; special tokens are added only if the text does not already start with BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    add = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add)["input_ids"])


def stop_token_ids(tokenizer) -> list[int]:
    """eos plus every end-of-turn token the tokenizer knows as a special token."""
    ids = []
    eos = tokenizer.eos_token_id
    if isinstance(eos, int):
        ids.append(eos)
    elif eos:
        ids.extend(eos)
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    special |= {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    for t in END_OF_TURN_TOKENS:
        if t in special:
            i = tokenizer.convert_tokens_to_ids(t)
            if isinstance(i, int) and i >= 0 and i not in ids:
                ids.append(i)
    return ids


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
