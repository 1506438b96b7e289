"""Round-to-nearest fake quantization of weight tensors (pure functions; formulas in the package doc)."""
from __future__ import annotations

import dataclasses

import torch

Tensor = torch.Tensor


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
