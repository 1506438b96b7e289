"""``make demo``: run the demo grid from scratch, then compare it with the committed reference run.

    python -m benchmarks.demo                          # = make demo: fresh runs/demo/, grid, comparison
    python -m benchmarks.demo --set train.max_steps=2  # grid overrides (passed to benchmarks.grid --set)
    python -m benchmarks.demo reference results/demo   # reference.json from a finished demo's run.json files

``run`` (the default) deletes the previous demo output (``<results-dir>/<grid name>/``, git-ignored under
``runs/``), so every call trains the teacher and the students again; runs the grid (which writes the
leaderboard); records the wall time of each phase in ``timing.json``; prints the leaderboard's ranking
table and, beside it, the committed reference with a tolerance check.  Exit code 0 when every check
passes, 1 otherwise (2 on a usage error).  The teacher is trained on demand into ``teacher.results_dir``
of the demo's base config (``runs/demo``, so the deletion covers it); with another ``--results-dir``
set that key too, or the teacher of an earlier call is reused.

Checks (pure functions on rows read from run.json, :func:`checks`):

* per reference row: ``|demo - reference| <= tolerance`` on the primary metric (accuracy);
* the teacher clearly beats chance: the lower end of its 95% bootstrap CI is above the majority rate
  of the scored split (what always answering the most frequent label scores);
* at least one student is not a constant predictor (``max_label_share`` < 0.95, the leaderboard's rule).

Tolerance (``reference``): the half-width of the reference row's own 95% bootstrap CI over the scored
reviews.  A rerun that moves less than that cannot be told apart from the reference at the resolution
of the test set it is scored on; reruns of the same commit on another CPU move only by the few
reviews whose label log-likelihoods are nearly tied (floating-point summation order), and a code change
that moves a row by more than its CI half-width is a real change that the reference must be remade for.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

from benchmarks.grid import cli as grid_cli
from benchmarks.grid.spec import grid_dir, load_grid
from benchmarks.tasks.classification import CONSTANT_SHARE
from scd.core.results import atomic_write_text

DEFAULT_GRID = "configs/grids/demo.yaml"
DEFAULT_REFERENCE = "results/demo/reference.json"
TEACHER = "teacher"
METRIC = "accuracy"
REFERENCE_SCHEMA = 1


@dataclasses.dataclass(frozen=True)
class Row:
    """One demo run, as read from its run.json."""

    method: str
    run_id: str
    status: str
    task: str | None = None
    value: float | None = None  # primary metric (accuracy)
    ci: tuple[float, float] | None = None
    n: int | None = None
    majority: float | None = None  # majority_baseline of the scored split
    max_label_share: float | None = None
    most_predicted: str | None = None
    wall_s: float | None = None  # started -> finished

    @property
    def constant(self) -> bool:
        return self.max_label_share is not None and self.max_label_share >= CONSTANT_SHARE


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


# ------------------------------------------------------------------------------ reading runs
def _seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    fmt = "%Y-%m-%dT%H:%M:%S%z"
    return (dt.datetime.strptime(end, fmt) - dt.datetime.strptime(start, fmt)).total_seconds()


def read_row(run_json: Path) -> Row:
    """A :class:`Row` from one run.json (its first evaluated task)."""
    rec = json.loads(Path(run_json).read_text())
    base = dict(method=rec.get("method", "?"), run_id=rec.get("run_id", Path(run_json).parent.name),
                status=rec.get("status", "?"), wall_s=_seconds(rec.get("started"), rec.get("finished")))
    evals = rec.get("eval") or {}
    if not evals:
        return Row(**base)
    task = sorted(evals)[0]
    metric = evals[task].get(METRIC) or {}
    extra = (((rec.get("eval_info") or {}).get(task) or {}).get("extra") or {}).get(METRIC) or {}
    ci = metric.get("ci")
    return Row(**base, task=task, value=metric.get("value"), ci=tuple(ci) if ci else None, n=metric.get("n"),
               majority=extra.get("majority_baseline"), max_label_share=extra.get("max_label_share"),
               most_predicted=extra.get("most_predicted"))


def read_rows(gdir: Path) -> list[Row]:
    """The rows of the runs in ``gdir/plan.json``, in plan order (missing run.json: status 'missing')."""
    plan = json.loads((Path(gdir) / "plan.json").read_text())
    rows = []
    for r in plan["runs"]:
        path = Path(gdir) / r["run_id"] / "run.json"
        rows.append(read_row(path) if path.exists() else Row(method=r.get("method", "?"), run_id=r["run_id"],
                                                             status="missing"))
    return rows


def dependency_runs(gdir: Path) -> list[Path]:
    """run.json files of the runs trained on demand for the grid (its teacher), found via the
    ``teacher_manifest`` artifact of its runs (``<teacher run>/checkpoints/manifest.json``)."""
    plan = json.loads((Path(gdir) / "plan.json").read_text())
    found: list[Path] = []
    for r in plan["runs"]:
        path = Path(gdir) / r["run_id"] / "run.json"
        if not path.exists():
            continue
        manifest = (json.loads(path.read_text()).get("artifacts") or {}).get("teacher_manifest")
        for parent in Path(manifest).parents[:3] if manifest else ():
            if (parent / "run.json").exists():
                if parent / "run.json" not in found:
                    found.append(parent / "run.json")
                break
    return found


# ------------------------------------------------------------------------------ reference + checks
def tolerance(row: Row) -> float:
    """Half-width of the row's 95% bootstrap CI (see the module docstring)."""
    if row.ci is None:
        raise ValueError(f"row {row.method}: no CI to derive a tolerance from")
    return round((row.ci[1] - row.ci[0]) / 2, 6)


