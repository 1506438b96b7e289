"""Leaderboards from run.json files only: parquet table, markdown + csv, PNG figures.

    python -m benchmarks.leaderboard results/demo        # one grid
    python -m benchmarks.leaderboard                     # every grid under results/, + index

Reads ``results/<grid>/*/run.json`` (validated with ``validate_run_record``; bad files
are skipped with a warning), never logs.  Writes, atomically, into ``results/<grid>/``:
``runs.parquet`` (one row per run), ``leaderboard.md`` / ``leaderboard.csv`` (one row
per configuration = method + config without the seed), ``leaderboard.json`` (summary
for the index), ``figures/*.png``; and regenerates ``results/README.md``.

Statistics (docs/grid.md has the exact rules):

* per task, the primary metric: mean +- std (ddof 1) over seeds and a 95% percentile
  bootstrap CI over seeds (exact enumeration of all n^n resamples for n <= 6 seeds,
  ``benchmarks.stats.bootstrap_ci`` beyond); a single seed carries the run's own CI;
* ``avg`` = mean over tasks of the chance-normalised primary metric
  ``(x - chance) / (1 - chance)`` (higher-is-better metrics in [0, 1] only), per run,
  then mean/std/CI over seeds;
* delta vs the grid's baseline method: paired by seed (bootstrap of per-seed
  differences) when >= 2 seeds are shared, unpaired bootstrap otherwise;
* rank by ``avg`` (ties share the rank).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from scd.core.faults import fault_point
from scd.core.results import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, validate_run_record

EXACT_BOOTSTRAP_MAX = 50_000  # enumerate all n^n resamples up to this many (n <= 6)
N_BOOT = 2000
ALPHA = 0.05


class LeaderboardWarning(UserWarning):
    """A run.json was skipped (unreadable or not matching the schema)."""


# ============================================================================ statistics
def chance_normalise(x: float, chance: float) -> float:
    """(x - chance) / (1 - chance): 0 = chance level, 1 = perfect (higher-is-better in [0, 1])."""
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
    from benchmarks.stats import bootstrap_ci

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
    how: str  # "paired" (n shared seeds) | "unpaired" | "run CIs" (one seed each side)


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
    if a_ci is None or b_ci is None or any(not _finite(v) for v in (*a_ci, *b_ci)):
        return Delta(value, math.nan, math.nan, "no CI")
    h = math.hypot((a_ci[1] - a_ci[0]) / 2, (b_ci[1] - b_ci[0]) / 2)
    return Delta(value, value - h, value + h, "run CIs")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ============================================================================ loading
def load_records(grid_dir: str | os.PathLike, *, plan_only: bool = True) -> tuple[list[dict], list[str], int]:
    """Valid run.json records of a grid directory (each with ``_path``), the skip warnings,
    and the number of runs ignored because they are not in the grid's current plan.json."""
    gdir = Path(grid_dir)
    planned = None
    if plan_only and (gdir / "plan.json").exists():
        try:
            planned = {r["run_id"] for r in read_json(gdir / "plan.json")["runs"]}
        except (OSError, ValueError, KeyError, TypeError):
            planned = None
    records, problems, stale = [], [], 0
    for p in sorted(gdir.glob("*/run.json")):
        rel = f"{gdir.name}/{p.parent.name}/run.json"
        try:
            rec = read_json(p)
            if not isinstance(rec, dict):
                raise ValueError(f"{rel}: top level should be an object")
            validate_run_record(rec, rel)
        except (OSError, ValueError) as e:
            msg = str(e) if rel in str(e) else f"{rel}: {e}"
            problems.append(msg)
            warnings.warn(f"skipping {msg}", LeaderboardWarning, stacklevel=2)
            continue
        if planned is not None and p.parent.name not in planned:
            stale += 1
            continue
        rec = dict(rec)
        rec["_path"] = str(p)
        rec["_dir"] = p.parent.name
        records.append(rec)
    return records, problems, stale


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists kept as values; an empty mapping sets nothing (like an
    absent key: ``prompts: {}`` and no ``prompts`` are the same configuration)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict):
                out.update(flatten(v, key))
            else:
                out[key] = v
    return out


_NOT_HPARAMS = {"seed", "grid", "method", "recipe"}
# top-level keys that say how a run was executed, not what was computed (benchmarks.evaluate records
# its output folder, thread count, device and progress flag in its config)
_EXECUTION_KEYS = {"out", "progress", "num_threads", "device"}


def config_of(rec: dict) -> dict[str, Any]:
    """Flattened configuration that identifies the group (``config`` if present, else
    ``hparams``), without seed/grid/method/recipe and the top-level execution keys."""
    cfg = rec.get("config") if isinstance(rec.get("config"), dict) and rec.get("config") else rec["hparams"]
    return {k: v for k, v in flatten(cfg).items()
            if k.split(".")[0] not in _NOT_HPARAMS and k not in _EXECUTION_KEYS}


def _canon(v: Any) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"), default=str)


# ============================================================================ metrics
@dataclasses.dataclass
class TaskMetric:
    task: str
    metric: str
    higher_is_better: bool = True
    chance: float | None = None
    normalisable: bool = False

    @property
    def key(self) -> str:
        return f"{self.task}/{self.metric}"


def metric_meta(rec: dict, task: str, metric: str) -> dict:
    """metric_meta entry: key "task/metric" (documented), falling back to the bare metric name."""
    mm = rec.get("metric_meta") or {}
    m = mm.get(f"{task}/{metric}")
    if not isinstance(m, dict):
        m = mm.get(metric)
    return m if isinstance(m, dict) else {}


