"""Slots (groups of GPUs, or CPU workers) and the command + environment that launch a run on one."""
from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from benchmarks.grid.spec import PlannedRun
from scd.core.config import ConfigError

DEFAULT_COMMANDS = {
    "local": "{python} -m scd run {config} --run-dir {run_dir}",
    "torchrun": "{python} -m torch.distributed.run --standalone --nproc_per_node {nproc} "
                "-m scd run {config} --run-dir {run_dir}",
    # --include pins the slot's GPUs (deepspeed ignores CUDA_VISIBLE_DEVICES when given flags)
    "deepspeed": "{deepspeed} --include localhost:{gpus} --master_port {port} --module scd run {config} "
                 "--run-dir {run_dir}",
    "deepspeed-cpu": "{deepspeed} --num_gpus {nproc} --master_port {port} --module scd run {config} "
                     "--run-dir {run_dir}",
}


@dataclasses.dataclass(frozen=True)
class Slot:
    index: int
    gpus: tuple[str, ...] = ()  # CUDA device ids for this slot; () = CPU worker

    def describe(self) -> str:
        return f"slot {self.index} (gpu {','.join(self.gpus)})" if self.gpus else f"slot {self.index} (cpu)"


def detect_gpus(fake_gpus: int | None = None, env: dict | None = None) -> list[str]:
    """GPU ids this node may use: --fake-gpus K, else CUDA_VISIBLE_DEVICES, else the driver's list."""
    env = os.environ if env is None else env
    if fake_gpus is not None:
        return [str(i) for i in range(fake_gpus)]
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        ids = [x.strip() for x in cvd.split(",") if x.strip()]
        return [] if not ids or ids[0] == "-1" else ids
    return driver_gpus()


def driver_gpus() -> list[str]:
    """GPU indices the NVIDIA driver lists (``nvidia-smi``; without it, the /dev/nvidiaN device
    files).  No torch import: that costs seconds on every grid command."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        found = [p.name[len("nvidia"):] for p in Path("/dev").glob("nvidia[0-9]*")]
        return sorted((i for i in found if i.isdigit()), key=int)
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:  # broken driver: CPU
        return []
    return [x.strip() for x in out.stdout.splitlines() if x.strip().isdigit()]


def make_slots(gpus: list[str], gpus_per_run: int, workers: int) -> list[Slot]:
    """Groups of ``gpus_per_run`` GPUs, or ``workers`` CPU slots when no GPU is visible."""
    if not gpus:
        return [Slot(i) for i in range(max(1, workers))]
    if len(gpus) < gpus_per_run:
        raise ConfigError(f"gpus_per_run is {gpus_per_run} but only {len(gpus)} GPU(s) are visible "
                          f"({','.join(gpus)}); lower gpus_per_run or use more GPUs")
    n = len(gpus) // gpus_per_run
    return [Slot(i, tuple(gpus[i * gpus_per_run:(i + 1) * gpus_per_run])) for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command_template(launcher: str, command: str | None, slot: Slot) -> str:
    if command:
        return command
    if launcher == "deepspeed" and not slot.gpus:
        return DEFAULT_COMMANDS["deepspeed-cpu"]
    return DEFAULT_COMMANDS[launcher]


def build_command(template: str, *, config: Path, run_dir: Path, slot: Slot, nproc: int,
                  run_id: str = "") -> list[str]:
    """Split ``template`` into argv and fill {python} {config} {run_dir} {nproc} {gpus} {port}
    {run_id} {deepspeed}; other braces are left alone."""
    ds = Path(sys.executable).parent / "deepspeed"
    values = {"python": sys.executable, "config": str(config), "run_dir": str(run_dir), "nproc": str(nproc),
              "gpus": ",".join(slot.gpus), "run_id": run_id,
              "deepspeed": str(ds) if ds.exists() else "deepspeed"}
    argv = []
    for tok in shlex.split(template):
        if "{port}" in tok:
            tok = tok.replace("{port}", str(free_port()))
        for k, v in values.items():
            tok = tok.replace("{" + k + "}", v)
        argv.append(tok)
    return argv


def child_env(slot: Slot, n_slots: int, run: PlannedRun, grid_name: str, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    if slot.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(slot.gpus)
    elif "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, n_slots)))
    env["PYTHONUNBUFFERED"] = "1"
    env["SCD_GRID"] = grid_name
    env["SCD_RUN_ID"] = run.run_id
    env["SCD_SLOT"] = str(slot.index)
    return env

