"""Recompute the numbers quoted in the results notes from the committed raw files.

    python -m benchmarks.note_numbers            # table: note | name | value | phrase
    python -m benchmarks.note_numbers --check    # exit 1 when a note lacks its phrase
    python -m benchmarks.note_numbers --fill NOTE.md   # write each {{entry name}} of the note as its phrase

Rule: every number in a results note comes from committed raw files (``run.json``,
``metrics.jsonl``, ``predictions/*.jsonl``) through a committed script.  Each entry
below is one quoted number: the note it appears in, a name, its value, and the exact
phrase the note must contain (``line`` narrows it to a line starting with that text,
e.g. a table row; elsewhere line breaks and runs of spaces do not matter).
``tests/test_note_numbers.py`` runs ``--check`` on the committed
files, so a note cannot go stale silently: re-run a grid, and this fails until the
note quotes the new numbers.

Sections: this module (the earlier studies, the demo, perf, the probe), :mod:`.studies` (the SCD and UniSD studies
of this wave, the share of constant predictors); :mod:`.core` holds :class:`Entry` and the readers.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import stats

from benchmarks.note_numbers.core import REPO, STATUS, Entry, _jsonl, _p, _value, ok_runs
from benchmarks.note_numbers.studies import (SCD_STUDY, SCD_STUDY_WNUT, UNISD_STUDY, constant_share, dependency_builds,
                                             scd_study, scd_study_dev, scd_study_wnut_dev, unisd_study, unisd_study_dev)
from benchmarks.recovery_power import correlation_views, paired_deltas
from benchmarks.recovery_study import aggregate as aggregate_recovery, load_runs as load_recovery_runs
from scd.core.results import atomic_write_text

__all__ = ["Entry", "REPO", "SCD_STUDY", "SCD_STUDY_WNUT", "SECTIONS", "STATUS", "UNISD_STUDY", "constant_share",
           "entries", "fill", "main", "missing", "scd_study", "unisd_study"]

LN2 = math.log(2.0)
SCD = "results/scd_baselines_cpu"
RECOVERY = "results/recovery_study_cpu"
EVAL = "results/eval/smollm2-135m"
CALIBRATED = "results/eval/smollm2-135m-calibrated"


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


SECTIONS: dict[str, Callable[[Path], list[Entry]]] = {
    "scd_baselines": scd_baselines, "fine_tuned_teacher": fine_tuned_teacher, "eval": eval_notes,
    "recovery": recovery, "demo": demo, "perf": perf, "unisd_probe": unisd_probe,
    "scd_study_dev": scd_study_dev, "scd_study_wnut_dev": scd_study_wnut_dev, "recovery_seeded": recovery_seeded,
    "scd_study": scd_study, "scd_study_wnut": lambda root: scd_study(root, SCD_STUDY_WNUT, "wnut16"),
    "constant_share": constant_share, "unisd_study_dev": unisd_study_dev, "unisd_study": unisd_study,
    "dependency_builds": dependency_builds}


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


PLACEHOLDER = re.compile(r"(?<!`)\{\{(.+?)\}\}(?!`)")  # `{{name}}` in backticks is documentation, left as is


def fill(path: Path, found: Sequence[Entry], root: Path = REPO) -> int:
    """Replace every ``{{entry name}}`` in the note at ``path`` by that entry's phrase (an entry of this note, else
    of any note: README Status quotes the studies' phrases) and write it atomically -> placeholders filled.  An
    unknown name is a ValueError naming the line and the closest names (a study's entries wait for its grid to
    finish), and nothing is written."""
    full, root = Path(path).resolve(), Path(root).resolve()
    note = str(full.relative_to(root)) if full.is_relative_to(root) else str(path)
    phrases = {e.name: e.phrase for e in found}
    phrases.update({e.name: e.phrase for e in found if e.note == note})
    text = Path(path).read_text(encoding="utf-8")
    for m in PLACEHOLDER.finditer(text):
        if m.group(1) not in phrases:
            line = text.count("\n", 0, m.start()) + 1
            hint = difflib.get_close_matches(m.group(1), list(phrases), n=3, cutoff=0.5)
            raise ValueError(f"{path}:{line}: no entry named {m.group(1)!r}"
                             + (f" (did you mean {' / '.join(map(repr, hint))}?)" if hint else
                                " (a study's entries appear once its grid has finished)"))
    out, n = PLACEHOLDER.subn(lambda m: phrases[m.group(1)], text)
    atomic_write_text(Path(path), out)
    return n


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.note_numbers", description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(REPO), help="repository root (default: this checkout)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a note does not quote its number")
    ap.add_argument("--fill", metavar="NOTE", help="write each {{entry name}} placeholder of NOTE as its phrase")
    args = ap.parse_args(argv)
    found = entries(Path(args.root))
    if args.fill:
        try:
            print(f"{args.fill}: {fill(Path(args.fill), found, Path(args.root))} placeholder(s) filled")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    print(table(found))
    if args.check:
        bad = missing(Path(args.root), found)
        for e in bad:
            print(f"stale: {e.note}: {e.name}: expected {e.phrase!r}" + (f" on a line starting {e.line!r}"
                                                                         if e.line else ""), file=sys.stderr)
        return 1 if bad else 0
    return 0
