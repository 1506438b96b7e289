"""Batched sampling of student completions (token ids, not text).

The distillation loss is computed on exactly the sampled tokens, so completions stay
token ids end to end (decoding and re-tokenising could change them).  Prompts are
left-padded and run through ``model.generate`` with the KV cache; sampling uses the
full distribution at ``temperature`` (top-k and top-p off).  The random state is
seeded per call and isolated (``torch.random.fork_rng``), so a resumed run samples
exactly what an uninterrupted run samples.
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers import GenerationConfig

from scd.heads import prefix_cache
from scd.heads import prompts_shared_prefix_len as shared_prefix_len  # noqa: F401  (used here and by unisd.context)
from scd.tokens import left_pad


def suffix_inputs(prompts: Sequence[Sequence[int]], s: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts after their shared prefix of length ``s``, left-padded: (ids [B, P'], mask [B, P']).
    The full attention mask of a forward over them after the cached prefix is ``[1] * s + mask``."""
    return left_pad([p[s:] for p in prompts], pad_id)


def cut_at_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """Tokens up to and including the first stop token (the student learns to stop)."""
    stop = set(stop_ids)
    for k, t in enumerate(tokens):
        if t in stop:
            return list(tokens[:k + 1])
    return list(tokens)


def sample_completions(model, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float,
                       seed: int, pad_id: int, stop_ids: Sequence[int], batch_size: int = 16,
                       share_prefix: bool = False) -> list[list[int]]:
    """One sampled completion per prompt (input order); ``temperature <= 0`` decodes greedily.
    ``share_prefix``: the prompts' common prefix (:func:`shared_prefix_len`) is run once per batch and
    its KV cache repeated over the batch (``generate`` continues from it)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    sample = temperature > 0
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, num_beams=1, use_cache=True,
                               temperature=temperature if sample else None, top_k=0 if sample else None,
                               top_p=1.0 if sample else None, eos_token_id=list(stop_ids) or None,
                               pad_token_id=pad_id)
    order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]), i))  # similar lengths together
    out: list[list[int] | None] = [None] * len(prompt_ids)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                prompts = [prompt_ids[i] for i in idx]
                n_shared = shared_prefix_len(prompts) if share_prefix else 0
                ids, mask = suffix_inputs(prompts, n_shared, pad_id)
                cache = prefix_cache(model, prompts[0][:n_shared], len(idx), device) if n_shared else None
                shared = torch.tensor(list(prompts[0][:n_shared]), dtype=torch.long).expand(len(idx), n_shared)
                ids = torch.cat([shared, ids], dim=1)  # generate sees whole prompts; the cache holds the prefix
                mask = torch.cat([torch.ones(len(idx), n_shared, dtype=torch.long), mask], dim=1)
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=gen_cfg, past_key_values=cache)
                new = gen[:, ids.shape[1]:].tolist()  # [b, <= max_new_tokens]
                for row, i in enumerate(idx):
                    out[i] = cut_at_stop(new[row], stop_ids)
    finally:
        model.train(was_training)
    return [o or [] for o in out]
