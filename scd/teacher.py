"""Recipe: teacher SFT that saves N scheduled checkpoints and a manifest (SCD step 1).

    python -m scd run configs/scd/teacher_tiny.yaml --run-dir results/manual/teacher

"Following the Teacher's Footsteps" (Scheduled Checkpoint Distillation, arXiv
2601.10114): the teacher is fine-tuned on the task mixture and its checkpoints along
the way are kept, so the student can later follow the teacher's trajectory.

Reads top to bottom: build model -> training / dev examples -> save steps from the
registered save schedule (``scd.schedule``) -> the SFT loop of ``scd.sft`` with an
``on_save`` hook that, at each scheduled step,

1. saves the weights as safetensors to ``run_dir/checkpoints/ckpt-<step>/``
   (atomically: temp dir + rename; a LoRA teacher is saved merged, so every
   checkpoint is a plain full model the distillation recipe can load in place),
2. evaluates it on the dev split: dev loss always (token-level CE on the dev
   targets), dev score when ``dev.tasks`` (default: ``eval.tasks``) is set (mean of
   the primary metric per task through ``benchmarks.evaluate`` on ``dev.split``),
3. appends it to ``run_dir/checkpoints/manifest.json`` (step, epoch, dev loss, dev
   score, path, sha256 of the weight files; the best checkpoint is marked).

Resume: optimiser state comes from ``run_dir/ckpt`` (``scd.core.engine.Checkpointer``,
every ``train.save_every`` steps).  Scheduled checkpoints already in the manifest are
kept as they are; a step is re-saved only if the kill came before its manifest entry.
Schedules that need a dev-loss history (``dev_loss_milestones``) evaluate the dev
loss every ``schedule.eval_every`` steps; the history is kept in
``checkpoints/dev_history.json`` so a resumed run decides exactly as before.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path

import torch

from benchmarks.evaluate import EvalSpec
from scd.core.config import added_field, register_recipe
from scd.core.engine import Checkpointer, Engine, barrier, init_distributed
from scd.core.faults import fault_point
from scd.core.results import RunDir, atomic_write_json, read_json
from scd.core.train import TrainConfig, collate, seed_everything, tokenize_sft
from scd.data_config import DataConfig, load_training_pairs
from scd.losses import ce_per_token, seq_mean
from scd.models import ModelConfig, build_model, save_model
from scd.schedule import SAVE_SCHEDULES, Manifest, ManifestError, save_steps
from scd.sft import train_sft

CHECKPOINTS = "checkpoints"


@dataclasses.dataclass(frozen=True)
class SaveScheduleConfig:
    """When the teacher saves (a rule of ``registry("save_schedule")`` in scd.schedule)."""

    name: str = "even_steps"  # even_steps | dev_loss_milestones | a registered rule
    n_checkpoints: int = 4
    params: dict = dataclasses.field(default_factory=dict)  # e.g. {fractions: [...], floor: 0.5}
    eval_every: int = 0  # dev-loss evaluations for rules that need a dev history (0: max_steps // 20)

    def __post_init__(self) -> None:
        if self.n_checkpoints < 1:
            raise ValueError(f"schedule.n_checkpoints must be >= 1, got {self.n_checkpoints}")
        if self.eval_every < 0:
            raise ValueError("schedule.eval_every must be >= 0")


@dataclasses.dataclass(frozen=True)
class DevConfig:
    """Dev-set evaluation after every saved checkpoint."""

    split: str = "dev"
    limit_per_task: int | None = 64  # dev examples per task for the dev loss (None: all)
    batch_size: int = 8
    score: bool = True  # also a dev score (mean primary metric); off: dev loss only
    tasks: tuple[str, ...] = ()  # dev-score tasks (empty: eval.tasks; both empty: no dev score)
    score_limit: int | None = 64  # dev examples per task for the dev score


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    recipe: str = "teacher"
    method: str = "teacher-sft"
    grid: str | None = None
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalSpec = EvalSpec()  # test-split evaluation of the final teacher (also sets the dev-score tasks)
    schedule: SaveScheduleConfig = SaveScheduleConfig()
    dev: DevConfig = DevConfig()
    deepspeed: str | None = added_field(default=None)  # a DeepSpeed JSON (ZeRO-2; configs/deepspeed/zero2.json)


# ------------------------------------------------------------------ dev-set losses
def per_sample_ce(model, encoded: list[dict], pad_id: int, batch_size: int = 8, device=None):
    """Per-example mean CE over the target tokens, plus the token-level totals.

    encoded: [{input_ids, labels}] (``tokenize_sft``).  Returns
    (per_sample [N] float32 on CPU, total CE summed over all target tokens, n_tokens).
    The model runs in eval mode under ``torch.no_grad`` (its mode is restored).
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out, total, n_tok = [], 0.0, 0
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            b = collate(encoded[start:start + batch_size], pad_id)
            logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
            labels = b["labels"][:, 1:].to(device)  # [B, T-1] next-token targets
            ce = ce_per_token(logits[:, :-1], labels)  # [B, T-1]
            mask = labels != -100
            out.append(seq_mean(ce, mask).float().cpu())
            total += float(ce[mask].sum())
            n_tok += int(mask.sum())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0), total, n_tok