def primary_metrics(records: list[dict]) -> tuple[list[TaskMetric], list[str]]:
    """Per task: the metric flagged ``primary`` (else the only one, else the first)."""
    notes: list[str] = []
    tasks: dict[str, list[str]] = {}
    for rec in records:
        for task, metrics in rec["eval"].items():
            lst = tasks.setdefault(task, [])
            for m in metrics:
                if m not in lst:
                    lst.append(m)
    out = []
    for task, metrics in tasks.items():
        flagged = [m for m in metrics if any(metric_meta(r, task, m).get("primary") for r in records)]
        if flagged:
            m = flagged[0]
        else:
            m = metrics[0]
            if len(metrics) > 1:
                notes.append(f"task {task}: no metric flagged primary in metric_meta; using '{m}'")
        meta = next((metric_meta(r, task, m) for r in records if metric_meta(r, task, m)), {})
        tm = TaskMetric(task, m, bool(meta.get("higher_is_better", True)),
                        float(meta["chance"]) if _finite(meta.get("chance")) else None)
        values = [_value(r, tm) for r in records]
        values = [v for v in values if v is not None]
        chance = tm.chance if tm.chance is not None else 0.0
        tm.normalisable = (tm.higher_is_better and chance < 1.0 and bool(values)
                           and all(0.0 <= v <= 1.0 for v in values))
        if not tm.normalisable:
            notes.append(f"{tm.key}: left out of avg (normalisation needs a higher-is-better metric in [0, 1])")
        out.append(tm)
    return out, notes


def _value(rec: dict, tm: TaskMetric) -> float | None:
    v = ((rec["eval"].get(tm.task) or {}).get(tm.metric) or {}).get("value")
    return float(v) if _finite(v) else None


def _run_ci(rec: dict, tm: TaskMetric) -> tuple[float, float] | None:
    ci = ((rec["eval"].get(tm.task) or {}).get(tm.metric) or {}).get("ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_finite(c) for c in ci):
        return (float(ci[0]), float(ci[1]))
    return None


def run_avg(rec: dict, tms: list[TaskMetric]) -> tuple[float | None, tuple[float, float] | None]:
    """A run's mean over normalisable tasks of the chance-normalised primary metric, and the
    same mean of its normalised CI bounds (conservative; used for single-seed groups)."""
    norm = [tm for tm in tms if tm.normalisable]
    if not norm:
        return None, None
    vals, los, his = [], [], []
    for tm in norm:
        v = _value(rec, tm)
        if v is None:
            return None, None
        c = tm.chance or 0.0
        vals.append(chance_normalise(v, c))
        ci = _run_ci(rec, tm)
        if ci is not None:
            los.append(chance_normalise(ci[0], c))
            his.append(chance_normalise(ci[1], c))
    ci_out = (float(np.mean(los)), float(np.mean(his))) if len(los) == len(norm) else None
    return float(np.mean(vals)), ci_out


# ============================================================================ groups
@dataclasses.dataclass
class Stat:
    mean: float | None = None
    std: float | None = None
    lo: float | None = None
    hi: float | None = None
    by_seed: dict = dataclasses.field(default_factory=dict)  # seed -> value
    delta: Delta | None = None


@dataclasses.dataclass
class Group:
    config_id: str
    method: str
    config: dict  # flattened, without seed/grid/method/recipe
    records: list[dict] = dataclasses.field(default_factory=list)
    label: str = ""
    hparams: dict = dataclasses.field(default_factory=dict)  # varying within a method (csv columns)
    shown: dict = dataclasses.field(default_factory=dict)  # hparams less sub-options (label, markdown)
    components: dict = dataclasses.field(default_factory=dict)
    tasks: dict = dataclasses.field(default_factory=dict)  # key -> Stat
    avg: Stat = dataclasses.field(default_factory=Stat)
    cka: float | None = None
    rank: int | None = None
    is_baseline: bool = False
    baseline_id: str | None = None

    @property
    def ok(self) -> list[dict]:
        return [r for r in self.records if r["status"] == "ok"]

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.records)

    @property
    def seeds(self) -> list[int]:
        return sorted({r["seed"] for r in self.ok})


def make_groups(records: list[dict]) -> list[Group]:
    """Group by method + configuration without the seed; name varying keys."""
    groups: dict[str, Group] = {}
    for rec in records:
        cfg = config_of(rec)
        key = _canon([rec["method"], cfg])
        gid = hashlib.sha256(key.encode()).hexdigest()[:8]
        g = groups.setdefault(gid, Group(gid, rec["method"], cfg))
        g.records.append(rec)
    out = list(groups.values())
    # displayed hparams: keys that vary among groups of the same method (sweep axes);
    # keys that only differ between methods are part of the method's definition
    keys: list[str] = []
    for g in out:
        for k in g.config:
            if k not in keys and k.split(".")[0] != "components":
                keys.append(k)
    methods = {g.method for g in out}
    varying = [k for k in keys
               if any(len({_canon(g.config.get(k)) for g in out if g.method == m}) > 1 for m in methods)]
    shown = [k for k in varying if not _sub_option(k, varying, out)]
    for g in out:
        g.hparams = {k: g.config.get(k) for k in varying}
        g.shown = {k: g.config.get(k) for k in shown}
        comps: dict = {}
        for r in g.records:
            comps.update({k: bool(v) for k, v in (r.get("components") or {}).items()})
        g.components = comps
        g.label = g.method + "".join(f" {k.split('.')[-1] if _unique_leaf(k, varying) else k}={_fmt_v(v)}"
                                     for k, v in g.shown.items() if v is not None)
    return out


