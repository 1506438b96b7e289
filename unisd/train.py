"""Recipe ``unisd``: self-distillation with components toggled from the config.

    python -m scd run configs/unisd/base_tiny.yaml [components.ema_teacher.decay=0.98 ...]

The config lists components in order, each with its parameters (the key is the
registry name and the results column)::

    components:
      in_context_teacher: {temperature: 0.7}     # the teacher provider (exactly one)
      multi_teacher_agreement: {gamma: 0.001, demos: retrieval}
      ema_teacher: {decay: 0.98}
      divergence_clipping: false                  # listed but off

Reads top to bottom: build model -> training examples -> components (setup in config
order) -> resume -> per optimiser step: for each micro-batch
  1. the provider samples completions from the student and returns teacher targets,
  2. the student forward over the same completions,
  3. the per-token divergence l_t [B, L] (``ctx.per_token``),
  4. every component's ``loss_terms`` (may clip l_t, set agreement weights, add terms),
  5. kd = mean over sequences of sum_t w_t l_t m_t / clamp(sum_t w_t m_t, 1); backward,
-> clip, optimiser step, ``on_step_end`` hooks (EMA) -> log every term -> save -> evaluate.

``objective: sft`` and ``objective: sdft_rewrite`` run the SFT and SDFT-rewrite
baselines (:mod:`unisd.baselines`) from the same config, so one grid holds them all.
"""
from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.evaluate import EvalSpec
from scd.core.config import register_recipe
from scd.core.train import (Checkpointer, TrainConfig, autocast, batch_indices, check_finite, finish_run,
                            make_optimizer, peak_memory, resolve_device, seed_everything, start_run)
from scd.data_config import DataConfig, load_examples
from scd.models import ModelConfig, build_model, save_model
from unisd.components.base import build_components, components_table, load_plugins, needs_of

OBJECTIVES = ("self_distill", "sft", "sdft_rewrite")


