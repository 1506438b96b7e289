"""``python -m benchmarks.leaderboard [results/<grid> ...]``: build leaderboards and the results index."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from benchmarks.leaderboard.build import build_leaderboard
from benchmarks.leaderboard.index import find_grid_dirs, update_index
from benchmarks.leaderboard.load import LeaderboardWarning


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.leaderboard",
                                 description="Build leaderboards (md, csv, parquet, PNG) from run.json files.")
    ap.add_argument("grid_dirs", nargs="*", help="results/<grid> directories (default: every grid under --results-dir)")
    ap.add_argument("--results-dir", default="results", help="results root, for the default and the index")
    ap.add_argument("--baseline", help="baseline method (default: the grid's `baseline`, from plan.json)")
    ap.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    ap.add_argument("--all-runs", action="store_true",
                    help="include run dirs that are not in the grid's current plan.json")
    args = ap.parse_args(argv)
    root = Path(args.results_dir)
    dirs = [Path(d) for d in args.grid_dirs] or (find_grid_dirs(root) if root.is_dir() else [])
    if not dirs:
        print(f"error: no grid results under {root}/ (run python -m benchmarks.grid GRID.yaml first)", file=sys.stderr)
        return 2
    rc = 0
    with warnings.catch_warnings():
        warnings.simplefilter("always", LeaderboardWarning)
        warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)  # one line
        for d in dirs:
            try:
                out = build_leaderboard(d, baseline=args.baseline, figures=not args.no_figures,
                                        plan_only=not args.all_runs)
                print(f"wrote {out}")
            except (OSError, ValueError) as e:
                print(f"error: {d}: {e}", file=sys.stderr)
                rc = 2
    for r in sorted({Path(d).resolve().parent for d in dirs}):
        print(f"wrote {update_index(r)}")
    return rc
