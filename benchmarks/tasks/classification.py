"""Classification: generations (or label likelihoods) -> labels -> accuracy, macro-F1.

Label mapping of a generation (:func:`map_label`), first rule that applies:

1. exact: the stripped output equals a label;
2. normalised: casefold + punctuation removed + whitespace collapsed equal;
3. word: a label occurs as a whole word (token sequence) in the normalised
   output; if several do, the one mentioned first wins;
4. otherwise the prediction is invalid (``None``): it counts as wrong for
   accuracy and macro-F1 and is reported by ``invalid_rate``.

``scoring: likelihood`` skips generation: each label's continuation (the label
followed by the end-of-turn text, as in training targets) is scored by its summed
log-probability given the prompt and the argmax is the prediction (ties -> first
label of ``label_set``); ``invalid_rate`` is then 0 by construction.

``scoring: calibrated`` is likelihood scoring with contextual calibration (Zhao et
al. 2021, "Calibrate Before Use", arXiv 2102.09690): the same prompt (instruction and
demonstrations) is scored with each content-free input of :data:`CONTENT_FREE`
("N/A", "" and "[MASK]") in place of the example's input; the label distribution
p_cf (softmax of the label log-likelihoods, averaged over the content-free inputs) is
the prompt's label bias, and the prediction is argmax_l log p(l | x) - log p_cf(l)
(their W = diag(p_cf)^-1, b = 0).  It costs |labels| x 3 extra scored continuations
per distinct prompt context, recorded per example as ``calibration``.

Metrics: ``accuracy`` (primary; chance = 1/|labels|), ``f1_macro`` (sklearn,
macro over the labels of ``label_set`` that occur in gold or predictions; chance =
the expected macro-F1 of a uniform random guesser given the gold label
distribution, sum_c 2 p_c q / (p_c + q) / C with q = 1/C, which is 1/C for balanced
classes), ``invalid_rate`` (lower is better; chance 0), and with likelihood or calibrated
scoring ``label_nll``: the mean of -log softmax_labels(scores)[gold] (lower is better; chance
log |labels|, the uniform guess), a proper scoring rule that moves before accuracy does.
Chance-corrected companions of accuracy: ``balanced_accuracy`` (mean recall over the gold
labels; chance 1/#gold labels, what any constant answer scores) and ``cohen_kappa``
(agreement beyond the chance agreement of the gold and predicted label marginals; chance 0).
Accuracy's ``extra`` (run.json ``eval_info[task].extra.accuracy``) profiles the predictions:
``majority_baseline`` (the accuracy of always answering the most frequent gold label: the
floor leaderboards normalise accuracy against), ``max_label_share`` and ``most_predicted``
(the share of all predictions on the most predicted label, and that label) and
``constant`` (max_label_share >= 0.95: a constant predictor, whatever its accuracy).

Label words (a verbalizer, as in PET, Schick & Schuetze 2021): :class:`LabelWords` shows
and scores the model on other words for the task's labels (rotten_tomatoes' ``fresh`` /
``rotten`` as ``positive`` / ``negative``).  :func:`verbalize` rewrites an example (label
set, label, target, instruction) into the words; :func:`unverbalize` maps a prediction
(label, log-likelihoods, calibration) back, so metrics, gold labels and saved predictions
stay in the task's own label space.  Without an explicit ``instruction`` the task's own
instruction is kept with its closing "Answer with exactly one of: ..." rebuilt from the words.
"""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score

from benchmarks.stats import balanced_accuracy_sums, bootstrap_ci, kappa_sums, macro_f1_sums, metric_entry
from benchmarks.tasks.base import SCORERS, Scorer
from benchmarks.tasks.generate import loglik_choices
from scd.data.prompts import render_target
from scd.data.verbalize import LabelWords, verbalize  # noqa: F401  (re-exported: defined in the data layer)
from scd.data.verbalize import norm_label as _norm

INVALID = None
CONTENT_FREE = ("N/A", "", "[MASK]")  # Zhao et al. 2021, section 5
CONSTANT_SHARE = 0.95  # a run with at least this share of its predictions on one label is a constant predictor


