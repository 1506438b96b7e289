"""The grid runner: keeps every slot busy until the queue is empty, records failures the
child could not record, prints progress, resumes interrupted runs (see docs/grid.md)."""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, TextIO

from benchmarks.grid.claims import Claim, describe_lock
from benchmarks.grid.slots import Slot, build_command, child_env, command_template
from benchmarks.grid.spec import Plan, PlannedRun, grid_dir
from scd.core.results import RunDir, atomic_write_text, failure_stub, read_json, safe_join, validate_run_record

INTERRUPTED_MARK = "interrupted (KeyboardInterrupt)"  # scd.cli records Ctrl-C as failed; we resume it


def run_status(run_dir: Path) -> str:
    """'missing' | 'ok' | 'failed' | 'diverged' | 'running' | 'interrupted' | 'corrupt'."""
    p = run_dir / "run.json"
    if not p.exists():
        return "missing"
    try:
        rec = read_json(p)
        status = rec.get("status")
    except (OSError, ValueError, AttributeError):
        return "corrupt"
    if status == "failed" and INTERRUPTED_MARK in str(rec.get("error") or ""):
        return "interrupted"
    return status if status in ("ok", "failed", "diverged", "running") else "corrupt"


def log_tail(path: Path, offset: int = 0, max_lines: int = 40, max_chars: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(offset, 0))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    lines = text.splitlines()[-max_lines:]
    return "\n".join(lines)[-max_chars:]


