"""Recompute the numbers quoted in the results notes from the committed raw files.

    python -m benchmarks.note_numbers            # table: note | name | value | phrase
    python -m benchmarks.note_numbers --check    # exit 1 when a note lacks its phrase

Rule: every number in a results note comes from committed raw files (``run.json``,
``metrics.jsonl``, ``predictions/*.jsonl``) through a committed script.  Each entry
below is one quoted number: the note it appears in, a name, its value, and the exact
phrase the note must contain (``line`` narrows it to a line starting with that text,
e.g. a table row; elsewhere line breaks and runs of spaces do not matter).
``tests/test_note_numbers.py`` runs ``--check`` on the committed
files, so a note cannot go stale silently: re-run a grid, and this fails until the
note quotes the new numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import stats

from benchmarks.leaderboard.load import label_share
from benchmarks.paired import fmt_changed, fmt_seed_deltas
from benchmarks.recovery_power import correlation_views, paired_deltas
from benchmarks.recovery_study import aggregate as aggregate_recovery, load_runs as load_recovery_runs
from benchmarks.scd_study import analyse as analyse_scd_study
from benchmarks.unisd_study import analyse as analyse_unisd_study
from benchmarks.tasks.ner import answer_key, answer_profile
from scd.core.results import iter_run_jsons

REPO = Path(__file__).resolve().parents[1]
LN2 = math.log(2.0)
SCD = "results/scd_baselines_cpu"
RECOVERY = "results/recovery_study_cpu"
EVAL = "results/eval/smollm2-135m"
CALIBRATED = "results/eval/smollm2-135m-calibrated"
STATUS = "README.md"


@dataclasses.dataclass(frozen=True)
class Entry:
    note: str  # path of the note, relative to the repository root
    name: str
    value: float
    phrase: str  # the text the note must contain
    line: str | None = None  # ... on a line that starts with this (None: anywhere)


# ----------------------------------------------------------------------------- reading
def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def ok_runs(root: Path, grid: str) -> list[tuple[Path, dict]]:
    """(run dir, run.json) of every finished run of a committed grid folder, sorted by run id."""
    out = []
    for path in sorted((root / grid).glob("*/run.json")):
        rec = json.loads(path.read_text(encoding="utf-8"))
        if rec.get("status") == "ok":
            out.append((path.parent, rec))
    return out


def plan_statuses(folder: Path) -> list[str | None]:
    """The status of every run of the grid plan in ``folder`` (None: not started); [] without a plan.json."""
    plan = folder / "plan.json"
    if not plan.exists():
        return []
    paths = [folder / r["run_id"] / "run.json" for r in json.loads(plan.read_text(encoding="utf-8"))["runs"]]
    return [json.loads(p.read_text(encoding="utf-8")).get("status") if p.exists() else None for p in paths]


def plan_finished(folder: Path) -> bool:
    """Every run of the grid plan in ``folder`` finished ok (False without a plan.json: not launched)."""
    statuses = plan_statuses(folder)
    return bool(statuses) and all(s == "ok" for s in statuses)


def _value(rec: dict, task: str, metric: str) -> float:
    return float(rec["eval"][task][metric]["value"])


def _p(p: float) -> str:
    return f"{p:.2g}"


def auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """ROC-AUC as P(score of a positive > score of a negative), ties counted 1/2."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    pos, neg = s[y][:, None], s[~y][None, :]  # [P, 1], [1, N]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def best_threshold_accuracy(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Highest accuracy of 'positive iff score > t' over every threshold t (chosen on the data itself)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    cuts = np.concatenate([[-np.inf], np.unique(s)])  # predict positive where s > cut
    return float(max(((s > c) == y).mean() for c in cuts))


