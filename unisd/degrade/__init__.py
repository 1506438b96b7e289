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

Modules, lowest first: ``quantize`` and ``prune`` (pure tensor math), ``constraints``,
``model_ops`` (walk a model's ``nn.Linear`` modules), ``registry`` (:func:`degrade`),
``entries`` (quantize, prune) and ``forget`` (registered on import of this package).
"""
from __future__ import annotations

from unisd.degrade.constraints import Constraint, MaskConstraint, NoConstraint, QuantConstraint
from unisd.degrade.entries import PruneOptions, QuantizeOptions
from unisd.degrade.forget import ForgetOptions
from unisd.degrade.model_ops import input_feature_norms, linear_modules, prune_model, quantize_model
from unisd.degrade.prune import nm_mask, parse_pattern, prune_scores, unstructured_mask
from unisd.degrade.quantize import QuantGrid, fake_quant, quant_grid, quantize_weight
from unisd.degrade.registry import (DEGRADATIONS, DegradationSpec, DegradeContext, degradation_summary, degrade,
                                    register_degradation)

__all__ = ["DEGRADATIONS", "Constraint", "DegradationSpec", "DegradeContext", "ForgetOptions", "MaskConstraint",
           "NoConstraint", "PruneOptions", "QuantConstraint", "QuantGrid", "QuantizeOptions", "degradation_summary",
           "degrade", "fake_quant", "input_feature_norms", "linear_modules", "nm_mask", "parse_pattern",
           "prune_model", "prune_scores", "quant_grid", "quantize_model", "quantize_weight", "register_degradation",
           "unstructured_mask"]
