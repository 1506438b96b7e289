"""Tables: leaderboard.md, leaderboard.csv (one row per configuration) and runs.parquet (one row per run)."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from benchmarks.leaderboard.groups import Group, Stat, ci_of, fmt_v, metric_stat, ordered
from benchmarks.leaderboard.load import TaskMetric, canon, label_share, run_avg, run_floor
from benchmarks.leaderboard.statistics import delta_vs_baseline, finite

# chance-corrected companions of a classification task's accuracy, shown next to it
COMPANIONS = ("balanced_accuracy", "cohen_kappa")
STATUS_ORDER = ("ok", "failed", "diverged", "running")  # display order of scd.core.results.STATUSES


def r6(v: float | None, nd: int = 6) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), nd)


def fmt(v: float | None, nd: int = 3, sign: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    return f"{v:+.{nd}f}" if sign else f"{v:.{nd}f}"


def cell(st: Stat) -> str:
    if st.mean is None:
        return "—"
    s = fmt(st.mean) + (f" ± {fmt(st.std)}" if st.std is not None else "")
    if st.lo is not None and st.hi is not None:
        s += f" [{fmt(st.lo)}, {fmt(st.hi)}]"
    return s


def md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def arrow(tm: TaskMetric) -> str:
    return "↑" if tm.higher_is_better else "↓"


def constant_note(g: Group) -> str:
    """'⚠ constant (97% 'fresh')' for a configuration with constant-predictor runs ('' otherwise)."""
    parts = []
    for task, c in g.constant.items():
        labels = "/".join(f"'{lab}'" for lab in c.labels)
        seeds = "" if c.n_runs == 1 else f" in {c.n_constant}/{c.n_runs} seeds"
        pct = f"{'≥' if c.n_constant > 1 and c.share < 1 else ''}{math.floor(c.share * 100 + 1e-9)}%"
        parts.append(f"{task + ': ' if len(g.tasks) > 1 else ''}constant{seeds} ({pct} {labels})")
    return "⚠ " + "; ".join(parts) if parts else ""


def display(g: Group, text: str | None = None) -> str:
    """A row's name with its constant-predictor mark."""
    note = constant_note(g)
    base = g.label if text is None else text
    return f"{base} {note}" if note else base


def companions(records: list[dict], tms: list[TaskMetric], sec: list[TaskMetric]) -> dict[str, list[TaskMetric]]:
    """Per primary metric key, its chance-corrected companions (balanced accuracy, Cohen's kappa)."""
    return {tm.key: [s for name in COMPANIONS for s in sec if s.task == tm.task and s.metric == name]
            for tm in tms}


def group_floor(g: Group, tm: TaskMetric, *, uniform: bool = False) -> float | None:
    """The floor of a configuration's runs (their mean; the same split gives the same floor)."""
    vals = [run_floor(r, tm, uniform=uniform) for r in g.ok if tm.task in r["eval"]]
    return sum(vals) / len(vals) if vals else None


def shows_uniform(tms: list[TaskMetric]) -> bool:
    """Does any floor differ from uniform chance (then avg vs uniform chance gets its own column)?"""
    return any(tm.normalisable and any(f != (tm.chance or 0.0) for f in tm.floors) for tm in tms)


def _stat_cols(row: dict, key: str, st: Stat, baseline: str | None) -> None:
    row[key] = r6(st.mean)
    row[f"{key}_std"] = r6(st.std)
    row[f"{key}_ci_lo"] = r6(st.lo)
    row[f"{key}_ci_hi"] = r6(st.hi)
    if baseline:
        row[f"{key}_delta"] = r6(st.delta.value) if st.delta else None
        row[f"{key}_delta_ci_lo"] = r6(st.delta.lo) if st.delta else None
        row[f"{key}_delta_ci_hi"] = r6(st.delta.hi) if st.delta else None


