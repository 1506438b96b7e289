"""One greedy step of the student cut: every trial from the embeddings vs from the recorded prefix.

    python -m benchmarks.perf.bench_cut                 # SmolLM2-135M, 8 dev texts, one thread (~5 min)
    python -m benchmarks.perf.bench_cut --n 32 --threads 2

Times the first step of ``cut.rule: greedy_kl`` (``scd.student.cut``) on the converted SmolLM2 asset:
``naive`` runs each of the L trial models (the base without one layer) from the embeddings
(``DevKL.of_layers``, what the search did before); ``shared`` runs the base once, records every
layer's input and runs each trial from the input of its dropped layer (``DevKL.drop_each``).  Prints
seconds per trial for both, their ratio, the largest difference between the two KL lists (a
correctness check), and the device; ``--trials`` limits the naive side to its first k layers.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from scd.core.config import load_config
from scd.models import build_model
from scd.student.cut import DevKL, dev_sample

CONFIG = "configs/student/smollm2_keep16.yaml"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.perf.bench_cut", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=CONFIG, help="a `recipe: student` config (base model, dev sample)")
    ap.add_argument("--n", type=int, default=8, help="dev texts (the config's dev.n is the real search)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trials", type=int, default=6, help="naive trials timed (each is the same work)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    base, tok = build_model(cfg.base, seed=0)
    base.eval().requires_grad_(False)
    enc = dev_sample(cfg.data, tok, cfg.dev.split, args.n, cfg.train.max_len)
    dev = DevKL(base, enc, tok.pad_token_id, cfg.dev.batch_size, torch.device("cpu"))
    layers = list(range(base.config.num_hidden_layers))
    t0 = time.perf_counter()
    naive = [dev.of_layers(base, [j for j in layers if j != i]) for i in layers[:args.trials]]
    t_naive = (time.perf_counter() - t0) / len(naive)
    t0 = time.perf_counter()
    shared = dev.drop_each(base, layers)
    t_shared = (time.perf_counter() - t0) / len(shared)
    diff = max(abs(a - b) for a, b in zip(naive, shared))
    print(f"device: {platform.processor() or platform.machine()}, {args.threads} thread(s), torch {torch.__version__}")
    print(f"dev sample: {args.n} texts, {dev.n_tokens} positions; {len(layers)} trials per first step")
    print(f"naive  (from the embeddings): {t_naive:.2f} s per trial ({len(naive)} timed)")
    print(f"shared (from the prefix):     {t_shared:.2f} s per trial ({len(shared)} timed)")
    print(f"ratio naive / shared: {t_naive / t_shared:.2f}x; max |KL difference| {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
