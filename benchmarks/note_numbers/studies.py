"""The sections of :mod:`benchmarks.note_numbers` that quote this wave's studies: the SCD study (dev choices, the
RT and WNUT grids), the UniSD study (dev checks, the grid) and the share of constant predictors."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from benchmarks.leaderboard.load import label_share
from benchmarks.note_numbers.core import STATUS, Entry, _jsonl, ok_runs, plan_finished, plan_statuses
from benchmarks.paired import fmt_changed, fmt_seed_deltas
from benchmarks.scd_study import analyse as analyse_scd_study, selection_terms_text
from benchmarks.tasks.ner import answer_key, answer_profile
from benchmarks.unisd_study import analyse as analyse_unisd_study
from scd.core.results import read_json


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
                for n in notes + ((f"{SCD_STUDY_WNUT}/README.md",) if d.name == WNUT_TEACHER else ())]
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


BUILDS = "results/dependency_builds"  # later builds of dependency runs, by date (the first: WNUT_DEV)
WNUT_STUDENT = "student-smollm2-keep16-236261962dcf"


def dependency_builds(root: Path) -> list[Entry]:
    """The WNUT study's dependency runs rebuilt on a new machine (``BUILDS/<date>/``) against their first builds
    (the committed copies in ``WNUT_DEV``): equal checkpoints, the teacher's dev and test F1 and how many test
    predictions differ, the student's healed dev KL; and the first build's final checkpoint as the teacher the runs
    that predate run.json ``dependencies`` cached."""
    note, out = f"{BUILDS}/README.md", []
    first = root / WNUT_DEV
    for day in sorted(p for p in (root / BUILDS).glob("*") if p.is_dir()):
        a, b = first / WNUT_TEACHER, day / WNUT_TEACHER
        if (b / "run.json").is_file():
            ca, cb = (json.loads((d / "manifest.json").read_text(encoding="utf-8"))["checkpoints"] for d in (a, b))
            same = sum(x["sha256"] == y["sha256"] for x, y in zip(ca, cb))
            out += [Entry(note, f"{day.name}: teacher checkpoints with the first build's sha256", same,
                          f"{day.name}: {same} of {len(ca)} teacher checkpoints bit-identical to the first build"),
                    Entry(note, f"{day.name}: teacher dev F1 per checkpoint, first / rebuilt", cb[-1]["dev_score"],
                          "dev entity F1 per checkpoint: first " + " / ".join(f"{c['dev_score']:.3f}" for c in ca)
                          + ", rebuilt " + " / ".join(f"{c['dev_score']:.3f}" for c in cb)),
                    _curve_gap(note, day.name, a, b)]
            out += [dataclasses.replace(_rebuilt_f1(note, f"{day.name}: teacher", a, b, "test"), note=n)
                    for n in (note, STATUS)]
        a, b = first / WNUT_STUDENT, day / WNUT_STUDENT
        if (b / "run.json").is_file():
            sa, sb = (read_json(d / "run.json")["student"] for d in (a, b))
            gap = max(abs(x["dev_kl"] - y["dev_kl"]) for x, y in zip(sa["curve"], sb["curve"]))
            cut_h = json.loads((a / "cut.json").read_text(encoding="utf-8"))["wall_s"] / 3600
            heal_min = sb["heal_wall_s"] / 60
            teacher_min = read_json(day / WNUT_TEACHER / "run.json")["train"]["wall_s"] / 60
            out.append(Entry(f"{SCD_STUDY_WNUT}/README.md", f"{day.name}: rebuild wall time", heal_min,
                             f"the teacher ({teacher_min:.0f} min of training here) and the healed student, whose "
                             f"greedy layer search alone took {cut_h:.1f} h the first time"))
            out.append(Entry(f"{SCD_STUDY_WNUT}/README.md", f"{day.name}: healing wall time", heal_min,
                             f"only the healing ({heal_min:.0f} min here) runs again"))
            out.append(Entry(note, f"{day.name}: student healed dev KL, first / rebuilt", sb["kl_after"],
                             f"healed dev KL: first {sa['kl_after']:.4f}, rebuilt {sb['kl_after']:.4f} nats per "
                             f"token (largest gap along the {len(sa['curve'])}-point curve {gap:.1e})"))
        a, b = first / WNUT_ANCHOR, day / WNUT_ANCHOR
        if (b / "run.json").is_file():
            out.append(_rebuilt_f1(note, f"{day.name}: SFT anchor", a, b, "dev"))
    if out:
        final = json.loads((first / WNUT_TEACHER / "manifest.json").read_text(encoding="utf-8"))["checkpoints"][-1]
        cached = sorted({c["teacher_sha256"][:8] for _, rec in ok_runs(root, SCD_STUDY_WNUT)
                         if "dependencies" not in rec
                         for c in ((rec["train"].get("teacher_cache") or {}).get("caches") or [])})
        same = float(cached == [final["sha256"][:8]])
        out.append(Entry(note, "the unrecorded WNUT runs' teacher = the first build", same,
                         f"runs that predate the record cached teacher checkpoint {', '.join(cached)} (the first "
                         f"build's final checkpoint: {final['sha256'][:8]})"))
    return out


def _curve_gap(note: str, day: str, a: Path, b: Path) -> Entry:
    """The largest relative gap between two builds' training CE at the steps both logged."""
    ce = [{r["step"]: r["ce"] for r in _jsonl(d / "metrics.jsonl") if "ce" in r} for d in (a, b)]
    steps = sorted(set(ce[0]) & set(ce[1]))
    gap = max(abs(ce[0][t] - ce[1][t]) / abs(ce[0][t]) for t in steps)
    return Entry(note, f"{day}: teacher training CE, largest relative gap between builds", gap,
                 f"training CE at the {len(steps)} logged steps differs by at most {gap:.1e} (relative)")


