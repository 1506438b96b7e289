"""Label words (a verbalizer, as in PET, Schick & Schuetze 2021) for classification records.

    lw = LabelWords({"fresh": "positive", "rotten": "negative"})
    verbalize(record, lw)   # label set, label, target and instruction in the words

Shared by training data (``data.prompts`` of the recipes, :mod:`scd.data_config`) and scoring
(``eval.prompts``, :mod:`benchmarks.tasks.classification`), so a model is trained and scored on the
same words and instruction.  Without an explicit ``instruction`` the task's own instruction is kept
with its closing "Answer with exactly one of: ..." sentence rebuilt from the words.
"""
from __future__ import annotations

import dataclasses
import re
import unicodedata


def norm_label(text: str) -> str:
    """Casefold (NFKC), punctuation and symbols to spaces, whitespace collapsed."""
    s = unicodedata.normalize("NFKC", text or "").casefold()
    s = "".join(" " if unicodedata.category(ch).startswith(("P", "S")) else ch for ch in s)
    return " ".join(s.split())


@dataclasses.dataclass(frozen=True)
class LabelWords:
    """A classification prompt variant: ``label_words`` maps every task label to the word the
    model sees and is scored on; ``instruction`` replaces the task's instruction (None: the
    task's own, with its "Answer with exactly one of: ..." sentence rebuilt from the words)."""

    label_words: dict[str, str] = dataclasses.field(default_factory=dict)
    instruction: str | None = None

    def __post_init__(self) -> None:
        if not self.label_words:
            raise ValueError("label_words must map each label of the task to a word")
        words = list(self.label_words.values())
        if any(not isinstance(w, str) or not w.strip() for w in words):
            raise ValueError(f"label_words: every word must be a non-empty string, got {words}")
        normed = [norm_label(w) for w in words]
        if len(set(normed)) != len(normed):
            raise ValueError(f"label_words: two labels share a word (after normalisation): {words}")


_ANSWER_WITH = re.compile(r"Answer with exactly one of: [^\n]*$")


def verbalize(example: dict, variant: LabelWords) -> dict:
    """The example as the model sees it under ``variant`` (label set, label, target, instruction)."""
    labels = list(example["label_set"])
    missing = [lab for lab in labels if lab not in variant.label_words]
    unknown = [k for k in variant.label_words if k not in labels]
    if missing or unknown:
        raise ValueError(f"label_words for task '{example.get('task')}' must name exactly its labels {labels}"
                         + (f"; missing {missing}" if missing else "") + (f"; unknown {unknown}" if unknown else ""))
    words = [variant.label_words[lab] for lab in labels]
    instruction = variant.instruction
    if instruction is None:
        own = example.get("instruction") or ""
        if not _ANSWER_WITH.search(own):
            raise ValueError(f"task '{example.get('task')}': its instruction has no 'Answer with exactly one of: "
                             "...' sentence to rebuild from the label words; give `instruction` explicitly")
        instruction = _ANSWER_WITH.sub(f"Answer with exactly one of: {', '.join(words)}.", own)
    out = {**example, "label_set": words, "instruction": instruction}
    if example.get("label") in variant.label_words:
        out["label"] = out["target"] = variant.label_words[example["label"]]
    return out
