"""Recipe: staged student distillation.  KD, CD, SCD and SCD+AW are configs of it.

    python -m scd run configs/scd/scd_aw_tiny.yaml --run-dir results/manual/scd_aw
    torchrun --nproc_per_node 2 -m scd run configs/scd/scd_smollm2.yaml deepspeed=configs/deepspeed/zero2.json

Scheduled Checkpoint Distillation ("Following the Teacher's Footsteps", arXiv
2601.10114; formulas in docs/scd.md).  The student trains in ``stages.n_stages``
stages; before each stage a selection rule (``scd.schedule``) picks one of the
teacher's saved checkpoints, and the student is distilled from it:

    loss = sum over target tokens t of  w(x_t) * D(p_T || p_S)_t + (1 - w(x_t)) * CE_t
           / (target tokens in the whole accumulated batch)

with D a divergence of ``scd.losses`` (forward KL, reverse KL, JSD, skew KL, with
temperature) and w per sample from ``scd.weighting``: a constant ``alpha`` (``none``)
or Adaptive Weighting ``w = L_S / (L_S + L_Tc)`` (``aw``; L_S the per-sample loss of a
separately SFT-trained student anchor, L_Tc that of the selected checkpoint; both
computed once per checkpoint and cached under ``run_dir/cache``).

    method   stages.selection   weighting
    kd       final (or best)    none         1 stage
    cd       fixed_order        none         N stages, checkpoints in save order
    scd      scd_select         none         argmin_c KL(best || c) + KL(student || c) on a probe set
    scd_aw   scd_select         aw
    sft      (any)              none, alpha 0   gold labels only; the teacher is never run

Reads top to bottom in :func:`run`: dependencies (teacher / anchor runs) -> manifest
+ sha256 check -> student, tokenizer check -> data -> AW anchor losses -> backend
(plain PyTorch or DeepSpeed) -> resume -> for each stage: select, switch the teacher
in place, reset the optimiser, train -> save, evaluate, run.json.

Only one teacher checkpoint is resident at a time: the teacher module is built once
and later checkpoints are copied into its existing tensors (``load_weights_in_place``);
every switch is timed and logged to metrics.jsonl.  The teacher runs in eval mode
under ``torch.no_grad``.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

from benchmarks.evaluate import EvalSpec
from scd.core.config import register_recipe
from scd.core.faults import fault_point
from scd.core.registry import RegistryError
from scd.core.results import RunDir, atomic_write_text, read_json, read_metrics
from scd.core.train import (Checkpointer, TrainConfig, autocast, batch_indices, check_finite, collate,
                            finish_run, peak_memory, resolve_device, seed_everything, start_run, tokenize_sft)
from scd.data_config import DataConfig, load_training_pairs
from scd.models import ModelConfig, build_model, check_same_tokenizer, load_tokenizer, save_model, torch_dtype


# ===================================================================== config
def _check_registered(kind: str, name: str, key: str) -> None:
    import scd.schedule  # noqa: F401  (registers selection rules)
    import scd.weighting  # noqa: F401  (registers weighting rules)
    from scd.core.registry import registry

    try:
        registry(kind).get(name)
    except RegistryError as e:
        raise ValueError(f"{key}: {e}") from None


@dataclasses.dataclass(frozen=True)
class TeacherSource:
    """Where the teacher's checkpoints come from: an existing run, or a config to run first."""

    run_dir: str | None = None  # a teacher run (checkpoints/manifest.json) or a manifest directory
    config: str | None = None  # a teacher config: trained once at <results_dir>/runs/<method>-<run_id>, then reused
    seed: int | None = None  # seed of the `config` teacher (None: this run's seed)
    results_dir: str = "results"  # root for `config` teachers (same path `python -m scd run` would use)
    allow_vocab_prefix: bool = False  # accept a teacher vocab that extends the student's (logits sliced)
    dtype: str = "float32"  # teacher weights on the device (bfloat16 on GPUs)

    def __post_init__(self) -> None:
        if self.run_dir and self.config:
            raise ValueError("teacher: give either run_dir or config, not both")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"teacher.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    @property
    def given(self) -> bool:
        return bool(self.run_dir or self.config)