def _rebuilt_f1(note: str, what: str, a: Path, b: Path, split: str) -> Entry:
    """Entity F1 of a run's first build ``a`` and its rebuild ``b``, and how many of their predictions differ."""
    fa, fb = (read_json(d / "run.json")["eval"]["wnut16"]["f1_micro"] for d in (a, b))
    pa, pb = ({r["id"]: answer_key(r.get("prediction") or []) for r in _jsonl(d / "predictions/wnut16.jsonl")}
              for d in (a, b))
    diff = sum(pa[i] != pb.get(i) for i in pa)
    return Entry(note, f"{what} {split} F1, first / rebuilt", fb["value"] - fa["value"],
                 f"{split} entity F1: first {_f1(fa)}, rebuilt {_f1(fb)}; {diff} of {len(pa)} {split} predictions "
                 "differ")


def _acc_on(acc: float, n: int) -> str:
    return f"{acc:.3f}" if n else "n/a"


def row_entry(note: str, r: dict, tail: str = "") -> Entry:
    """A study row's test score over seeds: "`method` 0.772 ± 0.004 over 3 seeds[, constant in k/n seeds]<tail>"
    ("`method` 0.389 (1 seed)" for a row scored once)."""
    n = len(r["seeds"])
    const = f", constant in {r['constant_runs']}/{n} seeds" if r["constant_runs"] else ""
    spread = f"± {r['score_sd']:.3f} over {n} seeds" if n > 1 else "(1 seed)"  # one run has no spread
    return Entry(note, f"{r['method']}: test score over seeds", r["score"],
                 f"`{r['method']}` {r['score']:.3f} {spread}{const}{tail}")


