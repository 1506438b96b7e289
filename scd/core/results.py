"""Run directories: one self-describing ``run.json`` + ``metrics.jsonl`` per run.

Layout: ``results/<grid>/<run_id>/{config.yaml, run.json, metrics.jsonl, log.txt}``.
Every write of a whole file is atomic (temp file in the same directory + fsync +
``os.replace``), so a reader never sees half a file.  ``metrics.jsonl`` is
append-only; a torn last line (killed mid-write) is dropped on read and truncated
on resume.  Leaderboards are built from these files only, never from logs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Iterable

from scd import recipes
from scd.core.config import RECIPES, dump_yaml, to_dict
from scd.core.faults import fault_point

SCHEMA_VERSION = 1
STATUSES = ("running", "ok", "failed", "diverged")


_UMASK = os.umask(0)
os.umask(_UMASK)


class ResultsError(OSError):
    """Could not write results (disk full, permission denied, path outside root).

    ``errno`` is kept for callers; the message is the plain sentence (no ``[Errno N]`` prefix)."""

    def __str__(self) -> str:
        return self.strerror if self.strerror is not None else super().__str__()


# ------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise ResultsError(e.errno, f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            fault_point("run_json" if path.name == "run.json" else "atomic_write")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; use the usual mode
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ResultsError(e.errno, f"cannot write {path}: {e.strerror}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dumps(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default, allow_nan=True)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, dumps(obj) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------------- hashing
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def config_hash(resolved: Any, n: int = 12) -> str:
    """Hash of the canonical JSON of ``resolved`` (key order does not matter)."""
    canon = json.dumps(resolved, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(canon.encode()).hexdigest()[:n]


def run_id(resolved_config: dict) -> str:
    """The run id: hash of the fully resolved config without its ``grid`` key, so the same
    config has the same id in any grid (and outside one).  A registered recipe's ``id_view``
    (:func:`scd.core.config.register_recipe`) is applied first."""
    name = resolved_config.get("recipe")
    if isinstance(name, str):
        recipes.ensure(name)  # a built-in recipe registers its id_view on import: ids never depend on import order
    spec = RECIPES.get(name) if isinstance(name, str) and name in RECIPES else None
    view = spec.id_view(resolved_config) if spec is not None and spec.id_view is not None else resolved_config
    return config_hash({k: v for k, v in view.items() if k != "grid"})


def default_run_dir(cfg: Any, results_root: str | os.PathLike = "results") -> Path:
    """``<results_root>/<grid or runs>/<method>-<run_id>``: where ``scd run`` puts a run by default."""
    grid = getattr(cfg, "grid", None) or "runs"
    return Path(results_root) / grid / f"{getattr(cfg, 'method', 'run')}-{run_id(to_dict(cfg))}"


# ----------------------------------------------------------------------- metrics
class MetricsWriter:
    """Append-only JSONL (one record per line, flushed).  Rank 0 only."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _truncate_torn_tail(self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        rec = {"time": round(time.time(), 3), **record}
        line = json.dumps(rec, ensure_ascii=False, default=_json_default, allow_nan=True)
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
        except OSError as e:
            raise ResultsError(e.errno, f"cannot append to {self.path}: {e.strerror}") from None

    def drop_after(self, step: int, key: str = "step") -> None:
        """On resume from a checkpoint at ``step``: drop records logged after it, so
        a resumed run's metrics equal an uninterrupted run's (no duplicate rows)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path) if r.get(key, -1) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n"
                                             for r in keep))


def _truncate_torn_tail(path: Path) -> None:
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics.jsonl; a torn (unterminated) last line is ignored."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    text = p.read_text(encoding="utf-8")
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        if i == len(lines) - 1:  # no trailing newline: torn write
            break
        out.append(json.loads(line))
    return out


# ----------------------------------------------------------------------- env info
CODE_ROOT = Path(__file__).resolve().parents[2]  # the suite's git checkout
CODE_DIRS = ("scd", "unisd", "benchmarks", "configs")  # untracked files here are part of the code
NOT_CODE = ("results",)  # generated outputs: never part of the code state


@dataclasses.dataclass(frozen=True)
class CodeState:
    """The code a run starts from: HEAD plus, when the tree is dirty, the patch on top of it."""

    sha: str  # HEAD commit
    files: tuple[str, ...] = ()  # changed tracked files + untracked files under CODE_DIRS
    patch: bytes = b""  # `git diff HEAD` + untracked code files as added-file diffs

    @property
    def dirty(self) -> bool:
        return bool(self.files)

    @property
    def label(self) -> str:
        """The run record's ``git_sha``: ``<sha>`` or ``<sha>-dirty``."""
        return self.sha + ("-dirty" if self.dirty else "")


