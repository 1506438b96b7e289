"""Grid runner: expand a grid file into resolved run configs, schedule them on GPU
slots / CPU workers, resume, and build the leaderboard when done.

    python -m benchmarks.grid configs/grids/demo.yaml              # run (resumable)
    python -m benchmarks.grid GRID.yaml --dry-run                  # print the plan only
    python -m benchmarks.grid GRID.yaml --shard 0/4                # one of 4 shards
    python -m benchmarks.grid GRID.yaml --slurm --shards 4         # write a Slurm array script

The grid file format, the scheduling rules and the results layout are documented in
docs/grid.md.  Reads top to bottom:

1. ``GridConfig`` (the grid file, ``recipe: grid``) and :func:`load_grid`.
2. :func:`expand_grid` -> :class:`Plan` (every run's fully resolved, validated config;
   ``run_id`` = hash of it) and :func:`write_plan` (config.yaml per run + plan.json,
   written before anything starts).
3. Slots (:func:`detect_gpus`, :func:`make_slots`) and launch commands
   (:func:`build_command`).
4. Claims (:class:`Claim`): an ``O_CREAT|O_EXCL`` lock file per run directory so
   concurrent runners (shards, workers, Slurm tasks) run every run exactly once.
5. :class:`GridRunner`: keeps every slot busy, records failures the child could not
   record, prints progress, resumes interrupted runs.
6. :func:`slurm_script` and :func:`main` (command line).
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import copy
import dataclasses
import importlib
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Literal, TextIO

from scd.core.config import (RECIPES, ConfigError, Source, dump_yaml, from_dict, load_yaml, register_recipe,
                             to_dict)
from scd.core.registry import did_you_mean
from scd.core.results import (SCHEMA_VERSION, ResultsError, atomic_write_json, atomic_write_text, config_hash,
                              git_sha, read_json, safe_join, validate_run_record)

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
LOCK_NAME = ".lock"
CHILD_NAME = ".lock.child"
INTERRUPTED_MARK = "interrupted (KeyboardInterrupt)"  # scd.cli records Ctrl-C as failed; we resume it
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# =============================================================================== 1. grid file
@dataclasses.dataclass(frozen=True)
class SlurmConfig:
    """Options of the generated Slurm array script (one array task per shard)."""

    shards: int = 1
    partition: str | None = None
    account: str | None = None
    time: str = "24:00:00"
    gpus_per_node: int = 0  # 0: CPU job
    cpus_per_task: int = 8
    mem: str | None = None
    extra: tuple[str, ...] = ()  # more "#SBATCH" options, e.g. "--qos=high"
    setup: tuple[str, ...] = ()  # shell lines before the run, e.g. "source .venv/bin/activate"


_DEFER_CHECKS: contextvars.ContextVar[bool] = contextvars.ContextVar("grid_defer_checks", default=False)


@dataclasses.dataclass(frozen=True)
class GridConfig:
    """A grid file (``recipe: grid``); see docs/grid.md for every key."""

    recipe: str = "grid"
    name: str = ""
    description: str = ""
    base: str | None = None  # path of the base run config (relative to cwd or the grid file)
    base_config: dict | None = None  # or the base config inline
    baseline: str | None = None  # method that leaderboard deltas are computed against
    seeds: tuple[int, ...] = (0,)
    runs: tuple[dict, ...] = ({},)  # variants: overrides on top of base (dotted keys allowed)
    product: dict = dataclasses.field(default_factory=dict)  # cartesian axes {dotted.key: [values]}
    zip: dict = dataclasses.field(default_factory=dict)  # zipped axes (equal lengths)
    eval: dict | None = None  # merged into every run's `eval` section (same evaluation for all)
    gpus_per_run: int = 1
    workers: int = 1  # parallel runs when no GPU is visible
    launcher: Literal["local", "torchrun", "deepspeed"] = "local"
    command: str | None = None  # launch command template (default depends on launcher)
    timeout_s: float | None = None  # per run wall-clock limit
    slurm: SlurmConfig = SlurmConfig()

    def __post_init__(self) -> None:
        if not _DEFER_CHECKS.get():
            problems = grid_problems(self)
            if problems:
                key, msg = problems[0]
                raise ValueError(f"{key}: {msg}")


def grid_problems(g: GridConfig) -> list[tuple[str, str]]:
    """Semantic checks of a grid (types are checked by the config loader): [(key, message)]."""
    out: list[tuple[str, str]] = []
    if g.recipe != "grid":
        out.append(("recipe", f"a grid file must say `recipe: grid`, got {g.recipe!r}"))
    if not g.name:
        out.append(("name", "required: the grid's name (results go to results/<name>/)"))
    elif not _NAME_RE.match(g.name):
        out.append(("name", f"{g.name!r} must be a plain directory name (letters, digits, . _ -)"))
    if (g.base is None) == (g.base_config is None):
        out.append(("base", "give exactly one of `base: path/to/config.yaml` or an inline `base_config: {...}`"))
    if not g.seeds:
        out.append(("seeds", "needs at least one seed"))
    elif len(set(g.seeds)) != len(g.seeds):
        out.append(("seeds", f"seeds must be unique, got {list(g.seeds)}"))
    if not g.runs:
        out.append(("runs", "needs at least one variant (use `runs: [{}]` for the base config alone)"))
    for i, v in enumerate(g.runs):
        if not isinstance(v, dict):
            out.append((f"runs[{i}]", f"each variant is a mapping of overrides, got {v!r}"))
        elif "seed" in v or "grid" in v:
            out.append((f"runs[{i}]", "set seeds with the grid's `seeds:` list, not per variant"))
    for axis_kind in ("product", "zip"):
        axes = getattr(g, axis_kind)
        for key, values in axes.items():
            if not isinstance(values, (list, tuple)) or not values:
                out.append((f"{axis_kind}.{key}", f"an axis needs a non-empty list of values, got {values!r}"))
            if str(key).split(".")[0] in ("seed", "grid"):
                out.append((f"{axis_kind}.{key}", "seeds are set with `seeds:`; `grid` is the grid name"))
    lengths = {k: len(v) for k, v in g.zip.items() if isinstance(v, (list, tuple))}
    if len(set(lengths.values())) > 1:
        out.append(("zip", f"zipped axes must have equal lengths, got {lengths}"))
    overlap = set(g.product) & set(g.zip)
    if overlap:
        out.append(("zip", f"axis {sorted(overlap)[0]!r} is both a product and a zip axis"))
    if g.gpus_per_run < 1:
        out.append(("gpus_per_run", f"must be >= 1, got {g.gpus_per_run}"))
    if g.workers < 1:
        out.append(("workers", f"must be >= 1, got {g.workers}"))
    if g.timeout_s is not None and g.timeout_s <= 0:
        out.append(("timeout_s", f"must be > 0, got {g.timeout_s}"))
    if g.slurm.shards < 1:
        out.append(("slurm.shards", f"must be >= 1, got {g.slurm.shards}"))
    if g.command is not None:
        try:
            shlex.split(g.command)
        except ValueError as e:
            out.append(("command", f"cannot split into arguments: {e}"))
    return out


register_recipe("grid", GridConfig)  # `scd validate` checks grid files too; run them with benchmarks.grid


def load_grid(path: str | os.PathLike, overrides: list[str] | None = None) -> GridConfig:
    """Read and validate a grid file; errors name file:line: key."""
    from scd.core.config import apply_overrides

    data, source = load_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides)
    if data.get("recipe", "grid") != "grid":
        raise ConfigError(f"{path}:{source.line(data, 'recipe') or 1}: key 'recipe': this is a "
                          f"'{data.get('recipe')}' config, not a grid; run it with `python -m scd run {path}`")
    data.setdefault("recipe", "grid")
    token = _DEFER_CHECKS.set(True)
    try:
        grid = from_dict(GridConfig, data, source)
    finally:
        _DEFER_CHECKS.reset(token)
    problems = grid_problems(grid)
    if problems:
        key, msg = problems[0]
        top = key.split("[")[0].split(".")[0]
        line = source.line(data, top)
        if key.startswith("runs[") and isinstance(data.get("runs"), list):
            i = int(key[5:key.index("]")])
            v = data["runs"][i] if i < len(data["runs"]) else None
            if isinstance(v, dict) and v:
                line = source.line(v, next(iter(v))) or line
        raise ConfigError(f"{path}:{line or 1}: key '{key}': {msg}")
    return grid


# ================================================================================ 2. expansion
@dataclasses.dataclass
class PlannedRun:
    """One fully resolved run of the grid."""

    run_id: str
    index: int  # position in plan order
    variant: int  # index into grid.runs
    method: str
    seed: int
    overrides: dict  # the variant's overrides (as written)
    axes: dict  # dotted key -> value from product/zip axes
    recipe: str
    config: dict  # fully resolved, validated (defaults filled in)
    config_yaml: str

    def label(self) -> str:
        extra = " ".join(f"{k}={_short(v)}" for k, v in self.axes.items())
        return f"{self.method} seed={self.seed}" + (f" {extra}" if extra else "")

    def summary(self) -> dict:
        return {"run_id": self.run_id, "index": self.index, "method": self.method, "seed": self.seed,
                "variant": self.variant, "overrides": self.overrides, "axes": self.axes, "recipe": self.recipe,
                "config": f"{self.run_id}/config.yaml"}


@dataclasses.dataclass
class Plan:
    grid: GridConfig
    path: Path | None
    runs: list[PlannedRun]

    @property
    def name(self) -> str:
        return self.grid.name

    def shard(self, i: int, n: int) -> list[PlannedRun]:
        """Deterministic partition: sorted run ids, every n-th starting at i; plan order kept."""
        ids = sorted(r.run_id for r in self.runs)
        mine = {rid for j, rid in enumerate(ids) if j % n == i}
        return [r for r in self.runs if r.run_id in mine]

    def to_json(self) -> dict:
        g = self.grid
        return {"grid": g.name, "description": g.description, "baseline": g.baseline,
                "source": str(self.path) if self.path else None, "seeds": list(g.seeds),
                "n_runs": len(self.runs), "launcher": g.launcher, "gpus_per_run": g.gpus_per_run,
                "runs": [r.summary() for r in self.runs]}


def _short(v: Any) -> str:
    return json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else str(v)


def set_dotted(data: dict, key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict (creating mappings); mappings merge, anything else replaces."""
    parts = str(key).split(".")
    node = data
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    leaf = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):
        for k, v in value.items():
            set_dotted(node[leaf], k, v)
    else:
        node[leaf] = copy.deepcopy(value)


