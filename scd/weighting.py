"""Per-sample weighting of the distillation loss against the gold-label loss.

The student's per-sample loss is ``w * KD(x) + (1 - w) * CE(x)`` (``combine``); a
weighting rule, registered in ``registry("weighting")``, produces ``w`` [B]:

* ``none`` — a fixed ``alpha`` for every sample.  ``alpha = 1`` (default) is pure KD;
  ``0 < alpha < 1`` is the classic fixed KD/CE mixture (Hinton et al. 2015);
  ``alpha = 0`` is plain SFT on gold labels.
* ``aw``   — Adaptive Weighting of SCD ("Following the Teacher's Footsteps", arXiv
  2601.10114): w(x) = L_S(x) / (L_S(x) + L_Tc(x)) = sigmoid(log L_S(x) - log L_Tc(x)),
  with L_S the loss on x of a separately SFT-trained student (a fixed anchor) and
  L_Tc the loss of the selected teacher checkpoint (per-sample mean CE on the gold
  target, e.g. ``scd.losses.seq_mean(ce_per_token(...), mask)``; computed once and
  cached by the recipe).  Where the student is already better (small L_S) w is small
  and gold labels dominate; where the teacher is better w -> 1 and KD dominates.
  (The direction is our reading of the paper; see METHODS.md section 1.)

Weights never carry gradient: they are detached constants of the step.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

from scd.core.registry import registry

WEIGHTING = registry("weighting")
Tensor = torch.Tensor


def _losses(x: Tensor, what: str) -> Tensor:
    x = torch.as_tensor(x).detach()
    if not torch.is_floating_point(x) or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if x.ndim != 1:
        raise ValueError(f"AW: {what} should be per-sample losses [B], got shape {tuple(x.shape)}")
    bad = torch.isnan(x) | (x < 0)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"AW: {what} of sample {i} is {x[i].item()}; per-sample losses must be >= 0 and not NaN")
    return x


def adaptive_weight(student_anchor_loss: Tensor, teacher_ckpt_loss: Tensor) -> Tensor:
    """SCD Adaptive Weighting (arXiv 2601.10114): w = sigmoid(log L_S - log L_Tc).  [B], [B] -> [B].

    Computed in log space, so it is exact for tiny (1e-30) and huge (1e30) losses where
    L_S / L_Tc or L_S + L_Tc would under/overflow.  Conventions: equal losses (also
    0 and 0, inf and inf) give 0.5; L_S = 0 gives 0; L_Tc = 0 gives 1.  The result is
    detached (float32, or float64 for float64 inputs).
    """
    a, b = _losses(student_anchor_loss, "student anchor loss"), _losses(teacher_ckpt_loss, "teacher checkpoint loss")
    if a.shape != b.shape:
        raise ValueError(f"AW: student anchor losses {tuple(a.shape)} and teacher checkpoint losses "
                         f"{tuple(b.shape)} have different shapes")
    dt = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dt), b.to(device=a.device, dtype=dt)
    w = torch.sigmoid(torch.log(a) - torch.log(b))  # log 0 = -inf -> sigmoid gives 0 or 1
    return torch.where(a == b, torch.full_like(w, 0.5), w)


def combine(kd: Tensor, ce: Tensor, w: Tensor) -> Tensor:
    """w * KD + (1 - w) * CE with ``w`` detached.  kd, ce [B] or [B, T]; w [B] -> like kd.

    Per-sample ([B], e.g. sequence means) or per-token ([B, T]: w is broadcast over
    the tokens of each sample, so the result can be reduced with
    ``scd.losses.reduce_tokens`` over the whole accumulated batch).
    """
    if kd.shape != ce.shape:
        raise ValueError(f"KD {tuple(kd.shape)} and CE {tuple(ce.shape)} terms have different shapes")
    w = w.detach()
    if w.ndim != 1 or w.shape[0] != kd.shape[0]:
        raise ValueError(f"weights {tuple(w.shape)} should be [B] with B = {kd.shape[0]}")
    w = w.to(kd.dtype).reshape((-1,) + (1,) * (kd.ndim - 1))
    return w * kd + (1 - w) * ce


def _register(name: str, needs_losses: bool):
    def deco(fn):
        fn.needs_losses = needs_losses
        return WEIGHTING.register(name)(fn)
    return deco


@_register("none", needs_losses=False)
def fixed_weight(kd_per_sample: Tensor, *, alpha: float = 1.0, student_anchor_loss: Tensor | None = None,
                 teacher_ckpt_loss: Tensor | None = None) -> Tensor:
    """A fixed weight ``alpha`` for every sample.  [B] -> [B].

    alpha = 1: pure KD (the default); 0 < alpha < 1: fixed KD/CE mixture
    (Hinton et al. 2015); alpha = 0: gold labels only.  Per-sample losses are ignored.
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"weighting 'none': alpha must be in [0, 1], got {alpha}")
    return torch.full((kd_per_sample.shape[0],), alpha, dtype=torch.float32, device=kd_per_sample.device)


@_register("aw", needs_losses=True)
def aw_weight(kd_per_sample: Tensor, *, student_anchor_loss: Tensor | None = None,
              teacher_ckpt_loss: Tensor | None = None) -> Tensor:
    """SCD Adaptive Weighting (arXiv 2601.10114); see ``adaptive_weight``.  [B] -> [B]."""
    if student_anchor_loss is None or teacher_ckpt_loss is None:
        raise ValueError("weighting 'aw' needs per-sample student_anchor_loss and teacher_ckpt_loss "
                         "(losses of the SFT student anchor and of the selected teacher checkpoint)")
    w = adaptive_weight(student_anchor_loss, teacher_ckpt_loss)
    if w.shape[0] != kd_per_sample.shape[0]:
        raise ValueError(f"weighting 'aw': {w.shape[0]} per-sample losses for a batch of {kd_per_sample.shape[0]}")
    return w.to(kd_per_sample.device)


def sample_weights(name: str, kd_per_sample: Tensor, *, student_anchor_loss: Tensor | None = None,
                   teacher_ckpt_loss: Tensor | None = None, **params: Any) -> Tensor:
    """Weights [B] from the registered rule ``name`` with its config ``params``."""
    fn = WEIGHTING.get(name)
    accepted = [p for p in inspect.signature(fn).parameters
                if p not in ("kd_per_sample", "student_anchor_loss", "teacher_ckpt_loss")]
    for key in params:
        if key not in accepted:
            hint = f"; accepted: {', '.join(accepted)}" if accepted else "; it takes no parameters"
            raise ValueError(f"weighting '{name}' got unknown parameter '{key}'{hint}")
    return fn(kd_per_sample, student_anchor_loss=student_anchor_loss, teacher_ckpt_loss=teacher_ckpt_loss, **params)
