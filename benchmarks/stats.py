"""Percentile bootstrap confidence intervals, vectorised with numpy.

Three ways to call :func:`bootstrap_ci` (``n`` = number of examples; every
replicate resamples ``n`` examples with replacement):

* ``bootstrap_ci(values)`` -- CI of the mean of per-example values (EM, F1,
  correctness, invalid flags).  Fully vectorised.
* ``bootstrap_ci(counts, sum_fn=f)`` -- ``counts`` is an ``(n, k)`` array of additive
  per-example statistics (e.g. true positives / predicted / gold entity counts);
  ``f`` maps the resampled column sums ``(B, k)`` to the metric ``(B,)``.  Used for
  corpus-level metrics (micro/macro F1) that are not means of per-example values.
  Fully vectorised.
* ``bootstrap_ci((y_true, y_pred), metric_fn=f)`` -- generic: ``f(y_true[idx],
  y_pred[idx])`` per replicate (a Python loop; use for any library metric).

The resampling indices depend only on ``(n, n_boot, seed)``, so two metrics of the
same task computed with the same seed use the same resamples (paired CIs).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

_MAX_CELLS = 2_000_000  # index-matrix cells per chunk (bounds memory for large n)


def resample_indices(n: int, n_boot: int = 1000, seed: int = 0):
    """Yield index blocks ``(b, n)`` (int64) whose rows are bootstrap resamples."""
    rng = np.random.default_rng(seed)
    rows = max(1, _MAX_CELLS // max(n, 1))
    done = 0
    while done < n_boot:
        b = min(rows, n_boot - done)
        yield rng.integers(0, n, size=(b, n))
        done += b


def _percentile(stats: np.ndarray, alpha: float) -> tuple[float, float]:
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def bootstrap_ci(data, *, metric_fn: Callable | None = None, sum_fn: Callable | None = None,
                 n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap ``(lo, hi)`` at level ``1 - alpha`` (see module doc)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if metric_fn is not None and sum_fn is not None:
        raise ValueError("pass metric_fn or sum_fn, not both")

    if metric_fn is not None:
        arrays = [np.asarray(a, dtype=object) if not isinstance(a, np.ndarray) else a for a in data]
        n = len(arrays[0])
        if any(len(a) != n for a in arrays):
            raise ValueError(f"bootstrap_ci: arrays have different lengths {[len(a) for a in arrays]}")
        if n == 0:
            return (float("nan"), float("nan"))
        out = [float(metric_fn(*[a[row] for a in arrays]))
               for block in resample_indices(n, n_boot, seed) for row in block]
        return _percentile(np.asarray(out, dtype=np.float64), alpha)

    x = np.asarray(data, dtype=np.float64)
    if sum_fn is None:
        if x.ndim != 1:
            raise ValueError(f"per-example values must be 1-D, got shape {x.shape}")
        n = x.shape[0]
        if n == 0:
            return (float("nan"), float("nan"))
        stats = np.concatenate([x[idx].mean(axis=1) for idx in resample_indices(n, n_boot, seed)])
        return _percentile(stats, alpha)

    if x.ndim != 2:
        raise ValueError(f"counts for sum_fn must be 2-D (n, k), got shape {x.shape}")
    n = x.shape[0]
    if n == 0:
        return (float("nan"), float("nan"))
    # sums: (b, k) = sum over the resampled rows; done as a count-weighted matmul so
    # memory is (b, n) + (b, k), never (b, n, k).
    stats = []
    for idx in resample_indices(n, n_boot, seed):
        weights = np.zeros((idx.shape[0], n), dtype=np.float64)
        np.add.at(weights, (np.arange(idx.shape[0])[:, None], idx), 1.0)  # (b, n) multiplicities
        stats.append(np.asarray(sum_fn(weights @ x), dtype=np.float64))  # (b,)
    return _percentile(np.concatenate(stats), alpha)


def safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (the zero_division=0 convention of sklearn/seqeval)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def f1_from_counts(tp: np.ndarray, n_pred: np.ndarray, n_gold: np.ndarray) -> np.ndarray:
    """F1 = 2 tp / (n_pred + n_gold), elementwise; 0 where both are 0."""
    return safe_div(2.0 * np.asarray(tp, dtype=np.float64),
                    np.asarray(n_pred, dtype=np.float64) + np.asarray(n_gold, dtype=np.float64))


def micro_f1_sums(sums: np.ndarray) -> np.ndarray:
    """sum_fn for columns ``[tp, n_pred, n_gold]``: (B, 3) -> (B,)."""
    return f1_from_counts(sums[:, 0], sums[:, 1], sums[:, 2])


def macro_f1_sums(n_classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """sum_fn for columns ``[tp_1..tp_C, pred_1..pred_C, gold_1..gold_C]``: (B, 3C) -> (B,).

    Macro average over the classes that occur (gold or predicted) in the replicate,
    the convention of seqeval and of sklearn with ``labels`` = the occurring labels.
    """

    def fn(sums: np.ndarray) -> np.ndarray:
        c = n_classes
        tp, pred, gold = sums[:, :c], sums[:, c:2 * c], sums[:, 2 * c:3 * c]  # each (B, C)
        f1 = f1_from_counts(tp, pred, gold)  # (B, C)
        present = ((pred + gold) > 0).astype(np.float64)  # (B, C)
        return safe_div((f1 * present).sum(axis=1), present.sum(axis=1))

    return fn


def metric_entry(value: float, n: int, ci: Sequence[float]) -> dict:
    """The run.json metric record ``{"value", "n", "ci"}`` (floats rounded to 6 places)."""
    def r(v: float) -> float | None:
        v = float(v)
        return None if not np.isfinite(v) else round(v, 6)

    return {"value": r(value), "n": int(n), "ci": [r(ci[0]), r(ci[1])]}


def balanced_accuracy_sums(n_classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """sum_fn for columns ``[tp_1..tp_C, pred_1..pred_C, gold_1..gold_C]``: (B, 3C) -> (B,).

    Mean recall tp_c / gold_c over the classes with gold examples in the replicate (sklearn's
    ``balanced_accuracy_score``; predictions outside the label set count as wrong).
    """

    def fn(sums: np.ndarray) -> np.ndarray:
        c = n_classes
        tp, gold = sums[:, :c], sums[:, 2 * c:3 * c]  # each (B, C)
        present = (gold > 0).astype(np.float64)  # (B, C)
        return safe_div((safe_div(tp, gold) * present).sum(axis=1), present.sum(axis=1))

    return fn


def kappa_sums(n_classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """sum_fn for columns ``[tp_1..tp_C, pred_1..pred_C, gold_1..gold_C]``: (B, 3C) -> (B,).

    Cohen's kappa (p_o - p_e) / (1 - p_e) with p_o = sum_c tp_c / n and p_e = sum_c pred_c gold_c / n^2
    (n = gold count; predictions outside the label set agree with nothing); NaN where p_e = 1.
    """

    def fn(sums: np.ndarray) -> np.ndarray:
        c = n_classes
        tp, pred, gold = sums[:, :c], sums[:, c:2 * c], sums[:, 2 * c:3 * c]  # each (B, C)
        n = gold.sum(axis=1)  # (B,)
        n2 = np.where(n > 0, n, 1.0)
        po = tp.sum(axis=1) / n2  # (B,)
        pe = (pred * gold).sum(axis=1) / n2 ** 2  # (B,)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(pe < 1.0, (po - pe) / (1.0 - pe), np.nan)

    return fn
