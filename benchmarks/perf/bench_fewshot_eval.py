"""Few-shot likelihood scoring: the demonstrations' prefix run once per batch vs in every context.

    python -m benchmarks.perf.bench_fewshot_eval                  # SmolLM2-135M, RT dev, 3 shots, 64 reviews (~3 min)
    python -m benchmarks.perf.bench_fewshot_eval --n 128 --shots 5 --threads 2

Scores the same few-shot prompts (the evaluation's own: ``few_shot_examples``, label words positive /
negative as in ``configs/unisd/study_cpu.yaml``) with ``loglik_choices(share_prefix=False)`` (every context
run in full, the baseline) and ``share_prefix=True`` (the batch's common prefix -- system prompt,
instruction, demonstrations -- run once).  Rounds alternate; prints seconds per review for both, their ratio,
the largest |difference| of the log-likelihoods and whether any prediction changed (a correctness check),
the prefix length, the device and its load (the two rows alternate, so they share it).  ``--out`` writes the numbers as JSON.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import statistics
import time

import torch

from benchmarks.tasks.generate import encode_pair, loglik_choices
from benchmarks.tasks.classification import ClassificationScorer
from benchmarks.tasks.suite import few_shot_examples, task_examples
from scd.core.results import atomic_write_json
from scd.heads import prompts_shared_prefix_len
from scd.data.label_words import LabelWords, verbalize
from scd.models import ModelConfig, build_model

WORDS = LabelWords(label_words={"fresh": "positive", "rotten": "negative"},
                   instruction="Classify the sentiment of the movie review snippet. Answer with exactly one of: "
                               "positive, negative.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.perf.bench_fewshot_eval",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="rotten_tomatoes")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--n", type=int, default=64, help="reviews scored per round")
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of each row (median reported)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = build_model(ModelConfig(name=args.model), seed=0)
    model.eval()
    examples = [verbalize(e, WORDS) for e in task_examples(args.task, args.split, args.n)]
    demos = [verbalize(d, WORDS) for d in few_shot_examples(args.task, args.shots, 0,
                                                            exclude_ids=[e["id"] for e in examples])]
    scorer = ClassificationScorer()
    prompts = scorer.prompts(examples, tok, demos)
    cands = [scorer.candidates(e, tok) for e in examples]
    ctxs = [encode_pair(tok, p, c[0])[0] for p, c in zip(prompts, cands)]
    prefix = prompts_shared_prefix_len(ctxs)
    times: dict[str, list[float]] = {"full": [], "shared": []}
    out: dict[str, list] = {}
    for _ in range(args.rounds):
        for name, share in (("full", False), ("shared", True)):
            t0 = time.perf_counter()
            out[name] = loglik_choices(model, tok, prompts, cands, batch_size=args.batch_size, progress=False,
                                       share_prefix=share)
            times[name].append((time.perf_counter() - t0) / len(examples))
    diff = max(abs(a - b) for x, y in zip(out["full"], out["shared"]) for a, b in zip(x, y))
    changed = sum(max(range(len(x)), key=x.__getitem__) != max(range(len(y)), key=y.__getitem__)
                  for x, y in zip(out["full"], out["shared"]))
    t_full, t_shared = statistics.median(times["full"]), statistics.median(times["shared"])
    res = {"command": shlex.join(["python", "-m", "benchmarks.perf.bench_fewshot_eval",
                                  *(argv if argv is not None else sys.argv[1:])]),
           "device": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "loadavg_1m_at_end": os.getloadavg()[0], "threads": args.threads, "torch": torch.__version__,
           "model": args.model, "task": args.task, "split": args.split, "n": len(examples), "shots": len(demos),
           "batch_size": args.batch_size, "rounds": args.rounds, "mean_context_tokens": sum(map(len, ctxs)) / len(ctxs),
           "shared_prefix_tokens": prefix, "s_per_review": {"full": t_full, "shared": t_shared},
           "ratio_full_over_shared": t_full / t_shared, "max_abs_loglik_diff": diff, "predictions_changed": changed}
    print(f"device: {res['device']} ({res['cpu_count']} cores, load {res['loadavg_1m_at_end']:.1f}), "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print(f"{len(examples)} {args.task} {args.split} reviews, {len(demos)} shots; contexts "
          f"{res['mean_context_tokens']:.0f} tokens on average, {prefix} of them shared")
    print(f"full   (every context in full): {t_full:.3f} s per review")
    print(f"shared (prefix once per batch): {t_shared:.3f} s per review")
    print(f"ratio full / shared: {t_full / t_shared:.2f}x; max |loglik difference| {diff:.2e}; "
          f"{changed} prediction(s) changed")
    if args.out:
        atomic_write_json(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
