"""Statistics over seeds: mean/std, exact or Monte Carlo bootstrap CIs, deltas vs a baseline."""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import numpy as np

from benchmarks.stats import bootstrap_ci

EXACT_BOOTSTRAP_MAX = 50_000  # enumerate all n^n resamples up to this many (n <= 6)
N_BOOT = 2000
ALPHA = 0.05


def finite(v: Any) -> bool:
    """A real, finite number (bools excluded)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def chance_normalise(x: float, chance: float) -> float:
    """(x - chance) / (1 - chance): 0 = the floor (chance level), 1 = perfect (higher-is-better in [0, 1])."""
    return (x - chance) / (1.0 - chance)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (ddof 1; None for a single value)."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), (float(x.std(ddof=1)) if x.size > 1 else None)


def bootstrap_mean_ci(values: list[float], *, alpha: float = ALPHA, n_boot: int = N_BOOT,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over seeds.

    For n seeds with n^n <= EXACT_BOOTSTRAP_MAX every ordered resample is enumerated
    (the exact bootstrap distribution, no Monte Carlo noise); quantiles use numpy's
    default linear interpolation, like ``benchmarks.stats``.
    """
    x = np.asarray(values, dtype=np.float64)  # (n,)
    n = x.size
    if n == 0:
        return (math.nan, math.nan)
    if n == 1:
        return (float(x[0]), float(x[0]))
    if n ** n <= EXACT_BOOTSTRAP_MAX:
        idx = np.array(list(itertools.product(range(n), repeat=n)), dtype=np.int64)  # (n^n, n)
        means = x[idx].mean(axis=1)  # (n^n,)
        lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
        return (float(lo), float(hi))
    return bootstrap_ci(x, n_boot=n_boot, seed=seed, alpha=alpha)


def unpaired_delta_ci(a: list[float], b: list[float], *, alpha: float = ALPHA, n_boot: int = N_BOOT,
                      seed: int = 0) -> tuple[float, float]:
    """CI of mean(a) - mean(b), resampling each side independently (Monte Carlo)."""
    rng = np.random.default_rng(seed)
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ma = xa[rng.integers(0, xa.size, size=(n_boot, xa.size))].mean(axis=1)  # (B,)
    mb = xb[rng.integers(0, xb.size, size=(n_boot, xb.size))].mean(axis=1)  # (B,)
    lo, hi = np.quantile(ma - mb, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


@dataclasses.dataclass
class Delta:
    value: float
    lo: float
    hi: float
    how: str  # "paired (n seeds)" | "unpaired" | "run CIs" (one seed each side) | "no CI"


def delta_vs_baseline(a: dict[int, float], b: dict[int, float], a_ci: tuple[float, float] | None = None,
                      b_ci: tuple[float, float] | None = None) -> Delta | None:
    """Delta of ``a`` (seed -> value) vs baseline ``b``.

    * >= 2 shared seeds: paired -- delta = mean over shared seeds of a[s] - b[s], CI =
      bootstrap of those differences;
    * both sides >= 2 seeds otherwise: unpaired bootstrap, delta = mean(a) - mean(b);
    * else (a single seed on a side): delta = mean(a) - mean(b), CI half-width =
      sqrt(h_a^2 + h_b^2) from each side's CI (normal approximation).
    """
    if not a or not b:
        return None
    shared = sorted(set(a) & set(b))
    if len(shared) >= 2:
        d = [a[s] - b[s] for s in shared]
        lo, hi = bootstrap_mean_ci(d)
        return Delta(float(np.mean(d)), lo, hi, f"paired ({len(shared)} seeds)")
    va, vb = list(a.values()), list(b.values())
    value = float(np.mean(va) - np.mean(vb))
    if len(va) >= 2 and len(vb) >= 2:
        lo, hi = unpaired_delta_ci(va, vb)
        return Delta(value, lo, hi, "unpaired")
    if a_ci is None or b_ci is None or any(not finite(v) for v in (*a_ci, *b_ci)):
        return Delta(value, math.nan, math.nan, "no CI")
    h = math.hypot((a_ci[1] - a_ci[0]) / 2, (b_ci[1] - b_ci[0]) / 2)
    return Delta(value, value - h, value + h, "run CIs")