def scd_study(root: Path, folder: str = SCD_STUDY, task: str = "rotten_tomatoes") -> list[Entry]:
    """Issue 18's verdicts (:func:`benchmarks.scd_study.analyse`) on ``task``: each row's test score (accuracy,
    or entity F1 for NER) over seeds, its score on the student- and teacher-favoured subsets, the paper's claims
    with paired CIs.  Nothing is quoted until every run of the grid's plan has finished ok (the README says the
    grid is running).  Outside ``SCD_STUDY`` the names start with the task, so that the two studies' claims in
    README Status have distinct names."""
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
        if r.get("selection_terms"):  # why scd_select chose what it chose
            out.append(Entry(note, f"{r['method']}: scd_select terms", r["selection_terms"]["kl_student_min"],
                             f"`{r['method']}`: {selection_terms_text(r['selection_terms'])}"))
    rows = {r["method"]: r for r in res["rows"]}
    if res["majority"] is not None and res["anchor"] in rows:
        maj, sft = res["majority"], rows[res["anchor"]]["score"]
        out += [Entry(n, "the SFT student above the test majority rate", sft - maj,
                      f"test majority rate {maj:.3f}; `{res['anchor']}` is {sft - maj:+.3f} above it")
                for n in (note, STATUS)]
    n_runs = sum(len(r["seeds"]) for r in res["rows"])
    n_const = sum(r["constant_runs"] for r in res["rows"])
    shares = [(r["method"], r["max_top_share"]) for r in res["rows"] if r["max_top_share"] is not None]
    top = max((v for _, v in shares), default=float("nan"))
    if shares:
        out.append(Entry(note, "largest share of one answer per row", top,
                         "the largest share of one answer in any run of the row: "
                         + ", ".join(f"`{m}` {100 * v:.0f} %" for m, v in shares)))
    out.append(Entry(note, "constant-predictor runs of the study", n_const,
                     f"{n_const} of the {n_runs} runs put >= 95 % of their predictions on one label (the largest "
                     f"share of one label in any run: {100 * top:.0f} %)"))
    out += (claim_entries(res["claims"], (note, STATUS), seeds_in=note)
            + claim_entries(res["comparisons"], (note,), seeds_in=note))
    if folder != SCD_STUDY:  # e.g. "wnut16: claim kd > sft: Δ score" (README Status quotes both studies)
        out = [dataclasses.replace(e, name=f"{task}: {e.name}") for e in out]
    return out


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
    committed, and ``BUILDS`` holds rebuilt copies of runs counted where their first build is)."""
    n = c = 0
    skip = ("runs", Path(BUILDS).name)
    for folder in sorted(p for p in (root / "results").iterdir() if p.is_dir() and p.name not in skip):
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
    runs = ok_runs(root, UNISD_STUDY)  # (run dir, run.json), read once for the three quotes below
    clipped = [m["divergence_clipping/clipped_frac"] for d, rec in runs if rec["method"] == "+clipping"
               for m in _jsonl(d / "metrics.jsonl") if "divergence_clipping/clipped_frac" in m]
    if clipped:
        lo, hi = min(clipped), max(clipped)
        out.append(Entry(note, "+clipping: share of each batch's completion tokens clipped", hi,
                         f"`+clipping` caps {lo:.4f}{'' if lo == hi else f'-{hi:.4f}'} of each batch's completion "
                         f"tokens at every logged step of every seed"))
    const: dict[int, list[tuple[str, float, str]]] = {}  # seed -> (method, top share, top label) of constant runs
    for _, rec in runs:
        prof = label_share(rec, "rotten_tomatoes")
        if prof and prof["constant"]:
            const.setdefault(int(rec["seed"]), []).append((rec["method"], prof["share"], prof["label"]))
    for seed, consts in sorted(const.items()):
        shares, labels = [x for _, x, _ in consts], sorted({str(lab) for _, _, lab in consts})
        names = ", ".join(f"`{m}`" for m, _, _ in sorted(consts))
        lo, hi = f"{100 * min(shares):.1f}", f"{100 * max(shares):.1f}"
        out.append(Entry(note, f"seed {seed}: constant-predictor runs", len(consts),
                         f"seed {seed}: {len(consts)} constant runs ({names}; {' / '.join(labels)} for "
                         f"{lo if lo == hi else f'{lo}-{hi}'} % of the test reviews)"))
    for _, rec in runs:  # SDFT-rewrite: how many of the teacher's rewrites were accepted
        if (rec.get("train") or {}).get("rewrite"):
            rw = rec["train"]["rewrite"]
            out.append(Entry(note, f"{rec['method']} seed {rec['seed']}: accepted rewrites", rw["accepted"],
                             f"`{rec['method']}` seed {rec['seed']}: {rw['accepted']}/{rw['n']} rewrites accepted"))
    return (out + claim_entries(res["leave_one_out"], (note,), seeds_in=note)
            + claim_entries(res["claims"], (note, STATUS), seeds_in=note)
            + claim_entries(res["comparisons"], (note,), seeds_in=note))
