"""Which layers a pruned student keeps: greedy removal by measured dev KL (pure functions).

Block-influence style (ShortGPT, Minitron's depth pruning): starting from all L layers, at each
step every remaining layer is removed on trial and the one whose removal raises

    KL(base || pruned) = mean over the dev sample's positions t of  sum_v p_base(v | x_<t) log(p_base / p_pruned)

least is dropped; until ``keep`` layers are left.  That is sum_{s=0}^{L-keep-1} (L - s) trial models
(329 for 30 -> 16).  A trial that drops the k-th kept layer shares its first k layers with the model
of the current step, so :meth:`DevKL.drop_each` runs the current model once, keeps the input of each
kept layer, and runs each trial from there (the layers after the dropped one, then the head): about
half the layer work of running every trial from the embeddings, same numbers.

* :func:`greedy_drop`   the greedy loop over any ``drop_each(kept layers) -> [KL without each]``
                        (pure, ties to the lowest layer index)
* :func:`layer_view`    run a model with a subset of its decoder layers, without copying weights
* :class:`DevKL`        the fixed dev sample with the base model's log-probs computed once
                        ([positions, V] fp32: n x max_len x V x 4 bytes, ~0.8 GB for
                        32 x 128 tokens of SmolLM2's 49k vocabulary); ``dev(model)`` -> KL,
                        ``drop_each(model, kept)`` -> the KL of every trial of one greedy step
* :func:`text_batch`    collate prompt + answer token ids with every position a target
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from scd.core.train import collate, tokenize_sft
from scd.data_config import load_training_pairs
from scd.heads import all_position_labels, num_targets, target_logits, unwrap
from scd.losses import kl_divergence, log_probs

DEV_SAMPLE_SEED = 1234  # the dev sample does not depend on the run's seed


def text_batch(items: list[dict], pad_id: int) -> dict:
    """Right-padded input_ids / attention_mask [B, T] and all-position labels [B, T] (general text:
    the prompt is a target too)."""
    batch = collate(items, pad_id)
    batch["labels"] = all_position_labels(batch["input_ids"], batch["attention_mask"])
    return batch


def encode_texts(data_cfg, tok, max_len: int, split: str | None = None) -> list[dict]:
    """Prompt + answer token ids of ``data_cfg``'s examples of ``split`` (truncated from the left of the
    prompt to ``max_len``), in task order."""
    return [tokenize_sft(tok, p, t, max_len) for p, t in load_training_pairs(data_cfg, tok, split)]


def dev_sample(data_cfg, tok, split: str, n: int, max_len: int) -> list[dict]:
    """A fixed, seeded subset of ``n`` examples of ``split`` over ``data_cfg.tasks``."""
    encoded = encode_texts(data_cfg, tok, max_len, split)
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(DEV_SAMPLE_SEED)).tolist()
    return [encoded[i] for i in order[:n]]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a (wrapped) Hugging Face causal LM."""
    layers = getattr(unwrap(model).get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(unwrap(model)).__name__}: no decoder `layers` ModuleList to cut")
    return layers


@contextlib.contextmanager
def layer_view(model: nn.Module, keep: list[int], first: nn.Module | None = None):
    """``model`` running only decoder layers ``keep`` (in order) inside the block; restored after.
    The kept layers are the model's own modules (no copy), so a forward equals that of
    ``scd.models.student_from_teacher(model, keep)``.  ``first``, if given, runs before them in the
    slot of ``keep``'s predecessor (:class:`Replay`).  Forwards must not use a KV cache
    (``use_cache=False``, as ``scd.heads`` does): the kept layers keep their original ``layer_idx``."""
    hf = unwrap(model)
    dec = hf.get_decoder()
    full, n = dec.layers, hf.config.num_hidden_layers
    types = getattr(hf.config, "layer_types", None)
    modules = ([first] if first is not None else []) + [full[i] for i in keep]
    dec.layers = nn.ModuleList(modules)
    hf.config.num_hidden_layers = len(modules)
    if types is not None:
        hf.config.layer_types = [types[0]] * (first is not None) + [types[i] for i in keep]
    try:
        yield model
    finally:
        dec.layers, hf.config.num_hidden_layers = full, n
        if types is not None:
            hf.config.layer_types = types


class Replay(nn.Module):
    """A stand-in decoder layer that ignores its input and returns the next of ``values``: the hidden
    states a shared prefix of layers produced, recorded once per batch (:meth:`DevKL.drop_each`)."""

    def __init__(self, values: list[torch.Tensor]):
        super().__init__()
        self.values = iter(values)

    def forward(self, hidden_states, *args, **kwargs):  # noqa: ARG002 - a decoder layer's signature
        return next(self.values)