# ------------------------------------------------------------------ scd_baselines_cpu
def scd_baselines(root: Path) -> list[Entry]:
    runs = ok_runs(root, SCD)
    note = f"{SCD}/README.md"
    by: dict[str, list[dict]] = {}
    for _, rec in runs:
        by.setdefault(rec["method"], []).append(rec)
    out = []
    for method, recs in sorted(by.items()):
        f1 = float(np.mean([_value(r, "rotten_tomatoes", "f1_macro") for r in recs]))
        nll = float(np.mean([_value(r, "rotten_tomatoes", "label_nll") for r in recs]))
        out.append(Entry(note, f"{method} macro-F1 / label NLL, mean over {len(recs)} seeds", nll,
                         f"| {f1:.3f} | {nll:.3f} |", line=f"| {method} |"))
    cd = [_value(r, "rotten_tomatoes", "label_nll") for r in by["cd"]]
    out.append(Entry(note, "cd label NLL mean (per seed range)", float(np.mean(cd)),
                     f"label NLL {np.mean(cd):.2f} on average ({min(cd):.2f}-{max(cd):.2f} by seed)"))
    students = [(r["method"], r["seed"], _value(r, "rotten_tomatoes", "label_nll"))
                for _, r in runs if r["method"] != "teacher"]
    below = sorted((m, s, v) for m, s, v in students if v <= LN2)
    text = ", ".join(f"`{m}` seed {s} ({v:.3f})" for m, s, v in below) or "none"
    out.append(Entry(note, "student runs with label NLL <= ln 2", float(len(below)),
                     f"student runs whose label NLL is at or below chance ({LN2:.3f}): {text}"))
    w = [[float(x["w_mean"]) for x in _jsonl(d / "metrics.jsonl") if "w_mean" in x]
         for d, r in runs if r["method"] == "scd_aw"]
    flat = [v for run in w for v in run]
    out.append(Entry(note, "AW logged batch-mean weight w_mean: range (mean)", float(np.mean(flat)),
                     f"`w_mean` logged in metrics.jsonl ranged over {min(flat):.2f}-{max(flat):.2f} "
                     f"(mean {np.mean(flat):.2f}, {len(flat)} logged steps of {len(w)} runs)"))
    return out


def fine_tuned_teacher(root: Path) -> list[Entry]:
    """The SFT teacher (configs/scd/teacher_demo.yaml) on Rotten Tomatoes: 3 seeds, all 500 reviews."""
    acc = sorted((r["seed"], _value(r, "rotten_tomatoes", "accuracy")) for _, r in ok_runs(root, SCD)
                 if r["method"] == "teacher")
    vals = [a for _, a in acc]
    phrase = (f"{np.mean(vals):.3f} on all 500 Rotten Tomatoes test reviews (mean over {len(vals)} seeds, "
              f"{min(vals):.3f}")
    orig = [_value({"eval": r["eval_original"]}, "rotten_tomatoes", "accuracy") for _, r in ok_runs(root, RECOVERY)]
    out = [Entry(n, "fine-tuned teacher accuracy, 3-seed mean", float(np.mean(vals)), phrase)
           for n in (STATUS, f"{EVAL}/README.md", f"{CALIBRATED}/README.md")]
    out.append(Entry(f"{CALIBRATED}/README.md", "recovery study original (seed 0, 200 reviews)", orig[0],
                     f"{orig[0]:.3f} on the first 200 (seed 0"))
    return out


# -------------------------------------------------------------------------- eval notes
def eval_notes(root: Path) -> list[Entry]:
    rows = _jsonl(root / EVAL / "predictions" / "rotten_tomatoes.jsonl")
    n = len(rows)
    share = sum(r["gold"] == "rotten" for r in rows) / n
    acc = sum(r["prediction"] == r["gold"] for r in rows) / n
    k = sum(r["prediction"] == "rotten" for r in rows)
    note = f"{EVAL}/README.md"
    out = [Entry(note, "rotten_tomatoes: rotten predictions / share of rotten reviews", share,
                 f"answers \"rotten\" for {k} of {n} reviews (accuracy {acc:.2f}; rotten reviews are "
                 f"{share:.2f} of them)")]
    rows = _jsonl(root / CALIBRATED / "predictions" / "rotten_tomatoes.jsonl")
    margin = [r["logliks"]["fresh"] - r["logliks"]["rotten"] for r in rows]
    fresh = [r["gold"] == "fresh" for r in rows]
    best = best_threshold_accuracy(margin, fresh)
    out.append(Entry(f"{CALIBRATED}/README.md", "best-threshold accuracy of the label margin", best,
                     f"ROC-AUC of log p(fresh) - log p(rotten) against the gold label is {auc(margin, fresh):.2f}, "
                     f"and even the best threshold chosen on the test set itself reaches only {best:.3f}"))
    return out


# ------------------------------------------------------------------ recovery_study_cpu
def _recovery_rows(root: Path) -> list[dict]:
    rows = []
    for _, rec in ok_runs(root, RECOVERY):
        kl = rec.get("kl_to_original") or {}
        rows.append({"method": rec["recovery"]["method"], "steps": int(rec["recovery"].get("budget_steps") or 0),
                     "kl_before": float(kl["before"]), "kl_after": float(kl["after"]),
                     "cka": float(rec["cka"]["mean_matched"]),
                     "score": _value(rec, "rotten_tomatoes", "accuracy")})
    return rows


