"""The recovery study: task scores before/after recovery, per-layer CKA, and their correlation.

    python -m benchmarks.recovery_study results/recovery_study [--out DIR]

Reads only the ``run.json`` files under the grid directory (recipe ``recovery``,
status ``ok``; see :mod:`unisd.recovery`) and writes into it (or ``--out``):

* ``recovery_study.md``      table per (degradation, strength, method, budget): score of the
                             original / degraded (before) / recovered (after), recovered
                             fraction, mean CKA to the original before/after, KL to the
                             original before/after (mean +- std over seeds); then the
                             correlation between recovered score and mean CKA;
* ``recovery_study.csv``     the same table;  ``recovery_runs.csv``: one row per run;
* ``recovery_correlation.json``  recovered score vs mean CKA (``score_vs_cka``, the study's question)
                             and KL to the original vs mean CKA (``kl_vs_cka``, no task score
                             needed), three views (all configurations, recovered only, per
                             degradation family), each over configurations (mean over seeds first,
                             bootstrap CIs over configurations) and over runs
                             (:mod:`benchmarks.recovery_power`);
* ``recovery_deltas.json``   per configuration, accuracy after − before paired by review and seed
                             with bootstrap CIs, and whether it lost accuracy beyond the degraded
                             model's CI (*harm*);
* ``recovery_scatter.png``   recovered score vs mean CKA (colour = degradation, marker = method);
* ``recovery_strength.png``  score (top) and KL to the original (bottom) vs strength per recovery
                             method, one column per degradation (x from mild to severe; dashed =
                             original model);
* ``recovery_cka_layers.png`` per-layer CKA to the original at each degradation's most severe
                             strength, one line per method.

Score of a run = mean over its evaluated tasks of each task's primary metric
(``metric_meta["<task>/<metric>"]["primary"]``; the first metric when none is marked).
Recovered fraction = (after - before) / (original - before) (NaN when original == before).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from benchmarks.leaderboard.load import label_share, run_constant
from benchmarks.paired import fmt_p
from benchmarks.tasks.classification import CONSTANT_SHARE
from benchmarks.recovery_power import correlation_markdown, correlation_views, deltas_markdown, paired_deltas
from scd.core.results import atomic_write_bytes, atomic_write_json, atomic_write_text, iter_run_jsons, read_json

# severity order: quantize -> fewer bits is more severe; others -> larger strength is more severe
SEVERITY_DESCENDING = {"quantize"}
METHOD_ORDER = ("none", "sft", "sd", "sd-kl")


# ----------------------------------------------------------------------------- reading
def mean_primary_metric(evaluation: dict, metric_meta: dict | None = None) -> float:
    """Mean over tasks of each task's primary metric value (NaN when there is none)."""
    meta = metric_meta or {}
    vals = []
    for task, metrics in (evaluation or {}).items():
        if not metrics:
            continue
        names = list(metrics)
        prim = next((m for m in names if (meta.get(f"{task}/{m}") or {}).get("primary")), names[0])
        v = metrics[prim].get("value") if isinstance(metrics[prim], dict) else metrics[prim]
        if v is not None and math.isfinite(float(v)):
            vals.append(float(v))
    return sum(vals) / len(vals) if vals else float("nan")


def task_scores(evaluation: dict, metric_meta: dict | None = None) -> dict[str, float]:
    return {task: mean_primary_metric({task: m}, metric_meta) for task, m in (evaluation or {}).items()}


def _mean_cka(cka: dict | None) -> float:
    if not cka:
        return float("nan")
    if "mean_matched" in cka:
        return float(cka["mean_matched"])
    per = cka.get("per_layer") or []
    return sum(per) / len(per) if per else float("nan")


