"""Grid runner: expand a grid file into resolved run configs, schedule them on GPU
slots / CPU workers, resume, and build the leaderboard when done.

    python -m benchmarks.grid configs/grids/demo.yaml              # run (resumable)
    python -m benchmarks.grid GRID.yaml --dry-run                  # print the plan only
    python -m benchmarks.grid GRID.yaml --shard 0/4                # one of 4 shards
    python -m benchmarks.grid GRID.yaml --slurm --shards 4         # write a Slurm array script

The grid file format, the scheduling rules and the results layout are documented in
docs/grid.md.  Modules, in reading order:

1. ``spec``    the grid file (:class:`GridConfig`, :func:`load_grid`) and its expansion
               (:func:`expand_grid` -> :class:`Plan`; :func:`write_plan`).
2. ``slots``   GPU detection, slots, launch commands and child environments.
3. ``claims``  an ``O_CREAT|O_EXCL`` lock file per run directory (:class:`Claim`), so
               concurrent runners run every run exactly once.
4. ``runner``  :class:`GridRunner`: keeps every slot busy, records failures the child could
               not record, prints progress, resumes interrupted runs.
5. ``slurm``   :func:`slurm_script`; ``cli``: :func:`main` (command line).
"""
from benchmarks.grid.claims import CHILD_NAME, LOCK_NAME, Claim, describe_lock
from benchmarks.grid.cli import build_parser, dirty_banner, main, parse_shard, print_plan
from benchmarks.grid.runner import INTERRUPTED_MARK, GridResult, GridRunner, log_tail, run_status
from benchmarks.grid.slots import (DEFAULT_COMMANDS, Slot, build_command, child_env, command_template, detect_gpus,
                                   driver_gpus, free_port, make_slots)
from benchmarks.grid.slurm import slurm_script
from benchmarks.grid.spec import (GridConfig, Plan, PlannedRun, SlurmConfig, apply_mapping, expand_grid, grid_dir,
                                  grid_problems, load_grid, recipe_spec, set_dotted, write_plan)
from scd.core.locks import file_lock, pid_alive  # re-exported for callers of the old module

__all__ = [
    "CHILD_NAME", "DEFAULT_COMMANDS", "INTERRUPTED_MARK", "LOCK_NAME", "Claim", "GridConfig", "GridResult",
    "GridRunner", "Plan", "PlannedRun", "Slot", "SlurmConfig", "apply_mapping", "build_command", "build_parser",
    "child_env", "command_template", "describe_lock", "detect_gpus", "dirty_banner", "driver_gpus", "expand_grid",
    "file_lock", "free_port", "grid_dir", "grid_problems", "load_grid", "log_tail", "main", "make_slots",
    "parse_shard", "pid_alive", "print_plan", "recipe_spec", "run_status", "set_dotted", "slurm_script",
    "write_plan",
]