def recovery(root: Path) -> list[Entry]:
    rows = _recovery_rows(root)
    note = f"{RECOVERY}/README.md"
    out = []
    moved = [r for r in rows if r["method"] == "sd" and r["kl_before"] >= 0.1]  # 8-bit: 0.003 before
    for steps in sorted({r["steps"] for r in moved}):
        f = [r["kl_before"] / r["kl_after"] for r in moved if r["steps"] == steps]
        phrase = f"{min(f):.1f}-{max(f):.1f}x with {steps} steps"
        out += [Entry(n, f"sd KL reduction factor, {steps} steps ({len(f)} runs)", max(f), phrase)
                for n in (note, STATUS)]
    for label, sub in (("all runs", rows), ("recovered runs (method != none)",
                                            [r for r in rows if r["method"] != "none"])):
        x, y = [r["cka"] for r in sub], [r["score"] for r in sub]
        pr, sr = stats.pearsonr(x, y), stats.spearmanr(x, y)
        phrase = (f"{len(sub)} runs: Pearson r = {pr.statistic:.3f} (p = {_p(pr.pvalue)}), "
                  f"Spearman rho = {sr.statistic:.3f} (p = {_p(sr.pvalue)})")
        out += [Entry(n, f"score vs mean CKA, {label}", float(sr.statistic), phrase) for n in (note, STATUS)]
    return out


# ------------------------------------------------------------ recovery_study_seeded_cpu
SEEDED = "results/recovery_study_seeded_cpu"
MILD = (("quantize", 8.0, "8-bit"), ("prune", 0.3, "30 % pruning"), ("forget", 8.0, "8 forgetting steps"))
GAINS = (("quantize", 4.0, "4-bit"), ("forget", 16.0, "16 forgetting steps"))


def recovery_seeded(root: Path, seeds: int = 3) -> list[Entry]:
    """Issue 19's verdicts: SD and SD under the KL-aware budget on the mild degradations (no harm?) and on
    4-bit / forget-16 (gains kept?), paired by review and seed; score vs CKA over configurations.  Nothing
    is quoted until every one of these configurations has ``seeds`` seeds (the README says it is running)."""
    rows = load_recovery_runs(root / SEEDED)
    deltas = {(d["degradation"], float(d["strength"]), d["method"]): d for d in paired_deltas(rows, "rotten_tomatoes")}
    keys = [(deg, s, m) for deg, s, _ in MILD + GAINS for m in ("sd", "sd-kl")]
    if any(deltas.get(k, {}).get("seeds", 0) < seeds for k in keys):
        return []
    note, out = f"{SEEDED}/README.md", []
    for deg, strength, label in MILD + GAINS:
        for m in ("sd", "sd-kl"):
            d = deltas[(deg, strength, m)]
            (blo, bhi), (lo, hi) = d["before_ci"], d["delta_ci"]
            phrase = (f"{m} on {label}: {d['after']:.3f} after vs {d['before']:.3f} [{blo:.3f}, {bhi:.3f}] degraded, "
                      f"Δ {d['delta']:+.3f} [{lo:+.3f}, {hi:+.3f}], {'harm' if d['harm'] else 'no harm'}, "
                      f"constant in {d['constant']}/{d['seeds']} seeds")
            out.append(Entry(note, f"{m} Δ accuracy on {label} ({d['seeds']} seeds)", d["delta"], phrase))
    agg = aggregate_recovery(rows)
    for v in correlation_views(agg, rows, "cka_after", "score_after", families=False):
        c = v["configs"]
        lo, hi = c["spearman_ci"]
        phrase = f"Spearman ρ = {c['spearman_rho']:.3f} [{lo:.3f}, {hi:.3f}] over {c['n']} configurations"
        out += [Entry(n, f"score vs mean CKA, {v['view']} configurations (mean over seeds)", c["spearman_rho"], phrase)
                for n in (note, STATUS)]
    return out


def demo(root: Path) -> list[Entry]:
    """``make demo``'s wall time in the README, from the reference run's ``results/demo/timing.json``."""
    timing = json.loads((root / "results/demo/timing.json").read_text(encoding="utf-8"))
    ph = timing["phases"]
    out = [Entry(STATUS, "make demo wall seconds after setup (reference run)", timing["total_s"],
                 f"{timing['total_s']:.0f} s after setup ({timing['total_s'] / 60:.1f} min)"),
           Entry(STATUS, "make demo wall seconds (quick start)", timing["total_s"],
                 f"({timing['total_s']:.0f} s measured after setup on 2 idle cores"),
           Entry("Makefile", "make demo wall minutes (make help)", timing["total_s"] / 60,
                 f"{timing['total_s'] / 60:.1f} min measured after setup")]
    for key, label in (("train demo-teacher", "teacher training"), ("run teacher", "teacher scoring"),
                       ("run sft", "SFT student"), ("run kd", "KD student"),
                       ("other (start-up, leaderboard)", "start-up and leaderboard")):
        out.append(Entry(STATUS, f"make demo phase: {key}", ph[key], f"{label} {ph[key]:.0f} s"))
    return out