def _sub_option(k: str, keys: list[str], groups: list[Group]) -> bool:
    """Is ``k`` an option of one choice of another key (e.g. ``degradation.options.group_size`` of
    ``degradation.name: quantize``)?  True when ``k`` is unset (None) in some groups and constant among the
    groups sharing each value of an earlier key: it adds no information to the label and only clutters
    the table (the csv keeps it)."""
    vals = [_canon(g.config.get(k)) for g in groups]
    if _canon(None) not in vals:
        return False
    for k2 in keys[:keys.index(k)]:
        seen: dict[str, str] = {}
        if all(seen.setdefault(_canon(g.config.get(k2)), v) == v for g, v in zip(groups, vals)):
            return True
    return False


def _unique_leaf(k: str, keys: list[str]) -> bool:
    leaf = k.split(".")[-1]
    return sum(x.split(".")[-1] == leaf for x in keys) == 1


def _fmt_v(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def metric_stat(g: Group, tm: TaskMetric) -> Stat:
    """One metric of one configuration over its seeds: mean, std, CI (a single seed: its own CI)."""
    ok = sorted(g.ok, key=lambda r: r["seed"])
    by_seed = {r["seed"]: _value(r, tm) for r in ok if _value(r, tm) is not None}
    st = Stat(by_seed=by_seed)
    if by_seed:
        st.mean, st.std = mean_std(list(by_seed.values()))
        if len(by_seed) == 1:
            rec = next(r for r in ok if _value(r, tm) is not None)
            st.lo, st.hi = _run_ci(rec, tm) or (st.mean, st.mean)
        else:
            st.lo, st.hi = bootstrap_mean_ci(list(by_seed.values()))
    return st


def secondary_metrics(records: list[dict], tms: list[TaskMetric]) -> list[TaskMetric]:
    """Every reported metric that is not a task's primary one (e.g. f1_macro, label_nll)."""
    primary = {tm.key for tm in tms}
    out: dict[str, TaskMetric] = {}
    for rec in records:
        for task, metrics in rec["eval"].items():
            for m in metrics:
                key = f"{task}/{m}"
                if key in primary or key in out:
                    continue
                meta = metric_meta(rec, task, m)
                out[key] = TaskMetric(task, m, bool(meta.get("higher_is_better", True)),
                                      float(meta["chance"]) if _finite(meta.get("chance")) else None)
    return list(out.values())


def secondary_table(groups: list[Group], sec: list[TaskMetric], baseline: str | None) -> list[str]:
    """Markdown lines: every secondary metric per configuration, with its delta vs the baseline."""
    rows = [g for g in ordered(groups) if g.ok]
    if not sec or not rows:
        return []
    by_id = {g.config_id: g for g in groups}
    head = ["method"] + [f"{tm.task} {tm.metric} {'↑' if tm.higher_is_better else '↓'}"
                         + (f" (chance {tm.chance:.3g})" if tm.chance is not None else "") for tm in sec]
    L = ["## Other metrics", "",
         "Same cells as above" + (f"; (Δ vs {baseline} [95% CI, paired by seed])" if baseline else "") + ".", "",
         "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for g in rows:
        cells = [_md_escape(g.label)]
        b = by_id.get(g.baseline_id) if g.baseline_id else None
        for tm in sec:
            st = metric_stat(g, tm)
            cell = _cell(st)
            if b is not None and b is not g and st.by_seed:
                bst = metric_stat(b, tm)
                if bst.by_seed:
                    d = delta_vs_baseline(st.by_seed, bst.by_seed, _ci(st), _ci(bst))
                    if d is not None:
                        cell += f" (Δ {_f(d.value, sign=True)} [{_f(d.lo, sign=True)}, {_f(d.hi, sign=True)}])"
            cells.append(cell)
        L.append("| " + " | ".join(cells) + " |")
    return L + [""]


def compute(groups: list[Group], tms: list[TaskMetric], baseline: str | None) -> None:
    """Fill per-task stats, avg, cka, baseline deltas and ranks (in place)."""
    for g in groups:
        ok = sorted(g.ok, key=lambda r: r["seed"])
        for tm in tms:
            g.tasks[tm.key] = metric_stat(g, tm)
        avgs = {r["seed"]: run_avg(r, tms) for r in ok}
        by_seed = {s: a for s, (a, _) in avgs.items() if a is not None}
        g.avg = Stat(by_seed=by_seed)
        if by_seed:
            g.avg.mean, g.avg.std = mean_std(list(by_seed.values()))
            if len(by_seed) == 1:
                ci = next(iter(avgs[s][1] for s in by_seed))
                g.avg.lo, g.avg.hi = ci or (g.avg.mean, g.avg.mean)
            else:
                g.avg.lo, g.avg.hi = bootstrap_mean_ci(list(by_seed.values()))
        ckas = [r["cka"]["mean_matched"] for r in ok
                if isinstance(r.get("cka"), dict) and _finite(r["cka"].get("mean_matched"))]
        g.cka = float(np.mean(ckas)) if ckas else None
    if baseline:
        bases = [g for g in groups if g.method == baseline and g.ok]
        for g in groups:
            if not bases or not g.ok:
                continue
            b = pick_baseline(g, bases)
            g.baseline_id = b.config_id
            g.is_baseline = b is g
            for key, st in g.tasks.items():
                bst = b.tasks.get(key)
                if bst is not None and st.by_seed and bst.by_seed:
                    st.delta = delta_vs_baseline(st.by_seed, bst.by_seed, _ci(st), _ci(bst))
            if g.avg.by_seed and b.avg.by_seed:
                g.avg.delta = delta_vs_baseline(g.avg.by_seed, b.avg.by_seed, _ci(g.avg), _ci(b.avg))
    rank_groups(groups, tms)


def _ci(st: Stat) -> tuple[float, float] | None:
    return (st.lo, st.hi) if st.lo is not None and st.hi is not None else None


def pick_baseline(g: Group, bases: list[Group]) -> Group:
    """The baseline configuration for ``g``: the baseline-method group whose config differs
    from g's in the fewest keys (so a sweep compares like with like), ties -> best avg."""
    if g in bases:
        return g
    def diff(b: Group) -> int:
        keys = set(b.config) | set(g.config)
        return sum(_canon(b.config.get(k)) != _canon(g.config.get(k)) for k in keys)
    return min(bases, key=lambda b: (diff(b), -(b.avg.mean if b.avg.mean is not None else -math.inf),
                                     b.config_id))


def rank_groups(groups: list[Group], tms: list[TaskMetric]) -> None:
    """Rank by avg (desc); without any normalisable task, by the first task's primary metric."""
    def score(g: Group) -> float | None:
        if any(tm.normalisable for tm in tms):
            return g.avg.mean
        if not tms:
            return None
        st = g.tasks.get(tms[0].key)
        if st is None or st.mean is None:
            return None
        return st.mean if tms[0].higher_is_better else -st.mean
    scored = sorted([g for g in groups if g.ok and score(g) is not None], key=lambda g: (-score(g), g.label))
    prev, rank = None, 0
    for i, g in enumerate(scored, 1):
        s = round(score(g), 12)
        if s != prev:
            rank, prev = i, s
        g.rank = rank


# ============================================================================ tables
def _r(v: float | None, nd: int = 6) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), nd)


