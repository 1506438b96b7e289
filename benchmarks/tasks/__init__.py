"""Task-family scorers (registry kind ``"scorer"``): qa, ner, classification.

    from benchmarks.tasks import SCORERS
    scorer = SCORERS.build("qa")
"""
from benchmarks.tasks.base import SCORERS, Scorer, scorer_for  # noqa: F401
from benchmarks.tasks import classification, ner, qa  # noqa: F401,E402  (register the scorers)