def perf(root: Path) -> list[Entry]:
    """The README's fast-path ratios, from ``results/perf/distill_step.json`` (fp32 tables, target tokens/s)."""
    tables = json.loads((root / "results/perf/distill_step.json").read_text(encoding="utf-8"))["tables"]["fp32"]
    tps = {shape: {r["name"]: r["tokens_per_s"] for r in t["rows"]} for shape, t in tables.items()}
    out = []
    for a, b, label in (("ours_fast", "ours_naive", "fast vs naive"), ("ours_cached", "ours_fast", "cached vs fast"),
                        ("ours_fast", "trl", "fast vs TRL")):
        short, long = (tps[s][a] / tps[s][b] for s in ("short", "long"))
        out.append(Entry(STATUS, f"{label} target tokens/s ratio (short, long)", short,
                         f"{label} {short:.2f}x short / {long:.2f}x long"))
    e2e = {v["name"]: v for v in json.loads((root / "results/perf/e2e_kd_demo.json").read_text(
        encoding="utf-8"))["variants"]}
    base = e2e["before"]["process_wall_s"]
    for name, label in (("after", "completion-only head"), ("cached", "reused top-64 cache")):
        out.append(Entry(STATUS, f"demo KD row end to end, {label}", base / e2e[name]["process_wall_s"],
                         f"{base / e2e[name]['process_wall_s']:.2f}x with the {label}"))
    few = json.loads((root / "results/perf/fewshot_eval.json").read_text(encoding="utf-8"))
    out.append(Entry(STATUS, "few-shot likelihood scoring, shared prefix vs full contexts", few["ratio_full_over_shared"],
                     f"{few['ratio_full_over_shared']:.2f}x per review ({few['shots']} shots, {few['n']} RT dev "
                     f"reviews, {few['shared_prefix_tokens']} of {few['mean_context_tokens']:.0f} context tokens shared; "
                     f"{few['predictions_changed']} predictions changed)"))
    return out


def unisd_probe(root: Path) -> list[Entry]:
    """The README's teacher-advantage figures, from ``results/unisd_probe/*/probe.json`` (RT dev, 200 reviews)."""
    def acc(name: str) -> tuple[dict, dict, dict]:
        r = json.loads((root / "results/unisd_probe" / name / "probe.json").read_text(encoding="utf-8"))
        return r["teacher"]["accuracy"], r["student"]["accuracy"], r["difference"]["accuracy"]

    out = []
    t, s, d = acc("rt-dev-ours-none")
    out.append(Entry(STATUS, "probe: teacher accuracy with our former wording", t["value"],
                     f"no better than the student on 200 RT dev reviews (teacher {t['value']:.3f}, student "
                     f"{s['value']:.3f})"))
    for name, label in (("rt-dev-released-none", "released wording"),
                        ("rt-dev-released-pn", "released wording + positive/negative")):
        t, s, d = acc(name)
        lo, hi = d["ci"]
        out.append(Entry(STATUS, f"probe: teacher - student accuracy, {label}", d["value"],
                         f"{t['value']:.3f} vs the student's {s['value']:.3f} (Δ {d['value']:+.3f} [{lo:+.3f}, {hi:+.3f}])"))
    return out


def scd_study_dev(root: Path) -> list[Entry]:
    """The SCD study's teacher choice, from the committed copy of its run (manifest + run.json)."""
    d = root / "results/scd_study_cpu_dev/teacher-rt-0e9f78bdc010"
    note = "results/scd_study_cpu_dev/README.md"
    ck = json.loads((d / "manifest.json").read_text(encoding="utf-8"))["checkpoints"]
    curve = " / ".join(f"{c['dev_score']:.3f}" for c in ck)
    steps = " / ".join(str(c["step"]) for c in ck)
    acc = json.loads((d / "run.json").read_text(encoding="utf-8"))["eval"]["rotten_tomatoes"]["accuracy"]
    return [Entry(note, "teacher dev accuracy per checkpoint", ck[-1]["dev_score"],
                  f"dev accuracy {curve} at steps {steps}"),
            Entry(note, "teacher test accuracy (final checkpoint)", acc["value"],
                  f"{acc['value']:.3f} [{acc['ci'][0]:.3f}, {acc['ci'][1]:.3f}] on all {acc['n']} test reviews")
            ] + scd_student_dev(root, note) + sft_dev_check(root, note)


