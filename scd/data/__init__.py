"""Task data: registry of datasets, deterministic splits (JSONL), loaders and prompt rendering.

    from scd.data import load_split, render_prompt, render_target
    examples = load_split("wnut16", "train", limit=200)   # built from the cached raw assets on first use

See docs/data.md (data card) and ``python -m scd.data.build --help``.
Importing this package registers every task in ``registry("task")``.
"""
from scd.data.prompts import (build_messages, entities_to_bio, parse_entities, render_example, render_prompt,
                              render_target, select_shots)
from scd.data.records import DataError, bio_to_entities, entities_to_target, make_record
from scd.data.tasks import TASKS, TaskSpec, get_task, task_names

__all__ = [
    "DataError", "TASKS", "TaskSpec", "as_hf_dataset", "bio_to_entities", "build_all", "build_messages",
    "build_task", "entities_to_bio", "entities_to_target", "get_task", "load_split", "make_record",
    "parse_entities", "read_jsonl", "render_example", "render_prompt", "render_target", "select_shots",
    "split_path", "task_dir", "task_names",
]

_LAZY = {"build_all": "build", "build_task": "build", "split_path": "build", "task_dir": "build",
         "as_hf_dataset": "load", "load_split": "load", "read_jsonl": "load"}


def __getattr__(name: str):
    # build/load are imported lazily so `python -m scd.data.build` runs without a runpy warning
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"scd.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'scd.data' has no attribute '{name}'")
