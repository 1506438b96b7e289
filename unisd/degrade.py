"""Degradations for the recovery study (arXiv 2604.15794): quantize, prune, forget.

Each degradation is registered in ``registry("degradation")`` as a
:class:`DegradationSpec` ``(name, options_cls, apply, strength_meaning)``; a config
names it and gives its strength and options::

    degradation: {name: quantize, strength: 4, options: {group_size: 64}}   # 4-bit RTN
    degradation: {name: prune, strength: 0.5, options: {method: wanda}}      # 50 % Wanda
    degradation: {name: forget, strength: 200, options: {tasks: [wnut16]}}   # 200 SFT steps

``apply(model, strength, options, ctx)`` degrades ``model`` in place and returns a
:class:`Constraint` that the recovery loop re-applies after every optimiser step, so
the recovered model stays compressed:

* :class:`QuantConstraint`  the quantization grid (scales / zero points per group);
  ``project`` puts every quantized weight back on it.  With ``latent=True`` (default)
  the recovery keeps a full-precision *latent* copy of each quantized weight that
  accumulates the optimiser's updates (straight-through estimator, as in QAT), so
  updates smaller than half a quantization step are not rounded away; the model's
  weights are always ``Q(latent)``.
* :class:`MaskConstraint`   the sparsity masks; ``project`` zeroes the pruned weights.
* :class:`NoConstraint`     forgetting changes no structure.

The math lives in small pure functions on weight tensors (``quant_grid``,
``fake_quant``, ``quantize_weight``, ``prune_scores``, ``unstructured_mask``,
``nm_mask``); the model-level functions walk ``nn.Linear`` modules.

Quantization (round-to-nearest, "fake" = dequantized in place, any model runs):
W [out, in] is split along ``in`` into groups of ``group_size`` (0 = one group per
output channel, i.e. per-channel).  The last group of a row is zero-padded when
``in`` is not a multiple of the group size (zeros change neither max|w| nor the
[min(w, 0), max(w, 0)] range, so the padding has no effect).
  symmetric:  s = max|w| / (2^(b-1) - 1),           q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1),  w^ = q s
  asymmetric: s = (max(w,0) - min(w,0)) / (2^b - 1), z = round(-min(w,0) / s),
              q = clamp(round(w / s) + z, 0, 2^b - 1),                                            w^ = (q - z) s
The range includes 0, so 0 is exactly representable and |w - w^| <= s / 2 for every
weight (tested).  torch.round rounds half to even.

Pruning (per layer, all ``nn.Linear`` weights except ``skip``):
  magnitude: score |W|,               compared over the whole layer (scope "layer");
  wanda:     score |W_ij| * ||X_j||_2, compared within each output row (scope "row"),
             X_j = the j-th input feature of the layer over the calibration tokens
             (Sun et al. 2023, arXiv 2306.11695).  Ours: the norms come from one pass of
             the *dense* model (Wanda's code re-runs the calibration through the already
             pruned earlier blocks); padding tokens are excluded.
  pattern "N:M" (e.g. 2:4): in every M consecutive input weights of a row keep the N
             with the highest score (sparsity 1 - N/M; the strength is ignored).
Exactly ``round(sparsity * group size)`` weights are pruned per comparison group
(ties broken by position).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from scd.core.registry import registry

DEGRADATIONS = registry("degradation")
Tensor = torch.Tensor


# ============================================================================ quantization
@dataclasses.dataclass
class QuantGrid:
    """The grid of one weight matrix: ``w^ = (clamp(round(w/s) + z, qmin, qmax) - z) * s``.

    scale, zero: [out, n_groups] float32 (zero is integer-valued; 0 when symmetric).
    """

    bits: int
    symmetric: bool
    group_size: int  # the actual group size used (in_features for per-channel)
    in_features: int
    scale: Tensor
    zero: Tensor

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    def step(self) -> Tensor:
        """[out, in] the quantization step (scale) of every weight."""
        return _ungroup(self.scale[..., None].expand(*self.scale.shape, self.group_size), self.in_features)

    def to(self, device) -> "QuantGrid":
        return dataclasses.replace(self, scale=self.scale.to(device), zero=self.zero.to(device))


def _check_bits(bits: int) -> int:
    if int(bits) != bits or not 2 <= int(bits) <= 8:
        raise ValueError(f"quantization bits must be an integer in 2..8, got {bits}")
    return int(bits)


def _group(w: Tensor, group_size: int) -> Tensor:
    """[out, in] -> [out, G, g] (zero-padded along in to a multiple of g)."""
    out, n_in = w.shape
    pad = (-n_in) % group_size
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out, -1, group_size)


def _ungroup(wg: Tensor, in_features: int) -> Tensor:
    """[out, G, g] -> [out, in] (drops the padding)."""
    return wg.reshape(wg.shape[0], -1)[:, :in_features]


def _effective_group(group_size: int | None, in_features: int) -> int:
    if group_size is None or group_size <= 0 or group_size >= in_features:
        return in_features
    return int(group_size)


def quant_grid(w: Tensor, bits: int, symmetric: bool = True, group_size: int | None = 0) -> QuantGrid:
    """The RTN grid of ``w`` [out, in] (see the module doc for the formulas)."""
    bits = _check_bits(bits)
    if w.ndim != 2:
        raise ValueError(f"quantization expects a 2-D weight [out, in], got shape {tuple(w.shape)}")
    g = _effective_group(group_size, w.shape[1])
    wg = _group(w.detach().float(), g)  # [out, G, g]
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = wg.abs().amax(-1) / qmax  # [out, G]
        zero = torch.zeros_like(scale)
    else:
        lo = wg.amin(-1).clamp_max(0.0)
        hi = wg.amax(-1).clamp_min(0.0)
        scale = (hi - lo) / (2 ** bits - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: any scale works
    return QuantGrid(bits, bool(symmetric), g, w.shape[1], scale, zero)


def fake_quant(w: Tensor, grid: QuantGrid) -> Tensor:
    """Round ``w`` [out, in] onto ``grid`` and dequantize; same shape and dtype as ``w``.

    Computed in float32.  Idempotent: ``fake_quant(fake_quant(w, g), g) == fake_quant(w, g)``.
    """
    if w.shape != (grid.scale.shape[0], grid.in_features):
        raise ValueError(f"weight {tuple(w.shape)} does not match its quantization grid "
                         f"({grid.scale.shape[0]}, {grid.in_features})")
    wg = _group(w.detach().float(), grid.group_size)  # [out, G, g]
    s, z = grid.scale[..., None], grid.zero[..., None]  # [out, G, 1]
    q = torch.clamp(torch.round(wg / s) + z, grid.qmin, grid.qmax)
    return _ungroup((q - z) * s, grid.in_features).to(w.dtype)


def quantize_weight(w: Tensor, bits: int, symmetric: bool = True,
                    group_size: int | None = 0) -> tuple[Tensor, QuantGrid]:
    """RTN fake quantization of ``w`` [out, in] -> (dequantized weight [out, in], grid)."""
    grid = quant_grid(w, bits, symmetric, group_size)
    return fake_quant(w, grid), grid


# ============================================================================== pruning
def prune_scores(w: Tensor, act_norm: Tensor | None = None) -> Tensor:
    """Importance of each weight, [out, in]: |W| (magnitude) or |W| * ||X_j|| (Wanda).

    act_norm: [in] L2 norm of each input feature over the calibration tokens.
    """
    s = w.detach().float().abs()
    if act_norm is None:
        return s
    if act_norm.shape != (w.shape[1],):
        raise ValueError(f"activation norms {tuple(act_norm.shape)} do not match the weight's "
                         f"{w.shape[1]} input features")
    return s * act_norm.float().to(s.device)[None, :]


def unstructured_mask(scores: Tensor, sparsity: float, scope: str = "layer") -> Tensor:
    """Keep-mask [out, in] (True = kept) pruning the lowest-scoring weights.

    scope "layer": exactly round(sparsity * numel) weights pruned over the matrix;
    scope "row":   exactly round(sparsity * in) pruned in every output row (Wanda).
    Ties are broken by position (stable sort), so the count is always exact.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in ("layer", "row"):
        raise ValueError(f"pruning scope must be 'layer' or 'row', got {scope!r}")
    rows = scores.reshape(1, -1) if scope == "layer" else scores  # [R, C]
    k = int(round(sparsity * rows.shape[1]))
    keep = torch.ones_like(rows, dtype=torch.bool)
    if k > 0:
        order = torch.sort(rows, dim=1, stable=True).indices[:, :k]  # lowest k per comparison row
        keep.scatter_(1, order, False)
    return keep.reshape(scores.shape)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """"unstructured" -> None; "N:M" -> (N, M) with 0 < N < M."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(x) for x in str(pattern).split(":"))
    except ValueError:
        raise ValueError(f"pruning pattern must be 'unstructured' or 'N:M' (e.g. '2:4'), got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"pruning pattern {pattern!r} needs 0 < N < M")
    return n, m


def nm_mask(scores: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Keep-mask [out, in] keeping the ``n`` highest scores of every ``m`` consecutive inputs."""
    out, n_in = scores.shape
    if n_in % m:
        raise ValueError(f"{n}:{m} sparsity needs in_features divisible by {m}, got {n_in}")
    g = scores.reshape(out, n_in // m, m)
    order = torch.sort(g, dim=-1, stable=True, descending=True).indices[..., :n]  # n best per group
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, order, True)
    return keep.reshape(out, n_in)


