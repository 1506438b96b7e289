"""Recipe "recovery": degrade a model, then recover it by self-distillation (arXiv 2604.15794).

    python -m scd run configs/recovery/quantize_tiny.yaml
    python -m benchmarks.grid configs/grids/recovery_study.yaml   # the study
    python -m benchmarks.recovery_study results/recovery_study     # table, correlation, plots

Reads top to bottom:

1. the original model (frozen, eval mode, no grad) and a copy of it, the student;
2. degrade the student (``unisd.degrade``: quantize / prune / forget, strength from the
   config) -> a :class:`~unisd.degrade.Constraint` (grid, masks or none);
3. evaluate the degraded model, its per-token KL to the original and its per-layer CKA
   to the original on a fixed probe set ("before");
4. recover (``recovery.method``):
   ``sd``   token-level divergence (default forward KL(p_orig || p_student)) toward the
            frozen original, on the recovery sequences (below);
   ``sft``  plain cross-entropy on the continuation tokens of the same sequences;
   ``none`` no training (budget 0);
   with ``recovery.budget`` (:mod:`unisd.budget`) the probe KL before recovery decides:
   skipped below ``kl_min``, the lr scaled with it, early stop when the probe KL stops falling;
   after every optimiser step the constraint is re-applied (quantization grid or
   sparsity masks), so the recovered model stays compressed (``constraint_violation``
   in run.json is 0);
5. evaluate, KL and CKA again ("after") -> run.json.

Recovery data (our choice, documented in docs/recovery.md; :mod:`unisd.recovery_data`): the training prompts of
``data.tasks`` (a mixed set: every task family of the study), each followed by a
continuation: ``recovery.continuation: reference`` (default: the gold target, no
generation needed) or ``teacher`` (the original model's greedy continuation, cached in
the run directory).  ``sd`` matches the original's next-token distribution on every
non-pad position of prompt + continuation (``kl_tokens: all``, default) or on the
continuation only (``completion``); ``sft`` always trains on the continuation tokens.
The probe set (KL and CKA) is the ``probe.split`` (default dev) split of the probe
tasks, disjoint from the training prompts.

run.json: ``eval`` (after), ``eval_before``, ``eval_original``, ``cka`` (after:
mean_matched, per_layer, matrix, estimator, unit, n), ``cka_before``,
``kl_to_original`` {before, after}, ``degradation`` {name, strength, options, summary},
``recovery`` {method, budget_steps, tokens, loss, continuation, kl_tokens, budget (with
``recovery.budget``: kl_before, kl_min, skipped, reason, lr_factor, lr, steps_trained, early_stop)},
``constraint_violation``; heatmaps ``cka_before.png`` / ``cka.png``.  Resumable: the
degradation's result is kept under ``run_dir/degraded`` and training checkpoints under
``run_dir/ckpt`` until the run ends.  Runs of one grid that share the degraded model
share its "before" results and the original model's evaluation (``share_cache``, see
:func:`cache_keys`).
"""
from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from benchmarks.cka import model_cka, plot_cka_heatmap
from benchmarks.evaluate import EvalSpec
from scd.core.config import added_field, register_recipe, to_dict
from scd.core.engine import Engine, Placement, Terms, barrier, init_distributed, trainable_state
from scd.core.registry import RegistryError
from scd.core.results import RunDir, atomic_write_json, config_hash, read_json
from scd.core.train import TrainConfig, collate, peak_memory, rank_batches, seed_everything
from scd.data_config import DataConfig, load_training_pairs
from scd.losses import ce_per_token, per_token_divergence, resolve_divergence
from scd.models import ModelConfig, build_model, save_model
from scd.sft import target_count
from unisd.budget import BudgetConfig, KLEarlyStop, decide, shared_value
from unisd.recovery_data import encode_reference, load_probe, probe_batches, teacher_continuations
from unisd.degrade import (DEGRADATIONS, DegradeContext, MaskConstraint, NoConstraint, QuantConstraint,
                           degradation_summary, fake_quant)