def _git(root: Path, *args: str, ok: tuple[int, ...] = (0,)) -> bytes:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, timeout=30)
    if out.returncode not in ok:
        raise subprocess.SubprocessError(out.stderr.decode(errors="replace").strip())
    return out.stdout


def code_state(root: str | os.PathLike | None = None) -> CodeState | None:
    """HEAD and the diff of the working tree (outside results/) against it; None if not a git checkout."""
    root = Path(root or CODE_ROOT)
    try:
        sha = _git(root, "rev-parse", "HEAD").decode().strip()
        if not sha:
            return None
        spec = ["--", ".", *(f":(exclude){d}" for d in NOT_CODE)]
        changed = [f for f in _git(root, "diff", "HEAD", "--name-only", "-z", *spec).decode().split("\0") if f]
        untracked = [f for f in _git(root, "ls-files", "--others", "--exclude-standard", "-z", "--",
                                     *CODE_DIRS).decode().split("\0") if f]
        if not changed and not untracked:
            return CodeState(sha)
        patch = _git(root, "diff", "HEAD", "--binary", *spec)
        for f in sorted(untracked):  # exit code 1: "there were differences"
            patch += _git(root, "diff", "--no-index", "--binary", "--", os.devnull, f, ok=(0, 1))
        return CodeState(sha, tuple(sorted(changed + untracked)), patch)
    except (OSError, subprocess.SubprocessError, UnicodeDecodeError):
        return None


def git_sha(root: str | os.PathLike | None = None) -> str | None:
    state = code_state(root)
    return state.label if state else None


def env_info() -> dict:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "host": socket.gethostname(), "cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name(0)
            info["gpus"] = torch.cuda.device_count()
        else:
            info["device"] = "cpu"
            info["threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        pass
    from importlib.metadata import PackageNotFoundError, version

    for mod in ("transformers", "peft", "deepspeed", "datasets"):
        try:  # metadata only: importing deepspeed/peft costs seconds
            info[mod] = version(mod)
        except PackageNotFoundError:
            pass
    return info


# ----------------------------------------------------------------------- run.json
def new_run_record(*, run_id: str, grid: str | None, method: str, seed: int, recipe: str,
                   config: dict, components: dict | None = None, hparams: dict | None = None) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "grid": grid,
        "recipe": recipe,
        "method": method,
        "seed": seed,
        "git_sha": git_sha(),
        "code_patch_sha256": None,
        "status": "running",
        "error": None,
        "started": _now(),
        "finished": None,
        "env": env_info(),
        "components": components or {},
        "hparams": hparams or {},
        "config": config,
        "train": {},
        "eval": {},
        "eval_info": {},
        "cka": {},
        "metric_meta": {},
        "artifacts": {},
    }


