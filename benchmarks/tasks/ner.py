"""NER: generated entity list -> spans -> BIO over the original tokens -> entity-level F1.

Per example: ``scd.data.prompts.parse_entities(output)`` reads ``"type: text; ..."``
items, ``entities_to_bio(tokens, entities)`` places each entity on the first
matching unused token span.  An entity whose text is not in the sentence cannot be
placed: it is a false positive of its type (a hallucinated entity lowers precision;
it is not dropped), and the share of such entities is reported as
``extra.unplaced_rate``.

* parse failure: the output yields no ``type: text`` item and is not the explicit
  ``none`` answer (empty output counts as a failure).  A failed parse counts as
  "no entities" for the F1 scores and is reported as ``parse_failure_rate``
  (lower is better).
* ``f1_micro`` (primary) and ``f1_macro``: entity level, chunks read by seqeval's
  default (conlleval) mode from the placed BIO tags, plus the unplaced entities as
  predictions that match nothing; F1 = 2 tp / (predicted + gold).  Without unplaced
  entities this is seqeval's ``f1_score`` (tested).  Macro = mean over the entity
  types that occur in gold or predictions (a predicted type the task does not have is
  a type of its own and its predictions are false positives).  ``extra.per_type``
  holds per-type precision / recall / F1 / support.  Chance level 0.
* CIs: bootstrap over sentences of per-sentence (tp, predicted, gold) entity
  counts, overall (micro) and per type (macro).
* constant predictor: ``extra`` of ``f1_micro`` holds ``max_label_share`` (the share of
  sentences whose entity list is the most frequent one, ``"none"`` for no entity),
  ``most_predicted`` and ``constant`` (share >= 0.95, the classification rule): a model
  that answers "none" for nearly every tweet is flagged as a constant predictor, whatever
  its F1.
"""
from __future__ import annotations

import collections
from typing import Sequence

import numpy as np
from seqeval.metrics.sequence_labeling import get_entities

from benchmarks.stats import bootstrap_ci, f1_from_counts, macro_f1_sums, metric_entry, micro_f1_sums, safe_div
from benchmarks.tasks.base import SCORERS, Scorer
from benchmarks.tasks.classification import CONSTANT_SHARE
from scd.data.prompts import entities_to_bio, parse_entities

NONE_ANSWERS = ("none",)


def _is_none_answer(output: str) -> bool:
    return (output or "").strip().strip(" .\"'`").casefold() in NONE_ANSWERS


def _n_placed(tags: Sequence[str]) -> int:
    return sum(t.startswith("B-") for t in tags)


def parse_ner_output(output: str, tokens: Sequence[str]) -> dict:
    """{entities: [(type, text)], tags: BIO, failed: bool, unplaced: int, unplaced_types: [type]}.

    ``unplaced_types`` lists, in predicted order, the type of each entity that could not
    be placed on the sentence (placement is sequential, so entity k is unplaced exactly
    when placing the first k + 1 entities adds no span to the first k).
    """
    ents = parse_entities(output or "")
    failed = not ents and not _is_none_answer(output)
    tags = entities_to_bio(list(tokens), ents)
    unplaced_types, placed = [], 0
    if _n_placed(tags) < len(ents):
        for k, (typ, _) in enumerate(ents):
            now = _n_placed(entities_to_bio(list(tokens), ents[:k + 1]))
            if now == placed:
                unplaced_types.append(typ)
            placed = now
    return {"entities": [list(e) for e in ents], "tags": tags, "failed": failed,
            "unplaced": len(unplaced_types), "unplaced_types": unplaced_types}