def divergence_spec(cfg: "LossConfig") -> tuple[str, dict]:
    """(registered divergence name, params) of a loss config (UniSD's alpha mapping)."""
    if cfg.divergence != "alpha":
        return cfg.divergence, dict(cfg.params)
    if cfg.alpha == 0.0:
        return "forward_kl", {}
    if cfg.alpha == 1.0:
        return "reverse_kl", {}
    return "jsd", {"beta": cfg.alpha}


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The per-token divergence between student and teacher (logits / the provider's temperature).

    ``divergence: alpha`` is UniSD's parameterisation: alpha 0 = forward KL(p_T||p_S),
    1 = reverse KL(p_S||p_T), otherwise the generalized JSD
    alpha KL(p_T||M) + (1-alpha) KL(p_S||M), M = (1-alpha) p_S + alpha p_T (GKD's beta).
    Any registered divergence name (forward_kl, reverse_kl, jsd, skew_kl, skew_rkl) works
    too, with its ``params``.
    """

    divergence: str = "alpha"
    alpha: float = 0.0
    params: dict = dataclasses.field(default_factory=dict)
    scale_by_t2: bool = False  # UniSD: no tau^2 factor
    max_prompt_len: int = 512  # student prompts are left-truncated to it (tokens)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"loss.alpha must be in [0, 1], got {self.alpha}")
        if self.divergence == "alpha" and self.params:
            raise ValueError("loss.params is for a named divergence; with divergence: alpha set loss.alpha")
        name, params = divergence_spec(self)
        from scd.losses import resolve_divergence

        try:
            resolve_divergence(name, params)
        except (KeyError, ValueError) as e:
            raise ValueError(f"loss.divergence: {e}") from None


@dataclasses.dataclass(frozen=True)
class RewriteConfig:
    """SDFT-rewrite baseline (``objective: sdft_rewrite``), see :mod:`unisd.baselines`."""

    max_new_tokens: int = 64
    batch_size: int = 16
    template: str = ("{input}\n\nReference answer:\n{reference}\n\nRewrite the reference answer in your own "
                     "words. Keep its meaning and its final answer, and use the same format.")


@dataclasses.dataclass(frozen=True)
class UniSDConfig:
    recipe: str = "unisd"
    method: str = "unisd"
    grid: str | None = None
    seed: int = 0
    objective: str = "self_distill"  # self_distill | sft | sdft_rewrite
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalSpec = EvalSpec()
    loss: LossConfig = LossConfig()
    components: dict = dataclasses.field(default_factory=lambda: {"in_context_teacher": {}})
    plugins: tuple[str, ...] = ()  # modules or .py files that register components
    rewrite: RewriteConfig = RewriteConfig()
    save_model: bool = True

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        load_plugins(self.plugins)
        import unisd.components  # noqa: F401  (registers the built-in components)

        if self.objective == "self_distill":
            build_components(self.components)  # unknown names, bad params, provider count -> error now
        else:
            on = [n for n, v in components_table(self.components).items() if v]
            if on:
                raise ValueError(f"objective {self.objective} trains on (rewritten) references only; components "
                                 f"have no effect there: set {', '.join(f'components.{n}: false' for n in on)}")


def make_divergence(cfg: LossConfig):
    """student logits, teacher logits [B, L, V], temperature -> per-token divergence l_t [B, L]."""
    from scd.losses import per_token_divergence

    name, params = divergence_spec(cfg)

    def divergence(student_logits, teacher_logits, temperature: float):
        return per_token_divergence(name, student_logits, teacher_logits.detach(), temperature,
                                    scale_by_t2=cfg.scale_by_t2, **params)

    return divergence


def hparams(cfg: UniSDConfig) -> dict:
    """Flat hyper-parameters for run.json (``component.param`` for the enabled components)."""
    name, params = divergence_spec(cfg.loss)
    out: dict[str, Any] = {"objective": cfg.objective, "lr": cfg.train.lr, "max_steps": cfg.train.max_steps,
                           "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
                           "lora": bool(cfg.model.lora)}
    if cfg.objective != "self_distill":
        return out
    out.update({"divergence": name, **{f"divergence.{k}": v for k, v in params.items()}})
    for comp in build_components(cfg.components):
        for k, v in comp.describe().items():
            if isinstance(v, (int, float, bool)) or v is None or (isinstance(v, str) and len(v) <= 64):
                out[f"{comp.name}.{k}"] = v  # (long strings such as prompt templates stay in config.yaml)
    return out


# ---------------------------------------------------------------------------- the step
def distill_step(ctx, components, divergence, batches: list[list[int]]) -> tuple[dict[str, float], int]:
    """Forward + backward of one optimiser step over its micro-batches (no optimiser update).

    Returns ({term: value summed over micro-batches}, loss tokens).  Every term is
    already normalised by the number of sequences of the whole accumulated batch.
    """
    provider = next(c for c in components if c.provides_teacher)
    ctx.n_seq_total = sum(len(b) for b in batches)
    totals: dict[str, float] = defaultdict(float)
    tokens = 0
    for micro, indices in enumerate(batches):
        ctx.begin_micro(micro, indices)
        targets = provider.teacher_targets(ctx)  # sets ctx.batch completions; teacher logits [B, L, V]
        ctx.student = ctx.forward(ctx.model, ctx.batch.prompt_ids, hidden="hidden_states" in ctx.needs)
        ctx.per_token = divergence(ctx.student.logits, targets.logits, targets.temperature)  # l_t [B, L]
        terms: dict = {}
        for comp in components:
            for name, value in comp.loss_terms(ctx, targets).items():
                if name in terms or name == "kd":
                    raise ValueError(f"component '{comp.name}' returned loss term '{name}' twice or named 'kd'")
                terms[name] = value
        terms = {"kd": ctx.seq_mean(ctx.per_token, ctx.token_weights, ctx.sequence_weights), **terms}
        loss = sum(terms.values())
        loss.backward()
        for name, value in terms.items():
            totals[name] += float(value.detach())
        tokens += int(ctx.batch.loss_mask.sum())
    return dict(totals), tokens


def trainable_module(model, components):
    """The student alone, or the student plus the components' trainable modules (e.g. a
    projection) as one module, so one optimiser and one checkpoint hold them all."""
    import torch

    extras = {c.name: torch.nn.ModuleDict(c.trainable_modules()) for c in components if c.trainable_modules()}
    if not extras:
        return model
    bundle = torch.nn.Module()
    bundle.model = model
    bundle.extras = torch.nn.ModuleDict(extras)
    return bundle


def shots_by_task(cfg: DataConfig) -> dict[str, list[dict]]:
    """Few-shot demonstrations of the training prompts (as scd.data_config.load_training_pairs)."""
    if not cfg.shots:
        return {}
    from scd.data.load import load_split

    return {task: load_split(task, "dev", limit=cfg.shots) for task in cfg.tasks}


def build_context(cfg: UniSDConfig, model, tok, examples: list[dict], components, device):
    """The step context: the frozen teacher copy (only if a component needs it), then every ``setup``."""
    from unisd.context import Context, frozen_copy

    needs = needs_of(components)
    ctx = Context(model=model, tokenizer=tok, examples=examples, device=device, seed=cfg.seed, needs=needs,
                  max_prompt_len=cfg.loss.max_prompt_len, autocast=lambda: autocast(cfg.train, device),
                  config=cfg, shots=shots_by_task(cfg.data))
    if "teacher_model" in needs:
        ctx.teacher = frozen_copy(model)  # the model at step 0 (before any resume loads weights)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    for comp in components:
        comp.setup(ctx)
    return ctx


# ---------------------------------------------------------------------------- the recipe
def run(cfg: UniSDConfig, run_dir: Path) -> dict:
    if cfg.objective != "self_distill":
        from unisd.baselines import run_baseline

        return run_baseline(cfg, run_dir)
    import torch

    run_dir = Path(run_dir)
    rd = start_run(cfg, run_dir, recipe="unisd", components=components_table(cfg.components), hparams=hparams(cfg))
    metrics = rd.metrics()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.train.device)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)

    # model, data, components
    model, tok = build_model(cfg.model, seed=cfg.seed)
    model.to(device).train()
    examples = load_examples(cfg.data)
    components = build_components(cfg.components)
    ctx = build_context(cfg, model, tok, examples, components, device)
    trainable = trainable_module(model, components)
    opt, sched = make_optimizer(trainable, cfg.train)
    divergence = make_divergence(cfg.loss)

    # resume
    ckpt = Checkpointer(run_dir)
    start_step, tokens = 0, 0
    if ckpt.exists():
        start_step, extra = ckpt.load(trainable, opt, sched)
        tokens = int(extra.get("tokens", 0))
        for comp in components:
            comp.load_state_dict(extra.get("components", {}).get(comp.name, {}))
        metrics.drop_after(start_step)
        print(f"[unisd] resumed at step {start_step}/{cfg.train.max_steps}", flush=True)

    # train
    t0 = time.time()
    tc = cfg.train
    for step in range(start_step, tc.max_steps):
        ctx.step = step
        batches = [batch_indices(len(examples), tc.batch_size, step, m, tc.grad_accum, cfg.seed)
                   for m in range(tc.grad_accum)]
        terms, n_tok = distill_step(ctx, components, divergence, batches)
        for name, value in terms.items():
            check_finite(value, step + 1, name)
        gnorm = torch.nn.utils.clip_grad_norm_(trainable.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ctx.step = done = step + 1
        for comp in components:
            comp.on_step_end(ctx)
        tokens += n_tok
        stats = ctx.pop_stats()
        if done % tc.log_every == 0 or done == tc.max_steps:
            metrics.log({"step": done, "loss": sum(terms.values()), **{f"loss/{k}": v for k, v in terms.items()},
                         **stats, "lr": sched.get_last_lr()[0], "grad_norm": float(gnorm), "tokens": tokens,
                         "teacher_passes": ctx.teacher_passes})
        if tc.save_every and done % tc.save_every == 0 and done < tc.max_steps:
            ckpt.save(trainable, opt, sched, done,
                      {"tokens": tokens, "components": {c.name: c.state_dict() for c in components}})
    train_stats = {"tokens": tokens, "steps": tc.max_steps, "wall_s": round(time.time() - t0, 2),
                   "peak_mem": peak_memory(device), "teacher_passes": ctx.teacher_passes}

    # save, evaluate
    artifacts = {}
    if cfg.save_model:
        artifacts["model"] = str(save_model(model, tok, run_dir / "model"))
    ctx.teacher = None  # free the teacher before evaluation
    evaluation = cfg.eval.run(model, tok, run_dir)
    ckpt.clear()
    return finish_run(rd, train=train_stats, artifacts=artifacts, **evaluation)


register_recipe("unisd", UniSDConfig, run)
