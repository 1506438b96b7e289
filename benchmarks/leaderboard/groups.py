"""Configurations (runs grouped without the seed): labels, per-task statistics, avg, deltas, rank, best.

Honest floors: a configuration with a constant-predictor run (>= 95% of its predictions on one
label, flagged by the scorer) is marked and left unranked, so it is never ranked first or named
best; the best configuration must score above the floor (avg > 0) and be alone at the top.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

import numpy as np

from benchmarks.leaderboard.load import TaskMetric, canon, config_of, run_avg, run_ci, run_constant, value_of
from benchmarks.leaderboard.statistics import Delta, bootstrap_mean_ci, delta_vs_baseline, finite, mean_std


@dataclasses.dataclass
class Stat:
    mean: float | None = None
    std: float | None = None
    lo: float | None = None
    hi: float | None = None
    by_seed: dict = dataclasses.field(default_factory=dict)  # seed -> value
    delta: Delta | None = None


@dataclasses.dataclass
class Constant:
    """Constant-predictor runs of one configuration on one task."""
    n_constant: int
    n_runs: int
    share: float  # the smallest max_label_share among the constant runs
    labels: tuple[str, ...]  # the labels they answered


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
    avg: Stat = dataclasses.field(default_factory=Stat)  # against the majority floor
    avg_uniform: Stat = dataclasses.field(default_factory=Stat)  # against uniform chance
    constant: dict = dataclasses.field(default_factory=dict)  # task -> Constant
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
        gid = hashlib.sha256(canon([rec["method"], cfg]).encode()).hexdigest()[:8]
        g = groups.setdefault(gid, Group(gid, rec["method"], cfg))
        g.records.append(rec)
    out = list(groups.values())
    # displayed hparams: keys that vary among groups of the same method (sweep axes);
    # keys that only differ between methods are part of the method's definition
    keys: list[str] = []
    for g in out:
        keys.extend(k for k in g.config if k not in keys and k.split(".")[0] != "components")
    methods = {g.method for g in out}
    varying = [k for k in keys
               if any(len({canon(g.config.get(k)) for g in out if g.method == m}) > 1 for m in methods)]
    shown = [k for k in varying if not _sub_option(k, varying, out)]
    for g in out:
        g.hparams = {k: g.config.get(k) for k in varying}
        g.shown = {k: g.config.get(k) for k in shown}
        comps: dict = {}
        for r in g.records:
            comps.update({k: bool(v) for k, v in (r.get("components") or {}).items()})
        g.components = comps
        g.label = g.method + "".join(f" {k.split('.')[-1] if _unique_leaf(k, varying) else k}={fmt_v(v)}"
                                     for k, v in g.shown.items() if v is not None)
    return out


def _sub_option(k: str, keys: list[str], groups: list[Group]) -> bool:
    """Is ``k`` an option of one choice of another key (e.g. ``degradation.options.group_size`` of
    ``degradation.name: quantize``)?  True when ``k`` is unset (None) in some groups and constant among the
    groups sharing each value of an earlier key: it adds no information to the label and only clutters
    the table (the csv keeps it)."""
    vals = [canon(g.config.get(k)) for g in groups]
    if canon(None) not in vals:
        return False
    for k2 in keys[:keys.index(k)]:
        seen: dict[str, str] = {}
        if all(seen.setdefault(canon(g.config.get(k2)), v) == v for g, v in zip(groups, vals)):
            return True
    return False


def _unique_leaf(k: str, keys: list[str]) -> bool:
    leaf = k.split(".")[-1]
    return sum(x.split(".")[-1] == leaf for x in keys) == 1


def fmt_v(v: Any) -> str:
    if v is None:  # unset, or not applicable (e.g. train.* of a run that trained 0 steps)
        return "—"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def seed_stat(by_seed: dict, single_ci: tuple[float, float] | None) -> Stat:
    """mean, std and CI over seeds (a single seed: ``single_ci``, else a point)."""
    st = Stat(by_seed=by_seed)
    if by_seed:
        st.mean, st.std = mean_std(list(by_seed.values()))
        if len(by_seed) == 1:
            st.lo, st.hi = single_ci or (st.mean, st.mean)
        else:
            st.lo, st.hi = bootstrap_mean_ci(list(by_seed.values()))
    return st


def metric_stat(g: Group, tm: TaskMetric) -> Stat:
    """One metric of one configuration over its seeds: mean, std, CI (a single seed: its own CI)."""
    ok = [r for r in sorted(g.ok, key=lambda r: r["seed"]) if value_of(r, tm) is not None]
    return seed_stat({r["seed"]: value_of(r, tm) for r in ok}, run_ci(ok[0], tm) if len(ok) == 1 else None)


def avg_stat(g: Group, tms: list[TaskMetric], *, uniform: bool = False) -> Stat:
    """avg over tasks of the normalised primary metric, per seed, then over seeds."""
    avgs = {r["seed"]: run_avg(r, tms, uniform=uniform) for r in sorted(g.ok, key=lambda r: r["seed"])}
    by_seed = {s: a for s, (a, _) in avgs.items() if a is not None}
    return seed_stat(by_seed, next(iter(avgs[s][1] for s in by_seed)) if len(by_seed) == 1 else None)


def constant_runs(g: Group, tms: list[TaskMetric]) -> dict[str, Constant]:
    """Per task, the configuration's constant-predictor runs (tasks without any are left out)."""
    out = {}
    for tm in tms:
        flags = [run_constant(r, tm.task) for r in g.ok if tm.task in r["eval"]]
        hits = [f for f in flags if f is not None]
        if hits:
            labels = tuple(dict.fromkeys(str(h["label"]) for h in hits))
            out[tm.task] = Constant(len(hits), len(flags), min(h["share"] for h in hits), labels)
    return out


