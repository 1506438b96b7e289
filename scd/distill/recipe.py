"""The distillation recipe on the training engine: stages, teacher switches, the run.

:class:`DistillRecipe` is driven by :class:`scd.core.engine.Engine`.  At the first step
of each stage (``on_step_start``) it selects the stage's teacher checkpoint, switches
the resident teacher in place, resets the optimiser and LR schedule for the stage
(``stages.reset_optimizer``) and saves the resumable state (stage, selections, probe
KLs) before the stage trains.  :func:`run` reads top to bottom: dependencies ->
manifest + sha256 check -> student, tokenizer check -> data -> AW anchor losses ->
engine (plain PyTorch or DeepSpeed) -> fit (resumes) -> save, evaluate, run.json.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from scd.completion_loss import completion_terms, head_dtype, logit_kd_ce
from scd.core.config import register_recipe
from scd.core.dependencies import build_record
from scd.core.engine import Engine, Terms, init_distributed
from scd.core.results import RunDir, read_metrics
from scd.core.train import check_finite, collate, rank_batches, seed_everything, tokenize_sft
from scd.data_config import load_training_pairs
from scd.distill.cached import CachedTeacher
from scd.distill.config import DistillConfig
from scd.distill.loss import kd_weights, micro_batch_loss, micro_batch_loss_by_sample
from scd.distill.probe import probe_encoded, select_stage, student_logits
from scd.distill.teacher_slot import (TeacherSlot, anchor_losses, anchor_model_dir, data_hash, ensure_dependency,
                                      find_manifest, rank0_cached)
from scd.heads import all_position_labels, num_samples_with_targets, target_labels, target_positions, teacher_targets
from scd.models import build_model, check_same_tokenizer, load_tokenizer, save_model, torch_dtype
from scd.schedule import SELECTIONS, Manifest, select_checkpoint
from scd.sft import model_build, target_count
from scd.student import resolve_model
from scd.teacher import per_sample_ce, savable


def no_autocast(device):
    """Full precision for the teacher and the loss math (only the student's forward autocasts)."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


def stage_plan(cfg: DistillConfig, manifest, n_examples: int, world: int) -> tuple[int, int]:
    """(number of stages, optimiser steps per stage)."""
    n_stages = cfg.stages.n_stages or (len(manifest) if manifest is not None else 1)
    per_step = cfg.train.batch_size * cfg.train.grad_accum * world
    if cfg.stages.steps_per_stage:
        return n_stages, cfg.stages.steps_per_stage
    if cfg.stages.epochs_per_stage:
        return n_stages, max(1, math.ceil(cfg.stages.epochs_per_stage * n_examples / per_step))
    return n_stages, max(1, cfg.train.max_steps // n_stages)


class DistillRecipe:
    """Staged distillation of ``engine``'s student from the checkpoints in ``manifest``.

    ``manifest`` None: gold labels only (weighting none, alpha 0; the teacher is never
    loaded).  ``anchor_loss``: AW's per-example anchor losses [N_train] or None.
    Resumable state (:meth:`state`): the stage, the selections so far and KL(best || c).
    """

    def __init__(self, engine: Engine, cfg: DistillConfig, encoded: list[dict], tok, *, vocab: int, manifest,
                 anchor_loss=None, dhash: str = ""):
        self.engine, self.cfg, self.encoded, self.tok, self.vocab = engine, cfg, encoded, tok, vocab
        self.manifest, self.anchor_loss, self.dhash = manifest, anchor_loss, dhash
        self.n_stages, self.sps = stage_plan(cfg, manifest, len(encoded), engine.dist.world)
        self.total_steps = self.n_stages * self.sps
        self.cache_dir = Path(engine.run_dir or ".") / "cache"
        self.slot = TeacherSlot(manifest, cfg.teacher.dtype, engine.device) if manifest is not None else None
        needs_probe = self.slot is not None and getattr(SELECTIONS.get(cfg.stages.selection), "needs_probe_kl", False)
        self.probe = probe_encoded(cfg, tok) if needs_probe else None
        self.cached = None  # the teacher-logit cache (teacher.cache), else the live teacher
        if self.slot is not None and cfg.teacher.cache is not None:
            self.cached = CachedTeacher(cfg, self.slot, encoded, tok, vocab, engine.device, engine.dist.rank,
                                        self.probe if self.probe is not None else probe_encoded(cfg, tok))
        self.targets = None  # the resident stage's cache (TeacherLogitCache) when cached
        self.live_forwards = 0  # live teacher forwards on training batches (0 with a cache)
        self.selections: list[int] = []
        self.kl_best: dict[int, float] = {}
        self.teacher_losses: dict[int, torch.Tensor] = {}  # AW: per-example CE of each selected checkpoint
        self.stage: int | None = None  # the stage being trained (its teacher is resident)
        self.resumed = False

    # -- data and loss (called by the engine for every micro-batch)
    def micro_batches(self, step: int, world: int, rank: int) -> list[tuple[list[int], dict]]:
        pad = self.tok.pad_token_id
        return [(idx, collate([self.encoded[i] for i in idx], pad))
                for idx in rank_batches(len(self.encoded), self.cfg.train, step, self.cfg.seed, world, rank)]

    def count(self, micro) -> int:
        """The loss's normaliser: target tokens (``weighting.reduce: token``) or samples (``sample``)."""
        if self.cfg.weighting.reduce == "sample":
            return num_samples_with_targets(micro[1]["labels"])
        return target_count(micro[1])

    def loss_terms(self, micro, denom: float) -> Terms:
        """w * KD + (1 - w) * CE summed over the target tokens (or, ``weighting.reduce: sample``, over
        the samples' per-token means) / ``denom`` (the loss term); the KD, CE and weight sums as stats
        (logged as means over the global batch's target tokens, or samples)."""
        idx, b = micro
        device, cfg = self.engine.device, self.cfg
        b = {k: v.to(device) for k, v in b.items()}
        kd, kd_rows, ce, rows = self._token_terms(idx, b)  # [M], [M], [N], [N]: values and batch rows
        with no_autocast(device):
            teacher_loss = self.teacher_losses.get(self.selections[self.stage]) if self.slot is not None else None
            w = kd_weights(cfg.weighting, len(idx), device=device,
                               anchor_loss=None if self.anchor_loss is None else self.anchor_loss[idx],
                               teacher_loss=None if teacher_loss is None else teacher_loss[idx])  # [B]
            if cfg.weighting.reduce == "sample":
                loss, kd_b, ce_b = micro_batch_loss_by_sample(kd, ce, rows, w, denom, kd_rows=kd_rows)
                has = torch.bincount(rows, minlength=len(idx)) > 0  # [B] samples with a target
                kd_sum, ce_sum = float(kd_b.detach()[has].sum()), float(ce_b.detach()[has].sum())
                w_sum = float(w[has].sum())
            else:
                loss = micro_batch_loss(kd, ce, rows, w, denom)
                kd_sum, ce_sum, w_sum = float(kd.detach().sum()), float(ce.detach().sum()), float(w[rows].sum())
        if self.slot is not None:  # the divergence's name in the diverged record
            check_finite(kd_sum, self.engine.step + 1, f"kd:{cfg.loss.divergence}")
        check_finite(ce_sum, self.engine.step + 1, "ce")
        return Terms({"loss": loss}, {"kd": kd_sum, "ce": ce_sum, "w_mean": w_sum})

    def _teacher(self, idx: list[int], b: dict) -> dict:
        """The teacher side of the KD term at the N target positions, as keyword arguments of
        ``completion_terms`` / ``logit_kd_ce``: {} (gold labels only), cached targets (TopKTeacher or
        logits [N, V]), the live teacher's hidden states [N, H] + its head, or its logits [N, V]."""
        if self.slot is None:
            return {}
        if self.targets is not None:
            return {"teacher": self.targets.targets(idx, device=self.engine.device)}
        self.live_forwards += 1
        model = self.slot.model
        with torch.no_grad(), no_autocast(self.engine.device):
            if not self.cfg.train.completion_only:  # the full-logit reference path
                return {"teacher": self.slot.logits(b)[:, :-1][b["labels"][:, 1:] != -100]}
            return teacher_targets(model, b, self.cfg.train.share_prefix)

    def _token_terms(self, idx: list[int], b: dict):
        """(kd [M], kd_rows [M], ce [N], rows [N]): per-token terms and the batch row of each token.

        KD and CE at the N target positions (``loss.positions: target``, M = N), or KD at every
        position with a next token and CE at the targets among them (``all``).  The student's head
        is applied only there (fused with the loss; ``train.completion_only``), or at every position
        (the full-logit reference)."""
        cfg = self.cfg
        kb = b if cfg.loss.positions == "target" else {
            **b, "labels": all_position_labels(b["input_ids"], b["attention_mask"])}  # KD's positions
        teacher = self._teacher(idx, kb)
        kd_kw = dict(name=cfg.loss.divergence, temperature=cfg.loss.temperature, vocab=self.vocab,
                     **cfg.loss.params) if teacher else {}
        if cfg.train.completion_only:
            kd, ce = completion_terms(self.engine.model, kb, head_dtype=head_dtype(cfg.train),
                                      share_prefix=cfg.train.share_prefix, **teacher, **kd_kw)
        else:
            s = student_logits(self.engine, kb)[:, :-1][kb["labels"][:, 1:] != -100]  # [M, V]
            with no_autocast(self.engine.device):
                kd, ce = logit_kd_ce(s, labels=target_labels(kb["labels"]), **teacher, **kd_kw)
        kd_rows = target_positions(kb["labels"])[0]  # [M]
        if kb is b:
            return kd, kd_rows, ce, kd_rows
        # CE at the gold targets: they are among the M positions (labels there = the next input token)
        gold = (b["labels"][:, 1:] != -100)[kb["labels"][:, 1:] != -100]  # [M] bool
        return kd, kd_rows, ce[gold], kd_rows[gold]

    # -- stages (engine hooks)
    def is_boundary(self, step: int) -> bool:
        return step % self.sps == 0

    def on_step_start(self, engine: Engine, step: int) -> None:
        """At a stage's first step (or the first step after a resume): its teacher, schedule and checkpoint."""
        stage = step // self.sps
        if stage == self.stage:
            return
        g0 = stage * self.sps  # global step at the stage start
        # resumed inside this stage (or at its start, after its selection was saved)
        mid_stage = self.resumed and (step > g0 or (step == g0 and len(self.selections) > stage))
        self.stage, self.resumed = stage, False
        if self.slot is not None:
            self._switch_teacher(stage, g0, log=not mid_stage)
        if not mid_stage:
            if self.cfg.stages.reset_optimizer:
                engine.new_schedule(self.sps, reset_state=True)
            elif stage == 0:
                engine.new_schedule(self.total_steps, reset_state=False)
            engine.save(g0, self)

    def _switch_teacher(self, stage: int, g0: int, log: bool) -> None:
        """Select this stage's checkpoint (logged with its probe KLs) and make it resident (its cache
        with ``teacher.cache``, else its weights in the slot)."""
        metrics, manifest, slot, cached = self.engine.metrics, self.manifest, self.slot, self.cached
        if len(self.selections) <= stage:
            lp = None if cached is None else (lambda c: cached.probe_logprobs(c, self.probe, self.cfg.probe.batch_size))
            self.selections.append(select_stage(stage, self.n_stages, g0, self.cfg, manifest, slot, self.engine,
                                                self.probe, self.tok, self.vocab, self.kl_best, metrics, lp))
        choice = self.selections[stage]
        resident = slot.index == choice  # e.g. the last checkpoint the probe loaded
        row = {}
        if cached is None:
            secs, in_place = slot.ensure(choice)
        else:
            t0, self.targets = time.perf_counter(), None
            self.targets = cached.open(choice)
            secs, in_place = time.perf_counter() - t0, False
            row = {"cache": self.targets.id, "built_shards": self.targets.built_shards}
        if log:
            metrics.log({"step": g0, "event": "teacher_switch", "stage": stage, "checkpoint": choice,
                         "checkpoint_step": manifest[choice].step, "switch_s": round(secs, 4),
                         "in_place": in_place, "already_resident": resident, **row})
        if self.anchor_loss is not None and choice not in self.teacher_losses:
            if cached is not None:
                self.teacher_losses[choice] = cached.per_sample_ce(choice, self.dhash)
                return
            bs, pad = 2 * self.cfg.train.batch_size, self.tok.pad_token_id
            self.teacher_losses[choice] = rank0_cached(
                self.cache_dir, manifest[choice].sha256, self.dhash,
                lambda: per_sample_ce(slot.model, self.encoded, pad, bs, self.engine.device)[0], self.engine.dist.rank)

    def before_resume(self, engine: Engine) -> None:
        """The schedule the checkpoint's state belongs to (its values come from the checkpoint)."""
        engine.new_schedule(self.sps if self.cfg.stages.reset_optimizer else self.total_steps, reset_state=True)

    def state(self) -> dict:
        return {"stage": self.stage, "selections": list(self.selections),
                "kl_best": {str(k): v for k, v in self.kl_best.items()}}

    def load_state(self, state: dict) -> None:
        self.selections = [int(c) for c in state.get("selections", [])]
        self.kl_best = {int(k): float(v) for k, v in state.get("kl_best", {}).items()}
        self.resumed = True

    def log_extra(self) -> dict:
        return {"stage": self.stage, "teacher": self.selections[self.stage] if self.slot is not None else None}

    def train_record(self, stats: dict, metrics_path: Path) -> dict:
        """run.json's ``train`` block."""
        switches = [r for r in read_metrics(metrics_path) if r.get("event") == "teacher_switch"]
        return {**stats, "steps": self.total_steps, "steps_per_stage": self.sps, "stages": self.n_stages,
                "world_size": self.engine.dist.world, "selections": self.selections,
                "selection_steps": [self.manifest[c].step for c in self.selections] if self.manifest else [],
                "switch_s_total": round(sum(r["switch_s"] for r in switches), 4), "deepspeed": self.cfg.deepspeed,
                **self.teacher_record()}

    def teacher_record(self) -> dict:
        """How the teacher was run: forwards over training batches, checkpoint loads, the cache."""
        if self.slot is None:
            return {}
        out = {"teacher_forwards_train": self.live_forwards, "teacher_loads": len(self.slot.loads)}
        if self.cached is not None:
            out["teacher_cache"] = self.cached.record()
            out["teacher_forwards_train"] += self.cached.forwards
        return out


# ------------------------------------------------------------------------------ the run
def _start(cfg: DistillConfig, run_dir: Path, use_teacher: bool) -> RunDir:
    """run.json (status running) with the method's hyper-parameters and components."""
    distilling = cfg.mode == "distill"
    components = {"kd": distilling and use_teacher, "staged": distilling and cfg.stages.n_stages != 1,
                  "scd_select": distilling and use_teacher and cfg.stages.selection == "scd_select",
                  "aw": distilling and cfg.weighting.needs_losses} if distilling else {}
    hparams = {"lr": cfg.train.lr, "max_steps": cfg.train.max_steps, "n_stages": cfg.stages.n_stages,
               "selection": cfg.stages.selection, "divergence": cfg.loss.divergence,
               "temperature": cfg.loss.temperature, "weighting": cfg.weighting.name, "alpha": cfg.weighting.alpha,
               "reduce": cfg.weighting.reduce}
    return RunDir(run_dir).start(cfg, recipe="distill", hparams=hparams, components=components)


def _dependencies(cfg: DistillConfig, use_teacher: bool, rank: int) -> tuple[Path | None, Path | None]:
    """(teacher run dir, AW anchor model dir); runs named by a config are trained here if missing."""
    teacher_dir, anchor_dir = None, None
    if use_teacher and cfg.teacher.config:
        seed = cfg.teacher.seed if cfg.teacher.seed is not None else cfg.seed
        teacher_dir = ensure_dependency(cfg.teacher.config, seed, cfg.teacher.results_dir, "teacher.config", rank,
                                        recipe="teacher")
    elif use_teacher:
        teacher_dir = Path(cfg.teacher.run_dir)
    if cfg.weighting.needs_losses:
        if cfg.weighting.anchor_config:
            seed = cfg.weighting.anchor_seed if cfg.weighting.anchor_seed is not None else cfg.seed
            anchor_dir = ensure_dependency(cfg.weighting.anchor_config, seed, cfg.teacher.results_dir,
                                           "student anchor", rank)
        else:
            anchor_dir = Path(cfg.weighting.anchor_run_dir)
        anchor_dir = anchor_model_dir(anchor_dir)
    return teacher_dir, anchor_dir


def _builds(teacher_dir: Path | None, manifest, student_dir: Path | None, anchor_dir: Path | None) -> dict:
    """run.json ``dependencies``: which build of the teacher, the healed student (its model folder) and the AW
    anchor this run used."""
    out = {}
    if manifest is not None:
        out["teacher"] = build_record(teacher_dir, checkpoints_sha256=[c.sha256 for c in manifest.checkpoints])
    if student_dir is not None:
        out["student"] = model_build(student_dir)
    if anchor_dir is not None:
        out["anchor"] = model_build(anchor_dir)
    return out


def _shared_vocab(cfg: DistillConfig, tok, manifest, anchor_dir: Path | None) -> int:
    """The ids the student shares with the teacher (and the anchor): a clear start-up error otherwise."""
    vocab = len(tok)
    if manifest is not None:
        vocab = check_same_tokenizer(load_tokenizer(str(manifest.resolve(manifest.final_index))), tok,
                                     "teacher", "student", allow_prefix=cfg.teacher.allow_vocab_prefix)
    if anchor_dir is not None:
        check_same_tokenizer(load_tokenizer(str(anchor_dir)), tok, "student anchor", "student")
    return vocab


def run(cfg: DistillConfig, run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    use_teacher = cfg.mode == "eval_teacher" or not cfg.weighting.gold_only
    rank = int(os.environ.get("RANK", "0"))
    # run.json first, so a failing dependency is recorded in it
    rd = _start(cfg, run_dir, use_teacher) if rank == 0 else RunDir(run_dir)
    teacher_dir, anchor_dir = _dependencies(cfg, use_teacher, rank)
    model_cfg, student_dir = cfg.model, None
    if cfg.mode != "eval_teacher":  # model.student: the healed student run (trained here if missing)
        model_cfg = resolve_model(cfg.model, cfg.seed, rank)
        student_dir = Path(model_cfg.name) if cfg.model.student is not None else None
    dist = init_distributed(cfg.train, cfg.deepspeed)
    metrics = rd.metrics(enabled=dist.rank == 0)
    seed_everything(cfg.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    manifest = None
    if use_teacher:  # verified (sha256) before anything is trained
        manifest = Manifest.read(find_manifest(teacher_dir))
        manifest.verify()  # an edited checkpoint -> ManifestError naming it
    builds = _builds(teacher_dir, manifest, student_dir, anchor_dir) if dist.rank == 0 else {}
    if cfg.mode == "eval_teacher":
        return _eval_teacher(cfg, rd, manifest, dist.device, dist.rank, builds)

    student, tok = build_model(model_cfg, seed=cfg.seed)
    vocab = _shared_vocab(cfg, tok, manifest, anchor_dir)
    # data: tokenised once; the order of batches is a pure function of (seed, step)
    encoded = [tokenize_sft(tok, p, t, cfg.train.max_len) for p, t in load_training_pairs(cfg.data, tok)]
    dhash = data_hash(encoded)
    anchor_loss = None
    if anchor_dir is not None:  # AW: the anchor's per-sample losses, computed once (rank 0) and cached
        anchor_loss = anchor_losses(anchor_dir, encoded, tok.pad_token_id, 2 * cfg.train.batch_size,
                                    cfg.teacher.dtype, dist.device, run_dir / "cache", dhash, dist.rank)
    engine = Engine(student, cfg.train, run_dir=run_dir, metrics=metrics, dist=dist, deepspeed=cfg.deepspeed,
                    name="distill")
    recipe = DistillRecipe(engine, cfg, encoded, tok, vocab=vocab, manifest=manifest, anchor_loss=anchor_loss,
                           dhash=dhash)
    stats = engine.fit(recipe, recipe.total_steps)

    final = engine.final_module(lambda: build_model(model_cfg, seed=cfg.seed)[0])
    if dist.rank != 0:
        return {}
    artifacts = {}
    if cfg.save_model:
        artifacts["model"] = str(save_model(savable(final), tok, run_dir / "model"))  # LoRA: merged
    evaluation = cfg.eval.run(final, tok, run_dir)
    engine.clear_state()
    if manifest is not None:
        artifacts["teacher_manifest"] = str(manifest.root / "manifest.json")
    return rd.finish(train=recipe.train_record(stats, rd.metrics_path), artifacts=artifacts, dependencies=builds,
                     **evaluation)


def _eval_teacher(cfg: DistillConfig, rd: RunDir, manifest, device, rank: int, builds: dict) -> dict:
    """mode eval_teacher: the teacher itself as a baseline row, under the same eval spec."""
    choice = select_checkpoint(cfg.stages.selection, 0, 1, manifest)
    path = manifest.resolve(choice)
    if rank != 0:
        return {}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(cfg.teacher.dtype),
                                                 use_safetensors=True).to(device).eval()
    tok = load_tokenizer(str(path))
    evaluation = cfg.eval.run(model, tok, rd.path)
    return rd.finish(train={"selections": [choice], "selection_steps": [manifest[choice].step]},
                     artifacts={"model": str(path), "teacher_manifest": str(manifest.root / "manifest.json")},
                     dependencies=builds, **evaluation)


register_recipe("distill", DistillConfig, run)
