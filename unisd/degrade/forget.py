"""Registry entry ``forget`` (strength: SFT steps): catastrophic forgetting by fine-tuning on one task family."""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from scd.core.engine import Engine, Placement
from scd.core.results import MetricsWriter
from scd.core.train import TrainConfig, resolve_device
from scd.sft import train_sft
from unisd.degrade.constraints import Constraint, NoConstraint
from unisd.degrade.registry import DegradationSpec, DegradeContext, register_degradation


@dataclasses.dataclass(frozen=True)
class ForgetOptions:
    tasks: tuple[str, ...] = ("wnut16",)  # the task family fine-tuned on (e.g. the NER tasks)
    limit_per_task: int | None = 2000
    lr: float = 1e-4
    batch_size: int = 8
    max_len: int = 256
    schedule: str = "constant"
    warmup_ratio: float = 0.0
    save_every: int = 50


def _apply_forget(model, strength: float, opts: ForgetOptions, ctx: DegradeContext) -> Constraint:
    """SFT for ``strength`` steps on ``opts.tasks`` (scd.sft.train_sft); no constraint.

    Resumable: train_sft checkpoints under ``ctx.run_dir/degrade``.
    """
    steps = int(strength)
    if steps != strength or steps < 0:
        raise ValueError(f"forget strength is a number of SFT steps (integer >= 0), got {strength}")
    if steps == 0:
        return NoConstraint()
    if ctx.load_pairs is None or ctx.tokenizer is None:
        raise ValueError("forget needs training pairs and a tokenizer (ctx.load_pairs, ctx.tokenizer)")
    pairs = ctx.load_pairs(tuple(opts.tasks), opts.limit_per_task)
    tcfg = TrainConfig(lr=opts.lr, max_steps=steps, batch_size=opts.batch_size, max_len=opts.max_len,
                       schedule=opts.schedule, warmup_ratio=opts.warmup_ratio, save_every=opts.save_every,
                       log_every=max(1, min(10, steps)))
    run_dir = Path(ctx.run_dir) / "degrade" if ctx.run_dir is not None else None
    if run_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix="forget-"))
    device = ctx.device if ctx.device is not None else resolve_device("auto")
    if not (run_dir / "ckpt" / "last" / "state.pt").exists():  # fresh start: drop rows of a killed attempt
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    engine = Engine(model, tcfg, run_dir=run_dir, metrics=MetricsWriter(run_dir / "metrics.jsonl"),
                    dist=Placement(0, 1, 0, device), name="forget")
    train_sft(engine, ctx.tokenizer, pairs, seed=ctx.seed)
    model.eval()
    return NoConstraint()


register_degradation(DegradationSpec(
    "forget", ForgetOptions, _apply_forget, "sft_steps",
    "SFT on one task family for k steps (catastrophic forgetting of the others)"))
