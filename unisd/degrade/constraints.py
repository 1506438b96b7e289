"""Constraints the recovery re-applies after every optimiser step: quantization grids (with latent
full-precision weights), sparsity masks, or none."""
from __future__ import annotations

import torch

from unisd.degrade.quantize import QuantGrid, fake_quant

Tensor = torch.Tensor


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
