"""Recipe ``unisd``: self-distillation with components toggled from the config.

    python -m scd run configs/unisd/base_tiny.yaml [components.ema_teacher.decay=0.98 ...]

The config lists components in order, each with its parameters (the key is the
registry name and the results column)::

    components:
      in_context_teacher: {temperature: 0.7}     # the teacher provider (exactly one)
      multi_teacher_agreement: {gamma: 0.001, demos: retrieval}
      ema_teacher: {decay: 0.98}
      divergence_clipping: false                  # listed but off

Reads top to bottom: :meth:`UniSDRecipe.build` (model -> training examples ->
components, set up in config order -> the :class:`~scd.core.engine.Engine` over the
trainable bundle) -> ``engine.fit`` (resume, then per optimiser step, for each
micro-batch of example indices, :meth:`UniSDRecipe.loss_terms`:
  1. the provider samples completions from the student and returns teacher targets,
  2. the student forward over the same completions,
  3. the per-token divergence l_t [B, L] (``ctx.per_token``),
  4. every component's ``loss_terms`` (may clip l_t, set agreement weights, add terms),
  5. kd = mean over sequences of sum_t w_t l_t m_t / clamp(sum_t w_t m_t, 1);
the engine backpropagates, clips and steps; :meth:`UniSDRecipe.on_step_end` runs the
components' ``on_step_end`` hooks (EMA); every term is logged as ``loss/<term>``) ->
save -> evaluate.  Under DeepSpeed (``deepspeed: configs/deepspeed/zero2.json``) every
rank takes its share of each micro-batch; sequences are counted over all ranks.

Tests build the recipe without a run directory and run one step::

    engine, recipe = UniSDRecipe.build(cfg, tokenizer=tok)
    out = engine.accumulate(recipe, 0)      # forward + backward: {"loss/kd": ..., "loss": ...}
    recipe.ctx.per_token, recipe.ctx.token_weights

``objective: sft`` and ``objective: sdft_rewrite`` run the SFT and SDFT-rewrite
baselines (:mod:`unisd.baselines`) from the same config, so one grid holds them all.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from benchmarks.evaluate import EvalSpec
from scd.core.config import added_field, register_recipe
from scd.core.engine import Engine, Placement, Terms, autocast, init_distributed
from scd.core.results import RunDir
from scd.core.train import TrainConfig, rank_batches, seed_everything
from scd.data_config import DataConfig, load_examples, load_shots
from scd.losses import per_token_divergence, resolve_divergence
from scd.models import ModelConfig, build_model, save_model
import unisd.components  # noqa: F401  (registers the built-in components)
from unisd.baselines import run_baseline
from unisd.components.base import (build_components, components_table, explicit_spec, load_plugins, needs_of,
                                   spec_id_view)
from unisd.context import Context, frozen_copy

OBJECTIVES = ("self_distill", "sft", "sdft_rewrite")


def divergence_spec(cfg: "UniSDLossConfig") -> tuple[str, dict]:
    """(registered divergence name, params) of a loss config (UniSD's alpha mapping)."""
    if cfg.divergence != "alpha":
        return cfg.divergence, dict(cfg.params)
    if cfg.alpha == 0.0:
        return "forward_kl", {}
    if cfg.alpha == 1.0:
        return "reverse_kl", {}
    return "jsd", {"beta": cfg.alpha}


@dataclasses.dataclass(frozen=True)
class UniSDLossConfig:
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
    loss: UniSDLossConfig = UniSDLossConfig()
    components: dict = dataclasses.field(default_factory=lambda: {"in_context_teacher": {}})
    plugins: tuple[str, ...] = ()  # modules or .py files that register components
    rewrite: RewriteConfig = RewriteConfig()
    save_model: bool = True
    deepspeed: str | None = added_field(default=None)  # a DeepSpeed JSON (ZeRO-2; configs/deepspeed/zero2.json)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        load_plugins(self.plugins)
        if self.objective == "self_distill":
            build_components(self.components)  # unknown names, bad params, provider count -> error now
            # parameters whose default changed (unisd.components.base.added_param) are written out
            object.__setattr__(self, "components", explicit_spec(self.components))
        else:
            on = [n for n, v in components_table(self.components).items() if v]
            if on:
                raise ValueError(f"objective {self.objective} trains on (rewritten) references only; components "
                                 f"have no effect there: set {', '.join(f'components.{n}: false' for n in on)}")


def make_divergence(cfg: UniSDLossConfig):
    """student logits, teacher logits [B, L, V], temperature -> per-token divergence l_t [B, L]."""
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


# ---------------------------------------------------------------------------- the recipe
def trainable_module(model, components):
    """The student alone, or the student plus the components' trainable modules (e.g. a
    projection) as one module, so one optimiser and one checkpoint hold them all."""
    extras = {c.name: torch.nn.ModuleDict(c.trainable_modules()) for c in components if c.trainable_modules()}
    if not extras:
        return model
    bundle = torch.nn.Module()
    bundle.model = model
    bundle.extras = torch.nn.ModuleDict(extras)
    return bundle


def build_context(cfg: UniSDConfig, model, tok, examples: list[dict], components, device) -> Context:
    """The step context: the frozen teacher copy (only if a component needs it), then every ``setup``."""
    needs = needs_of(components)
    ctx = Context(model=model, tokenizer=tok, examples=examples, device=device, seed=cfg.seed, needs=needs,
                  max_prompt_len=cfg.loss.max_prompt_len, autocast=lambda: autocast(cfg.train, device),
                  config=cfg, shots=load_shots(cfg.data), share_prefix=cfg.train.share_prefix)
    if "teacher_model" in needs:
        ctx.teacher = frozen_copy(model)  # the model at step 0 (before any resume loads weights)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    for comp in components:
        comp.setup(ctx)
    return ctx


class UniSDRecipe:
    """Self-distillation on an :class:`Engine`: a micro-batch is (index, example indices) of
    this rank; losses are normalised by the sequences of the whole accumulated batch over all
    ranks (``ctx.n_seq_total`` = the engine's ``denom``); terms are logged as ``loss/<term>``,
    the components' ``ctx.log`` values and ``teacher_passes`` beside them (this rank's).
    """

    def __init__(self, engine: Engine, cfg: UniSDConfig, ctx: Context, components: list):
        self.engine, self.cfg, self.ctx, self.components = engine, cfg, ctx, components
        self.provider = next(c for c in components if c.provides_teacher)
        self.divergence = make_divergence(cfg.loss)
        self.stats: dict[str, float] = {}

    @classmethod
    def build(cls, cfg: UniSDConfig, *, tokenizer=None, examples: list[dict] | None = None,
              run_dir: Path | None = None, metrics=None, dist: Placement | None = None) -> tuple[Engine, "UniSDRecipe"]:
        """Model, data, components, context and engine of ``cfg`` -> (engine, recipe).

        ``tokenizer``/``examples`` replace the configured ones (tests); without ``run_dir``
        nothing is saved or resumed.
        """
        dist = dist or init_distributed(cfg.train, cfg.deepspeed)
        seed_everything(cfg.seed)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        model, tok = build_model(cfg.model, seed=cfg.seed, tokenizer=tokenizer)
        model.to(dist.device).train()
        examples = examples if examples is not None else load_examples(cfg.data)
        components = build_components(cfg.components)
        ctx = build_context(cfg, model, tok, examples, components, dist.device)
        engine = Engine(trainable_module(model, components), cfg.train, run_dir=run_dir, metrics=metrics, dist=dist,
                        deepspeed=cfg.deepspeed, name="unisd")
        if getattr(engine.backend, "stage", 0) >= 3:
            raise ValueError("unisd: sampling and the EMA teacher need full weights on every rank; use ZeRO-2 "
                             "(configs/deepspeed/zero2.json), not ZeRO-3")
        return engine, cls(engine, cfg, ctx, components)

    def micro_batches(self, step: int, world: int, rank: int) -> list[tuple[int, list[int]]]:
        self.ctx.step = step
        batches = rank_batches(len(self.ctx.examples), self.engine.train_cfg, step, self.cfg.seed, world, rank)
        return list(enumerate(batches))

    def count(self, micro: tuple[int, list[int]]) -> int:
        return len(micro[1])  # sequences

    def loss_terms(self, micro: tuple[int, list[int]], denom: float) -> Terms:
        """The teacher targets, the student forward, l_t, every component's hook, then kd."""
        ctx = self.ctx
        ctx.n_seq_total = denom
        ctx.begin_micro(*micro)
        targets = self.provider.teacher_targets(ctx)  # sets ctx.batch completions; teacher logits [B, L, V]
        ctx.student = ctx.forward(ctx.model, ctx.batch.prompt_ids, hidden="hidden_states" in ctx.needs)
        ctx.per_token = self.divergence(ctx.student.logits, targets.logits, targets.temperature)  # l_t [B, L]
        terms: dict = {}
        for comp in self.components:
            for name, value in comp.loss_terms(ctx, targets).items():
                if name in terms or name == "kd":
                    raise ValueError(f"component '{comp.name}' returned loss term '{name}' twice or named 'kd'")
                terms[name] = value
        terms = {"kd": ctx.seq_mean(ctx.per_token, ctx.token_weights, ctx.sequence_weights), **terms}
        return Terms({f"loss/{k}": v for k, v in terms.items()}, tokens=int(ctx.batch.loss_mask.sum()))

    def on_step_end(self, engine: Engine, step: int) -> None:
        self.ctx.step = step
        for comp in self.components:
            comp.on_step_end(self.ctx)
        self.stats = self.ctx.pop_stats()

    def log_extra(self) -> dict:
        return {**self.stats, "teacher_passes": self.ctx.teacher_passes}

    def state(self) -> dict:
        return {"components": {c.name: c.state_dict() for c in self.components}}

    def load_state(self, state: dict) -> None:
        for comp in self.components:
            comp.load_state_dict(state.get("components", {}).get(comp.name, {}))


def run(cfg: UniSDConfig, run_dir: Path) -> dict:
    if cfg.objective != "self_distill":
        return run_baseline(cfg, run_dir, hparams(cfg))
    run_dir = Path(run_dir)
    dist = init_distributed(cfg.train, cfg.deepspeed)
    rd = RunDir(run_dir)
    if dist.rank == 0:
        rd.start(cfg, recipe="unisd", components=components_table(cfg.components),
                 hparams=hparams(cfg))
    engine, recipe = UniSDRecipe.build(cfg, run_dir=run_dir, metrics=rd.metrics(enabled=dist.rank == 0), dist=dist)
    stats = engine.fit(recipe, cfg.train.max_steps)
    stats.update(teacher_passes=recipe.ctx.teacher_passes, world_size=dist.world)
    if dist.rank != 0:
        return {}
    model, tok = recipe.ctx.model, recipe.ctx.tokenizer
    artifacts = {}
    if cfg.save_model:
        artifacts["model"] = str(save_model(model, tok, run_dir / "model"))
    recipe.ctx.teacher = None  # free the teacher before evaluation
    evaluation = cfg.eval.run(model, tok, run_dir)
    engine.clear_state()
    return rd.finish(train=stats, artifacts=artifacts, **evaluation)


def id_view(resolved: dict) -> dict:
    """The resolved config as hashed into the run id (:func:`unisd.components.base.spec_id_view`)."""
    return {**resolved, "components": spec_id_view(resolved.get("components") or {})}


register_recipe("unisd", UniSDConfig, run, id_view=id_view)
