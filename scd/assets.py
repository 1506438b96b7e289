"""`python -m scd.assets fetch|status|path`: the command line of :mod:`scd.core.assets`.

``fetch`` goes on past an asset whose pinned file the registry no longer serves,
prints a warning block (the asset, its pinned version and sha256, what the
registry lists now, the tasks that become unavailable, how to supply the file)
and exits 0 only when every such asset is optional; any other failure (hash
mismatch, network error, a required asset not served) exits 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scd.core import assets as core
from scd.core.assets import *  # noqa: F401,F403
from scd.core.assets import AssetError, NotServed, cache_root, fetch_report, status, supply_hint
from scd.data.build import build_all, tasks_from_asset

RULE = "=" * 78


def unserved_warning(name: str, err: NotServed) -> str:
    """The warning block for an asset the registry no longer serves."""
    d = core.DISTS[name]
    listed = "unknown" if err.listed is None else (", ".join(err.listed) or "nothing")
    tasks = tasks_from_asset(name)
    kind = "optional: the other assets and tasks are fine" if d.optional else "REQUIRED: the fetch fails"
    lines = [RULE, f"WARNING: asset '{name}' is no longer served by its registry ({kind})",
             f"  pinned:      {d.project}=={d.version}  {d.filename}",
             f"  sha256:      {d.sha256}",
             f"  registry:    {err}",
             f"  lists now:   {listed}"]
    if d.note:
        lines.append(f"  known:       {d.note}")
    lines += [f"  unavailable: {', '.join(tasks) if tasks else '(no task; see README, Assets)'}"
              + (" (loading them raises AssetError)" if tasks else ""),
              f"  fix:         {supply_hint(name)}",
              "  studies and configs that use these tasks cannot be rerun until then (README, Assets).",
              RULE]
    return "\n".join(lines)


def cmd_fetch(names: list[str], source: Path | None, force: bool, no_data: bool) -> int:
    report = fetch_report(names or None, source, force)
    for n, p in report.ready.items():
        print(f"{n:12s} {p}")
    for n, e in report.unserved.items():
        print(f"{n:12s} UNAVAILABLE (not served by the registry)")
        print(unserved_warning(n, e), file=sys.stderr, flush=True)
    if not no_data and not names:
        build_all()
    required = report.required_unserved()
    if required:
        print(f"error: required asset(s) {', '.join(required)} not served by the registry (see above)",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scd.assets", description=core.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download, verify, extract and convert assets")
    f.add_argument("names", nargs="*", help=f"subset of {list(core.DISTS)} (default: all)")
    f.add_argument("--from", dest="source", type=Path, help="directory with already downloaded dist files")
    f.add_argument("--force", action="store_true", help="re-extract / re-convert even if cached")
    f.add_argument("--no-data", action="store_true", help="do not build the task splits afterwards")
    sub.add_parser("status", help="show what is cached")
    sub.add_parser("path", help="print the cache root")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "fetch":
            return cmd_fetch(args.names, args.source, args.force, args.no_data)
        if args.cmd == "status":
            for n, s in status().items():
                state = "ready" if s["ready"] else "unavailable" if s["unavailable"] else "missing"
                extra = ""
                if not s["ready"]:
                    tasks = tasks_from_asset(n)
                    extra = f"  ({'optional' if s['optional'] else 'required'}" + \
                        (f"; tasks unavailable: {', '.join(tasks)}" if tasks else "") + ")"
                print(f"{n:12s} {state:11s} {s['path']}{extra}")
        else:
            print(cache_root())
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
