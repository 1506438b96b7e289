"""PNG figures of a leaderboard: per-task bars, component deltas, CKA heatmaps, score vs CKA.

matplotlib is imported lazily (an optional heavy dependency); every figure is written only when
its bytes changed.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from benchmarks.cka import plot_cka_heatmap
from benchmarks.leaderboard.files import write_bytes_if_changed
from benchmarks.leaderboard.groups import Group, Stat, ordered
from benchmarks.leaderboard.load import TaskMetric, run_avg
from benchmarks.leaderboard.statistics import finite


def plot_label(g: Group) -> str:
    """A configuration's name in a figure, marked when it has constant-predictor runs."""
    return g.label + (" [constant]" if g.constant else "")


def _new_fig(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
    write_bytes_if_changed(path, buf.getvalue())


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
        panels.append(("avg (floor-normalised) ↑", "__avg__"))
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
            ax.bar([i], [st.mean], width=0.8, color=color, label=plot_label(g), yerr=[[lo], [hi]], capsize=3,
                   error_kw={"elinewidth": 1, "ecolor": "black"})
        ax.set_title(title, fontsize=10)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks([])
        ax.set_xlim(-0.6, n - 0.4)
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="y", labelsize=8)
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=plot_label(g)) for g, c in zip(rows, colors)]
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
        labels.append(plot_label(g) + (f"  [+{' +'.join(on)}]" if on else "  [no components]" if g.components else ""))
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
    ax.set_xlabel(f"Δ avg floor-normalised score vs {baseline} (95% CI)")
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
    title = f"CKA: {plot_label(g)} (mean of {len(arrs)} seed(s))"
    ya, xb = mats[0].get("layers_a"), mats[0].get("layers_b")
    ya = ya if isinstance(ya, list) and len(ya) == M.shape[0] else None
    xb = xb if isinstance(xb, list) and len(xb) == M.shape[1] else None
    tmp = path.with_name(f".{path.stem}.tmp.png")
    try:
        plot_cka_heatmap(M, tmp, title=title, xticklabels=xb, yticklabels=ya)
        write_bytes_if_changed(path, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    return True


def plot_recovery_vs_cka(records: list[dict], groups: list[Group], tms: list[TaskMetric], path: Path) -> bool:
    """Scatter: a run's avg floor-normalised score vs its mean matched-layer CKA."""
    label = {id(r): plot_label(g) for g in groups for r in g.records}
    pts = []
    for r in records:
        if r["status"] != "ok" or not isinstance(r.get("cka"), dict) or not finite(r["cka"].get("mean_matched")):
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
    ax.set_ylabel("avg floor-normalised score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    _save(fig, path)
    return True
