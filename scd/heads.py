"""Completion-only output layer: final hidden states at the target positions, and the head.

A classification answer is 1-3 tokens of a 60-130 token sequence; the 49,152-way
output layer (lm-head) at every other position is pure waste (for a 6-layer student
cut from SmolLM2 it is more than half of the step's FLOPs).  These functions run the
model's backbone, select the hidden states of the positions that predict a target
token, and apply the head only there:

    rows, cols = target_positions(labels)              # N target tokens
    h = backbone_hidden(model, ids, mask)[rows, cols]  # [N, H] (after the final norm)
    w, b = head_weight(model)                          # [V, H], [V] | None
    logits = target_logits(model, batch)               # [N, V]  (= head(h))

Position ``t`` predicts ``labels[:, t + 1]`` (causal shift); a target is a label other
than -100.  The order of the N targets is row-major (batch row, then position), the
order of ``labels[:, 1:][labels[:, 1:] != -100]`` that every full-logit path uses.

Wrappers: a peft model (LoRA), a DeepSpeed engine or DDP (``.module``) are unwrapped to
the Hugging Face model for *lookups* (decoder, head); the forward itself goes through the
model as given, so wrapper hooks (DeepSpeed ZeRO-3 parameter gathering, LoRA) run as in
a normal forward.  ``backbone_hidden`` captures the decoder's output with a forward hook
and asks the model for the logits of the last position only (``logits_to_keep=1``,
transformers >= 4.45; B x V extra logits, no gradient flows through them).

dtype: ``target_logits`` returns the head's output in whatever dtype the head ran in
(bf16 under autocast or for bf16 weights); loss math upcasts to float32
(``scd.losses``).  ZeRO-3 partitions the head weight, so ``head_weight`` refuses it
(use ``target_logits``, which calls the head module and so its gathering hooks).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from scd.tokens import right_pad

IGNORE_INDEX = -100
Tensor = torch.Tensor


def target_positions(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """[B, T] labels -> (rows [N], cols [N]): position (row, col) predicts labels[row, col + 1]."""
    mask = labels[:, 1:] != ignore_index  # [B, T-1]
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order
    return rows, cols


def target_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """[B, T] labels -> [N] the target token ids, in the order of ``target_positions``."""
    lab = labels[:, 1:]
    return lab[lab != ignore_index]


def num_targets(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """Number of target tokens of a [B, T] label tensor."""
    return int((labels[:, 1:] != ignore_index).sum())


def num_samples_with_targets(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """Samples of a collated batch (labels [B, T]) with at least one next-token target."""
    return int((labels[:, 1:] != ignore_index).any(dim=1).sum())


def all_position_labels(input_ids: Tensor, attention_mask: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Labels [B, T] that make every attended position with a next token a target (general text, KD at
    every position): labels[:, t] = input_ids[:, t] where attended, ``ignore_index`` at t = 0 and on padding."""
    labels = input_ids.masked_fill(attention_mask == 0, ignore_index)  # [B, T]
    labels[:, 0] = ignore_index
    return labels


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a peft / DeepSpeed / DDP wrapper (itself if none)."""
    m = model
    for _ in range(8):  # wrappers nest a few levels at most
        if hasattr(m, "get_base_model") and callable(m.get_base_model):  # peft PeftModel
            m = m.get_base_model()
        elif isinstance(getattr(m, "module", None), nn.Module):  # DeepSpeedEngine, DDP
            m = m.module
        else:
            return m
    raise ValueError(f"could not unwrap {type(model).__name__}: wrappers nest too deep")


def _decoder(model: nn.Module) -> nn.Module:
    base = unwrap(model)
    if not hasattr(base, "get_decoder"):
        raise TypeError(f"{type(base).__name__} has no get_decoder(): not a Hugging Face causal LM")
    dec = base.get_decoder()
    if dec is base:
        raise TypeError(f"{type(base).__name__}.get_decoder() returned the model itself; expected a "
                        "causal LM with a separate backbone (e.g. LlamaForCausalLM.model)")
    return dec


MIN_SHARED_PREFIX = 16  # a common prefix shorter than this is not worth a separate forward


def shared_prefix_len(input_ids: Tensor, attention_mask: Tensor | None = None) -> int:
    """Length S of the common prefix of a right-padded batch's rows [B, T]: every row attended and equal
    on positions < S, each row keeping at least one real token after it; 0 when S < MIN_SHARED_PREFIX
    or for a single row (a left-padded batch shares nothing)."""
    B, T = input_ids.shape
    if B < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0)  # [T]
    if attention_mask is not None:
        same = same & (attention_mask != 0).all(dim=0)
        cap = int(attention_mask.sum(dim=1).min()) - 1
    else:
        cap = T - 1
    s = int(same.int().cumprod(0).sum()) if T else 0
    s = min(s, cap)
    return s if s >= MIN_SHARED_PREFIX else 0


def prompts_shared_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Length S of the longest common prefix of ``prompts`` (token id lists), as :func:`shared_prefix_len`
    (each prompt keeps one token of its own; 0 below ``MIN_SHARED_PREFIX`` tokens or for one prompt)."""
    return shared_prefix_len(*right_pad(prompts, 0))


