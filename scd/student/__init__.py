"""Recipe: a student pruned by measured layer importance and healed by distillation.

An evenly spaced layer cut of SmolLM2-135M is broken at birth (issue 18: every 3rd layer, dev KL to the
full model 9.4 nats/token, near the 10.8 of a uniform guess), while single layers differ by
more than ten times in how much their removal costs.  So, as real pruned students are made
(Minitron, Sheared-LLaMA, ShortGPT):

    config.py  StudentConfig: base, cut (greedy_kl | fixed), dev sample, heal (early stop), data, train
    cut.py     greedy_drop (the pure greedy loop), layer_view, DevKL (KL(base || pruned) on a fixed
               dev sample), text_batch (all-position labels)
    heal.py    HealRecipe: KD from the base at every position of general text through the engine,
               dev-KL curve, early stop with patience, best weights
    recipe.py  run(); resolve_model (``model.student: {config: ...}`` of any recipe -> <run>/model)

docs/scd.md, "Students: pruned by importance, healed".
"""
from scd.student.config import CutConfig, DevSampleConfig, HealConfig, StudentConfig
from scd.student.cut import DevKL, dev_sample, greedy_drop, layer_view, text_batch
from scd.student.heal import HealRecipe, position_kd
from scd.student.recipe import choose_layers, resolve_model, run

__all__ = ["CutConfig", "DevKL", "DevSampleConfig", "HealConfig", "HealRecipe", "StudentConfig", "choose_layers",
           "dev_sample", "greedy_drop", "layer_view", "position_kd", "resolve_model", "run", "text_batch"]
