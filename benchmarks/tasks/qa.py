"""Extractive QA: exact match and token F1 with multilingual SQuAD-style normalisation.

:func:`normalize_answer` (rules documented in docs/evaluation.md):

1. Unicode NFKC (folds presentation forms, full-width letters/digits, ligatures).
2. ``str.casefold`` (Unicode lowercasing; no-op for Devanagari/Arabic script).
3. Persian/Arabic unification (applied in every language; it only touches Arabic
   script): Arabic yeh ي and alef maksura ى -> Persian yeh ی; Arabic kaf ك -> Persian
   kaf ک; teh marbuta ة -> heh ه; alefs with hamza/wasla أ إ ٱ -> ا; heh with yeh
   above ۀ -> ه; tatweel ـ and Arabic diacritics (harakat U+064B-U+065F, superscript
   alef U+0670) removed; Arabic-Indic and Persian digits -> ASCII digits.
4. Zero-width non-joiner (U+200C, Persian half-space) -> space; other zero-width /
   format characters (ZWJ, ZWSP, BOM, soft hyphen, bidi marks) removed.
5. Punctuation removed: every character of Unicode category P* (covers the Hindi
   danda ।, Persian comma ، and question mark ؟, guillemets, ...) plus ASCII
   symbols in ``string.punctuation`` (as SQuAD).  Combining marks (Devanagari
   vowel signs, virama, nukta) are letters' parts and are kept.
6. English articles (a, an, the) removed ONLY when the example's ``lang`` is ``en``.
7. Whitespace collapsed (Unicode whitespace) and stripped.

EM = max over gold answers of [norm(pred) == norm(gold)];
F1 = max over gold answers of the bag-of-tokens F1 of the normalised strings.
Unanswerable examples (``answerable`` false, gold ``["unanswerable"]``): both EM and
F1 are 1 when the normalised prediction is ``unanswerable``, else 0 (SQuAD-v2's
no-answer convention with the explicit word the prompt asks for).
"""
from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from typing import Sequence

from benchmarks.tasks.base import SCORERS, Scorer, first_line
from scd.data.records import UNANSWERABLE

_CHAR_MAP = {
    "\u064a": "\u06cc",  # ARABIC LETTER YEH -> ARABIC LETTER FARSI YEH
    "\u0649": "\u06cc",  # ALEF MAKSURA -> FARSI YEH
    "\u0643": "\u06a9",  # ARABIC LETTER KAF -> KEHEH
    "\u0629": "\u0647",  # TEH MARBUTA -> HEH
    "\u0623": "\u0627",  # ALEF WITH HAMZA ABOVE -> ALEF
    "\u0625": "\u0627",  # ALEF WITH HAMZA BELOW -> ALEF
    "\u0671": "\u0627",  # ALEF WASLA -> ALEF
    "\u06c0": "\u0647",  # HEH WITH YEH ABOVE -> HEH
    "\u200c": " ",  # ZERO WIDTH NON-JOINER (Persian half-space) -> space
}
_CHAR_MAP.update({chr(0x0660 + d): str(d) for d in range(10)})  # Arabic-Indic digits
_CHAR_MAP.update({chr(0x06F0 + d): str(d) for d in range(10)})  # Extended Arabic-Indic (Persian) digits
_DROP = {chr(c) for c in range(0x064B, 0x0660)} | {"\u0670", "\u0640"}  # harakat, superscript alef, tatweel
_ASCII_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def _keep(ch: str) -> str:
    if ch in _DROP:
        return ""
    cat = unicodedata.category(ch)
    if cat.startswith("P") or ch in _ASCII_PUNCT:
        return ""
    if cat == "Cf":  # format chars: ZWJ, ZWSP, BOM, soft hyphen, bidi marks (ZWNJ mapped before)
        return ""
    return ch


def normalize_answer(text: str, lang: str = "en") -> str:
    """Normalise an answer string for EM/F1 (see module doc for the rules)."""
    s = unicodedata.normalize("NFKC", text or "").casefold()
    s = "".join(_CHAR_MAP.get(ch, ch) for ch in s)
    s = "".join(_keep(ch) for ch in s)
    if lang == "en":
        s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def token_f1(pred_norm: str, gold_norm: str) -> float:
    """Bag-of-tokens F1 of two normalised strings (1 if both are empty, 0 if one is)."""
    p, g = pred_norm.split(), gold_norm.split()
    if not p or not g:
        return float(p == g)
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def is_unanswerable(example: dict) -> bool:
    if "answerable" in example:
        return not example["answerable"]
    return [a.strip().lower() for a in example.get("answers", [])] == [UNANSWERABLE]


def qa_scores(prediction: str, answers: Sequence[str], lang: str = "en",
              unanswerable: bool = False) -> tuple[float, float]:
    """(EM, F1) of one prediction against its gold answers (max over answers)."""
    pred = normalize_answer(prediction, lang)
    if unanswerable:
        hit = float(pred == normalize_answer(UNANSWERABLE, "en"))
        return hit, hit
    if not answers:
        raise ValueError("qa_scores: no gold answers")
    golds = [normalize_answer(a, lang) for a in answers]
    em = max(float(pred == g) for g in golds)
    f1 = max(token_f1(pred, g) for g in golds)
    return em, f1


def clean_generation(output: str) -> str:
    """The answer part of a generation: its first non-empty line, with a leading
    ``Answer:`` label removed."""
    return re.sub(r"^answer\s*:\s*", "", first_line(output), flags=re.I).strip()


@SCORERS.register("qa")
class QAScorer(Scorer):
    family = "qa"

    def parse(self, example: dict, output: str) -> str:
        return clean_generation(output)

    def per_example(self, examples, predictions) -> list[dict]:
        self._check(examples, predictions)
        out = []
        for ex, p in zip(examples, predictions):
            em, f1 = qa_scores(p["prediction"] or "", ex["answers"], ex.get("lang", "en"), is_unanswerable(ex))
            out.append({"exact_match": em, "f1": f1})
        return out

    def score(self, examples, predictions) -> dict[str, dict]:
        rows = self.per_example(examples, predictions)
        return {
            "exact_match": self.mean_metric([r["exact_match"] for r in rows], higher_is_better=True, chance=0.0,
                                            primary=True),
            "f1": self.mean_metric([r["f1"] for r in rows], higher_is_better=True, chance=0.0, primary=False),
        }