def prefix_cache(model: nn.Module, prefix, batch: int, device=None):
    """The KV cache of one forward of ``prefix`` (token ids, batch 1), repeated ``batch`` times along the
    batch dim.  Under grad mode the repeat is differentiable (the prefix's gradient is the sum over the
    batch).  Forward hooks on the model run as usual (``backbone_hidden`` reads the prefix's hidden states)."""
    ids = torch.as_tensor(prefix, dtype=torch.long, device=device).view(1, -1)
    cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
    cache.batch_repeat_interleave(batch)
    return cache


def backbone_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                    share_prefix: bool = False) -> Tensor:
    """Final hidden states [B, T, H] (after the final norm), without the full lm-head.

    The model's own forward runs (wrapper hooks included) with ``logits_to_keep=1``; the decoder's
    ``last_hidden_state`` is captured by a hook.  Gradients flow into the returned tensor as in a
    normal forward.  ``share_prefix`` (right-padded batches, ``train.share_prefix``): the rows'
    common prefix (:func:`shared_prefix_len`, S tokens) runs once with batch 1 and its KV cache is
    repeated over the batch; positions S.. run after it; its hidden states are repeated too (their
    gradient is the sum over the rows).  Same result to float rounding.
    """
    dec = _decoder(model)
    captured: list[Tensor] = []

    def hook(_module, _args, out):
        captured.append(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])

    s = shared_prefix_len(input_ids, attention_mask) if share_prefix else 0
    handle = dec.register_forward_hook(hook)
    try:
        if not s:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
        else:
            B, T = input_ids.shape
            cache = prefix_cache(model, input_ids[0, :s], B, input_ids.device)
            pos = torch.arange(s, T, device=input_ids.device).expand(B, T - s)
            model(input_ids=input_ids[:, s:], attention_mask=attention_mask, position_ids=pos,
                  past_key_values=cache, use_cache=True, logits_to_keep=1)
    finally:
        handle.remove()
    if len(captured) != (2 if s else 1):
        raise RuntimeError(f"{type(dec).__name__} did not run in the forward of {type(model).__name__}")
    if not s:
        return captured[0]
    prefix, rest = captured  # [1, S, H], [B, T - S, H]
    return torch.cat([prefix.expand(rest.shape[0], -1, -1), rest], dim=1)


def target_hidden(model: nn.Module, batch: dict, share_prefix: bool = False) -> Tensor:
    """[N, H] final hidden states at the target positions of ``batch`` (input_ids, attention_mask, labels)."""
    rows, cols = target_positions(batch["labels"])
    h = backbone_hidden(model, batch["input_ids"], batch.get("attention_mask"), share_prefix)  # [B, T, H]
    return h[rows, cols]


def head_module(model: nn.Module) -> nn.Module:
    """The output embedding (lm-head) module of a (wrapped) causal LM."""
    head = unwrap(model).get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(unwrap(model)).__name__} has no output embeddings (lm-head)")
    return head


def head_weight(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight [V, H], bias [V] or None) of the lm-head, for the fused losses.

    Refuses a head that is not a plain ``nn.Linear`` (a LoRA-adapted head) or whose
    weight is partitioned (DeepSpeed ZeRO-3): use ``target_logits`` there.
    """
    head = head_module(model)
    if type(head) is not nn.Linear:
        raise TypeError(f"lm-head is a {type(head).__name__}, not nn.Linear (adapted or custom head); "
                        "use target_logits(model, batch) instead of the fused loss")
    w = head.weight
    if getattr(w, "ds_numel", None) is not None and w.numel() != w.ds_numel:
        raise RuntimeError("lm-head weight is partitioned (DeepSpeed ZeRO-3); use target_logits(model, batch)")
    return w, head.bias


def fusable_head(model: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """(weight [V, H], bias [V] or None) when the lm-head is a plain, whole ``nn.Linear`` (the fused
    losses can take it); None for an adapted / custom head or a ZeRO-3 partitioned weight (call
    ``head_module(model)`` on the target hidden states instead)."""
    head = head_module(model)
    w = getattr(head, "weight", None)
    if type(head) is not nn.Linear or (getattr(w, "ds_numel", None) is not None and w.numel() != w.ds_numel):
        return None
    return w, head.bias


def target_logits(model: nn.Module, batch: dict, share_prefix: bool = False) -> Tensor:
    """[N, V] logits at the target positions only: head(hidden[rows, cols]).

    Equal (to float rounding) to ``model(...).logits[:, :-1][labels[:, 1:] != -100]``.
    """
    return head_module(model)(target_hidden(model, batch, share_prefix))


def teacher_targets(model: nn.Module, batch: dict, share_prefix: bool = False) -> dict:
    """A frozen teacher at the target positions of ``batch``, as keyword arguments of
    ``scd.completion_loss.completion_terms`` / ``fused_kd_ce``: its hidden states [N, H] and plain
    linear head (fused into the loss, no [N, V] logits kept), or its logits [N, V] when the head is
    adapted or partitioned.  No gradient."""
    with torch.no_grad():
        head = fusable_head(model)
        if head is None:
            return {"teacher": target_logits(model, batch, share_prefix)}
        return {"teacher": target_hidden(model, batch, share_prefix), "teacher_weight": head[0],
                "teacher_bias": head[1]}
