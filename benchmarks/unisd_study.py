"""The UniSD study's analysis (issue 20): component deltas vs base, leave-one-out, and the paper's claims.

    python -m benchmarks.unisd_study results/unisd_study_cpu [--task rotten_tomatoes] [--base base]
                                                           [--full unisd_star]

Reads the ``run.json`` files (status ok) and saved predictions of one grid folder; one row per method
(``method`` of the grid's runs), grouped by the grid's naming: ``base``; each component alone
(``+<component>``); the full combination (``--full``, UniSD*) and its leave-one-out rows
(``<full>-<component>``); every other method is a baseline.  Writes ``unisd_study.md`` and
``unisd_study.json`` there.

* **Rows**: the task's primary metric (accuracy; entity micro-F1 for NER) as mean ± sd over seeds,
  constant-predictor runs (>= 95 % of predictions on one label: such a row is never "best" nor a winner),
  Δ vs base paired by example and seed (seeds averaged per example first; 95 % bootstrap CI over examples),
  seeds in which the row beats base (same seed), how many test predictions differ from base's (per seed: 0 means
  the row is indistinguishable from base on this split), median wall seconds per run.
* **Leave-one-out**: for each component, Δ = UniSD* − (UniSD* without it): what the component adds to the
  combination (> 0: removing it hurts), and how many test predictions removing it changes (per seed).
* **Claims** (the paper's): UniSD* > the best single component; the best single component > base; UniSD* >
  base; and which component drives the gain -- the component whose removal costs UniSD* most, named only when
  that cost's CI lies above 0.  Verdicts as :func:`benchmarks.paired.judge` (a constant predictor is never the
  winner).  Each Δ also lists its value per
  seed: the CI is over examples (seeds averaged first) and does not include the seed-to-seed spread of training.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from benchmarks.paired import (fmt, fmt_changed, fmt_ci, fmt_seed_deltas, judge, judged, load_rows, mean_sd,
                              median_wall, paired_rows, study_cli, write_study)


# baselines that differ from another row in one ingredient: (A, B, what A − B measures)
COMPARISONS = (("sdft_rewrite", "sft", "what the teacher's rewrites add to SFT on the gold answers"),)


def groups(methods: Sequence[str], base: str, full: str) -> dict[str, list[str]]:
    """The grid's rows by role: {base, single, full, leave_one_out, baselines} (names as in the grid)."""
    single = sorted(m for m in methods if m.startswith("+"))
    loo = sorted(m for m in methods if m.startswith(f"{full}-"))
    known = {base, full, *single, *loo}
    return {"base": [base] if base in methods else [], "single": single, "full": [full] if full in methods else [],
            "leave_one_out": loo, "baselines": sorted(m for m in methods if m not in known)}


def row_summary(method: str, role: str, rows: dict[str, dict[int, dict]], base: str, n_boot: int) -> dict:
    runs = rows[method]
    seeds = sorted(runs)
    score, sd = mean_sd([runs[s]["score"] for s in seeds])
    vs_base = paired_rows(runs, rows[base], n_boot) if method != base and base in rows else None
    same = [s for s in seeds if s in rows.get(base, {})]
    return {"method": method, "role": role, "seeds": seeds, "score": score, "score_sd": sd,
            "constant_runs": sum(runs[s]["constant"] for s in seeds), "vs_base": vs_base,
            "beats_base_seeds": sum((runs[s]["score"] or 0) > (rows[base][s]["score"] or 0) for s in same)
            if method != base else None, "paired_seeds": len(same),
            "wall_s": median_wall(runs, seeds)}


def leave_one_out(rows, full: str, loo: Sequence[str], n_boot: int) -> list[dict]:
    """What each component adds to the combination: Δ = full − (full without it), > 0 when removing it hurts."""
    return [{"component": m[len(full) + 1:], **judge(rows, full, ">", m, n_boot,
                                                      claim=f"{full} > {m}")} for m in loo]


def claims(rows, summaries, grp: dict[str, list[str]], base: str, full: str, loo: list[dict],
           n_boot: int) -> list[dict]:
    """The paper's claims (UniSD* > best single component > base; UniSD* > base; the component driving the gain)."""
    clean = [m for m in grp["single"] if summaries[m]["constant_runs"] == 0]
    best = max(clean, key=lambda m: summaries[m]["score"], default=None)
    if best is None:
        none = "not measurable (no clean single-component row)"
        out = [{"claim": f"{full} > best single component", "verdict": none},
               {"claim": f"best single component > {base}", "verdict": none}]
    else:
        out = [judge(rows, full, ">", best, n_boot, claim=f"{full} > {best} (best single component)"),
               judge(rows, best, ">", base, n_boot, claim=f"{best} (best single component) > {base}")]
    out.append(judge(rows, full, ">", base, n_boot))
    measured = [r for r in loo if judged(r)]
    driver = max(measured, key=lambda r: r["delta"], default=None)
    claim = "the component driving the gain"
    if driver is None:
        out.append({"claim": claim, "verdict": "not measurable (no leave-one-out row without a constant predictor)"})
    else:
        c = driver["component"]
        out.append({"claim": claim, **{k: driver[k] for k in ("n", "a", "b", "delta", "ci", "seed_deltas")},
                    "verdict": f"{c} (removing it from {full} costs the most; CI above 0)" if driver["ci"][0] > 0
                    else f"none identified (the largest leave-one-out cost, {c}, has a CI including 0)"})
    return out


