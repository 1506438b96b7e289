"""Built-in recipes: name -> the module that registers it (imported on first use).

Importing only the module a config names keeps start-up fast and isolates recipes
from each other.  A user's own recipe registers itself with
``scd.core.config.register_recipe`` before ``load_config`` is called.
"""
import importlib

BUILTIN = {
    "sft": "scd.sft",                   # plain SFT (students, baselines, demo)
    "teacher": "scd.teacher",           # teacher SFT with a checkpoint schedule
    "distill": "scd.distill",           # staged distillation: KD, CD, SCD, SCD+AW
    "student": "scd.student",           # a student pruned by layer importance, healed by KD
    "unisd": "unisd.train",             # UniSD self-distillation
    "recovery": "unisd.recovery",       # degrade + recover
    "evaluate": "benchmarks.evaluate",  # evaluation config
    "grid": "benchmarks.grid",          # grid files
}


def ensure(name: str) -> None:
    """Import the module of built-in recipe ``name`` (no-op for unknown names)."""
    mod = BUILTIN.get(name)
    if mod is not None:
        importlib.import_module(mod)


def ensure_all() -> None:
    for name in BUILTIN:
        ensure(name)
