"""Run directories: one self-describing ``run.json`` + ``metrics.jsonl`` per run.

Layout: ``results/<grid>/<run_id>/{config.yaml, run.json, metrics.jsonl, log.txt}``.
Every write of a whole file is atomic (temp file in the same directory + fsync +
``os.replace``), so a reader never sees half a file.  ``metrics.jsonl`` is
append-only; a torn last line (killed mid-write) is dropped on read and truncated
on resume.  Leaderboards are built from these files only, never from logs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from scd.core.config import to_dict
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
    """run_id: hash of the canonical JSON of the fully resolved config."""
    canon = json.dumps(resolved, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(canon.encode()).hexdigest()[:n]


def default_run_dir(cfg, results_root: str = "results") -> Path:
    """``<results_root>/<grid or runs>/<method>-<run_id>``: where ``python -m scd run CONFIG`` puts a run."""
    resolved = to_dict(cfg)
    run_id = config_hash({k: v for k, v in resolved.items() if k != "grid"})
    grid = getattr(cfg, "grid", None) or "runs"
    return Path(results_root) / grid / f"{getattr(cfg, 'method', 'run')}-{run_id}"


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
def git_sha(root: str | os.PathLike | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root or Path(__file__).resolve().parents[2],
                             capture_output=True, text=True, timeout=5)
        sha = out.stdout.strip()
        if out.returncode != 0 or not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root or Path(__file__).resolve().parents[2],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


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
        "status": "running",
        "error": None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
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
    """A run directory with helpers for its files."""

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