def _delta_cell(d: dict | None) -> str:
    if not d or not d.get("n"):
        return "-"
    return f"{fmt(d['delta'], sign=True)} {fmt_ci(d['ci'], sign=True)}"


def markdown(root: Path, task: str, res: dict) -> str:
    base = res["base"]
    lines = [f"# UniSD study: {root.name} ({task})", "",
             "Generated by `python -m benchmarks.unisd_study` from the run.json files and saved predictions (do not "
             "edit by hand).  Δ = paired by example and seed (seeds averaged per example first); 95 % bootstrap CI "
             "over examples.  ⚠ = a constant-predictor run (>= 95 % of predictions on one label): never the winner of "
             "a verdict.",
             "", f"| role | method | seeds | {res['metric']} (mean ± sd) | Δ vs {base} [95% CI] | seeds > {base} | "
             f"predictions ≠ {base} (per seed) | wall s / run (median) |",
             "|---|---|---:|---|---|---:|---|---:|"]
    for r in res["rows"]:
        flag = f" ⚠ {r['constant_runs']} constant" if r["constant_runs"] else ""
        beats = f"{r['beats_base_seeds']}/{r['paired_seeds']}" if r["beats_base_seeds"] is not None else "-"
        lines.append(f"| {r['role']} | {r['method']}{flag} | {len(r['seeds'])} | {fmt(r['score'])} ± "
                     f"{fmt(r['score_sd'])} | {_delta_cell(r['vs_base'])} | {beats} | {fmt_changed(r['vs_base'])} | "
                     f"{fmt(r['wall_s'], 0)} |")
    lines += ["", f"## Leave-one-out: what each component adds to `{res['full']}`", "",
              "| component | Δ = full − without it [95% CI] | Δ per seed | predictions changed (per seed) | "
              "verdict on `full > without` |", "|---|---|---|---|---|"]
    for r in res["leave_one_out"]:
        lines.append(f"| {r['component']} | {_delta_cell(r)} | {fmt_seed_deltas(r.get('seed_deltas', []))} | "
                     f"{fmt_changed(r)} | {r['verdict']} |")
    lines += ["", "## The paper's claims", "", "| claim | Δ [95% CI] | Δ per seed | verdict |", "|---|---|---|---|"]
    for c in res["claims"]:
        lines.append(f"| {c['claim']} | {_delta_cell(c)} | {fmt_seed_deltas(c.get('seed_deltas', []))} | "
                     f"{c['verdict']} |")
    if res.get("comparisons"):
        lines += ["", "## Baselines against each other", "",
                  "| comparison | Δ [95% CI] | Δ per seed | predictions changed (per seed) | verdict |",
                  "|---|---|---|---|---|"]
        for c in res["comparisons"]:
            lines.append(f"| {c['claim']} | {_delta_cell(c)} | {fmt_seed_deltas(c.get('seed_deltas', []))} | "
                         f"{fmt_changed(c)} | {c['verdict']} |")
    return "\n".join(lines + [""])


def analyse(root: str | Path, task: str = "rotten_tomatoes", base: str = "base", full: str = "unisd_star",
            n_boot: int = 10_000) -> dict:
    """The study's rows, leave-one-out table and claims from the finished runs of ``root`` (reads only)."""
    root = Path(root)
    rows = load_rows(root, task)
    if not rows:
        raise ValueError(f"{root}: no finished run with predictions for task {task!r}")
    grp = groups(list(rows), base, full)
    summaries = {m: row_summary(m, role, rows, base, n_boot)
                 for role in ("base", "single", "full", "leave_one_out", "baselines") for m in grp[role]}
    loo = leave_one_out(rows, full, grp["leave_one_out"], n_boot)
    metric = next(r["metric"] for runs in rows.values() for r in runs.values())
    comparisons = [judge(rows, a, "!=", b, n_boot, claim=f"{a} vs {b}: {what}")
                   for a, b, what in COMPARISONS if a in rows and b in rows]
    return {"task": task, "metric": metric, "base": base, "full": full, "rows": list(summaries.values()),
            "leave_one_out": loo, "claims": claims(rows, summaries, grp, base, full, loo, n_boot),
            "comparisons": comparisons}


def study(root: str | Path, task: str = "rotten_tomatoes", base: str = "base", full: str = "unisd_star",
          n_boot: int = 10_000) -> dict:
    """:func:`analyse`, written to ``unisd_study.json`` and ``unisd_study.md`` in ``root``."""
    root = Path(root)
    res = analyse(root, task, base, full, n_boot)
    write_study(root, "unisd_study", res, markdown(root, task, res))
    return res


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.unisd_study", description=__doc__.split("\n\n")[0])
    ap.add_argument("grid_dir")
    ap.add_argument("--task", default="rotten_tomatoes")
    ap.add_argument("--base", default="base", help="method name of plain self-distillation (every component off)")
    ap.add_argument("--full", default="unisd_star", help="method name of the full combination (UniSD*)")
    args = ap.parse_args(argv)
    return study_cli("unisd_study", args.grid_dir, lambda: study(args.grid_dir, args.task, args.base, args.full))


if __name__ == "__main__":
    raise SystemExit(main())