def scd_student_dev(root: Path, note: str) -> list[Entry]:
    """The SCD study's pruned student, from the committed copy of its run (run.json ``student``: the greedy
    cut's trace and the healing curve)."""
    d = root / "results/scd_study_cpu_dev/student-smollm2-keep16-236261962dcf"
    run = json.loads((d / "run.json").read_text(encoding="utf-8"))
    st, heal_s = run["student"], run["train"]["wall_s"]
    cut_s = json.loads((d / "cut.json").read_text(encoding="utf-8"))["wall_s"]
    curve = {c["step"]: c["dev_kl"] for c in st["curve"]}
    kept = ", ".join(str(i) for i in st["kept_layers"])
    at = " / ".join(f"{curve[s]:.2f}" for s in (10, 20, 50, 100) if s in curve)
    return [Entry(note, "student: kept layers", len(st["kept_layers"]),
                  f"keeps {len(st['kept_layers'])} of {st['n_layers']} layers ({kept})"),
            *(Entry(n, "student: dev KL after the greedy cut (nats/token)", st["kl_cut"],
                    f"dev KL {st['kl_cut']:.3f} nats per token after the cut") for n in (note, STATUS)),
            Entry(STATUS, "student: dev KL after healing", st["kl_after"],
                  f"{st['kl_after']:.3f} after {max(curve)} steps"),
            Entry(note, "student: dev KL after healing", st["kl_after"],
                  f"{at} after 10 / 20 / 50 / 100 steps and {st['kl_after']:.3f} after {max(curve)} steps"),
            Entry(note, "student: wall hours, cut and healing", cut_s / 3600,
                  f"{cut_s / 3600:.1f} h for the cut and {heal_s / 3600:.1f} h for healing")]


def sft_dev_check(root: Path, note: str) -> list[Entry]:
    """The SCD study's gate: the SFT student's dev accuracy vs the dev majority rate (committed copy of its run)."""
    info = json.loads((root / "results/scd_study_cpu_dev/sft-anchor-rt-aa2dd3844840/run.json")
                      .read_text(encoding="utf-8"))
    acc = info["eval"]["rotten_tomatoes"]["accuracy"]
    prof = info["eval_info"]["rotten_tomatoes"]["extra"]["accuracy"]
    return [Entry(n, "SFT student dev accuracy vs the dev majority rate", acc["value"] - prof["majority_baseline"],
                  f"dev accuracy {acc['value']:.3f} [{acc['ci'][0]:.3f}, {acc['ci'][1]:.3f}] vs the dev majority rate "
                  f"{prof['majority_baseline']:.3f} ({acc['value'] - prof['majority_baseline']:+.3f}; "
                  f"{100 * prof['max_label_share']:.0f} % of its predictions on one label)") for n in (note, STATUS)]


WNUT_TEACHER = "teacher-wnut-e0a80dfcf57f"  # the teacher the grid uses (configs/scd/study/teacher_wnut_cpu.yaml)
WNUT_DEV = "results/scd_study_cpu_dev"
WNUT_ANCHOR = "sft-anchor-wnut-9b2978efc64b"  # the setting the grid uses


def none_share(pred_path: Path) -> dict:
    """The answer profile of saved NER predictions (:func:`benchmarks.tasks.ner.answer_profile`: the share of the
    most frequent entity list, usually "none")."""
    return answer_profile([answer_key(r.get("prediction") or []) for r in _jsonl(pred_path)])


def _f1(m: dict) -> str:
    return f"{m['value']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]"


def _setting(cfg: dict) -> str:
    return f"lr {cfg['train']['lr']:g}, keep_empty {cfg['data'].get('keep_empty', 1.0):g}"


def scd_study_wnut_dev(root: Path) -> list[Entry]:
    """The SCD study's second task (WNUT-16) on dev, from the committed copies of its runs (without weights): each
    teacher's dev entity F1 and "none" share per checkpoint and its test F1, each SFT student's dev gate; README
    Status quotes the settings the grid uses (``WNUT_TEACHER``, ``WNUT_ANCHOR``)."""
    note, out = "results/scd_study_cpu_dev/README.md", []
    for d in sorted(p.parent for p in (root / WNUT_DEV).glob("teacher-wnut-*/run.json")):
        run = json.loads((d / "run.json").read_text(encoding="utf-8"))
        setting, notes = _setting(run["config"]), ((note, STATUS) if d.name == WNUT_TEACHER else (note,))
        ck = json.loads((d / "manifest.json").read_text(encoding="utf-8"))["checkpoints"]
        shares = [none_share(d / "dev_eval" / c["path"] / "predictions/wnut16.jsonl") for c in ck]
        out += [Entry(n, f"WNUT teacher dev F1 per checkpoint ({setting})", ck[-1]["dev_score"],
                      f"{setting}: dev entity F1 " + " / ".join(f"{c['dev_score']:.3f}" for c in ck) + " at steps "
                      + " / ".join(str(c["step"]) for c in ck) + " ('none' for "
                      + " / ".join(f"{100 * s['max_label_share']:.0f}" for s in shares) + " % of the dev tweets)")
                for n in notes]
        f1 = run["eval"]["wnut16"]["f1_micro"]
        prof = none_share(d / "predictions/wnut16.jsonl")
        out += [Entry(n, f"WNUT teacher test F1, final checkpoint ({setting})", f1["value"],
                      f"{setting}: test entity F1 {_f1(f1)} on all {f1['n']} test tweets ('{prof['most_predicted']}' "
                      f"for {100 * prof['max_label_share']:.0f} %)") for n in notes]
    for d in sorted(p.parent for p in (root / WNUT_DEV).glob("sft-anchor-wnut-*/run.json")):
        run = json.loads((d / "run.json").read_text(encoding="utf-8"))
        f1, setting = run["eval"]["wnut16"]["f1_micro"], _setting(run["config"])
        prof = none_share(d / "predictions/wnut16.jsonl")
        out += [Entry(n, f"WNUT SFT student dev F1 ({setting})", f1["value"],
                      f"{setting}: dev entity F1 {_f1(f1)} on {f1['n']} dev tweets ('{prof['most_predicted']}' "
                      f"for {100 * prof['max_label_share']:.0f} %{', a constant predictor' if prof['constant'] else ''})")
                for n in ((note, STATUS) if d.name == WNUT_ANCHOR else (note,))]
    return out


