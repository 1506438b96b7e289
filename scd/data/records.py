"""The shared example record: construction, BIO <-> entity conversion, validation.

One JSON object per line in ``<cache>/data/<task>/{train,dev,test}.jsonl``::

    common: id, task, family ("qa" | "ner" | "classification"), lang, instruction, input, target
    qa:     context, question, answers [str, ...] (target == answers[0]), answerable (bool),
            answer_start (char offset of answers[0] in context, -1 when unanswerable)
    ner:    tokens [str], tags [BIO str, same length], entities [{type, text, start, end}]
            (token offsets, end exclusive); target = "type: text; type: text" or "none"
    classification: text, label, label_set [str, ...]

Every builder (raw file -> records) and the ``hub:``/``json:`` loader go through
:func:`make_record`, so the input and target strings are formatted in one place.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

FAMILIES = ("qa", "ner", "classification")
UNANSWERABLE = "unanswerable"
NO_ENTITIES = "none"
ENTITY_SEP = "; "

COMMON_KEYS = ("id", "task", "family", "lang", "instruction", "input", "target")
FAMILY_KEYS = {
    "qa": ("context", "question", "answers"),
    "ner": ("tokens", "tags"),
    "classification": ("label", "label_set"),
}
_TAG_RE = re.compile(r"^(O|[BI]-[^\s:;]+)$")


class DataError(ValueError):
    """A malformed source row or data file; ``str(err)`` is one line naming file and row/line."""


# --------------------------------------------------------------------------- spans
def find_span(context: str, answer: str) -> tuple[int, int] | None:
    """Character span of ``answer`` in ``context``: exact first, then ignoring whitespace.

    The whitespace-insensitive match handles sources whose context is tokenized
    ("Apple Inc . in 1985") while the answer is not ("Apple Inc. in 1985"); the
    returned span points at the context's own spelling.
    """
    if not answer.strip():
        return None
    i = context.find(answer)
    if i >= 0:
        return i, i + len(answer)
    chars = [re.escape(c) for c in answer if not c.isspace()]
    m = re.search(r"\s*".join(chars), context)
    return (m.start(), m.end()) if m else None


# ----------------------------------------------------------------------------- NER
def bio_to_entities(tokens: Sequence[str], tags: Sequence[str]) -> list[dict]:
    """Entity spans of a BIO sequence: [{type, text, start, end}] in order (end exclusive).

    An ``I-X`` that does not continue an ``X`` entity starts a new one (the lenient
    IOB2 reading seqeval also uses).
    """
    out: list[dict] = []
    cur: dict | None = None
    for i, tag in enumerate(tags):
        if tag.startswith("B-") or (tag.startswith("I-") and (cur is None or cur["type"] != tag[2:])):
            cur = {"type": tag[2:], "start": i, "end": i + 1}
            out.append(cur)
        elif tag.startswith("I-") and cur is not None:
            cur["end"] = i + 1
        else:  # "O"
            cur = None
    return [{"type": e["type"], "text": " ".join(tokens[e["start"]:e["end"]]), "start": e["start"],
             "end": e["end"]} for e in out]


def entities_to_target(entities: Iterable[dict | tuple[str, str]]) -> str:
    """``"type: text; type: text"`` in the given order, or ``"none"``."""
    items = [f"{e['type']}: {e['text']}" if isinstance(e, dict) else f"{e[0]}: {e[1]}" for e in entities]
    return ENTITY_SEP.join(items) if items else NO_ENTITIES


def labels_to_bio(labels: Sequence[str], keep: dict[str, str]) -> list[str]:
    """Prefix-less labels (one per token) -> BIO tags.

    ``keep`` maps a source label to an entity type; every other label becomes ``O``.
    A run of consecutive tokens with the same kept label is ONE entity (``B-``
    then ``I-``): two adjacent entities of the same type merge, an ambiguity the
    prefix-less source cannot resolve.
    """
    tags: list[str] = []
    prev = None
    for lab in labels:
        typ = keep.get(lab)
        if typ is None:
            tags.append("O")
        else:
            tags.append(("I-" if prev == typ else "B-") + typ)
        prev = typ
    return tags


# -------------------------------------------------------------------------- record
def qa_input(context: str, question: str) -> str:
    return f"Context: {context}\nQuestion: {question}"


def make_record(family: str, *, task: str, lang: str, instruction: str, **fields: Any) -> dict:
    """A record of the shared schema (without ``id``, set when splits are written).

    qa: context, question, answers (empty or ["unanswerable"] -> unanswerable)
    ner: tokens, tags
    classification: text, label, label_set
    Extra keyword fields (e.g. ``source_row``) are appended unchanged.
    """
    rec: dict[str, Any] = {"id": None, "task": task, "family": family, "lang": lang, "instruction": instruction}
    if family == "qa":
        context, question = fields.pop("context"), fields.pop("question")
        answers = list(dict.fromkeys(fields.pop("answers")))  # de-duplicated, order kept
        answerable = bool(answers) and answers != [UNANSWERABLE]
        if not answerable:
            answers = [UNANSWERABLE]
        span = find_span(context, answers[0]) if answerable else None
        rec.update(input=qa_input(context, question), target=answers[0], context=context, question=question,
                   answers=answers, answerable=answerable, answer_start=span[0] if span else -1)
    elif family == "ner":
        tokens, tags = list(fields.pop("tokens")), list(fields.pop("tags"))
        entities = bio_to_entities(tokens, tags)
        rec.update(input=" ".join(tokens), target=entities_to_target(entities), tokens=tokens, tags=tags,
                   entities=entities)
    elif family == "classification":
        text, label = fields.pop("text"), fields.pop("label")
        rec.update(input=text, target=label, text=text, label=label, label_set=list(fields.pop("label_set")))
    else:
        raise DataError(f"unknown task family '{family}'; expected one of {', '.join(FAMILIES)}")
    rec.update(fields)
    return rec


# ---------------------------------------------------------------------- validation
def record_problem(rec: Any, family: str | None = None) -> str | None:
    """Why ``rec`` is not a valid record of the shared schema (``None`` if it is)."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    fam = family or rec.get("family")
    if fam not in FAMILIES:
        return f"unknown family {fam!r}; expected one of {', '.join(FAMILIES)}"
    missing = [k for k in COMMON_KEYS + FAMILY_KEYS[fam] if k not in rec]
    if missing:
        return f"missing key(s) {', '.join(missing)} for a {fam} record"
    for k in ("input", "target", "instruction"):
        if not isinstance(rec[k], str):
            return f"'{k}' should be a string, got {type(rec[k]).__name__}"
    if not rec["target"].strip():
        return "empty target"
    if fam == "qa":
        answers = rec["answers"]
        if not isinstance(answers, list) or not answers:
            return "'answers' should be a non-empty list of strings"
        if any(not isinstance(a, str) or not a.strip() for a in answers):
            return "empty answer in 'answers'"
        if rec["target"] != answers[0]:
            return f"target {rec['target']!r} differs from answers[0] {answers[0]!r}"
    elif fam == "ner":
        tokens, tags = rec["tokens"], rec["tags"]
        if not isinstance(tokens, list) or not isinstance(tags, list):
            return "'tokens' and 'tags' should be lists"
        if len(tokens) != len(tags):
            return f"{len(tokens)} tokens but {len(tags)} tags"
        if not tokens:
            return "no tokens"
        bad = next((t for t in tags if not isinstance(t, str) or not _TAG_RE.match(t)), None)
        if bad is not None:
            return f"tag {bad!r} is not BIO (O, B-TYPE or I-TYPE)"
    else:
        label_set = rec["label_set"]
        if not isinstance(label_set, list) or not label_set:
            return "'label_set' should be a non-empty list"
        if rec["label"] not in label_set:
            return f"label {rec['label']!r} is not in label_set {label_set}"
    return None
