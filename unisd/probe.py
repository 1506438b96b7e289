"""Teacher-advantage probe: does the in-context teacher know more than the student?

Self-distillation can only transfer what the teacher (the same model with the reference answer in its
prompt, :mod:`unisd.prompts`) knows and the student (the task prompt alone) does not.  For a model, a
task split, a teacher ``template`` and an answer format (label words, :class:`scd.data.label_words.LabelWords`)
this scores every example's reference answer under both prompts with the evaluation layer's
log-likelihoods (:func:`benchmarks.tasks.generate.loglik_choices`: the answer text + end of turn, as
``benchmarks.evaluate --scoring likelihood``) and reports, for the student, the teacher and the paired
difference teacher - student (percentile bootstrap CIs over examples, :func:`benchmarks.stats.bootstrap_ci`,
the same resamples for every row):

* ``accuracy``  -- the gold label has the highest log-likelihood among the labels (classification);
* ``p_gold``    -- p(gold label) after normalising over the labels (classification);
* ``nll``       -- the reference answer's negative log-likelihood per token (every task);

plus p(gold) by gold label and the majority rate.  Writes ``probe.json`` and ``probe.md``::

    python -m unisd.probe --model smollm2-135m --task rotten_tomatoes --split dev --limit 200 \\
        [--template released|ours] [--label-words fresh=positive,rotten=negative] [--shots 3] [--out DIR]
    python -m unisd.probe --config configs/unisd/study_cpu.yaml [--model RUN/model] --split dev --limit 200

``--config`` probes a UniSD config's training setting: its model, the task's label words and instruction
(``data.prompts``), its few-shot demonstrations (``data.shots``: both prompts open with them, as in training)
and the in-context teacher's ``template``; the flags override it.

``--model`` is any ``model.name`` (a cache name, a folder such as a run's ``model/``, or ``tiny``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from benchmarks.stats import bootstrap_ci
from benchmarks.tasks.generate import encode_pair, loglik_choices
from scd.core.config import ConfigError, load_config
from scd.core.results import atomic_write_text
from scd.data.label_words import LabelWords, verbalize
from scd.data.load import load_split
from scd.data.prompts import render_prompt, render_target
from scd.data_config import load_shots, task_shots
from scd.models import ModelConfig, build_model
from unisd.prompts import check_template, teacher_prompt

SCHEMA = 1
METRICS = {"accuracy": "higher", "p_gold": "higher", "nll": "lower"}


def label_probs(ll: Sequence[float]) -> np.ndarray:
    """Softmax over the candidates' log-likelihoods.  [C] -> [C]."""
    z = np.asarray(ll, dtype=np.float64)
    p = np.exp(z - z.max())
    return p / p.sum()


def candidates(example: dict, tokenizer) -> tuple[list[str], int]:
    """(continuations, gold index): every label's target text for classification, else the reference."""
    labels = example.get("label_set")
    if labels:
        return [render_target({**example, "target": lab}, tokenizer) for lab in labels], list(labels).index(
            example["target"])
    return [render_target(example, tokenizer)], 0


def score(model, tokenizer, examples: Sequence[dict], contexts: Sequence[str], *,
          batch_size: int = 8, desc: str = "probe") -> dict[str, np.ndarray]:
    """Per example: ``nll`` per reference token, and for classification ``correct`` and ``p_gold``."""
    cands = [candidates(ex, tokenizer) for ex in examples]
    ll = loglik_choices(model, tokenizer, list(contexts), [c for c, _ in cands], batch_size=batch_size,
                        desc=desc)
    n_tok = [len(encode_pair(tokenizer, ctx, c[g])[1]) for ctx, (c, g) in zip(contexts, cands)]
    out = {"nll": np.array([-row[g] / n for row, (_, g), n in zip(ll, cands, n_tok)])}
    if all(ex.get("label_set") for ex in examples):
        probs = [label_probs(row) for row in ll]
        out["correct"] = np.array([float(int(np.argmax(row)) == g) for row, (_, g) in zip(ll, cands)])
        out["p_gold"] = np.array([p[g] for p, (_, g) in zip(probs, cands)])
    return out


def summary(values: np.ndarray, *, n_boot: int, seed: int) -> dict:
    """{value: mean, ci: [lo, hi]} (percentile bootstrap over examples)."""
    lo, hi = bootstrap_ci(values, n_boot=n_boot, seed=seed)
    return {"value": float(np.mean(values)), "ci": [lo, hi]}