# ====================================================================== model traversal
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


# =========================================================================== constraints
class Constraint:
    """What the recovery must keep: ``project(model)`` after every optimiser step."""

    name = "none"

    def project(self, model) -> None:  # noqa: D401
        """Put the model back into the constrained set (in place)."""

    def violation(self, model) -> float:
        """Largest deviation of the model's weights from the constraint (0 = satisfied)."""
        return 0.0

    def summary(self) -> dict:
        return {"constraint": self.name}

    def tensors(self) -> dict[str, Tensor]:
        """The constraint itself (grids / masks), for saving with safetensors."""
        return {}

    def state(self) -> dict[str, Tensor]:
        """Mutable training state (latent weights) for resumable checkpoints."""
        return {}

    def load_state(self, state: dict[str, Tensor]) -> None:
        pass

    def to(self, device) -> "Constraint":
        return self


NoConstraint = Constraint


class QuantConstraint(Constraint):
    """Quantization grids {module name: QuantGrid}; see the module doc for ``latent``."""

    name = "quant_grid"

    def __init__(self, grids: dict[str, QuantGrid], latent: dict[str, Tensor] | None = None):
        self.grids = grids
        self.latent = latent  # {name: full-precision weight}, or None (plain re-quantization)

    def _weight(self, model, name):
        return model.get_submodule(name).weight

    @torch.no_grad()
    def project(self, model) -> None:
        for name, grid in self.grids.items():
            w = self._weight(model, name)
            if self.latent is not None:
                lat = self.latent[name]
                # w was Q(latent) before the step: the optimiser moved it by (w - Q(latent))
                lat.add_(w.float() - fake_quant(lat, grid).float())
                w.copy_(fake_quant(lat, grid))
            else:
                w.copy_(fake_quant(w, grid))

    @torch.no_grad()
    def violation(self, model) -> float:
        worst = 0.0
        for name, grid in self.grids.items():
            w = self._weight(model, name)
            worst = max(worst, float((w.float() - fake_quant(w, grid).float()).abs().max()))
        return worst

    def summary(self) -> dict:
        g = next(iter(self.grids.values()))
        n = sum(int(gr.scale.shape[0] * gr.in_features) for gr in self.grids.values())
        return {"constraint": self.name, "bits": g.bits, "symmetric": g.symmetric, "modules": len(self.grids),
                "weights": n, "latent": self.latent is not None}

    def tensors(self) -> dict[str, Tensor]:
        out = {}
        for name, g in self.grids.items():
            out[f"{name}.scale"] = g.scale.contiguous().cpu()
            out[f"{name}.zero"] = g.zero.contiguous().cpu()
            out[f"{name}.meta"] = torch.tensor([g.bits, int(g.symmetric), g.group_size, g.in_features])
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], latent: dict[str, Tensor] | None = None) -> "QuantConstraint":
        grids = {}
        for key in t:
            if key.endswith(".meta"):
                name = key[: -len(".meta")]
                bits, sym, gs, n_in = (int(x) for x in t[key].tolist())
                grids[name] = QuantGrid(bits, bool(sym), gs, n_in, t[f"{name}.scale"].float(), t[f"{name}.zero"].float())
        return cls(grids, latent)

    def state(self) -> dict[str, Tensor]:
        return {} if self.latent is None else {k: v.detach().cpu() for k, v in self.latent.items()}

    def load_state(self, state: dict[str, Tensor]) -> None:
        if self.latent is not None and state:
            for k, v in state.items():
                self.latent[k].copy_(v)

    def to(self, device) -> "QuantConstraint":
        self.grids = {k: g.to(device) for k, g in self.grids.items()}
        if self.latent is not None:
            self.latent = {k: v.to(device) for k, v in self.latent.items()}
        return self