def leaderboard_rows(groups: list[Group], tms: list[TaskMetric], baseline: str | None,
                     comp: dict[str, list[TaskMetric]] | None = None) -> list[dict]:
    """One dict per configuration (csv columns), best first."""
    comp_names = sorted({c for g in groups for c in g.components})
    hp_keys = list(dict.fromkeys(k for g in groups for k in g.hparams))
    rows = []
    for g in ordered(groups):
        row: dict[str, Any] = {"rank": g.rank, "method": g.method, "config_id": g.config_id, "label": g.label,
                               "constant": bool(g.constant), "constant_note": constant_note(g) or None}
        for k in hp_keys:
            v = g.hparams.get(k)
            row[k] = fmt_v(v) if v is not None else None
        for c in comp_names:
            row[f"components.{c}"] = g.components.get(c)
        for tm in tms:
            _stat_cols(row, tm.key, g.tasks.get(tm.key, Stat()), baseline)
            if tm.floors:
                row[f"{tm.key}_floor"] = r6(group_floor(g, tm))
                row[f"{tm.key}_chance_uniform"] = r6(tm.chance)
            for c in (comp or {}).get(tm.key, []):
                st = metric_stat(g, c)
                row[c.key], row[f"{c.key}_ci_lo"], row[f"{c.key}_ci_hi"] = r6(st.mean), r6(st.lo), r6(st.hi)
        row["avg_norm"] = r6(g.avg.mean)
        row["avg_norm_std"] = r6(g.avg.std)
        row["avg_norm_ci_lo"] = r6(g.avg.lo)
        row["avg_norm_ci_hi"] = r6(g.avg.hi)
        row["avg_norm_uniform"] = r6(g.avg_uniform.mean)
        if baseline:
            d = g.avg.delta
            row["delta"] = r6(d.value) if d else None
            row["delta_ci_lo"] = r6(d.lo) if d else None
            row["delta_ci_hi"] = r6(d.hi) if d else None
            row["delta_how"] = d.how if d else None
            row["baseline_config_id"] = g.baseline_id
        row["cka_mean_matched"] = r6(g.cka)
        row["n_seeds"] = len(g.seeds)
        row["seeds"] = " ".join(str(s) for s in g.seeds)
        for s in STATUS_ORDER:
            row[f"n_{s}"] = g.count(s)
        rows.append(row)
    return rows