def leaderboard_rows(groups: list[Group], tms: list[TaskMetric], baseline: str | None) -> list[dict]:
    """One dict per configuration (csv columns), best first."""
    comp_names = sorted({c for g in groups for c in g.components})
    hp_keys = list(dict.fromkeys(k for g in groups for k in g.hparams))
    rows = []
    for g in ordered(groups):
        row: dict[str, Any] = {"rank": g.rank, "method": g.method, "config_id": g.config_id, "label": g.label}
        for k in hp_keys:
            v = g.hparams.get(k)
            row[k] = _fmt_v(v) if v is not None else None
        for c in comp_names:
            row[f"components.{c}"] = g.components.get(c)
        for tm in tms:
            st = g.tasks.get(tm.key, Stat())
            row[tm.key] = _r(st.mean)
            row[f"{tm.key}_std"] = _r(st.std)
            row[f"{tm.key}_ci_lo"] = _r(st.lo)
            row[f"{tm.key}_ci_hi"] = _r(st.hi)
            if baseline:
                row[f"{tm.key}_delta"] = _r(st.delta.value) if st.delta else None
                row[f"{tm.key}_delta_ci_lo"] = _r(st.delta.lo) if st.delta else None
                row[f"{tm.key}_delta_ci_hi"] = _r(st.delta.hi) if st.delta else None
        row["avg_norm"] = _r(g.avg.mean)
        row["avg_norm_std"] = _r(g.avg.std)
        row["avg_norm_ci_lo"] = _r(g.avg.lo)
        row["avg_norm_ci_hi"] = _r(g.avg.hi)
        if baseline:
            d = g.avg.delta
            row["delta"] = _r(d.value) if d else None
            row["delta_ci_lo"] = _r(d.lo) if d else None
            row["delta_ci_hi"] = _r(d.hi) if d else None
            row["delta_how"] = d.how if d else None
            row["baseline_config_id"] = g.baseline_id
        row["cka_mean_matched"] = _r(g.cka)
        row["n_seeds"] = len(g.seeds)
        row["seeds"] = " ".join(str(s) for s in g.seeds)
        for s in ("ok", "failed", "diverged", "running"):
            row[f"n_{s}"] = g.count(s)
        rows.append(row)
    return rows


def ordered(groups: list[Group]) -> list[Group]:
    """Rows with ok runs, by rank then label (unranked last)."""
    return sorted([g for g in groups if g.ok], key=lambda g: (g.rank is None, g.rank or 0, g.label))


