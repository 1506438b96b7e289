"""Per-example correctness from saved predictions, and paired differences with bootstrap CIs.

A predictions file (``<run>/predictions/<task>.jsonl``, written by :mod:`benchmarks.evaluate`) has one
JSON object per example with ``id``, ``prediction``, ``gold`` and, for classification and extractive
tasks, ``scores`` (``correct``).  Paired comparisons of two runs (or of one run's seeds against another
row's) use the examples both scored, so a difference is never confounded by which examples were drawn.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from benchmarks.stats import bootstrap_ci, micro_f1_sums
from scd.core.results import atomic_write_json, atomic_write_text, iter_run_jsons, read_json


def correctness(path: str | Path) -> dict[str, float]:
    """{example id: 1.0 when correct else 0.0}: ``scores.correct`` when the scorer wrote it, else
    prediction == gold."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        correct = (r.get("scores") or {}).get("correct")
        out[str(r["id"])] = float(correct) if correct is not None else float(r["prediction"] == r["gold"])
    return out


def predictions(path: str | Path) -> dict[str, str]:
    """{example id: the saved prediction as text} (what the model answered, right or wrong)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return {str(r["id"]): str(r["prediction"]) for r in (json.loads(line) for line in lines if line.strip())}


def n_changed(a: dict[str, str], b: dict[str, str]) -> int:
    """How many examples both runs answered get a different prediction (0: the runs are indistinguishable on this
    split, whatever their scores' CIs say)."""
    return sum(a[i] != b[i] for i in set(a) & set(b))


def common_ids(*maps: dict[str, float]) -> list[str]:
    """Example ids present in every map, sorted."""
    return sorted(set.intersection(*(set(m) for m in maps))) if maps else []


def paired_delta(a: Sequence[dict[str, float]], b: Sequence[dict[str, float]], n_boot: int = 10_000,
                 seed: int = 0) -> dict:
    """Mean of A − B over examples, A and B each averaged over their seeds first (``a[i]``, ``b[i]`` =
    seed i's correctness maps; the seeds are paired by position), with a percentile-bootstrap 95 % CI
    over examples.  -> {n, a, b, delta, ci}."""
    if not a or not b:
        return {"n": 0, "a": float("nan"), "b": float("nan"), "delta": float("nan"), "ci": [float("nan")] * 2}
    ids = common_ids(*a, *b)
    va = np.array([[m[i] for i in ids] for m in a]).mean(axis=0)  # (examples,)
    vb = np.array([[m[i] for i in ids] for m in b]).mean(axis=0)  # (examples,)
    d = va - vb
    return {"n": len(ids), "a": float(va.mean()), "b": float(vb.mean()), "delta": float(d.mean()),
            "ci": list(bootstrap_ci(d, n_boot=n_boot, seed=seed))}


# --------------------------------------------------------------------------- grids
def example_counts(path: str | Path) -> dict[str, list[float]] | None:
    """{example id: [tp, n_pred, n_gold]} from an NER predictions file's per-example entity counts (None when
    the file has no such counts: not an entity-F1 task)."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        sc = r.get("scores") or {}
        if "tp" not in sc:
            return None
        out[str(r["id"])] = [float(sc["tp"]), float(sc["n_pred"]), float(sc["n_gold"])]
    return out


def load_rows(root: Path, task: str) -> dict[str, dict[int, dict]]:
    """{method: {seed: {score, correct, predictions, counts, metric, constant, top_share, majority, wall_s,
    selection_steps, run_id, builds, run_dir}}} of the finished runs (``builds``: :func:`run_builds`).

    ``score`` is the task's primary metric: ``accuracy``, or for NER the entity micro-F1 (``f1_micro``), whose
    per-example entity ``counts`` ([tp, n_pred, n_gold]) the paired comparisons resample; ``correct`` is the
    per-example score (0/1, or the example's own entity F1, 1 when it has no gold and no predicted entity).
    ``top_share``: the share of the most predicted label; ``majority``: the split's majority rate;
    ``selection_steps``: a staged distillation's teacher checkpoint (its step) per stage."""
    rows: dict[str, dict[int, dict]] = {}
    for path in iter_run_jsons(root):
        rec = read_json(path)
        info = (rec.get("eval_info") or {}).get(task) or {}
        if rec.get("status") != "ok" or not info.get("predictions"):
            continue
        pred = Path(path).parent / info["predictions"]
        if not pred.exists():
            continue
        metrics = (rec.get("eval") or {}).get(task, {})
        metric = "accuracy" if "accuracy" in metrics else "f1_micro"
        counts = example_counts(pred) if metric == "f1_micro" else None
        correct = ({i: 1.0 if c[1] + c[2] == 0 else 2 * c[0] / (c[1] + c[2]) for i, c in counts.items()}
                   if counts is not None else correctness(pred))
        extra = (info.get("extra") or {}).get(metric) or {}  # the constant flag: accuracy's, or NER's on f1_micro
        rows.setdefault(rec["method"], {})[int(rec.get("seed", 0))] = {
            "score": metrics.get(metric, {}).get("value"), "metric": metric, "correct": correct,
            "predictions": predictions(pred), "counts": counts,
            "constant": bool(extra.get("constant")), "top_share": extra.get("max_label_share"),
            "majority": extra.get("majority_baseline"), "wall_s": (rec.get("train") or {}).get("wall_s"),
            "selection_steps": (rec.get("train") or {}).get("selection_steps"), "run_id": rec.get("run_id"),
            "builds": run_builds(rec), "run_dir": str(Path(path).parent)}
    return rows


def run_builds(rec: dict) -> dict[str, str]:
    """{role: which build} of a run's dependency runs (teacher, student, anchor): the build's ``finished`` time
    from run.json ``dependencies``; {"all": "not recorded"} for a run that predates that record."""
    deps = rec.get("dependencies")
    if deps is None:
        return {"all": "not recorded"}
    return {role: d.get("finished") or d.get("path", "?") for role, d in deps.items()}


def paired_f1_delta(a: Sequence[dict[str, list[float]]], b: Sequence[dict[str, list[float]]], n_boot: int = 10_000,
                    seed: int = 0) -> dict:
    """Entity micro-F1 of A − B, each the mean over its seeds of that seed's micro-F1 on the examples every run
    scored (``a[i]``: seed i's {id: [tp, n_pred, n_gold]}), with a percentile-bootstrap 95 % CI over examples (one
    resample shared by every seed of both rows).  -> {n, a, b, delta, ci} as :func:`paired_delta`."""
    if not a or not b:
        return {"n": 0, "a": float("nan"), "b": float("nan"), "delta": float("nan"), "ci": [float("nan")] * 2}
    ids = common_ids(*a, *b)
    x = np.concatenate([np.array([m[i] for i in ids], dtype=np.float64).reshape(len(ids), 3)
                        for m in (*a, *b)], axis=1)  # (examples, 3 * (|a| + |b|))

    def f1s(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # (B, 3k) -> mean F1 of A, of B: (B,), (B,)
        f = np.stack([micro_f1_sums(sums[:, 3 * j:3 * j + 3]) for j in range(len(a) + len(b))], axis=1)
        return f[:, :len(a)].mean(axis=1), f[:, len(a):].mean(axis=1)

    fa, fb = f1s(x.sum(axis=0, keepdims=True))
    ci = bootstrap_ci(x, sum_fn=lambda sums: np.subtract(*f1s(sums)), n_boot=n_boot, seed=seed)
    return {"n": len(ids), "a": float(fa[0]), "b": float(fb[0]), "delta": float(fa[0] - fb[0]), "ci": list(ci)}


def paired_runs(a: Sequence[dict], b: Sequence[dict], n_boot: int = 10_000) -> dict:
    """Δ of the primary metric between two rows' runs (``load_rows`` entries; seeds paired by position): accuracy
    by :func:`paired_delta`, entity F1 by :func:`paired_f1_delta`, plus ``seed_deltas`` (A − B per seed pair)."""
    if a and b and all(r["counts"] is not None for r in (*a, *b)):
        d = paired_f1_delta([r["counts"] for r in a], [r["counts"] for r in b], n_boot=n_boot)
    else:
        d = paired_delta([r["correct"] for r in a], [r["correct"] for r in b], n_boot=n_boot)
    # the CI is over examples (training seeds averaged first); the seed-to-seed spread is shown beside it
    return d | {"seed_deltas": [ra["score"] - rb["score"] for ra, rb in zip(a, b)
                                if ra["score"] is not None and rb["score"] is not None]}


def shared_run(runs: dict[int, dict], seed: int) -> dict | None:
    """The run of a row paired with ``seed``: its own seed's, else the only one (a row shared by all seeds, e.g.
    one teacher)."""
    if seed in runs:
        return runs[seed]
    return next(iter(runs.values())) if len(runs) == 1 else None


def seed_pairs(a: dict[int, dict], b: dict[int, dict], shared: bool = False) -> list[tuple[int, dict, dict]]:
    """(seed, A's run, B's run) over the seeds both rows have -- or, when B is ``shared`` (one run for every seed,
    e.g. one teacher), every seed of A with :func:`shared_run` of B."""
    if shared:
        return [(s, a[s], shared_run(b, s)) for s in sorted(a) if shared_run(b, s) is not None]
    return [(s, a[s], b[s]) for s in sorted(set(a) & set(b))]


def paired_rows(a: dict[int, dict], b: dict[int, dict], n_boot: int, shared: bool = False) -> dict:
    """Δ = A − B of two rows' runs ({seed: run}) paired by :func:`seed_pairs`: :func:`paired_runs` + ``seeds`` +
    ``changed`` (per seed pair, how many examples get a different prediction: :func:`n_changed`)."""
    return _paired(seed_pairs(a, b, shared), n_boot)


def _paired(pairs: list[tuple[int, dict, dict]], n_boot: int) -> dict:
    """:func:`paired_rows` of the (seed, A's run, B's run) ``pairs``."""
    return paired_runs([x for _, x, _ in pairs], [y for _, _, y in pairs], n_boot=n_boot) | {
        "seeds": [s for s, _, _ in pairs],
        "changed": [n_changed(x["predictions"], y["predictions"]) for _, x, y in pairs]}


def judge(rows: dict[str, dict[int, dict]], a: str, op: str, b: str, n_boot: int, claim: str | None = None,
          shared: str | None = None) -> dict:
    """The verdict on ``A op B`` (``rows``: :func:`load_rows`), Δ by :func:`paired_rows` (every seed of A against B
    when ``b`` is the ``shared`` row).  A constant-predictor run is never a winner: a verdict stands only when the
    row with constant runs is clearly behind (the CI excludes 0 in the other row's favour) and says so ("(B is a
    constant predictor in seed s)"); otherwise, and whenever both rows have one, it is "not measurable (constant
    predictor: ...)".  Δ and its CI are reported in every case."""
    claim = claim or f"{a} {op} {b}"
    if a not in rows or b not in rows:
        return {"claim": claim, "verdict": "not measurable (row missing)"}
    pairs = seed_pairs(rows[a], rows[b], shared=b == shared)
    paired_b = [id(y) for _, _, y in pairs]  # a shared B run is one run, named by its own seed once
    const = {a: [s for s, x, _ in pairs if x["constant"]],
             b: [s for s, y in sorted(rows[b].items()) if y["constant"] and id(y) in paired_b]}
    d = _paired(pairs, n_boot)
    v = verdict(d, op)
    if const[a] or const[b]:
        loser = b if d["ci"][0] > 0 else (a if d["ci"][1] < 0 else None)  # the row clearly behind, if any
        if loser is None or const[a if loser == b else b]:
            named = [f"{m} seed {s}" for m in (a, b) for s in const[m]]
            v = f"not measurable (constant predictor: {', '.join(named)})"
        else:
            v += f" ({loser} is a constant predictor in seed {', '.join(map(str, const[loser]))})"
    return {"claim": claim, **d, "verdict": v}


def judged(c: dict) -> bool:
    """Whether :func:`judge` gave ``c`` a verdict: it has a Δ and is not "not measurable ..." (a missing row or a
    constant predictor that would be the winner)."""
    return "delta" in c and not c["verdict"].startswith("not measurable")


def fmt_changed(d: dict | None) -> str:
    """Per seed pair, the examples whose prediction differs: "0 / 3 / 1 of 500" ("-" when not compared)."""
    if not d or not d.get("changed"):
        return "-"
    return " / ".join(map(str, d["changed"])) + f" of {d['n']}"


def fmt_seed_deltas(deltas: Sequence[float]) -> str:
    """Per-seed Δ of the primary metric: "+0.010 / -0.004 / +0.021 (A ahead in 2/3 seeds)" ("-" when none)."""
    if not deltas:
        return "-"
    return (" / ".join(f"{x:+.3f}" for x in deltas) + f" (A ahead in {sum(x > 0 for x in deltas)}/{len(deltas)} "
            "seeds)")


def pooled_score(parts: Sequence[tuple[dict, Sequence[str]]]) -> tuple[float, int]:
    """The primary metric of runs on subsets of examples, pooled: ``parts`` = [(run, ids)] -> (score, n examples);
    accuracy = mean correctness, entity F1 = micro-F1 of the summed counts; NaN for no example."""
    n = sum(len(ids) for _, ids in parts)
    if not n:
        return float("nan"), 0
    if all(r["counts"] is not None for r, _ in parts):
        tot = np.sum([r["counts"][i] for r, ids in parts for i in ids], axis=0)
        return float(micro_f1_sums(tot.reshape(1, 3))[0]), n
    return sum(r["correct"].get(i, 0.0) for r, ids in parts for i in ids) / n, n


def median_wall(runs: dict[int, dict], seeds: Sequence[int]) -> float:
    """A row's wall seconds per run: the median over its seeds' ``train.wall_s``, so that one run slowed by a
    concurrent job or paused (its wall clock kept running) does not set the row's time (nan when none)."""
    walls = [runs[s]["wall_s"] for s in seeds if runs[s]["wall_s"] is not None]
    return float(np.median(walls)) if walls else float("nan")


def mean_sd(vals: list[float]) -> tuple[float, float]:
    """(mean, sample sd) of the non-None values; sd 0 for one value, NaN for none."""
    v = [x for x in vals if x is not None]
    if not v:
        return float("nan"), float("nan")
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def verdict(delta: dict, op: str) -> str:
    """The verdict on ``A op B`` from the CI of A − B: ``>`` is supported when the CI lies above 0, contradicted
    below 0, else not distinguishable; ``>=`` is contradicted only when the CI lies below 0; ``!=`` (a comparison,
    not a claim) says which row is higher when the CI excludes 0."""
    lo, hi = delta["ci"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "not measurable"
    if op == "!=":
        return "A higher" if lo > 0 else ("A lower" if hi < 0 else "not distinguishable (CI includes 0)")
    if op == ">":
        return "supported" if lo > 0 else ("contradicted" if hi < 0 else "not distinguishable (CI includes 0)")
    return "contradicted" if hi < 0 else ("supported (strictly better)" if lo > 0 else
                                          "supported (not distinguishable, CI includes 0)")


def write_study(root: Path, name: str, res: dict, markdown: str) -> None:
    """A study's analysis -> ``root/<name>.json`` and ``root/<name>.md`` (atomic)."""
    atomic_write_json(Path(root) / f"{name}.json", res)
    atomic_write_text(Path(root) / f"{name}.md", markdown)


def study_cli(name: str, grid_dir: str, run: Callable[[], dict]) -> int:
    """Run a study's ``run()`` (analyse + write) for its CLI: print each claim's verdict; 2 on a missing input."""
    try:
        res = run()
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for c in res["claims"]:
        print(f"[{name}] {c['claim']}: {c['verdict']}")
    print(f"wrote {Path(grid_dir) / f'{name}.md'}")
    return 0


# --------------------------------------------------------------------------- reporting
def fmt(v, digits: int = 3, sign: bool = False) -> str:
    """A number for a markdown table ("-" for None / NaN / inf); ``sign``: always with its sign."""
    if v is None or not math.isfinite(float(v)):
        return "-"
    return f"{float(v):+.{digits}f}" if sign else f"{float(v):.{digits}f}"


def fmt_ci(ci: Sequence[float], sign: bool = False) -> str:
    """``[lo, hi]`` ("" when the interval is missing or not finite)."""
    return f"[{fmt(ci[0], sign=sign)}, {fmt(ci[1], sign=sign)}]" if ci and all(math.isfinite(v) for v in ci) else ""


def fmt_p(p) -> str:
    """A p-value: two significant digits, scientific below 1e-4 ("-" when missing)."""
    if p is None or not math.isfinite(float(p)):
        return "-"
    return f"{float(p):.2g}" if float(p) >= 1e-4 else f"{float(p):.1e}"