def apply_mapping(data: dict, overrides: dict) -> dict:
    """Return a copy of ``data`` with every (possibly dotted, possibly nested) override applied."""
    out = copy.deepcopy(data)
    for k, v in overrides.items():
        set_dotted(out, k, v)
    return out


def _resolve_base_path(base: str, grid_path: Path | None) -> Path:
    p = Path(base)
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = [Path.cwd() / p]
        if grid_path is not None:
            candidates.append(grid_path.parent / p)
        candidates.append(Path(__file__).resolve().parents[1] / p)  # repository root
    for c in candidates:
        if c.is_file():
            return c
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise ConfigError(f"{grid_path or 'grid'}: key 'base': config file {base!r} not found (tried {tried})")


def recipe_spec(name: str, where: str = "grid"):
    """The registered recipe ``name``; imports a built-in recipe's module only when needed."""
    from scd import recipes

    builtin = getattr(recipes, "BUILTIN", {})
    if name not in RECIPES and hasattr(recipes, "ensure"):
        recipes.ensure(name)
    if name not in RECIPES:
        known = sorted(set(RECIPES.names()) | set(builtin))
        raise ConfigError(f"{where}: key 'base': unknown recipe '{name}'{did_you_mean(name, known)}; "
                          f"known: {', '.join(known)} (a user recipe: pass --import MODULE)")
    return RECIPES.get(name)


