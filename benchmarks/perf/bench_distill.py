"""One distillation step (forward + backward + AdamW step of the student): our paths vs TRL.

    python -m benchmarks.perf.bench_distill                     # CPU, full shapes (<= 10 min on 2 cores)
    python -m benchmarks.perf.bench_distill --quick --out /tmp/d.json   # tiny shapes (a test)
    python -m benchmarks.perf.bench_distill --device cuda --out results/perf/distill_step_gpu.json  # + .md

Models (random init, no assets needed): a SmolLM2-135M-shaped Llama teacher (30 layers,
hidden 576, 9 heads / 3 kv heads, MLP 1536, vocab 49,152, tied head) and a 6-layer
student of the same width.  Data: random token ids, batch 8 x sequence 128, the last
``completion`` tokens of each sequence are the targets (shape ``short``: 8, ``long``: 64).
Loss: forward KL(teacher || student) averaged over target tokens (TRL's GKD with
lmbda 0, beta 0), temperature 1.  Every row's step runs through the suite's training engine
(``scd.core.engine.Engine.train_step``: autocast, backward, gradient clipping, AdamW): each
row is a one-micro-batch recipe whose ``loss_terms`` computes that row's loss.  Rows:

* ours_naive   today's recipe path: full logits of teacher and student at every
               position, then [:, :-1][mask] and ``scd.losses.per_token_divergence``.
* ours_fast    completion-only, the recipes' path (``scd.completion_loss.completion_terms``): backbone
               hidden states (``scd.heads``), the head only at target positions, fused and
               chunked (``scd.completion_loss.fused_kd_ce``); live teacher forward of its
               backbone, its head fused too.
* ours_cached  as ours_fast, teacher targets from ``scd.teacher_cache`` (k = 64, built
               once before timing; build time reported): no teacher forward.
* trl          TRL's own ``GKDTrainer.compute_loss`` (trl.experimental.gkd, unbound, on
               a shim holding ``teacher_model`` and ``beta = 0``: student + teacher full
               forward, ``generalized_jsd_loss``), then the same engine backward + step.
               The Trainer loop itself (accelerate, dataloader, logging) is not driven.

dtype: table ``fp32``: all float32.  Table ``bf16``: student float32 master weights and
AdamW state under ``torch.autocast(bfloat16)`` (what TRL's ``bf16=True`` does), teacher
weights in bfloat16; ours run the head matmuls in bf16 (``head_dtype``) and every
log-softmax / divergence in fp32; TRL's log_softmax runs in fp32 under autocast.
``rows`` in the JSON are the suite's default training dtype on the device (CPU: fp32,
CUDA: bf16), the ``short`` shape; ``tables`` hold every dtype and shape.

Measurement: one warm-up step per row (first shape of each dtype), then ``--repeats`` rounds, the rows interleaved
within each round (drift in a shared machine hits all rows alike).  tokens/s = target
tokens (and total tokens) of the batch / step wall time; median, min, max over rounds.
Memory: peak extra memory of the step over the resident state (models, optimizer,
cache) -- CPU: process RSS sampled every 2 ms minus RSS at the step start (approximate;
freed heap pages may linger); CUDA: ``max_memory_allocated`` minus the allocation at the
step start.  Phases (teacher / student forward + loss / backward / optimizer) are timed
per step for the profile table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from dataclasses import dataclass

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.perf.bench_cka import PeakRSS, device_name
from scd.core.engine import Engine, Terms
from scd.core.results import atomic_write_json, atomic_write_text
from scd.core.train import TrainConfig
from scd.heads import head_weight, num_targets, target_hidden
from scd.losses import per_token_divergence
from scd.completion_loss import completion_terms
from scd.teacher_cache import TeacherLogitCache

ROWS = ("ours_naive", "ours_fast", "ours_cached", "trl")
CACHE_K = 64


@dataclass(frozen=True)
class Shapes:
    teacher_layers: int = 30
    student_layers: int = 6
    hidden: int = 576
    intermediate: int = 1536
    heads: int = 9
    kv_heads: int = 3
    vocab: int = 49152
    batch: int = 8
    seq: int = 128
    completions: tuple = (("short", 8), ("long", 64))


QUICK = Shapes(teacher_layers=3, student_layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=1024,
               batch=4, seq=32, completions=(("short", 4), ("long", 12)))


# ------------------------------------------------------------------ setup
def make_model(s: Shapes, layers: int, seed: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                      num_hidden_layers=layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                      max_position_embeddings=max(2048, s.seq), tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


def make_batch(s: Shapes, completion: int, seed: int = 0) -> dict:
    """Full-length sequences [B, T]; the last ``completion`` tokens of each are targets."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, s.vocab, (s.batch, s.seq), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -completion:] = ids[:, -completion:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def encoded_of(batch: dict) -> list[dict]:
    return [{"input_ids": i.tolist(), "labels": l.tolist()} for i, l in zip(batch["input_ids"], batch["labels"])]


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int = 128, h: int = 576, reps: int = 5) -> float:
    """Best-of-``reps`` GFLOP/s of an [n, h] @ [h, h] matmul (does this device have fast bf16?)."""
    a, b = torch.randn(n, h, device=device).to(dtype), torch.randn(h, h, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n * h * h / best / 1e9


def choose_dtypes(requested: list[str] | None, device: torch.device, rates: dict) -> tuple[list[str], dict]:
    """fp32 always (the CPU default); bf16 when asked, or by default where its matmul is at least half
    the fp32 rate (CPUs without native bf16 instructions run it 10-50x slower: skipped, with the reason)."""
    default = "bf16" if device.type == "cuda" else "fp32"
    if requested:
        return ([default] if default not in requested else []) + list(requested), {}
    if device.type == "cuda" or rates["bf16"] >= 0.5 * rates["fp32"]:
        return [default] + [d for d in ("fp32", "bf16") if d != default], {}
    why = (f"bf16 matmul {rates['bf16']:.1f} GFLOP/s vs fp32 {rates['fp32']:.1f} on this CPU (capability "
           f"{torch.backends.cpu.get_cpu_capability()}, no native bf16): bf16 does not help here; "
           "--dtypes fp32 bf16 forces the table")
    return ["fp32"], {"bf16": why}


def trl_compute_loss():
    """TRL's GKDTrainer.compute_loss, or None when trl is not installed (the `bench` extra)."""
    try:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        return None
    return GKDTrainer


# ------------------------------------------------------------------ the four step kinds
class Clock:
    """Phase timer: ``tick(name)`` closes the phase that ended now."""

    def __init__(self, device: torch.device):
        self.device, self.t, self.phases = device, time.perf_counter(), {}

    def tick(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.t
        self.t = now


def loss_naive(ctx, b, clock, denom):
    with torch.no_grad():
        t = ctx.teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    clock.tick("teacher")
    s = ctx.student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    m = b["labels"][:, 1:] != -100
    return per_token_divergence("forward_kl", s[:, :-1][m], t[:, :-1][m]).sum() / denom


def loss_fast(ctx, b, clock, denom):
    with torch.no_grad():
        th = target_hidden(ctx.teacher, b)  # [N, H] teacher backbone only
    clock.tick("teacher")
    kd, _ = completion_terms(ctx.student, b, head_dtype=ctx.head_dtype, teacher=th,
                             teacher_weight=head_weight(ctx.teacher)[0])
    return kd.sum() / denom


def loss_cached(ctx, b, clock, denom):
    targets = ctx.cache.targets(range(b["input_ids"].shape[0]), device=ctx.device)  # no teacher forward
    clock.tick("teacher")
    kd, _ = completion_terms(ctx.student, b, head_dtype=ctx.head_dtype, teacher=targets)
    return kd.sum() / denom


def loss_trl(ctx, b, clock, denom):
    shim = types.SimpleNamespace(teacher_model=ctx.teacher, beta=0.0,
                                 generalized_jsd_loss=ctx.gkd.generalized_jsd_loss)
    clock.tick("teacher")  # TRL runs both forwards inside compute_loss: reported as student fwd + loss
    return ctx.gkd.compute_loss(shim, ctx.student, b)  # TRL's own normalisation (batchmean)


LOSSES = {"ours_naive": loss_naive, "ours_fast": loss_fast, "ours_cached": loss_cached, "trl": loss_trl}


class RowRecipe:
    """One benchmark row as a recipe of the training engine: one micro-batch (the benchmark batch),
    ``loss_terms`` = the row's loss; phases are ticked on ``clock`` (set before each step)."""

    def __init__(self, engine: Engine, ctx, row: str, batch: dict):
        self.engine, self.ctx, self.row, self.batch, self.clock = engine, ctx, row, batch, None

    def micro_batches(self, step: int, world: int, rank: int) -> list[dict]:
        return [self.batch]

    def count(self, b: dict) -> int:
        return num_targets(b["labels"])

    def loss_terms(self, b: dict, denom: float) -> Terms:
        loss = LOSSES[self.row](self.ctx, b, self.clock, denom)
        self.clock.tick("student_fwd_loss")
        return Terms({"kd": loss})


def timed_step(engine: Engine, ctx) -> None:
    """Tick the clock between the engine's backward and its optimiser step (clip + AdamW)."""
    step = engine.backend.step

    def run():
        ctx.clock.tick("backward")
        out = step()
        ctx.clock.tick("optimizer")
        return out

    engine.backend.step = run


def one_step(ctx, row: str, b: dict) -> tuple[float, int, dict]:
    """(seconds, peak extra bytes, phase seconds) of one engine step (forward + backward + clip + AdamW)."""
    dev = ctx.device
    recipe = ctx.recipes.setdefault((row, id(b)), RowRecipe(ctx.engine, ctx, row, b))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        ctx.clock = recipe.clock = Clock(dev)
        ctx.engine.train_step(recipe, ctx.steps)  # the engine checks every term is finite
        ctx.steps += 1
        secs = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) - base if dev.type == "cuda" else mem.extra
    return secs, peak, ctx.clock.phases


# ------------------------------------------------------------------ one table (dtype x shape)
def build_ctx(models: dict, dtype: str, device: torch.device, gkd) -> types.SimpleNamespace:
    """The student's engine for one dtype (fp32 master weights and AdamW state; bf16 autocast)."""
    bf16 = dtype == "bf16"
    student = models["student"]
    teacher = models["teacher_bf16"] if bf16 else models["teacher"]
    train = TrainConfig(lr=1e-5, schedule="constant", warmup_ratio=0.0, device=str(device), dtype=dtype)
    engine = Engine(student, train, run_dir=None, name="bench")
    engine.new_schedule(10 ** 6)
    ctx = types.SimpleNamespace(student=engine.model, teacher=teacher, engine=engine, device=device, bf16=bf16,
                                head_dtype=torch.bfloat16 if bf16 else None, gkd=gkd, cache=None, recipes={},
                                steps=0, clock=None)
    timed_step(engine, ctx)
    return ctx


def run_table(ctx, s: Shapes, completion: int, rows: list[str], repeats: int, cache_root: str,
              warmup: bool = True) -> list[dict]:
    b = {k: v.to(ctx.device) for k, v in make_batch(s, completion).items()}
    n_target, n_total = num_targets(b["labels"]), b["input_ids"].numel()
    build_s = None
    if "ours_cached" in rows:
        t0 = time.perf_counter()
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.bf16):
            ctx.cache = TeacherLogitCache.open_or_build(cache_root, ctx.teacher, f"random-init-{s}", encoded_of(b),
                                                        k=CACHE_K, max_len=s.seq, batch_size=s.batch,
                                                        device=ctx.device)
        build_s = time.perf_counter() - t0
    res = {r: {"s": [], "mem": [], "phases": []} for r in rows}
    for r in rows if warmup else []:  # warm-up (allocator, AdamW state), first table of a dtype
        one_step(ctx, r, b)
    for _ in range(repeats):
        for r in rows:
            secs, mem, ph = one_step(ctx, r, b)
            res[r]["s"].append(secs)
            res[r]["mem"].append(mem)
            res[r]["phases"].append(ph)
    out = []
    for r in rows:
        ts = res[r]["s"]
        row = {"name": r, "tokens_per_s": n_target / statistics.median(ts),
               "tokens_per_s_min": n_target / max(ts), "tokens_per_s_max": n_target / min(ts),
               "total_tokens_per_s": n_total / statistics.median(ts),
               "total_tokens_per_s_min": n_total / max(ts), "total_tokens_per_s_max": n_total / min(ts),
               "step_s": statistics.median(ts), "peak_mem_mb": max(res[r]["mem"]) / 2**20,
               "target_tokens": n_target, "total_tokens": n_total,
               "phases_s": {p: statistics.median(ph[p] for ph in res[r]["phases"]) for p in res[r]["phases"][0]}}
        if r == "ours_cached":
            row["cache_build_s"] = build_s
        out.append(row)
    return out