def make_reference(rows: Sequence[Row], *, grid: str, git_sha: str | None, timing: dict | None = None) -> dict:
    """reference.json: each row's metric, CI, floor, label share and tolerance."""
    bad = [r.method for r in rows if r.status != "ok" or r.value is None]
    if bad:
        raise ValueError(f"the reference needs finished, scored runs; not ok: {bad}")
    return {"schema": REFERENCE_SCHEMA, "grid": grid, "metric": METRIC, "git_sha": git_sha,
            "tolerance_rule": "half-width of the reference row's 95% bootstrap CI",
            "rows": {r.method: {"run_id": r.run_id, "task": r.task, "value": r.value, "ci": list(r.ci or ()),
                                "n": r.n, "majority_baseline": r.majority, "max_label_share": r.max_label_share,
                                "most_predicted": r.most_predicted, "tolerance": tolerance(r)} for r in rows},
            "timing": timing or {}}


def checks(rows: Sequence[Row], reference: dict) -> list[Check]:
    """Tolerance check per reference row, teacher above the majority rate, a non-constant student."""
    by_method = {r.method: r for r in rows}
    out = []
    for method, ref in reference["rows"].items():
        row = by_method.get(method)
        if row is None or row.value is None:
            out.append(Check(f"{method} vs reference", False, "no scored run"))
            continue
        diff = row.value - ref["value"]
        out.append(Check(f"{method} vs reference", abs(diff) <= ref["tolerance"] + 1e-9,
                         f"{row.value:.3f} vs {ref['value']:.3f} (diff {diff:+.3f}, tolerance {ref['tolerance']:.3f})"))
    teacher = by_method.get(TEACHER)
    if teacher is None or teacher.ci is None or teacher.majority is None:
        out.append(Check("teacher beats chance", False, "no scored teacher row"))
    else:
        out.append(Check("teacher beats chance", teacher.ci[0] > teacher.majority,
                         f"95% CI low {teacher.ci[0]:.3f} vs majority rate {teacher.majority:.3f}"))
    students = [r for r in rows if r.method != TEACHER and r.max_label_share is not None]
    varied = [r.method for r in students if not r.constant]
    out.append(Check("a student is not constant", bool(varied),
                     f"max label share < {CONSTANT_SHARE}: {', '.join(varied) or 'none'} "
                     f"(of {', '.join(r.method for r in students) or 'no scored student'})"))
    return out