def _axis_combos(grid: GridConfig) -> list[dict]:
    prod_keys = list(grid.product)
    prod = [dict(zip(prod_keys, vals)) for vals in itertools.product(*(grid.product[k] for k in prod_keys))]
    zip_keys = list(grid.zip)
    n_zip = len(grid.zip[zip_keys[0]]) if zip_keys else 0
    zipped = [{k: grid.zip[k][i] for k in zip_keys} for i in range(n_zip)] or [{}]
    return [{**p, **z} for p in prod for z in zipped]


def expand_grid(grid: GridConfig, grid_path: str | os.PathLike | None = None) -> Plan:
    """Every run's fully resolved config: base < eval block < variant < axes < seed/grid.

    Each is validated by its recipe's dataclass (so a typo in any variant fails here,
    before anything starts).  ``run_id`` = ``config_hash`` of the resolved config
    without ``grid`` (the convention of ``scd.core.train.start_run``: the same
    config has the same id in any grid).  Order: seed-major, then variants, then axes.
    """
    gpath = Path(grid_path) if grid_path is not None else None
    where = str(gpath) if gpath else "grid"
    if grid.base is not None:
        bpath = _resolve_base_path(grid.base, gpath)
        base, _ = load_yaml(bpath)
    else:
        base = copy.deepcopy(grid.base_config or {})
    if "recipe" not in base:
        raise ConfigError(f"{where}: key 'base': the base config has no top-level `recipe:` key")
    rname = base["recipe"]
    if rname == "grid":
        raise ConfigError(f"{where}: key 'base': the base config is itself a grid")
    spec = recipe_spec(rname, where)
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    if "seed" not in fields:
        raise ConfigError(f"{where}: key 'seeds': recipe '{rname}' has no `seed` field to set")
    if grid.eval is not None:
        if "eval" not in fields:
            raise ConfigError(f"{where}: key 'eval': recipe '{rname}' has no `eval` section "
                              f"(fields: {', '.join(sorted(fields))})")
        base = apply_mapping(base, {"eval": grid.eval})
    combos = _axis_combos(grid)
    runs: list[PlannedRun] = []
    seen: dict[str, str] = {}
    for seed in grid.seeds:
        for vi, variant in enumerate(grid.runs):
            for axes in combos:
                data = apply_mapping(base, variant)
                data = apply_mapping(data, axes)
                data["seed"] = seed
                if "grid" in fields:
                    data["grid"] = grid.name
                if data.get("recipe") != rname:
                    raise ConfigError(f"{where}: key 'runs[{vi}]': a variant cannot change the recipe "
                                      f"('{rname}' -> '{data.get('recipe')}'); use another grid")
                desc = f"runs[{vi}] seed={seed}" + "".join(f" {k}={_short(v)}" for k, v in axes.items())
                try:
                    cfg = from_dict(spec.config_cls, data, Source())
                except ConfigError as e:
                    raise ConfigError(f"{where}: {desc}: {e}") from None
                resolved = to_dict(cfg)
                run_id = config_hash({k: v for k, v in resolved.items() if k != "grid"})
                if run_id in seen:
                    raise ConfigError(f"{where}: {desc} resolves to the same config as {seen[run_id]} "
                                      f"(run_id {run_id}); remove the duplicate")
                seen[run_id] = desc
                method = str(resolved.get("method", rname))
                runs.append(PlannedRun(run_id=run_id, index=len(runs), variant=vi, method=method, seed=seed,
                                       overrides=copy.deepcopy(variant), axes=dict(axes), recipe=rname,
                                       config=resolved, config_yaml=dump_yaml(cfg)))
    if grid.baseline is not None and grid.baseline not in {r.method for r in runs}:
        methods = sorted({r.method for r in runs})
        raise ConfigError(f"{where}: key 'baseline': no run has method '{grid.baseline}'"
                          f"{did_you_mean(grid.baseline, methods)}; methods: {', '.join(methods)}")
    return Plan(grid=grid, path=gpath, runs=runs)


def grid_dir(results_dir: str | os.PathLike, grid_name: str) -> Path:
    return safe_join(results_dir, grid_name)


def write_plan(plan: Plan, results_dir: str | os.PathLike) -> Path:
    """Write every run's config.yaml and plan.json (atomically; unchanged files untouched)."""
    gdir = grid_dir(results_dir, plan.name)
    for r in plan.runs:
        cfg_path = safe_join(gdir, r.run_id) / "config.yaml"
        try:
            same = cfg_path.read_text(encoding="utf-8") == r.config_yaml
        except OSError:
            same = False
        if not same:
            atomic_write_text(cfg_path, r.config_yaml)
    _write_if_changed(gdir / "plan.json", json.dumps(plan.to_json(), indent=2, default=str) + "\n")
    _write_if_changed(gdir / "grid.yaml", dump_yaml(plan.grid))
    return gdir


def _write_if_changed(path: Path, text: str) -> None:
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except OSError:
        pass
    atomic_write_text(path, text)


# =========================================================================== 3. slots/commands
@dataclasses.dataclass(frozen=True)
class Slot:
    index: int
    gpus: tuple[str, ...] = ()  # CUDA device ids for this slot; () = CPU worker

    def describe(self) -> str:
        return f"slot {self.index} (gpu {','.join(self.gpus)})" if self.gpus else f"slot {self.index} (cpu)"


