"""A tiny UniSD recipe for the tests: a random-init 2-layer Llama (hidden 32) with the given
tokenizer, trained on the first examples of real task splits.

    recipe = setup_run(tokenizer, {"in_context_teacher": {"max_new_tokens": 4}, "my_component": {}})
    terms, n_tokens = step_once(recipe)        # engine.accumulate: forward + backward of step 0
    recipe.ctx.per_token, recipe.ctx.token_weights
    recipe = setup_run(tokenizer, {}, cfg=preset("sdft_onpolicy"))   # a row of the ablation grid

The recipe and its engine come from :meth:`unisd.train.UniSDRecipe.build` (nothing of the
setup or the loop is copied here).
"""
from __future__ import annotations

from benchmarks.grid import expand_grid, load_grid
from scd.core.config import from_dict
from unisd.train import UniSDConfig, UniSDRecipe

ABLATION_GRID = "configs/grids/unisd_ablation.yaml"


def tiny_unisd_cfg(components: dict, *, lora: dict | None = None, lr: float = 1e-3, batch_size: int = 2,
                   grad_accum: int = 1, tasks=("rotten_tomatoes",), limit: int = 16, seed: int = 0,
                   **extra) -> UniSDConfig:
    """The tiny config; ``extra`` sets dotted keys (``**{"loss.alpha": 0.5}``)."""
    data = {"seed": seed, "components": components,
            "model": {"name": "tiny", "lora": lora,
                      "tiny": {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64,
                               "num_attention_heads": 4, "num_key_value_heads": 2}},
            "data": {"tasks": list(tasks), "limit_per_task": limit},
            "train": {"lr": lr, "max_steps": 4, "batch_size": batch_size, "grad_accum": grad_accum,
                      "warmup_ratio": 0.0, "schedule": "constant", "device": "cpu"}}
    for key, value in extra.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return from_dict(UniSDConfig, data)


def preset(method: str, grid: str = ABLATION_GRID) -> UniSDConfig:
    """The config of ``method``'s seed-0 run in ``grid``, as the grid planner resolves it."""
    runs = [r for r in expand_grid(load_grid(grid), grid).runs if r.method == method and r.seed == 0]
    assert len(runs) == 1, method
    return from_dict(UniSDConfig, runs[0].config)


def setup_run(tokenizer, components: dict, *, examples: list[dict] | None = None, **kw) -> UniSDRecipe:
    """The recipe (``.engine``, ``.ctx``, ``.components``) without a run directory."""
    cfg = kw.pop("cfg", None) or tiny_unisd_cfg(components, **kw)
    _, recipe = UniSDRecipe.build(cfg, tokenizer=tokenizer, examples=examples)
    return recipe


def step_once(recipe: UniSDRecipe, *, update: bool = False, step: int | None = None) -> tuple[dict[str, float], int]:
    """Forward + backward of optimiser step ``step`` (default: step 0, or the step after the last
    update) through ``engine.accumulate``; with ``update`` the whole step (``engine.train_step``:
    update, then the on_step_end hooks).  -> ({term: value}, loss tokens)."""
    engine = recipe.engine
    step = engine.step if step is None else step
    if update:
        out = engine.train_step(recipe, step)
        engine.step = step + 1
        recipe.on_step_end(engine, engine.step)
    else:
        out = engine.accumulate(recipe, step)
    return {k[len("loss/"):]: v for k, v in out.items() if k.startswith("loss/")}, out["n_tokens"]


def step_recording_teacher(run: UniSDRecipe, record) -> tuple[dict[str, float], int]:
    """:func:`step_once` with ``record(prompt_ids)`` called before each teacher pass (what it saw)."""
    original = run.ctx.teacher_forward

    def wrapped(prompt_ids, **kw):
        record(prompt_ids)
        return original(prompt_ids, **kw)

    run.ctx.teacher_forward = wrapped
    try:
        return step_once(run)
    finally:
        run.ctx.teacher_forward = original

def grads(module) -> dict:
    """{name: grad clone} of the parameters that have one."""
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