def secondary_table(groups: list[Group], sec: list[TaskMetric], baseline: str | None) -> list[str]:
    """Markdown lines: every secondary metric per configuration, with its delta vs the baseline."""
    rows = ordered(groups)
    if not sec or not rows:
        return []
    by_id = {g.config_id: g for g in groups}
    head = ["method"] + [f"{tm.task} {tm.metric} {arrow(tm)}"
                         + (f" (chance {tm.chance:.3g})" if tm.chance is not None else "") for tm in sec]
    L = ["## Other metrics", "",
         "Same cells as above" + (f"; (Δ vs {baseline} [95% CI, paired by seed])" if baseline else "") + ".", "",
         "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for g in rows:
        cells = [md_escape(display(g))]
        b = by_id.get(g.baseline_id) if g.baseline_id else None
        for tm in sec:
            st = metric_stat(g, tm)
            text = cell(st)
            if b is not None and b is not g and st.by_seed:
                bst = metric_stat(b, tm)
                d = delta_vs_baseline(st.by_seed, bst.by_seed, ci_of(st), ci_of(bst)) if bst.by_seed else None
                if d is not None:
                    text += f" (Δ {fmt(d.value, sign=True)} [{fmt(d.lo, sign=True)}, {fmt(d.hi, sign=True)}])"
            cells.append(text)
        L.append("| " + " | ".join(cells) + " |")
    return L + [""]


def _floor_lines(groups: list[Group], tms: list[TaskMetric]) -> list[str]:
    out = []
    for tm in tms:
        if not tm.floors:
            continue
        maj = (fmt(tm.floors[0]) if len(tm.floors) == 1
               else f"{fmt(tm.floors[0])}–{fmt(tm.floors[-1])} (per run: the runs score different splits)")
        uni = f"; uniform chance {fmt(tm.chance)}" if tm.chance is not None else ""
        out.append(f"- {tm.task} {tm.metric}: majority floor {maj}{uni}")
    return (["Floors (what a constant answer scores):", ""] + out + [""]) if out else []


def _md_header(grid: str, desc: str, groups: list[Group], tms: list[TaskMetric], baseline: str | None,
               records: list[dict]) -> list[str]:
    seeds = sorted({r["seed"] for r in records if r["status"] == "ok"})
    counts = {s: sum(r["status"] == s for r in records) for s in STATUS_ORDER}
    status = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    L = [f"# Leaderboard: {grid}", ""] + ([desc, ""] if desc else [])
    L += [f"{len(records)} runs{f' ({status})' if status else ''}, {len(ordered(groups))} "
          f"configurations, seeds {', '.join(map(str, seeds)) or '—'}."
          + (f" Baseline: **{baseline}**." if baseline else ""), ""]
    L.append("Cells: mean ± std over seeds [95% bootstrap CI over seeds; a single seed shows its own CI]. "
             "**avg** = mean over tasks of the primary metric normalised against its floor, "
             "(x − floor) / (1 − floor): the floor of accuracy is the majority rate of the scored split "
             "(always answering the most frequent label scores 0), elsewhere the metric's chance level"
             + ("; **avg (uniform)** normalises against uniform chance instead" if shows_uniform(tms) else "")
             + (f"; **Δ** = avg − avg of the baseline **{baseline}** [95% CI; paired by seed]" if baseline else "")
             + ". ↑ higher is better, ↓ lower is better. **⚠ constant**: a run put ≥ 95% of its predictions on "
               "one label (a constant predictor); such configurations are not ranked and never named best.")
    return L + [""] + _floor_lines(groups, tms)


def _md_main_table(groups: list[Group], tms: list[TaskMetric], baseline: str | None,
                   comp: dict[str, list[TaskMetric]]) -> list[str]:
    rows = ordered(groups)
    if not rows:
        return ["No finished (status ok) runs yet.", ""]
    hp_keys = list(dict.fromkeys(k for g in groups for k in g.shown))
    comp_names = sorted({c for g in groups for c in g.components})
    uniform, has_cka = shows_uniform(tms), any(g.cka is not None for g in groups)
    head = ["rank", "method"] + hp_keys + comp_names
    align = ["---:", "---"] + ["---"] * len(hp_keys) + [":-:"] * len(comp_names)
    for tm in tms:
        head += [f"{tm.task} {tm.metric} {arrow(tm)}"] + [f"{c.task} {c.metric} {arrow(c)}" for c in comp[tm.key]]
        align += ["---"] * (1 + len(comp[tm.key]))
    head += ["avg (norm)"] + (["avg (uniform)"] if uniform else []) + ([f"Δ vs {baseline}"] if baseline else [])
    head += (["CKA"] if has_cka else []) + ["seeds", "runs"]
    align += ["---"] * (1 + uniform + bool(baseline)) + (["---:"] if has_cka else []) + ["---:", "---"]
    L = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for g in rows:
        cells = [str(g.rank) if g.rank is not None else "—", md_escape(display(g, g.method))]
        cells += [md_escape(fmt_v(g.shown.get(k))) for k in hp_keys]
        cells += [("✓" if g.components.get(c) else "·") for c in comp_names]
        for tm in tms:
            cells += [cell(g.tasks.get(tm.key, Stat()))] + [cell(metric_stat(g, c)) for c in comp[tm.key]]
        cells += [cell(g.avg)] + ([cell(g.avg_uniform)] if uniform else [])
        if baseline:
            d = g.avg.delta
            cells.append("(baseline)" if g.is_baseline else "—" if d is None else
                         f"{fmt(d.value, sign=True)} [{fmt(d.lo, sign=True)}, {fmt(d.hi, sign=True)}]")
        cells += ([fmt(g.cka)] if has_cka else []) + [str(len(g.seeds))]
        cells.append(", ".join(f"{g.count(s)} {s}" for s in STATUS_ORDER if g.count(s)))
        L.append("| " + " | ".join(cells) + " |")
    return L + [""]


def _md_failed(records: list[dict]) -> list[str]:
    bad = [r for r in records if r["status"] != "ok"]
    if not bad:
        return []
    L = ["## Failed and incomplete runs (not averaged)", "",
         "| run | method | seed | status | error |", "|---|---|---:|---|---|"]
    for r in sorted(bad, key=lambda r: (r["method"], r["seed"], r["_dir"])):
        err = str(r.get("error") or "").strip().splitlines()
        err_s = err[0][:160] if err else ("still running or interrupted" if r["status"] == "running" else "")
        L.append(f"| [{r['_dir']}]({r['_dir']}/run.json) | {md_escape(r['method'])} | {r['seed']} | "
                 f"{r['status']} | {md_escape(err_s)} |")
    return L + [""]


def _md_tail(problems: list[str], notes: list[str], figures: list[str], stale: int) -> list[str]:
    L = []
    if problems:
        L += ["## Skipped files", ""] + [f"- {md_escape(p)}" for p in problems] + [""]
    if notes or stale:
        L += ["## Notes", ""] + [f"- {n}" for n in notes]
        if stale:
            L.append(f"- {stale} run(s) in this directory are not in the current plan.json (grid edited) "
                     "and are left out; `--all-runs` includes them.")
        L.append("")
    if figures:
        L += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures] + [""]
    L.append("Generated by `python -m benchmarks.leaderboard` from run.json files only; "
             "full table: [leaderboard.csv](leaderboard.csv), per-run table: runs.parquet.")
    return L


