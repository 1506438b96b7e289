"""Writing leaderboard files: atomically, and only when their content changed (so rebuilding an
unchanged leaderboard leaves a clean checkout: no new timestamps, no rewritten bytes)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from scd.core.locks import file_lock  # noqa: F401  (re-exported for the leaderboard modules)
from scd.core.results import atomic_write_bytes, atomic_write_json, read_json



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
