"""Helpers to exercise components on a tiny model (used by the tests; handy for your own).

    from unisd.testing import setup_run, step_once
    run = setup_run(tokenizer, {"in_context_teacher": {"max_new_tokens": 4}, "my_component": {}})
    terms, n_tokens = step_once(run)            # forward + backward of one optimiser step
    run.ctx.per_token, run.ctx.token_weights    # what the hooks left on the context

The model is a random-init 2-layer Llama (hidden 32) with the given tokenizer; the data
are the first training examples of ``tasks`` (real task splits).
"""
from __future__ import annotations

from types import SimpleNamespace


def tiny_unisd_cfg(components: dict, *, lora: dict | None = None, lr: float = 1e-3, batch_size: int = 2,
                   grad_accum: int = 1, tasks=("rotten_tomatoes",), limit: int = 16, seed: int = 0, **extra):
    from scd.core.config import from_dict
    from unisd.train import UniSDConfig

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


def setup_run(tokenizer, components: dict, *, examples: list[dict] | None = None, **kw) -> SimpleNamespace:
    """Everything :func:`unisd.train.run` builds before its loop, without a run directory."""
    import torch

    from scd.core.train import make_optimizer, seed_everything
    from scd.data_config import load_examples
    from scd.models import build_model
    from unisd.components.base import build_components
    from unisd.train import build_context, make_divergence, trainable_module

    cfg = kw.pop("cfg", None) or tiny_unisd_cfg(components, **kw)
    seed_everything(cfg.seed)
    model, tok = build_model(cfg.model, seed=cfg.seed, tokenizer=tokenizer)
    model.train()
    exs = examples if examples is not None else load_examples(cfg.data)
    comps = build_components(cfg.components)
    ctx = build_context(cfg, model, tok, exs, comps, torch.device("cpu"))
    trainable = trainable_module(model, comps)
    opt, sched = make_optimizer(trainable, cfg.train)
    return SimpleNamespace(cfg=cfg, model=model, tok=tok, examples=exs, components=comps, ctx=ctx,
                           trainable=trainable, opt=opt, sched=sched, divergence=make_divergence(cfg.loss), step=0)


def step_once(run: SimpleNamespace, *, update: bool = False, batches: list[list[int]] | None = None):
    """One optimiser step's forward/backward (and, with ``update``, the update and on_step_end)."""
    import torch

    from scd.core.train import batch_indices
    from unisd.train import distill_step

    tc = run.cfg.train
    run.ctx.step = run.step
    if batches is None:
        batches = [batch_indices(len(run.examples), tc.batch_size, run.step, m, tc.grad_accum, run.cfg.seed)
                   for m in range(tc.grad_accum)]
    terms, n_tok = distill_step(run.ctx, run.components, run.divergence, batches)
    if update:
        torch.nn.utils.clip_grad_norm_(run.trainable.parameters(), tc.grad_clip)
        run.opt.step()
        run.sched.step()
        run.opt.zero_grad(set_to_none=True)
        run.step += 1
        run.ctx.step = run.step
        for comp in run.components:
            comp.on_step_end(run.ctx)
    return terms, n_tok


def grads(module) -> dict:
    """{name: grad clone} of the parameters that have one."""
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


__all__ = ["tiny_unisd_cfg", "setup_run", "step_once", "grads"]