def _f(v: float | None, nd: int = 3, sign: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    return f"{v:+.{nd}f}" if sign else f"{v:.{nd}f}"


def _cell(st: Stat) -> str:
    if st.mean is None:
        return "—"
    s = _f(st.mean) + (f" ± {_f(st.std)}" if st.std is not None else "")
    if st.lo is not None and st.hi is not None:
        s += f" [{_f(st.lo)}, {_f(st.hi)}]"
    return s


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render_markdown(grid: str, desc: str, groups: list[Group], tms: list[TaskMetric], baseline: str | None,
                    records: list[dict], problems: list[str], notes: list[str], figures: list[str],
                    stale: int) -> str:
    ok = [r for r in records if r["status"] == "ok"]
    seeds = sorted({r["seed"] for r in ok})
    rows = ordered(groups)
    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "failed", "diverged", "running")}
    L = [f"# Leaderboard: {grid}", ""]
    if desc:
        L += [desc, ""]
    status = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    L.append(f"{len(records)} runs{f' ({status})' if status else ''}, {len(rows)} "
             f"configurations, seeds {', '.join(map(str, seeds)) or '—'}."
             + (f" Baseline: **{baseline}**." if baseline else ""))
    L.append("")
    L.append("Cells: mean ± std over seeds [95% bootstrap CI over seeds; a single seed shows its own CI]. "
             "**avg** = mean over tasks of the chance-normalised primary metric, (x − chance) / (1 − chance)"
             + (f"; **Δ** = avg − avg of the baseline **{baseline}** [95% CI; paired by seed]" if baseline else "")
             + ". ↑ higher is better, ↓ lower is better.")
    L.append("")
    hp_keys = list(dict.fromkeys(k for g in groups for k in g.shown))
    comp_names = sorted({c for g in groups for c in g.components})
    if not rows:
        L += ["No finished (status ok) runs yet.", ""]
    head = ["rank", "method"] + hp_keys + comp_names
    head += [f"{tm.task} {tm.metric} {'↑' if tm.higher_is_better else '↓'}" for tm in tms]
    head += ["avg (norm)"] + ([f"Δ vs {baseline}"] if baseline else [])
    has_cka = any(g.cka is not None for g in groups)
    head += (["CKA"] if has_cka else []) + ["seeds", "runs"]
    if rows:
        L.append("| " + " | ".join(head) + " |")
    align = ["---:", "---"] + ["---"] * len(hp_keys) + [":-:"] * len(comp_names) + ["---"] * len(tms) + ["---"]
    align += (["---"] if baseline else []) + (["---:"] if has_cka else []) + ["---:", "---"]
    if rows:
        L.append("|" + "|".join(align) + "|")
    for g in rows:
        cells = [str(g.rank) if g.rank is not None else "—", _md_escape(g.method)]
        cells += [_md_escape(_fmt_v(g.shown.get(k))) for k in hp_keys]
        cells += [("✓" if g.components.get(c) else "·") for c in comp_names]
        cells += [_cell(g.tasks.get(tm.key, Stat())) for tm in tms]
        cells.append(_cell(g.avg))
        if baseline:
            d = g.avg.delta
            if g.is_baseline:
                cells.append("(baseline)")
            elif d is None:
                cells.append("—")
            else:
                cells.append(f"{_f(d.value, sign=True)} [{_f(d.lo, sign=True)}, {_f(d.hi, sign=True)}]")
        if has_cka:
            cells.append(_f(g.cka))
        cells.append(str(len(g.seeds)))
        status = ", ".join(f"{g.count(s)} {s}" for s in ("ok", "failed", "diverged", "running") if g.count(s))
        cells.append(status)
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    L += secondary_table(groups, secondary_metrics(ok, tms), baseline)
    bad = [r for r in records if r["status"] != "ok"]
    if bad:
        L += ["## Failed and incomplete runs (not averaged)", "",
              "| run | method | seed | status | error |", "|---|---|---:|---|---|"]
        for r in sorted(bad, key=lambda r: (r["method"], r["seed"], r["_dir"])):
            err = str(r.get("error") or "").strip().splitlines()
            err_s = err[0][:160] if err else ("still running or interrupted" if r["status"] == "running" else "")
            L.append(f"| [{r['_dir']}]({r['_dir']}/run.json) | {_md_escape(r['method'])} | {r['seed']} | "
                     f"{r['status']} | {_md_escape(err_s)} |")
        L.append("")
    if problems:
        L += ["## Skipped files", ""] + [f"- {_md_escape(p)}" for p in problems] + [""]
    if notes or stale:
        L += ["## Notes", ""] + [f"- {n}" for n in notes]
        if stale:
            L.append(f"- {stale} run(s) in this directory are not in the current plan.json (grid edited) "
                     "and are left out; `--all-runs` includes them.")
        L.append("")
    if figures:
        L += ["## Figures", ""]
        L += [f"![{Path(f).stem}]({f})" for f in figures]
        L.append("")
    L.append("Generated by `python -m benchmarks.leaderboard` from run.json files only; "
             "full table: [leaderboard.csv](leaderboard.csv), per-run table: runs.parquet.")
    return "\n".join(L) + "\n"


def runs_table(records: list[dict], groups: list[Group], tms: list[TaskMetric]):
    """polars DataFrame, one row per run.json (all statuses)."""
    import polars as pl

    gid = {id(r): g.config_id for g in groups for r in g.records}
    rows = []
    all_eval = sorted({(t, m) for r in records for t, ms in r["eval"].items() for m in ms})
    comps = sorted({c for r in records for c in (r.get("components") or {})})
    for r in records:
        row: dict[str, Any] = {
            "run_id": str(r["run_id"]), "dir": r["_dir"], "grid": r.get("grid"), "recipe": r.get("recipe"),
            "method": r["method"], "seed": int(r["seed"]), "status": r["status"],
            "error": (str(r.get("error")) if r.get("error") is not None else None),
            "config_id": gid.get(id(r)), "started": r.get("started"), "finished": r.get("finished"),
            "git_sha": r.get("git_sha"),
            "hparams": _canon(r.get("hparams") or {}), "config": _canon(r.get("config") or {}),
        }
        for k in ("tokens", "wall_s", "peak_mem"):
            v = (r.get("train") or {}).get(k)
            row[f"train.{k}"] = float(v) if _finite(v) else None
        cka = r.get("cka") if isinstance(r.get("cka"), dict) else {}
        row["cka.mean_matched"] = float(cka["mean_matched"]) if _finite(cka.get("mean_matched")) else None
        avg, _ = run_avg(r, tms) if r["status"] == "ok" else (None, None)
        row["avg_norm"] = avg
        for c in comps:
            v = (r.get("components") or {}).get(c)
            row[f"components.{c}"] = bool(v) if v is not None else None
        for t, m in all_eval:
            e = (r["eval"].get(t) or {}).get(m) or {}
            ci = e.get("ci") if isinstance(e.get("ci"), (list, tuple)) and len(e.get("ci")) == 2 else [None, None]
            row[f"{t}/{m}"] = float(e["value"]) if _finite(e.get("value")) else None
            row[f"{t}/{m}.n"] = int(e["n"]) if _finite(e.get("n")) else None
            row[f"{t}/{m}.ci_lo"] = float(ci[0]) if _finite(ci[0]) else None
            row[f"{t}/{m}.ci_hi"] = float(ci[1]) if _finite(ci[1]) else None
        rows.append(row)
    schema: dict[str, Any] = {}
    for row in rows:
        for k, v in row.items():
            if k not in schema or schema[k] is pl.Null:
                schema[k] = (pl.Boolean if isinstance(v, bool) else pl.Int64 if isinstance(v, int)
                             else pl.Float64 if isinstance(v, float) else pl.Utf8 if isinstance(v, str) else pl.Null)
    schema = {k: (pl.Utf8 if v is pl.Null else v) for k, v in schema.items()}
    return pl.DataFrame(rows, schema=schema, orient="row") if rows else pl.DataFrame(schema=schema)