def probe(model, tokenizer, examples: Sequence[dict], *, template: str = "released", shots: Sequence[dict] = (),
          batch_size: int = 8, n_boot: int = 1000, seed: int = 0) -> dict:
    """The probe report of ``examples`` (already in their answer format; ``shots``: the few-shot
    demonstrations both prompts open with, as in training); see the module doc."""
    check_template(template)
    model.eval()
    student = score(model, tokenizer, examples, [render_prompt(ex, tokenizer, shots=shots) for ex in examples],
                    batch_size=batch_size, desc="probe: student")
    teacher = score(model, tokenizer, examples,
                    [teacher_prompt(ex, tokenizer, template=template, shots=shots) for ex in examples],
                    batch_size=batch_size, desc="probe: teacher")
    keys = [("accuracy", "correct"), ("p_gold", "p_gold"), ("nll", "nll")]
    rows: dict[str, dict] = {"student": {}, "teacher": {}, "difference": {}}
    for name, key in keys:
        if key in student:
            rows["student"][name] = summary(student[key], n_boot=n_boot, seed=seed)
            rows["teacher"][name] = summary(teacher[key], n_boot=n_boot, seed=seed)
            rows["difference"][name] = summary(teacher[key] - student[key], n_boot=n_boot, seed=seed)
    report = {"schema": SCHEMA, "n": len(examples), "template": template, "shots": len(shots), "n_boot": n_boot,
              "seed": seed,
              "higher_is_better": {k: v == "higher" for k, v in METRICS.items()}, **rows}
    if "p_gold" in student:
        gold = [ex["target"] for ex in examples]
        labels = list(dict.fromkeys(lab for ex in examples for lab in ex["label_set"]))
        report["by_label"] = {lab: {"n": gold.count(lab),
                                    "student_p_gold": _mean_where(student["p_gold"], gold, lab),
                                    "teacher_p_gold": _mean_where(teacher["p_gold"], gold, lab)} for lab in labels}
        report["majority_rate"] = max(gold.count(lab) for lab in labels) / len(gold)
    return report


def _mean_where(values: np.ndarray, gold: list[str], label: str) -> float | None:
    sel = [v for v, g in zip(values, gold) if g == label]
    return float(np.mean(sel)) if sel else None