# ------------------------------------------------------------------ reporting
def ratios(rows: list[dict]) -> dict:
    by = {r["name"]: r for r in rows}

    def ratio(a, b):
        return by[a]["tokens_per_s"] / by[b]["tokens_per_s"] if a in by and b in by else None

    out = {"fast_over_naive": ratio("ours_fast", "ours_naive"), "cached_over_fast": ratio("ours_cached", "ours_fast"),
           "fast_over_trl": ratio("ours_fast", "trl"), "cached_over_naive": ratio("ours_cached", "ours_naive")}
    if "ours_fast" in by and "trl" in by:
        out["fast_mem_over_trl"] = by["ours_fast"]["peak_mem_mb"] / max(by["trl"]["peak_mem_mb"], 1e-9)
    return out


def targets_met(r: dict) -> dict:
    """The issue's must-show targets, evaluated on one table's ratios (None: a row is missing)."""
    def ok(v, th):
        return None if v is None else bool(v >= th)
    return {"fast_over_naive>=3": ok(r["fast_over_naive"], 3.0), "cached_over_fast>=2": ok(r["cached_over_fast"], 2.0),
            "fast_over_trl>=1.3": ok(r["fast_over_trl"], 1.3),
            "fast_mem<=trl": None if r.get("fast_mem_over_trl") is None else bool(r["fast_mem_over_trl"] <= 1.0)}


