"""Writing leaderboard files: atomically, and only when their content changed (so rebuilding an
unchanged leaderboard leaves a clean checkout: no new timestamps, no rewritten bytes)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterable

from scd.core.results import atomic_write_bytes, atomic_write_json, read_json

try:
    import fcntl
except ImportError:  # pragma: no cover  (non-POSIX: no advisory locks)
    fcntl = None


@contextlib.contextmanager
def file_lock(path: Path):
    """Exclusive advisory lock (serialises leaderboard writers on a host).

    The same lock as ``benchmarks.grid.file_lock`` (same flock on the same path), kept here because
    the leaderboard may not import the grid runner, its orchestration peer."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_bytes_if_changed(path: Path, data: bytes) -> bool:
    """Atomically write ``data`` unless ``path`` already holds exactly it; True when written."""
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    atomic_write_bytes(path, data)
    return True


def write_text_if_changed(path: Path, text: str) -> bool:
    return write_bytes_if_changed(path, text.encode("utf-8"))


def write_json_if_changed(path: Path, obj: dict, ignore: Iterable[str] = ()) -> bool:
    """Atomically write ``obj`` unless the file holds the same object up to the ``ignore`` keys
    (a timestamp): then the file, timestamp included, is left as it is."""
    skip = set(ignore)

    def strip(d: Any) -> Any:
        return {k: v for k, v in d.items() if k not in skip} if isinstance(d, dict) else d
    try:
        if strip(read_json(path)) == strip(obj):
            return False
    except (OSError, ValueError):
        pass
    atomic_write_json(path, obj)
    return True