def _fmt(entry: dict, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    lo, hi = entry["ci"]
    return f"{f.format(entry['value'])} [{f.format(lo)}, {f.format(hi)}]"


def to_markdown(report: dict) -> str:
    """The report as a markdown note (the numbers are those of probe.json)."""
    names = list(report["student"])
    head = f"# Teacher-advantage probe: {report.get('model', '?')} on {report.get('task', '?')}/{report.get('split', '?')}"
    words = json.dumps(report["label_words"]) if report.get("label_words") else "the task's own"
    lines = [head, "",
             f"n = {report['n']}; teacher template `{report['template']}`; label words {words}; "
             f"{report.get('shots', 0)} few-shot demos in both prompts; "
             f"95 % percentile bootstrap CIs ({report['n_boot']} resamples, seed {report['seed']}), paired by example.",
             "", "| prompt | " + " | ".join(f"{n} ({'↑' if METRICS[n] == 'higher' else '↓'})" for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    for row, label in (("student", "student (task prompt)"), ("teacher", "teacher (+ reference answer)"),
                       ("difference", "teacher − student")):
        lines.append(f"| {label} | " + " | ".join(_fmt(report[row][n], row == "difference") for n in names) + " |")
    if "by_label" in report:
        lines += ["", "| gold label | n | student p(gold) | teacher p(gold) |", "|---|---:|---:|---:|"]
        for lab, e in report["by_label"].items():
            cells = [f"{e[k]:.3f}" if e[k] is not None else "—" for k in ("student_p_gold", "teacher_p_gold")]
            lines.append(f"| {lab} | {e['n']} | {cells[0]} | {cells[1]} |")
        lines += ["", f"Majority rate: {report['majority_rate']:.3f}."]
    lines += ["", f"Command: `{report['command']}`" if report.get("command") else ""]
    return "\n".join(lines).rstrip() + "\n"


def parse_label_words(text: str | None) -> LabelWords | None:
    """``fresh=positive,rotten=negative`` -> LabelWords (None: the task's own words)."""
    if not text:
        return None
    pairs = [p.split("=", 1) for p in text.split(",")]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"--label-words: expected label=word[,label=word...], got {text!r}")
    return LabelWords(label_words={k.strip(): v.strip() for k, v in pairs})


def resolve_setting(args: argparse.Namespace) -> dict:
    """{model (a ModelConfig), task, words, template, shots}: the flags, else ``--config``'s training setting, else
    the defaults."""
    model, task, words, template, shots = ModelConfig(name="smollm2-135m"), "rotten_tomatoes", None, "released", ()
    if args.config:
        cfg = load_config(args.config)
        if not all(hasattr(cfg, k) for k in ("data", "model", "components")):
            raise ValueError(f"{args.config}: --config takes a UniSD config (recipe: unisd), got recipe "
                             f"'{getattr(cfg, 'recipe', '?')}'")
        model, task = dataclasses.replace(cfg.model, lora=None), args.task or cfg.data.tasks[0]  # no adapters
        words = cfg.data.prompts.get(task)
        teacher = cfg.components.get("in_context_teacher")
        template = (teacher or {}).get("template", template) if isinstance(teacher, dict) else template
        shots = tuple(load_shots(cfg.data).get(task, ()))
    model, task = ModelConfig(name=args.model) if args.model else model, args.task or task
    if args.label_words is not None:
        words = parse_label_words(args.label_words)
    template = check_template(args.template or template)
    if args.shots is not None:
        shots = tuple(task_shots(task, args.shots, words))
    return {"model": model, "task": task, "words": words, "template": template, "shots": shots}


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "probe.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "probe.md", to_markdown(report))


def summarize(root: Path) -> str:
    """The grid of probes under ``root`` (``*/probe.json``) as one markdown table -> ``root/grid.md`` and
    ``root/grid.json`` (one row per probe folder; numbers as in each probe.json)."""
    rows = []
    for path in sorted(Path(root).glob("*/probe.json")):
        r = json.loads(path.read_text(encoding="utf-8"))
        rows.append({"setting": path.parent.name, "model": r.get("model"), "task": r.get("task"),
                     "split": r.get("split"), "n": r["n"], "template": r["template"],
                     "label_words": r.get("label_words"), "shots": r.get("shots", 0),
                     "majority_rate": r.get("majority_rate"),
                     "student": r["student"], "teacher": r["teacher"], "difference": r["difference"]})
    if not rows:
        raise ValueError(f"{root}: no */probe.json")
    names = [n for n in METRICS if any(n in r["difference"] for r in rows)]  # generation tasks have nll only
    lines = [f"# Teacher-advantage probes: {Path(root).name}", "",
             "Generated by `python -m unisd.probe --summarize " + str(root) + "` from the probe.json files (do not "
             "edit by hand).  Teacher = the in-context teacher (reference answer in its prompt); Δ = teacher − "
             "student, paired by example, 95 % bootstrap CI.", "",
             "| setting | task/split | n | template | label words | shots | majority | student acc | teacher acc | "
             + " | ".join(f"Δ {n}" for n in names) + " |", "|---|---|---:|---|---|---:|---:|---:|---:|" + "---|" * len(names)]
    for r in rows:
        words = ", ".join(f"{k}→{v}" for k, v in r["label_words"].items()) if r["label_words"] else "own"
        maj = f"{r['majority_rate']:.3f}" if r.get("majority_rate") is not None else "-"
        acc = [f"{r[k]['accuracy']['value']:.3f}" if "accuracy" in r[k] else "-" for k in ("student", "teacher")]
        lines.append(f"| {r['setting']} | {r['task']}/{r['split']} | {r['n']} | {r['template']} | {words} | {r['shots']} | {maj} | "
                     f"{acc[0]} | {acc[1]} | " + " | ".join(_fmt(r["difference"][n], True) if n in r["difference"] else "-" for n in names) + " |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(Path(root) / "grid.md", text)
    atomic_write_text(Path(root) / "grid.json", json.dumps(rows, indent=2) + "\n")
    return text


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m unisd.probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, help="a UniSD config: probe its training setting (model, the task's "
                    "label words and instruction, few-shot demos, the in-context teacher's template); the flags "
                    "below override it")
    ap.add_argument("--model", default=None, help="model.name: cache name, folder, or tiny (default smollm2-135m)")
    ap.add_argument("--task", default=None, help="default: the config's first task, else rotten_tomatoes")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--limit", type=int, default=200, help="first N examples of the split")
    ap.add_argument("--template", default=None, help="released (default) | ours | a text with {input} and {reference}")
    ap.add_argument("--shots", type=int, default=None, help="few-shot demos (the split dev's first N) in both prompts")
    ap.add_argument("--label-words", default=None, help="answer format: label=word,... (classification)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed (and the tiny model's init)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--out", default=None, help="output folder (default runs/probe/<model>-<task>-<split>-<template>)")
    ap.add_argument("--summarize", default=None, metavar="DIR",
                    help="only write DIR/grid.md + grid.json from the probes under DIR (*/probe.json)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.summarize:
        try:
            print(summarize(Path(args.summarize)))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        setting = resolve_setting(args)
    except (ValueError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    task, words, template = setting["task"], setting["words"], setting["template"]
    # the demos are the dev split's first examples (task_shots): a dev probe starts after them (never its own demo)
    skip = len(setting["shots"]) if args.split == "dev" else 0
    examples = load_split(task, args.split, limit=args.limit + skip)[skip:]
    if words is not None:
        examples = [verbalize(ex, words) for ex in examples]
    model, tok = build_model(setting["model"], seed=args.seed)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    with torch.no_grad():
        report = probe(model.to(device), tok, examples, template=template, shots=setting["shots"],
                       batch_size=args.batch_size, n_boot=args.n_boot, seed=args.seed)
    tname = template if template in ("released", "ours") else "custom"
    report = {**report, "model": setting["model"].name, "task": task, "split": args.split, "limit": args.limit,
              "config": args.config, "skipped_demos": skip, "label_words": words.label_words if words else None,
              "instruction": words.instruction if words else None,
              "command": shlex.join(["python", "-m", "unisd.probe", *(argv if argv is not None else sys.argv[1:])])}
    slug = f"{Path(setting['model'].name).name}-{task}-{args.split}-{tname}"
    out = Path(args.out) if args.out else Path("runs") / "probe" / slug
    write_report(report, out)
    print(to_markdown(report), end="")
    print(f"wrote {out / 'probe.json'} and {out / 'probe.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
