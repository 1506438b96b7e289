"""Command line: layer-pair CKA between two models on a text file; writes cka.json and cka.png.

    python -m benchmarks.cka --model-a smollm2-135m --model-b smollm2-135m --random-init-b \\
        --texts ~/.cache/scd/data/multiemo_en/test.jsonl --out results/cka/smollm2_vs_random
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

from benchmarks.cka.estimators import ESTIMATORS, UNITS
from benchmarks.cka.layers import model_cka
from benchmarks.cka.plot import plot_cka_heatmap
from scd.core.results import atomic_write_json
from scd.models import ModelConfig, build_model, check_same_tokenizer


def _read_texts(path: str, field: str, limit: int) -> list[str]:
    """``.jsonl``: the ``field`` of each record (e.g. the shared data records' "input");
    anything else: one text per non-empty line."""
    texts: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                rec = json.loads(line)
                if field not in rec:
                    raise ValueError(f"{path}:{lineno}: record has no field {field!r} (keys: {sorted(rec)}); "
                                     "choose one with --field")
                texts.append(str(rec[field]))
            else:
                texts.append(line.rstrip("\n"))
            if len(texts) >= limit:
                break
    if not texts:
        raise ValueError(f"{path}: no texts found")
    return texts


def _text_batches(tok, texts: list[str], batch_size: int, max_length: int) -> list[dict]:
    tok.padding_side = "right"  # positions of real tokens do not depend on padding
    return [dict(tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                     max_length=max_length)) for i in range(0, len(texts), batch_size)]


def _parse_layers(spec: str | None) -> list[int] | None:
    if spec in (None, "", "all"):
        return None
    return [int(x) for x in spec.split(",")]


def main(argv: list[str] | None = None) -> int:
    """python -m benchmarks.cka --model-a smollm2-135m --model-b smollm2-135m --random-init-b \\
           --texts ~/.cache/scd/data/multiemo_en/test.jsonl --out results/cka/smollm2_vs_random"""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cka", description="Layer-pair CKA between two models "
                                 "(A = rows / student, B = columns / teacher); writes cka.json and cka.png.")
    ap.add_argument("--model-a", required=True, help="model name or path (scd.models names, e.g. smollm2-135m)")
    ap.add_argument("--model-b", required=True)
    ap.add_argument("--random-init-b", action="store_true", help="re-initialise model B randomly (same architecture)")
    ap.add_argument("--seed-b", type=int, default=0, help="seed of the random init of B")
    ap.add_argument("--texts", required=True, help=".jsonl (field --field) or a text file with one text per line")
    ap.add_argument("--field", default="input")
    ap.add_argument("--max-examples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--layers-a", default=None, help="comma-separated hidden-state indices (default: all layers)")
    ap.add_argument("--layers-b", default=None)
    ap.add_argument("--estimator", default="linear", choices=ESTIMATORS)
    ap.add_argument("--unit", default="tokens", choices=UNITS)
    ap.add_argument("--minibatch-size", type=int, default=1024)
    ap.add_argument("--skip-first", type=int, default=0,
                    help="drop the first k real tokens of each sequence (attention-sink outliers)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)

    model_a, tok = build_model(ModelConfig(name=args.model_a))
    if args.model_b == args.model_a and not args.random_init_b:
        model_b = model_a
    else:
        model_b, tok_b = build_model(ModelConfig(name=args.model_b))
        check_same_tokenizer(tok, tok_b, "model A", "model B")
    if args.random_init_b:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed_b)
            model_b = type(model_b)(copy.deepcopy(model_b.config))
    model_a.to(args.device)
    model_b.to(args.device)
    texts = _read_texts(os.path.expanduser(args.texts), args.field, args.max_examples)
    batches = _text_batches(tok, texts, args.batch_size, args.max_length)
    res = model_cka(model_a, model_b, batches, _parse_layers(args.layers_a), _parse_layers(args.layers_b),
                    estimator=args.estimator, unit=args.unit, device=args.device, minibatch_size=args.minibatch_size,
                    skip_first=args.skip_first)
    res.update(model_a=args.model_a, model_b=args.model_b + (f" (random init, seed {args.seed_b})"
                                                             if args.random_init_b else ""),
               texts=args.texts, n_texts=len(texts), max_length=args.max_length,
               command="python -m benchmarks.cka " + " ".join(sys.argv[1:] if argv is None else argv))
    out = Path(args.out)
    atomic_write_json(out / "cka.json", res)
    skip = f", first {args.skip_first} skipped" if args.skip_first else ""
    plot_cka_heatmap(res["matrix"], out / "cka.png", f"{args.estimator} CKA ({args.unit}{skip}, n={res['n']})",
                     xlabel=f"model B layer: {res['model_b']}", ylabel=f"model A layer: {args.model_a}",
                     xticklabels=res["layers_b"], yticklabels=res["layers_a"])
    print(json.dumps({k: res[k] for k in ("mean_matched", "n", "estimator", "unit")}))
    print("matched:", " ".join(f"{v:.3f}" for v in res["matched"]))
    print(f"wrote {out / 'cka.json'} and {out / 'cka.png'}")
    return 0