def detect_gpus(fake_gpus: int | None = None, env: dict | None = None) -> list[str]:
    """GPU ids this node may use: --fake-gpus K, else CUDA_VISIBLE_DEVICES, else torch."""
    env = os.environ if env is None else env
    if fake_gpus is not None:
        return [str(i) for i in range(fake_gpus)]
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        ids = [x.strip() for x in cvd.split(",") if x.strip()]
        return [] if not ids or ids[0] == "-1" else ids
    if shutil.which("nvidia-smi") is None and not Path("/dev/nvidia0").exists():
        return []  # no NVIDIA driver: skip importing torch (seconds)
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001  (no torch / broken driver: CPU)
        return []


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


# ================================================================================ 4. claims
def _proc_stat(pid: int) -> dict | None:
    """state, pgrp, session, start (clock ticks since boot) of a process (Linux /proc)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2:].split()
    return {"state": rest[0], "ppid": int(rest[1]), "pgrp": int(rest[2]), "session": int(rest[3]),
            "start": int(rest[19])}


def pid_alive(pid: int, start: int | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, when known, started at ``start`` (no pid reuse)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    st = _proc_stat(pid)
    if st is None:  # no /proc (not Linux): trust kill(0); else it vanished meanwhile
        return not Path("/proc/self/stat").exists()
    if st["state"] in ("Z", "X"):
        return False
    return start is None or st["start"] == start


def _kill_session_leftovers(child: dict) -> int:
    """SIGKILL processes left in a dead runner's child session (e.g. torchrun workers).
    Only processes of that session that started at or after the child are touched."""
    sid, start = child.get("sid"), child.get("start")
    if not isinstance(sid, int) or not isinstance(start, int) or not Path("/proc").is_dir():
        return 0
    killed = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        st = _proc_stat(int(d.name))
        if st and st["session"] == sid and st["start"] >= start and st["state"] not in ("Z", "X"):
            with contextlib.suppress(OSError):
                os.kill(int(d.name), signal.SIGKILL)
                killed += 1
    return killed


@contextlib.contextmanager
def file_lock(path: Path):
    """Exclusive advisory lock (serialises reclaimers / leaderboard writers on a host)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover  (non-POSIX)
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class Claim:
    """Exclusive claim on a run directory: ``<run_dir>/.lock`` created with O_CREAT|O_EXCL,
    holding pid, host, process start time, a unique token and the time.

    A lock is stale when its process is dead on this host (or a zombie, or the pid was
    reused), when it is unreadable and older than 5 s (claimer died between create and
    write), or when another host's lock has not been heart-beaten for ``stale_after_s``.
    Stale locks are reclaimed by renaming them aside and checking the renamed bytes
    are the ones judged stale (so a fresh lock is never removed), serialised per host
    with flock.  Processes left in the dead runner's child session are killed first.
    """

    def __init__(self, run_dir: Path, fd_info: dict):
        self.run_dir = run_dir
        self.path = run_dir / LOCK_NAME
        self.info = fd_info

    # ---------------------------------------------------------------- acquire
    @classmethod
    def acquire(cls, run_dir: Path, *, stale_after_s: float = 600.0, runner: str = "") -> "Claim | None":
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = run_dir / LOCK_NAME
        me = _proc_stat(os.getpid())
        info = {"pid": os.getpid(), "host": socket.gethostname(), "start": me["start"] if me else None,
                "token": uuid.uuid4().hex, "time": time.time(), "runner": runner}
        for _ in range(4):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raw, held, mtime = _read_lock(lock)
                if raw is None:
                    continue  # vanished: try again
                if not _is_stale(held, mtime, stale_after_s):
                    return None
                if not _reclaim(lock, raw, held):
                    return None
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(info))
                f.flush()
                os.fsync(f.fileno())
            return cls(run_dir, info)
        return None

    # ---------------------------------------------------------------- owner side
    def set_child(self, pid: int) -> None:
        st = _proc_stat(pid)
        child = {"token": self.info["token"], "pid": pid, "sid": pid,  # start_new_session: sid == pid
                 "start": st["start"] if st else None}
        with contextlib.suppress(OSError):
            atomic_write_json(self.run_dir / CHILD_NAME, child)

    def heartbeat(self) -> None:
        with contextlib.suppress(OSError):
            os.utime(self.path)

    def release(self) -> None:
        raw, held, _ = _read_lock(self.path)
        if held is not None and held.get("token") == self.info["token"]:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        try:
            mine = read_json(self.run_dir / CHILD_NAME).get("token") == self.info["token"]
        except (OSError, ValueError, AttributeError):
            mine = False
        if mine:
            with contextlib.suppress(OSError):
                os.unlink(self.run_dir / CHILD_NAME)


def _read_lock(lock: Path) -> tuple[bytes | None, dict | None, float]:
    try:
        raw = lock.read_bytes()
        mtime = lock.stat().st_mtime
    except FileNotFoundError:
        return None, None, 0.0
    try:
        held = json.loads(raw)
        if not isinstance(held, dict):
            held = None
    except ValueError:
        held = None
    return raw, held, mtime


def _is_stale(held: dict | None, mtime: float, stale_after_s: float) -> bool:
    age = time.time() - mtime
    if held is None or not isinstance(held.get("pid"), int):
        return age > 5.0
    if held.get("host") == socket.gethostname():
        return not pid_alive(held["pid"], held.get("start"))
    return age > stale_after_s


def describe_lock(run_dir: Path) -> str:
    _, held, _ = _read_lock(run_dir / LOCK_NAME)
    if not held:
        return "another runner"
    return f"{held.get('host')}:{held.get('pid')}"


