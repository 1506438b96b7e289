"""End to end: one KD row of the demo grid before / after the fast path, same seed, same settings.

    python -m benchmarks.perf.e2e_kd                          # the demo's KD row, 4 variants
    python -m benchmarks.perf.e2e_kd --steps 5                # per-step time over 5 steps only (no eval)
    python -m benchmarks.perf.e2e_kd --render results/perf/e2e_kd_demo.json   # its .md from the JSON

The row is ``configs/scd/kd_demo.yaml`` (SmolLM2-135M-Instruct teacher from
``configs/scd/teacher_demo.yaml``, a 6-layer student cut from it, 15 steps of batch 8 on 400
Rotten Tomatoes reviews, scored on 100 test reviews).  The teacher run is trained once under
``--results-dir`` and reused by every variant.  Each variant is a fresh ``python -m scd run`` in
a subprocess, timed end to end (process wall time: model loading, training, evaluation):

* ``before``        ``train.completion_only=false``: full logits of teacher and student at every
                    position, live teacher at every step (the path every recipe ran before);
* ``after``         completion-only head, fused KD + CE (the default now), live teacher;
* ``cached_build``  + ``teacher.cache={k: 64}`` in an empty cache root: this run builds the cache;
* ``cached``        the same again: the cache is reused, no teacher forward at all.

Writes ``--out`` (JSON) and the same name with ``.md``: per variant the process wall time, the
training wall time and seconds per step, the final logged loss / KD / CE and the evaluation
metrics, and their differences to ``before``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from scd.core.results import atomic_write_json, atomic_write_text, read_json, read_metrics

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {"before": ["train.completion_only=false"], "after": [], "cached_build": ["teacher.cache={k: 64, root: %s}"],
            "cached": ["teacher.cache={k: 64, root: %s}"]}


def run_variant(name: str, args, cache_root: Path) -> dict:
    """One fresh run of the KD row -> its timings, final losses and evaluation."""
    run_dir = Path(args.results_dir) / "e2e" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    if name == "cached_build":
        shutil.rmtree(cache_root, ignore_errors=True)
    over = [o % cache_root if "%s" in o else o for o in VARIANTS[name]]
    over += [f"teacher.results_dir={args.results_dir}", f"seed={args.seed}"]
    if args.steps:
        over += [f"train.max_steps={args.steps}", "eval.tasks=[]", "save_model=false"]
    cmd = [sys.executable, "-m", "scd", "run", args.config, *over, "--run-dir", str(run_dir)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{name}: {' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    rec = read_json(run_dir / "run.json")
    last = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r][-1]
    ev = {f"{task}/{m}": v["value"] for task, ms in (rec.get("eval") or {}).items() for m, v in ms.items()
          if isinstance(v, dict) and "value" in v}
    train = rec["train"]
    return {"name": name, "command": " ".join(["python", "-m", "scd", "run", args.config, *over]),
            "process_wall_s": round(wall, 1), "train_wall_s": train["wall_s"], "steps": train["steps"],
            "s_per_step": round(train["wall_s"] / train["steps"], 3), "final_step": last["step"],
            "loss": last["loss"], "kd": last["kd"], "ce": last["ce"], "eval": ev,
            "teacher_forwards_train": train.get("teacher_forwards_train"),
            "teacher_cache": [{k: c[k] for k in ("id", "k", "built_shards", "gap_kl_probe") if k in c}
                              for c in (train.get("teacher_cache") or {}).get("caches", [])]}


def teacher_config(config: str) -> str:
    """The teacher config the KD row names (``teacher.config``; the demo teacher when it names none)."""
    data = yaml.safe_load((ROOT / config).read_text(encoding="utf-8")) or {}
    return (data.get("teacher") or {}).get("config") or "configs/scd/teacher_demo.yaml"


def ensure_teacher(args) -> float:
    """Train the KD row's teacher once under --results-dir (reused when finished) -> seconds spent, so that
    no variant's wall time includes teacher training."""
    teacher_cfg = teacher_config(args.config)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "scd", "run", teacher_cfg, f"seed={args.seed}", "--results-dir",
                        args.results_dir], cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"teacher run failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def markdown(res: dict) -> str:
    rows = res["variants"]
    base = rows[0]
    steps = ("" if not res.get("steps") else f"  Per-step measurement: {res['steps']} training steps per variant, "
             "no evaluation (the whole row, 15 steps + evaluation, four times, would take well over 15 min on "
             "this shared 2-core machine).")
    out = ["# End to end: the demo's KD row before / after the fast path", "",
           "Generated by `benchmarks/perf/e2e_kd.py` (do not edit by hand; `--render` rewrites it from the JSON).  "
           "Command (repo root):", "", "```bash", res["command"], "```", "",
           f"Device: {res['device']}; OMP_NUM_THREADS={res['omp_num_threads']}; "
           f"load average (1 min) at start / end {res['load_average'][0]:.1f} / {res['load_average'][1]:.1f} "
           f"on {res['cpus']} CPUs.  Teacher run reused ({res['teacher_s']:.0f} s to find or train it).  Variants run "
           f"one after another in this order (a shared machine: load drift hits them unequally).{steps}"
           + (f"  {res['note']}" if res.get("note") else ""), "",
           "| variant | process wall s | train wall s | s / step | final loss | final kd | final ce | eval | "
           "teacher fwd (train set) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ev = ", ".join(f"{k} {v:.3f}" for k, v in r["eval"].items()) or "-"
        out.append(f"| {r['name']} | {r['process_wall_s']:.1f} | {r['train_wall_s']:.1f} | {r['s_per_step']:.2f} | "
                   f"{r['loss']:.5f} | {r['kd']:.5f} | {r['ce']:.5f} | {ev} | {r['teacher_forwards_train']} |")
    out += ["", "`cached_build` runs the teacher once over the whole training set (every example, not only "
            "the batches of this run) and stores it; every later KD / CD / SCD / SCD+AW run and seed with the same "
            "teacher checkpoint and data reads it (`cached`).  Top-k (k = 64) targets give a slightly different "
            "loss than the live teacher by construction (`gap_kl_probe`: KL(live || cached) on the probe); "
            "`k: full` is exact (tests/test_fastpath_recipes.py).", "",
            "Differences to `before` (same seed, same data order):", ""]
    for r in rows[1:]:
        d_ev = ", ".join(f"{k} {r['eval'][k] - base['eval'].get(k, float('nan')):+.3f}" for k in r["eval"]) or "-"
        out.append(f"* {r['name']}: speed-up vs before {base['process_wall_s'] / r['process_wall_s']:.2f}x end to "
                   f"end, {base['s_per_step'] / r['s_per_step']:.2f}x per step; final loss "
                   f"{r['loss'] - base['loss']:+.2e} (rel {(r['loss'] - base['loss']) / abs(base['loss']):+.1e}); "
                   f"eval {d_ev}; cache {r['teacher_cache'] or '-'}")
    return "\n".join(out + [""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/scd/kd_demo.yaml")
    ap.add_argument("--results-dir", default="/tmp/scd-e2e", help="teacher run, the variants' runs, the cache")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=0, help="only N training steps, no evaluation (per-step time)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default="results/perf/e2e_kd_demo.json")
    ap.add_argument("--render", default=None, help="only write the .md of this result JSON")
    args = ap.parse_args(argv)
    if args.render:
        atomic_write_text(os.path.splitext(args.render)[0] + ".md", markdown(read_json(args.render)))
        return 0
    args.results_dir = str(Path(args.results_dir).resolve())
    load0 = os.getloadavg()[0]
    teacher_s = ensure_teacher(args)
    cache_root = Path(args.results_dir) / "teacher_logits"
    rows = []
    for name in args.variants:
        rows.append(run_variant(name, args, cache_root))
        print(json.dumps(rows[-1]), flush=True)
    res = {"benchmark": "e2e_kd_demo", "variants": rows, "steps": args.steps, "teacher_s": teacher_s,
           "cpus": os.cpu_count(),
           "command": ("python -m benchmarks.perf.e2e_kd " + " ".join(sys.argv[1:] if argv is None else argv)).strip(),
           "device": "CPU", "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "load_average": [load0, os.getloadavg()[0]]}
    atomic_write_json(args.out, res)
    atomic_write_text(os.path.splitext(args.out)[0] + ".md", markdown(res))
    print(f"wrote {args.out} and its .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