def run_row(rec: dict, run_dir: str | Path | None = None) -> dict:
    """One run.json (recovery recipe) -> a flat row.  ``method`` is the recovery method, with ``-kl`` when
    the KL-aware budget (``recovery.budget``) decided the run."""
    meta = rec.get("metric_meta") or {}
    deg = rec.get("degradation") or {}
    recov = rec.get("recovery") or {}
    kl = rec.get("kl_to_original") or {}
    before = mean_primary_metric(rec.get("eval_before") or {}, meta)
    after = mean_primary_metric(rec.get("eval") or {}, meta)
    orig = mean_primary_metric(rec.get("eval_original") or {}, meta)
    gap = orig - before
    tasks = list(rec.get("eval_info") or {})
    shares = [s["share"] for s in (label_share(rec, t) for t in tasks) if s is not None]
    budget = recov.get("budget") or None
    method = recov.get("method", rec.get("method"))
    return {
        "run_id": rec.get("run_id"),
        "degradation": deg.get("name"),
        "strength": deg.get("strength"),
        "method": f"{method}-kl" if budget is not None else method,
        "budget": int(recov.get("budget_steps") or 0),
        "skipped": bool(budget and budget.get("skipped")),
        "steps": (rec.get("train") or {}).get("steps"),
        "seed": rec.get("seed", 0),
        "score_original": orig,
        "score_before": before,
        "score_after": after,
        "recovered_frac": (after - before) / gap if math.isfinite(gap) and abs(gap) > 1e-12 else float("nan"),
        "cka_before": _mean_cka(rec.get("cka_before")),
        "cka_after": _mean_cka(rec.get("cka")),
        "cka_per_layer": list((rec.get("cka") or {}).get("per_layer") or []),
        "kl_before": kl.get("before", float("nan")),
        "kl_after": kl.get("after", float("nan")),
        "violation": rec.get("constraint_violation", float("nan")),
        "label_share": max(shares, default=float("nan")),  # largest share of one label, over the tasks
        "constant": any(run_constant(rec, t) for t in tasks),  # the scorer's flag, as the leaderboard reads it
        "tasks_after": task_scores(rec.get("eval") or {}, meta),
        "eval_info": rec.get("eval_info") or {},
        "run_dir": str(run_dir) if run_dir is not None else None,
    }


def load_runs(root: str | Path) -> list[dict]:
    """Rows of every finished recovery run under ``root`` (reads only run.json files)."""
    rows = []
    for path in iter_run_jsons(root):
        try:
            rec = read_json(path)
        except (OSError, ValueError) as e:
            print(f"[recovery_study] skipping unreadable {path}: {e}", file=sys.stderr)
            continue
        if rec.get("recipe") != "recovery" or rec.get("status") != "ok" or "degradation" not in rec:
            continue
        rows.append(run_row(rec, Path(path).parent))
    return rows


# ------------------------------------------------------------------------- statistics
def _mean_std(vals: Iterable[float]) -> tuple[float, float]:
    v = [float(a) for a in vals if a is not None and math.isfinite(float(a))]
    if not v:
        return float("nan"), float("nan")
    m = sum(v) / len(v)
    sd = math.sqrt(sum((a - m) ** 2 for a in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, sd


def _severity_key(deg: str, strength: float) -> float:
    s = float(strength)
    return -s if deg in SEVERITY_DESCENDING else s


def _method_key(m: str) -> tuple:
    return (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m)


AGG_COLS = ("score_original", "score_before", "score_after", "recovered_frac", "cka_before", "cka_after",
            "kl_before", "kl_after")


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean/std over seeds per (degradation, strength, method, budget), in study order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["degradation"], r["strength"], r["method"], r["budget"]), []).append(r)
    out = []
    for (deg, strength, method, budget), rs in groups.items():
        row: dict[str, Any] = {"degradation": deg, "strength": strength, "method": method, "budget": budget,
                               "seeds": len(rs)}
        for col in AGG_COLS:
            row[col], row[col + "_std"] = _mean_std(r[col] for r in rs)
        row["skipped_share"] = sum(bool(r.get("skipped")) for r in rs) / len(rs)
        row["constant_seeds"] = sum(bool(r.get("constant")) for r in rs)
        row["max_violation"] = max((float(r["violation"]) for r in rs if r["violation"] is not None
                                    and math.isfinite(float(r["violation"]))), default=float("nan"))
        out.append(row)
    out.sort(key=lambda r: (str(r["degradation"]), _severity_key(r["degradation"], r["strength"]),
                            _method_key(r["method"]), r["budget"]))
    return out


