"""Process and file-lock primitives shared by the orchestration layer and the recipes.

* :func:`file_lock`    exclusive advisory ``flock`` on a lock file (serialises writers on a host:
                       leaderboard and index writers, stale-claim reclaimers, a teacher/anchor
                       run trained on demand by the distill recipe)
* :func:`proc_stat`    state, parent, process group, session and start time of a pid (Linux /proc)
* :func:`pid_alive`    is a pid running (not a zombie, and not a reused pid)?
* :func:`kill_session` SIGKILL what is left of a dead process's session
"""
from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover  (non-POSIX: no advisory locks)
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def file_lock(path: str | os.PathLike):
    """Exclusive advisory lock held for the ``with`` block (a no-op where flock does not exist)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def proc_stat(pid: int) -> dict | None:
    """state, ppid, pgrp, session, start (clock ticks since boot) of a process; None if unknown."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2:].split()  # the command name may contain spaces and ')'
    return {"state": rest[0], "ppid": int(rest[1]), "pgrp": int(rest[2]), "session": int(rest[3]),
            "start": int(rest[19])}


def pid_alive(pid: int, start: int | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, when known, started at ``start`` (no pid reuse)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    st = proc_stat(pid)
    if st is None:  # no /proc (not Linux): trust kill(0); else it vanished meanwhile
        return not Path("/proc/self/stat").exists()
    if st["state"] in ("Z", "X"):
        return False
    return start is None or st["start"] == start


def kill_session(sid: int, start: int) -> int:
    """SIGKILL the live processes of session ``sid`` that started at or after ``start``
    (what a dead launcher left behind, e.g. torchrun workers); returns how many."""
    if not Path("/proc").is_dir():
        return 0
    killed = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        st = proc_stat(int(d.name))
        if st and st["session"] == sid and st["start"] >= start and st["state"] not in ("Z", "X"):
            with contextlib.suppress(OSError):
                os.kill(int(d.name), signal.SIGKILL)
                killed += 1
    return killed