def _fmt_dur(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


@dataclasses.dataclass
class _Active:
    run: PlannedRun
    slot: Slot
    claim: Claim
    proc: subprocess.Popen
    started: float
    log_offset: int
    log_file: Any
    killed_for_timeout: bool = False
    term_sent: float | None = None


@dataclasses.dataclass
class GridResult:
    ok: list[str] = dataclasses.field(default_factory=list)  # finished ok in this session
    failed: list[str] = dataclasses.field(default_factory=list)  # failed/diverged in this session
    skipped_ok: list[str] = dataclasses.field(default_factory=list)  # already finished
    skipped_failed: list[str] = dataclasses.field(default_factory=list)  # failed earlier, not retried
    elsewhere: list[str] = dataclasses.field(default_factory=list)  # claimed by another runner
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if (self.failed or self.skipped_failed) else 0


def _pdeathsig(parent: int):
    """preexec_fn: the child gets SIGKILL when the runner dies (Linux), so a kill -9 of the
    runner never leaves an orphan training in a run directory that a restart reclaims."""
    def setup() -> None:
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6", use_errno=True)
                libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
            except Exception:  # noqa: BLE001
                pass
            if os.getppid() != parent:  # runner already gone
                os._exit(1)
    return setup


class GridRunner:
    """Keeps every slot busy until the queue is empty; see module doc."""

    def __init__(self, plan: Plan, results_dir: str | os.PathLike, slots: list[Slot], *,
                 command: str | None = None, retry_failed: bool = False, shard: tuple[int, int] = (0, 1),
                 timeout_s: float | None = None, progress_every: float = 30.0, heartbeat_s: float = 30.0,
                 stale_after_s: float = 600.0, stream: TextIO | None = None, poll_s: float = 0.1):
        self.plan = plan
        self.grid = plan.grid
        self.results_dir = Path(results_dir)
        self.gdir = grid_dir(results_dir, plan.name)
        self.slots = slots
        self.command = command or self.grid.command
        self.retry_failed = retry_failed
        self.shard = shard
        self.timeout_s = timeout_s if timeout_s is not None else self.grid.timeout_s
        self.progress_every = progress_every
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.stream = stream if stream is not None else sys.stderr
        self.poll_s = poll_s
        self.runner_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._stop: int | None = None
        self.durations: list[float] = []

    # ------------------------------------------------------------------ output
    def emit(self, msg: str) -> None:
        print(f"[grid {self.grid.name} {time.strftime('%H:%M:%S')}] {msg}", file=self.stream, flush=True)

    def run_dir(self, run: PlannedRun) -> Path:
        return safe_join(self.gdir, run.run_id)

    # ------------------------------------------------------------------ queue
    def initial_queue(self, runs: list[PlannedRun], res: GridResult) -> deque:
        queue: deque = deque()
        for r in runs:
            st = run_status(self.run_dir(r))
            if st == "ok":
                res.skipped_ok.append(r.run_id)
            elif st in ("failed", "diverged") and not self.retry_failed:
                res.skipped_failed.append(r.run_id)
            else:
                queue.append(r)
        return queue

    def _still_wanted(self, run: PlannedRun, t0: float) -> str | None:
        """Re-check after claiming (another runner may have finished it meanwhile)."""
        rd = self.run_dir(run)
        st = run_status(rd)
        if st == "ok":
            return "ok"
        if st in ("failed", "diverged"):
            if not self.retry_failed:
                return st
            with contextlib.suppress(OSError):
                if (rd / "run.json").stat().st_mtime >= t0:  # retried by another runner this session
                    return st
        return None

    # ------------------------------------------------------------------ launch
    def launch(self, run: PlannedRun, slot: Slot, claim: Claim) -> _Active:
        rd = self.run_dir(run)
        cfg_path = rd / "config.yaml"
        if not cfg_path.exists():  # plan written before start; be robust to a deleted file
            atomic_write_text(cfg_path, run.config_yaml)
        nproc = (len(slot.gpus) or self.grid.gpus_per_run) if self.grid.launcher != "local" else 1
        template = command_template(self.grid.launcher, self.command, slot)
        argv = build_command(template, config=cfg_path, run_dir=rd, slot=slot, nproc=nproc, run_id=run.run_id)
        RunDir(rd).reset_failed()  # a kill from now on means 'resume', not 'failed'
        log_path = rd / "log.txt"
        log_file = open(log_path, "ab")
        offset = log_file.tell()
        attempt = (f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} runner {self.runner_id} {slot.describe()}: "
                   f"{shlex.join(argv)}\n")
        log_file.write(attempt.encode())
        log_file.flush()
        env = child_env(slot, len(self.slots), run, self.grid.name)
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, preexec_fn=_pdeathsig(os.getpid()))
        claim.set_child(proc.pid)
        return _Active(run, slot, claim, proc, time.time(), offset, log_file)

    # ------------------------------------------------------------------ finish
    def finalize(self, act: _Active, rc: int) -> str:
        """Status of a finished child; record a failure the child could not record."""
        rd = RunDir(self.run_dir(act.run))
        tail = log_tail(rd.path / "log.txt", act.log_offset)
        rec = None
        with contextlib.suppress(OSError, ValueError):
            rec = validate_run_record(rd.read(), str(rd.run_json))
        status = rec.get("status") if rec else None
        if status == "ok" and not act.killed_for_timeout:
            if rc != 0:
                self.emit(f"note: {act.run.run_id} exited with code {rc} after writing status ok")
            return "ok"
        if status in ("failed", "diverged") and not act.killed_for_timeout:
            rd.add_log_tail(tail)
            return status
        rd.mark_failed(self._exit_error(rc, act.killed_for_timeout, rec, status), log_tail=tail, exit_code=rc,
                       stub=failure_stub(act.run.run_id, grid=self.grid.name, recipe=act.run.recipe,
                                         method=act.run.method, seed=act.run.seed, config=act.run.config))
        return "failed"

    def _exit_error(self, rc: int, timed_out: bool, rec: dict | None, status: str | None) -> str:
        if timed_out:
            return f"timeout: killed after {_fmt_dur(self.timeout_s)} (exit code {rc})"
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            return f"exit code {rc} (killed by {name})"
        if rc == 0:
            return f"exit code 0 but run.json is {'missing or invalid' if rec is None else repr(status)}"
        return f"exit code {rc}"

    # ------------------------------------------------------------------ main loop
    def run(self, runs: list[PlannedRun] | None = None) -> GridResult:
        runs = self.plan.shard(*self.shard) if runs is None else runs
        res = GridResult()
        t0 = time.time()
        queue = self.initial_queue(runs, res)
        self._announce(res, queue)
        free = deque(self.slots)
        active: list[_Active] = []
        last_progress = last_beat = time.time()
        old = self._install_signals()
        try:
            while queue or active:
                if self._stop is not None:
                    raise KeyboardInterrupt
                self._fill_slots(queue, free, active, res, t0)
                self._reap(active, free, res)
                now = time.time()
                if now - last_beat >= self.heartbeat_s:
                    for act in active:
                        act.claim.heartbeat()
                    last_beat = now
                if now - last_progress >= self.progress_every and (queue or active):
                    self.emit(self.progress(res, len(queue), active))
                    last_progress = now
                if active:
                    time.sleep(self.poll_s)
        except KeyboardInterrupt:
            res.interrupted = True
            self.emit(f"interrupted: stopping {len(active)} run(s); restart the same command to resume them")
            self._terminate(active)
        except BaseException:
            self._terminate(active)
            raise
        finally:
            self._restore_signals(old)
        done = len(res.ok) + len(res.skipped_ok)
        self.emit(f"finished: {done} ok, {len(res.failed)} failed this session, "
                  f"{len(res.skipped_failed)} failed earlier, {len(res.elsewhere)} held by other runners "
                  f"({_fmt_dur(time.time() - t0)})")
        return res

    def _announce(self, res: GridResult, queue: deque) -> None:
        if res.skipped_ok:
            self.emit(f"{len(res.skipped_ok)} run(s) already finished (skipped)")
        if res.skipped_failed:
            self.emit(f"{len(res.skipped_failed)} run(s) failed earlier (skipped; --retry-failed re-runs them)")
        self.emit(f"{len(queue)} run(s) to do on {len(self.slots)} slot(s)"
                  + (f", shard {self.shard[0]}/{self.shard[1]}" if self.shard[1] > 1 else ""))

    def _fill_slots(self, queue: deque, free: deque, active: list[_Active], res: GridResult, t0: float) -> None:
        """Claim and launch queued runs until every slot is busy or the queue is empty."""
        while free and queue:
            run = queue.popleft()
            claim = Claim.acquire(self.run_dir(run), stale_after_s=self.stale_after_s, runner=self.runner_id)
            if claim is None:
                res.elsewhere.append(run.run_id)
                self.emit(f"skip   {run.run_id}  {run.label()}: claimed by {describe_lock(self.run_dir(run))}")
                continue
            why = self._still_wanted(run, t0)
            if why is not None:
                claim.release()
                (res.skipped_ok if why == "ok" else res.skipped_failed).append(run.run_id)
                self.emit(f"skip   {run.run_id}  {run.label()}: {why} (by another runner)")
                continue
            slot = free.popleft()
            try:
                act = self.launch(run, slot, claim)
            except BaseException:
                claim.release()
                free.appendleft(slot)
                raise
            active.append(act)
            self.emit(f"start  {run.run_id}  {run.label()}  {slot.describe()}")

    def _reap(self, active: list[_Active], free: deque, res: GridResult) -> None:
        """Finalize children that exited (freeing their slots); enforce timeouts on the others."""
        for act in list(active):
            rc = act.proc.poll()
            if rc is None:
                self._check_timeout(act)
                continue
            act.log_file.close()
            status = self.finalize(act, rc)
            act.claim.release()
            active.remove(act)
            free.append(act.slot)
            dur = time.time() - act.started
            self.durations.append(dur)
            if status == "ok":
                res.ok.append(act.run.run_id)
                self.emit(f"done   {act.run.run_id}  {act.run.label()}  ok in {_fmt_dur(dur)}")
                continue
            res.failed.append(act.run.run_id)
            err = ""
            with contextlib.suppress(OSError, ValueError, AttributeError):
                err = str(RunDir(self.run_dir(act.run)).read().get("error") or "")
            first = err.splitlines()[0] if err else ""
            self.emit(f"{status.upper():6} {act.run.run_id}  {act.run.label()}: {first} "
                      f"(log: {self.run_dir(act.run) / 'log.txt'})")

    def progress(self, res: GridResult, queued: int, active: list[_Active]) -> str:
        done = len(res.ok) + len(res.skipped_ok)
        total = done + len(res.failed) + len(res.skipped_failed) + len(active) + queued + len(res.elsewhere)
        eta = None
        if self.durations:
            mean = sum(self.durations) / len(self.durations)
            now = time.time()
            running_left = max([max(0.0, mean - (now - a.started)) for a in active] or [0.0])
            eta = queued * mean / max(1, len(self.slots)) + running_left
        return (f"{done}/{total} done, {len(active)} running, {len(res.failed) + len(res.skipped_failed)} failed, "
                f"{queued} queued" + (f", {len(res.elsewhere)} elsewhere" if res.elsewhere else "")
                + f" | ETA {_fmt_dur(eta)}")

    def _check_timeout(self, act: _Active) -> None:
        if not self.timeout_s:
            return
        now = time.time()
        if act.term_sent is None and now - act.started > self.timeout_s:
            act.killed_for_timeout = True
            act.term_sent = now
            with contextlib.suppress(OSError):
                os.killpg(act.proc.pid, signal.SIGTERM)
        elif act.term_sent is not None and now - act.term_sent > 10:
            with contextlib.suppress(OSError):
                os.killpg(act.proc.pid, signal.SIGKILL)

    def _terminate(self, active: list[_Active]) -> None:
        """Stop children (SIGTERM, then SIGKILL after 10 s) and release their claims.
        Their run.json stays 'running', so the next start resumes them."""
        for act in active:
            with contextlib.suppress(OSError):
                os.killpg(act.proc.pid, signal.SIGTERM)
        deadline = time.time() + 10
        for act in active:
            try:
                act.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(act.proc.pid, signal.SIGKILL)
                act.proc.wait()
            act.log_file.close()
            act.claim.release()

    def _install_signals(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):  # noqa: ARG001
            self._stop = signum

        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def _restore_signals(self, old) -> None:
        for s, h in (old or {}).items():
            signal.signal(s, h)