def dev_loss(model, encoded: list[dict], pad_id: int, batch_size: int = 8) -> float:
    """Token-level mean CE on the dev targets (the quantity the training loss estimates)."""
    _, total, n = per_sample_ce(model, encoded, pad_id, batch_size)
    return total / max(n, 1)


def primary_score(evaluation: dict) -> tuple[float | None, str | None, bool]:
    """(mean of each task's primary metric, its name, higher_is_better) from an EvalSpec result."""
    meta = evaluation.get("metric_meta", {})
    values, names, hib = [], [], True
    for task, metrics in evaluation.get("eval", {}).items():
        prim = [m for m in metrics if meta.get(f"{task}/{m}", {}).get("primary")] or list(metrics)[:1]
        for m in prim[:1]:
            v = metrics[m].get("value")
            if v is not None and math.isfinite(float(v)):
                values.append(float(v))
                names.append(f"{task}/{m}")
                hib = bool(meta.get(f"{task}/{m}", {}).get("higher_is_better", True))
    if not values:
        return None, None, True
    return sum(values) / len(values), "mean(" + ", ".join(names) + ")", hib


def savable(model):
    """A plain (non-peft) model to save: LoRA adapters merged into a copy of the weights."""
    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    return model


# ------------------------------------------------------------------------ the recipe
class CheckpointWriter:
    """The teacher's scheduled checkpoints: called by the SFT recipe after each hook step.

    Saves the weights (LoRA merged), scores the dev split, appends to the manifest.
    Under DeepSpeed, rank 0 writes (ZeRO-2 keeps full weights on every rank); the
    others wait at a barrier.
    """

    def __init__(self, cfg: TeacherConfig, run_dir: Path, model, tok, dev_encoded, metrics, manifest, *,
                 dynamic: bool, history: list, hist_path: Path, steps_per_epoch: float, rank: int = 0):
        self.cfg, self.model, self.tok, self.dev_encoded, self.metrics = cfg, model, tok, dev_encoded, metrics
        self.manifest, self.dynamic, self.history, self.hist_path = manifest, dynamic, history, hist_path
        self.ck_dir, self.steps_per_epoch, self.rank = run_dir / CHECKPOINTS, steps_per_epoch, rank

    def __call__(self, step: int) -> None:
        if self.rank == 0:
            self.write(step)
        barrier()

    def _dev_loss(self) -> float:
        return dev_loss(self.model, self.dev_encoded, self.tok.pad_token_id, self.cfg.dev.batch_size)

    def write(self, step: int) -> None:
        cfg, manifest = self.cfg, self.manifest
        dl = None
        if self.dynamic:
            dl = self._dev_loss()
            self.history[:] = [h for h in self.history if h[0] < step] + [(step, dl)]
            atomic_write_json(self.hist_path, self.history)
            wanted = save_steps(cfg.schedule.name, cfg.train.max_steps, dev_history=self.history,
                                **cfg.schedule.params)
            if step not in wanted:
                self.metrics.log({"step": step, "event": "dev", "dev_loss": dl})
                return
        if manifest.checkpoints and step <= manifest.checkpoints[-1].step:
            # saved before an interruption: kept as it is; its metrics row is logged again
            # (rows after the resume step were dropped), so metrics equal an uninterrupted run's
            entry = next((c for c in manifest.checkpoints if c.step == step), None)
            if entry is not None:
                self.metrics.log(_checkpoint_row(entry))
            return
        t0 = time.time()
        path = save_model(savable(self.model), self.tok, self.ck_dir / f"ckpt-{step}")
        save_s = time.time() - t0
        fault_point("teacher_ckpt")  # reliability tests: killed between the save and the manifest
        if dl is None:
            dl = self._dev_loss()
        score, score_name, hib = None, None, True
        if cfg.dev.score and (cfg.dev.tasks or cfg.eval.tasks or cfg.eval.lm_eval_tasks):
            spec = cfg.eval.with_tasks(cfg.dev.tasks or cfg.eval.tasks, split=cfg.dev.split,
                                       limit=cfg.dev.score_limit)
            score, score_name, hib = primary_score(spec.run(self.model, self.tok,
                                                            self.ck_dir / "dev_eval" / f"ckpt-{step}"))
            self.model.train()
        if score_name is not None:
            manifest.score_name, manifest.higher_is_better = score_name, hib
        entry = manifest.add(step=step, epoch=round(step / self.steps_per_epoch, 4), path=Path(path).resolve(),
                             dev_loss=dl, dev_score=score, save_s=round(save_s, 3))
        manifest.write(self.ck_dir / "manifest.json")
        self.metrics.log(_checkpoint_row(entry))
        print(f"[teacher] checkpoint {entry.index} at step {step}: dev_loss={dl:.4f}"
              + (f" dev_score={score:.4f}" if score is not None else ""), flush=True)