SCD_STUDY = "results/scd_study_cpu"
SCD_STUDY_WNUT = "results/scd_study_wnut_cpu"  # the second task (entity F1)


def _acc_on(acc: float, n: int) -> str:
    return f"{acc:.3f}" if n else "n/a"


def row_entry(note: str, r: dict, tail: str = "") -> Entry:
    """A study row's test accuracy over seeds: "`method` 0.772 ± 0.004 over 3 seeds[, constant in k/n seeds]<tail>"."""
    const = f", constant in {r['constant_runs']}/{len(r['seeds'])} seeds" if r["constant_runs"] else ""
    return Entry(note, f"{r['method']}: test score over seeds", r["score"],
                 f"`{r['method']}` {r['score']:.3f} ± {r['score_sd']:.3f} over {len(r['seeds'])} seeds{const}{tail}")


def scd_study(root: Path, folder: str = SCD_STUDY, task: str = "rotten_tomatoes") -> list[Entry]:
    """Issue 18's verdicts (:func:`benchmarks.scd_study.analyse`) on ``task``: each row's test score (accuracy,
    or entity F1 for NER) over seeds, its score on the student- and teacher-favoured subsets, the paper's claims
    with paired CIs.  Nothing is quoted until every run of the grid's plan has finished ok (the README says the
    grid is running)."""
    grid = root / folder
    if not plan_finished(grid):
        return []
    res = analyse_scd_study(grid, task)
    note, out = f"{folder}/README.md", []
    for r in res["rows"]:
        out.append(row_entry(note, r))
        if r["method"] != res["teacher"]:
            out.append(Entry(note, f"{r['method']}: score on SFS / TFS", r["sfs_score"],
                             f"`{r['method']}` {_acc_on(r['sfs_score'], r['sfs_n'])} on SFS ({r['sfs_n']}), "
                             f"{_acc_on(r['tfs_score'], r['tfs_n'])} on TFS ({r['tfs_n']}), beats the teacher in "
                             f"{r['beats_teacher_seeds']}/"
                             f"{r['paired_seeds']} seeds"))
    for r in res["rows"]:
        if any(len(v) > 1 for v in r["selections"].values()):  # staged rows (cd's order is fixed by its config)
            sel = "; ".join(f"seed {s}: {' → '.join(map(str, v))}" for s, v in sorted(r["selections"].items()))
            out.append(Entry(note, f"{r['method']}: teacher checkpoint (step) per stage", float("nan"),
                             f"`{r['method']}` distilled from the checkpoints at steps {sel}"))
    rows = {r["method"]: r for r in res["rows"]}
    if res["majority"] is not None and res["anchor"] in rows:
        maj, sft = res["majority"], rows[res["anchor"]]["score"]
        out += [Entry(n, "the SFT student above the test majority rate", sft - maj,
                      f"test majority rate {maj:.3f}; `{res['anchor']}` is {sft - maj:+.3f} above it")
                for n in (note, STATUS)]
    n_runs = sum(len(r["seeds"]) for r in res["rows"])
    n_const = sum(r["constant_runs"] for r in res["rows"])
    top = max((r["max_top_share"] for r in res["rows"] if r["max_top_share"] is not None), default=float("nan"))
    out.append(Entry(note, "constant-predictor runs of the study", n_const,
                     f"{n_const} of the {n_runs} runs put >= 95 % of their predictions on one label (the largest "
                     f"share of one label in any run: {100 * top:.0f} %)"))
    return (out + claim_entries(res["claims"], (note, STATUS), seeds_in=note)
            + claim_entries(res["comparisons"], (note,), seeds_in=note))


