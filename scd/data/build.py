"""Build the task splits: raw asset -> ``<cache>/data/<task>/{train,dev,test}.jsonl`` + ``meta.json``.

    python -m scd.data.build                       # every registered task, seed 0
    python -m scd.data.build --tasks wnut16 disfl_qa --seed 1
    python -m scd.data.build --card                # markdown table of what is built

Splits are deterministic: split groups (a passage, a tweet, a source row) are
ordered by ``sha256(salt, seed, group)`` (independent of Python's hash
randomisation) and dealt to test, then dev, then train (sizes: see
:class:`scd.data.tasks.SplitSizes` and docs/data.md).  The same seed gives
byte-identical files.  Seed 0 writes ``data/<task>/``; another seed writes
``data/<task>/seed<N>/`` so runs with different data seeds never share files.
Without ``--tasks``, tasks whose raw file comes from a missing *optional*
asset (bigbench: no longer served by PyPI since 2026-12-04) are skipped and
listed; a named task, or one from a required asset, fails with the fix.
A task is rebuilt only when its meta.json no longer matches (seed, raw file
sha256, builder code, ``skip_malformed``) or a split file changed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable

from scd.core.assets import AssetError, data_dir, is_optional, missing_hint
from scd.core.registry import RegistryError
from scd.core.results import atomic_write_json, atomic_write_text, sha256_file
from scd.data.records import DataError
from scd.data.tasks import TASKS, SplitSizes, TaskSpec, get_task

FORMAT_VERSION = 1
SPLITS = ("train", "dev", "test")
_CODE_FILES = ("records.py", "tasks.py", "build.py")


def task_dir(task: str, seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    """Directory of a task's split files (seed 0: ``<root>/<task>``, else ``<root>/<task>/seed<N>``)."""
    base = Path(root) if root is not None else data_dir()
    return base / task if seed == 0 else base / task / f"seed{seed}"


