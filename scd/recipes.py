"""Imports the built-in recipe modules so they register themselves (recipe registry)."""
import importlib

BUILTIN = (
    "scd.sft",          # plain SFT (students, baselines, demo)
    "scd.teacher",      # teacher SFT with a checkpoint schedule
    "scd.distill",      # staged distillation: KD, CD, SCD, SCD+AW
    "unisd.train",      # UniSD self-distillation
    "unisd.recovery",   # degrade + recover
    "benchmarks.evaluate",
    "benchmarks.grid",
)

for _mod in BUILTIN:
    try:
        importlib.import_module(_mod)
    except ModuleNotFoundError as e:  # a recipe module not written yet
        if e.name != _mod:
            raise