RECOVERY_METHODS = ("none", "sd", "sft")


# =============================================================================== config
@dataclasses.dataclass(frozen=True)
class DegradationConfig:
    name: str = "quantize"  # registry("degradation"): quantize | prune | forget | your own
    strength: float = 4  # quantize: bits; prune: sparsity; forget: SFT steps
    options: dict = dataclasses.field(default_factory=dict)  # the degradation's options (see unisd.degrade)

    def __post_init__(self) -> None:
        try:
            spec = DEGRADATIONS.get(self.name)
        except RegistryError as e:
            raise ValueError(str(e)) from None
        spec.options(self.options)  # unknown/mistyped option -> ValueError naming it


@dataclasses.dataclass(frozen=True)
class RecoverySpec:
    method: str = "sd"  # none | sd | sft
    loss: str = "forward_kl"  # a divergence of registry("loss") (sd only)
    loss_params: dict = dataclasses.field(default_factory=dict)  # e.g. {beta: 0.5} for jsd
    temperature: float = 1.0
    continuation: str = "reference"  # reference (gold target) | teacher (original model, greedy)
    kl_tokens: str = "all"  # all (prompt + continuation) | completion
    max_new_tokens: int = 64  # teacher continuations
    gen_batch_size: int = 16
    budget: BudgetConfig | None = added_field(default=None)  # KL-aware budget (unisd.budget); None: off

    def __post_init__(self) -> None:
        if self.method not in RECOVERY_METHODS:
            raise ValueError(f"recovery.method must be one of {list(RECOVERY_METHODS)}, got {self.method!r}")
        if self.continuation not in ("reference", "teacher"):
            raise ValueError(f"recovery.continuation must be reference or teacher, got {self.continuation!r}")
        if self.kl_tokens not in ("all", "completion"):
            raise ValueError(f"recovery.kl_tokens must be all or completion, got {self.kl_tokens!r}")
        if self.method == "sd":
            resolve_divergence(self.loss, self.loss_params)
        if not self.temperature > 0:
            raise ValueError(f"recovery.temperature must be > 0, got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class RecoveryProbeConfig:
    """Fixed probe set for the KL-to-original and per-layer CKA measurements."""

    tasks: tuple[str, ...] = ()  # default: data.tasks
    split: str = "dev"
    n_examples: int = 64  # in total, spread over the tasks
    batch_size: int = 8
    max_len: int = 256
    with_target: bool = True  # prompt + reference target (else the prompt only)
    estimator: str = "linear"  # benchmarks.cka.ESTIMATORS
    unit: str = "tokens"  # tokens | mean_pool
    minibatch_size: int | None = 1024
    layers: tuple[int, ...] | None = None  # hidden-state indices (None: every decoder layer)
    # first k real tokens of every probe sequence left out of CKA: position 0 is the LLM's
    # attention sink (SmolLM2: norm ~23k vs ~100), which otherwise dominates linear CKA (docs/cka.md)
    skip_first: int = 1
    cka: bool = True
    heatmap: bool = True

    def __post_init__(self) -> None:
        if self.n_examples < 4:
            raise ValueError("probe.n_examples must be >= 4")
        if self.skip_first < 0:
            raise ValueError(f"probe.skip_first must be >= 0, got {self.skip_first}")


@dataclasses.dataclass(frozen=True)
class RecoveryConfig:
    recipe: str = "recovery"
    method: str = "recovery"
    grid: str | None = None
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()  # recovery prompts (and Wanda calibration)
    train: TrainConfig = TrainConfig()  # recovery budget: train.max_steps
    eval: EvalSpec = EvalSpec()
    degradation: DegradationConfig = DegradationConfig()
    recovery: RecoverySpec = RecoverySpec()
    probe: RecoveryProbeConfig = RecoveryProbeConfig()
    eval_original: bool = True  # also evaluate the undegraded model (the ceiling)
    share_cache: bool = True  # share "original" and "before" results between runs of one grid (see run())
    save_model: bool = False
    keep_degraded: bool = False  # keep run_dir/degraded (constraint tensors) after the run
    deepspeed: str | None = added_field(default=None)  # a DeepSpeed JSON (ZeRO-2; configs/deepspeed/zero2.json)


# ======================================================================= pure-ish pieces
def next_token_mask(batch: dict, tokens: str) -> Any:
    """[B, T-1] bool: positions t whose next token t+1 is trained/measured.

    tokens "all": every real (non-pad) next token; "completion": labels != -100.
    """
    if tokens == "all":
        return batch["attention_mask"][:, 1:].bool()
    return batch["labels"][:, 1:] != -100


def recovery_loss_sum(student, teacher, batch: dict, *, method: str, loss: str = "forward_kl",
                      loss_params: dict | None = None, temperature: float = 1.0, kl_tokens: str = "all"):
    """Summed per-token recovery loss of one micro-batch and its token count.

    sd:  sum_t D(p_T(.|x_<t) || p_S(.|x_<t)) over the masked positions (teacher under no_grad);
    sft: sum_t -log p_S(x_t | x_<t) over the continuation tokens.
    batch: input_ids / attention_mask / labels [B, T].  Returns (scalar, int).
    """
    out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    s_logits = out.logits[:, :-1]  # [B, T-1, V]
    if method == "sft":
        labels = batch["labels"][:, 1:]  # [B, T-1]
        mask = labels != -100
        per = ce_per_token(s_logits[mask], labels[mask])  # [N]
        return per.sum(), int(mask.sum())
    mask = next_token_mask(batch, kl_tokens)  # [B, T-1]
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    per = per_token_divergence(loss, s_logits[mask], t_logits[mask], temperature,
                               **(loss_params or {}))  # [N]
    return per.sum(), int(mask.sum())


def token_kl(student, teacher, batches, loss: str = "forward_kl", tokens: str = "all") -> float:
    """Mean per-token divergence D(p_teacher || p_student) (default forward KL) on batches."""
    total, n = 0.0, 0
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    try:
        with torch.no_grad():
            for b in batches:
                dev = next(student.parameters()).device
                b = {k: v.to(dev) for k, v in b.items()}
                mask = next_token_mask(b, tokens)
                s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
                t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
                per = per_token_divergence(loss, s[mask], t[mask].to(s.device))
                total += float(per.double().sum())
                n += int(mask.sum())
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    if n == 0:
        raise ValueError("token_kl: the probe batches hold no tokens")
    return total / n


class RecoveryRecipe:
    """sd / sft recovery of ``engine``'s module toward the frozen original ``teacher``.

    Micro-batches are collated ``encoded`` sequences (this rank's share); the loss is
    normalised by the trained tokens of the whole accumulated batch (sft: continuation
    tokens, sd: the ``kl_tokens`` positions) over all ranks.  After every optimiser step
    ``constraint.project`` puts the weights back on the quantization grid / sparsity
    pattern; its latent weights travel in the checkpoint.  Logged term: ``method``.
    ``stopper``: a :class:`~unisd.budget.KLEarlyStop` (probe KL every k steps; its state is checkpointed).
    """

    def __init__(self, engine: Engine, teacher, encoded: list[dict], *, method: str = "sd", constraint=None,
                 loss: str = "forward_kl", loss_params: dict | None = None, temperature: float = 1.0,
                 kl_tokens: str = "all", pad_id: int = 0, seed: int = 0, stopper: KLEarlyStop | None = None):
        if method not in ("sd", "sft"):
            raise ValueError(f"recovery trains with sd or sft, got {method!r}")
        self.engine, self.teacher, self.encoded, self.method = engine, teacher, encoded, method
        self.constraint = constraint or NoConstraint()
        self.loss, self.loss_params, self.temperature = loss, dict(loss_params or {}), temperature
        self.kl_tokens, self.pad_id, self.seed, self.stopper = kl_tokens, pad_id, seed, stopper
        teacher.to(engine.device).eval()

    def micro_batches(self, step: int, world: int, rank: int) -> list[dict]:
        return [collate([self.encoded[i] for i in idx], self.pad_id)
                for idx in rank_batches(len(self.encoded), self.engine.train_cfg, step, self.seed, world, rank)]

    def count(self, batch: dict) -> int:
        if self.method == "sft":
            return target_count(batch)
        return int(next_token_mask(batch, self.kl_tokens).sum())

    def loss_terms(self, batch: dict, denom: float) -> Terms:
        batch = {k: v.to(self.engine.device) for k, v in batch.items()}
        loss_sum, _ = recovery_loss_sum(self.engine.model, self.teacher, batch, method=self.method, loss=self.loss,
                                        loss_params=self.loss_params, temperature=self.temperature,
                                        kl_tokens=self.kl_tokens)
        return Terms({self.method: loss_sum / denom})

    def on_step_end(self, engine: Engine, step: int) -> None:
        if self.constraint.name != "none":
            self.constraint.project(engine.module)  # keep the model compressed
            engine.weights_changed()
        if self.stopper is not None:
            self.stopper.observe(step)  # probe KL every k steps (after the projection)

    def should_stop(self, step: int) -> bool:
        return self.stopper is not None and self.stopper.stopped

    def state(self) -> dict:
        return {"constraint": self.constraint.state(), **({"early_stop": self.stopper.state()} if self.stopper else {})}

    def load_state(self, state: dict) -> None:
        self.constraint.load_state({k: v.to(self.engine.device) for k, v in (state.get("constraint") or {}).items()})
        if self.stopper is not None:
            self.stopper.load_state(state.get("early_stop") or {})


def recover(student, teacher, encoded: list[dict], train: TrainConfig, *, method: str = "sd", constraint=None,
            loss: str = "forward_kl", loss_params: dict | None = None, temperature: float = 1.0,
            kl_tokens: str = "all", pad_id: int = 0, seed: int = 0, run_dir: Path | None = None,
            metrics=None, device=None, dist: Placement | None = None, deepspeed: str | None = None,
            stopper: KLEarlyStop | None = None) -> dict:
    """``train.max_steps`` optimiser steps (fewer when ``stopper`` stops early) of :class:`RecoveryRecipe`.

    Resumes from ``run_dir/ckpt`` when given.  ``dist``/``deepspeed``: the engine's backend
    (default: one process on ``device``, else the student's device).  Returns train stats.
    """
    if dist is None:
        dev = torch.device(device) if device is not None else next(student.parameters()).device
        dist = Placement(0, 1, 0, dev)
    engine = Engine(student, train, run_dir=run_dir, metrics=metrics, dist=dist, deepspeed=deepspeed, name="recovery")
    if getattr(engine.backend, "stage", 0) >= 3:
        raise ValueError("recovery: the constraint and the measurements need full weights on every rank; use "
                         "ZeRO-2 (configs/deepspeed/zero2.json), not ZeRO-3")
    recipe = RecoveryRecipe(engine, teacher, encoded, method=method, constraint=constraint, loss=loss,
                            loss_params=loss_params, temperature=temperature, kl_tokens=kl_tokens, pad_id=pad_id,
                            seed=seed, stopper=stopper)
    stats = engine.fit(recipe, train.max_steps)
    return {**stats, "final_loss": engine.last_stats.get("loss")}


# ======================================================================= measurements
def cka_to_original(student, teacher, batches: list[dict], probe: RecoveryProbeConfig) -> dict:
    """Per-layer CKA(student layer l, original layer l) on the probe batches -> run.json["cka"]."""
    layers = list(probe.layers) if probe.layers is not None else None
    res = model_cka(student, teacher, batches, layers_a=layers, layers_b=layers, estimator=probe.estimator,
                    unit=probe.unit, minibatch_size=probe.minibatch_size, skip_first=probe.skip_first)
    return {"mean_matched": res["mean_matched"], "per_layer": res["matched"], "layers": res["layers_a"],
            "layers_a": res["layers_a"], "layers_b": res["layers_b"], "matrix": res["matrix"],
            "estimator": res["estimator"], "unit": res["unit"], "n": res["n"], "reference": "original",
            "skip_first": probe.skip_first}


def measure_drift(student, teacher, batches: list[dict], cfg: RecoveryConfig) -> dict:
    """{"kl": mean per-token forward KL(original || model), "cka": per-layer CKA} on the probe set."""
    res = {"kl": token_kl(student, teacher, batches, "forward_kl", "all")}
    if cfg.probe.cka:
        res["cka"] = cka_to_original(student, teacher, batches, cfg.probe)
    return res


def write_heatmap(cka: dict, path: Path, title: str) -> dict:
    plot_cka_heatmap(cka["matrix"], path, title=title, xlabel="original layer", ylabel="model layer",
                     xticklabels=cka.get("layers_b"), yticklabels=cka.get("layers_a"))
    return {**cka, "heatmap": Path(path).name}


# ============================================================================ recipe
def _cached(path: Path, fn):
    """JSON result of ``fn()`` cached at ``path`` (resume does not recompute)."""
    if path.exists():
        return read_json(path)
    value = fn()
    atomic_write_json(path, value)
    return value


def _save_degraded(deg_dir: Path, constraint, student, save_weights: bool, meta: dict) -> None:
    deg_dir.mkdir(parents=True, exist_ok=True)
    t = constraint.tensors()
    if t:
        save_file(t, str(deg_dir / "constraint.safetensors"))
    if save_weights:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable_state(student).items()},
                  str(deg_dir / "model.safetensors"))
    atomic_write_json(deg_dir / "done.json", meta)  # written last: marks the degradation complete