class MaskConstraint(Constraint):
    """Sparsity masks {module name: keep-mask [out, in] bool}."""

    name = "sparsity_mask"

    def __init__(self, masks: dict[str, Tensor], pattern: str = "unstructured"):
        self.masks = masks
        self.pattern = pattern

    @torch.no_grad()
    def project(self, model) -> None:
        for name, keep in self.masks.items():
            w = model.get_submodule(name).weight
            w.mul_(keep.to(w.device, w.dtype))

    @torch.no_grad()
    def violation(self, model) -> float:
        worst = 0.0
        for name, keep in self.masks.items():
            w = model.get_submodule(name).weight
            pruned = w[~keep.to(w.device)]
            if pruned.numel():
                worst = max(worst, float(pruned.abs().max()))
        return worst

    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return sum(int((~m).sum()) for m in self.masks.values()) / max(total, 1)

    def summary(self) -> dict:
        return {"constraint": self.name, "pattern": self.pattern, "modules": len(self.masks),
                "weights": sum(m.numel() for m in self.masks.values()), "sparsity": round(self.sparsity(), 6)}

    def tensors(self) -> dict[str, Tensor]:
        return {f"{name}.mask": m.to(torch.uint8).contiguous().cpu() for name, m in self.masks.items()}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], pattern: str = "unstructured") -> "MaskConstraint":
        return cls({k[: -len(".mask")]: v.bool() for k, v in t.items() if k.endswith(".mask")}, pattern)

    def to(self, device) -> "MaskConstraint":
        self.masks = {k: v.to(device) for k, v in self.masks.items()}
        return self