def entity_sets(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """seqeval's entity chunks of one sentence as {(type, start, end_inclusive)}."""
    return set(get_entities(list(tags)))


def ner_counts(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]],
               unplaced: Sequence[Sequence[str]] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per-sentence counts: micro ``(n, 3)`` [tp, pred, gold] and per-type ``(n, 3T)``.

    ``unplaced[r]``: types of sentence r's predicted entities that are not in the
    sentence; each adds one prediction (a false positive) of its type.
    """
    unplaced = unplaced if unplaced is not None else [[] for _ in gold]
    g_sets = [entity_sets(g) for g in gold]
    p_sets = [entity_sets(p) for p in pred]
    types = sorted({e[0] for s in g_sets + p_sets for e in s} | {t for u in unplaced for t in u})
    col = {t: i for i, t in enumerate(types)}
    T = len(types)
    micro = np.zeros((len(gold), 3))
    per_type = np.zeros((len(gold), 3 * T))
    for r, (g, p, u) in enumerate(zip(g_sets, p_sets, unplaced)):
        tp = g & p
        micro[r] = (len(tp), len(p) + len(u), len(g))
        for e in tp:
            per_type[r, col[e[0]]] += 1
        for t in [e[0] for e in p] + list(u):
            per_type[r, T + col[t]] += 1
        for e in g:
            per_type[r, 2 * T + col[e[0]]] += 1
    return micro, per_type, types


def per_type_report(per_type: np.ndarray, types: Sequence[str]) -> dict[str, dict]:
    """Summed per-type counts ``(3T,)`` -> {type: precision, recall, f1-score, support}."""
    T = len(types)
    tp, pred, gold = per_type[:T], per_type[T:2 * T], per_type[2 * T:]  # each (T,)
    p, r, f = safe_div(tp, pred), safe_div(tp, gold), f1_from_counts(tp, pred, gold)
    return {t: {"precision": round(float(p[i]), 6), "recall": round(float(r[i]), 6),
                "f1-score": round(float(f[i]), 6), "support": int(gold[i])} for i, t in enumerate(types)}


def answer_key(entities: Sequence[Sequence[str]]) -> str:
    """One sentence's predicted entity list as a string (``"none"`` when empty): the 'label' whose
    share decides whether a NER run is a constant predictor."""
    return "; ".join(f"{t}: {x}" for t, x in entities) or "none"


def answer_profile(keys: Sequence[str]) -> dict:
    """``max_label_share`` (share of the most frequent answer; ties -> the first seen),
    ``most_predicted`` and ``constant`` (share >= CONSTANT_SHARE) of per-sentence answer keys."""
    if not keys:
        return {"max_label_share": 0.0, "most_predicted": None, "constant": False}
    (top, count), = collections.Counter(keys).most_common(1)
    share = round(count / len(keys), 6)
    return {"max_label_share": share, "most_predicted": top, "constant": bool(share >= CONSTANT_SHARE)}


@SCORERS.register("ner")
class NERScorer(Scorer):
    family = "ner"

    def parse(self, example: dict, output: str) -> list:
        return parse_ner_output(output, example["tokens"])["entities"]

    def predictions_from_outputs(self, examples, outputs) -> list[dict]:
        preds = super().predictions_from_outputs(examples, outputs)
        for p, ex in zip(preds, examples):
            parsed = parse_ner_output(p["output"], ex["tokens"])
            p.update(tags=parsed["tags"], parse_failed=parsed["failed"], unplaced=parsed["unplaced"],
                     unplaced_types=parsed["unplaced_types"])
        return preds

    def _parsed(self, ex: dict, p: dict) -> dict:
        """One prediction's parse (:func:`parse_ner_output`'s keys): the fields its record saved, else one parse of
        its output."""
        if isinstance(p.get("prediction"), list) and all(k in p for k in ("tags", "parse_failed", "unplaced_types")):
            return {"entities": p["prediction"], "tags": list(p["tags"]), "failed": bool(p["parse_failed"]),
                    "unplaced_types": list(p["unplaced_types"])}
        return parse_ner_output(p.get("output") or "", ex["tokens"])

    def per_example(self, examples, predictions) -> list[dict]:
        self._check(examples, predictions)
        rows = []
        for ex, p in zip(examples, predictions):
            parsed = self._parsed(ex, p)
            g, q = entity_sets(ex["tags"]), entity_sets(parsed["tags"])
            rows.append({"tp": len(g & q), "n_pred": len(q) + len(parsed["unplaced_types"]), "n_gold": len(g),
                         "parse_failed": float(parsed["failed"])})
        return rows

    def score(self, examples, predictions) -> dict[str, dict]:
        self._check(examples, predictions)
        n = len(examples)
        gold = [list(ex["tags"]) for ex in examples]
        parsed = [self._parsed(ex, p) for ex, p in zip(examples, predictions)]
        pred = [q["tags"] for q in parsed]
        for ex, t in zip(examples, pred):
            if len(t) != len(ex["tags"]):
                raise ValueError(f"{ex.get('id')}: {len(t)} predicted tags for {len(ex['tags'])} tokens")
        micro_c, type_c, types = ner_counts(gold, pred, [q["unplaced_types"] for q in parsed])
        if n:
            f1_micro = float(micro_f1_sums(micro_c.sum(0, keepdims=True))[0])
            f1_macro = float(macro_f1_sums(len(types))(type_c.sum(0, keepdims=True))[0]) if types else 0.0
        else:
            f1_micro = f1_macro = float("nan")
        ci_micro = bootstrap_ci(micro_c, sum_fn=micro_f1_sums, n_boot=self.n_boot, seed=self.seed)
        ci_macro = (bootstrap_ci(type_c, sum_fn=macro_f1_sums(len(types)), n_boot=self.n_boot, seed=self.seed)
                    if types else (0.0, 0.0))
        n_items = sum(len(q["entities"]) for q in parsed)
        unplaced = sum(len(q["unplaced_types"]) for q in parsed)
        keys = [answer_key(q["entities"]) for q in parsed]
        extra = {"per_type": per_type_report(type_c.sum(0), types) if n else {}, **answer_profile(keys),
                 "n_gold_entities": int(micro_c[:, 2].sum()), "n_pred_entities": int(micro_c[:, 1].sum()),
                 "n_unplaced_entities": int(unplaced),
                 "unplaced_rate": round(unplaced / n_items, 6) if n_items else 0.0}
        return {
            "f1_micro": {**metric_entry(f1_micro, n, ci_micro), "higher_is_better": True, "chance": 0.0,
                         "primary": True, "extra": extra},
            "f1_macro": {**metric_entry(f1_macro, n, ci_macro), "higher_is_better": True, "chance": 0.0,
                         "primary": False},
            "parse_failure_rate": self.mean_metric([float(q["failed"]) for q in parsed], higher_is_better=False,
                                                   chance=0.0, primary=False),
        }