def unverbalize(prediction: dict, variant: LabelWords) -> dict:
    """A prediction made on verbalized examples, mapped back to the task's labels."""
    inverse = {w: lab for lab, w in variant.label_words.items()}
    out = dict(prediction)
    if out.get("prediction") is not None:
        out["prediction"] = inverse[out["prediction"]]
    for key in ("logliks", "calibrated", "calibration"):
        if isinstance(out.get(key), Mapping):
            out[key] = {inverse[w]: v for w, v in out[key].items()}
    return out


def content_free_distribution(logliks: Sequence[Sequence[float]]) -> np.ndarray:
    """Mean over content-free inputs of softmax(label log-likelihoods).  [n_cf, L] -> [L]"""
    ll = np.asarray(logliks, dtype=np.float64)
    if ll.ndim != 2 or ll.shape[0] < 1:
        raise ValueError(f"expected [n_content_free, n_labels] log-likelihoods, got shape {ll.shape}")
    p = np.exp(ll - ll.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).mean(axis=0)


def calibrate(logliks: Sequence[float], p_cf: Sequence[float]) -> np.ndarray:
    """Calibrated label scores log softmax(ll) - log p_cf (argmax = the calibrated prediction).  [L] -> [L]"""
    ll = np.asarray(logliks, dtype=np.float64)
    log_p = ll - (ll.max() + np.log(np.exp(ll - ll.max()).sum()))
    return log_p - np.log(np.clip(np.asarray(p_cf, dtype=np.float64), 1e-300, None))


def map_label(output: str, label_set: Sequence[str]) -> tuple[str | None, str]:
    """(label or None, rule) for a generation; rule in exact|normalised|word|invalid."""
    text = (output or "").strip()
    for lab in label_set:
        if text == lab:
            return lab, "exact"
    norm = _norm(text)
    for lab in label_set:
        if norm == _norm(lab):
            return lab, "normalised"
    words = norm.split()
    best: tuple[int, int, str] | None = None  # (position, -len, label)
    for lab in label_set:
        lw = _norm(lab).split()
        if not lw:
            continue
        for i in range(len(words) - len(lw) + 1):
            if words[i:i + len(lw)] == lw:
                cand = (i, -len(lw), lab)
                if best is None or cand < best:
                    best = cand
                break
    if best is not None:
        return best[2], "word"
    return INVALID, "invalid"


def label_nll(scores: dict, gold: str) -> float:
    """-log softmax(scores)[gold] over the label set (scores: label -> log-likelihood or calibrated score)."""
    v = np.asarray(list(scores.values()), dtype=np.float64)
    m = v.max()
    return float(m + np.log(np.exp(v - m).sum()) - scores[gold])


def uniform_guess_macro_f1(gold: Sequence[str], label_set: Sequence[str]) -> float:
    """Expected (large-n) macro-F1 of guessing uniformly at random over ``label_set``."""
    labels = list(label_set)
    c = len(labels)
    if c == 0 or not gold:
        return 0.0
    q = 1.0 / c
    p = np.array([sum(g == lab for g in gold) for lab in labels], dtype=np.float64) / len(gold)
    per_class = np.where(p + q > 0, 2 * p * q / (p + q), 0.0)
    return float(per_class.mean())


def class_counts(gold: Sequence[str], pred: Sequence[str | None], labels: Sequence[str]) -> np.ndarray:
    """Per-example additive counts ``(n, 3C)``: [tp_c..., pred_c..., gold_c...] one-hot."""
    c = len(labels)
    idx = {lab: i for i, lab in enumerate(labels)}
    out = np.zeros((len(gold), 3 * c), dtype=np.float64)
    for r, (g, p) in enumerate(zip(gold, pred)):
        gi, pi = idx.get(g), idx.get(p) if p is not None else None
        if pi is not None:
            out[r, c + pi] = 1
        if gi is not None:
            out[r, 2 * c + gi] = 1
        if gi is not None and gi == pi:
            out[r, gi] = 1
    return out