def _reclaim(lock: Path, raw: bytes, held: dict | None) -> bool:
    """Remove a stale lock whose bytes are ``raw``; False if it turned out to be fresh."""
    with file_lock(lock.parent.parent / ".claims.flock"):
        aside = lock.with_name(f"{LOCK_NAME}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(lock, aside)
        except FileNotFoundError:
            return True  # someone removed it; try to create
        try:
            if aside.read_bytes() != raw:  # it was replaced by a fresh claim: put it back
                with contextlib.suppress(FileExistsError):
                    os.link(aside, lock)
                return False
            if held and held.get("host") == socket.gethostname():
                try:
                    child = read_json(lock.parent / CHILD_NAME)
                except (OSError, ValueError):
                    child = None
                if isinstance(child, dict) and child.get("token") == held.get("token"):
                    if _kill_session_leftovers(child):
                        time.sleep(0.2)
            with contextlib.suppress(OSError):
                os.unlink(lock.parent / CHILD_NAME)
            return True
        finally:
            with contextlib.suppress(OSError):
                os.unlink(aside)


# ================================================================================ 5. runner
def run_status(run_dir: Path) -> str:
    """'missing' | 'ok' | 'failed' | 'diverged' | 'running' | 'interrupted' | 'corrupt'."""
    p = run_dir / "run.json"
    if not p.exists():
        return "missing"
    try:
        rec = read_json(p)
        status = rec.get("status")
    except (OSError, ValueError, AttributeError):
        return "corrupt"
    if status == "failed" and INTERRUPTED_MARK in str(rec.get("error") or ""):
        return "interrupted"
    return status if status in ("ok", "failed", "diverged", "running") else "corrupt"


def log_tail(path: Path, offset: int = 0, max_lines: int = 40, max_chars: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(offset, 0))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    lines = text.splitlines()[-max_lines:]
    return "\n".join(lines)[-max_chars:]


def _fmt_dur(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


@dataclasses.dataclass
class _Active:
    run: PlannedRun
    slot: Slot
    claim: Claim
    proc: subprocess.Popen
    started: float
    log_offset: int
    log_file: Any
    killed_for_timeout: bool = False
    term_sent: float | None = None


@dataclasses.dataclass
class GridResult:
    ok: list[str] = dataclasses.field(default_factory=list)  # finished ok in this session
    failed: list[str] = dataclasses.field(default_factory=list)  # failed/diverged in this session
    skipped_ok: list[str] = dataclasses.field(default_factory=list)  # already finished
    skipped_failed: list[str] = dataclasses.field(default_factory=list)  # failed earlier, not retried
    elsewhere: list[str] = dataclasses.field(default_factory=list)  # claimed by another runner
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if (self.failed or self.skipped_failed) else 0


def _pdeathsig(parent: int):
    """preexec_fn: the child gets SIGKILL when the runner dies (Linux), so a kill -9 of the
    runner never leaves an orphan training in a run directory that a restart reclaims."""
    def setup() -> None:
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                libc = ctypes.CDLL("libc.so.6", use_errno=True)
                libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
            except Exception:  # noqa: BLE001
                pass
            if os.getppid() != parent:  # runner already gone
                os._exit(1)
    return setup


class GridRunner:
    """Keeps every slot busy until the queue is empty; see module doc."""

    def __init__(self, plan: Plan, results_dir: str | os.PathLike, slots: list[Slot], *,
                 command: str | None = None, retry_failed: bool = False, shard: tuple[int, int] = (0, 1),
                 timeout_s: float | None = None, progress_every: float = 30.0, heartbeat_s: float = 30.0,
                 stale_after_s: float = 600.0, stream: TextIO | None = None, poll_s: float = 0.1):
        self.plan = plan
        self.grid = plan.grid
        self.results_dir = Path(results_dir)
        self.gdir = grid_dir(results_dir, plan.name)
        self.slots = slots
        self.command = command or self.grid.command
        self.retry_failed = retry_failed
        self.shard = shard
        self.timeout_s = timeout_s if timeout_s is not None else self.grid.timeout_s
        self.progress_every = progress_every
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.stream = stream if stream is not None else sys.stderr
        self.poll_s = poll_s
        self.runner_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._stop: int | None = None
        self.durations: list[float] = []

    # ------------------------------------------------------------------ output
    def emit(self, msg: str) -> None:
        print(f"[grid {self.grid.name} {time.strftime('%H:%M:%S')}] {msg}", file=self.stream, flush=True)

    def run_dir(self, run: PlannedRun) -> Path:
        return safe_join(self.gdir, run.run_id)

    # ------------------------------------------------------------------ queue
    def initial_queue(self, runs: list[PlannedRun], res: GridResult) -> deque:
        queue: deque = deque()
        for r in runs:
            st = run_status(self.run_dir(r))
            if st == "ok":
                res.skipped_ok.append(r.run_id)
            elif st in ("failed", "diverged") and not self.retry_failed:
                res.skipped_failed.append(r.run_id)
            else:
                queue.append(r)
        return queue

    def _still_wanted(self, run: PlannedRun, t0: float) -> str | None:
        """Re-check after claiming (another runner may have finished it meanwhile)."""
        rd = self.run_dir(run)
        st = run_status(rd)
        if st == "ok":
            return "ok"
        if st in ("failed", "diverged"):
            if not self.retry_failed:
                return st
            with contextlib.suppress(OSError):
                if (rd / "run.json").stat().st_mtime >= t0:  # retried by another runner this session
                    return st
        return None

    # ------------------------------------------------------------------ launch
    def launch(self, run: PlannedRun, slot: Slot, claim: Claim) -> _Active:
        rd = self.run_dir(run)
        cfg_path = rd / "config.yaml"
        if not cfg_path.exists():  # plan written before start; be robust to a deleted file
            atomic_write_text(cfg_path, run.config_yaml)
        nproc = (len(slot.gpus) or self.grid.gpus_per_run) if self.grid.launcher != "local" else 1
        template = command_template(self.grid.launcher, self.command, slot)
        argv = build_command(template, config=cfg_path, run_dir=rd, slot=slot, nproc=nproc, run_id=run.run_id)
        self._reset_failed_record(rd)
        log_path = rd / "log.txt"
        log_file = open(log_path, "ab")
        offset = log_file.tell()
        attempt = (f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} runner {self.runner_id} {slot.describe()}: "
                   f"{shlex.join(argv)}\n")
        log_file.write(attempt.encode())
        log_file.flush()
        env = child_env(slot, len(self.slots), run, self.grid.name)
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, preexec_fn=_pdeathsig(os.getpid()))
        claim.set_child(proc.pid)
        return _Active(run, slot, claim, proc, time.time(), offset, log_file)

    def _reset_failed_record(self, rd: Path) -> None:
        """Before re-running a failed/diverged (or interrupted) run: status back to running and
        the previous failure's fields removed, so a recipe that updates run.json in place does
        not carry a stale error into an ok record, and a kill now means 'resume', not 'failed'."""
        try:
            rec = read_json(rd / "run.json")
        except (OSError, ValueError):
            return
        if isinstance(rec, dict) and rec.get("status") in ("failed", "diverged"):
            for k in ("log_tail", "exit_code", "traceback_tail", "diverged_at"):
                rec.pop(k, None)
            rec.update(status="running", error=None)
            atomic_write_json(rd / "run.json", rec)

    # ------------------------------------------------------------------ finish
    def finalize(self, act: _Active, rc: int) -> str:
        """Status of a finished child; record a failure the child could not record."""
        rd = self.run_dir(act.run)
        tail = log_tail(rd / "log.txt", act.log_offset)
        rec = None
        with contextlib.suppress(OSError, ValueError):
            rec = validate_run_record(read_json(rd / "run.json"), str(rd / "run.json"))
        status = rec.get("status") if rec else None
        if status == "ok" and not act.killed_for_timeout:
            if rc != 0:
                self.emit(f"note: {act.run.run_id} exited with code {rc} after writing status ok")
            return "ok"
        if status in ("failed", "diverged") and not act.killed_for_timeout:
            if not rec.get("log_tail"):
                rec["log_tail"] = tail
                atomic_write_json(rd / "run.json", rec)
            return status
        if act.killed_for_timeout:
            error = f"timeout: killed after {_fmt_dur(self.timeout_s)} (exit code {rc})"
        elif rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            error = f"exit code {rc} (killed by {name})"
        elif rc == 0:
            error = f"exit code 0 but run.json is {'missing or invalid' if rec is None else repr(status)}"
        else:
            error = f"exit code {rc}"
        rec = rec or failure_record(act.run, self.grid.name)
        rec.update(status="failed", error=error, log_tail=tail, exit_code=rc,
                   finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        atomic_write_json(rd / "run.json", rec)
        return "failed"

    # ------------------------------------------------------------------ main loop
    def run(self, runs: list[PlannedRun] | None = None) -> GridResult:
        runs = self.plan.shard(*self.shard) if runs is None else runs
        res = GridResult()
        t0 = time.time()
        queue = self.initial_queue(runs, res)
        if res.skipped_ok:
            self.emit(f"{len(res.skipped_ok)} run(s) already finished (skipped)")
        if res.skipped_failed:
            self.emit(f"{len(res.skipped_failed)} run(s) failed earlier (skipped; --retry-failed re-runs them)")
        self.emit(f"{len(queue)} run(s) to do on {len(self.slots)} slot(s)"
                  + (f", shard {self.shard[0]}/{self.shard[1]}" if self.shard[1] > 1 else ""))
        free = deque(self.slots)
        active: list[_Active] = []
        last_progress = last_beat = time.time()
        old = self._install_signals()
        try:
            while queue or active:
                if self._stop is not None:
                    raise KeyboardInterrupt
                while free and queue:  # fill every free slot
                    run = queue.popleft()
                    claim = Claim.acquire(self.run_dir(run), stale_after_s=self.stale_after_s,
                                          runner=self.runner_id)
                    if claim is None:
                        res.elsewhere.append(run.run_id)
                        self.emit(f"skip   {run.run_id}  {run.label()}: claimed by {describe_lock(self.run_dir(run))}")
                        continue
                    why = self._still_wanted(run, t0)
                    if why is not None:
                        claim.release()
                        (res.skipped_ok if why == "ok" else res.skipped_failed).append(run.run_id)
                        self.emit(f"skip   {run.run_id}  {run.label()}: {why} (by another runner)")
                        continue
                    slot = free.popleft()
                    try:
                        act = self.launch(run, slot, claim)
                    except BaseException:
                        claim.release()
                        free.appendleft(slot)
                        raise
                    active.append(act)
                    self.emit(f"start  {run.run_id}  {run.label()}  {slot.describe()}")
                for act in list(active):
                    rc = act.proc.poll()
                    if rc is None:
                        self._check_timeout(act)
                        continue
                    act.log_file.close()
                    status = self.finalize(act, rc)
                    act.claim.release()
                    active.remove(act)
                    free.append(act.slot)
                    dur = time.time() - act.started
                    self.durations.append(dur)
                    if status == "ok":
                        res.ok.append(act.run.run_id)
                        self.emit(f"done   {act.run.run_id}  {act.run.label()}  ok in {_fmt_dur(dur)}")
                    else:
                        res.failed.append(act.run.run_id)
                        err = ""
                        with contextlib.suppress(OSError, ValueError):
                            err = str(read_json(self.run_dir(act.run) / "run.json").get("error") or "")
                        first = err.splitlines()[0] if err else ""
                        self.emit(f"{status.upper():6} {act.run.run_id}  {act.run.label()}: {first} "
                                  f"(log: {self.run_dir(act.run) / 'log.txt'})")
                now = time.time()
                if now - last_beat >= self.heartbeat_s:
                    for act in active:
                        act.claim.heartbeat()
                    last_beat = now
                if now - last_progress >= self.progress_every and (queue or active):
                    self.emit(self.progress(res, len(queue), active))
                    last_progress = now
                if active:
                    time.sleep(self.poll_s)
        except KeyboardInterrupt:
            res.interrupted = True
            self.emit(f"interrupted: stopping {len(active)} run(s); restart the same command to resume them")
            self._terminate(active)
        except BaseException:
            self._terminate(active)
            raise
        finally:
            self._restore_signals(old)
        done = len(res.ok) + len(res.skipped_ok)
        self.emit(f"finished: {done} ok, {len(res.failed)} failed this session, "
                  f"{len(res.skipped_failed)} failed earlier, {len(res.elsewhere)} held by other runners "
                  f"({_fmt_dur(time.time() - t0)})")
        return res

    def progress(self, res: GridResult, queued: int, active: list[_Active]) -> str:
        done = len(res.ok) + len(res.skipped_ok)
        total = done + len(res.failed) + len(res.skipped_failed) + len(active) + queued + len(res.elsewhere)
        eta = None
        if self.durations:
            mean = sum(self.durations) / len(self.durations)
            now = time.time()
            running_left = max([max(0.0, mean - (now - a.started)) for a in active] or [0.0])
            eta = queued * mean / max(1, len(self.slots)) + running_left
        return (f"{done}/{total} done, {len(active)} running, {len(res.failed) + len(res.skipped_failed)} failed, "
                f"{queued} queued" + (f", {len(res.elsewhere)} elsewhere" if res.elsewhere else "")
                + f" | ETA {_fmt_dur(eta)}")

    def _check_timeout(self, act: _Active) -> None:
        if not self.timeout_s:
            return
        now = time.time()
        if act.term_sent is None and now - act.started > self.timeout_s:
            act.killed_for_timeout = True
            act.term_sent = now
            with contextlib.suppress(OSError):
                os.killpg(act.proc.pid, signal.SIGTERM)
        elif act.term_sent is not None and now - act.term_sent > 10:
            with contextlib.suppress(OSError):
                os.killpg(act.proc.pid, signal.SIGKILL)

    def _terminate(self, active: list[_Active]) -> None:
        """Stop children (SIGTERM, then SIGKILL after 10 s) and release their claims.
        Their run.json stays 'running', so the next start resumes them."""
        for act in active:
            with contextlib.suppress(OSError):
                os.killpg(act.proc.pid, signal.SIGTERM)
        deadline = time.time() + 10
        for act in active:
            try:
                act.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(act.proc.pid, signal.SIGKILL)
                act.proc.wait()
            act.log_file.close()
            act.claim.release()

    def _install_signals(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):  # noqa: ARG001
            self._stop = signum

        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def _restore_signals(self, old) -> None:
        for s, h in (old or {}).items():
            signal.signal(s, h)


def failure_record(run: PlannedRun, grid_name: str) -> dict:
    """A run.json for a run whose process died before writing one (same keys as
    ``scd.core.results.new_run_record``; env kept cheap: no torch import)."""
    return {"schema_version": SCHEMA_VERSION, "run_id": run.run_id, "grid": grid_name, "recipe": run.recipe,
            "method": run.method, "seed": run.seed, "git_sha": git_sha(), "status": "failed", "error": None,
            "started": None, "finished": None,
            "env": {"python": platform.python_version(), "platform": platform.platform(),
                    "host": socket.gethostname()},
            "components": {}, "hparams": {}, "config": run.config, "train": {}, "eval": {}, "cka": {},
            "metric_meta": {}, "artifacts": {}}


# ============================================================================== 6. slurm + CLI
def slurm_script(plan: Plan, *, grid_file: Path, results_dir: Path, shards: int, extra_args: list[str]) -> str:
    s = plan.grid.slurm
    gdir = grid_dir(results_dir, plan.name).resolve()
    q = shlex.quote
    lines = ["#!/bin/bash",
             f"# Generated by benchmarks.grid for grid '{plan.name}': {len(plan.runs)} runs in {shards} shard(s),",
             "# one array task per shard; tasks share the results tree (per-run claims, no clobbering).",
             f"# Submit: sbatch {gdir}/slurm/array.sh   (each task builds the leaderboard when it ends)",
             f"#SBATCH --job-name=grid-{plan.name}",
             f"#SBATCH --array=0-{shards - 1}",
             f"#SBATCH --output={gdir}/slurm/%A_%a.out",
             "#SBATCH --nodes=1",
             "#SBATCH --ntasks=1",
             f"#SBATCH --cpus-per-task={s.cpus_per_task}",
             f"#SBATCH --time={s.time}"]
    if s.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={s.gpus_per_node}")
    if s.partition:
        lines.append(f"#SBATCH --partition={s.partition}")
    if s.account:
        lines.append(f"#SBATCH --account={s.account}")
    if s.mem:
        lines.append(f"#SBATCH --mem={s.mem}")
    lines += [f"#SBATCH {x}" for x in s.extra]
    lines += ["set -euo pipefail", f"cd {q(str(Path.cwd()))}"] + list(s.setup)
    cmd = [sys.executable, "-m", "benchmarks.grid", str(grid_file.resolve()),
           "--shard", f"${{SLURM_ARRAY_TASK_ID}}/{shards}", "--results-dir", str(Path(results_dir).resolve())]
    cmd += extra_args
    lines.append("exec " + " ".join(a if "${SLURM" in a else q(a) for a in cmd))
    return "\n".join(lines) + "\n"


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise argparse.ArgumentTypeError(f"--shard must look like i/N with 0 <= i < N, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def print_plan(plan: Plan, runs: list[PlannedRun], slots: list[Slot], results_dir: Path, *, command: str | None,
               retry_failed: bool, shard: tuple[int, int], out: TextIO) -> None:
    g = plan.grid
    gdir = grid_dir(results_dir, plan.name)
    n_cfg = len({json.dumps({k: v for k, v in r.config.items() if k not in ("seed", "grid")}, sort_keys=True,
                            default=str) for r in plan.runs})
    print(f"Grid {g.name}: {len(plan.runs)} runs ({n_cfg} configs x {len(g.seeds)} seeds), "
          f"recipe {plan.runs[0].recipe if plan.runs else '?'}, baseline {g.baseline or '-'}", file=out)
    print(f"Results: {gdir}", file=out)
    kind = "GPU" if slots and slots[0].gpus else "CPU"
    print(f"Slots: {len(slots)} {kind}: " + " ".join(s.describe() for s in slots), file=out)
    print(f"Launcher: {g.launcher}; command: {command_template(g.launcher, command or g.command, slots[0])}",
          file=out)
    if shard[1] > 1:
        print(f"Shard {shard[0]}/{shard[1]}: {len(runs)} of {len(plan.runs)} runs", file=out)
    print(f"{'order':>5}  {'run_id':12}  {'status':11}  {'first slot':10}  run", file=out)
    k = 0
    for r in runs:
        st = run_status(gdir / r.run_id) if (gdir / r.run_id).exists() else "new"
        todo = st not in ("ok",) and (retry_failed or st not in ("failed", "diverged"))
        first = ""
        if todo:
            k += 1
            first = str(slots[(k - 1)].index) if k <= len(slots) else "queued"
        print(f"{(k if todo else '-'):>5}  {r.run_id:12}  {st:11}  {first:10}  {r.label()}", file=out)
    print(f"{k} run(s) would start; nothing started (--dry-run).", file=out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.grid", description="Run a grid of configs on this node's GPU slots or CPU "
        "workers, resumably, then build its leaderboard (docs/grid.md).")
    ap.add_argument("grid", help="grid file (configs/grids/*.yaml, `recipe: grid`)")
    ap.add_argument("--results-dir", default="results", help="results root (default: results)")
    ap.add_argument("--workers", type=int, help="parallel CPU runs when no GPU is visible (default: grid `workers`)")
    ap.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="i/N",
                    help="run only shard i of N (partition of the sorted run ids)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (runs, slots, order); start nothing")
    ap.add_argument("--retry-failed", action="store_true", help="re-run failed/diverged runs")
    ap.add_argument("--fake-gpus", type=int, metavar="K",
                    help="pretend K GPUs (ids 0..K-1) exist: only sets CUDA_VISIBLE_DEVICES per slot (tests); 0 = CPU")
    ap.add_argument("--slurm", action="store_true",
                    help="write results/<grid>/slurm/array.sh (one array task per shard); submit nothing")
    ap.add_argument("--shards", type=int, help="number of shards for --slurm (default: grid slurm.shards)")
    ap.add_argument("--command", help="launch command template, e.g. '{python} -m scd run {config} --run-dir "
                    "{run_dir}' (placeholders: python config run_dir nproc gpus port run_id deepspeed)")
    ap.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                    help="import MODULE first (registers user recipes); repeatable")
    ap.add_argument("--no-leaderboard", action="store_true", help="do not build the leaderboard at the end")
    ap.add_argument("--progress-every", type=float, default=30.0, metavar="S", help="summary line period (s)")
    ap.add_argument("--stale-after", type=float, default=600.0, metavar="S",
                    help="another host's claim is stale after S s without heartbeat (default 600)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a grid key, e.g. --set seeds=[0] (repeatable)")
    args = ap.parse_args(argv)
    try:
        for mod in args.imports:
            try:
                importlib.import_module(mod)
            except ImportError as e:
                raise ConfigError(f"--import {mod}: cannot import ({e})") from None
        grid = load_grid(args.grid, args.overrides)
        plan = expand_grid(grid, args.grid)
        results_dir = Path(args.results_dir)
        if args.slurm:
            shards = args.shards or grid.slurm.shards
            extra = [a for m in args.imports for a in ("--import", m)]
            if args.command:
                extra += ["--command", args.command]
            if args.retry_failed:
                extra.append("--retry-failed")
            extra += [a for o in args.overrides for a in ("--set", o)]
            text = slurm_script(plan, grid_file=Path(args.grid), results_dir=results_dir, shards=shards,
                                extra_args=extra)
            if args.dry_run:
                print(text, end="")
                return 0
            gdir = write_plan(plan, results_dir)
            path = gdir / "slurm" / "array.sh"
            atomic_write_text(path, text)
            os.chmod(path, 0o755)
            print(f"wrote {path} ({shards} array task(s), {len(plan.runs)} runs); submit with: sbatch {path}")
            return 0
        gpus = detect_gpus(args.fake_gpus)
        slots = make_slots(gpus, grid.gpus_per_run, args.workers or grid.workers)
        runs = plan.shard(*args.shard)
        if args.dry_run:
            print_plan(plan, runs, slots, results_dir, command=args.command, retry_failed=args.retry_failed,
                       shard=args.shard, out=sys.stdout)
            return 0
        write_plan(plan, results_dir)
        runner = GridRunner(plan, results_dir, slots, command=args.command, retry_failed=args.retry_failed,
                            shard=args.shard, progress_every=args.progress_every, stale_after_s=args.stale_after)
        res = runner.run(runs)
        if not args.no_leaderboard and not res.interrupted:
            try:
                from benchmarks.leaderboard import build_leaderboard, update_index

                out = build_leaderboard(grid_dir(results_dir, plan.name))
                update_index(results_dir)
                runner.emit(f"leaderboard: {out}")
            except Exception as e:  # noqa: BLE001  (the runs are safe on disk; report and go on)
                runner.emit(f"leaderboard failed: {type(e).__name__}: {e} "
                            f"(rebuild with: python -m benchmarks.leaderboard {grid_dir(results_dir, plan.name)})")
                if os.environ.get("SCD_DEBUG"):
                    raise
        return res.exit_code
    except (ConfigError, ResultsError) as e:
        if os.environ.get("SCD_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:  # RegistryError (unknown recipe) is a KeyError with a one-line message
        if os.environ.get("SCD_DEBUG"):
            raise
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from benchmarks.grid import main as _main  # the registered module, not a second __main__ copy

    raise SystemExit(_main())
