"""CKA layer-pair matrix: streamed sufficient statistics vs a straightforward Gram implementation.

    python -m benchmarks.perf.bench_cka                                  # CPU, small (< 1 min)
    python -m benchmarks.perf.bench_cka --device cuda --out results/perf/cka_gpu.json   # + cka_gpu.md
                                        # (make bench-gpu; cuda defaults: n 1000 4000 16000, d 576)

Both methods compute the same [layers x layers] biased linear CKA matrix in float64 from
the same float32 "hidden states" (synthetic, related across layers and models):

* stream -- ``benchmarks.cka.CKAMatrix(estimator="linear")`` fed in batches of ``--batch``
  rows: accumulates X^T Y, X^T X, Y^T Y and column sums, centres analytically.
  Memory is independent of n: 8 * (L d)^2 bytes for the cross block.
* gram   -- the textbook route: an n x n Gram per layer (K = X X^T), double-centred
  once, then <Kc, Lc> for every pair.  Memory (2L + 2) * n^2 * 8 bytes; skipped, with a
  note, when that exceeds the memory available (or ``--max-gram-gb``).

Flop counts: stream ~ 2 n (L d)^2, gram ~ 2 L n^2 d * 2 + L^2 n^2, so the Gram route
wins for n below about L d / 2 and loses linearly in n beyond it.  Reported per n:
wall time (median of ``--repeat``), peak extra memory during the computation
(CUDA: torch.cuda.max_memory_allocated over the allocation before it; CPU: peak RSS
growth sampled every 2 ms, approximate), the speed-up gram/stream, and the largest
absolute difference between the two matrices (a correctness check).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time

import torch

from benchmarks.cka import CKAMatrix, cka_from_hsic, center_gram, linear_gram
from scd.core.results import atomic_write_json, atomic_write_text

F64 = torch.float64
CPU_DEFAULT_N = [256, 1024, 2048]
GPU_DEFAULT_N = [1000, 4000, 16000]


# ------------------------------------------------------------------ the two methods
def stream_matrix(A: list[torch.Tensor], B: list[torch.Tensor], batch: int) -> torch.Tensor:
    """A: La x [n, d], B: Lb x [n, d] -> [La, Lb] via CKAMatrix (streamed statistics)."""
    acc = CKAMatrix(len(A), len(B), "linear", device=A[0].device)
    n = A[0].shape[0]
    for s in range(0, n, batch):
        acc.update([x[s:s + batch] for x in A], [y[s:s + batch] for y in B])
    return acc.compute()


def gram_matrix(A: list[torch.Tensor], B: list[torch.Tensor]) -> torch.Tensor:
    """The straightforward baseline: one centred n x n Gram per layer, then all pairs."""
    Ka = [center_gram(linear_gram(x)) for x in A]                    # La x [n, n]
    Kb = [center_gram(linear_gram(y)) for y in B]                    # Lb x [n, n]
    hxy = torch.stack([torch.stack([(K * L).sum() for L in Kb]) for K in Ka])  # [La, Lb]
    hxx = torch.stack([K.square().sum() for K in Ka])
    hyy = torch.stack([L.square().sum() for L in Kb])
    return cka_from_hsic(hxy, hxx, hyy).cpu()


# ------------------------------------------------------------------ measurement helpers
class PeakRSS:
    """Samples this process's RSS in a thread; ``peak - start`` is the extra memory."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.start = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self.peak = self.proc.memory_info().rss
        self._stop.clear()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def extra(self) -> int:
        return self.peak - self.start


def measure(fn, device: torch.device, repeat: int) -> tuple[float, int, torch.Tensor]:
    """(median wall seconds, peak extra bytes, result) of ``fn()``."""
    times, peaks, out = [], [], None
    for _ in range(repeat):
        out = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            t = time.perf_counter()
            out = fn()
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t)
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
        else:
            with PeakRSS() as mem:
                t = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t)
            peaks.append(mem.extra)
    return statistics.median(times), max(peaks), out


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} torch threads"


