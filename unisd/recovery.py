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
   after every optimiser step the constraint is re-applied (quantization grid or
   sparsity masks), so the recovered model stays compressed (``constraint_violation``
   in run.json is 0);
5. evaluate, KL and CKA again ("after") -> run.json.

Recovery data (our choice, documented in docs/recovery.md): the training prompts of
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
``recovery`` {method, budget_steps, tokens, loss, continuation, kl_tokens},
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
import time
from pathlib import Path
from typing import Any

from benchmarks.evaluate import EvalSpec
from scd.core.config import register_recipe
from scd.core.results import atomic_write_json, read_json
from scd.core.train import (Checkpointer, TrainConfig, autocast, batch_indices, check_finite, collate,
                            finish_run, make_optimizer, peak_memory, resolve_device, seed_everything,
                            start_run, tokenize_sft)
from scd.data_config import DataConfig
from scd.models import ModelConfig, build_model, save_model

RECOVERY_METHODS = ("none", "sd", "sft")


# =============================================================================== config
@dataclasses.dataclass(frozen=True)
class DegradationConfig:
    name: str = "quantize"  # registry("degradation"): quantize | prune | forget | your own
    strength: float = 4  # quantize: bits; prune: sparsity; forget: SFT steps
    options: dict = dataclasses.field(default_factory=dict)  # the degradation's options (see unisd.degrade)

    def __post_init__(self) -> None:
        from scd.core.registry import RegistryError
        from unisd.degrade import DEGRADATIONS

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

    def __post_init__(self) -> None:
        if self.method not in RECOVERY_METHODS:
            raise ValueError(f"recovery.method must be one of {list(RECOVERY_METHODS)}, got {self.method!r}")
        if self.continuation not in ("reference", "teacher"):
            raise ValueError(f"recovery.continuation must be reference or teacher, got {self.continuation!r}")
        if self.kl_tokens not in ("all", "completion"):
            raise ValueError(f"recovery.kl_tokens must be all or completion, got {self.kl_tokens!r}")
        if self.method == "sd":
            from scd.losses import resolve_divergence

            resolve_divergence(self.loss, self.loss_params)
        if not self.temperature > 0:
            raise ValueError(f"recovery.temperature must be > 0, got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
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
    probe: ProbeConfig = ProbeConfig()
    eval_original: bool = True  # also evaluate the undegraded model (the ceiling)
    share_cache: bool = True  # share "original" and "before" results between runs of one grid (see run())
    save_model: bool = False
    keep_degraded: bool = False  # keep run_dir/degraded (constraint tensors) after the run


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
    import torch

    from scd.losses import ce_per_token, per_token_divergence

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
    import torch

    from scd.losses import per_token_divergence

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


def recover(student, teacher, encoded: list[dict], train: TrainConfig, *, method: str = "sd", constraint=None,
            loss: str = "forward_kl", loss_params: dict | None = None, temperature: float = 1.0,
            kl_tokens: str = "all", pad_id: int = 0, seed: int = 0, run_dir: Path | None = None,
            metrics=None, device=None) -> dict:
    """The recovery loop: ``train.max_steps`` optimiser steps of ``method`` (sd | sft).

    After every optimiser step ``constraint.project(student)`` puts the weights back on
    the quantization grid / sparsity pattern.  Loss normalised by the target tokens of
    the whole accumulated batch.  Resumes from ``run_dir/ckpt/last`` (the constraint's
    latent weights travel in the checkpoint).  Returns train stats.
    """
    import torch

    from unisd.degrade import NoConstraint

    if method not in ("sd", "sft"):
        raise ValueError(f"recover() trains with sd or sft, got {method!r}")
    constraint = constraint or NoConstraint()
    device = device or next(student.parameters()).device
    student.to(device).train()
    teacher.to(device).eval()
    opt, sched = make_optimizer(student, train)
    ckpt = Checkpointer(run_dir) if run_dir is not None else None
    start_step, tokens = 0, 0
    if ckpt is not None and ckpt.exists():
        start_step, extra = ckpt.load(student, opt, sched)
        tokens = int(extra.get("tokens", 0))
        constraint.load_state({k: v.to(device) for k, v in (extra.get("constraint") or {}).items()})
        print(f"[recovery] resumed at step {start_step}/{train.max_steps}", flush=True)
    if metrics is not None:
        metrics.drop_after(start_step)  # also without a checkpoint: rows of a killed attempt go
    t0 = time.time()
    last = {}
    for step in range(start_step, train.max_steps):
        micro = [collate([encoded[i] for i in batch_indices(len(encoded), train.batch_size, step, m,
                                                             train.grad_accum, seed)], pad_id)
                 for m in range(train.grad_accum)]
        if method == "sft":
            n_tok = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro)
        else:
            n_tok = sum(int(next_token_mask(mb, kl_tokens).sum()) for mb in micro)
        total = 0.0
        for mb in micro:
            mb = {k: v.to(device) for k, v in mb.items()}
            with autocast(train, device):
                loss_sum, _ = recovery_loss_sum(student, teacher, mb, method=method, loss=loss,
                                                loss_params=loss_params, temperature=temperature,
                                                kl_tokens=kl_tokens)
            lval = loss_sum / max(n_tok, 1)  # normalised by the whole accumulated batch
            lval.backward()
            total += float(lval.detach())
        check_finite(total, step + 1, method)
        gnorm = torch.nn.utils.clip_grad_norm_(student.parameters(), train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        constraint.project(student)  # keep the model compressed
        tokens += n_tok
        done = step + 1
        if metrics is not None and (done % train.log_every == 0 or done == train.max_steps):
            last = {"step": done, "loss": total, method: total, "lr": sched.get_last_lr()[0],
                    "grad_norm": float(gnorm), "tokens": tokens}
            metrics.log(last)
        if ckpt is not None and train.save_every and done % train.save_every == 0 and done < train.max_steps:
            ckpt.save(student, opt, sched, done, {"tokens": tokens, "constraint": constraint.state()})
    return {"tokens": tokens, "steps": train.max_steps, "wall_s": round(time.time() - t0, 2),
            "peak_mem": peak_memory(torch.device(device) if isinstance(device, str) else device),
            "final_loss": last.get("loss")}


# ============================================================================ data
def encode_reference(pairs: list[tuple[str, str]], tokenizer, max_len: int) -> list[dict]:
    return [tokenize_sft(tokenizer, p, t, max_len) for p, t in pairs]


def teacher_continuations(teacher, tokenizer, prompts: list[str], *, max_new_tokens: int, max_len: int,
                          batch_size: int, device) -> list[dict]:
    """Prompt + the original model's greedy continuation (cut after eos), labels on the continuation."""
    import torch

    eos = tokenizer.eos_token_id
    out: list[dict] = []
    old = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            enc = tokenizer(chunk, add_special_tokens=False, return_tensors="pt", padding=True, truncation=True,
                            max_length=max(8, max_len - max_new_tokens))
            with torch.no_grad():
                gen = teacher.generate(input_ids=enc["input_ids"].to(device),
                                       attention_mask=enc["attention_mask"].to(device), do_sample=False,
                                       max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            new = gen[:, enc["input_ids"].shape[1]:].tolist()
            for row, ids, am in zip(new, enc["input_ids"].tolist(), enc["attention_mask"].tolist()):
                p = [t for t, m in zip(ids, am) if m]
                c = row[: row.index(eos) + 1] if eos in row else row
                c = c or [eos]
                out.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    finally:
        tokenizer.padding_side = old
    return out


def probe_batches(encoded: list[dict], batch_size: int, pad_id: int) -> list[dict]:
    return [collate(encoded[i:i + batch_size], pad_id) for i in range(0, len(encoded), batch_size)]


def load_probe(cfg: RecoveryConfig, tokenizer) -> list[dict]:
    from scd.data.load import load_split
    from scd.data.prompts import render_prompt, render_target

    tasks = list(cfg.probe.tasks) or list(cfg.data.tasks)
    per_task = -(-cfg.probe.n_examples // len(tasks))
    items = []
    for task in tasks:
        for ex in load_split(task, cfg.probe.split, limit=per_task):
            p = render_prompt(ex, tokenizer)
            if cfg.probe.with_target:
                items.append(tokenize_sft(tokenizer, p, render_target(ex, tokenizer), cfg.probe.max_len))
            else:
                ids = tokenizer(p, add_special_tokens=False)["input_ids"][-cfg.probe.max_len:]
                items.append({"input_ids": ids, "labels": [-100] * len(ids)})
    if not items:
        raise ValueError(f"probe set is empty (tasks {tasks}, split {cfg.probe.split})")
    return items[: cfg.probe.n_examples]


# ======================================================================= measurements
def cka_to_original(student, teacher, batches: list[dict], probe: ProbeConfig) -> dict:
    """Per-layer CKA(student layer l, original layer l) on the probe batches -> run.json["cka"]."""
    from benchmarks.cka import model_cka

    layers = list(probe.layers) if probe.layers is not None else None
    res = model_cka(student, teacher, batches, layers_a=layers, layers_b=layers, estimator=probe.estimator,
                    unit=probe.unit, minibatch_size=probe.minibatch_size, skip_first=probe.skip_first)
    return {"mean_matched": res["mean_matched"], "per_layer": res["matched"], "layers": res["layers_a"],
            "layers_a": res["layers_a"], "layers_b": res["layers_b"], "matrix": res["matrix"],
            "estimator": res["estimator"], "unit": res["unit"], "n": res["n"], "reference": "original",
            "skip_first": probe.skip_first}


def measure(student, teacher, batches: list[dict], cfg: RecoveryConfig) -> dict:
    """{"kl": mean per-token forward KL(original || model), "cka": per-layer CKA} on the probe set."""
    res = {"kl": token_kl(student, teacher, batches, "forward_kl", "all")}
    if cfg.probe.cka:
        res["cka"] = cka_to_original(student, teacher, batches, cfg.probe)
    return res


def write_heatmap(cka: dict, path: Path, title: str) -> dict:
    from benchmarks.cka import plot_cka_heatmap

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
    from safetensors.torch import save_file

    from scd.core.train import trainable_state

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
    import torch
    from safetensors.torch import load_file

    from unisd.degrade import MaskConstraint, NoConstraint, QuantConstraint, fake_quant

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
    from scd.core.config import to_dict
    from scd.core.results import config_hash

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


def run(cfg: RecoveryConfig, run_dir: Path) -> dict:
    import torch

    from scd.data_config import load_training_pairs
    from unisd.degrade import DEGRADATIONS, DegradeContext, degradation_summary

    run_dir = Path(run_dir)
    rcfg, dcfg = cfg.recovery, cfg.degradation
    budget = 0 if rcfg.method == "none" else cfg.train.max_steps
    rd = start_run(cfg, run_dir, recipe="recovery",
                   hparams={"degradation": dcfg.name, "strength": dcfg.strength, "recovery": rcfg.method,
                            "budget_steps": budget, "lr": cfg.train.lr if budget else None})
    seed_everything(cfg.seed)
    device = resolve_device(cfg.train.device)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)

    # 1. the original (frozen) and the student copy
    teacher, tok = build_model(cfg.model, seed=cfg.seed)
    teacher.to(device).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    pad_id = tok.pad_token_id
    pairs = load_training_pairs(cfg.data, tok)

    # 2. degrade (or restore the degraded state on resume)
    deg_dir = run_dir / "degraded"
    spec = DEGRADATIONS.get(dcfg.name)
    if (deg_dir / "done.json").exists():
        meta = read_json(deg_dir / "done.json")
        constraint = _load_degraded(deg_dir, student, teacher, meta)
        print(f"[recovery] restored the degraded model from {deg_dir}", flush=True)
    else:
        calib = encode_reference(pairs, tok, cfg.train.max_len)

        def calib_batches(n: int) -> list[dict]:
            order = torch.randperm(len(calib), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            bs = cfg.train.batch_size
            return [collate([calib[i] for i in order[k * bs:(k + 1) * bs]], pad_id)
                    for k in range(min(n, -(-len(calib) // bs)))]

        def load_pairs(tasks, limit):
            return load_training_pairs(DataConfig(tasks=tuple(tasks), limit_per_task=limit), tok)

        ctx = DegradeContext(tokenizer=tok, device=device, seed=cfg.seed, run_dir=run_dir,
                             calib_batches=calib_batches, load_pairs=load_pairs)
        constraint = spec.apply(student, dcfg.strength, spec.options(dcfg.options), ctx)
        summary = constraint.summary()
        _save_degraded(deg_dir, constraint, student, save_weights=summary["constraint"] == "none",
                       meta={**summary, "name": dcfg.name, "strength": dcfg.strength})
        shutil.rmtree(run_dir / "degrade" / "ckpt", ignore_errors=True)  # forget's SFT checkpoint
    constraint.to(device)
    student.to(device)

    # 3. before: task scores, KL and CKA to the original on the probe set
    probe = probe_batches(load_probe(cfg, tok), cfg.probe.batch_size, pad_id)
    cache, orig_key, before_key = cache_keys(cfg, run_dir)
    before = _cached(cache / f"measure_before-{before_key}.json", lambda: measure(student, teacher, probe, cfg))
    eval_before = _cached(cache / f"eval_before-{before_key}.json",
                          lambda: cfg.eval.run(student, tok, run_dir / "before"))
    eval_orig = (_cached(cache / f"eval_original-{orig_key}.json",
                         lambda: cfg.eval.run(teacher, tok, run_dir / "original")) if cfg.eval_original else {})

    # 4. recover
    stats: dict[str, Any] = {"tokens": 0, "steps": 0, "wall_s": 0.0, "peak_mem": peak_memory(device)}
    if rcfg.method != "none":
        if rcfg.continuation == "teacher":
            encoded = _cached(run_dir / "degraded" / "continuations.json", lambda: teacher_continuations(
                teacher, tok, [p for p, _ in pairs], max_new_tokens=rcfg.max_new_tokens,
                max_len=cfg.train.max_len, batch_size=rcfg.gen_batch_size, device=device))
        else:
            encoded = encode_reference(pairs, tok, cfg.train.max_len)
        stats = recover(student, teacher, encoded, cfg.train, method=rcfg.method, constraint=constraint,
                        loss=rcfg.loss, loss_params=rcfg.loss_params, temperature=rcfg.temperature,
                        kl_tokens=rcfg.kl_tokens, pad_id=pad_id, seed=cfg.seed, run_dir=run_dir,
                        metrics=rd.metrics(), device=device)
    student.eval()
    violation = constraint.violation(student)

    # 5. after
    if rcfg.method == "none":  # the degraded model is the result; its predictions are under before/
        after, evaluation = before, _under(eval_before, "before")
    else:
        after = measure(student, teacher, probe, cfg)
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
        "degradation": {"name": dcfg.name, "strength": dcfg.strength, "strength_meaning": spec.strength_meaning,
                        "options": dict(dcfg.options), "summary": degradation_summary(constraint)},
        "recovery": {"method": rcfg.method, "budget_steps": budget, "tokens": stats["tokens"],
                     "loss": rcfg.loss if rcfg.method == "sd" else ("ce" if rcfg.method == "sft" else None),
                     "continuation": rcfg.continuation if budget else None,
                     "kl_tokens": rcfg.kl_tokens if rcfg.method == "sd" else None},
        "constraint_violation": violation,
    }
    if "metric_meta" not in evaluation and eval_before.get("metric_meta"):
        fields["metric_meta"] = eval_before["metric_meta"]
    if cfg.probe.cka:
        fields["cka"] = after["cka"]
        fields["cka_before"] = before["cka"]
    shutil.rmtree(run_dir / "ckpt", ignore_errors=True)  # training state (the run is complete)
    if not cfg.keep_degraded:
        shutil.rmtree(deg_dir, ignore_errors=True)
    return finish_run(rd, **fields)


register_recipe("recovery", RecoveryConfig, run)

