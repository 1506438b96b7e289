"""NER: generated entity list -> spans -> BIO over the original tokens -> seqeval.

Per example: ``scd.data.prompts.parse_entities(output)`` reads ``"type: text; ..."``
items, ``entities_to_bio(tokens, entities)`` places each entity on the first
matching unused token span (entities whose text is not in the sentence cannot be
placed and are dropped; their share is reported as ``extra.unplaced_rate``).

* parse failure: the output yields no ``type: text`` item and is not the explicit
  ``none`` answer (empty output counts as a failure).  A failed parse counts as
  "no entities" for the F1 scores and is reported as ``parse_failure_rate``
  (lower is better).
* ``f1_micro`` (primary) and ``f1_macro``: seqeval, default (conlleval) mode,
  entity level; macro = mean over the entity types that occur in gold or
  predictions (a predicted type the task does not have is a type of its own and
  its predictions are false positives).  ``extra.per_type`` holds seqeval's
  per-type precision / recall / F1 / support.  Chance level 0.
* CIs: bootstrap over sentences of per-sentence (tp, predicted, gold) entity
  counts, overall (micro) and per type (macro).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from benchmarks.stats import bootstrap_ci, macro_f1_sums, metric_entry, micro_f1_sums
from benchmarks.tasks.base import SCORERS, Scorer

NONE_ANSWERS = ("none",)


def _is_none_answer(output: str) -> bool:
    return (output or "").strip().strip(" .\"'`").casefold() in NONE_ANSWERS


def parse_ner_output(output: str, tokens: Sequence[str]) -> dict:
    """{entities: [(type, text)], tags: BIO, failed: bool, unplaced: int}."""
    from scd.data.prompts import entities_to_bio, parse_entities

    ents = parse_entities(output or "")
    failed = not ents and not _is_none_answer(output)
    tags = entities_to_bio(list(tokens), ents)
    placed = sum(t.startswith("B-") for t in tags)
    return {"entities": [list(e) for e in ents], "tags": tags, "failed": failed,
            "unplaced": max(0, len(ents) - placed)}


def entity_sets(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """seqeval's entity chunks of one sentence as {(type, start, end_inclusive)}."""
    from seqeval.metrics.sequence_labeling import get_entities

    return set(get_entities(list(tags)))


def ner_counts(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per-sentence counts: micro ``(n, 3)`` [tp, pred, gold] and per-type ``(n, 3T)``."""
    g_sets = [entity_sets(g) for g in gold]
    p_sets = [entity_sets(p) for p in pred]
    types = sorted({e[0] for s in g_sets + p_sets for e in s})
    col = {t: i for i, t in enumerate(types)}
    T = len(types)
    micro = np.zeros((len(gold), 3))
    per_type = np.zeros((len(gold), 3 * T))
    for r, (g, p) in enumerate(zip(g_sets, p_sets)):
        tp = g & p
        micro[r] = (len(tp), len(p), len(g))
        for e in tp:
            per_type[r, col[e[0]]] += 1
        for e in p:
            per_type[r, T + col[e[0]]] += 1
        for e in g:
            per_type[r, 2 * T + col[e[0]]] += 1
    return micro, per_type, types


@SCORERS.register("ner")
class NERScorer(Scorer):
    family = "ner"

    def parse(self, example: dict, output: str) -> list:
        return parse_ner_output(output, example["tokens"])["entities"]

    def predictions_from_outputs(self, examples, outputs) -> list[dict]:
        preds = super().predictions_from_outputs(examples, outputs)
        for p, ex in zip(preds, examples):
            parsed = parse_ner_output(p["output"], ex["tokens"])
            p.update(tags=parsed["tags"], parse_failed=parsed["failed"], unplaced=parsed["unplaced"])
        return preds

    def _tags(self, ex: dict, p: dict) -> tuple[list[str], bool, int]:
        if "tags" in p and "parse_failed" in p:
            return list(p["tags"]), bool(p["parse_failed"]), int(p.get("unplaced", 0))
        parsed = parse_ner_output(p.get("output") or "", ex["tokens"])
        return parsed["tags"], parsed["failed"], parsed["unplaced"]

    def per_example(self, examples, predictions) -> list[dict]:
        self._check(examples, predictions)
        rows = []
        for ex, p in zip(examples, predictions):
            tags, failed, _ = self._tags(ex, p)
            g, q = entity_sets(ex["tags"]), entity_sets(tags)
            tp = len(g & q)
            rows.append({"tp": tp, "n_pred": len(q), "n_gold": len(g), "parse_failed": float(failed)})
        return rows

    def score(self, examples, predictions) -> dict[str, dict]:
        from seqeval.metrics import classification_report, f1_score

        self._check(examples, predictions)
        n = len(examples)
        gold = [list(ex["tags"]) for ex in examples]
        parsed = [self._tags(ex, p) for ex, p in zip(examples, predictions)]
        pred = [t for t, _, _ in parsed]
        for ex, t in zip(examples, pred):
            if len(t) != len(ex["tags"]):
                raise ValueError(f"{ex.get('id')}: {len(t)} predicted tags for {len(ex['tags'])} tokens")
        micro_c, type_c, types = ner_counts(gold, pred)
        if n:
            f1_micro = float(f1_score(gold, pred, average="micro", zero_division=0))
            f1_macro = float(f1_score(gold, pred, average="macro", zero_division=0)) if types else 0.0
            report = classification_report(gold, pred, output_dict=True, zero_division=0) if types else {}
        else:
            f1_micro = f1_macro = float("nan")
            report = {}
        per_type = {t: {k: (round(float(v), 6) if k != "support" else int(v)) for k, v in r.items()}
                    for t, r in report.items() if t in types}
        ci_micro = bootstrap_ci(micro_c, sum_fn=micro_f1_sums, n_boot=self.n_boot, seed=self.seed)
        ci_macro = (bootstrap_ci(type_c, sum_fn=macro_f1_sums(len(types)), n_boot=self.n_boot, seed=self.seed)
                    if types else (0.0, 0.0))
        n_items = sum(len(p.get("prediction") or []) for p in predictions)
        unplaced = sum(u for _, _, u in parsed)
        extra = {"per_type": per_type, "n_gold_entities": int(micro_c[:, 2].sum()),
                 "n_pred_entities": int(micro_c[:, 1].sum()),
                 "unplaced_rate": round(unplaced / n_items, 6) if n_items else 0.0}
        return {
            "f1_micro": {**metric_entry(f1_micro, n, ci_micro), "higher_is_better": True, "chance": 0.0,
                         "primary": True, "extra": extra},
            "f1_macro": {**metric_entry(f1_macro, n, ci_macro), "higher_is_better": True, "chance": 0.0,
                         "primary": False},
            "parse_failure_rate": self.mean_metric([float(f) for _, f, _ in parsed], higher_is_better=False,
                                                   chance=0.0, primary=False),
        }