# ------------------------------------------------------------------------------ output
def _fmt(v: float, sd: float | None = None, digits: int = 3) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    s = f"{v:.{digits}f}"
    if sd is not None and math.isfinite(sd) and sd > 0:
        s += f" ± {sd:.{digits}f}"
    return s


def markdown(agg: list[dict], corr: dict, root: Path, n_runs: int, deltas: list[dict] | None = None,
             task: str | None = None) -> str:
    """corr: {"score_vs_cka": correlation_views(...), "kl_vs_cka": correlation_views(...)}."""
    lines = [f"# Recovery study: {root.name}", "",
             f"{n_runs} finished recovery runs read from `{root}/**/run.json`. Score = mean over tasks of "
             "each task's primary metric. *before* = degraded, *after* = after recovery, *recovered* = "
             "(after - before) / (original - before). CKA = mean over layers of CKA(model layer l, original "
             "layer l) on the probe set; KL = mean per-token KL(original || model) on the probe set. "
             "Mean ± std over seeds. `sd-kl` = SD under the KL-aware budget (`recovery.budget`); *skipped* = "
             "share of its seeds where the budget skipped recovery. *constant* = seeds whose recovered model "
             f"puts >= {CONSTANT_SHARE:.0%} of its predictions on one label (a constant predictor: its score is "
             "the label's rate, not a result; the `none` row shows the degraded model).", "",
             "| degradation | strength | method | budget | seeds | skipped | original | before | after | constant | "
             "recovered | CKA before | CKA after | KL before | KL after | violation |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in agg:
        lines.append(
            f"| {r['degradation']} | {r['strength']:g} | {r['method']} | {r['budget']} | {r['seeds']} | "
            f"{_fmt(r['skipped_share'], digits=2)} | "
            f"{_fmt(r['score_original'])} | {_fmt(r['score_before'], r['score_before_std'])} | "
            f"{_fmt(r['score_after'], r['score_after_std'])} | {r['constant_seeds']}/{r['seeds']} | "
            f"{_fmt(r['recovered_frac'], digits=2)} | "
            f"{_fmt(r['cka_before'])} | {_fmt(r['cka_after'], r['cka_after_std'])} | {_fmt(r['kl_before'])} | "
            f"{_fmt(r['kl_after'], r['kl_after_std'])} | {_fmt(r['max_violation'], digits=1)} |")
    lines += correlation_markdown(corr["score_vs_cka"], "recovered score vs mean CKA")
    lines += correlation_markdown(corr["kl_vs_cka"], "KL to the original vs mean CKA (after; a score-free check)")
    if deltas:
        lines += deltas_markdown(deltas, task or "?", order=lambda d: (
            str(d["degradation"]), _severity_key(d["degradation"], d["strength"]), _method_key(d["method"]),
            d["budget"]))
    lines += ["", "Figures: `recovery_scatter.png` (score vs CKA), `recovery_strength.png` (score vs strength), "
              "`recovery_cka_layers.png` (per-layer CKA).", ""]
    return "\n".join(lines)


def to_csv(rows: list[dict], cols: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(cols), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: (json.dumps(r[c]) if isinstance(r.get(c), (list, dict)) else r.get(c)) for c in cols})
    return buf.getvalue()


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=130)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


MARKERS = {"none": "x", "sft": "s", "sd": "o", "sd-kl": "D"}


