"""Fault injection for reliability tests: ``SCD_FAULT=<point>:<n>`` SIGKILLs the
process the n-th time (1-based) execution reaches ``fault_point(<point>)``.

Points used by the recipes: ``step`` (after an optimiser step), ``ckpt_write``
(inside a checkpoint save, before the rename), ``stage`` (between distillation
stages), ``run_json`` (inside an atomic write), ``leaderboard`` (inside the
leaderboard write).  Unset in normal use: the check is one dict lookup.
"""
from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def fault_point(point: str) -> None:
    spec = os.environ.get("SCD_FAULT")
    if not spec:
        return
    want, _, n = spec.partition(":")
    if want != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
