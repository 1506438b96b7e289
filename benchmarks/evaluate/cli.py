"""Evaluate a saved run or a model on the suite's tasks; results go into run.json.

    python -m benchmarks.evaluate RUN_DIR_OR_MODEL --tasks multiemo_en rotten_tomatoes \\
        [--split test] [--limit N] [--shots K] [--batch-size B] [--max-new-tokens T] \\
        [--scoring generate|likelihood|calibrated] [--config configs/eval/x.yaml] [--out DIR] \\
        [--lm-eval TASK ...] [--cka-reference MODEL_OR_RUN] [key=value ...]
    python -m benchmarks.evaluate --rescore RUN_OR_GRID_DIR ...   # saved predictions, current scorers

* RUN_DIR: a directory with ``run.json``; the model is ``run.json["artifacts"]["model"]``
  or ``RUN_DIR/model``.  Results are merged into that run.json.
* MODEL: anything :mod:`scd.models` understands (``smollm2-135m``, an HF folder,
  ``tiny``).  A run directory is created (default ``results/eval/<model>-<hash>/``,
  or ``--out``) with a fresh run.json (recipe ``evaluate``, method = model name).

Written (atomically; existing entries for other tasks are kept)::

    run.json  eval        {task: {metric: {"value": float, "n": int, "ci": [lo, hi]}}}
              metric_meta {"<task>/<metric>": {"higher_is_better", "chance", "primary"}}
              eval_info   {task: {split, limit, n, shots, shot_ids, scoring, max_new_tokens,
                                  wall_s, predictions, n_boot, boot_seed, extra[, rescored]}}
              cka         {"<reference>": model_cka(...) result}   (with --cka-reference)
    predictions/<task>.jsonl   one line per example: id, output, prediction, gold, scores

Tasks may be task names, family names (``qa``, ``ner``, ``classification``) or
``all``.  Defaults are those of the one evaluation config (``EvalSpec``): the first 200
examples (``limit=null``: all), batch size 16.  Few-shot demonstrations are drawn
deterministically from the task's train split (see
``benchmarks.tasks.suite.few_shot_examples``).  ``--lm-eval`` names go through
:mod:`benchmarks.lmeval_bridge` (suite task names are exported as local lm-eval
tasks; any other name is an lm-eval task, which needs its dataset hub).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from benchmarks.evaluate.config import EvalConfig
from benchmarks.evaluate.rescore import rescore_main
from benchmarks.evaluate.runner import evaluate
from scd.core.assets import AssetError
from scd.core.config import ConfigError, Source, apply_overrides, from_dict, load_yaml


def build_config(args: argparse.Namespace) -> EvalConfig:
    data: dict = {}
    source = Source()
    if args.config:
        data, source = load_yaml(args.config)
        data.setdefault("recipe", "evaluate")
        if data["recipe"] != "evaluate":
            raise ConfigError(f"{args.config}: recipe is '{data['recipe']}', expected 'evaluate'")
    cli = {"tasks": args.tasks, "split": args.split, "limit": args.limit, "shots": args.shots,
           "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "scoring": args.scoring,
           "lm_eval_tasks": args.lm_eval, "out": args.out, "device": args.device, "dtype": args.dtype,
           "num_threads": args.threads, "n_boot": args.n_boot, "model": args.target}
    for k, v in cli.items():
        if v is not None:
            data[k] = list(v) if isinstance(v, (list, tuple)) else v
    if args.no_progress:
        data["progress"] = False
    if args.cka_reference:
        data.setdefault("cka", {})["reference"] = args.cka_reference
    data = apply_overrides(data, args.overrides)
    return from_dict(EvalConfig, data, source)


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", nargs="?", help="run directory (with run.json) or model name/path")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. cka.n_examples=32")
    ap.add_argument("--tasks", nargs="+", help="task names, family names (qa, ner, classification) or all")
    ap.add_argument("--split", choices=("train", "dev", "test"))
    ap.add_argument("--limit", type=int, help="first N examples per task (default 200; all: limit=null)")
    ap.add_argument("--shots", type=int, help="few-shot demonstrations from the train split")
    ap.add_argument("--batch-size", type=int, help="default 16")
    ap.add_argument("--max-new-tokens", type=int, help="override every task's generation budget")
    ap.add_argument("--scoring", choices=("generate", "likelihood", "calibrated"), help="classification scoring")
    ap.add_argument("--config", help="configs/eval/*.yaml (recipe: evaluate); CLI flags override it")
    ap.add_argument("--out", help="run directory to write (bare model only)")
    ap.add_argument("--lm-eval", nargs="+", help="suite task names (exported) or lm-eval task names")
    ap.add_argument("--cka-reference", help="model or run dir to compare layer-wise with CKA")
    ap.add_argument("--device")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--n-boot", type=int, help="bootstrap resamples for the CIs (default 1000)")
    ap.add_argument("--no-progress", action="store_true")
    return ap



def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--rescore":
        return rescore_main(argv[1:])
    args = make_parser().parse_args(argv)
    # a positional that looks like key=value is an override, not the target
    if args.target and "=" in args.target and not Path(args.target).exists():
        args.overrides = [args.target, *args.overrides]
        args.target = None
    try:
        cfg = build_config(args)
        out = evaluate(cfg)
    except (ConfigError, ValueError, FileNotFoundError, KeyError, OSError, AssetError) as e:
        if os.environ.get("SCD_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[eval] results -> {out / 'run.json'}", flush=True)
    return 0
