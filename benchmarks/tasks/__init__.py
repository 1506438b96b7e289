"""Task-family scorers (registry kind ``"scorer"``): qa, ner, classification.

    from benchmarks.tasks import scorer_for
    scorer = scorer_for("qa")          # = SCORERS.build("qa") once the scorers are registered
"""
from typing import Any

from benchmarks.tasks import classification, ner, qa  # noqa: F401  (register the scorers)
from benchmarks.tasks.base import SCORERS, Scorer  # noqa: F401


def scorer_for(family: str, **kw: Any) -> Scorer:
    """The registered scorer of a task family (qa, ner, classification, or one registered by a user)."""
    return SCORERS.build(family, **kw)