# ======================================================================= model-level ops
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


# ===================================================================== registry entries
@dataclasses.dataclass
class DegradeContext:
    """What a degradation may need besides the model (filled in by the recipe).

    calib_batches(n) -> list of {input_ids, attention_mask} batches (Wanda calibration);
    load_pairs(tasks, limit) -> [(prompt, target)] (forgetting SFT data).
    """

    tokenizer: Any = None
    device: Any = None
    seed: int = 0
    run_dir: Path | None = None
    calib_batches: Callable[[int], list[dict]] | None = None
    load_pairs: Callable[[tuple[str, ...], int | None], list[tuple[str, str]]] | None = None


@dataclasses.dataclass(frozen=True)
class DegradationSpec:
    name: str
    options_cls: type
    apply: Callable[[Any, float, Any, DegradeContext], Constraint]
    strength_meaning: str
    doc: str = ""

    def options(self, data: dict | None):
        """Validate an ``options`` mapping into this degradation's options dataclass."""
        from scd.core.config import ConfigError, from_dict

        try:
            return from_dict(self.options_cls, dict(data or {}))
        except ConfigError as e:
            raise ValueError(f"degradation '{self.name}' options: {e}") from None


def register_degradation(spec: DegradationSpec, override: bool = False) -> DegradationSpec:
    return DEGRADATIONS.add(spec.name, spec, override=override)


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    symmetric: bool = True
    group_size: int = 64  # 0: per output channel
    skip: tuple[str, ...] = ("lm_head",)
    latent: bool = True  # recovery trains latent full-precision weights (STE); False: re-round the weights


def _apply_quantize(model, strength: float, opts: QuantizeOptions, ctx: DegradeContext) -> Constraint:
    return quantize_model(model, _check_bits(strength), opts.symmetric, opts.group_size, opts.skip, opts.latent)


@dataclasses.dataclass(frozen=True)
class PruneOptions:
    method: str = "wanda"  # wanda | magnitude
    pattern: str = "unstructured"  # unstructured | N:M (e.g. 2:4; then the strength is ignored)
    scope: str | None = None  # layer | row (default: layer for magnitude, row for wanda)
    skip: tuple[str, ...] = ("lm_head",)
    calib_batches: int = 4  # Wanda calibration batches (of the recovery prompts)

    def __post_init__(self) -> None:
        if self.method not in ("wanda", "magnitude"):
            raise ValueError(f"prune method must be wanda or magnitude, got {self.method!r}")
        parse_pattern(self.pattern)
        if self.scope not in (None, "layer", "row"):
            raise ValueError(f"prune scope must be layer or row, got {self.scope!r}")