def save_hooks(cfg: TeacherConfig, run_dir: Path, model, tok, dev_encoded, device) -> tuple[set, bool, list]:
    """(hook steps, dynamic?, dev history) of the save schedule: fixed steps, or decided online
    from the dev-loss history (kept in checkpoints/dev_history.json across resumes)."""
    total = cfg.train.max_steps
    rule = SAVE_SCHEDULES.get(cfg.schedule.name)
    if not getattr(rule, "needs_dev_history", False):
        try:
            return set(save_steps(cfg.schedule.name, total, n_checkpoints=cfg.schedule.n_checkpoints,
                                  **cfg.schedule.params)), False, []
        except (TypeError, ValueError) as e:
            raise ValueError(f"schedule: {e}") from None
    hist_path = run_dir / CHECKPOINTS / "dev_history.json"
    resume_step = _resume_step(run_dir)
    history = []
    if hist_path.exists():
        history = [(int(s), float(v)) for s, v in read_json(hist_path) if int(s) <= resume_step]
    eval_every = cfg.schedule.eval_every or max(1, total // 20)
    if not history:  # the initial dev loss L0 (before any update)
        model.to(device)
        history = [(0, dev_loss(model, dev_encoded, tok.pad_token_id, cfg.dev.batch_size))]
        atomic_write_json(hist_path, history)
    return set(range(eval_every, total + 1, eval_every)) | {total}, True, history


def open_manifest(cfg: TeacherConfig, run_dir: Path, n_train: int) -> Manifest:
    path = run_dir / CHECKPOINTS / "manifest.json"
    try:
        manifest = Manifest.read(path) if path.exists() else None
    except ManifestError:
        manifest = None  # unreadable (should not happen: writes are atomic): rebuild it
    if manifest is None:
        manifest = Manifest(meta={"teacher_run": str(run_dir), "total_steps": cfg.train.max_steps,
                                  "schedule": cfg.schedule.name, "n_train": n_train, "dev_split": cfg.dev.split})
        manifest.root = run_dir / CHECKPOINTS
    return manifest


def run(cfg: TeacherConfig, run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    dist = init_distributed(cfg.train, cfg.deepspeed)
    rd = RunDir(run_dir)
    if dist.rank == 0:
        rd.start(cfg, recipe="teacher",
                 hparams={"lr": cfg.train.lr, "max_steps": cfg.train.max_steps,
                          "schedule": cfg.schedule.name, "n_checkpoints": cfg.schedule.n_checkpoints})
    seed_everything(cfg.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    model, tok = build_model(cfg.model, seed=cfg.seed)
    pairs = load_training_pairs(cfg.data, tok)
    dev_data = dataclasses.replace(cfg.data, split=cfg.dev.split, limit_per_task=cfg.dev.limit_per_task)
    dev_encoded = [tokenize_sft(tok, p, t, cfg.train.max_len) for p, t in load_training_pairs(dev_data, tok)]
    hooks, dynamic, history = save_hooks(cfg, run_dir, model, tok, dev_encoded, dist.device)
    manifest = open_manifest(cfg, run_dir, len(pairs))
    metrics = rd.metrics(enabled=dist.rank == 0)
    engine = Engine(model, cfg.train, run_dir=run_dir, metrics=metrics, dist=dist, deepspeed=cfg.deepspeed,
                    name="teacher")
    if getattr(engine.backend, "stage", 0) >= 3:
        raise ValueError("teacher: scheduled checkpoints need full weights on rank 0; use ZeRO-2 "
                         "(configs/deepspeed/zero2.json), not ZeRO-3")
    writer = CheckpointWriter(cfg, run_dir, engine.module, tok, dev_encoded, metrics, manifest, dynamic=dynamic,
                              history=history, hist_path=run_dir / CHECKPOINTS / "dev_history.json",
                              steps_per_epoch=len(pairs) / (cfg.train.batch_size * cfg.train.grad_accum),
                              rank=dist.rank)
    stats = train_sft(engine, tok, pairs, seed=cfg.seed, on_save=writer, save_steps=hooks)
    if dist.rank != 0:
        return {}
    if not manifest.checkpoints:
        raise RuntimeError("the teacher saved no checkpoint; check schedule.* settings")
    manifest.write(manifest.root / "manifest.json")  # final write (best_index with every checkpoint in)
    evaluation = cfg.eval.run(engine.module, tok, run_dir)
    engine.clear_state()
    best = manifest.best_index
    return rd.finish(train={**stats, "n_checkpoints": len(manifest), "best_index": best,
                            "checkpoint_steps": [c.step for c in manifest.checkpoints]},
                     artifacts={"manifest": str(manifest.root / "manifest.json"),
                                "model": str(manifest.resolve(manifest.final_index)),
                                "best_model": str(manifest.resolve(best)) if best is not None else None},
                     **evaluation)


def _checkpoint_row(entry) -> dict:
    return {"step": entry.step, "event": "checkpoint", "index": entry.index, "dev_loss": entry.dev_loss,
            "dev_score": entry.dev_score, "sha256": entry.sha256}


def _resume_step(run_dir: Path) -> int:
    """Optimiser step of the resumable checkpoint (0 when starting fresh)."""
    meta = Path(run_dir) / "ckpt" / "last" / "meta.json"
    if Checkpointer(run_dir).exists() and meta.exists():
        return int(read_json(meta).get("step", 0))
    return 0


register_recipe("teacher", TeacherConfig, run)