@dataclasses.dataclass(frozen=True)
class StagesConfig:
    n_stages: int = 1  # 0: one stage per teacher checkpoint (SCD's setting)
    steps_per_stage: int = 0  # optimiser steps per stage (0: epochs_per_stage, else train.max_steps // n_stages)
    epochs_per_stage: float = 0.0  # passes over the training set per stage (paper: 2)
    selection: str = "final"  # final | best | fixed_order | scd_select (registry "selection")
    reset_optimizer: bool = True  # fresh AdamW state + LR schedule per stage (paper); else one schedule overall

    def __post_init__(self) -> None:
        if self.n_stages < 0:
            raise ValueError(f"stages.n_stages must be >= 0 (0: one per teacher checkpoint), got {self.n_stages}")
        if self.steps_per_stage < 0 or self.epochs_per_stage < 0:
            raise ValueError("stages.steps_per_stage and stages.epochs_per_stage must be >= 0")
        _check_registered("selection", self.selection, "stages.selection")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    divergence: str = "forward_kl"  # registry "loss": forward_kl | reverse_kl | jsd | skew_kl | skew_rkl
    temperature: float = 1.0  # logits / tau, loss * tau^2
    params: dict = dataclasses.field(default_factory=dict)  # e.g. {beta: 0.5} for jsd, {lam: 0.1} for skew_kl

    def __post_init__(self) -> None:
        from scd.losses import resolve_divergence

        try:
            resolve_divergence(self.divergence, self.params)
        except RegistryError as e:
            raise ValueError(f"loss.divergence: {e}") from None
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"loss.temperature must be > 0, got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class WeightingConfig:
    name: str = "none"  # none (constant alpha) | aw (Adaptive Weighting)
    alpha: float = 1.0  # `none`: weight of the KD term (1: pure KD, 0: gold labels only = SFT)
    anchor_run_dir: str | None = None  # `aw`: an SFT student run (its model/) or an HF model folder
    anchor_config: str | None = None  # `aw`: or an SFT config, trained once at <teacher.results_dir>/runs/...
    anchor_seed: int | None = None  # seed of the `anchor_config` run (None: this run's seed)

    def __post_init__(self) -> None:
        _check_registered("weighting", self.name, "weighting.name")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"weighting.alpha must be in [0, 1], got {self.alpha}")
        if self.anchor_run_dir and self.anchor_config:
            raise ValueError("weighting: give either anchor_run_dir or anchor_config, not both")
        if self.needs_losses and not (self.anchor_run_dir or self.anchor_config):
            raise ValueError(f"weighting '{self.name}' needs a student anchor: set weighting.anchor_run_dir (an SFT "
                             "student run) or weighting.anchor_config (e.g. configs/scd/sft_anchor_tiny.yaml)")

    @property
    def gold_only(self) -> bool:
        return self.name == "none" and self.alpha == 0.0

    @property
    def needs_losses(self) -> bool:
        """The rule takes per-sample anchor / checkpoint losses (``aw``, or a registered rule flagged so)."""
        from scd.core.registry import registry

        return bool(getattr(registry("weighting").get(self.name), "needs_losses", False))


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """Held-out probe set for scd_select's KLs."""

    split: str = "dev"
    n: int = 64  # probe examples (a fixed seeded subset of the split over all data.tasks)
    batch_size: int = 8


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    recipe: str = "distill"
    method: str = "kd"
    grid: str | None = None
    seed: int = 0
    mode: Literal["distill", "eval_teacher"] = "distill"  # eval_teacher: score the selected teacher checkpoint
    model: ModelConfig = ModelConfig()  # the student
    teacher: TeacherSource = TeacherSource()
    stages: StagesConfig = StagesConfig()
    loss: LossConfig = LossConfig()
    weighting: WeightingConfig = WeightingConfig()
    probe: ProbeConfig = ProbeConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalSpec = EvalSpec()
    deepspeed: str | None = None  # DeepSpeed JSON (configs/deepspeed/zero2.json | zero3.json); None: plain PyTorch
    save_model: bool = True

    def __post_init__(self) -> None:
        if not self.teacher.given and not (self.mode == "distill" and self.weighting.gold_only):
            raise ValueError("teacher: set teacher.run_dir (a teacher run) or teacher.config (a teacher config)")
        if self.mode == "eval_teacher" and self.stages.selection not in ("final", "best"):
            raise ValueError("mode eval_teacher scores one checkpoint: stages.selection must be final or best")
        if self.deepspeed is not None and not self.deepspeed.endswith(".json"):
            raise ValueError(f"deepspeed: expected a DeepSpeed JSON file, got {self.deepspeed!r}")


# ===================================================================== loss math
def token_terms(student_logits, teacher_logits, labels, loss: LossConfig, vocab: int | None = None):
    """Per-target-token KD and CE terms of one micro-batch.

    student_logits [B, T, Vs], teacher_logits [B, T, Vt] or None, labels [B, T] (-100 =
    not a target).  Position t predicts labels[:, t+1].  Returns kd [N], ce [N], rows [N]
    (the batch row of each of the N target tokens).  KD compares the first ``vocab``
    logits of both (shared tokenizer ids); CE uses the student's full head.
    """
    import torch

    from scd.losses import ce_per_token, per_token_divergence

    lab = labels[:, 1:]  # [B, T-1]
    mask = lab != -100
    rows = mask.nonzero()[:, 0]  # [N]
    s = student_logits[:, :-1][mask]  # [N, Vs]
    ce = ce_per_token(s, lab[mask])  # [N]
    if teacher_logits is None:
        return torch.zeros_like(ce), ce, rows
    v = vocab or min(s.shape[-1], teacher_logits.shape[-1])
    t = teacher_logits[:, :-1][mask]  # [N, Vt]
    kd = per_token_divergence(loss.divergence, s[..., :v], t[..., :v].detach(), loss.temperature, **loss.params)
    return kd, ce, rows


def sample_weights(weighting: WeightingConfig, batch_size: int, *, anchor_loss=None, teacher_loss=None,
                   device=None):
    """Per-sample weight w of the KD term [B] (see scd.weighting)."""
    import torch

    from scd.weighting import sample_weights as rule

    dummy = torch.zeros(batch_size, device=device)
    if not weighting.needs_losses:
        return rule(weighting.name, dummy, alpha=weighting.alpha)
    return rule(weighting.name, dummy, student_anchor_loss=anchor_loss, teacher_ckpt_loss=teacher_loss)


def micro_batch_loss(kd, ce, rows, w, n_tokens_total):
    """sum_t [w kd_t + (1 - w) ce_t] / n_tokens_total.  kd, ce, rows [N]; w [B] -> scalar."""
    from scd.losses import reduce_tokens
    from scd.weighting import combine

    return reduce_tokens(combine(kd, ce, w[rows]), None, n_tokens_total)