def _load_degraded(deg_dir: Path, student, teacher, meta: dict):
    """Rebuild the degraded student and its constraint from ``deg_dir`` (resume)."""
    kind = meta["constraint"]
    t = load_file(str(deg_dir / "constraint.safetensors")) if (deg_dir / "constraint.safetensors").exists() else {}
    if (deg_dir / "model.safetensors").exists():
        student.load_state_dict(load_file(str(deg_dir / "model.safetensors")), strict=False)
    if kind == "quant_grid":
        latent = {} if meta.get("latent") else None
        c = QuantConstraint.from_tensors(t, latent)
        with torch.no_grad():
            for name, grid in c.grids.items():
                orig = teacher.get_submodule(name).weight.detach().float().clone()
                if latent is not None:
                    latent[name] = orig
                student.get_submodule(name).weight.copy_(fake_quant(orig, grid.to(orig.device)))
        return c
    if kind == "sparsity_mask":
        c = MaskConstraint.from_tensors(t, meta.get("pattern", "unstructured"))
        c.project(student)
        return c
    return NoConstraint()


def cache_keys(cfg: RecoveryConfig, run_dir: Path) -> tuple[Path, str, str]:
    """(cache dir, key of the original model's evaluation, key of the degraded model's results).

    The degraded model is a deterministic function of (model, data, degradation, seed,
    calibration batching); runs of a grid that differ only in the recovery (none / sft /
    sd, budget, lr) share its evaluation and probe measurements through
    ``<grid dir>/.shared/`` when ``share_cache`` is on (delete that folder after changing
    code that affects them).  Otherwise the cache is the run's own ``degraded/`` folder.
    """
    orig = {"model": to_dict(cfg.model), "eval": to_dict(cfg.eval), "seed": cfg.seed}
    before = {**orig, "data": to_dict(cfg.data), "degradation": to_dict(cfg.degradation),
              "probe": to_dict(cfg.probe), "calib": [cfg.train.batch_size, cfg.train.max_len]}
    cache = Path(run_dir).parent / ".shared" if cfg.share_cache else Path(run_dir) / "degraded"
    return cache, config_hash(orig), config_hash(before)