def failure_stub(run_id: str, *, grid: str | None = None, recipe: str | None = None, method: str = "?",
                 seed: int = 0, config: dict | None = None) -> dict:
    """A run.json for a run that failed before its recipe wrote one (same keys as
    :func:`new_run_record`, ``started`` None; env kept cheap: no torch import)."""
    return {"schema_version": SCHEMA_VERSION, "run_id": run_id, "grid": grid, "recipe": recipe,
            "method": method, "seed": seed, "git_sha": git_sha(), "code_patch_sha256": None, "status": "failed",
            "error": None, "started": None, "finished": None,
            "env": {"python": platform.python_version(), "platform": platform.platform(),
                    "host": socket.gethostname()},
            "components": {}, "hparams": {}, "config": config or {}, "train": {}, "eval": {}, "eval_info": {},
            "cka": {}, "metric_meta": {}, "artifacts": {}}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def validate_run_record(rec: dict, where: str = "run.json") -> dict:
    """Check a run.json against the schema; raise ValueError naming the bad key."""
    required = {"schema_version": int, "run_id": str, "method": str, "seed": int, "status": str,
                "eval": dict, "train": dict, "metric_meta": dict, "components": dict, "hparams": dict}
    for key, tp in required.items():
        if key not in rec:
            raise ValueError(f"{where}: missing key '{key}'")
        if not isinstance(rec[key], tp):
            raise ValueError(f"{where}: key '{key}' should be {tp.__name__}, got {type(rec[key]).__name__}")
    if rec["schema_version"] > SCHEMA_VERSION:
        raise ValueError(f"{where}: schema_version {rec['schema_version']} is newer than this code "
                         f"({SCHEMA_VERSION}); update the suite")
    if rec["status"] not in STATUSES:
        raise ValueError(f"{where}: status '{rec['status']}' not in {STATUSES}")
    for task, metrics in rec["eval"].items():
        if not isinstance(metrics, dict):
            raise ValueError(f"{where}: eval.{task} should be a mapping of metrics")
        for m, v in metrics.items():
            if not isinstance(v, dict) or "value" not in v:
                raise ValueError(f"{where}: eval.{task}.{m} should be {{value, n, ci}}")
    return rec