@SCORERS.register("classification")
class ClassificationScorer(Scorer):
    family = "classification"
    scorings = ("generate", "likelihood", "calibrated")

    def parse(self, example: dict, output: str) -> str | None:
        return map_label(output, example["label_set"])[0]

    def predictions_from_outputs(self, examples, outputs) -> list[dict]:
        preds = super().predictions_from_outputs(examples, outputs)
        for p, ex in zip(preds, examples):
            p["rule"] = map_label(p["output"], ex["label_set"])[1]
        return preds

    def candidates(self, example: dict, tokenizer) -> list[str]:
        """The continuation scored for each label (label + end-of-turn text)."""
        return [render_target({**example, "target": lab, "label": lab}, tokenizer) for lab in example["label_set"]]

    def predict(self, model, tokenizer, examples, *, shots=(), batch_size=8, max_new_tokens=None,
                scoring="generate", progress=True) -> list[dict]:
        self.check_scoring(scoring)
        if scoring == "generate":
            return super().predict(model, tokenizer, examples, shots=shots, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, progress=progress)
        if not examples:
            return []
        prompts = self.prompts(examples, tokenizer, shots)
        cands = [self.candidates(ex, tokenizer) for ex in examples]
        ll = loglik_choices(model, tokenizer, prompts, cands, batch_size=batch_size, progress=progress,
                            desc=f"{examples[0]['task']} (likelihood)")
        if scoring == "likelihood":
            return self.predictions_from_logliks(examples, ll)
        # contextual calibration: one p_cf per distinct (instruction, label set) -- the shots are shared
        p_cf: dict[tuple, np.ndarray] = {}
        for ex in examples:
            key = (ex.get("instruction"), tuple(ex["label_set"]))
            if key in p_cf:
                continue
            free = [{**ex, "input": text, "id": f"content-free-{i}"} for i, text in enumerate(CONTENT_FREE)]
            cf_ll = loglik_choices(model, tokenizer, self.prompts(free, tokenizer, shots),
                                   [self.candidates(f, tokenizer) for f in free], batch_size=batch_size,
                                   progress=False)
            p_cf[key] = content_free_distribution(cf_ll)
        cal = []
        for ex, scores in zip(examples, ll):
            cal.append(calibrate(scores, p_cf[(ex.get("instruction"), tuple(ex["label_set"]))]).tolist())
        preds = self.predictions_from_logliks(examples, cal)
        for p, ex, raw in zip(preds, examples, ll):
            p["rule"] = "calibrated"
            p["calibrated"] = p.pop("logliks")
            p["logliks"] = {lab: float(s) for lab, s in zip(ex["label_set"], raw)}
            p["calibration"] = {lab: float(q) for lab, q in
                                zip(ex["label_set"], p_cf[(ex.get("instruction"), tuple(ex["label_set"]))])}
        return preds

    @staticmethod
    def predictions_from_logliks(examples, logliks: Sequence[Sequence[float]]) -> list[dict]:
        out = []
        for ex, scores in zip(examples, logliks):
            labels = list(ex["label_set"])
            if len(scores) != len(labels):
                raise ValueError(f"{len(scores)} scores for {len(labels)} labels of {ex.get('id')}")
            best = int(np.argmax(np.asarray(scores, dtype=np.float64)))  # ties -> first label
            out.append({"id": ex.get("id"), "output": None, "prediction": labels[best], "rule": "likelihood",
                        "logliks": {lab: float(s) for lab, s in zip(labels, scores)}})
        return out

    def per_example(self, examples, predictions) -> list[dict]:
        self._check(examples, predictions)
        return [{"correct": float(p["prediction"] == ex["label"]), "invalid": float(p["prediction"] is None)}
                for ex, p in zip(examples, predictions)]

    def score(self, examples, predictions) -> dict[str, dict]:
        self._check(examples, predictions)
        n = len(examples)
        label_set = list(examples[0]["label_set"]) if examples else []
        for ex in examples:
            if list(ex["label_set"]) != label_set:
                raise ValueError(f"example {ex.get('id')} has label_set {ex['label_set']}, expected {label_set}")
        gold = [ex["label"] for ex in examples]
        pred = [p["prediction"] for p in predictions]
        pred_s = ["\0invalid" if p is None else p for p in pred]  # never equal to a label
        chance_acc = 1.0 / len(label_set) if label_set else 0.0

        acc = float(accuracy_score(gold, pred_s)) if n else float("nan")
        acc_ci = bootstrap_ci([float(g == p) for g, p in zip(gold, pred_s)], n_boot=self.n_boot, seed=self.seed)
        present = [lab for lab in label_set if lab in gold or lab in pred]
        f1 = float(f1_score(gold, pred_s, labels=present, average="macro", zero_division=0)) if n else float("nan")
        counts = class_counts(gold, pred, label_set)  # (n, 3C)
        f1_ci = bootstrap_ci(counts, sum_fn=macro_f1_sums(len(label_set)), n_boot=self.n_boot, seed=self.seed)
        invalid = [float(p is None) for p in pred]
        inv = self.mean_metric(invalid, higher_is_better=False, chance=0.0, primary=False)
        extra = {}
        if n and all(isinstance(p.get("calibrated", p.get("logliks")), dict) for p in predictions):
            # likelihood scoring: the gold label's negative log-probability under the label-set softmax
            nll = [label_nll(p.get("calibrated", p.get("logliks")), ex["label"]) for ex, p in zip(examples, predictions)]
            extra["label_nll"] = self.mean_metric(nll, higher_is_better=False, chance=round(float(np.log(len(label_set))), 6),
                                                  primary=False)
        return {
            "accuracy": {**metric_entry(acc, n, acc_ci), "higher_is_better": True, "chance": chance_acc,
                         "primary": True, "extra": prediction_profile(gold, pred, label_set)},
            **self.chance_corrected(gold, pred_s, counts, label_set),
            "f1_macro": {**metric_entry(f1, n, f1_ci), "higher_is_better": True,
                         "chance": round(uniform_guess_macro_f1(gold, label_set), 6), "primary": False},
            "invalid_rate": inv,
            **extra,
        }

    def chance_corrected(self, gold: list, pred_s: list, counts: np.ndarray, label_set: list) -> dict[str, dict]:
        """``balanced_accuracy`` (mean recall over the gold labels; a constant answer scores 1/#gold labels)
        and ``cohen_kappa`` (agreement beyond the chance agreement of the two label marginals; a constant
        answer scores 0), both by sklearn, with bootstrap CIs from the per-example class counts."""
        n, c = len(gold), len(label_set)
        with warnings.catch_warnings():  # invalid answers are a class absent from gold; kappa is 0/0 then
            warnings.simplefilter("ignore")
            bal = float(balanced_accuracy_score(gold, pred_s)) if n else float("nan")
            kappa = float(cohen_kappa_score(gold, pred_s)) if n else float("nan")
        n_gold_labels = len(set(gold)) or 1
        bal_ci = bootstrap_ci(counts, sum_fn=balanced_accuracy_sums(c), n_boot=self.n_boot, seed=self.seed)
        kappa_ci = bootstrap_ci(counts, sum_fn=kappa_sums(c), n_boot=self.n_boot, seed=self.seed)
        return {
            "balanced_accuracy": {**metric_entry(bal, n, bal_ci), "higher_is_better": True,
                                  "chance": round(1.0 / n_gold_labels, 6), "primary": False},
            "cohen_kappa": {**metric_entry(kappa, n, kappa_ci), "higher_is_better": True, "chance": 0.0,
                            "primary": False},
        }


def prediction_profile(gold: Sequence[str], pred: Sequence[str | None], label_set: Sequence[str]) -> dict:
    """What a constant answer scores and how close the predictions are to one:
    ``majority_baseline`` (accuracy of always answering the most frequent gold label, the floor of
    accuracy), ``max_label_share`` (share of all predictions on the most predicted label; ties -> the
    first label of ``label_set``), ``most_predicted`` and ``constant`` (max_label_share >= CONSTANT_SHARE)."""
    n = len(gold)
    majority = max((list(gold).count(lab) for lab in label_set), default=0) / n if n else float("nan")
    per_label = [sum(p == lab for p in pred) for lab in label_set]
    top = int(np.argmax(per_label)) if per_label else 0
    share = round(per_label[top] / n, 6) if n and per_label else 0.0
    return {"majority_baseline": round(majority, 6), "max_label_share": share,
            "most_predicted": label_set[top] if per_label and per_label[top] else None,
            "constant": bool(share >= CONSTANT_SHARE)}
