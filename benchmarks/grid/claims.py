"""Claims: an ``O_CREAT|O_EXCL`` lock file per run directory, so concurrent runners (shards,
workers, Slurm tasks) run every run exactly once; stale claims of dead runners are reclaimed."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from pathlib import Path

from scd.core.locks import file_lock, kill_session, pid_alive, proc_stat
from scd.core.results import atomic_write_json, read_json

LOCK_NAME = ".lock"
CHILD_NAME = ".lock.child"


def _kill_session_leftovers(child: dict) -> int:
    """SIGKILL processes left in a dead runner's child session (e.g. torchrun workers).
    Only processes of that session that started at or after the child are touched."""
    sid, start = child.get("sid"), child.get("start")
    if not isinstance(sid, int) or not isinstance(start, int):
        return 0
    return kill_session(sid, start)


class Claim:
    """Exclusive claim on a run directory: ``<run_dir>/.lock`` created with O_CREAT|O_EXCL,
    holding pid, host, process start time, a unique token and the time.

    A lock is stale when its process is dead on this host (or a zombie, or the pid was
    reused), when it is unreadable and older than 5 s (claimer died between create and
    write), or when another host's lock has not been heart-beaten for ``stale_after_s``.
    Stale locks are reclaimed by renaming them aside and checking the renamed bytes
    are the ones judged stale (so a fresh lock is never removed), serialised per host
    with flock.  Processes left in the dead runner's child session are killed first.
    """

    def __init__(self, run_dir: Path, fd_info: dict):
        self.run_dir = run_dir
        self.path = run_dir / LOCK_NAME
        self.info = fd_info

    # ---------------------------------------------------------------- acquire
    @classmethod
    def acquire(cls, run_dir: Path, *, stale_after_s: float = 600.0, runner: str = "") -> "Claim | None":
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = run_dir / LOCK_NAME
        me = proc_stat(os.getpid())
        info = {"pid": os.getpid(), "host": socket.gethostname(), "start": me["start"] if me else None,
                "token": uuid.uuid4().hex, "time": time.time(), "runner": runner}
        for _ in range(4):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raw, held, mtime = _read_lock(lock)
                if raw is None:
                    continue  # vanished: try again
                if not _is_stale(held, mtime, stale_after_s):
                    return None
                if not _reclaim(lock, raw, held):
                    return None
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(info))
                f.flush()
                os.fsync(f.fileno())
            return cls(run_dir, info)
        return None

    # ---------------------------------------------------------------- owner side
    def set_child(self, pid: int) -> None:
        st = proc_stat(pid)
        child = {"token": self.info["token"], "pid": pid, "sid": pid,  # start_new_session: sid == pid
                 "start": st["start"] if st else None}
        with contextlib.suppress(OSError):
            atomic_write_json(self.run_dir / CHILD_NAME, child)

    def heartbeat(self) -> None:
        with contextlib.suppress(OSError):
            os.utime(self.path)

    def release(self) -> None:
        raw, held, _ = _read_lock(self.path)
        if held is not None and held.get("token") == self.info["token"]:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        try:
            mine = read_json(self.run_dir / CHILD_NAME).get("token") == self.info["token"]
        except (OSError, ValueError, AttributeError):
            mine = False
        if mine:
            with contextlib.suppress(OSError):
                os.unlink(self.run_dir / CHILD_NAME)


def _read_lock(lock: Path) -> tuple[bytes | None, dict | None, float]:
    try:
        raw = lock.read_bytes()
        mtime = lock.stat().st_mtime
    except FileNotFoundError:
        return None, None, 0.0
    try:
        held = json.loads(raw)
        if not isinstance(held, dict):
            held = None
    except ValueError:
        held = None
    return raw, held, mtime


def _is_stale(held: dict | None, mtime: float, stale_after_s: float) -> bool:
    age = time.time() - mtime
    if held is None or not isinstance(held.get("pid"), int):
        return age > 5.0
    if held.get("host") == socket.gethostname():
        return not pid_alive(held["pid"], held.get("start"))
    return age > stale_after_s


def describe_lock(run_dir: Path) -> str:
    _, held, _ = _read_lock(run_dir / LOCK_NAME)
    if not held:
        return "another runner"
    return f"{held.get('host')}:{held.get('pid')}"


def _reclaim(lock: Path, raw: bytes, held: dict | None) -> bool:
    """Remove a stale lock whose bytes are ``raw``; False if it turned out to be fresh."""
    with file_lock(lock.parent.parent / ".claims.flock"):
        aside = lock.with_name(f"{LOCK_NAME}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(lock, aside)
        except FileNotFoundError:
            return True  # someone removed it; try to create
        try:
            if aside.read_bytes() != raw:  # it was replaced by a fresh claim: put it back
                with contextlib.suppress(FileExistsError):
                    os.link(aside, lock)
                return False
            if held and held.get("host") == socket.gethostname():
                try:
                    child = read_json(lock.parent / CHILD_NAME)
                except (OSError, ValueError):
                    child = None
                if isinstance(child, dict) and child.get("token") == held.get("token"):
                    if _kill_session_leftovers(child):
                        time.sleep(0.2)
            with contextlib.suppress(OSError):
                os.unlink(lock.parent / CHILD_NAME)
            return True
        finally:
            with contextlib.suppress(OSError):
                os.unlink(aside)

