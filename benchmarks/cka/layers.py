"""Hidden states of HF models as CKA samples (padding removed, tokens or mean-pooled) and
:func:`model_cka`, the layer-pair CKA between two models on the same batches."""
from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from benchmarks.cka.estimators import ESTIMATORS, F64, UNITS
from benchmarks.cka.matrix import CKAMatrix, matched_layers


def select_units(h: torch.Tensor, mask: torch.Tensor | None, unit: str, skip_first: int = 0) -> torch.Tensor:
    """Drop padding and form samples.  h: [B, T, d], mask: [B, T] (1 = real token) or None.

    unit="tokens" -> [n_real_tokens, d]; unit="mean_pool" -> [n_seqs_with_tokens, d]
    (mean of each sequence's real tokens; sequences without any are dropped).
    ``skip_first=k`` also drops the first k real tokens of every sequence (wherever the
    padding is): LLMs put massive activations on the first position (attention sink),
    which otherwise dominate linear CKA -- see docs/cka.md.
    """
    if unit not in UNITS:
        raise ValueError(f"unknown CKA unit {unit!r}; choose one of {', '.join(UNITS)}")
    if h.ndim != 3:
        raise ValueError(f"hidden states must be [batch, seq, dim], got shape {tuple(h.shape)}")
    if mask is None:
        mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
    if mask.shape != h.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match hidden states {tuple(h.shape[:2])}")
    m = mask.to(h.device).bool()
    if skip_first < 0:
        raise ValueError(f"skip_first must be >= 0, got {skip_first}")
    if skip_first:
        m = m & (m.long().cumsum(1) > skip_first)                   # rank among real tokens >= k
    if unit == "tokens":
        return h[m]                                                  # [n_tok, d]
    cnt = m.sum(1)                                                   # [B]
    w = m.to(F64)
    pooled = torch.einsum("btd,bt->bd", h.to(F64), w) / cnt.clamp_min(1)[:, None].to(F64)  # [B, d]
    return pooled[cnt > 0]