def split_path(task: str, split: str, seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    return task_dir(task, seed, root) / f"{split}.jsonl"


# -------------------------------------------------------------------------- splits
def group_order_key(salt: str, seed: int, group: str) -> str:
    return hashlib.sha256(f"{salt}\x00{seed}\x00{group}".encode("utf-8")).hexdigest()


def dedupe(items: list[tuple[str, dict]]) -> tuple[list[tuple[str, dict]], int]:
    """Drop records whose ``input`` repeats an earlier one (first kept); return (kept, n_dropped)."""
    seen: set[str] = set()
    out = []
    for g, rec in items:
        if rec["input"] in seen:
            continue
        seen.add(rec["input"])
        out.append((g, rec))
    return out, len(items) - len(out)


def split_items(items: list[tuple[str, dict]], sizes: SplitSizes, seed: int, salt: str) -> dict[str, list[dict]]:
    """Deal whole groups, in hash order, to test, then dev, then train (capped).

    Within a split, records follow the group order (a seeded shuffle) and the
    source order inside a group.
    """
    groups: dict[str, list[dict]] = {}
    for g, rec in items:
        groups.setdefault(g, []).append(rec)
    n_train, n_dev, n_test = sizes.targets(len(items))
    out: dict[str, list[dict]] = {"train": [], "dev": [], "test": []}
    for g in sorted(groups, key=lambda g: group_order_key(salt, seed, g)):
        recs = groups[g]
        if len(out["test"]) < n_test:
            out["test"] += recs
        elif len(out["dev"]) < n_dev:
            out["dev"] += recs
        elif len(out["train"]) < n_train:
            out["train"] += recs[: n_train - len(out["train"])]
        else:
            break
    return out


def to_jsonl(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


# ------------------------------------------------------------------------- build
def code_hash() -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _CODE_FILES:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def _meta_key(spec: TaskSpec, seed: int, skip_malformed: bool) -> dict:
    return {"format_version": FORMAT_VERSION, "task": spec.name, "seed": seed,
            "skip_malformed": skip_malformed, "code": code_hash()}


def _read_meta(d: Path) -> dict | None:
    try:
        with open(d / "meta.json", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_current(spec: TaskSpec, out_dir: Path, seed: int, skip_malformed: bool,
               raw_path: Path | None = None, check_files: bool = True) -> bool:
    """True when ``out_dir`` holds this task's splits for this seed, raw file and code."""
    meta = _read_meta(out_dir)
    if not meta or any(meta.get(k) != v for k, v in _meta_key(spec, seed, skip_malformed).items()):
        return False
    raw = Path(raw_path) if raw_path is not None else spec.raw_path()
    src = meta.get("source", {})
    try:
        st = raw.stat()
    except OSError:
        return False
    if (src.get("size"), src.get("mtime_ns")) != (st.st_size, st.st_mtime_ns) and \
            src.get("sha256") != sha256_file(raw):
        return False
    for split in SPLITS:
        p = out_dir / f"{split}.jsonl"
        if not p.exists():
            return False
        if check_files and sha256_file(p) != meta.get("files", {}).get(split):
            return False
    return True


def build_task(name: str, out_dir: str | os.PathLike | None = None, seed: int = 0,
               skip_malformed: bool = False, *, force: bool = False, raw_path: str | os.PathLike | None = None,
               quiet: bool = False) -> dict:
    """Build one task's splits (skipped when meta.json matches); return its meta dict.

    ``out_dir``: the task's directory (default :func:`task_dir`); ``raw_path``:
    read this file instead of the cached asset (tests, custom copies).
    """
    spec = get_task(name)
    out = Path(out_dir) if out_dir is not None else task_dir(name, seed)
    raw = Path(raw_path) if raw_path is not None else spec.raw_path()
    if not force and is_current(spec, out, seed, skip_malformed, raw):
        meta = _read_meta(out) or {}
        if not quiet:
            _log(f"{name}: up to date ({_sizes_str(meta.get('sizes', {}))}) {out}")
        return meta
    t0 = time.time()
    st = raw.stat() if raw.exists() else None
    raw_sha = sha256_file(raw) if st else None
    parsed = spec.parse(raw, skip_malformed=skip_malformed)
    items, n_dup = dedupe(parsed.items)
    counts = dict(parsed.counts)
    if n_dup:
        counts["duplicate_input"] = n_dup
    splits = split_items(items, spec.sizes, seed, spec.split_salt or spec.name)
    files = {}
    for split in SPLITS:
        recs = splits[split]
        for i, rec in enumerate(recs):
            rec["id"] = f"{name}-{split}-{i}"
        text = to_jsonl(recs)
        atomic_write_text(out / f"{split}.jsonl", text)
        files[split] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    meta = {
        **_meta_key(spec, seed, skip_malformed),
        "family": spec.family, "lang": spec.lang,
        "sizes": {s: len(splits[s]) for s in SPLITS},
        "usable": len(items),
        "unused": len(items) - sum(len(v) for v in splits.values()),
        "counts": counts,
        "malformed_examples": parsed.malformed_examples,
        "label_counts": _label_counts(spec, splits),
        "source": {"file": str(raw), "sha256": raw_sha, "size": st.st_size if st else None,
                   "mtime_ns": st.st_mtime_ns if st else None, "description": spec.source},
        "files": files,
        "build_seconds": round(time.time() - t0, 3),
    }
    atomic_write_json(out / "meta.json", meta)  # written last: it marks the build complete
    if not quiet:
        dropped = ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"
        _log(f"{name}: {_sizes_str(meta['sizes'])} (dropped: {dropped}) in {meta['build_seconds']:.1f}s -> {out}")
    return meta


def _label_counts(spec: TaskSpec, splits: dict[str, list[dict]]) -> dict:
    if spec.family == "classification":
        return {s: _count(r["label"] for r in recs) for s, recs in splits.items()}
    if spec.family == "ner":
        return {s: _count(e["type"] for r in recs for e in r["entities"]) for s, recs in splits.items()}
    return {s: {"answerable": sum(r["answerable"] for r in recs),
                "unanswerable": sum(not r["answerable"] for r in recs)} for s, recs in splits.items()}


def _count(xs: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items()))


def tasks_from_asset(asset: str) -> list[str]:
    """Registered tasks whose raw file comes from ``asset``."""
    return [n for n, s in TASKS.items() if s.asset == asset]


def unavailable_reason(task: str) -> str | None:
    """Why ``task`` cannot be built here (its raw file is missing: the file and the fix), else None."""
    spec = get_task(task)
    return None if spec.raw_path().exists() else str(spec.missing_error())


def unavailable_tasks() -> dict[str, str]:
    """Tasks skipped by :func:`build_all`: raw file missing and its asset optional -> reason."""
    out = {}
    for n, spec in TASKS.items():
        reason = unavailable_reason(n) if is_optional(spec.asset) else None
        if reason:
            out[n] = reason
    return out


def build_all(seed: int = 0, tasks: list[str] | None = None, skip_malformed: bool = False,
              force: bool = False, root: str | os.PathLike | None = None) -> dict[str, dict]:
    """Build every registered task (or ``tasks``); return {task: meta}.

    Without ``tasks``, the :func:`unavailable_tasks` are skipped and listed on stderr.
    """
    skipped = {} if tasks else unavailable_tasks()
    names = list(tasks) if tasks else [n for n in TASKS.names() if n not in skipped]
    out = {n: build_task(n, task_dir(n, seed, root), seed, skip_malformed, force=force) for n in names}
    if skipped:
        by_asset: dict[str, list[str]] = {}
        for n in skipped:
            by_asset.setdefault(get_task(n).asset, []).append(n)
        for asset, ns in by_asset.items():
            _log(f"SKIPPED {len(ns)} task(s), raw asset '{asset}' unavailable: {', '.join(ns)}; "
                 f"{missing_hint(asset)}")
    return out


def _sizes_str(sizes: dict) -> str:
    return " / ".join(f"{s} {sizes.get(s, '?')}" for s in SPLITS)


def _log(msg: str) -> None:
    print(f"[data] {msg}", file=sys.stderr, flush=True)


def data_card_table(metas: dict[str, dict]) -> str:
    """Markdown table of built splits (for docs/data.md)."""
    rows = ["| task | family | lang | train | dev | test | usable | dropped / skipped rows |",
            "|---|---|---|---:|---:|---:|---:|---|"]
    for name, m in metas.items():
        s = m["sizes"]
        dropped = ", ".join(f"{k} {v}" for k, v in m.get("counts", {}).items()) or "none"
        rows.append(f"| {name} | {m['family']} | {m['lang']} | {s['train']} | {s['dev']} | {s['test']} | "
                    f"{m['usable']} | {dropped} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scd.data.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", metavar="TASK", help="tasks to build (default: all registered)")
    ap.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    ap.add_argument("--skip-malformed", action="store_true", help="skip and count malformed source rows "
                    "instead of failing")
    ap.add_argument("--force", action="store_true", help="rebuild even when meta.json matches")
    ap.add_argument("--root", type=Path, help="output root (default: <cache>/data)")
    ap.add_argument("--list", action="store_true", help="list registered tasks and exit")
    ap.add_argument("--card", action="store_true", help="after building, print a markdown table of the splits")
    args = ap.parse_args(argv)
    if args.list:
        for n, s in TASKS.items():
            print(f"{n:18s} {s.family:15s} {s.lang}  {s.source}")
        return 0
    try:
        t0 = time.time()
        metas = build_all(args.seed, args.tasks, args.skip_malformed, args.force, args.root)
        _log(f"{len(metas)} task(s) ready in {time.time() - t0:.1f}s under {args.root or data_dir()}")
        if args.card:
            print(data_card_table(metas))
    except (DataError, AssetError, RegistryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