def claim_entries(claim_rows: Sequence[dict], notes: Sequence[str], seeds_in: str | None = None) -> list[Entry]:
    """One entry per claim and note: "`claim`: Δ +x [lo, hi], verdict" (just the verdict when unmeasured); with
    ``seeds_in`` also its per-seed Δ in that note ("claim: per seed +a / +b / +c (A ahead in k/n seeds)")."""
    out = []
    for c in claim_rows:
        if "delta" not in c:
            out += [Entry(n, f"claim {c['claim']}", float("nan"), f"{c['claim']}: {c['verdict']}") for n in notes]
            continue
        lo, hi = c["ci"]
        out += [Entry(n, f"claim {c['claim']}: Δ score", c["delta"],
                      f"{c['claim']}: Δ {c['delta']:+.3f} [{lo:+.3f}, {hi:+.3f}], {c['verdict']}") for n in notes]
        if seeds_in and c.get("seed_deltas"):
            out.append(Entry(seeds_in, f"claim {c['claim']}: Δ per seed", min(c["seed_deltas"]),
                             f"{c['claim']}: per seed {fmt_seed_deltas(c['seed_deltas'])}"))
    return out


def constant_share(root: Path) -> list[Entry]:
    """How many committed scored runs (classification; NER since its scorer records the share) are constant
    predictors, over the finished studies
    (result folders whose ``plan.json``, if any, has every run finished: a running grid is left out so that
    its landings do not change the quoted count; ``results/runs``, the local cache of shared runs, is not
    committed)."""
    n = c = 0
    for folder in sorted(p for p in (root / "results").iterdir() if p.is_dir() and p.name != "runs"):
        if any(s not in ("ok", "failed") for s in plan_statuses(folder)):
            continue
        for path in sorted(folder.glob("**/run.json")):
            rec = json.loads(path.read_text(encoding="utf-8"))
            shares = [x for x in (label_share(rec, task) for task in rec.get("eval_info") or {}) if x is not None]
            if rec.get("status") == "ok" and shares:
                n, c = n + 1, c + any(x["constant"] for x in shares)
    return [Entry(STATUS, "constant-predictor runs among the scored runs of finished studies", c,
                  f"{c} of the {n} scored runs of the finished studies are constant")]


UNISD_DEV = "results/unisd_study_cpu_dev"
UNISD_BASE0 = "results/unisd_study_cpu/15edb4d5379a"  # the study grid's base run, seed 0
UNISD_DEV_RUNS = (("untrained-0shot", "the untrained model, 0-shot"), ("untrained-3shot", "the untrained model, 3-shot"),
                  ("sft-319d60731b66", "SFT, scored 0-shot"), ("sft-b923c4a7d2c2", "SFT, scored 3-shot"),
                  ("base-5421473464da", "base SD, scored 3-shot"))


def unisd_study_dev(root: Path) -> list[Entry]:
    """The UniSD study's dev checks (200 RT dev reviews): accuracy, the share of the top label, vs the majority rate."""
    note, out = f"{UNISD_DEV}/README.md", []
    for folder, label in UNISD_DEV_RUNS:
        rec = json.loads((root / UNISD_DEV / folder / "run.json").read_text(encoding="utf-8"))
        acc = rec["eval"]["rotten_tomatoes"]["accuracy"]
        prof = rec["eval_info"]["rotten_tomatoes"]["extra"]["accuracy"]
        lo, hi = acc["ci"]
        out.append(Entry(note, f"dev accuracy: {label}", acc["value"],
                         f"{label}: {acc['value']:.3f} [{lo:.3f}, {hi:.3f}] ({100 * prof['max_label_share']:.0f} % on "
                         f"one label{', constant' if prof['constant'] else ''}; majority {prof['majority_baseline']:.3f})"))
    # agreement at UniSD*'s gamma (0.001) on the test split, seed 0, vs the grid's base run of seed 0
    ag = root / UNISD_DEV / "agreement-gamma0.001-seed0"
    w = min(m["multi_teacher_agreement/weight_mean"] for m in _jsonl(ag / "metrics.jsonl")
            if "multi_teacher_agreement/weight_mean" in m)
    base = {r["id"]: r["prediction"] for r in _jsonl(root / UNISD_BASE0 / "predictions/rotten_tomatoes.jsonl")}
    agree = {r["id"]: r["prediction"] for r in _jsonl(ag / "predictions/rotten_tomatoes.jsonl")}
    n_diff = sum(agree[i] != base[i] for i in base)
    out.append(Entry(note, "agreement at gamma 0.001: the smallest logged mean weight", w,
                     f"the mean agreement weight was at least {w:.4f} at every logged step, and {n_diff} of the "
                     f"{len(base)} test predictions differ from base's"))
    probe = json.loads((root / "results/unisd_probe/rt-dev-study_cpu/probe.json").read_text(encoding="utf-8"))
    d = probe["difference"]["accuracy"]
    out += [Entry(n, "probe: teacher - student accuracy in the study's 3-shot format", d["value"],
                  f"teacher {probe['teacher']['accuracy']['value']:.3f} vs student {probe['student']['accuracy']['value']:.3f}"
                  f" (Δ {d['value']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}])") for n in (note, STATUS)]
    return out


