"""Which tasks and examples an evaluation runs on: task/family names -> tasks, the examples of a
split, deterministic few-shot demonstrations, and the check of per-task label words against the
evaluated tasks.  Shared by :mod:`benchmarks.evaluate` and :mod:`benchmarks.lmeval_bridge`."""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

from scd.core.config import ConfigError
from scd.core.registry import did_you_mean
from scd.data.load import is_spec, load_split
from scd.data.prompts import select_shots as seeded_order
from scd.data.records import FAMILIES
from scd.data.tasks import TASKS


def expand_tasks(names: Sequence[str]) -> list[str]:
    """Task names, family names (qa/ner/classification), ``all`` or dataset specs
    (``json:<path with {split}>`` etc., see ``scd.data.load``) -> task names."""
    out: list[str] = []
    for name in names:
        if is_spec(name):
            new = [name]
        elif name == "all":
            new = TASKS.names()
        elif name in FAMILIES and name not in TASKS:
            new = [t for t in TASKS.names() if TASKS.get(t).family == name]
        else:
            TASKS.get(name)  # unknown -> did-you-mean error
            new = [name]
        out.extend(t for t in new if t not in out)
    return out


def task_examples(task: str, split: str, limit: int | None = None) -> list[dict]:
    rows = load_split(task, split, limit=limit)
    if not rows:
        raise ValueError(f"task '{task}' split '{split}' has no examples")
    return rows


def check_prompts(prompts: dict | None, tasks: Sequence[str]) -> None:
    """Every ``prompts`` key must be one of the evaluated ``tasks`` (expanded: family names count), and
    a classification task where the registry knows its family (dataset specs are checked when their
    data loads, in :func:`benchmarks.evaluate.evaluate_task`)."""
    if not prompts:
        return
    tasks = expand_tasks(tasks)
    for name in prompts:
        if name not in tasks:
            raise ConfigError(f"key 'prompts.{name}': not among the evaluated tasks {list(tasks)}"
                              f"{did_you_mean(name, tasks)}")
        if name in TASKS and TASKS.get(name).family != "classification":
            raise ConfigError(f"key 'prompts.{name}': label words apply to classification tasks, '{name}' is "
                              f"{TASKS.get(name).family}")


def _task_seed(task: str, seed: int) -> list[int]:
    return [seed, zlib.crc32(task.encode())]


def few_shot_examples(task: str, k: int, seed: int = 0, exclude_ids: Sequence[str] = (),
                 pool: Sequence[dict] | None = None) -> list[dict]:
    """``k`` demonstrations from the task's train split, deterministic in (task, seed).

    Candidates are the train examples whose input is at most the median input length
    (keeps prompts short), in the seeded order of ``scd.data.prompts.select_shots``.
    Classification shots cycle through the label set in its order (so every label is
    shown when k >= |labels|) and are then put in a seeded random order; other
    families take the first k.
    """
    if k <= 0:
        return []
    rows = list(pool) if pool is not None else task_examples(task, "train")
    excl = set(exclude_ids)
    rows = [r for r in rows if r.get("id") not in excl]
    if len(rows) < k:
        raise ValueError(f"task '{task}': {k} shots requested but the train split has {len(rows)} examples")
    lengths = sorted(len(r["input"]) for r in rows)
    median = lengths[(len(lengths) - 1) // 2]
    short = [r for r in rows if len(r["input"]) <= median]
    ordered = seeded_order(short if len(short) >= k else rows, len(rows), seed=seed)
    if ordered[0].get("family") != "classification":
        return ordered[:k]
    by_label: dict[str, list[dict]] = {}
    for r in ordered:
        by_label.setdefault(r["label"], []).append(r)
    labels = [lab for lab in ordered[0]["label_set"] if by_label.get(lab)]
    chosen: list[dict] = []
    depth = 0
    while len(chosen) < k:
        added = False
        for lab in labels:
            if depth < len(by_label[lab]) and len(chosen) < k:
                chosen.append(by_label[lab][depth])
                added = True
        if not added:
            break
        depth += 1
    rng = np.random.default_rng(_task_seed(task, seed))
    return [chosen[i] for i in rng.permutation(len(chosen))]
