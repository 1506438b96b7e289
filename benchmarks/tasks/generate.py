"""Batched greedy generation and likelihood scoring for evaluation.

* :func:`greedy_generate` -- prompts are sorted by length (longest first), batched,
  LEFT-padded and decoded greedily with the KV cache on (``model.generate`` with
  ``do_sample=False``); each sequence stops at eos / end-of-turn or after
  ``max_new_tokens``.  Outputs are returned in the input order, decoded with special
  tokens stripped (no other post-processing).  Greedy decoding is deterministic.
* :func:`loglik_choices` -- ``log p(continuation | context)`` summed over the
  continuation tokens, for every candidate of every context (classification by
  likelihood).  Context/continuation are tokenised like lm-eval's HFLM
  (``_encode_pair``: trailing whitespace of the context moves to the continuation;
  the continuation tokens are the whole string's tokens after the context's),
  so both paths score the same token sequences.  Each context is run once and its
  KV cache shared by all its candidates; a batch's common context prefix (few-shot
  demonstrations) runs once, its KV cache shared by the batch.

Text is tokenised with :func:`scd.tokens.encode` (no special tokens added when it already
starts with the tokenizer's BOS text, as lm-eval does); stop tokens are
:func:`scd.tokens.stop_token_ids`.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import GenerationConfig

from scd.heads import prefix_cache, prompts_shared_prefix_len
from scd.tokens import encode, left_pad, stop_token_ids


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-eval's causal ``_encode_pair``."""
    if not context:
        raise ValueError("encode_pair: empty context")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def model_max_length(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _device(model):
    return next(model.parameters()).device


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def greedy_generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 8,
                    stop_ids: Sequence[int] | None = None, progress: bool = True,
                    desc: str = "generate") -> list[str]:
    """Greedy continuations of ``prompts`` (input order; special tokens stripped)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stop = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
    device = _device(model)
    limit = model_max_length(model)
    max_ctx = (limit - max_new_tokens) if limit else None
    encoded = [encode(tokenizer, p) for p in prompts]
    if max_ctx is not None and any(len(e) > max_ctx for e in encoded):
        n_long = sum(len(e) > max_ctx for e in encoded)
        warnings.warn(f"{n_long} prompt(s) longer than {max_ctx} tokens were left-truncated", stacklevel=2)
        encoded = [e[-max_ctx:] for e in encoded]
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))  # longest first
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                               eos_token_id=stop or None, pad_token_id=pad)
    out: list[str | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    bar = _progress(len(encoded), desc, progress)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                width = max(len(encoded[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)  # (B, L) left-padded
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    e = encoded[i]
                    if e:
                        ids[row, width - len(e):] = torch.tensor(e)
                        mask[row, width - len(e):] = 1
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=gen_cfg)
                new = gen[:, width:].tolist()  # (B, <= max_new_tokens)
                for row, i in enumerate(idx):
                    toks = new[row]
                    cut = next((k for k, t in enumerate(toks) if t in stop), len(toks))
                    out[i] = tokenizer.decode(toks[:cut], skip_special_tokens=True)
                bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return [o if o is not None else "" for o in out]


def loglik_choices(model, tokenizer, contexts: Sequence[str], choices: Sequence[Sequence[str]], *,
                   batch_size: int = 8, progress: bool = True, desc: str = "loglik",
                   share_prefix: bool = True) -> list[list[float]]:
    """``out[i][j] = sum_t log p(cont_ij[t] | context_i, cont_ij[:t])`` (float64 sums).

    ``batch_size`` counts contexts; each batch runs the (left-padded) contexts once,
    repeats their KV cache for every candidate and scores the right-padded
    candidates in a second forward pass.  ``share_prefix``: the batch's common context
    prefix (:func:`scd.heads.prompts_shared_prefix_len`, e.g. few-shot demonstrations) runs once (the same
    sums to float rounding; ``False`` is the baseline of ``benchmarks.perf.bench_fewshot_eval``).
    """
    if len(contexts) != len(choices):
        raise ValueError(f"{len(contexts)} contexts but {len(choices)} choice lists")
    device = _device(model)
    limit = model_max_length(model)
    pairs = []  # per context: (ctx ids, [cont ids, ...])
    for c, opts in zip(contexts, choices):
        if not opts:
            raise ValueError("loglik_choices: a context has no candidate continuations")
        enc = [encode_pair(tokenizer, c, o) for o in opts]
        ctx = enc[0][0]
        conts = []
        for (cx, ct), o in zip(enc, opts):
            if cx != ctx:
                raise AssertionError("context tokenisation differs between candidates")
            if not ct:
                raise ValueError(f"candidate {o!r} tokenises to nothing after the context")
            conts.append(ct)
        if limit and len(ctx) + max(map(len, conts)) > limit:
            ctx = ctx[-(limit - max(map(len, conts))):]
        pairs.append((ctx, conts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(pairs)), key=lambda i: (-len(pairs[i][0]), i))
    out: list[list[float] | None] = [None] * len(pairs)
    was_training = model.training
    model.eval()
    bar = _progress(len(pairs), desc, progress)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                out_batch = _score_batch(model, [pairs[i] for i in idx], pad, device, share_prefix)
                for i, scores in zip(idx, out_batch):
                    out[i] = scores
                bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return out  # type: ignore[return-value]


def _score_batch(model, batch, pad: int, device, share_prefix: bool = True) -> list[list[float]]:
    B = len(batch)
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}  # skip the (L, V) head
    # the contexts' common prefix (S tokens) runs once, its KV cache repeated over the batch; the rest of each
    # context is left-padded after it: [prefix | pad .. pad | suffix] (same sums to float rounding)
    s = prompts_shared_prefix_len([ctx for ctx, _ in batch]) if share_prefix else 0
    cache = prefix_cache(model, batch[0][0][:s], B, device) if s else None
    ids, rest = left_pad([ctx[s:] for ctx, _ in batch], pad)  # (B, L) the contexts after the prefix
    mask = torch.cat([torch.ones((B, s), dtype=torch.long), rest], dim=1)  # (B, S + L)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, s:]  # (B, L) positions ignore the padding
    ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    first = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                  **extra)
    last_logp = F.log_softmax(first.logits[:, -1, :].double(), dim=-1)  # (B, V): next-token after context

    counts = [len(conts) for _, conts in batch]
    rep = torch.tensor(counts, device=device)
    cache = first.past_key_values
    cache.batch_repeat_interleave(counts[0] if len(set(counts)) == 1 else rep)  # (B, ...) -> (N, ...)
    flat = [c for _, conts in batch for c in conts]  # N = sum(counts) candidates
    owner = torch.repeat_interleave(torch.arange(B, device=device), rep)  # (N,)
    cw = max(len(c) for c in flat)
    cids = torch.full((len(flat), cw), pad, dtype=torch.long)  # (N, C) right-padded candidates
    cmask = torch.zeros((len(flat), cw), dtype=torch.long)
    for r, c in enumerate(flat):
        cids[r, :len(c)] = torch.tensor(c)
        cmask[r, :len(c)] = 1
    cids, cmask = cids.to(device), cmask.to(device)
    ctx_len = mask.sum(-1)[owner]  # (N,)
    cpos = ctx_len[:, None] + torch.arange(cw, device=device)[None, :]  # (N, C)
    full_mask = torch.cat([mask[owner], cmask], dim=1)  # (N, S + L + C)
    second = model(input_ids=cids, attention_mask=full_mask, position_ids=cpos, past_key_values=cache,
                   use_cache=True)
    logp = F.log_softmax(second.logits.double(), dim=-1)  # (N, C, V)
    # token t of a candidate is predicted by: t == 0 -> context's last logits; t > 0 -> candidate pos t-1
    tok_first = last_logp[owner].gather(1, cids[:, :1]).squeeze(1)  # (N,)
    tok_rest = logp[:, :-1, :].gather(2, cids[:, 1:, None]).squeeze(2)  # (N, C-1)
    total = tok_first + (tok_rest * cmask[:, 1:].double()).sum(1)  # (N,)
    vals = total.tolist()
    out, k = [], 0
    for n in counts:
        out.append(vals[k:k + n])
        k += n
    return out


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def loglik_reference(model, tokenizer, context: str, continuation: str) -> float:
    """Slow, obviously-correct reference: one unpadded forward of context + continuation."""
    ctx, cont = encode_pair(tokenizer, context, continuation)
    ids = torch.tensor([ctx + cont], device=_device(model))
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].double()  # (T, V)
    logp = F.log_softmax(logits, dim=-1)
    return float(sum(logp[len(ctx) + t - 1, tok] for t, tok in enumerate(cont)))