def fmt_ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def table_md(rows: list[dict]) -> list[str]:
    lines = ["| row | target tok/s (median [min, max]) | total tok/s | step s | peak extra MiB | "
             "teacher s | student fwd+loss s | backward s | optimizer s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ph = r["phases_s"]
        lines.append(f"| {r['name']} | {r['tokens_per_s']:.1f} [{r['tokens_per_s_min']:.1f}, "
                     f"{r['tokens_per_s_max']:.1f}] | {r['total_tokens_per_s']:.0f} | {r['step_s']:.3f} | "
                     f"{r['peak_mem_mb']:.0f} | {ph['teacher']:.3f} | {ph['student_fwd_loss']:.3f} | "
                     f"{ph['backward']:.3f} | {ph['optimizer']:.3f} |")
    return lines


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print("\n".join(table_md(rows)))
    r = ratios(rows)
    print("ratios: " + ", ".join(f"{k} {fmt_ratio(v)}" for k, v in r.items()), flush=True)


def where_time_goes(rows: list[dict]) -> str:
    """One sentence per row: the share of each phase in its median step (the profile behind the ratios)."""
    parts = []
    for r in rows:
        ph, tot = r["phases_s"], max(sum(r["phases_s"].values()), 1e-12)
        parts.append(f"{r['name']} " + " / ".join(f"{100 * v / tot:.0f}%" for v in ph.values()))
    return ("Share of the step (teacher / student fwd+loss / backward / optimizer): " + "; ".join(parts)
            + ".  The live teacher's backbone forward is what ours_fast keeps; ours_cached drops it.")


PHASES_NOTE = ("What each phase holds differs by row, as the loss is computed: *teacher* is the teacher's work done "
               "before the student's loss -- `ours_naive` its backbone and full-vocabulary head, `ours_fast` its "
               "backbone only (its vocabulary head at the target positions runs fused with the student's inside "
               "the loss and is counted in *student fwd+loss*), `ours_cached` nothing (a cache read), `trl` "
               "nothing (TRL's `compute_loss` runs both models' forwards, all counted in *student fwd+loss*).  "
               "Compare rows by their step time; a phase column compares rows only where it holds the same work.")


def readme_text(res: dict) -> str:
    """results/perf/README.md: every table of a result JSON, the command and the must-show targets."""
    out = ["# Distillation step: completion-only head, teacher-logit cache, TRL", "",
           f"Generated by `benchmarks/perf/bench_distill.py` from `{res['out_name']}` (do not edit by hand).", "",
           f"Device: {res['device']}; torch {res['versions']['torch']}, transformers "
           f"{res['versions']['transformers']}, trl {res['versions']['trl']}; {res['repeats']} interleaved "
           f"rounds after one warm-up step per row; OMP_NUM_THREADS={res['omp_num_threads']}.", "",
           "Command (from the repo root):", "```bash", res["command"], "```", "",
           f"Models: {res['models']}.  One step = forward + backward + AdamW step of the student; loss forward "
           "KL over the target tokens.  `trl` = TRL's own `GKDTrainer.compute_loss` (lmbda 0, beta 0) driven "
           "without the Trainer loop.  Peak memory: " + res["peak_memory"] + ".  Phase columns: median seconds.", "",
           PHASES_NOTE, ""]
    for dtype, shapes in res["tables"].items():
        for shape, t in shapes.items():
            out += [f"## {dtype}, {shape} completion ({t['rows'][0]['target_tokens']} target / "
                    f"{t['rows'][0]['total_tokens']} total tokens per step)", ""]
            out += table_md(t["rows"]) + [""]
            out.append("Ratios (target tokens/s): " + ", ".join(f"{k} {fmt_ratio(v)}" for k, v in t["ratios"].items())
                       + ".  Must-show: " + ", ".join(f"{k}: {'-' if v is None else ('met' if v else 'MISSED')}"
                                                      for k, v in t["targets"].items()) + ".")
            out += [where_time_goes(t["rows"]), ""]
    for dtype, why in res["skipped_tables"].items():
        out += [f"No {dtype} table: {why}.", ""]
    la = res["load_average"]
    out += ["`ours_cached` excludes the one-time cache build (`cache_build_s` in the JSON).  Load average "
            f"(1 min) at start / end: {la['start'][0]:.1f} / {la['end'][0]:.1f} on {la['cpus']} CPUs"
            + (" -- the machine was shared while this ran: rerun on an idle machine for final numbers."
               if max(la["start"][0], la["end"][0]) > 1.5 * la["cpus"] else "."), "",
            "End to end (the demo's KD row before / after the fast path, `benchmarks/perf/e2e_kd.py`): "
            "`e2e_kd_demo.md` in this folder.  GPU: `make bench-gpu` writes `distill_step_gpu.md` and "
            "`cka_gpu.md` here (not run yet: no GPU lent so far).", ""]
    return "\n".join(out)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (default 3)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (seconds; for tests)")
    ap.add_argument("--dtypes", nargs="+", default=None, choices=["fp32", "bf16"],
                    help="default: fp32, plus bf16 where its matmul is at least half the fp32 rate")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--shapes", nargs="+", default=["short", "long"], choices=["short", "long"])
    ap.add_argument("--out", default="results/perf/distill_step.json", help="result JSON")
    ap.add_argument("--readme-only", action="store_true", help="rewrite the markdown from an existing --out "
                    "JSON without measuring (after a change to the report's text)")
    ap.add_argument("--readme", default=None, help="markdown tables (default: README.md next to a "
                    "distill_step.json --out, else --out with .md)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.readme_only:
        with open(args.out) as f:
            print(f"wrote {write_readme(args, json.load(f))} from {args.out}")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    s = QUICK if args.quick else Shapes()
    gkd = trl_compute_loss()
    rows = [r for r in args.rows if r != "trl" or gkd is not None]
    if len(rows) < len(args.rows):
        print("trl is not installed (pip install -e '.[bench]'): the trl row is skipped")
    default_dtype = "bf16" if device.type == "cuda" else "fp32"
    rates = {"fp32": matmul_gflops(device, torch.float32), "bf16": matmul_gflops(device, torch.bfloat16)}
    dtypes, skipped = choose_dtypes(args.dtypes, device, rates)
    for why in skipped.values():
        print(f"bf16 table skipped: {why}")
    load0 = os.getloadavg()
    teacher = make_model(s, s.teacher_layers, seed=0).to(device).eval().requires_grad_(False)
    models = {"teacher": teacher, "student": make_model(s, s.student_layers, seed=1).to(device).train()}
    if "bf16" in dtypes:
        models["teacher_bf16"] = make_model(s, s.teacher_layers, seed=0).to(device, torch.bfloat16).eval() \
            .requires_grad_(False)
    print(f"distillation step on {device_name(device)}; teacher {s.teacher_layers} layers, student "
          f"{s.student_layers}, hidden {s.hidden}, vocab {s.vocab}, batch {s.batch} x {s.seq}")
    tables: dict = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-distill-cache-") as cache_root:
        for dtype in dtypes:
            ctx = build_ctx(models, dtype, device, gkd)
            shapes = [(n, c) for n, c in s.completions if n in args.shapes or n == "short"]
            for i, (shape, completion) in enumerate(shapes):
                t = run_table(ctx, s, completion, rows, args.repeats, cache_root, warmup=i == 0)
                r = ratios(t)
                tables.setdefault(dtype, {})[shape] = {"rows": t, "ratios": r, "targets": targets_met(r)}
                print_table(f"{dtype}, {shape} completion ({completion} tokens per sequence)", t)
            del ctx
    res = {"benchmark": "distill_step", "device": device_name(device), "dtype": default_dtype, "shape": "short",
           "rows": tables[default_dtype]["short"]["rows"], "tables": tables,
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "trl": _trl_version(gkd), "python": platform.python_version()},
           "command": ("python -m benchmarks.perf.bench_distill "
                       + " ".join(sys.argv[1:] if argv is None else argv)).strip(),
           "repeats": args.repeats, "quick": args.quick, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "torch_threads": torch.get_num_threads(), "total_s": time.perf_counter() - t_start,
           "models": f"teacher Llama {s.teacher_layers} layers, student {s.student_layers} layers, hidden {s.hidden}, "
                     f"MLP {s.intermediate}, vocab {s.vocab}, random init; batch {s.batch} x seq {s.seq}",
           "peak_memory": ("CUDA max_memory_allocated minus the allocation at the step start" if device.type == "cuda"
                           else "process RSS sampled every 2 ms minus RSS at the step start (approximate)"),
           "out_name": os.path.basename(args.out), "matmul_gflops": rates, "skipped_tables": skipped,
           "load_average": {"start": load0, "end": os.getloadavg(), "cpus": os.cpu_count()}}
    atomic_write_json(args.out, res)
    readme = write_readme(args, res)
    print(f"\ntotal {res['total_s']:.0f} s; wrote {args.out} and {readme}")
    return 0


def write_readme(args, res: dict) -> str:
    beside = os.path.join(os.path.dirname(args.out) or ".", "README.md")
    readme = args.readme or (beside if os.path.basename(args.out) == "distill_step.json"
                             else os.path.splitext(args.out)[0] + ".md")
    atomic_write_text(readme, readme_text(res))
    return readme


def _trl_version(gkd) -> str | None:
    if gkd is None:
        return None
    import trl

    return trl.__version__


if __name__ == "__main__":
    sys.exit(main())
