"""Healing a cut student: KD from the full base model at every position of general text.

    loss = sum over positions t of the accumulated batch of  KL(p_base || p_student)_t
           / (positions in the whole accumulated batch)

(``forward_kl`` at temperature 1; every attended position with a next token, prompt included),
driven by the :class:`~scd.core.engine.Engine`.  Every ``heal.eval_every`` steps (and at step 0
and the last step) the dev KL(base || student) is measured; training stops once ``heal.patience``
measurements in a row bring no new best (``should_stop``).  The curve, the best measurement and
the patience count are the recipe's resumable state; the best weights are kept in
``run_dir/heal_best.safetensors`` (atomic) so a resumed run ends on the same weights.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from scd.completion_loss import completion_terms, head_dtype
from scd.core.engine import Engine, Terms
from scd.core.train import rank_batches
from scd.heads import num_targets, teacher_targets
from scd.student.config import HealConfig
from scd.student.cut import DevKL, text_batch

BEST_FILE = "heal_best.safetensors"


def position_kd(student, base, batch: dict, *, head_dtype=None, share_prefix: bool = False) -> torch.Tensor:
    """KL(p_base || p_student) [N] at the N target positions of ``batch`` (all positions for a
    :func:`~scd.student.cut.text_batch`), the heads applied only there and fused with the loss."""
    return completion_terms(student, batch, head_dtype=head_dtype, ce=False, share_prefix=share_prefix,
                            **teacher_targets(base, batch, share_prefix))[0]


def save_weights(module, path: Path) -> None:
    """All of ``module``'s tensors (tied ones as separate copies) to ``path``, atomically."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


class HealRecipe:
    """KD at every position from the frozen base; dev-KL curve with early stopping (see module doc)."""

    def __init__(self, engine: Engine, base, encoded: list[dict], dev: DevKL, pad_id: int, seed: int,
                 heal: HealConfig, total_steps: int):
        self.engine, self.base, self.encoded, self.dev = engine, base, encoded, dev
        self.pad_id, self.seed, self.heal, self.total_steps = pad_id, seed, heal, total_steps
        self.best_path = Path(engine.run_dir) / BEST_FILE if engine.run_dir is not None else None
        self.curve: list[dict] = []  # [{"step", "dev_kl"}] of every measurement
        self.best_kl, self.best_step, self.bad = math.inf, 0, 0

    # -- the engine's protocol
    def micro_batches(self, step: int, world: int, rank: int) -> list[dict]:
        return [text_batch([self.encoded[i] for i in idx], self.pad_id)
                for idx in rank_batches(len(self.encoded), self.engine.train_cfg, step, self.seed, world, rank)]

    def count(self, batch: dict) -> int:
        return num_targets(batch["labels"])

    def loss_terms(self, batch: dict, denom: float) -> Terms:
        batch = {k: v.to(self.engine.device) for k, v in batch.items()}
        tc = self.engine.train_cfg
        kd = position_kd(self.engine.model, self.base, batch, head_dtype=head_dtype(tc),
                         share_prefix=tc.share_prefix)  # [N]
        return Terms({"kd": kd.sum() / denom})

    def on_step_start(self, engine: Engine, step: int) -> None:
        if not self.curve:  # step 0 (also after a kill before the first checkpoint)
            self.measure(engine, 0)

    def on_step_end(self, engine: Engine, step: int) -> None:
        if step % self.heal.eval_every == 0 or step == self.total_steps:
            self.measure(engine, step)

    def should_stop(self, step: int) -> bool:
        return self.bad >= self.heal.patience

    def state(self) -> dict:
        return {"curve": self.curve, "best_kl": self.best_kl, "best_step": self.best_step, "bad": self.bad}

    def load_state(self, state: dict) -> None:
        self.curve = [dict(c) for c in state.get("curve", [])]
        self.best_kl = float(state.get("best_kl", math.inf))
        self.best_step, self.bad = int(state.get("best_step", 0)), int(state.get("bad", 0))

    # -- measurements
    def measure(self, engine: Engine, step: int) -> float:
        """Dev KL of the student now; updates the best (its weights saved) and the patience count."""
        module = engine.module
        module.eval()
        kl = self.dev(module)
        module.train()
        self.curve.append({"step": step, "dev_kl": kl})
        if kl < self.best_kl - self.heal.min_delta:
            self.best_kl, self.best_step, self.bad = kl, step, 0
            if self.heal.restore_best and self.best_path is not None:
                save_weights(module, self.best_path)
        else:
            self.bad += 1
        if engine.metrics is not None:
            engine.metrics.log({"step": step, "dev_kl": kl, "best_dev_kl": self.best_kl})
        return kl

    def finish(self, module) -> float:
        """Load the best weights when ``heal.restore_best`` and the last measurement was not the best;
        returns the dev KL of the weights the student ends with."""
        last = self.curve[-1]
        if self.heal.restore_best and self.best_path is not None and last["step"] != self.best_step:
            module.load_state_dict(load_file(str(self.best_path), device=str(next(module.parameters()).device)))
            return self.best_kl
        return last["dev_kl"]

    def clear(self) -> None:
        if self.best_path is not None and self.best_path.exists():
            self.best_path.unlink()
