"""Centered Kernel Alignment (CKA) between the hidden states of two models.

Estimators (see docs/cka.md for when to use which):

* ``linear``  -- biased linear CKA (Kornblith et al. 2019) over *all* samples, exact.
  Streamed through sufficient statistics (column sums, X^T X, Y^T Y and the
  cross-covariance X^T Y, all float64), so memory does not grow with the number of
  samples: ``8 * (sum d_a) * (sum d_b)`` bytes for the cross block.
* ``unbiased_minibatch`` -- minibatch CKA (Nguyen et al. 2021): unbiased HSIC_1
  (Song et al. 2007) of linear Gram matrices per minibatch, averaged over minibatches
  separately for XY, XX and YY, then normalised.  Independent of the sample count
  in expectation (no O(1/n) inflation).
* ``rbf`` -- the same minibatch scheme with RBF kernels (median-heuristic bandwidth
  per minibatch and layer) and unbiased HSIC_1.

Conventions: all math in float64; a "sample" (unit) is either one real token
(``unit="tokens"``, padding removed with the attention mask) or one sequence
(``unit="mean_pool"``, mean over its real tokens).  Layer ``i`` means
``hidden_states[i]`` of a HF model called with ``output_hidden_states=True``:
0 = embedding output, ``i`` = output of decoder layer ``i``, and the last index is
the last decoder layer *after* the final norm (that is what HF returns there).

Guard for undefined values: when a normaliser (HSIC(X, X) or HSIC(Y, Y)) is <= 0
or not finite -- a constant representation, or an unbiased estimate that came out
negative -- CKA is reported as 0.0 ("no measurable signal"), never NaN.  A negative
*numerator* is kept: the unbiased estimate can be slightly below 0 around
independence, and clamping it would reintroduce a positive bias.

Modules, lowest first: ``estimators`` (pure math, one pair), ``matrix`` (streaming layer-pair
matrices), ``layers`` (hidden states of HF models, :func:`model_cka`), ``plot`` (heatmap), ``cli``
(``python -m benchmarks.cka``).
"""
from __future__ import annotations

from benchmarks.cka.estimators import (ESTIMATORS, F64, UNITS, MinibatchCKA, center, center_gram, cka_from_hsic,
                                       hsic_biased, hsic_unbiased, hsic_unbiased_pairs, hsic_unbiased_self,
                                       kernel_cka, linear_cka, linear_gram, median_distance, rbf_kernel)
from benchmarks.cka.layers import collect_hidden, hidden_for_batch, model_cka, resolve_layers, select_units
from benchmarks.cka.matrix import CKAMatrix, matched_layers
from benchmarks.cka.plot import plot_cka_heatmap

__all__ = ["ESTIMATORS", "F64", "UNITS", "CKAMatrix", "MinibatchCKA", "center", "center_gram", "cka_from_hsic",
           "collect_hidden", "hidden_for_batch", "hsic_biased", "hsic_unbiased", "hsic_unbiased_pairs",
           "hsic_unbiased_self", "kernel_cka", "linear_cka", "linear_gram", "matched_layers", "median_distance",
           "model_cka", "plot_cka_heatmap", "rbf_kernel", "resolve_layers", "select_units"]