UNISD_STUDY = "results/unisd_study_cpu"


def unisd_study(root: Path) -> list[Entry]:
    """Issue 20's verdicts (:func:`benchmarks.unisd_study.analyse`): each row's test accuracy over seeds and Δ vs
    base, each leave-one-out cost, the paper's claims.  Nothing is quoted until every run of the grid's plan has
    finished ok (the folder README says the grid is running)."""
    grid = root / UNISD_STUDY
    if not plan_finished(grid):
        return []
    res = analyse_unisd_study(grid)
    note, out = f"{UNISD_STUDY}/README.md", []
    for r in res["rows"]:
        d = r["vs_base"]
        out.append(row_entry(note, r, f", Δ vs {res['base']} {d['delta']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"
                             if d and d["n"] else ""))
        if d and d.get("changed"):
            out.append(Entry(note, f"{r['method']}: test predictions that differ from {res['base']}'s",
                             max(d["changed"]), f"`{r['method']}` answers {fmt_changed(d)} test reviews differently "
                                                f"from `{res['base']}` (per seed)"))
    for c in (*res["leave_one_out"], *res["comparisons"]):
        if c.get("changed"):
            what = (f"removing {c['component']} from `{res['full']}`" if "component" in c
                    else c["claim"].split(":")[0])
            out.append(Entry(note, f"{what}: test predictions changed", max(c["changed"]),
                             f"{what}: {fmt_changed(c)} test predictions change (per seed)"))
    for path in iter_run_jsons(grid):  # SDFT-rewrite: how many of the teacher's rewrites were accepted
        rec = json.loads(Path(path).read_text(encoding="utf-8"))
        if rec.get("status") == "ok" and (rec.get("train") or {}).get("rewrite"):
            rw = rec["train"]["rewrite"]
            out.append(Entry(note, f"{rec['method']} seed {rec['seed']}: accepted rewrites", rw["accepted"],
                             f"`{rec['method']}` seed {rec['seed']}: {rw['accepted']}/{rw['n']} rewrites accepted"))
    return (out + claim_entries(res["leave_one_out"], (note,), seeds_in=note)
            + claim_entries(res["claims"], (note, STATUS), seeds_in=note)
            + claim_entries(res["comparisons"], (note,), seeds_in=note))


SECTIONS: dict[str, Callable[[Path], list[Entry]]] = {
    "scd_baselines": scd_baselines, "fine_tuned_teacher": fine_tuned_teacher, "eval": eval_notes,
    "recovery": recovery, "demo": demo, "perf": perf, "unisd_probe": unisd_probe,
    "scd_study_dev": scd_study_dev, "scd_study_wnut_dev": scd_study_wnut_dev, "recovery_seeded": recovery_seeded,
    "scd_study": scd_study, "scd_study_wnut": lambda root: scd_study(root, SCD_STUDY_WNUT, "wnut16"),
    "constant_share": constant_share, "unisd_study_dev": unisd_study_dev, "unisd_study": unisd_study}


def entries(root: Path = REPO) -> list[Entry]:
    return [e for fn in SECTIONS.values() for e in fn(Path(root))]


def missing(root: Path = REPO, found: Sequence[Entry] | None = None) -> list[Entry]:
    """Entries whose note does not contain the phrase (on a line starting with ``line``)."""
    out = []
    for e in found if found is not None else entries(root):
        text = (Path(root) / e.note).read_text(encoding="utf-8")
        if e.line is None:  # prose: line wrapping does not matter
            ok = " ".join(e.phrase.split()) in " ".join(text.split())
        else:
            ok = any(ln.startswith(e.line) and e.phrase in ln for ln in text.splitlines())
        if not ok:
            out.append(e)
    return out


def table(found: Sequence[Entry]) -> str:
    lines = ["| note | name | value | phrase |", "|---|---|---|---|"]
    for e in found:
        phrase = e.phrase.replace("|", "\\|")
        lines.append(f"| {e.note} | {e.name} | {e.value:.4g} | {phrase} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.note_numbers", description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(REPO), help="repository root (default: this checkout)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a note does not quote its number")
    args = ap.parse_args(argv)
    found = entries(Path(args.root))
    print(table(found))
    if args.check:
        bad = missing(Path(args.root), found)
        for e in bad:
            print(f"stale: {e.note}: {e.name}: expected {e.phrase!r}" + (f" on a line starting {e.line!r}"
                                                                         if e.line else ""), file=sys.stderr)
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