def render_markdown(grid: str, desc: str, groups: list[Group], tms: list[TaskMetric], baseline: str | None,
                    records: list[dict], problems: list[str], notes: list[str], figures: list[str],
                    stale: int, sec: list[TaskMetric] | None = None) -> str:
    """leaderboard.md: header and floors, the ranked table, other metrics, failures, notes, figures."""
    sec = sec or []
    comp = companions(records, tms, sec)
    shown = {c.key for cs in comp.values() for c in cs}
    L = _md_header(grid, desc, groups, tms, baseline, records)
    L += _md_main_table(groups, tms, baseline, comp)
    L += secondary_table(groups, [s for s in sec if s.key not in shown], baseline)
    L += _md_failed(records) + _md_tail(problems, notes, figures, stale)
    return "\n".join(L) + "\n"


def _run_row(r: dict, gid: dict, tms: list[TaskMetric]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "run_id": str(r["run_id"]), "dir": r["_dir"], "grid": r.get("grid"), "recipe": r.get("recipe"),
        "method": r["method"], "seed": int(r["seed"]), "status": r["status"],
        "error": (str(r.get("error")) if r.get("error") is not None else None),
        "config_id": gid.get(id(r)), "started": r.get("started"), "finished": r.get("finished"),
        "git_sha": r.get("git_sha"),
        "hparams": canon(r.get("hparams") or {}), "config": canon(r.get("config") or {}),
    }
    for k in ("tokens", "wall_s", "peak_mem"):
        v = (r.get("train") or {}).get(k)
        row[f"train.{k}"] = float(v) if finite(v) else None
    cka = r.get("cka") if isinstance(r.get("cka"), dict) else {}
    row["cka.mean_matched"] = float(cka["mean_matched"]) if finite(cka.get("mean_matched")) else None
    ok = r["status"] == "ok"
    row["avg_norm"] = run_avg(r, tms)[0] if ok else None
    row["avg_norm_uniform"] = run_avg(r, tms, uniform=True)[0] if ok else None
    for tm in tms:
        share = label_share(r, tm.task)
        if share is not None:
            row[f"{tm.task}.floor"] = run_floor(r, tm)
            row[f"{tm.task}.max_label_share"] = share["share"]
            row[f"{tm.task}.most_predicted"] = None if share["label"] is None else str(share["label"])
            row[f"{tm.task}.constant"] = share["constant"]
    return row


def runs_table(records: list[dict], groups: list[Group], tms: list[TaskMetric]):
    """polars DataFrame, one row per run.json (all statuses)."""
    import polars as pl

    gid = {id(r): g.config_id for g in groups for r in g.records}
    rows = []
    all_eval = sorted({(t, m) for r in records for t, ms in r["eval"].items() for m in ms})
    comps = sorted({c for r in records for c in (r.get("components") or {})})
    for r in records:
        row = _run_row(r, gid, tms)
        for c in comps:
            v = (r.get("components") or {}).get(c)
            row[f"components.{c}"] = bool(v) if v is not None else None
        for t, m in all_eval:
            e = (r["eval"].get(t) or {}).get(m) or {}
            ci = e.get("ci") if isinstance(e.get("ci"), (list, tuple)) and len(e.get("ci")) == 2 else [None, None]
            row[f"{t}/{m}"] = float(e["value"]) if finite(e.get("value")) else None
            row[f"{t}/{m}.n"] = int(e["n"]) if finite(e.get("n")) else None
            row[f"{t}/{m}.ci_lo"] = float(ci[0]) if finite(ci[0]) else None
            row[f"{t}/{m}.ci_hi"] = float(ci[1]) if finite(ci[1]) else None
        rows.append(row)
    cols = list(dict.fromkeys(k for row in rows for k in row))
    schema: dict[str, Any] = {}
    for k in cols:
        kinds = {type(row.get(k)) for row in rows if row.get(k) is not None}
        schema[k] = (pl.Boolean if kinds == {bool} else pl.Int64 if kinds == {int}
                     else pl.Float64 if kinds and kinds <= {int, float} else pl.Utf8)
    data = [{k: _cast(row.get(k), schema[k], pl) for k in cols} for row in rows]
    return pl.DataFrame(data, schema=schema, orient="row") if rows else pl.DataFrame(schema=schema)


def _cast(v: Any, dtype: Any, pl: Any) -> Any:
    if v is None:
        return None
    return float(v) if dtype is pl.Float64 else str(v) if dtype is pl.Utf8 else v


def csv_text(rows: list[dict]) -> str:
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
