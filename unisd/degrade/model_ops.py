"""Model-level degradations: walk the ``nn.Linear`` modules, quantize or prune them in place and
return the constraint that keeps them so."""
from __future__ import annotations

from typing import Iterable

import torch

from unisd.degrade.constraints import MaskConstraint, QuantConstraint
from unisd.degrade.prune import nm_mask, parse_pattern, prune_scores, unstructured_mask
from unisd.degrade.quantize import quantize_weight

Tensor = torch.Tensor


def linear_modules(model, skip: Iterable[str] = ("lm_head",)) -> list[tuple[str, torch.nn.Linear]]:
    """(name, module) of every ``nn.Linear`` whose name contains none of ``skip``.

    Embeddings are ``nn.Embedding`` and never included; the LM head is an
    ``nn.Linear`` and is skipped by the default.  Note: with tied embeddings the head
    and the embedding share one tensor, so un-skipping the head changes both.
    """
    skip = tuple(skip)
    out = [(n, m) for n, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and not any(s in n for s in skip)]
    if not out:
        raise ValueError(f"no nn.Linear modules left to degrade (skip={list(skip)})")
    return out


@torch.no_grad()
def input_feature_norms(model, names: list[str], batches: Iterable[dict]) -> dict[str, Tensor]:
    """||X_j||_2 per input feature j of each named linear layer over the calibration tokens.

    batches: dicts with input_ids [B, T] and attention_mask [B, T]; padding tokens are
    excluded.  Returns {name: [in] float32 on the CPU}.  Forward hooks, one pass.
    """
    modules = dict(model.named_modules())
    sq: dict[str, Tensor] = {}
    current: dict[str, Tensor | None] = {"mask": None}

    def hook(name):
        def fn(_mod, inputs, _out):
            x = inputs[0].detach()  # [B, T, in]
            m = current["mask"]
            x = x[m] if m is not None and m.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])  # [n, in]
            v = x.float().square().sum(0)
            sq[name] = v if name not in sq else sq[name] + v
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n_batches = 0
    try:
        for b in batches:
            ids = torch.as_tensor(b["input_ids"]).to(device)
            am = b.get("attention_mask")
            am = torch.ones_like(ids) if am is None else torch.as_tensor(am).to(device)
            current["mask"] = am.bool()
            model(input_ids=ids, attention_mask=am)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("Wanda pruning needs calibration batches, got none")
    return {n: sq[n].sqrt().cpu() for n in names}



@torch.no_grad()
def quantize_model(model, bits: int, symmetric: bool = True, group_size: int | None = 0,
                   skip: Iterable[str] = ("lm_head",), latent: bool = True) -> QuantConstraint:
    """Fake-quantize every ``nn.Linear`` weight (except ``skip``) in place; return the grids.

    ``latent=True`` keeps the pre-quantization weights as the latent copies the
    recovery trains (see :class:`QuantConstraint`).
    """
    grids, lat = {}, {}
    for name, mod in linear_modules(model, skip):
        w = mod.weight
        if latent:
            lat[name] = w.detach().float().clone()
        q, grid = quantize_weight(w, bits, symmetric, group_size)
        w.copy_(q)
        grids[name] = grid
    return QuantConstraint(grids, lat if latent else None)


@torch.no_grad()
def prune_model(model, sparsity: float, method: str = "magnitude", pattern: str = "unstructured",
                scope: str | None = None, skip: Iterable[str] = ("lm_head",),
                calib_batches: Iterable[dict] | None = None) -> MaskConstraint:
    """Prune every ``nn.Linear`` weight (except ``skip``) in place; return the keep-masks.

    method: "magnitude" (score |W|, default scope "layer") or "wanda" (|W| * ||X_j||,
    default scope "row", needs ``calib_batches``).  pattern: "unstructured" or "N:M".
    """
    if method not in ("magnitude", "wanda"):
        raise ValueError(f"pruning method must be 'magnitude' or 'wanda', got {method!r}")
    nm = parse_pattern(pattern)
    mods = linear_modules(model, skip)
    norms: dict[str, Tensor] = {}
    if method == "wanda":
        if calib_batches is None:
            raise ValueError("Wanda pruning needs calibration batches (calib_batches)")
        norms = input_feature_norms(model, [n for n, _ in mods], calib_batches)
    scope = scope or ("row" if method == "wanda" else "layer")
    masks = {}
    for name, mod in mods:
        scores = prune_scores(mod.weight, norms.get(name))
        keep = nm_mask(scores, *nm) if nm else unstructured_mask(scores, sparsity, scope)
        keep = keep.to(mod.weight.device)
        mod.weight.mul_(keep.to(mod.weight.dtype))
        masks[name] = keep
    return MaskConstraint(masks, pattern)