def compute(groups: list[Group], tms: list[TaskMetric], baseline: str | None) -> None:
    """Fill per-task stats, avg, constant flags, cka, baseline deltas and ranks (in place)."""
    for g in groups:
        for tm in tms:
            g.tasks[tm.key] = metric_stat(g, tm)
        g.avg = avg_stat(g, tms)
        g.avg_uniform = avg_stat(g, tms, uniform=True)
        g.constant = constant_runs(g, tms)
        ckas = [r["cka"]["mean_matched"] for r in g.ok
                if isinstance(r.get("cka"), dict) and finite(r["cka"].get("mean_matched"))]
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
                    st.delta = delta_vs_baseline(st.by_seed, bst.by_seed, ci_of(st), ci_of(bst))
            if g.avg.by_seed and b.avg.by_seed:
                g.avg.delta = delta_vs_baseline(g.avg.by_seed, b.avg.by_seed, ci_of(g.avg), ci_of(b.avg))
    rank_groups(groups, tms)


def ci_of(st: Stat) -> tuple[float, float] | None:
    return (st.lo, st.hi) if st.lo is not None and st.hi is not None else None


def pick_baseline(g: Group, bases: list[Group]) -> Group:
    """The baseline configuration for ``g``: the baseline-method group whose config differs
    from g's in the fewest keys (so a sweep compares like with like), ties -> best avg."""
    if g in bases:
        return g

    def diff(b: Group) -> int:
        keys = set(b.config) | set(g.config)
        return sum(canon(b.config.get(k)) != canon(g.config.get(k)) for k in keys)
    return min(bases, key=lambda b: (diff(b), -(b.avg.mean if b.avg.mean is not None else -math.inf),
                                     b.config_id))


def score(g: Group, tms: list[TaskMetric]) -> float | None:
    """The ranking score: avg; without any normalisable task, the first task's primary metric
    (negated when lower is better)."""
    if any(tm.normalisable for tm in tms):
        return g.avg.mean
    if not tms:
        return None
    st = g.tasks.get(tms[0].key)
    if st is None or st.mean is None:
        return None
    return st.mean if tms[0].higher_is_better else -st.mean


def rank_groups(groups: list[Group], tms: list[TaskMetric]) -> None:
    """Rank by score (desc; ties share the rank); constant-predictor configurations are not ranked."""
    scored = sorted([g for g in groups if g.ok and not g.constant and score(g, tms) is not None],
                    key=lambda g: (-score(g, tms), g.label))
    prev, rank = None, 0
    for i, g in enumerate(scored, 1):
        s = round(score(g, tms), 12)
        if s != prev:
            rank, prev = i, s
        g.rank = rank


def ordered(groups: list[Group]) -> list[Group]:
    """Rows with ok runs: ranked ones by rank then label, then the unranked (constant predictors) by avg."""
    def key(g: Group) -> tuple:
        unranked_avg = -round(g.avg.mean, 12) if g.rank is None and g.avg.mean is not None else 0.0
        return (g.rank is None, g.rank or 0, unranked_avg, g.label)
    return sorted([g for g in groups if g.ok], key=key)


def above_floor(g: Group, tms: list[TaskMetric]) -> bool:
    """Does the configuration score above the floor (avg > 0, or the metric above its chance)?"""
    s = score(g, tms)
    if s is None:
        return False
    if any(tm.normalisable for tm in tms):
        return round(s, 12) > 0
    tm = tms[0]
    return tm.chance is None or round(s, 12) > round(tm.chance if tm.higher_is_better else -tm.chance, 12)


def choose_best(groups: list[Group], tms: list[TaskMetric]) -> tuple[Group | None, str | None]:
    """The best configuration, or None and why: constant predictors and configurations at or below
    the floor are never best, a tie at the top names nobody, and neither does a grid of one."""
    rows = [g for g in groups if g.ok and score(g, tms) is not None]
    if not rows:
        return None, None
    if len(rows) == 1:
        return None, "one scored configuration: nothing to compare it with"
    live = [g for g in rows if not g.constant]
    if not live:
        return None, f"all {len(rows)} scored configurations are constant predictors"
    above = [g for g in live if above_floor(g, tms)]
    if not above:
        return None, (f"no configuration scores above the floor ({len(rows) - len(live)} constant, "
                      f"{len(live)} at or below it)" if len(live) < len(rows)
                      else f"no configuration scores above the floor ({len(live)} at or below it)")
    top = max(round(score(g, tms), 12) for g in above)
    tied = [g for g in above if round(score(g, tms), 12) == top]
    if len(tied) > 1:
        return None, f"{len(tied)} configurations tie at the top ({', '.join(sorted(g.label for g in tied))})"
    return tied[0], None