def _apply_prune(model, strength: float, opts: PruneOptions, ctx: DegradeContext) -> Constraint:
    batches = None
    if opts.method == "wanda":
        if ctx.calib_batches is None:
            raise ValueError("Wanda pruning needs calibration batches; the recipe provides them from data.tasks")
        batches = ctx.calib_batches(opts.calib_batches)
    return prune_model(model, float(strength), opts.method, opts.pattern, opts.scope, opts.skip, batches)


@dataclasses.dataclass(frozen=True)
class ForgetOptions:
    tasks: tuple[str, ...] = ("wnut16",)  # the task family fine-tuned on (e.g. the NER tasks)
    limit_per_task: int | None = 2000
    lr: float = 1e-4
    batch_size: int = 8
    max_len: int = 256
    schedule: str = "constant"
    warmup_ratio: float = 0.0
    save_every: int = 50


def _apply_forget(model, strength: float, opts: ForgetOptions, ctx: DegradeContext) -> Constraint:
    """SFT for ``strength`` steps on ``opts.tasks`` (scd.sft.train_sft); no constraint.

    Resumable: train_sft checkpoints under ``ctx.run_dir/degrade``.
    """
    steps = int(strength)
    if steps != strength or steps < 0:
        raise ValueError(f"forget strength is a number of SFT steps (integer >= 0), got {strength}")
    if steps == 0:
        return NoConstraint()
    if ctx.load_pairs is None or ctx.tokenizer is None:
        raise ValueError("forget needs training pairs and a tokenizer (ctx.load_pairs, ctx.tokenizer)")
    from scd.core.results import MetricsWriter
    from scd.core.train import TrainConfig, resolve_device
    from scd.sft import train_sft

    pairs = ctx.load_pairs(tuple(opts.tasks), opts.limit_per_task)
    tcfg = TrainConfig(lr=opts.lr, max_steps=steps, batch_size=opts.batch_size, max_len=opts.max_len,
                       schedule=opts.schedule, warmup_ratio=opts.warmup_ratio, save_every=opts.save_every,
                       log_every=max(1, min(10, steps)))
    run_dir = Path(ctx.run_dir) / "degrade" if ctx.run_dir is not None else None
    if run_dir is None:
        import tempfile

        run_dir = Path(tempfile.mkdtemp(prefix="forget-"))
    device = ctx.device if ctx.device is not None else resolve_device("auto")
    if not (run_dir / "ckpt" / "last" / "state.pt").exists():  # fresh start: drop rows of a killed attempt
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    train_sft(model, ctx.tokenizer, pairs, tcfg, seed=ctx.seed, run_dir=run_dir,
              metrics=MetricsWriter(run_dir / "metrics.jsonl"), device=device)
    model.eval()
    return NoConstraint()


register_degradation(DegradationSpec(
    "quantize", QuantizeOptions, _apply_quantize, "bits",
    "round-to-nearest fake quantization of nn.Linear weights (per-channel or per-group)"))
register_degradation(DegradationSpec(
    "prune", PruneOptions, _apply_prune, "sparsity",
    "magnitude or Wanda pruning of nn.Linear weights (unstructured or N:M)"))
register_degradation(DegradationSpec(
    "forget", ForgetOptions, _apply_forget, "sft_steps",
    "SFT on one task family for k steps (catastrophic forgetting of the others)"))


def degrade(model, name: str, strength: float, options: dict | None = None,
            ctx: DegradeContext | None = None) -> Constraint:
    """Apply the registered degradation ``name`` to ``model`` in place; return its constraint."""
    spec = DEGRADATIONS.get(name)
    return spec.apply(model, strength, spec.options(options), ctx or DegradeContext())


def degradation_summary(constraint: Constraint, model=None) -> dict:
    out = dict(constraint.summary())
    if model is not None:
        out["violation"] = constraint.violation(model)
    return {k: (round(v, 8) if isinstance(v, float) and math.isfinite(v) else v) for k, v in out.items()}
