"""Recipe: supervised fine-tuning on the task mixture (students, baselines, demo).

    python -m scd run configs/scd/sft_student.yaml --run-dir results/manual/sft

Reads top to bottom: build model -> training examples -> the engine trains (gradient
accumulation, loss normalised by the target tokens of the whole accumulated batch,
resume, DeepSpeed when ``deepspeed:`` names a JSON) -> save model -> evaluate -> run.json.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.evaluate import EvalSpec
from scd.completion_loss import completion_terms, head_dtype
from scd.core.config import added_field, register_recipe
from scd.core.dependencies import build_record
from scd.core.engine import Engine, Terms, init_distributed
from scd.core.results import RunDir
from scd.core.train import TrainConfig, collate, rank_batches, seed_everything, tokenize_sft
from scd.data_config import DataConfig, load_training_pairs
from scd.heads import num_targets
from scd.models import ModelConfig, build_model, save_model
from scd.schedule import hash_checkpoint
from scd.student import resolve_model


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    recipe: str = "sft"
    method: str = "sft"
    grid: str | None = None
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalSpec = EvalSpec()
    save_model: bool = True
    deepspeed: str | None = added_field(default=None)  # a DeepSpeed JSON (configs/deepspeed/zero2.json)


def sft_loss_sum(model, batch, *, completion_only: bool = True, head_dtype=None, share_prefix: bool = False):
    """Sum over target tokens of the next-token cross-entropy, and the token count.

    batch: input_ids/attention_mask/labels [B, T]; returns (scalar sum, int count).
    ``completion_only`` (``train.completion_only``): the head only at the target positions
    (:func:`completion_terms`); False: full logits at every position (the reference path).
    """
    if completion_only:
        _, ce = completion_terms(model, batch, head_dtype=head_dtype, share_prefix=share_prefix)
        return ce.sum(), int(ce.shape[0])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1].float()  # [B, T-1, V]
    labels = batch["labels"][:, 1:]  # [B, T-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


def target_count(batch: dict) -> int:
    """Next-token targets of a collated batch (labels [B, T]; position t predicts t+1)."""
    return num_targets(batch["labels"])


class SFTRecipe:
    """Next-token cross-entropy on the target tokens (prompt masked), driven by an :class:`Engine`.

    ``on_save(step)`` is called after each optimiser step in ``save_steps`` (the teacher's
    checkpoint schedule).
    """

    def __init__(self, engine: Engine, encoded: list[dict], pad_id: int, seed: int, *, on_save=None,
                 save_steps=()):
        self.engine, self.encoded, self.pad_id, self.seed = engine, encoded, pad_id, seed
        self.on_save, self.save_steps = on_save, set(save_steps or ())

    def micro_batches(self, step: int, world: int, rank: int) -> list[dict]:
        return [collate([self.encoded[i] for i in idx], self.pad_id)
                for idx in rank_batches(len(self.encoded), self.engine.train_cfg, step, self.seed, world, rank)]

    def count(self, batch: dict) -> int:
        return target_count(batch)

    def loss_terms(self, batch: dict, denom: float) -> Terms:
        batch = {k: v.to(self.engine.device) for k, v in batch.items()}
        tc = self.engine.train_cfg
        loss_sum, _ = sft_loss_sum(self.engine.model, batch, completion_only=tc.completion_only,
                                   head_dtype=head_dtype(tc), share_prefix=tc.share_prefix)
        return Terms({"ce": loss_sum / denom})

    def on_step_end(self, engine: Engine, step: int) -> None:
        if step in self.save_steps and self.on_save is not None:
            self.on_save(step)


def train_sft(engine: Engine, tokenizer, pairs, *, seed: int, on_save=None, save_steps=None) -> dict:
    """SFT of ``engine``'s module on (prompt, target) pairs (shared by the teacher and baselines)."""
    encoded = [tokenize_sft(tokenizer, p, t, engine.train_cfg.max_len) for p, t in pairs]
    recipe = SFTRecipe(engine, encoded, tokenizer.pad_token_id, seed, on_save=on_save, save_steps=save_steps)
    return engine.fit(recipe, engine.train_cfg.max_steps)


def model_build(model_dir: str | Path) -> dict:
    """run.json ``dependencies`` entry of a dependency run's model folder (the healed student, the AW anchor):
    :func:`scd.core.dependencies.build_record` + ``weights_sha256``, the digest the teacher manifest and the AW
    loss cache use (:func:`scd.schedule.hash_checkpoint`: one weight file -> its ``sha256sum``)."""
    return build_record(model_dir, weights_sha256=hash_checkpoint(model_dir)[0])


def run(cfg: SFTConfig, run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    dist = init_distributed(cfg.train, cfg.deepspeed)
    rd = RunDir(run_dir)
    if dist.rank == 0:
        rd.start(cfg, recipe="sft", hparams={"lr": cfg.train.lr, "max_steps": cfg.train.max_steps})
    model_cfg = resolve_model(cfg.model, cfg.seed, dist.rank)  # model.student: the healed student run
    seed_everything(cfg.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    model, tok = build_model(model_cfg, seed=cfg.seed)
    pairs = load_training_pairs(cfg.data, tok)
    engine = Engine(model, cfg.train, run_dir=run_dir, metrics=rd.metrics(enabled=dist.rank == 0), dist=dist,
                    deepspeed=cfg.deepspeed, name="sft")
    stats = train_sft(engine, tok, pairs, seed=cfg.seed)
    model = engine.final_module(lambda: build_model(model_cfg, seed=cfg.seed)[0])
    if dist.rank != 0:
        return {}
    artifacts = {}
    if cfg.save_model:
        artifacts["model"] = str(save_model(model, tok, run_dir / "model"))
    evaluation = cfg.eval.run(model, tok, run_dir)
    engine.clear_state()
    builds = {"student": model_build(model_cfg.name)} if cfg.model.student is not None else {}
    return rd.finish(train={**stats, "world_size": dist.world}, artifacts=artifacts, dependencies=builds,
                     **evaluation)


register_recipe("sft", SFTConfig, run)
