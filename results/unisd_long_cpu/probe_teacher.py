"""Is the in-context teacher better than the student? (results/unisd_long_cpu/README.md)

Self-distillation can only transfer what the teacher knows and the student does not. For a model
(default SmolLM2-135M-Instruct, untrained, as at the start of every UniSD run) this scores the two labels
of N Rotten Tomatoes *train* reviews (the data UniSD trains on) under
  * the student prompt (the review, as in training and evaluation), and
  * the teacher prompt (the same review plus the reference answer, unisd.prompts.teacher_prompt),
with the evaluation layer's label log-likelihoods (benchmarks.tasks.generate.loglik_choices; label text
+ end of turn, as `benchmarks.evaluate --scoring likelihood`). It prints each one's accuracy, the mean
p(gold label) after normalising over the two labels, and the same on the rotten reviews (the minority
label, which the untrained model never predicts).

    python results/unisd_long_cpu/probe_teacher.py [N=200] [MODEL=smollm2-135m]   # any model.name
"""
from __future__ import annotations

import math
import sys

import torch
from transformers import AutoModelForCausalLM

from benchmarks.tasks.generate import loglik_choices
from scd.data.load import load_split
from scd.data.prompts import render_prompt, render_target
from scd.models import load_tokenizer, resolve
from unisd.prompts import teacher_prompt

LABELS = ("fresh", "rotten")


def main(n: int, model_name: str) -> int:
    path = resolve(model_name)
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    exs = load_split("rotten_tomatoes", "train", limit=n)
    conts = [render_target({**exs[0], "target": lab}, tok) for lab in LABELS]  # "fresh<|im_end|>", ...
    for name, ctx in (("student (review only)", [render_prompt(e, tok) for e in exs]),
                      ("teacher (review + reference answer)", [teacher_prompt(e, tok) for e in exs])):
        ll = loglik_choices(model, tok, ctx, [conts] * len(exs), batch_size=8, progress=False)
        acc, p_gold, p_rot, n_rot = 0.0, 0.0, 0.0, 0
        for e, row in zip(exs, ll):
            z = max(row)
            p = [math.exp(v - z) for v in row]
            p = [v / sum(p) for v in p]
            g = LABELS.index(e["target"])
            acc += float(max(range(2), key=lambda j: row[j]) == g)
            p_gold += p[g]
            if e["target"] == "rotten":
                p_rot, n_rot = p_rot + p[g], n_rot + 1
        print(f"{name:38s} n={len(exs)}  accuracy {acc / len(exs):.3f}  mean p(gold) {p_gold / len(exs):.3f}"
              f"  mean p(rotten) on the {n_rot} rotten reviews {p_rot / max(n_rot, 1):.3f}")
    print(f"majority rate: {max(sum(e['target'] == lab for e in exs) for lab in LABELS) / len(exs):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200, sys.argv[2] if len(sys.argv) > 2 else "smollm2-135m"))