def _csv_text(rows: list[dict]) -> str:
    import polars as pl

    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    data = {c: [r.get(c) for r in rows] for c in cols}
    schema = {}
    for c, vals in data.items():
        kinds = {type(v) for v in vals if v is not None}
        schema[c] = (pl.Boolean if kinds == {bool} else pl.Int64 if kinds == {int}
                     else pl.Float64 if kinds and kinds <= {int, float} else pl.Utf8)
        if schema[c] is pl.Float64:
            data[c] = [float(v) if v is not None else None for v in vals]
        if schema[c] is pl.Utf8:
            data[c] = [None if v is None else str(v) for v in vals]
    buf = io.BytesIO()
    pl.DataFrame(data, schema=schema).write_csv(buf)
    return buf.getvalue().decode("utf-8")


# ============================================================================ figures
def _new_fig(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())


def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_tasks(groups: list[Group], tms: list[TaskMetric], path: Path) -> None:
    """Small multiples: one panel per task (primary metric, own y scale) + the avg panel;
    one bar per configuration (same colour in every panel), whiskers = 95% CI."""
    rows = ordered(groups)
    panels = [(f"{tm.task}: {tm.metric} {'↑' if tm.higher_is_better else '↓'}", tm.key) for tm in tms]
    if any(tm.normalisable for tm in tms):
        panels.append(("avg (chance-normalised) ↑", "__avg__"))
    n, k = len(rows), len(panels)
    ncols = min(4, k)
    nrows = math.ceil(k / ncols)
    fig = _new_fig(max(5.0, ncols * max(2.4, 0.35 * n + 1.0)) + 2.5, 2.9 * nrows + 0.4)
    colors = _colors(n)
    for p, (title, key) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, p + 1)
        for i, (g, color) in enumerate(zip(rows, colors)):
            st = g.avg if key == "__avg__" else g.tasks.get(key, Stat())
            if st.mean is None:
                continue
            lo = max(0.0, st.mean - st.lo) if st.lo is not None else 0.0
            hi = max(0.0, st.hi - st.mean) if st.hi is not None else 0.0
            ax.bar([i], [st.mean], width=0.8, color=color, label=g.label, yerr=[[lo], [hi]], capsize=3,
                   error_kw={"elinewidth": 1, "ecolor": "black"})
        ax.set_title(title, fontsize=10)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks([])
        ax.set_xlim(-0.6, n - 0.4)
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="y", labelsize=8)
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=g.label) for g, c in zip(rows, colors)]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.suptitle("Per-task primary metric: mean over seeds, whiskers = 95% CI", fontsize=11)
    fig.tight_layout()
    _save(fig, path)