def _under(evaluation: dict, sub: str) -> dict:
    """An eval result written to ``run_dir/sub`` with its prediction paths relative to ``run_dir``."""
    info = {task: {**i, "predictions": f"{sub}/{i['predictions']}"} if i.get("predictions") else i
            for task, i in (evaluation.get("eval_info") or {}).items()}
    return {**evaluation, "eval_info": info} if info else evaluation


def degraded_student(cfg: RecoveryConfig, run_dir: Path, student, teacher, tok, pairs, dist: Placement):
    """Degrade ``student`` in place (or restore the degraded state of a resumed run) -> its constraint.

    Rank 0 degrades and saves ``run_dir/degraded``; the other ranks restore from it.
    """
    deg_dir, dcfg = run_dir / "degraded", cfg.degradation
    constraint = None
    if dist.rank == 0 and not (deg_dir / "done.json").exists():
        calib = encode_reference(pairs, tok, cfg.train.max_len)

        def calib_batches(n: int) -> list[dict]:
            order = torch.randperm(len(calib), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            bs = cfg.train.batch_size
            return [collate([calib[i] for i in order[k * bs:(k + 1) * bs]], tok.pad_token_id)
                    for k in range(min(n, -(-len(calib) // bs)))]

        def load_pairs(tasks, limit):
            return load_training_pairs(DataConfig(tasks=tuple(tasks), limit_per_task=limit), tok)

        ctx = DegradeContext(tokenizer=tok, device=dist.device, seed=cfg.seed, run_dir=run_dir,
                             calib_batches=calib_batches, load_pairs=load_pairs)
        spec = DEGRADATIONS.get(dcfg.name)
        constraint = spec.apply(student, dcfg.strength, spec.options(dcfg.options), ctx)
        summary = constraint.summary()
        _save_degraded(deg_dir, constraint, student, save_weights=summary["constraint"] == "none",
                       meta={**summary, "name": dcfg.name, "strength": dcfg.strength})
        shutil.rmtree(run_dir / "degrade" / "ckpt", ignore_errors=True)  # forget's SFT checkpoint
    barrier()  # under DeepSpeed: the other ranks wait for rank 0's saved state
    if constraint is None:
        constraint = _load_degraded(deg_dir, student, teacher, read_json(deg_dir / "done.json"))
        print(f"[recovery] restored the degraded model from {deg_dir}", flush=True)
    return constraint.to(dist.device)


def _cached_eval(path: Path, out_dir: Path, fn, shared: bool):
    """An evaluation cached at ``path`` whose files (predictions) ``fn`` writes under ``out_dir``.  With a
    grid-shared cache the files are kept beside it (``path`` without ``.json``) and copied into every run
    that reuses it, so each run folder holds the prediction files its run.json names."""
    files = path.with_suffix("")
    if path.exists():
        if shared and files.is_dir():
            shutil.copytree(files, out_dir, dirs_exist_ok=True)
        return read_json(path)
    value = fn()
    if shared and out_dir.is_dir():
        shutil.copytree(out_dir, files, dirs_exist_ok=True)  # before the JSON: a reader that finds it finds them
    atomic_write_json(path, value)
    return value


def measure_before(cfg: RecoveryConfig, run_dir: Path, student, teacher, tok, probe: list[dict]):
    """(probe measurements, evaluation) of the degraded model and the original's evaluation (cached)."""
    cache, orig_key, before_key = cache_keys(cfg, run_dir)
    before = _cached(cache / f"measure_before-{before_key}.json", lambda: measure_drift(student, teacher, probe, cfg))
    eval_before = _cached_eval(cache / f"eval_before-{before_key}.json", run_dir / "before",
                               lambda: cfg.eval.run(student, tok, run_dir / "before"), cfg.share_cache)
    eval_orig = (_cached_eval(cache / f"eval_original-{orig_key}.json", run_dir / "original",
                              lambda: cfg.eval.run(teacher, tok, run_dir / "original"), cfg.share_cache)
                 if cfg.eval_original else {})
    return before, eval_before, eval_orig


def train_recovery(cfg: RecoveryConfig, run_dir: Path, student, teacher, tok, pairs, constraint, dist: Placement,
                   metrics, decision: dict | None = None, stopper: KLEarlyStop | None = None) -> dict:
    """The recovery sequences (reference or the original's continuations), then :func:`recover`
    (at the budget's learning rate when ``decision`` is given)."""
    rcfg = cfg.recovery
    train = dataclasses.replace(cfg.train, lr=decision["lr"]) if decision else cfg.train
    if rcfg.continuation == "teacher":
        encoded = _cached(run_dir / "degraded" / "continuations.json", lambda: teacher_continuations(
            teacher, tok, [p for p, _ in pairs], max_new_tokens=rcfg.max_new_tokens,
            max_len=cfg.train.max_len, batch_size=rcfg.gen_batch_size, device=dist.device))
    else:
        encoded = encode_reference(pairs, tok, cfg.train.max_len)
    return recover(student, teacher, encoded, train, method=rcfg.method, constraint=constraint,
                   loss=rcfg.loss, loss_params=rcfg.loss_params, temperature=rcfg.temperature,
                   kl_tokens=rcfg.kl_tokens, pad_id=tok.pad_token_id, seed=cfg.seed, run_dir=run_dir,
                   metrics=metrics, dist=dist, deepspeed=cfg.deepspeed, stopper=stopper)


def plan_budget(cfg: RecoveryConfig, measured, student, teacher, probe) -> tuple[dict | None, KLEarlyStop | None]:
    """``recovery.budget``'s decision from the probe KL before recovery (rank 0's, on every rank) and its
    early stopper (probe KL of ``student``) -> (None, None) without a budget."""
    budget = cfg.recovery.budget
    if budget is None or cfg.recovery.method == "none":
        return None, None
    kl = measured[0]["kl"] if measured else None  # rank 0: the probe KL at every position
    if measured and budget.tokens != "all":
        kl = token_kl(student, teacher, probe, "forward_kl", budget.tokens)
    decision = decide(budget, shared_value(kl), cfg.train.lr)
    if budget.tokens != "all":
        decision["tokens"] = budget.tokens
    if budget.early_stop is None or decision["skipped"]:
        return decision, None
    return decision, KLEarlyStop(budget.early_stop, decision["kl_before"],
                                 lambda: shared_value(token_kl(student, teacher, probe, "forward_kl", budget.tokens)))


def after_fields(cfg: RecoveryConfig, run_dir: Path, student, teacher, tok, probe, constraint, measured,
                 stats: dict, budget_record: dict | None = None) -> dict:
    """Measure the recovered model and assemble run.json's fields (see the module doc)."""
    rcfg, dcfg = cfg.recovery, cfg.degradation
    before, eval_before, eval_orig = measured
    budget = 0 if rcfg.method == "none" else cfg.train.max_steps
    student.eval()
    violation = constraint.violation(student)
    if rcfg.method == "none" or (budget_record or {}).get("skipped"):  # the degraded model is the result
        after, evaluation = before, _under(eval_before, "before")
    else:
        after = measure_drift(student, teacher, probe, cfg)
        evaluation = cfg.eval.run(student, tok, run_dir)
    if cfg.probe.cka and cfg.probe.heatmap:
        before = {**before, "cka": write_heatmap(before["cka"], run_dir / "cka_before.png",
                                                 "CKA: degraded vs original")}
        after = {**after, "cka": write_heatmap(after["cka"], run_dir / "cka.png",
                                               f"CKA: recovered ({rcfg.method}) vs original")}
    artifacts = {}
    if cfg.save_model:
        artifacts["model"] = str(save_model(student, tok, run_dir / "model"))
    fields = {
        "train": stats,
        "artifacts": artifacts,
        **evaluation,
        "eval_before": eval_before.get("eval", {}),
        "eval_original": eval_orig.get("eval", {}),
        "kl_to_original": {"before": before["kl"], "after": after["kl"], "loss": "forward_kl",
                           "tokens": "all", "n_probe": sum(int(b["attention_mask"][:, 1:].sum()) for b in probe)},
        "degradation": {"name": dcfg.name, "strength": dcfg.strength,
                        "strength_meaning": DEGRADATIONS.get(dcfg.name).strength_meaning,
                        "options": dict(dcfg.options), "summary": degradation_summary(constraint)},
        "recovery": {"method": rcfg.method, "budget_steps": budget, "tokens": stats["tokens"],
                     "loss": rcfg.loss if rcfg.method == "sd" else ("ce" if rcfg.method == "sft" else None),
                     "continuation": rcfg.continuation if budget else None,
                     "kl_tokens": rcfg.kl_tokens if rcfg.method == "sd" else None,
                     **({"budget": budget_record} if budget_record is not None else {})},
        "constraint_violation": violation,
    }
    if "metric_meta" not in evaluation and eval_before.get("metric_meta"):
        fields["metric_meta"] = eval_before["metric_meta"]
    if cfg.probe.cka:
        fields["cka"] = after["cka"]
        fields["cka_before"] = before["cka"]
    return fields


def run(cfg: RecoveryConfig, run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    rcfg, dcfg = cfg.recovery, cfg.degradation
    budget = 0 if rcfg.method == "none" else cfg.train.max_steps
    dist = init_distributed(cfg.train, cfg.deepspeed)
    rd = RunDir(run_dir)
    if dist.rank == 0:
        rd.start(cfg, recipe="recovery",
                 hparams={"degradation": dcfg.name, "strength": dcfg.strength, "recovery": rcfg.method,
                          "budget_steps": budget, "lr": cfg.train.lr if budget else None})
    seed_everything(cfg.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)

    # 1. the original (frozen) and the student copy
    teacher, tok = build_model(cfg.model, seed=cfg.seed)
    teacher.to(dist.device).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    pairs = load_training_pairs(cfg.data, tok)
    # 2. degrade (or restore the degraded state on resume)
    constraint = degraded_student(cfg, run_dir, student, teacher, tok, pairs, dist)
    student.to(dist.device)
    # 3. before: task scores, KL and CKA to the original on the probe set (rank 0)
    probe = probe_batches(load_probe(cfg, tok), cfg.probe.batch_size, tok.pad_token_id)
    measured = measure_before(cfg, run_dir, student, teacher, tok, probe) if dist.rank == 0 else None
    # 4. recover (recovery.budget: skipped below kl_min, lr scaled, early stop on the probe KL)
    decision, stopper = plan_budget(cfg, measured, student, teacher, probe)
    stats: dict[str, Any] = {"tokens": 0, "steps": 0, "wall_s": 0.0, "peak_mem": peak_memory(dist.device)}
    if rcfg.method != "none" and not (decision or {}).get("skipped"):
        stats = train_recovery(cfg, run_dir, student, teacher, tok, pairs, constraint, dist,
                               rd.metrics(enabled=dist.rank == 0), decision, stopper)
        stats["world_size"] = dist.world
    if dist.rank != 0:
        return {}
    # 5. after
    record = {**decision, "steps_trained": stats["steps"],
              "early_stop": stopper.summary() if stopper else None} if decision else None
    fields = after_fields(cfg, run_dir, student, teacher, tok, probe, constraint, measured, stats, record)
    shutil.rmtree(run_dir / "ckpt", ignore_errors=True)  # training state (the run is complete)
    if not cfg.keep_degraded:
        shutil.rmtree(run_dir / "degraded", ignore_errors=True)
    return rd.finish(**fields)


register_recipe("recovery", RecoveryConfig, run)

