"""The parts every section of :mod:`benchmarks.note_numbers` shares: the :class:`Entry` record (one quoted number)
and the readers of committed results."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STATUS = "README.md"


@dataclasses.dataclass(frozen=True)
class Entry:
    note: str  # path of the note, relative to the repository root
    name: str
    value: float
    phrase: str  # the text the note must contain
    line: str | None = None  # ... on a line that starts with this (None: anywhere)


# ----------------------------------------------------------------------------- reading
def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def ok_runs(root: Path, grid: str) -> list[tuple[Path, dict]]:
    """(run dir, run.json) of every finished run of a committed grid folder, sorted by run id."""
    out = []
    for path in sorted((root / grid).glob("*/run.json")):
        rec = json.loads(path.read_text(encoding="utf-8"))
        if rec.get("status") == "ok":
            out.append((path.parent, rec))
    return out


def plan_statuses(folder: Path) -> list[str | None]:
    """The status of every run of the grid plan in ``folder`` (None: not started); [] without a plan.json."""
    plan = folder / "plan.json"
    if not plan.exists():
        return []
    paths = [folder / r["run_id"] / "run.json" for r in json.loads(plan.read_text(encoding="utf-8"))["runs"]]
    return [json.loads(p.read_text(encoding="utf-8")).get("status") if p.exists() else None for p in paths]


def plan_finished(folder: Path) -> bool:
    """Every run of the grid plan in ``folder`` finished ok (False without a plan.json: not launched)."""
    statuses = plan_statuses(folder)
    return bool(statuses) and all(s == "ok" for s in statuses)


def _value(rec: dict, task: str, metric: str) -> float:
    return float(rec["eval"][task][metric]["value"])


def _p(p: float) -> str:
    return f"{p:.2g}"