def plot_scatter(rows: list[dict], corr: dict, path: Path) -> Path:
    """One point per run; ``corr``: the "all" view of :func:`correlation_views` (title)."""
    fig = _figure(6.4, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    degs = sorted({r["degradation"] for r in rows})
    colors = {d: f"C{i}" for i, d in enumerate(degs)}
    seen = set()
    for r in sorted(rows, key=lambda r: (str(r["degradation"]), _method_key(r["method"]))):
        if not (math.isfinite(r["cka_after"]) and math.isfinite(r["score_after"])):
            continue
        label = f"{r['degradation']} / {r['method']}"
        ax.scatter(r["cka_after"], r["score_after"], c=colors[r["degradation"]],
                   marker=MARKERS.get(r["method"], "^"), s=42, alpha=0.85,
                   label=None if label in seen else label)
        seen.add(label)
    c, r = corr["configs"], corr["runs"]
    ax.set_title(f"score vs mean CKA: {c['n']} configurations (mean over seeds) Pearson r="
                 f"{_fmt(c['pearson_r'], digits=2)}, Spearman ρ={_fmt(c['spearman_rho'], digits=2)}; "
                 f"{r['n']} runs ρ={_fmt(r['spearman_rho'], digits=2)}", fontsize=8)
    ax.set_xlabel("mean per-layer CKA to the original (after)")
    ax.set_ylabel("task score after recovery")
    ax.grid(alpha=0.3)
    if seen:
        ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def _label(m: str, budget: int, budgets: set) -> str:
    return m if len(budgets) <= 1 or m == "none" else f"{m} ({budget} steps)"


def plot_strength(agg: list[dict], path: Path) -> Path:
    """Row 1: task score vs strength per recovery method; row 2: KL to the original (log scale)."""
    degs = sorted({r["degradation"] for r in agg})
    fig = _figure(4.2 * max(1, len(degs)), 7.0)
    rows = (("score_after", "task score", "score_original"), ("kl_after", "KL(original ‖ model), probe", None))
    for k, deg in enumerate(degs):
        sub = [r for r in agg if r["degradation"] == deg]
        strengths = sorted({r["strength"] for r in sub}, key=lambda s: _severity_key(deg, s))
        xs = list(range(len(strengths)))
        budgets = {r["budget"] for r in sub if r["method"] != "none"}
        series: dict[str, dict] = {}
        for r in sub:
            series.setdefault(_label(r["method"], r["budget"], budgets), {})[r["strength"]] = r
        for j, (col, ylabel, ref) in enumerate(rows):
            ax = fig.add_subplot(2, len(degs), j * len(degs) + k + 1)
            for name, pts in sorted(series.items(), key=lambda kv: _method_key(kv[0].split()[0])):
                have = [s for s in strengths if s in pts and math.isfinite(pts[s][col])]
                e = [pts[s][col + "_std"] if math.isfinite(pts[s][col + "_std"]) else 0 for s in have]
                ax.errorbar([xs[strengths.index(s)] for s in have], [pts[s][col] for s in have], yerr=e,
                            marker=MARKERS.get(name.split()[0], "^"), capsize=3, label=name)
            if ref:
                vals = [r[ref] for r in sub if math.isfinite(r[ref])]
                if vals:
                    ax.axhline(sum(vals) / len(vals), ls="--", c="gray", lw=1, label="original")
            elif any(r[col] > 0 for r in sub if math.isfinite(r[col])):
                ax.set_yscale("log")
            ax.set_xticks(xs, [f"{s:g}" for s in strengths])
            meaning = {"quantize": "bits", "prune": "sparsity", "forget": "SFT steps"}.get(deg, "strength")
            ax.set_xlabel(f"{meaning} (mild → severe)")
            ax.set_ylabel(ylabel)
            if j == 0:
                ax.set_title(deg)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_cka_layers(rows: list[dict], path: Path) -> Path:
    degs = sorted({r["degradation"] for r in rows})
    fig = _figure(4.2 * max(1, len(degs)), 3.6)
    for k, deg in enumerate(degs):
        ax = fig.add_subplot(1, len(degs), k + 1)
        sub = [r for r in rows if r["degradation"] == deg and r["cka_per_layer"]]
        if sub:
            worst = max((r["strength"] for r in sub), key=lambda s: _severity_key(deg, s))
            by_method: dict[str, list[list[float]]] = {}
            for r in sub:
                if r["strength"] == worst:
                    by_method.setdefault(f"{r['method']} ({r['budget']})" if r["method"] != "none" else "none",
                                         []).append(r["cka_per_layer"])
            for name in sorted(by_method, key=lambda n: _method_key(n.split()[0])):
                curves = by_method[name]
                L = min(len(c) for c in curves)
                mean = [sum(c[i] for c in curves) / len(curves) for i in range(L)]
                ax.plot(range(1, L + 1), mean, marker=MARKERS.get(name.split()[0], "^"), ms=3, label=name)
            ax.set_title(f"{deg} (strength {worst:g})")
            ax.legend(fontsize=7)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("CKA to original")
        ax.set_ylim(top=1.02)
        ax.grid(alpha=0.3)
    return _save(fig, path)


RUN_COLS = ("run_id", "degradation", "strength", "method", "budget", "seed", "score_original", "score_before",
            "score_after", "recovered_frac", "cka_before", "cka_after", "kl_before", "kl_after", "violation",
            "tasks_after", "cka_per_layer")
AGG_CSV_COLS = ("degradation", "strength", "method", "budget", "seeds") + tuple(
    c for col in AGG_COLS for c in (col, col + "_std")) + ("max_violation",)


def study(root: str | Path, out: str | Path | None = None, plots: bool = True) -> dict:
    """Build the study outputs for the grid directory ``root``; returns {rows, table, correlation, files}."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such grid directory")
    out = Path(out) if out is not None else root
    rows = load_runs(root)
    if not rows:
        raise ValueError(f"{root}: no finished recovery runs (run.json with recipe 'recovery', status ok)")
    agg = aggregate(rows)
    corr = {"score_vs_cka": correlation_views(agg, rows, "cka_after", "score_after"),
            "kl_vs_cka": correlation_views(agg, rows, "cka_after", "kl_after")}
    task = next((t for r in rows for t in r["eval_info"]), None)  # the first scored task (paired deltas)
    deltas = paired_deltas(rows, task) if task else []
    files = {
        "markdown": out / "recovery_study.md",
        "csv": out / "recovery_study.csv",
        "runs_csv": out / "recovery_runs.csv",
        "correlation": out / "recovery_correlation.json",
    }
    atomic_write_text(files["markdown"], markdown(agg, corr, root, len(rows), deltas, task))
    atomic_write_text(files["csv"], to_csv(agg, AGG_CSV_COLS))
    atomic_write_text(files["runs_csv"], to_csv(rows, RUN_COLS))
    atomic_write_json(files["correlation"], corr)
    files["deltas"] = out / "recovery_deltas.json"
    atomic_write_json(files["deltas"], {"task": task, "deltas": deltas})
    if plots:
        files["scatter"] = plot_scatter(rows, corr["score_vs_cka"][0], out / "recovery_scatter.png")
        files["strength"] = plot_strength(agg, out / "recovery_strength.png")
        files["cka_layers"] = plot_cka_layers(rows, out / "recovery_cka_layers.png")
    return {"rows": rows, "table": agg, "correlation": corr, "deltas": deltas,
            "files": {k: str(v) for k, v in files.items()}}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.recovery_study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid_dir", help="results/<grid> directory holding the recovery runs")
    ap.add_argument("--out", help="output directory (default: the grid directory)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    try:
        res = study(args.grid_dir, args.out, plots=not args.no_plots)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for v in res["correlation"]["score_vs_cka"][:2]:
        c = v["configs"]
        print(f"[recovery_study] {len(res['rows'])} runs; score vs CKA, {v['view']} ({c['n']} configurations, "
              f"mean over seeds): Pearson r={_fmt(c['pearson_r'])}, Spearman rho={_fmt(c['spearman_rho'])} "
              f"(p={fmt_p(c['spearman_p'])})")
    for name, path in res["files"].items():
        print(f"  {name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
