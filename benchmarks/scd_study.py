"""The SCD study's analysis (issue 18): the paper's claims with paired CIs, and its mechanism.

    python -m benchmarks.scd_study results/scd_study_cpu [--task rotten_tomatoes] [--teacher teacher]
                                                       [--anchor sft]

Reads the ``run.json`` files (status ok) and saved predictions of one grid folder; one row per
method (``method`` of the grid's runs).  Writes ``scd_study.md`` and ``scd_study.json`` there.

* **Rows**: the task's primary metric (mean ± sd over seeds) -- accuracy, or entity micro-F1 for NER, whose Δ
  resamples per-example entity counts (:func:`benchmarks.paired.paired_f1_delta`); constant-predictor runs
  (>= 95 % of predictions on one label: such a row is never the winner of a verdict), Δ vs the teacher paired by
  example (seeds averaged per example first; 95 % bootstrap CI over examples), seeds in which the student beats
  the teacher, and median wall seconds per run.
* **The mechanism** (the paper's SFS/TFS argument): per seed, *student-favoured* examples (SFS: the SFT
  anchor right, the teacher wrong) and *teacher-favoured* ones (TFS: the teacher right, the anchor wrong; for
  NER: the example's own entity F1 higher / lower); each row's score on both, pooled over seeds.  AW should
  keep the student's wins on SFS; SCD should shrink its losses on TFS.
* **Claims**: SCD+AW > CD, CD >= KD, KD > SFT, and the best student vs the teacher; each Δ paired by
  example and seed with its CI.  **Comparisons** (what each ingredient adds, judged the same way): SCD > CD
  (selection vs a fixed order), SCD+AW > SCD (AW), SCD+AW > KD+CE (AW vs a fixed CE share), KD+CE > KD,
  SCD+AW > KD and SCD+AW > SFT.  ``>``: supported when the CI lies above 0, contradicted below 0, else
  not distinguishable; ``>=``: contradicted only when the CI lies below 0.  *not measurable* when a
  row is missing, or a constant-predictor run would be the winner (see :func:`benchmarks.paired.judge`).  Each
  claim also lists its Δ per seed: the CI is over examples (seeds averaged first) and does not include the
  seed-to-seed spread of training.

* **Why ``scd_select`` chose what it chose**: the two terms of its score, KL(best || c) and KL(student || c),
  over each staged row's choices (:func:`selection_terms`, from the runs' ``select`` events in metrics.jsonl).

* **Dependency builds**: when the runs used more than one build of their dependency runs (a grid resumed on a
  new machine retrains the teacher, the healed student and the AW anchor there), a table of which runs used
  which build (run.json ``dependencies``; :func:`benchmarks.paired.run_builds`).

The teacher of a seed is the ``--teacher`` run with that seed, or the only one when the study shares one
teacher across seeds.  Correctness per example: ``scores.correct`` (:mod:`benchmarks.paired`).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from benchmarks.paired import (common_ids, fmt, fmt_ci, fmt_seed_deltas, judge, load_rows, mean_sd, median_wall,
                              paired_runs, pooled_score, seed_pairs, shared_run, study_cli, write_study)
from scd.core.results import read_metrics

CLAIMS = (("scd_aw", ">", "cd"), ("cd", ">=", "kd"), ("kd", ">", "sft"))
# what each ingredient adds (not the paper's claims): checkpoint selection over a fixed order, AW over plain SCD,
# AW over a fixed KD + CE mix (AW also sees gold labels), a fixed CE share over plain KD, and the full method over
# plain KD and over SFT
COMPARISONS = (("scd", ">", "cd"), ("scd_aw", ">", "scd"), ("scd_aw", ">", "kd_ce"), ("kd_ce", ">", "kd"),
               ("scd_aw", ">", "kd"), ("scd_aw", ">", "sft"))
STUDENT_ORDER = ("sft", "kd", "kd_ce", "cd", "scd", "scd_aw")


def favoured_subsets(anchor: dict[str, float], teacher: dict[str, float]) -> tuple[list[str], list[str]]:
    """(SFS, TFS) ids: anchor right and teacher wrong; teacher right and anchor wrong."""
    ids = common_ids(anchor, teacher)
    return ([i for i in ids if anchor[i] > teacher[i]], [i for i in ids if teacher[i] > anchor[i]])


def selection_terms(runs: dict[int, dict]) -> dict | None:
    """The two terms of ``scd_select``'s score, KL(best || c) + KL(student || c), over a row's choices (the
    ``select`` events of its runs' metrics.jsonl; nats per token on the dev probe): the largest KL(best || c) and
    the smallest KL(student || c) over checkpoints, stages and seeds -> {kl_best_max, kl_student_min, choices}, or
    None when the row made no ``scd_select`` choice.  When the second always dwarfs the first, the rule picks the
    checkpoint nearest the student whatever the teachers' quality."""
    best, student, n = [], [], 0
    for r in runs.values():
        for ev in read_metrics(Path(r["run_dir"]) / "metrics.jsonl"):  # a missing file: no event
            if ev.get("event") == "select" and ev.get("rule") == "scd_select":
                best += ev["kl_best"].values()
                student += ev["kl_student"].values()
                n += 1
    return {"kl_best_max": max(best), "kl_student_min": min(student), "choices": n} if n else None


def row_summary(method: str, runs: dict[int, dict], teachers: dict[int, dict], anchors: dict[int, dict],
                n_boot: int) -> dict:
    """One row of the table: its score, Δ vs teacher, the score on SFS / TFS, seeds beating the teacher."""
    seeds = sorted(runs)
    score, sd = mean_sd([runs[s]["score"] for s in seeds])
    paired = [(r, t) for _, r, t in seed_pairs(runs, teachers, shared=True)]
    vs_t = paired_runs([r for r, _ in paired], [t for _, t in paired], n_boot=n_boot)
    sfs, tfs = [], []  # (run, ids) per seed, pooled
    for s in seeds:
        t, a = shared_run(teachers, s), anchors.get(s)
        if t is None or a is None:
            continue
        sub_s, sub_t = favoured_subsets(a["correct"], t["correct"])
        sfs.append((runs[s], sub_s))
        tfs.append((runs[s], sub_t))
    (sfs_score, sfs_n), (tfs_score, tfs_n) = pooled_score(sfs), pooled_score(tfs)
    beats = sum(1 for r, t in paired if (r["score"] or 0) > (t["score"] or 0))
    return {"method": method, "seeds": seeds, "score": score, "score_sd": sd,
            "constant_runs": sum(runs[s]["constant"] for s in seeds),
            "max_top_share": max((runs[s]["top_share"] for s in seeds if runs[s]["top_share"] is not None),
                                 default=None),
            "vs_teacher": vs_t, "sfs_score": sfs_score, "sfs_n": sfs_n, "tfs_score": tfs_score, "tfs_n": tfs_n,
            "beats_teacher_seeds": beats, "paired_seeds": len(paired),
            "wall_s": median_wall(runs, seeds),
            "selections": {s: runs[s]["selection_steps"] for s in seeds if runs[s]["selection_steps"]},
            "selection_terms": selection_terms(runs)}


def claims(rows: dict[str, dict[int, dict]], summaries: dict[str, dict], teacher: str, n_boot: int,
           tests: Sequence[tuple[str, str, str]] = CLAIMS, vs_teacher: bool = True) -> list[dict]:
    """The paper's claims (``tests``, then the best student vs the teacher when ``vs_teacher``), each Δ paired by
    example and seed (the seeds both rows have)."""
    out = []
    students = [m for m in summaries if m != teacher]
    clean = [m for m in students if summaries[m]["constant_runs"] == 0]
    best = max(clean, key=lambda m: summaries[m]["score"], default=None)
    tests = list(tests) + ([(best or "best student", ">=", teacher)] if vs_teacher else [])
    for a, op, b in tests:
        if best is None and b == teacher:
            out.append({"claim": f"{a} {op} {b}", "verdict": "not measurable (every student row has a constant run)"})
            continue
        claim = f"{a} {op} {b}" + (" (best student vs teacher)" if b == teacher else "")
        out.append(judge(rows, a, op, b, n_boot, claim=claim, shared=teacher))
    return out


def _claim_lines(rows: list[dict]) -> list[str]:
    lines = ["| claim | Δ [95% CI over examples] | Δ per seed | verdict |", "|---|---|---|---|"]
    for c in rows:
        d = (f"{fmt(c['delta'], sign=True)} {fmt_ci(c['ci'], sign=True)} "
             f"(n = {c['n']})") if "delta" in c else "-"
        lines.append(f"| {c['claim']} | {d} | {fmt_seed_deltas(c.get('seed_deltas', []))} | {c['verdict']} |")
    return lines


def markdown(root: Path, task: str, table: list[dict], claim_rows: list[dict], teacher: str, anchor: str,
             comparisons: Sequence[dict] = (), metric: str = "accuracy", builds: Sequence[dict] = ()) -> str:
    lines = [f"# SCD study: {root.name} ({task})", "",
             "Generated by `python -m benchmarks.scd_study` from the run.json files and saved predictions "
             "(do not edit by hand).  Δ = paired by example, seeds averaged per example first; 95 % bootstrap "
             f"CI over examples.  SFS / TFS: examples where the SFT anchor (`{anchor}`) is right and the teacher "
             f"(`{teacher}`) wrong / the reverse, per seed, pooled.  ⚠ = a constant-predictor run (>= 95 % of "
             "predictions on one label): never the winner of a verdict.", "",
             f"| method | seeds | {metric} (mean ± sd) | Δ vs teacher [95% CI] | on SFS (n) | on TFS (n) | "
             "seeds > teacher | wall s / run (median) |", "|---|---:|---|---|---|---|---:|---:|"]
    for r in table:
        flag = f" ⚠ {r['constant_runs']} constant" if r["constant_runs"] else ""
        v = r["vs_teacher"]
        ci = fmt_ci(v["ci"], sign=True) if v["n"] else ""
        sd = f" ± {fmt(r['score_sd'])}" if len(r["seeds"]) > 1 else ""  # one run has no spread
        lines.append(f"| {r['method']}{flag} | {len(r['seeds'])} | {fmt(r['score'])}{sd} | "
                     f"{fmt(v['delta'], sign=True)} {ci} | {fmt(r['sfs_score'])} ({r['sfs_n']}) | "
                     f"{fmt(r['tfs_score'])} ({r['tfs_n']}) | {r['beats_teacher_seeds']}/{r['paired_seeds']} | "
                     f"{fmt(r['wall_s'], 0)} |")
    staged = [r for r in table if any(len(v) > 1 for v in r["selections"].values())]
    if staged:
        seeds = sorted({s for r in staged for s in r["selections"]})
        lines += ["", "## The teacher checkpoint (its training step) of each stage", "",
                  "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
        for r in staged:
            lines.append(f"| {r['method']} | " + " | ".join(" → ".join(map(str, r["selections"].get(s) or [])) or "-"
                                                           for s in seeds) + " |")
        terms = [(r["method"], r["selection_terms"]) for r in staged if r["selection_terms"]]
        if terms:
            lines += ["", "`scd_select` picks argmin_c KL(best ‖ c) + KL(student ‖ c) (nats per token on the dev "
                      "probe); its two terms over each row's choices (checkpoints, stages, seeds):", ""]
            lines += [f"* `{m}`: {selection_terms_text(t)}" for m, t in terms]
    lines += ["", "## The paper's claims", ""] + _claim_lines(claim_rows)
    if len(builds) > 1:
        lines += ["", "## Dependency builds", "",
                  "The runs used more than one build of their dependency runs (a grid resumed on a new machine "
                  "retrains them under the same name; builds differ at float rounding).  Build = the dependency "
                  "run's finished time (run.json `dependencies`).", "", "| builds | runs |", "|---|---|"]
        lines += [f"| {b['builds']} | {', '.join(b['runs'])} |" for b in builds]
    if comparisons:
        lines += ["", "## What each ingredient adds (not the paper's claims)", ""] + _claim_lines(comparisons)
    return "\n".join(lines + [""])


def selection_terms_text(t: dict) -> str:
    """"KL(best ‖ c) at most 0.221, KL(student ‖ c) at least 0.822 over its 8 choices"."""
    return (f"KL(best ‖ c) at most {t['kl_best_max']:.3f}, KL(student ‖ c) at least {t['kl_student_min']:.3f} over "
            f"its {t['choices']} choices")


def build_groups(rows: dict[str, dict[int, dict]]) -> list[dict]:
    """The runs grouped by the builds of their dependency runs: [{builds: "role finished; ...", runs: ["method
    seed s", ...]}], in order of first appearance (rows, then seeds)."""
    groups: dict[str, list[str]] = {}
    for method, runs in rows.items():
        for seed, r in sorted(runs.items()):
            key = "; ".join(f"{role} {v}" for role, v in sorted(r["builds"].items())) or "no dependency run"
            groups.setdefault(key, []).append(f"{method} seed {seed}")
    return [{"builds": k, "runs": v} for k, v in groups.items()]


def analyse(root: str | Path, task: str = "rotten_tomatoes", teacher: str = "teacher", anchor: str = "sft",
            n_boot: int = 10_000) -> dict:
    """The study's rows and claims from the finished runs of ``root`` (reads only; deterministic)."""
    root = Path(root)
    rows = load_rows(root, task)
    if not rows:
        raise ValueError(f"{root}: no finished run with predictions for task {task!r}")
    teachers, anchors = rows.get(teacher, {}), rows.get(anchor, {})
    order = [teacher] + [m for m in STUDENT_ORDER if m in rows] + sorted(set(rows) - set(STUDENT_ORDER) - {teacher})
    summaries = {m: row_summary(m, rows[m], teachers, anchors, n_boot) for m in order if m in rows}
    majority = next((r["majority"] for runs in rows.values() for r in runs.values() if r["majority"] is not None),
                    None)
    metric = next(r["metric"] for runs in rows.values() for r in runs.values())
    return {"task": task, "metric": metric, "teacher": teacher, "anchor": anchor, "majority": majority,
            "rows": list(summaries.values()),
            "claims": claims(rows, summaries, teacher, n_boot),
            "comparisons": claims(rows, summaries, teacher, n_boot, COMPARISONS, vs_teacher=False),
            "builds": build_groups({m: rows[m] for m in order if m in rows})}


def study(root: str | Path, task: str = "rotten_tomatoes", teacher: str = "teacher", anchor: str = "sft",
          n_boot: int = 10_000) -> dict:
    """:func:`analyse`, written to ``scd_study.json`` and ``scd_study.md`` in ``root``."""
    root = Path(root)
    res = analyse(root, task, teacher, anchor, n_boot)
    write_study(root, "scd_study", res, markdown(root, task, res["rows"], res["claims"], teacher, anchor,
                                                 res["comparisons"], res["metric"], res["builds"]))
    return res


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scd_study", description=__doc__.split("\n\n")[0])
    ap.add_argument("grid_dir")
    ap.add_argument("--task", default="rotten_tomatoes")
    ap.add_argument("--teacher", default="teacher", help="method name of the teacher rows")
    ap.add_argument("--anchor", default="sft", help="method name of the SFT anchor rows (SFS/TFS)")
    args = ap.parse_args(argv)
    return study_cli("scd_study", args.grid_dir, lambda: study(args.grid_dir, args.task, args.teacher, args.anchor))


if __name__ == "__main__":
    raise SystemExit(main())