class RunDir:
    """A run directory and the only writer of its ``run.json``.

    Life cycle: :meth:`start` (status running, config.yaml, code.patch) -> :meth:`finish`
    (status ok) or :meth:`fail` (failed/diverged + error).  The grid runner, which sees
    runs from outside, uses :meth:`reset_failed`, :meth:`add_log_tail` and :meth:`mark_failed`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def ckpt_dir(self) -> Path:
        return self.path / "ckpt"

    def exists(self) -> bool:
        return self.run_json.exists()

    def read(self) -> dict:
        return read_json(self.run_json)

    def status(self) -> str | None:
        try:
            return self.read().get("status")
        except (OSError, ValueError):
            return None

    def is_finished(self) -> bool:
        return self.status() == "ok"

    def write(self, rec: dict) -> None:
        atomic_write_json(self.run_json, rec)

    def update(self, **fields: Any) -> dict:
        rec = self.read()
        rec.update(fields)
        self.write(rec)
        return rec

    def metrics(self, enabled: bool = True) -> MetricsWriter:
        return MetricsWriter(self.metrics_path, enabled=enabled)

    # ------------------------------------------------------------- life cycle
    def start(self, cfg: Any, *, recipe: str, components: dict | None = None,
              hparams: dict | None = None) -> "RunDir":
        """Create/refresh run.json (status running) and config.yaml for a run of ``cfg``.

        A resumed attempt (same run id, a record its recipe started) keeps its record;
        a new run, or a stub written by :meth:`fail`/:meth:`mark_failed` before the recipe
        started, gets a fresh one."""
        self.path.mkdir(parents=True, exist_ok=True)
        resolved = to_dict(cfg)
        rid = run_id(resolved)
        rec = self._read_or_none()
        if rec is not None and rec.get("run_id") == rid and rec.get("config") and rec.get("started"):
            rec.update(status="running", error=None)
            for stale in ("diverged_at", "traceback_tail", "log_tail", "exit_code"):
                rec.pop(stale, None)
        else:
            rec = new_run_record(run_id=rid, grid=getattr(cfg, "grid", None), method=getattr(cfg, "method", recipe),
                                 seed=getattr(cfg, "seed", 0), recipe=recipe, config=resolved,
                                 components=components, hparams=hparams)
        if not (self.path / "config.yaml").exists():
            atomic_write_text(self.path / "config.yaml", dump_yaml(cfg))
        return self.begin(rec)

    def begin(self, rec: dict) -> "RunDir":
        """Write ``rec`` with status running and the code it runs: ``git_sha`` and, from a dirty
        tree, ``code.patch`` (written first) with its ``code_patch_sha256``."""
        self.path.mkdir(parents=True, exist_ok=True)
        state = code_state()
        patch = self.path / "code.patch"
        rec = {**rec, "status": "running", "git_sha": state.label if state else None, "code_patch_sha256": None}
        if state is not None and state.dirty:
            atomic_write_bytes(patch, state.patch)
            rec["code_patch_sha256"] = hashlib.sha256(state.patch).hexdigest()
        elif patch.exists():  # an earlier attempt ran from a dirty tree
            with contextlib.suppress(OSError):
                patch.unlink()
        self.write(rec)
        return self

    def finish(self, **fields: Any) -> dict:
        """Status ok: ``fields`` (train, eval, artifacts, ...) merged into the record."""
        rec = self.read()
        rec.update(fields)
        rec.update(status="ok", finished=_now())
        self.write(rec)
        return rec

    def merge(self, sections: dict) -> dict:
        """Merge mapping sections (e.g. eval, metric_meta, eval_info, cka) into the record key by key."""
        rec = self.read()
        for key, value in sections.items():
            rec[key] = {**(rec.get(key) or {}), **value}
        validate_run_record(rec, str(self.run_json))
        self.write(rec)
        return rec

    def fail(self, exc: BaseException, log_tail: str | None = None) -> bool:
        """Status failed/diverged + error (and traceback); never raises; False if it could not write."""
        try:
            rec = self._read_or_none() or failure_stub(self.path.name)
            diverged = isinstance(exc, DivergedError)
            rec.update(status="diverged" if diverged else "failed", error=f"{type(exc).__name__}: {exc}",
                       traceback_tail="".join(traceback.format_exception(exc))[-4000:], finished=_now())
            if diverged:
                rec["diverged_at"] = {"step": exc.step, "term": exc.term, "value": str(exc.value)}
            if log_tail:
                rec["log_tail"] = log_tail
            self.write(rec)
            return True
        except Exception:  # noqa: BLE001  (best effort while already failing)
            return False

    def reset_failed(self) -> None:
        """Before re-running a failed/diverged run: status running, the old failure's fields removed
        (so a recipe updating run.json in place carries no stale error, and a kill means 'resume')."""
        rec = self._read_or_none()
        if rec is not None and rec.get("status") in ("failed", "diverged"):
            for k in ("log_tail", "exit_code", "traceback_tail", "diverged_at"):
                rec.pop(k, None)
            rec.update(status="running", error=None)
            self.write(rec)

    def add_log_tail(self, tail: str) -> None:
        """Attach the launcher's log tail to a record that has none."""
        rec = self._read_or_none()
        if rec is not None and not rec.get("log_tail"):
            rec["log_tail"] = tail
            self.write(rec)

    def mark_failed(self, error: str, *, log_tail: str | None = None, exit_code: int | None = None,
                    stub: dict | None = None) -> dict:
        """Status failed with ``error``, for a run whose process could not record it; a missing or
        invalid record is replaced by ``stub`` (default: :func:`failure_stub`)."""
        try:
            rec = validate_run_record(self.read(), str(self.run_json))
        except (OSError, ValueError, TypeError, AttributeError):
            rec = stub or failure_stub(self.path.name)
        rec.update(status="failed", error=error, log_tail=log_tail, exit_code=exit_code, finished=_now())
        self.write(rec)
        return rec

    def _read_or_none(self) -> dict | None:
        try:
            rec = self.read()
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None


def finite_or_raise(value: float, *, step: int, term: str) -> float:
    if not math.isfinite(value):
        raise DivergedError(step=step, term=term, value=value)
    return value


class DivergedError(RuntimeError):
    """A loss term became NaN/inf.  The run is recorded with status ``diverged``."""

    def __init__(self, *, step: int, term: str, value: float):
        self.step, self.term, self.value = step, term, value
        super().__init__(f"loss term '{term}' is {value} at step {step}")


def safe_join(root: str | os.PathLike, *parts: str) -> Path:
    """Join under ``root`` and refuse paths that escape it (.., absolute parts, symlinks)."""
    root_p = Path(root).resolve()
    p = root_p.joinpath(*parts).resolve()
    if p != root_p and root_p not in p.parents:
        raise ResultsError(1, f"path {'/'.join(parts)!r} escapes the results directory {root_p}")
    return p


def iter_run_jsons(root: str | os.PathLike) -> Iterable[Path]:
    return sorted(Path(root).rglob("run.json"))