@contextlib.contextmanager
def layer_inputs(model: nn.Module, keep: list[int], store: list[list[torch.Tensor]]):
    """Within the block, every forward of ``model`` appends the hidden states entering each decoder
    layer ``keep[k]`` to ``store[k]``."""
    layers = decoder_layers(model)

    def hook(k):
        def record(module, args, kwargs):  # noqa: ARG001
            store[k].append(args[0] if args else kwargs["hidden_states"])
        return record

    handles = [layers[i].register_forward_pre_hook(hook(k), with_kwargs=True) for k, i in enumerate(keep)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def greedy_drop(n_layers: int, n_keep: int, drop_each: Callable[[list[int]], list[float]],
                trace: list[dict] | None = None,
                on_step: Callable[[list[dict]], None] | None = None) -> tuple[list[int], list[dict]]:
    """Greedy layer removal.  ``drop_each(kept)`` is, for each layer ``i`` of ``kept`` in order, the dev
    KL of the model keeping ``kept`` without ``i`` (e.g. :meth:`DevKL.drop_each`, or
    ``[score([j for j in kept if j != i]) for i in kept]``).

    Returns (kept layers, sorted; trace): one entry per removal, ``{"drop": layer, "kl": score after
    dropping it, "candidates": [[layer, score without it], ...]}`` over every layer tried at that step.
    Ties go to the lowest layer index.  ``trace``: the steps a killed search already took (resume);
    ``on_step(trace)`` is called after every removal (to save it).
    """
    if not 1 <= n_keep <= n_layers:
        raise ValueError(f"cut.keep must be in [1, {n_layers}] (the base has {n_layers} layers), got {n_keep}")
    trace = [dict(t) for t in trace or []][:n_layers - n_keep]
    dropped = [t["drop"] for t in trace]
    if len(set(dropped)) != len(dropped) or not set(dropped) <= set(range(n_layers)):
        raise ValueError(f"a resumed greedy trace must drop distinct layers of 0..{n_layers - 1}, got {dropped}")
    kept = [i for i in range(n_layers) if i not in dropped]
    while len(kept) > n_keep:
        scores = drop_each(list(kept))
        if len(scores) != len(kept):
            raise ValueError(f"drop_each returned {len(scores)} scores for {len(kept)} kept layers")
        cands = [(i, float(s)) for i, s in zip(kept, scores)]
        drop, kl = min(cands, key=lambda c: (c[1], c[0]))
        kept.remove(drop)
        trace.append({"drop": drop, "kl": kl, "candidates": [[i, s] for i, s in cands]})
        if on_step is not None:
            on_step(trace)
    return kept, trace


class DevKL:
    """KL(base || model) on a fixed dev sample, token mean over every position with a next token.

    The base model's log-probs are computed once (fp32; kept on a CUDA device, else on the CPU; the
    CPU copy moves to the device per batch); ``autocast`` is the context of
    every forward (the run's ``train.dtype``), so the cut's and the heal curve's numbers compare.
    """

    def __init__(self, base: nn.Module, encoded: list[dict], pad_id: int, batch_size: int, device,
                 autocast: Callable = contextlib.nullcontext):
        self.device, self.autocast = device, autocast
        self.batches = [text_batch(encoded[i:i + batch_size], pad_id) for i in range(0, len(encoded), batch_size)]
        self.n_tokens = sum(num_targets(b["labels"]) for b in self.batches)
        if self.n_tokens == 0:
            raise ValueError("the dev sample has no position with a next token")
        store = torch.device(device) if torch.device(device).type == "cuda" else torch.device("cpu")
        self.base_logp = [self.logprobs(base, b).to(store) for b in self.batches]  # [N_b, V] each

    def logprobs(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """[N, V] fp32 log-probs of ``model`` at the batch's target positions (no grad)."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.no_grad(), self.autocast():
            return log_probs(target_logits(model, batch).float())

    def __call__(self, model: nn.Module) -> float:
        total = 0.0
        for batch, base_lp in zip(self.batches, self.base_logp):
            lp = self.logprobs(model, batch)  # [N_b, V]
            total += float(kl_divergence(base_lp.to(lp.device), lp).double().sum())
        return total / self.n_tokens

    def of_layers(self, model: nn.Module, keep: list[int]) -> float:
        """The dev KL of ``model`` running layers ``keep`` only (:func:`layer_view`)."""
        with layer_view(model, keep):
            return self(model)

    def drop_each(self, model: nn.Module, kept: list[int]) -> list[float]:
        """[``of_layers(model, kept without kept[k])`` for each k], sharing the prefixes: one forward of
        the model keeping ``kept`` records each kept layer's input per batch; the trial without
        ``kept[k]`` replays the input of ``kept[k]`` (= the output of ``kept[:k]``) into ``kept[k+1:]``.
        Holds len(kept) x the dev sample's hidden states ([B, T, d] per batch) for the step."""
        inputs: list[list[torch.Tensor]] = [[] for _ in kept]
        with torch.no_grad(), layer_inputs(model, kept, inputs), layer_view(model, kept), self.autocast():
            for batch in self.batches:
                unwrap(model)(**{k: v.to(self.device) for k, v in batch.items() if k != "labels"},
                              use_cache=False, logits_to_keep=1)
        out = []
        for k in range(len(kept)):  # self(model) runs the batches in order: each gets its recorded input
            with layer_view(model, kept[k + 1:], first=Replay(inputs[k])):
                out.append(self(model))
            inputs[k] = []  # free this prefix's states
        return out