# ===================================================================== teacher checkpoints
def load_weights_in_place(model, ckpt_dir: str | os.PathLike) -> None:
    """Copy a checkpoint's safetensors into ``model``'s existing tensors (no new module).

    One tensor at a time, so peak extra memory is one tensor; dtype is converted to
    the model's.  Every parameter must be covered, except tied weights (shared storage).
    """
    import torch
    from safetensors import safe_open

    state = model.state_dict()  # detached views sharing storage with the parameters
    device = next(model.parameters()).device
    files = sorted(Path(ckpt_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{ckpt_dir}: no *.safetensors weight files")
    loaded = set()
    with torch.no_grad():
        for f in files:
            with safe_open(str(f), framework="pt", device=str(device)) as fh:
                for k in fh.keys():
                    if k not in state:
                        raise ValueError(f"{f}: tensor '{k}' is not in the teacher model (different architecture?)")
                    src = fh.get_tensor(k)
                    if tuple(src.shape) != tuple(state[k].shape):
                        raise ValueError(f"{f}: tensor '{k}' has shape {tuple(src.shape)}, the teacher model "
                                         f"{tuple(state[k].shape)}")
                    state[k].copy_(src)
                    loaded.add(k)
    ptrs = {state[k].data_ptr() for k in loaded}
    missing = [k for k in state if k not in loaded and state[k].data_ptr() not in ptrs]
    if missing:
        raise ValueError(f"{ckpt_dir}: checkpoint lacks {len(missing)} teacher tensors (e.g. {missing[:3]})")


class TeacherSlot:
    """The single resident teacher.  Built from the first checkpoint it is asked for;
    later checkpoints are loaded into the same tensors in place.  Eval mode, no grads."""

    def __init__(self, manifest, dtype: str, device):
        self.manifest, self.dtype, self.device = manifest, dtype, device
        self.model = None
        self.index: int | None = None
        self.loads: list[tuple[int, float, bool]] = []  # (checkpoint, seconds, in place) of every load

    def ensure(self, index: int) -> tuple[float, bool]:
        """Make checkpoint ``index`` resident.  Returns (seconds, switched in place); (0, False)
        when it already is."""
        if self.index == index:
            return 0.0, False
        import torch

        t0 = time.perf_counter()
        path = self.manifest.resolve(index)
        in_place = self.model is not None
        if in_place:
            load_weights_in_place(self.model, path)
        else:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(self.dtype),
                                                              use_safetensors=True).to(self.device)
            self.model.eval().requires_grad_(False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.index = index
        secs = time.perf_counter() - t0
        self.loads.append((index, secs, in_place))
        return secs, in_place

    def logits(self, batch):
        import torch

        with torch.no_grad():
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def find_manifest(path: str | os.PathLike) -> Path:
    """A teacher run dir (checkpoints/manifest.json), a manifest dir or the manifest file."""
    p = Path(path)
    for cand in (p / "checkpoints" / "manifest.json", p / "manifest.json", p):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"teacher.run_dir {path}: no checkpoints/manifest.json (run the teacher recipe first, "
                            "e.g. python -m scd run configs/scd/teacher_tiny.yaml)")


def anchor_model_dir(path: str | os.PathLike) -> Path:
    """An SFT run dir (run.json artifacts.model or model/) or an HF model folder."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    if (p / "run.json").is_file():
        m = (read_json(p / "run.json").get("artifacts") or {}).get("model")
        if m and (Path(m) / "config.json").is_file():
            return Path(m)
    if (p / "model" / "config.json").is_file():
        return p / "model"
    raise FileNotFoundError(f"weighting.anchor_run_dir {path}: no saved model (expected an SFT run with "
                            "model/ or an HF folder with config.json)")


# ===================================================================== dependencies
def ensure_dependency(config_path: str, seed: int, results_dir: str, what: str, rank: int = 0) -> Path:
    """Run directory of the ``config_path`` run with ``seed``; trained here if not finished.

    The path is the one ``python -m scd run CONFIG seed=N`` uses
    (``<results_dir>/<grid or runs>/<method>-<run_id>``), so a run made by hand is
    reused.  A file lock (released even on SIGKILL) makes concurrent grid workers
    train it once; ranks > 0 of a distributed run wait for rank 0.
    """
    from scd.cli import default_run_dir
    from scd.core.config import RECIPES, load_config
    from scd.core.train import record_failure

    path = Path(config_path)
    if not path.is_absolute() and not path.exists():  # relative to the repository root
        path = Path(__file__).resolve().parents[1] / config_path
    cfg = load_config(path, [f"seed={seed}"])
    from scd.core.results import safe_join

    run_dir = safe_join(results_dir, *default_run_dir(cfg, ".").parts)
    rd = RunDir(run_dir)
    if rd.is_finished():
        return run_dir
    if rank != 0:
        while not rd.is_finished():
            if rd.status() in ("failed", "diverged"):
                raise RuntimeError(f"{what} run {run_dir} {rd.status()} (see its run.json)")
            time.sleep(5)
        return run_dir
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f".{run_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not rd.is_finished():
            print(f"[distill] {what} run missing: training it -> {run_dir}", flush=True)
            try:
                RECIPES.get(cfg.recipe).run(cfg, run_dir)
            except Exception as e:
                record_failure(run_dir, e)
                raise RuntimeError(f"{what} run {run_dir} ({config_path}) failed: {type(e).__name__}: {e}") from e
    return run_dir


# ===================================================================== caches
def data_hash(encoded: list[dict]) -> str:
    """sha256 of the tokenised examples (covers data, prompts, tokenizer and max_len)."""
    h = hashlib.sha256()
    for e in encoded:
        h.update(json.dumps([e["input_ids"], e["labels"]], separators=(",", ":")).encode())
    return h.hexdigest()


def cached_per_sample_ce(cache_dir: Path, model_sha: str, dhash: str, compute) -> "Any":
    """Per-sample CE [N] from ``cache_dir/ce-<model sha>-<data hash>.safetensors``, or
    ``compute()`` once and cache it (atomic write)."""
    from safetensors.torch import load_file, save_file

    path = Path(cache_dir) / f"ce-{model_sha[:16]}-{dhash[:16]}.safetensors"
    if path.exists():
        return load_file(str(path))["loss"]
    losses = compute().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({"loss": losses}, str(tmp), metadata={"model_sha256": model_sha, "data_sha256": dhash})
    os.replace(tmp, path)
    return losses


# ===================================================================== backends
class TorchBackend:
    """Plain PyTorch (CPU or one GPU): AdamW + cosine/constant schedule with warmup."""

    world, rank = 1, 0

    def __init__(self, model, train: TrainConfig, device):
        import torch

        self.model, self.train_cfg, self.device = model.to(device).train(), train, device
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the student has no trainable parameters")
        self.opt = torch.optim.AdamW(params, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay)
        self.sched = None
        self.ckpt = None

    @property
    def module(self):
        return self.model

    def new_schedule(self, total_steps: int, reset_state: bool) -> None:
        if reset_state:
            self.opt.state.clear()  # = a fresh AdamW (state is created lazily)
        self.sched = make_scheduler(self.opt, self.train_cfg, total_steps)

    def forward(self, batch):
        with autocast(self.train_cfg, self.device):
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def backward(self, loss, last: bool) -> None:
        loss.backward()

    def step(self) -> float:
        import torch

        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train_cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(gnorm)

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def all_sum(self, x: float) -> float:
        return x

    def barrier(self) -> None:
        pass

    # resumable state in run_dir/ckpt (scd.core.train.Checkpointer)
    def save_state(self, run_dir: Path, step: int, extra: dict) -> None:
        Checkpointer(run_dir).save(self.model, self.opt, self.sched, step, extra)

    def has_state(self, run_dir: Path) -> bool:
        return Checkpointer(run_dir).exists()

    def load_state(self, run_dir: Path) -> tuple[int, dict]:
        """Weights, optimiser and schedule from the checkpoint -> (step, extra)."""
        return Checkpointer(run_dir).load(self.model, self.opt, self.sched)

    def clear_state(self, run_dir: Path) -> None:
        Checkpointer(run_dir).clear()

    def full_model(self, cfg: "DistillConfig"):
        return self.model


class DeepSpeedBackend(TorchBackend):
    """DeepSpeed (ZeRO-2/3) for the student; the teacher stays a plain frozen module.

    Launch with torchrun or the deepspeed launcher (env RANK/WORLD_SIZE/LOCAL_RANK/
    MASTER_ADDR/MASTER_PORT).  The JSON's "auto" values are filled from ``train``.
    Our loss is already normalised by the global token count, so ``backward`` does
    not rescale by the accumulation steps; DeepSpeed averages gradients over ranks.
    """

    def __init__(self, model, train: TrainConfig, device, ds_json: str, world: int, rank: int):
        import deepspeed
        import torch

        self.train_cfg, self.device, self.world, self.rank = train, device, world, rank
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay)
        ds_cfg = deepspeed_config(ds_json, train, world)
        self.stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
        self.engine, _, _, _ = deepspeed.initialize(model=model.to(device).train(), optimizer=self.opt,
                                                    config=ds_cfg)
        self.model = self.engine
        self.sched = None

    @property
    def module(self):
        return self.engine.module

    def forward(self, batch):
        return self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def backward(self, loss, last: bool) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        if not last:
            self.engine.step()  # not an accumulation boundary: no update

    def step(self) -> float:
        self.engine.step()  # boundary: clip (gradient_clipping), update
        self.sched.step()
        g = self.engine.get_global_grad_norm()
        return float(g) if g is not None else float("nan")

    def all_sum(self, x: float) -> float:
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(x)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def save_state(self, run_dir: Path, step: int, extra: dict) -> None:
        """engine.save_checkpoint into a new tag; ``latest`` is switched (atomically, rank 0)
        only once every rank has written, then older tags are removed."""
        d = Path(run_dir) / "ckpt" / "deepspeed"
        self.engine.save_checkpoint(str(d), tag=f"step{step}", save_latest=False,
                                    client_state={"extra": extra, "step": step, "sched": self.sched.state_dict()})
        self.barrier()
        if self.rank == 0:
            import shutil

            atomic_write_text(d / "latest", f"step{step}")
            for old in d.glob("step*"):
                if old.name != f"step{step}":
                    shutil.rmtree(old, ignore_errors=True)
        self.barrier()

    def has_state(self, run_dir: Path) -> bool:
        return (Path(run_dir) / "ckpt" / "deepspeed" / "latest").is_file()

    def load_state(self, run_dir: Path) -> tuple[int, dict]:
        _, client = self.engine.load_checkpoint(str(Path(run_dir) / "ckpt" / "deepspeed"),
                                                load_lr_scheduler_states=False)
        self.sched.load_state_dict(client["sched"])
        return int(client["step"]), client["extra"]

    def clear_state(self, run_dir: Path) -> None:
        if self.rank == 0:
            import shutil

            shutil.rmtree(Path(run_dir) / "ckpt" / "deepspeed", ignore_errors=True)

    def full_model(self, cfg: "DistillConfig"):
        """Rank 0: a plain module with the full weights (ZeRO-3 gathers them); others: None."""
        if self.stage < 3:
            return self.engine.module if self.rank == 0 else None
        sd = self.engine._zero3_consolidated_16bit_state_dict()  # collective; full dict on rank 0
        if self.rank != 0:
            return None
        model, _ = build_model(cfg.model, seed=cfg.seed)
        model.load_state_dict(sd, strict=False)
        return model.to(self.device)


def make_scheduler(opt, train: TrainConfig, total_steps: int):
    """Cosine (or constant) schedule with linear warmup over ``total_steps`` (as scd.core.train)."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    warm = int(math.ceil(train.warmup_ratio * total_steps))
    if train.schedule == "cosine":
        return get_cosine_schedule_with_warmup(opt, warm, total_steps)
    return get_constant_schedule_with_warmup(opt, warm)


def deepspeed_config(path: str, train: TrainConfig, world: int) -> dict:
    """Read a DeepSpeed JSON and fill its "auto" values from ``train``; conflicts are errors."""
    try:
        ds = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"deepspeed: config {path} not found (see configs/deepspeed/)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"deepspeed: {path}:{e.lineno}: invalid JSON ({e.msg})") from None
    want = {"train_micro_batch_size_per_gpu": train.batch_size, "gradient_accumulation_steps": train.grad_accum,
            "train_batch_size": train.batch_size * train.grad_accum * world, "gradient_clipping": train.grad_clip}
    for key, value in want.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ValueError(f"deepspeed: {path}: '{key}' is {ds[key]} but train.* gives {value}; "
                             "set it to \"auto\"")
    for key, on in (("bf16", train.bf16), ("fp16", False)):
        block = ds.setdefault(key, {"enabled": on})
        if block.get("enabled") == "auto":
            block["enabled"] = on
    ds.setdefault("zero_allow_untested_optimizer", True)  # our AdamW is a plain torch optimizer
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def make_backend(cfg: DistillConfig, model, device):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.deepspeed is None:
        if world > 1:
            raise ValueError(f"WORLD_SIZE={world} but no deepspeed config: multi-process training runs through "
                             "DeepSpeed (add deepspeed=configs/deepspeed/zero2.json)")
        return TorchBackend(model, cfg.train, device)
    return DeepSpeedBackend(model, cfg.train, device, cfg.deepspeed, world, int(os.environ.get("RANK", "0")))


def init_distributed(cfg: DistillConfig):
    """(rank, world, local_rank, device); initialises DeepSpeed's process group when configured."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.deepspeed is None:
        return rank, world, local, resolve_device(cfg.train.device)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(os.environ.get("SCD_CACHE", "~/.cache/scd"))
                                                      .expanduser() / "torch_extensions"))
    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                         ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, default)  # single process without a launcher
    import deepspeed

    use_cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    return rank, world, local, torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")


# ===================================================================== probe (scd_select)
def probe_encoded(cfg: DistillConfig, tok) -> list[dict]:
    """A fixed, seeded subset of ``probe.split`` over all data.tasks (same for every run)."""
    import torch

    pairs = load_training_pairs(dataclasses.replace(cfg.data, split=cfg.probe.split, limit_per_task=None), tok)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(1234)).tolist()
    keep = sorted(order[:cfg.probe.n])
    return [tokenize_sft(tok, *pairs[i], cfg.train.max_len) for i in keep]


def probe_logprobs(forward, encoded: list[dict], pad_id: int, batch_size: int, device, vocab: int) -> list:
    """Log-probs at the probe's target positions, per batch: [[N_b, vocab] float32 on CPU]."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            b = {k: v.to(device) for k, v in collate(encoded[start:start + batch_size], pad_id).items()}
            mask = b["labels"][:, 1:] != -100
            logits = forward(b)[:, :-1][mask][..., :vocab]
            out.append(torch.log_softmax(logits.float(), -1).cpu())
    return out


def probe_kl(p_batches: list, q_batches: list) -> float:
    """Token-averaged KL(p || q) over the probe (lists of [N_b, V] log-probs)."""
    from scd.losses import kl_divergence

    total, n = 0.0, 0
    for p, q in zip(p_batches, q_batches):
        total += float(kl_divergence(p, q).sum())
        n += p.shape[0]
    return total / max(n, 1)


def select_stage(stage: int, n_stages: int, g0: int, cfg: DistillConfig, manifest, slot: TeacherSlot, backend,
                 probe, tok, device, vocab: int, kl_best: dict, metrics) -> int:
    """The checkpoint index for ``stage`` under ``stages.selection``; logs a ``select`` row.

    scd_select first measures KL(best || c) (once per run, kept in ``kl_best``) and
    KL(student || c) for every checkpoint c on the probe set."""
    from scd.schedule import select_checkpoint

    kl_student, n_loads, probe_s = None, len(slot.loads), 0.0
    if probe is not None:
        kl_student, probe_s = _probe_kls(backend, slot, manifest, probe, cfg, tok, device, vocab, kl_best)
    choice = int(select_checkpoint(cfg.stages.selection, stage, n_stages, manifest,
                                   kl_best_to=kl_best if probe is not None else None, kl_student_to=kl_student))
    row = {"step": g0, "event": "select", "stage": stage, "checkpoint": choice,
           "checkpoint_step": manifest[choice].step, "rule": cfg.stages.selection}
    if probe is not None:
        row.update(kl_best={str(k): v for k, v in kl_best.items()},
                   kl_student={str(k): v for k, v in kl_student.items()}, probe_s=round(probe_s, 3),
                   probe_loads=len(slot.loads) - n_loads,
                   probe_load_s=round(sum(x[1] for x in slot.loads[n_loads:]), 4))
    metrics.log(row)
    return choice


def distill_step(backend, teacher_logits, encoded: list[dict], g: int, cfg: DistillConfig, vocab: int,
                 pad_id: int, device, anchor_loss=None, teacher_loss=None) -> dict:
    """One optimiser step on the global batch of step ``g`` (this rank's share of it).

    teacher_logits: batch -> [B, T, V] (no grad) or None (gold labels only); anchor_loss /
    teacher_loss: per-example AW losses [N_train] or None.  The loss of every micro-batch is
    divided by the target tokens of the whole accumulated (and all-reduced) batch, so
    batch 8 x accum 1, batch 4 x accum 2 and 2 ranks x batch 4 give the same update.
    NaN/inf in any term raises DivergedError naming the step and the term.
    """
    world, rank, bs = backend.world, backend.rank, cfg.train.batch_size
    micro = []
    for m in range(cfg.train.grad_accum):
        idx = batch_indices(len(encoded), bs * world, g, m, cfg.train.grad_accum, cfg.seed)[rank * bs:(rank + 1) * bs]
        micro.append((idx, collate([encoded[i] for i in idx], pad_id)))
    n_global = backend.all_sum(sum(int((b["labels"][:, 1:] != -100).sum()) for _, b in micro))
    norm = n_global / world  # DDP/ZeRO average the ranks' gradients: overall sum / n_global
    sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "w": 0.0}
    for j, (idx, b) in enumerate(micro):
        b = {k: v.to(device) for k, v in b.items()}
        t_logits = teacher_logits(b) if teacher_logits is not None else None
        kd, ce, rows = token_terms(backend.forward(b), t_logits, b["labels"], cfg.loss, vocab)  # [N] each
        w = sample_weights(cfg.weighting, len(idx), device=device,
                           anchor_loss=None if anchor_loss is None else anchor_loss[idx],
                           teacher_loss=None if teacher_loss is None else teacher_loss[idx])  # [B]
        loss = micro_batch_loss(kd, ce, rows, w, norm)
        backend.backward(loss, last=j == len(micro) - 1)
        sums["loss"] += float(loss.detach())
        sums["kd"] += float(kd.detach().sum())
        sums["ce"] += float(ce.detach().sum())
        sums["w"] += float(w[rows].sum())
    n = max(n_global, 1)
    out = {"loss": backend.all_sum(sums["loss"]) / world, "kd": backend.all_sum(sums["kd"]) / n,
           "ce": backend.all_sum(sums["ce"]) / n, "w_mean": backend.all_sum(sums["w"]) / n}
    if teacher_logits is not None:
        check_finite(out["kd"], g + 1, f"kd:{cfg.loss.divergence}")
    check_finite(out["ce"], g + 1, "ce")
    check_finite(out["loss"], g + 1, "loss")
    out["grad_norm"] = backend.step()
    out["n_tokens"] = int(n_global)
    return out