# ------------------------------------------------------------------------------ rendering
def _fmt(row: Row | None) -> str:
    if row is None or row.value is None:
        return "—" if row is None else row.status
    ci = f" [{row.ci[0]:.3f}, {row.ci[1]:.3f}]" if row.ci else ""
    return f"{row.value:.3f}{ci}"


def _share(share: float | None, label: str | None) -> str:
    if share is None:
        return "—"
    return f"{share:.0%} '{label}'" + (" ⚠ constant" if share >= CONSTANT_SHARE else "")


def render(rows: Sequence[Row], reference: dict, result: Sequence[Check]) -> str:
    """The side-by-side table (demo | reference | tolerance | PASS/FAIL) and the checks."""
    ref_rows = reference["rows"]
    verdict = {c.name: c for c in result}
    lines = [f"| method | demo {METRIC} [95% CI] | majority rate | top label share | reference {METRIC} [95% CI] "
             "| tolerance | check |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        ref = ref_rows.get(row.method)
        ref_txt = f"{ref['value']:.3f} [{ref['ci'][0]:.3f}, {ref['ci'][1]:.3f}]" if ref else "—"
        tol = f"± {ref['tolerance']:.3f}" if ref else "—"
        c = verdict.get(f"{row.method} vs reference")
        maj = f"{row.majority:.3f}" if row.majority is not None else "—"
        lines.append(f"| {row.method} | {_fmt(row)} | {maj} | {_share(row.max_label_share, row.most_predicted)} "
                     f"| {ref_txt} | {tol} | {('PASS' if c.ok else 'FAIL') if c else '—'} |")
    lines.append("")
    lines += [f"{'PASS' if c.ok else 'FAIL'}  {c.name}: {c.detail}" for c in result]
    return "\n".join(lines)


def leaderboard_table(md: str) -> str:
    """The first markdown table of a leaderboard.md (the ranking)."""
    out: list[str] = []
    for line in md.splitlines():
        if line.startswith("|"):
            out.append(line)
        elif out:
            break
    return "\n".join(out)


def render_timing(timing: dict) -> str:
    phases = timing.get("phases", {})
    parts = [f"{name} {sec:.0f} s" for name, sec in phases.items() if sec is not None]
    cpu = f", {timing['cpu_s']:.0f} CPU s" if timing.get("cpu_s") is not None else ""
    return f"Wall time: {timing.get('total_s', 0):.0f} s in all{cpu} ({'; '.join(parts)})."


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the grid's runs)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def phase_timing(rows: Sequence[Row], dependencies: Sequence[Path], total_s: float, cpu_s: float | None = None) -> dict:
    """Wall seconds per phase: the teacher's training, then each grid run net of the training it waited on;
    ``cpu_s``: CPU seconds of the whole demo (on a shared machine, wall time / CPU time shows the contention)."""
    phases: dict[str, float | None] = {}
    dep_s = 0.0
    for path in dependencies:
        rec = json.loads(Path(path).read_text())
        sec = _seconds(rec.get("started"), rec.get("finished"))
        phases[f"train {rec.get('method', path.parent.name)}"] = sec
        dep_s += sec or 0.0
    for i, row in enumerate(rows):
        sec = row.wall_s
        if i == 0 and sec is not None:  # the first run trained the dependencies on demand
            sec = max(sec - dep_s, 0.0)
        phases[f"run {row.method}"] = sec
    known = sum(v for v in phases.values() if v is not None)
    phases["other (start-up, leaderboard)"] = max(total_s - known, 0.0)
    return {"total_s": round(total_s, 1), "cpu_s": round(cpu_s, 1) if cpu_s is not None else None,
            "phases": {k: (round(v, 1) if v is not None else None) for k, v in phases.items()}}


# ------------------------------------------------------------------------------ commands
def fresh_output(gdir: Path, protect: Sequence[Path] = ()) -> None:
    """Delete a previous demo output folder (only one that looks like a grid output, never ``protect``)."""
    gdir = Path(gdir)
    if not gdir.exists():
        return
    if any(gdir.resolve() == Path(p).resolve() for p in protect):
        raise SystemExit(f"error: refusing to delete {gdir}: it holds the committed reference")
    if any(gdir.iterdir()) and not (gdir / "plan.json").exists():
        raise SystemExit(f"error: refusing to delete {gdir}: not a grid output (no plan.json)")
    shutil.rmtree(gdir)


def cmd_run(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid, args.overrides)
    gdir = grid_dir(args.results_dir, grid.name)
    reference_path = Path(args.reference)
    fresh_output(gdir, protect=[reference_path.parent])
    print(f"[demo] fresh output folder {gdir}; running {args.grid} (the teacher is trained first)", flush=True)
    t0, c0 = time.monotonic(), cpu_seconds()
    argv = [args.grid, "--results-dir", str(args.results_dir)] + [f"--set={o}" for o in args.overrides]
    code = grid_cli.main(argv)
    total, cpu = time.monotonic() - t0, cpu_seconds() - c0
    if code != 0 or not (gdir / "plan.json").exists():
        print(f"[demo] the grid failed (exit {code}); see {gdir}/*/log.txt", file=sys.stderr)
        return 1
    rows = read_rows(gdir)
    timing = phase_timing(rows, dependency_runs(gdir), total, cpu)
    atomic_write_text(gdir / "timing.json", json.dumps(timing, indent=1) + "\n")
    if reference_path.exists():
        reference = json.loads(reference_path.read_text())
    else:  # no committed reference (yet): only the checks on this run itself
        print(f"[demo] no reference at {reference_path}: tolerance checks skipped", file=sys.stderr)
        reference = {"rows": {}, "git_sha": None, "timing": {}}
    result = checks(rows, reference)
    board = gdir / "leaderboard.md"
    print("\n== Demo leaderboard (" + str(board) + ")\n")
    print(leaderboard_table(board.read_text()) if board.exists() else "(no leaderboard.md)")
    print(f"\n== Demo vs committed reference ({reference_path}, git {str(reference.get('git_sha'))[:12]})\n")
    print(render(rows, reference, result))
    print("\n" + render_timing(timing) + f" Reference run: {reference.get('timing', {}).get('total_s', '?')} s.")
    ok = all(c.ok for c in result)
    print(f"\n[demo] {'PASS' if ok else 'FAIL'}: {sum(c.ok for c in result)}/{len(result)} checks passed")
    return 0 if ok else 1


def cmd_reference(args: argparse.Namespace) -> int:
    gdir = Path(args.grid_dir)
    rows = read_rows(gdir)
    sha = {json.loads((gdir / r.run_id / "run.json").read_text()).get("git_sha") for r in rows}
    if len(sha) != 1:
        print(f"error: the runs of {gdir} come from several commits: {sorted(map(str, sha))}", file=sys.stderr)
        return 2
    timing = json.loads((gdir / "timing.json").read_text()) if (gdir / "timing.json").exists() else {}
    ref = make_reference(rows, grid=json.loads((gdir / "plan.json").read_text())["grid"], git_sha=sha.pop(),
                         timing=timing)
    out = Path(args.out or gdir / "reference.json")
    atomic_write_text(out, json.dumps(ref, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("run", help="fresh demo grid + comparison with the reference (the default)")
    ref = sub.add_parser("reference", help="write reference.json from a finished demo folder")
    ref.add_argument("grid_dir", help="a finished demo folder (e.g. results/demo)")
    ref.add_argument("--out", help="output file (default: <grid_dir>/reference.json)")
    for q in (p, run):
        q.add_argument("--grid", default=DEFAULT_GRID, help=f"demo grid (default {DEFAULT_GRID})")
        q.add_argument("--results-dir", default="runs", help="output root, git-ignored (default runs)")
        q.add_argument("--reference", default=DEFAULT_REFERENCE, help=f"default {DEFAULT_REFERENCE}")
        q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="grid override, passed to benchmarks.grid --set (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "reference":
        return cmd_reference(args)
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