def _batch_tensors(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(f"a CKA batch needs 'input_ids' (and optionally 'attention_mask'); got keys {sorted(batch)}")
        ids = torch.as_tensor(batch["input_ids"])
        am = batch.get("attention_mask")
        return ids, (torch.as_tensor(am) if am is not None else None)
    raise ValueError(f"a CKA batch must be a dict with input_ids/attention_mask or an input_ids tensor, "
                     f"got {type(batch).__name__}")


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def resolve_layers(layers: Sequence[int] | None, n_hidden: int) -> list[int]:
    """Layer indices into hidden_states (n_hidden = num_layers + 1 entries).

    None -> 1..num_layers (every decoder layer, no embedding output); negative
    indices count from the end (-1 = last layer, after the final norm).
    """
    if layers is None:
        return list(range(1, n_hidden))
    out = []
    for i in layers:
        j = int(i) + n_hidden if int(i) < 0 else int(i)
        if not 0 <= j < n_hidden:
            raise ValueError(f"layer {i} out of range: this model has hidden states 0..{n_hidden - 1} "
                             f"(0 = embeddings, {n_hidden - 1} = last layer after the final norm)")
        out.append(j)
    return out


@torch.no_grad()
def hidden_for_batch(model, batch: Any, layers: Sequence[int] | None = None, unit: str = "tokens",
                     skip_first: int = 0) -> tuple[list[torch.Tensor], list[int]]:
    """One forward pass -> ([n, d] per chosen layer, resolved layer indices).

    Padding positions (attention_mask == 0) are removed before anything is returned.
    States stay on the model's device in the model's dtype; accumulators upcast.
    """
    if unit not in UNITS:
        raise ValueError(f"unknown CKA unit {unit!r}; choose one of {', '.join(UNITS)}")
    ids, am = _batch_tensors(batch)
    dev = _model_device(model)
    kw: dict[str, Any] = {"input_ids": ids.to(dev), "output_hidden_states": True, "return_dict": True}
    if am is not None:
        kw["attention_mask"] = am.to(dev)
    if _accepts(model, "use_cache"):
        kw["use_cache"] = False
    if _accepts(model, "logits_to_keep"):
        kw["logits_to_keep"] = 1  # the lm-head over the full sequence is not needed
    out = model(**kw)
    hs = out.hidden_states
    if hs is None:
        raise ValueError(f"{type(model).__name__} returned no hidden_states with output_hidden_states=True")
    idx = resolve_layers(layers, len(hs))
    return [select_units(hs[i], am, unit, skip_first) for i in idx], idx


def collect_hidden(model, batches: Iterable[Any], layers: Sequence[int] | None = None,
                   unit: str = "tokens", skip_first: int = 0) -> Iterator[list[torch.Tensor]]:
    """Generator: for each batch, the list of [n, d] states of the chosen layers.

    Runs the model in eval mode under no_grad (restoring its mode afterwards); nothing
    is kept between batches.
    """
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            yield hidden_for_batch(model, batch, layers, unit, skip_first)[0]
    finally:
        model.train(was_training)


def model_cka(model_a, model_b, batches: Iterable[Any], layers_a: Sequence[int] | None = None,
              layers_b: Sequence[int] | None = None, estimator: str = "linear", unit: str = "tokens",
              device: str | torch.device | None = None, minibatch_size: int | None = 1024,
              rbf_factor: float = 1.0, skip_first: int = 0) -> dict:
    """Layer-pair CKA between two HF causal LMs on the same batches (A = rows, B = columns).

    Each batch (dict with input_ids [B, T] and attention_mask [B, T], or an input_ids
    tensor) goes through both models once; hidden states are masked, pooled if
    ``unit="mean_pool"``, fed to a :class:`CKAMatrix` on ``device`` (default: model A's
    device) and dropped.  ``minibatch_size`` applies to the minibatch estimators;
    ``skip_first`` drops the first k real tokens of each sequence (see :func:`select_units`).

    Returns a JSON-ready dict: matrix [La][Lb], matched (CKA of relative-depth matched
    layers, see :func:`matched_layers`), matched_layers [[a, b], ...], mean_matched,
    diagonal (== matched when La == Lb, else None), layers_a, layers_b, estimator, unit,
    n (tokens or sequences), n_batches, n_minibatches, minibatch_size, n_dropped,
    rbf_factor, skip_first, dtype.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown CKA estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if unit not in UNITS:
        raise ValueError(f"unknown CKA unit {unit!r}; choose one of {', '.join(UNITS)}")
    acc: CKAMatrix | None = None
    la = lb = None
    modes = (model_a.training, model_b.training)
    model_a.eval()
    model_b.eval()
    try:
        for batch in batches:
            ha, la = hidden_for_batch(model_a, batch, layers_a, unit, skip_first)
            hb, lb = hidden_for_batch(model_b, batch, layers_b, unit, skip_first)
            if acc is None:
                acc = CKAMatrix(len(la), len(lb), estimator,
                                minibatch_size=minibatch_size if estimator != "linear" else None,
                                rbf_factor=rbf_factor, device=device or ha[0].device)
            acc.update(ha, hb)
            del ha, hb
    finally:
        model_a.train(modes[0])
        model_b.train(modes[1])
    if acc is None:
        raise ValueError("model_cka got no batches")
    M = acc.compute()
    match = matched_layers(len(la), len(lb))
    matched = [float(M[i, j]) for i, j in enumerate(match)]
    return {
        "matrix": M.tolist(),
        "matched": matched,
        "matched_layers": [[la[i], lb[j]] for i, j in enumerate(match)],
        "mean_matched": sum(matched) / len(matched),
        "diagonal": [float(M[i, i]) for i in range(len(la))] if len(la) == len(lb) else None,
        "layers_a": la,
        "layers_b": lb,
        "estimator": estimator,
        "unit": unit,
        "n": acc.n,
        "n_batches": acc.n_batches,
        "n_minibatches": acc.minibatches if estimator != "linear" else None,
        "minibatch_size": minibatch_size if estimator != "linear" else None,
        "n_dropped": acc.dropped if estimator != "linear" else 0,
        "rbf_factor": rbf_factor if estimator == "rbf" else None,
        "skip_first": skip_first,
        "dtype": "float64",
    }