# ===================================================================== the recipe
def run(cfg: DistillConfig, run_dir: Path) -> dict:
    import torch

    from scd.schedule import SELECTIONS, Manifest

    run_dir = Path(run_dir)
    rank = int(os.environ.get("RANK", "0"))
    use_teacher = cfg.mode == "eval_teacher" or not cfg.weighting.gold_only
    rd = RunDir(run_dir)
    if rank == 0:  # run.json first, so a failing dependency is recorded in it
        distilling = cfg.mode == "distill"
        rd = start_run(cfg, run_dir, recipe="distill",
                       hparams={"lr": cfg.train.lr, "max_steps": cfg.train.max_steps, "n_stages": cfg.stages.n_stages,
                                "selection": cfg.stages.selection, "divergence": cfg.loss.divergence,
                                "temperature": cfg.loss.temperature, "weighting": cfg.weighting.name,
                                "alpha": cfg.weighting.alpha},
                       components={"kd": distilling and use_teacher, "staged": distilling and cfg.stages.n_stages != 1,
                                   "scd_select": distilling and use_teacher and cfg.stages.selection == "scd_select",
                                   "aw": distilling and cfg.weighting.needs_losses} if distilling else {})

    # 1. dependencies: the teacher run and the AW anchor (trained here if named by a config and missing)
    teacher_dir, anchor_dir = None, None
    if use_teacher and cfg.teacher.config:
        teacher_dir = ensure_dependency(cfg.teacher.config, cfg.teacher.seed if cfg.teacher.seed is not None
                                        else cfg.seed, cfg.teacher.results_dir, "teacher", rank)
    elif use_teacher:
        teacher_dir = Path(cfg.teacher.run_dir)
    if cfg.weighting.needs_losses:
        if cfg.weighting.anchor_config:
            anchor_dir = ensure_dependency(cfg.weighting.anchor_config, cfg.weighting.anchor_seed
                                           if cfg.weighting.anchor_seed is not None else cfg.seed,
                                           cfg.teacher.results_dir, "student anchor", rank)
        else:
            anchor_dir = Path(cfg.weighting.anchor_run_dir)
        anchor_dir = anchor_model_dir(anchor_dir)

    rank, world, _, device = init_distributed(cfg)
    metrics = rd.metrics(enabled=rank == 0)
    seed_everything(cfg.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)

    # 2. the teacher manifest, verified (sha256) before anything is trained
    manifest = None
    if use_teacher:
        manifest = Manifest.read(find_manifest(teacher_dir))
        manifest.verify()  # an edited checkpoint -> ManifestError naming it
    if cfg.mode == "eval_teacher":
        return _eval_teacher(cfg, rd, manifest, device, rank)

    # 3. student and tokenizer check (teacher and anchor must share token ids)
    student, tok = build_model(cfg.model, seed=cfg.seed)
    vocab = len(tok)
    if use_teacher:
        vocab = check_same_tokenizer(load_tokenizer(str(manifest.resolve(manifest.final_index))), tok,
                                     "teacher", "student", allow_prefix=cfg.teacher.allow_vocab_prefix)
    if anchor_dir is not None:
        check_same_tokenizer(load_tokenizer(str(anchor_dir)), tok, "student anchor", "student")

    # 4. data: tokenised once; the order of batches is a pure function of (seed, step)
    pairs = load_training_pairs(cfg.data, tok)
    encoded = [tokenize_sft(tok, p, t, cfg.train.max_len) for p, t in pairs]
    dhash = data_hash(encoded)
    n_stages = cfg.stages.n_stages or (len(manifest) if manifest is not None else 1)
    per_step = cfg.train.batch_size * cfg.train.grad_accum * world
    if cfg.stages.steps_per_stage:
        sps = cfg.stages.steps_per_stage
    elif cfg.stages.epochs_per_stage:
        sps = max(1, math.ceil(cfg.stages.epochs_per_stage * len(encoded) / per_step))
    else:
        sps = max(1, cfg.train.max_steps // n_stages)
    total_steps = n_stages * sps
    cache_dir = run_dir / "cache"

    # 5. AW: the anchor's per-sample losses, computed once (rank 0) and cached
    anchor_loss = None
    if anchor_dir is not None:
        from scd.schedule import hash_checkpoint
        from scd.teacher import per_sample_ce

        def anchor_ce():
            from transformers import AutoModelForCausalLM

            m = AutoModelForCausalLM.from_pretrained(str(anchor_dir), dtype=torch_dtype(cfg.teacher.dtype),
                                                     use_safetensors=True).to(device)
            losses = per_sample_ce(m, encoded, tok.pad_token_id, 2 * cfg.train.batch_size, device)[0]
            del m
            return losses

        anchor_sha = hash_checkpoint(anchor_dir)[0]
        anchor_loss = _rank0_cached(cache_dir, anchor_sha, dhash, anchor_ce, rank)

    # 6. backend (plain PyTorch or DeepSpeed) and the resident teacher
    if cfg.train.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    backend = make_backend(cfg, student, device)
    slot = TeacherSlot(manifest, cfg.teacher.dtype, device) if use_teacher else None
    selection_rule = SELECTIONS.get(cfg.stages.selection)
    needs_probe = use_teacher and getattr(selection_rule, "needs_probe_kl", False)
    probe = probe_encoded(cfg, tok) if needs_probe else None
    kl_best: dict[int, float] = {}
    teacher_losses: dict[int, Any] = {}

    def schedule_for_stage(stage: int) -> None:
        if cfg.stages.reset_optimizer:
            backend.new_schedule(sps, reset_state=True)
        elif stage == 0:
            backend.new_schedule(total_steps, reset_state=False)

    # 7. resume: stage, step and the selections so far live in the checkpoint's extra
    start_step, tokens, selections, resumed = 0, 0, [], backend.has_state(run_dir)
    if resumed:
        backend.new_schedule(sps if cfg.stages.reset_optimizer else total_steps, reset_state=True)
        start_step, extra = backend.load_state(run_dir)
        tokens, selections = int(extra.get("tokens", 0)), [int(c) for c in extra.get("selections", [])]
        kl_best = {int(k): float(v) for k, v in extra.get("kl_best", {}).items()}
        metrics.drop_after(start_step)  # rows after the checkpoint are recomputed (no duplicates)
        print(f"[distill] resumed at step {start_step}/{total_steps} (stage {extra.get('stage')})", flush=True)
    else:
        metrics.drop_after(-1)  # killed before the first checkpoint: forget rows logged then

    # 8. stages
    t_start = time.time()
    for stage in range(start_step // sps, n_stages):
        g0 = stage * sps  # global step at the stage start
        # resumed inside this stage (or at its start, after its selection was saved)
        resumed_mid_stage = resumed and (start_step > g0 or (start_step == g0 and len(selections) > stage))
        if use_teacher:
            if len(selections) <= stage:  # select this stage's checkpoint (logged with its probe KLs)
                selections.append(select_stage(stage, n_stages, g0, cfg, manifest, slot, backend, probe, tok,
                                               device, vocab, kl_best, metrics))
            choice = selections[stage]
            resident = slot.index == choice  # e.g. the last checkpoint the probe loaded
            secs, in_place = slot.ensure(choice)
            if not resumed_mid_stage:
                metrics.log({"step": g0, "event": "teacher_switch", "stage": stage, "checkpoint": choice,
                             "checkpoint_step": manifest[choice].step, "switch_s": round(secs, 4),
                             "in_place": in_place, "already_resident": resident})
            if anchor_loss is not None and choice not in teacher_losses:
                from scd.teacher import per_sample_ce

                teacher_losses[choice] = _rank0_cached(
                    cache_dir, manifest[choice].sha256, dhash,
                    lambda: per_sample_ce(slot.model, encoded, tok.pad_token_id, 2 * cfg.train.batch_size,
                                          device)[0], rank)
        if not resumed_mid_stage:
            schedule_for_stage(stage)
            backend.save_state(run_dir, g0, _extra(stage, tokens, selections, kl_best))

        for g in range(max(g0, start_step), g0 + sps):
            stats = distill_step(backend, slot.logits if use_teacher else None, encoded, g, cfg, vocab,
                                 tok.pad_token_id, device, anchor_loss,
                                 teacher_losses.get(selections[stage]) if use_teacher else None)
            tokens += stats.pop("n_tokens")
            done = g + 1
            if done % cfg.train.log_every == 0 or done == g0 + sps:
                metrics.log({"step": done, "stage": stage, **stats, "lr": backend.lr(), "tokens": tokens,
                             "teacher": selections[stage] if use_teacher else None})
            fault_point("step")
            if cfg.train.save_every and done % cfg.train.save_every == 0 and done < g0 + sps:
                backend.save_state(run_dir, done, _extra(stage, tokens, selections, kl_best))
        resumed = False
        fault_point("stage")  # reliability tests: killed between stages
    wall = round(time.time() - t_start, 2)

    # 9. the student: saved, evaluated, recorded (rank 0)
    final = backend.full_model(cfg)
    if rank != 0:
        return {}
    artifacts = {}
    if cfg.save_model:
        from scd.teacher import savable

        artifacts["model"] = str(save_model(savable(final), tok, run_dir / "model"))  # LoRA: merged
    evaluation = cfg.eval.run(final, tok, run_dir)
    backend.clear_state(run_dir)
    switches = [r for r in read_metrics(rd.metrics_path) if r.get("event") == "teacher_switch"]
    train = {"tokens": tokens, "steps": total_steps, "steps_per_stage": sps, "stages": n_stages, "wall_s": wall,
             "peak_mem": peak_memory(device), "world_size": world, "selections": selections,
             "selection_steps": [manifest[c].step for c in selections] if manifest else [],
             "switch_s_total": round(sum(r["switch_s"] for r in switches), 4),
             "deepspeed": cfg.deepspeed}
    if manifest is not None:
        artifacts["teacher_manifest"] = str(manifest.root / "manifest.json")
    return finish_run(rd, train=train, artifacts=artifacts, **evaluation)


def _extra(stage: int, tokens: int, selections: list[int], kl_best: dict) -> dict:
    return {"stage": stage, "tokens": tokens, "selections": list(selections),
            "kl_best": {str(k): v for k, v in kl_best.items()}}


def _rank0_cached(cache_dir: Path, sha: str, dhash: str, compute, rank: int):
    """cached_per_sample_ce computed by rank 0; other ranks wait at a barrier, then read the file."""
    import torch.distributed as dist

    out = cached_per_sample_ce(cache_dir, sha, dhash, compute) if rank == 0 else None
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if out is None:
        out = cached_per_sample_ce(cache_dir, sha, dhash, compute)
    return out


def _probe_kls(backend, slot: TeacherSlot, manifest, probe, cfg, tok, device, vocab,
               kl_best: dict) -> tuple[dict, float]:
    """KL(student || c) for every checkpoint c (and KL(best || c) once per run) on the probe set.

    One teacher is resident at a time: the best checkpoint's probe log-probs are kept
    on the CPU, then each checkpoint is switched in and compared with them and with
    the student's.
    """
    t0 = time.time()
    bs, pad = cfg.probe.batch_size, tok.pad_token_id
    model = backend.module
    was = model.training
    model.eval()
    student_lp = probe_logprobs(backend.forward, probe, pad, bs, device, vocab)
    model.train(was)
    best = manifest.best_index
    if best is None:
        raise ValueError("selection scd_select needs the teacher's best checkpoint, but no checkpoint in the "
                         "manifest has a dev loss or dev score")
    best_lp = None
    if set(kl_best) != set(manifest.indices):
        slot.ensure(best)
        best_lp = probe_logprobs(slot.logits, probe, pad, bs, device, vocab)
    kl_student = {}
    order = sorted(manifest.indices, key=lambda i: (i != slot.index, i))  # the resident one first
    for c in order:
        slot.ensure(c)
        c_lp = probe_logprobs(slot.logits, probe, pad, bs, device, vocab)
        kl_student[c] = probe_kl(student_lp, c_lp)
        if c not in kl_best:
            kl_best[c] = probe_kl(best_lp, c_lp)
    return kl_student, time.time() - t0


def _eval_teacher(cfg: DistillConfig, rd: RunDir, manifest, device, rank: int) -> dict:
    """mode eval_teacher: the teacher itself as a baseline row, under the same eval spec."""
    from transformers import AutoModelForCausalLM

    from scd.schedule import select_checkpoint

    choice = select_checkpoint(cfg.stages.selection, 0, 1, manifest)
    path = manifest.resolve(choice)
    if rank != 0:
        return {}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(cfg.teacher.dtype),
                                                 use_safetensors=True).to(device).eval()
    tok = load_tokenizer(str(path))
    evaluation = cfg.eval.run(model, tok, rd.path)
    return finish_run(rd, train={"selections": [choice], "selection_steps": [manifest[choice].step]},
                      artifacts={"model": str(path), "teacher_manifest": str(manifest.root / "manifest.json")},
                      **evaluation)


register_recipe("distill", DistillConfig, run)
