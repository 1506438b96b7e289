"""Grid files and their expansion into fully resolved runs.

1. :class:`GridConfig` (the grid file, ``recipe: grid``) and :func:`load_grid`.
2. :func:`expand_grid` -> :class:`Plan` (every run's fully resolved, validated config;
   ``run_id`` = :func:`scd.core.results.run_id` of it) and :func:`write_plan` (config.yaml
   per run + plan.json, written before anything starts).
"""
from __future__ import annotations

import contextvars
import copy
import dataclasses
import itertools
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any, Literal

from scd import recipes
from scd.core.config import (RECIPES, ConfigError, Source, apply_overrides, dump_yaml, from_dict, load_yaml,
                             register_recipe, to_dict)
from scd.core.registry import did_you_mean
from scd.core.results import atomic_write_text, run_id, safe_join

REPO_ROOT = Path(__file__).resolve().parents[2]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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
            out.append((f"runs[{i}]", "set seeds with the grid's `seeds:` list (a variant may narrow it with "
                                      "`seeds: [...]`), not per variant"))
        elif "seeds" in v and (not isinstance(v["seeds"], (list, tuple)) or not v["seeds"]
                               or not set(v["seeds"]) <= set(g.seeds) or len(set(v["seeds"])) != len(v["seeds"])):
            out.append((f"runs[{i}].seeds", f"a variant's seeds must be a non-empty subset of the grid's seeds "
                                            f"{list(g.seeds)}, got {v['seeds']!r}"))
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


# ------------------------------------------------------------------------------ expansion
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
        candidates.append(REPO_ROOT / p)
    for c in candidates:
        if c.is_file():
            return c
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise ConfigError(f"{grid_path or 'grid'}: key 'base': config file {base!r} not found (tried {tried})")


def recipe_spec(name: str, where: str = "grid"):
    """The registered recipe ``name``; imports a built-in recipe's module only when needed."""
    if name not in RECIPES:
        recipes.ensure(name)
    if name not in RECIPES:
        known = sorted(set(RECIPES.names()) | set(recipes.BUILTIN))
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
    before anything starts).  ``run_id`` = :func:`scd.core.results.run_id` of the resolved
    config (without ``grid``: the same config has the same id in any grid, as in
    ``RunDir.start``).  Order: seed-major, then variants, then axes.
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
        for vi, full_variant in enumerate(grid.runs):
            if seed not in full_variant.get("seeds", grid.seeds):
                continue  # a variant run for some seeds only (e.g. one deterministic teacher eval shared by all)
            variant = {k: v for k, v in full_variant.items() if k != "seeds"}
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
                rid = run_id(resolved)
                if rid in seen:
                    raise ConfigError(f"{where}: {desc} resolves to the same config as {seen[rid]} "
                                      f"(run_id {rid}); remove the duplicate")
                seen[rid] = desc
                method = str(resolved.get("method", rname))
                runs.append(PlannedRun(run_id=rid, index=len(runs), variant=vi, method=method, seed=seed,
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

