"""Command line: ``python -m scd <command> --help`` (also installed as ``scd``).

    scd run CONFIG.yaml [key.sub=value ...] [--run-dir DIR] [--force]
    scd validate CONFIG.yaml [...]
    scd assets fetch|status|path          (= python -m scd.assets)
    scd data [--tasks ...]                (= python -m scd.data.build)
    scd evaluate RUN_DIR_OR_MODEL ...     (= python -m benchmarks.evaluate)
    scd grid GRID.yaml ...                (= python -m benchmarks.grid)
    scd leaderboard [results/<grid>]      (= python -m benchmarks.leaderboard)

User errors (bad config, missing asset, malformed data) print one line naming the
file/line/key and exit 2; set SCD_DEBUG=1 for the full traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from scd.core.assets import AssetError
from scd.core.config import RECIPES, ConfigError, load_config
from scd.core.registry import RegistryError
from scd.core.results import DivergedError, ResultsError, RunDir, default_run_dir, safe_join
from scd.data.load import DataError

__all__ = ["default_run_dir", "main"]  # default_run_dir lives in scd.core.results; still importable here

USER_ERRORS: tuple[type[BaseException], ...] = ()


def _user_errors() -> tuple[type[BaseException], ...]:
    return (ConfigError, AssetError, RegistryError, ResultsError, DataError)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    spec = RECIPES.get(cfg.recipe)
    if spec.run is None:
        print(f"error: recipe '{cfg.recipe}' cannot be run directly (use its own command)", file=sys.stderr)
        return 2
    if args.run_dir:
        run_dir = Path(args.run_dir)
    else:
        rel = default_run_dir(cfg, ".")
        run_dir = safe_join(args.results_dir, *rel.parts)
    rd = RunDir(run_dir)
    if rd.is_finished() and not args.force:
        print(f"[scd] {run_dir} already finished (status ok); --force to recompute", flush=True)
        return 0
    print(f"[scd] {cfg.recipe} run -> {run_dir}", flush=True)
    try:
        spec.run(cfg, run_dir)
    except KeyboardInterrupt:
        rd.fail(RuntimeError("interrupted (KeyboardInterrupt)"))
        raise
    except Exception as e:  # noqa: BLE001  (recorded, then reported in one line)
        recorded = rd.fail(e)
        if os.environ.get("SCD_DEBUG"):
            raise
        status = "diverged" if isinstance(e, DivergedError) else "failed"
        where = f" (details in {run_dir}/run.json)" if recorded else " (could not record it in run.json)"
        print(f"error: run {status}: {type(e).__name__}: {e}{where}", file=sys.stderr)
        return 1
    print(f"[scd] done: {run_dir}/run.json", flush=True)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    bad = 0
    for path in args.configs:
        try:
            cfg = load_config(path)
            print(f"ok    {path} ({cfg.recipe})")
        except _user_errors() + (ValueError,) as e:
            print(f"error {e}", file=sys.stderr)
            bad += 1
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = {
        "assets": "scd.assets", "data": "scd.data.build", "evaluate": "benchmarks.evaluate",
        "grid": "benchmarks.grid", "leaderboard": "benchmarks.leaderboard",
    }
    if argv and argv[0] in passthrough:
        mod = importlib.import_module(passthrough[argv[0]])
        return int(mod.main(argv[1:]) or 0)

    ap = argparse.ArgumentParser(prog="scd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run one config (any recipe)")
    r.add_argument("config", help="YAML config with a top-level `recipe:` key")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 seed=1")
    r.add_argument("--run-dir", help="run directory (default results/<grid|runs>/<method>-<run_id>)")
    r.add_argument("--results-dir", default="results", help="results root for the default run dir")
    r.add_argument("--force", action="store_true", help="recompute even if the run finished")
    r.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # appended by the deepspeed launcher
    v = sub.add_parser("validate", help="validate config files")
    v.add_argument("configs", nargs="+")
    for name in passthrough:
        sub.add_parser(name, help=f"see python -m {passthrough[name]} --help", add_help=False)
    args = ap.parse_args(argv)
    try:
        return {"run": cmd_run, "validate": cmd_validate}[args.cmd](args)
    except _user_errors() as e:
        if os.environ.get("SCD_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
