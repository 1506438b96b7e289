"""Models and files of an evaluation: the saved model of a run directory, loading, file-name slugs."""
from __future__ import annotations

import re
from pathlib import Path

from scd.core.results import read_json
from scd.models import ModelConfig, build_model


def run_model_path(run_dir: Path) -> Path:
    """The saved model folder of a run directory."""
    rec = read_json(run_dir / "run.json")
    recorded = (rec.get("artifacts") or {}).get("model")
    candidates = []
    if recorded:
        p = Path(recorded).expanduser()
        candidates += [p] if p.is_absolute() else [run_dir / p, Path.cwd() / p, run_dir / p.name]
    candidates.append(run_dir / "model")
    for c in candidates:
        if (c / "config.json").exists():
            return c
    raise FileNotFoundError(f"{run_dir}/run.json: no saved model (artifacts.model = {recorded!r}, no "
                            f"{run_dir / 'model'} folder); train with save_model: true or pass a model path")


def load_model(name_or_path: str, dtype: str = "float32", device: str = "cpu"):
    model, tok = build_model(ModelConfig(name=str(name_or_path), dtype=dtype))
    model.to(device)
    model.eval()
    return model, tok


def task_file(task: str) -> str:
    """A file-name-safe form of a task name (dataset specs contain '/' and ':')."""
    return task if re.fullmatch(r"[A-Za-z0-9._-]+", task) else slug(task.replace(":", "-"))


def slug(name: str) -> str:
    base = Path(name.rstrip("/")).name if ("/" in name or Path(name).exists()) else name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-") or "model"