def plot_component_deltas(groups: list[Group], baseline: str, path: Path) -> bool:
    """Horizontal bars: avg delta vs baseline per configuration, 95% CI whiskers."""
    rows = [g for g in ordered(groups) if g.avg.delta is not None and not g.is_baseline]
    if not rows:
        return False
    rows.sort(key=lambda g: g.avg.delta.value)
    labels = []
    for g in rows:
        on = [c for c, v in sorted(g.components.items()) if v]
        labels.append(g.label + (f"  [+{' +'.join(on)}]" if on else "  [no components]" if g.components else ""))
    fig = _new_fig(7.5, max(2.5, 0.45 * len(rows) + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    vals = [g.avg.delta.value for g in rows]
    lo = [max(0.0, d.value - d.lo) if math.isfinite(d.lo) else 0.0 for d in (g.avg.delta for g in rows)]
    hi = [max(0.0, d.hi - d.value) if math.isfinite(d.hi) else 0.0 for d in (g.avg.delta for g in rows)]
    colors = ["#2a9d8f" if v >= 0 else "#e76f51" for v in vals]
    ax.barh(range(len(rows)), vals, xerr=[lo, hi], color=colors, height=0.6, capsize=3, error_kw={"elinewidth": 1})
    for y, g in enumerate(rows):
        d = g.avg.delta
        ax.annotate(f"{d.value:+.3f}", (d.value, y), xytext=(4 if d.value >= 0 else -4, 7), textcoords="offset points",
                    ha="left" if d.value >= 0 else "right", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"Δ avg chance-normalised score vs {baseline} (95% CI)")
    ax.set_title(f"Ablation: effect vs baseline '{baseline}'")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    return True


def plot_cka(g: Group, path: Path) -> bool:
    """Heatmap of the group's CKA matrix (mean over seeds when the shapes agree)."""
    mats = [r["cka"] for r in g.ok if isinstance(r.get("cka"), dict) and isinstance(r["cka"].get("matrix"), list)]
    if not mats:
        return False
    try:
        arrs = [np.asarray(m["matrix"], dtype=np.float64) for m in mats]
    except (TypeError, ValueError):
        return False
    arrs = [a for a in arrs if a.ndim == 2 and a.shape == arrs[0].shape and a.size]
    if not arrs:
        return False
    M = np.mean(arrs, axis=0)  # [rows, cols]
    title = f"CKA: {g.label} (mean of {len(arrs)} seed(s))"
    ya, xb = mats[0].get("layers_a"), mats[0].get("layers_b")
    ya = ya if isinstance(ya, list) and len(ya) == M.shape[0] else None
    xb = xb if isinstance(xb, list) and len(xb) == M.shape[1] else None
    try:
        from benchmarks.cka import plot_cka_heatmap

        plot_cka_heatmap(M, path, title=title, xticklabels=xb, yticklabels=ya)
        return True
    except ImportError:
        pass
    fig = _new_fig(min(12.0, max(4.5, 0.35 * M.shape[1] + 2.5)), min(10.0, max(3.8, 0.35 * M.shape[0] + 1.5)))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(M, vmin=0, vmax=1, cmap="magma", origin="lower", aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="CKA")
    ax.set_xlabel("teacher layer")
    ax.set_ylabel("student layer")
    ax.set_title(title)
    _save(fig, path)
    return True


def plot_recovery_vs_cka(records: list[dict], groups: list[Group], tms: list[TaskMetric], path: Path) -> bool:
    """Scatter: a run's avg chance-normalised score vs its mean matched-layer CKA."""
    label = {id(r): g.label for g in groups for r in g.records}
    pts = []
    for r in records:
        if r["status"] != "ok" or not isinstance(r.get("cka"), dict) or not _finite(r["cka"].get("mean_matched")):
            continue
        avg, _ = run_avg(r, tms)
        if avg is not None:
            pts.append((float(r["cka"]["mean_matched"]), avg, label.get(id(r), r["method"])))
    if len(pts) < 2:
        return False
    fig = _new_fig(6.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    labels = list(dict.fromkeys(p[2] for p in pts))
    for lab, color in zip(labels, _colors(len(labels))):
        xs = [p[0] for p in pts if p[2] == lab]
        ys = [p[1] for p in pts if p[2] == lab]
        ax.scatter(xs, ys, color=color, label=lab, s=30, edgecolor="black", linewidth=0.4)
    x = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    title = "Score vs CKA (one point per run)"
    if len(pts) >= 3 and x.std() > 0 and y.std() > 0:
        r = float(np.corrcoef(x, y)[0, 1])
        slope, icpt = np.polyfit(x, y, 1)
        xx = np.linspace(x.min(), x.max(), 2)
        ax.plot(xx, slope * xx + icpt, color="gray", linestyle="--", linewidth=1)
        title += f": Pearson r = {r:.2f} (n = {len(pts)})"
    ax.set_xlabel("mean matched-layer CKA to the teacher / reference")
    ax.set_ylabel("avg chance-normalised score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    _save(fig, path)
    return True


# ============================================================================ build
def _plan_meta(gdir: Path) -> dict:
    try:
        p = read_json(gdir / "plan.json")
        return p if isinstance(p, dict) else {}
    except (OSError, ValueError):
        return {}


def build_leaderboard(grid_dir: str | os.PathLike, *, baseline: str | None = None, figures: bool = True,
                      plan_only: bool = True, index: bool = False) -> Path:
    """Build every leaderboard artefact of one grid directory; returns leaderboard.md's path."""
    from benchmarks.grid import file_lock

    gdir = Path(grid_dir)
    if not gdir.is_dir():
        raise FileNotFoundError(f"{gdir}: no such results directory")
    with file_lock(gdir / ".leaderboard.flock"):
        meta = _plan_meta(gdir)
        records, problems, stale = load_records(gdir, plan_only=plan_only)
        baseline = baseline or meta.get("baseline")
        if baseline and not any(r["method"] == baseline and r["status"] == "ok" for r in records):
            notes_b = [f"baseline '{baseline}' has no finished run yet: no deltas"]
        else:
            notes_b = []
        ok = [r for r in records if r["status"] == "ok"]
        tms, notes = primary_metrics(ok)
        groups = make_groups(records)
        compute(groups, tms, baseline)
        rows = leaderboard_rows(groups, tms, baseline)
        grid = meta.get("grid") or gdir.name
        fig_paths: list[str] = []
        if figures and ok:
            fdir = gdir / "figures"
            if tms:
                plot_tasks(groups, tms, fdir / "tasks.png")
                fig_paths.append("figures/tasks.png")
            if baseline and any(g.components for g in groups) and \
                    plot_component_deltas(groups, baseline, fdir / "component_deltas.png"):
                fig_paths.append("figures/component_deltas.png")
            for g in ordered(groups):
                name = f"figures/cka_{g.config_id}.png"
                if plot_cka(g, gdir / name):
                    fig_paths.append(name)
            if plot_recovery_vs_cka(records, groups, tms, fdir / "recovery_vs_cka.png"):
                fig_paths.append("figures/recovery_vs_cka.png")
            for stale_fig in fdir.glob("cka_*.png"):  # heatmaps of configurations no longer in the table
                if f"figures/{stale_fig.name}" not in fig_paths:
                    stale_fig.unlink()
        md = render_markdown(grid, meta.get("description") or "", groups, tms, baseline, records, problems,
                             notes_b + notes, fig_paths, stale)
        df = runs_table(records, groups, tms)
        buf = io.BytesIO()
        df.write_parquet(buf)
        atomic_write_bytes(gdir / "runs.parquet", buf.getvalue())
        atomic_write_text(gdir / "leaderboard.csv", _csv_text(rows))
        fault_point("leaderboard")  # reliability tests kill here: a rerun rebuilds everything
        atomic_write_text(gdir / "leaderboard.md", md)
        best = next((g for g in ordered(groups) if g.rank == 1), None)
        atomic_write_json(gdir / "leaderboard.json", {
            "grid": grid, "description": meta.get("description") or "",
            "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "baseline": baseline,
            "n_runs": len(records), "n_configs": len(rows),
            **{f"n_{s}": sum(r["status"] == s for r in records) for s in ("ok", "failed", "diverged", "running")},
            "n_skipped_files": len(problems), "tasks": [tm.key for tm in tms],
            "best": ({"label": best.label, "avg_norm": _r(best.avg.mean),
                      "delta": _r(best.avg.delta.value) if best.avg.delta and not best.is_baseline else None}
                     if best else None),
            "figures": fig_paths})
    if index:
        update_index(gdir.parent)
    return gdir / "leaderboard.md"


UNINDEXED = ("runs",)  # <results>/runs: hand-made and on-demand dependency runs (git-ignored)


def _note_title(path: Path) -> str:
    """The first markdown heading of a results note (or its folder name)."""
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#"):
                return line.lstrip("#").strip()
    except (OSError, UnicodeDecodeError):
        pass
    return path.parent.name


def update_index(results_dir: str | os.PathLike) -> Path:
    """Regenerate results/README.md: one line per grid leaderboard, with its timestamp."""
    from benchmarks.grid import file_lock

    root = Path(results_dir)
    with file_lock(root / ".index.flock"):
        lines = ["# Results", "",
                 "Generated by `python -m benchmarks.leaderboard` (also at the end of every grid run). "
                 "One line per grid; each leaderboard is built from its run.json files only.", ""]
        found = 0
        for lb in sorted(root.glob("*/leaderboard.md")):
            gdir = lb.parent
            if gdir.name in UNINDEXED:
                continue
            try:
                s = read_json(gdir / "leaderboard.json")
            except (OSError, ValueError):
                s = {}
            when = s.get("generated") or time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(lb.stat().st_mtime))
            parts = [f"{s.get('n_configs', '?')} configs, {s.get('n_runs', '?')} runs"]
            bad = (s.get("n_failed") or 0) + (s.get("n_diverged") or 0)
            if bad:
                parts[-1] += f" ({bad} failed)"
            if s.get("n_running"):
                parts[-1] += f" ({s['n_running']} unfinished)"
            best = s.get("best")
            if best:
                b = f"best: {best['label']}"
                if best.get("avg_norm") is not None:
                    b += f" (avg {best['avg_norm']:.3f}"
                    if best.get("delta") is not None and s.get("baseline"):
                        b += f", {best['delta']:+.3f} vs {s['baseline']}"
                    b += ")"
                parts.append(b)
            desc = f" — {s['description']}" if s.get("description") else ""
            lines.append(f"- [{gdir.name}]({gdir.name}/leaderboard.md){desc}: {'; '.join(parts)}. "
                         f"Updated {when}.")
            found += 1
        if not found:
            lines.append("No leaderboards yet: run `python -m benchmarks.grid configs/grids/<grid>.yaml`.")
        notes = sorted(p for p in list(root.glob("*/README.md")) + list(root.glob("*/*/README.md"))
                       if p.relative_to(root).parts[0] not in UNINDEXED)
        if notes:
            lines += ["", "Results notes (hand-written, with the commands that produced them):", ""]
            for p in notes:
                rel = p.relative_to(root).as_posix()
                lines.append(f"- [{p.parent.relative_to(root).as_posix()}]({rel}): {_note_title(p)}")
        lines += ["", "`runs/` (runs made by hand and teachers / anchors trained on demand) is not indexed: "
                      "it is not committed."]
        atomic_write_text(root / "README.md", "\n".join(lines) + "\n")
    return root / "README.md"


def find_grid_dirs(results_dir: Path) -> list[Path]:
    return sorted(d for d in results_dir.iterdir()
                  if d.is_dir() and ((d / "plan.json").exists() or any(d.glob("*/run.json"))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.leaderboard",
                                 description="Build leaderboards (md, csv, parquet, PNG) from run.json files.")
    ap.add_argument("grid_dirs", nargs="*", help="results/<grid> directories (default: every grid under --results-dir)")
    ap.add_argument("--results-dir", default="results", help="results root, for the default and the index")
    ap.add_argument("--baseline", help="baseline method (default: the grid's `baseline`, from plan.json)")
    ap.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    ap.add_argument("--all-runs", action="store_true",
                    help="include run dirs that are not in the grid's current plan.json")
    args = ap.parse_args(argv)
    root = Path(args.results_dir)
    dirs = [Path(d) for d in args.grid_dirs] or (find_grid_dirs(root) if root.is_dir() else [])
    if not dirs:
        print(f"error: no grid results under {root}/ (run python -m benchmarks.grid GRID.yaml first)", file=sys.stderr)
        return 2
    rc = 0
    with warnings.catch_warnings():
        warnings.simplefilter("always", LeaderboardWarning)
        warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)  # one line
        for d in dirs:
            try:
                out = build_leaderboard(d, baseline=args.baseline, figures=not args.no_figures,
                                        plan_only=not args.all_runs)
                print(f"wrote {out}")
            except (OSError, ValueError) as e:
                print(f"error: {d}: {e}", file=sys.stderr)
                rc = 2
    index_roots = {Path(d).resolve().parent for d in dirs}
    for r in sorted(index_roots):
        print(f"wrote {update_index(r)}")
    return rc


if __name__ == "__main__":
    from benchmarks.leaderboard import main as _main

    raise SystemExit(_main())