def make_states(n: int, layers: int, dim: int, device: torch.device, seed: int = 0):
    """Two models' hidden states: La = Lb = layers, each [n, dim] float32, related by a shared base."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    base = torch.randn(n, 64, generator=g).to(device)
    out = []
    for _ in range(2):
        out.append([(base @ torch.randn(64, dim, generator=g).to(device)
                     + torch.randn(n, dim, generator=g).to(device)).contiguous() for _ in range(layers)])
    return out


# ------------------------------------------------------------------ main
def run(ns: list[int], layers: int, dim: int, device: torch.device, batch: int, repeat: int,
        max_gram_bytes: float | None) -> list[dict]:
    rows = []
    # warm-up (allocator, BLAS/cuBLAS initialisation) on a tiny problem
    wa, wb = make_states(64, 2, 16, device)
    stream_matrix(wa, wb, 32)
    gram_matrix(wa, wb)
    for n in ns:
        A, B = make_states(n, layers, dim, device)
        t_s, m_s, M_s = measure(lambda: stream_matrix(A, B, batch), device, repeat)
        row = {"n": n, "layers": layers, "dim": dim, "batch": batch,
               "stream_s": t_s, "stream_peak_bytes": m_s,
               "gram_s": None, "gram_peak_bytes": None, "gram_skipped": None,
               "speedup": None, "max_abs_diff": None}
        need = (2 * layers + 3) * n * n * 8
        avail = available_bytes(device) * 0.8
        limit = min(avail, max_gram_bytes) if max_gram_bytes is not None else avail
        if need > limit:
            row["gram_skipped"] = (f"needs ~{need / 2**30:.1f} GiB for {2 * layers} n x n float64 Grams, "
                                   f"limit {limit / 2**30:.1f} GiB")
        else:
            t_g, m_g, M_g = measure(lambda: gram_matrix(A, B), device, repeat)
            row.update(gram_s=t_g, gram_peak_bytes=m_g, speedup=t_g / t_s,
                       max_abs_diff=float((M_s - M_g).abs().max()))
        rows.append(row)
        print_row(row)
        del A, B
    return rows


def _mib(b):
    return "-" if b is None else f"{b / 2**20:,.0f}"


def print_header(dev_name: str, layers: int, dim: int) -> None:
    print(f"CKA layer-pair matrix ({layers} x {layers} layers, d={dim}, float64) on {dev_name}")
    print(f"{'n':>7} | {'stream s':>9} | {'stream MiB':>10} | {'gram s':>9} | {'gram MiB':>9} | "
          f"{'speed-up':>8} | {'max |diff|':>10}")
    print("-" * 82)


def print_row(r: dict) -> None:
    g = "skipped" if r["gram_s"] is None else f"{r['gram_s']:.3f}"
    sp = "-" if r["speedup"] is None else f"{r['speedup']:.1f}x"
    diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
    print(f"{r['n']:>7} | {r['stream_s']:>9.3f} | {_mib(r['stream_peak_bytes']):>10} | {g:>9} | "
          f"{_mib(r['gram_peak_bytes']):>9} | {sp:>8} | {diff:>10}", flush=True)
    if r["gram_skipped"]:
        print(f"        gram skipped: {r['gram_skipped']}")


def table_md(res: dict) -> str:
    """A result JSON as markdown (written next to ``--out``): the command and one row per n."""
    out = [f"# CKA layer-pair matrix: streamed vs Gram ({res['device']})", "",
           "Generated by `benchmarks/perf/bench_cka.py` (do not edit by hand).  Command:", "", "```bash",
           res["command"], "```", "", f"{res['layers']} x {res['layers']} layers, d={res['dim']}, float64, "
           f"median of {res['repeat']}; peak memory: {res['peak_memory']}; torch {res['torch']}.", "",
           "| n | stream s | stream MiB | gram s | gram MiB | speed-up | max abs diff |",
           "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        g = "skipped" if r["gram_s"] is None else f"{r['gram_s']:.3f}"
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.1f}x"
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        out.append(f"| {r['n']} | {r['stream_s']:.3f} | {_mib(r['stream_peak_bytes'])} | {g} | "
                   f"{_mib(r['gram_peak_bytes'])} | {sp} | {diff} |")
    return "\n".join(out + [""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=None,
                    help=f"sample counts (default cpu {CPU_DEFAULT_N}, cuda {GPU_DEFAULT_N})")
    ap.add_argument("--layers", type=int, default=8, help="layers per model (default 8)")
    ap.add_argument("--dim", type=int, default=None, help="hidden size (default cpu 256, cuda 576)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=2048, help="rows per streamed batch (default 2048)")
    ap.add_argument("--repeat", type=int, default=None, help="timed repeats, median reported (cpu 1, cuda 3)")
    ap.add_argument("--max-gram-gb", type=float, default=None, help="skip the Gram baseline above this memory")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    cpu = device.type == "cpu"
    ns = args.n or (CPU_DEFAULT_N if cpu else GPU_DEFAULT_N)
    dim = args.dim or (256 if cpu else 576)
    repeat = args.repeat or (1 if cpu else 3)
    name = device_name(device)
    print_header(name, args.layers, dim)
    t0 = time.perf_counter()
    rows = run(ns, args.layers, dim, device, args.batch, repeat,
               args.max_gram_gb * 2**30 if args.max_gram_gb is not None else None)
    total = time.perf_counter() - t0
    print(f"total {total:.1f} s; stream memory does not depend on n, gram memory grows as n^2")
    if args.out:
        res = {
            "benchmark": "cka_layer_pair_matrix", "device": name, "torch": torch.__version__,
            "command": "python -m benchmarks.perf.bench_cka " + " ".join(sys.argv[1:] if argv is None else argv),
            "layers": args.layers, "dim": dim, "batch": args.batch, "repeat": repeat,
            "peak_memory": "cuda max_memory_allocated delta" if not cpu else "sampled RSS delta (approximate)",
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows, "total_s": total,
        }
        atomic_write_json(args.out, res)
        atomic_write_text(os.path.splitext(args.out)[0] + ".md", table_md(res))
        print(f"wrote {args.out} and its .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
