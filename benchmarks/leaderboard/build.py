"""Build every leaderboard artefact of one grid directory (tables, figures, summary for the index)."""
from __future__ import annotations

import io
import os
import time
from pathlib import Path

from benchmarks.leaderboard.files import (file_lock, write_bytes_if_changed, write_json_if_changed,
                                          write_text_if_changed)
from benchmarks.leaderboard.groups import Group, choose_best, compute, make_groups, ordered
from benchmarks.leaderboard.index import update_index
from benchmarks.leaderboard.load import TaskMetric, load_records, primary_metrics, secondary_metrics
from benchmarks.leaderboard.plots import plot_cka, plot_component_deltas, plot_recovery_vs_cka, plot_tasks
from benchmarks.leaderboard.render import (STATUS_ORDER, companions, csv_text, leaderboard_rows, r6, render_markdown,
                                           runs_table)
from scd.core.faults import fault_point
from scd.core.results import read_json


def plan_meta(gdir: Path) -> dict:
    try:
        p = read_json(gdir / "plan.json")
        return p if isinstance(p, dict) else {}
    except (OSError, ValueError):
        return {}


def write_figures(gdir: Path, records: list[dict], groups: list[Group], tms: list[TaskMetric],
                  baseline: str | None) -> list[str]:
    """Every figure of the grid (relative paths); heatmaps of configurations no longer in the table go."""
    fdir = gdir / "figures"
    fig_paths: list[str] = []
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
    for stale_fig in fdir.glob("cka_*.png"):
        if f"figures/{stale_fig.name}" not in fig_paths:
            stale_fig.unlink()
    return fig_paths


def summary(grid: str, meta: dict, baseline: str | None, records: list[dict], groups: list[Group],
            tms: list[TaskMetric], n_problems: int, fig_paths: list[str]) -> dict:
    """leaderboard.json: counts and the best configuration (or why there is none) for the index."""
    rows = ordered(groups)
    best, why = choose_best(groups, tms)
    by_id = {g.config_id: g for g in groups}
    base = by_id.get(best.baseline_id) if best is not None and best.baseline_id else None
    return {
        "grid": grid, "description": meta.get("description") or "",
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "baseline": baseline,
        "n_runs": len(records), "n_configs": len(rows),
        **{f"n_{s}": sum(r["status"] == s for r in records) for s in STATUS_ORDER},
        "n_constant": sum(bool(g.constant) for g in rows),
        "n_skipped_files": n_problems, "tasks": [tm.key for tm in tms],
        "best": ({"label": best.label, "avg_norm": r6(best.avg.mean),
                  "ci_includes_floor": bool(best.avg.lo is not None and best.avg.lo <= 0
                                            and any(tm.normalisable for tm in tms)),
                  "delta": r6(best.avg.delta.value) if best.avg.delta and not best.is_baseline else None,
                  "baseline_constant": bool(base is not None and base.constant)}
                 if best else None),
        "no_best": why,
        "figures": fig_paths}


def build_leaderboard(grid_dir: str | os.PathLike, *, baseline: str | None = None, figures: bool = True,
                      plan_only: bool = True, index: bool = False) -> Path:
    """Build every leaderboard artefact of one grid directory; returns leaderboard.md's path.

    Each file is rewritten only when its content changed (leaderboard.json: apart from its
    ``generated`` timestamp, which then keeps its old value)."""
    gdir = Path(grid_dir)
    if not gdir.is_dir():
        raise FileNotFoundError(f"{gdir}: no such results directory")
    with file_lock(gdir / ".leaderboard.flock"):
        meta = plan_meta(gdir)
        records, problems, stale = load_records(gdir, plan_only=plan_only)
        baseline = baseline or meta.get("baseline")
        notes = []
        if baseline and not any(r["method"] == baseline and r["status"] == "ok" for r in records):
            notes.append(f"baseline '{baseline}' has no finished run yet: no deltas")
        ok = [r for r in records if r["status"] == "ok"]
        tms, tm_notes = primary_metrics(ok)
        sec = secondary_metrics(ok, tms)
        groups = make_groups(records)
        compute(groups, tms, baseline)
        rows = leaderboard_rows(groups, tms, baseline, companions(ok, tms, sec))
        grid = meta.get("grid") or gdir.name
        fig_paths = write_figures(gdir, records, groups, tms, baseline) if figures and ok else []
        md = render_markdown(grid, meta.get("description") or "", groups, tms, baseline, records, problems,
                             notes + tm_notes, fig_paths, stale, sec)
        buf = io.BytesIO()
        runs_table(records, groups, tms).write_parquet(buf)
        write_bytes_if_changed(gdir / "runs.parquet", buf.getvalue())
        write_text_if_changed(gdir / "leaderboard.csv", csv_text(rows))
        fault_point("leaderboard")  # reliability tests kill here: a rerun rebuilds everything
        write_text_if_changed(gdir / "leaderboard.md", md)
        write_json_if_changed(gdir / "leaderboard.json",
                              summary(grid, meta, baseline, records, groups, tms, len(problems), fig_paths),
                              ignore=("generated",))
    if index:
        update_index(gdir.parent)
    return gdir / "leaderboard.md"
