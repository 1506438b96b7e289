"""Command line: ``python -m benchmarks.grid GRID.yaml [--dry-run] [--shard i/N] [--slurm] ...``."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from pathlib import Path
from typing import TextIO

from benchmarks.grid.runner import GridRunner, run_status
from benchmarks.grid.slots import Slot, command_template, detect_gpus, make_slots
from benchmarks.grid.slurm import slurm_script
from benchmarks.grid.spec import Plan, PlannedRun, expand_grid, grid_dir, load_grid, write_plan
from benchmarks.leaderboard import build_leaderboard, update_index
from scd.core.config import ConfigError
from scd.core.results import CodeState, ResultsError, atomic_write_text, code_state


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise argparse.ArgumentTypeError(f"--shard must look like i/N with 0 <= i < N, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def print_plan(plan: Plan, runs: list[PlannedRun], slots: list[Slot], results_dir: Path, *, command: str | None,
               retry_failed: bool, shard: tuple[int, int], out: TextIO) -> None:
    g = plan.grid
    gdir = grid_dir(results_dir, plan.name)
    n_cfg = len({json.dumps({k: v for k, v in r.config.items() if k not in ("seed", "grid")}, sort_keys=True,
                            default=str) for r in plan.runs})
    print(f"Grid {g.name}: {len(plan.runs)} runs ({n_cfg} configs x {len(g.seeds)} seeds), "
          f"recipe {plan.runs[0].recipe if plan.runs else '?'}, baseline {g.baseline or '-'}", file=out)
    print(f"Results: {gdir}", file=out)
    kind = "GPU" if slots and slots[0].gpus else "CPU"
    print(f"Slots: {len(slots)} {kind}: " + " ".join(s.describe() for s in slots), file=out)
    print(f"Launcher: {g.launcher}; command: {command_template(g.launcher, command or g.command, slots[0])}",
          file=out)
    if shard[1] > 1:
        print(f"Shard {shard[0]}/{shard[1]}: {len(runs)} of {len(plan.runs)} runs", file=out)
    print(f"{'order':>5}  {'run_id':12}  {'status':11}  {'first slot':10}  run", file=out)
    k = 0
    for r in runs:
        st = run_status(gdir / r.run_id) if (gdir / r.run_id).exists() else "new"
        todo = st not in ("ok",) and (retry_failed or st not in ("failed", "diverged"))
        first = ""
        if todo:
            k += 1
            first = str(slots[(k - 1)].index) if k <= len(slots) else "queued"
        print(f"{(k if todo else '-'):>5}  {r.run_id:12}  {st:11}  {first:10}  {r.label()}", file=out)
    print(f"{k} run(s) would start; nothing started (--dry-run).", file=out)


def dirty_banner(state: CodeState) -> str:
    """The loud stderr warning before a study runs from a dirty tree."""
    bar = "!" * 88
    shown = ", ".join(state.files[:5]) + (f", ... ({len(state.files) - 5} more)" if len(state.files) > 5 else "")
    return "\n".join([
        bar,
        f"!! WARNING: the code tree is DIRTY: {len(state.files)} file(s) differ from HEAD {state.sha[:12]}",
        f"!!   ({shown})",
        "!! The study still runs, but its results will carry code.patch (the diff against HEAD) in",
        f"!! every run folder, with code_patch_sha256 and git_sha {state.sha[:12]}...-dirty in run.json.",
        "!! Commit first to make the results traceable to a commit alone.",
        bar])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.grid", description="Run a grid of configs on this node's GPU slots or CPU "
        "workers, resumably, then build its leaderboard (docs/grid.md).")
    ap.add_argument("grid", help="grid file (configs/grids/*.yaml, `recipe: grid`)")
    ap.add_argument("--results-dir", default="results", help="results root (default: results)")
    ap.add_argument("--workers", type=int, help="parallel CPU runs when no GPU is visible (default: grid `workers`)")
    ap.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="i/N",
                    help="run only shard i of N (partition of the sorted run ids)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (runs, slots, order); start nothing")
    ap.add_argument("--retry-failed", action="store_true", help="re-run failed/diverged runs")
    ap.add_argument("--fake-gpus", type=int, metavar="K",
                    help="pretend K GPUs (ids 0..K-1) exist: only sets CUDA_VISIBLE_DEVICES per slot (tests); 0 = CPU")
    ap.add_argument("--slurm", action="store_true",
                    help="write results/<grid>/slurm/array.sh (one array task per shard); submit nothing")
    ap.add_argument("--shards", type=int, help="number of shards for --slurm (default: grid slurm.shards)")
    ap.add_argument("--command", help="launch command template, e.g. '{python} -m scd run {config} --run-dir "
                    "{run_dir}' (placeholders: python config run_dir nproc gpus port run_id deepspeed)")
    ap.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                    help="import MODULE first (registers user recipes); repeatable")
    ap.add_argument("--no-leaderboard", action="store_true", help="do not build the leaderboard at the end")
    ap.add_argument("--progress-every", type=float, default=30.0, metavar="S", help="summary line period (s)")
    ap.add_argument("--stale-after", type=float, default=600.0, metavar="S",
                    help="another host's claim is stale after S s without heartbeat (default 600)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a grid key, e.g. --set seeds=[0] (repeatable)")
    return ap


def write_slurm(args: argparse.Namespace, plan: Plan, results_dir: Path) -> int:
    shards = args.shards or plan.grid.slurm.shards
    extra = [a for m in args.imports for a in ("--import", m)]
    if args.command:
        extra += ["--command", args.command]
    if args.retry_failed:
        extra.append("--retry-failed")
    extra += [a for o in args.overrides for a in ("--set", o)]
    text = slurm_script(plan, grid_file=Path(args.grid), results_dir=results_dir, shards=shards, extra_args=extra)
    if args.dry_run:
        print(text, end="")
        return 0
    gdir = write_plan(plan, results_dir)
    path = gdir / "slurm" / "array.sh"
    atomic_write_text(path, text)
    os.chmod(path, 0o755)
    print(f"wrote {path} ({shards} array task(s), {len(plan.runs)} runs); submit with: sbatch {path}")
    return 0


def run_plan(args: argparse.Namespace, plan: Plan, results_dir: Path) -> int:
    """Run this node's share of the plan (or print it with --dry-run), then build the leaderboard."""
    grid = plan.grid
    slots = make_slots(detect_gpus(args.fake_gpus), grid.gpus_per_run, args.workers or grid.workers)
    runs = plan.shard(*args.shard)
    if args.dry_run:
        print_plan(plan, runs, slots, results_dir, command=args.command, retry_failed=args.retry_failed,
                   shard=args.shard, out=sys.stdout)
        return 0
    state = code_state()
    if state is not None and state.dirty:
        print(dirty_banner(state), file=sys.stderr, flush=True)
    write_plan(plan, results_dir)
    runner = GridRunner(plan, results_dir, slots, command=args.command, retry_failed=args.retry_failed,
                        shard=args.shard, progress_every=args.progress_every, stale_after_s=args.stale_after)
    res = runner.run(runs)
    if not args.no_leaderboard and not res.interrupted:
        gdir = grid_dir(results_dir, plan.name)
        try:
            out = build_leaderboard(gdir)
            update_index(results_dir)
            runner.emit(f"leaderboard: {out}")
        except Exception as e:  # noqa: BLE001  (the runs are safe on disk; report and go on)
            runner.emit(f"leaderboard failed: {type(e).__name__}: {e} "
                        f"(rebuild with: python -m benchmarks.leaderboard {gdir})")
            if os.environ.get("SCD_DEBUG"):
                raise
    return res.exit_code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for mod in args.imports:
            try:
                importlib.import_module(mod)
            except ImportError as e:
                raise ConfigError(f"--import {mod}: cannot import ({e})") from None
        plan = expand_grid(load_grid(args.grid, args.overrides), args.grid)
        results_dir = Path(args.results_dir)
        if args.slurm:
            return write_slurm(args, plan, results_dir)
        return run_plan(args, plan, results_dir)
    except (ConfigError, ResultsError) as e:
        if os.environ.get("SCD_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:  # RegistryError (unknown recipe) is a KeyError with a one-line message
        if os.environ.get("SCD_DEBUG"):
            raise
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
