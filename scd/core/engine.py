"""The one training loop of the suite.

Every recipe (teacher/student SFT, SCD distillation, UniSD self-distillation and its
baselines, recovery) is a small object that the :class:`Engine` drives:

    class MyRecipe:                                   # duck-typed, see :class:`Recipe`
        def micro_batches(self, step, world, rank):   # -> list of this rank's micro-batches
        def count(self, micro) -> int:                # normalisation units in one micro-batch
        def loss_terms(self, micro, denom) -> Terms:  # differentiable terms, already / denom
        # optional hooks: on_step_start(engine, step), on_step_end(engine, step),
        #                 state() -> dict, load_state(dict), log_extra() -> dict,
        #                 should_stop(step) -> bool (asked after on_step_end: stop early; keep
        #                 what it depends on in state(), so a resumed run stops at the same step)

    engine = Engine(module, cfg.train, run_dir=run_dir, metrics=metrics, device=device)
    stats = engine.fit(recipe, total_steps)

The engine owns, once: the backend (single process or DeepSpeed ZeRO-2/3), micro-batching
with *global* normalisation (every term of every micro-batch is divided by the count of
the whole accumulated, all-reduced batch, so batch 8 x accum 1, batch 4 x accum 2 and
2 ranks x batch 4 give the same update), backward, per-term finite checks, gradient
clipping, optimiser and schedule step, logging, atomic save / bit-identical resume, and
the fault points of the reliability tests.  ``.backward(`` appears in this module only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from scd.core.faults import fault_point
from scd.core.results import atomic_write_json, atomic_write_text
from scd.core.train import TrainConfig, check_finite, peak_memory, resolve_device

try:  # tqdm is a dependency of transformers/datasets; progress bars are cosmetic
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


# ------------------------------------------------------------------------ recipe protocol
@dataclasses.dataclass
class Terms:
    """What a recipe returns for one micro-batch.

    ``loss``: named differentiable scalars, each already divided by the global count
    (the engine backpropagates their sum and logs each, summed over micro-batches and
    averaged over ranks).  ``stats``: named floats *summed* over the micro-batch
    (e.g. sum of weights); the engine all-reduces them and divides by the global count.
    ``tokens``: what the ``tokens`` column counts for this micro-batch when it is not
    ``recipe.count`` (UniSD normalises by sequences but counts completion tokens); every
    micro-batch of a recipe sets it or none does.
    """
    loss: dict[str, torch.Tensor]
    stats: dict[str, float] = dataclasses.field(default_factory=dict)
    tokens: int | None = None  # tokens processed, when not the normalisation count (the ``tokens`` column)


class Recipe(Protocol):
    engine: "Engine"  # the engine that drives it (a recipe holds its engine; it never copies the loop)

    def micro_batches(self, step: int, world: int, rank: int) -> list[Any]: ...

    def count(self, micro: Any) -> int: ...

    def loss_terms(self, micro: Any, denom: float) -> Terms: ...


def autocast(train: TrainConfig, device):
    """bf16 autocast (fp32 master weights and optimiser state) when ``train.dtype`` is bf16
    (or its alias ``train.bf16``); the recipes' loss math runs in fp32 (scd.losses upcasts)."""
    if train.use_bf16:
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_scheduler(opt, train: TrainConfig, total_steps: int):
    """Cosine (or constant) schedule with linear warmup of ceil(warmup_ratio * total_steps) steps."""
    warm = int(math.ceil(train.warmup_ratio * total_steps))
    if train.schedule == "cosine":
        return get_cosine_schedule_with_warmup(opt, warm, total_steps)
    return get_constant_schedule_with_warmup(opt, warm)


def make_optimizer(module, train: TrainConfig):
    """AdamW over the trainable parameters (betas and weight decay from ``train``)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(params, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay)


def trainable_state(model) -> dict:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


# ---------------------------------------------------------------------------- checkpoints
class Checkpointer:
    """Resumable training state under ``run_dir/ckpt/last``, written atomically.

    model weights: safetensors (trainable params only); optimiser + scheduler + RNG + step:
    ``state.pt`` loaded with ``weights_only=True``.
    """

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir) / "ckpt"
        self.last = self.dir / "last"

    def _recover(self) -> None:
        """A kill between the two renames of ``save`` leaves the only complete
        checkpoint in ``.last.old-<pid>``: put it back.  Half-written temps are removed."""
        if not self.dir.exists():
            return
        if not (self.last / "state.pt").exists():
            olds = sorted(self.dir.glob(".last.old-*"), key=lambda p: p.stat().st_mtime)
            olds = [p for p in olds if (p / "state.pt").exists()]
            if olds:
                shutil.rmtree(self.last, ignore_errors=True)
                os.replace(olds[-1], self.last)
        for tmp in self.dir.glob(".last.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def exists(self) -> bool:
        self._recover()
        return (self.last / "state.pt").exists()

    def save(self, model, optimizer, scheduler, step: int, extra: dict | None = None) -> None:
        self._recover()  # also sweeps temps left by a killed attempt (any pid)
        tmp = self.dir / f".last.tmp-{os.getpid()}"
        tmp.mkdir(parents=True)
        weights = {k: v.detach().contiguous().cpu() for k, v in trainable_state(model).items()}
        save_file(weights, str(tmp / "model.safetensors"))
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
                 "step": step, "torch_rng": torch.get_rng_state(), "extra": extra or {}}
        torch.save(state, tmp / "state.pt")
        atomic_write_json(tmp / "meta.json", {"step": step, "time": time.time()})
        fault_point("ckpt_write")
        old = self.dir / f".last.old-{os.getpid()}"
        if self.last.exists():
            os.replace(self.last, old)
        os.replace(tmp, self.last)
        shutil.rmtree(old, ignore_errors=True)

    def load(self, model, optimizer, scheduler) -> tuple[int, dict]:
        weights = load_file(str(self.last / "model.safetensors"))
        missing = set(weights) - set(model.state_dict())
        if missing:
            raise RuntimeError(f"checkpoint {self.last} does not match the model (e.g. {sorted(missing)[:3]})")
        model.load_state_dict(weights, strict=False)
        state = torch.load(self.last / "state.pt", weights_only=True, map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        return int(state["step"]), state.get("extra") or {}

    def clear(self) -> None:
        """The run finished: drop all resume state (temps of killed attempts included)."""
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------- backends
class TorchBackend:
    """Plain PyTorch (CPU or one GPU)."""

    world, rank = 1, 0

    def __init__(self, module, train: TrainConfig, device):
        self.train_cfg, self.device = train, device
        self.model = module.to(device).train()
        self.opt = make_optimizer(module, train)
        self.sched = None

    @property
    def module(self):
        return self.model

    def new_schedule(self, total_steps: int, reset_state: bool) -> None:
        if reset_state:
            self.opt.state.clear()  # = a fresh AdamW (state is created lazily)
        self.sched = make_scheduler(self.opt, self.train_cfg, total_steps)

    def backward(self, loss, last: bool) -> None:
        loss.backward()

    def step(self) -> float:
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train_cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(gnorm)

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def weights_changed(self) -> None:
        """The module's weights were edited in place (e.g. a projection): nothing to sync here."""

    def all_sum(self, x: float) -> float:
        return x

    def barrier(self) -> None:
        pass

    def save_state(self, run_dir: Path, step: int, extra: dict) -> None:
        Checkpointer(run_dir).save(self.model, self.opt, self.sched, step, extra)

    def has_state(self, run_dir: Path) -> bool:
        return Checkpointer(run_dir).exists()

    def load_state(self, run_dir: Path) -> tuple[int, dict]:
        """Weights, optimiser and schedule from the checkpoint -> (step, extra)."""
        return Checkpointer(run_dir).load(self.model, self.opt, self.sched)

    def clear_state(self, run_dir: Path) -> None:
        Checkpointer(run_dir).clear()

    def full_state_dict(self) -> dict | None:
        """The full weights on rank 0 (None elsewhere)."""
        return self.model.state_dict()


class DeepSpeedBackend(TorchBackend):
    """DeepSpeed (ZeRO-2/3) for the trained module; frozen models stay plain modules.

    Launch with torchrun or the deepspeed launcher (env RANK/WORLD_SIZE/LOCAL_RANK/
    MASTER_ADDR/MASTER_PORT).  The JSON's "auto" values are filled from ``train``.
    The loss is already normalised by the global count, so ``backward`` does not
    rescale by the accumulation steps; DeepSpeed averages gradients over ranks.
    """

    def __init__(self, module, train: TrainConfig, device, ds_json: str, world: int, rank: int):
        import deepspeed

        self.train_cfg, self.device, self.world, self.rank = train, device, world, rank
        self.opt = make_optimizer(module, train)
        ds_cfg = deepspeed_config(ds_json, train, world)
        self.stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
        self.engine, _, _, _ = deepspeed.initialize(model=module.to(device).train(), optimizer=self.opt,
                                                    config=ds_cfg)
        self.model = self.engine
        self.sched = None

    @property
    def module(self):
        return self.engine.module

    def backward(self, loss, last: bool) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        if not last:
            self.engine.step()  # not an accumulation boundary: no update

    def step(self) -> float:
        self.engine.step()  # boundary: clip (gradient_clipping), update
        self.sched.step()
        g = self.engine.get_global_grad_norm()
        return float(g) if g is not None else float("nan")

    def weights_changed(self) -> None:
        """Copy the module's (edited) weights into ZeRO's fp32 master partitions, which
        would otherwise overwrite them at the next step."""
        if self.stage >= 3:
            raise NotImplementedError("editing the trained weights in place needs full weights on every "
                                      "rank: use ZeRO-2 (configs/deepspeed/zero2.json), not ZeRO-3")
        refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
        if refresh is None:
            raise NotImplementedError(f"DeepSpeed optimizer {type(self.engine.optimizer).__name__} cannot "
                                      "refresh its fp32 master weights")
        refresh()

    def all_sum(self, x: float) -> float:
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
            shutil.rmtree(Path(run_dir) / "ckpt" / "deepspeed", ignore_errors=True)

    def full_state_dict(self) -> dict | None:
        """Rank 0: the full weights (ZeRO-3 gathers them, a collective); others: None."""
        if self.stage < 3:
            return self.engine.module.state_dict() if self.rank == 0 else None
        sd = self.engine._zero3_consolidated_16bit_state_dict()  # collective; full dict on rank 0
        return sd if self.rank == 0 else None


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
    for key, on in (("bf16", train.use_bf16), ("fp16", False)):
        block = ds.setdefault(key, {"enabled": on})
        if block.get("enabled") == "auto":
            block["enabled"] = on
    ds.setdefault("zero_allow_untested_optimizer", True)  # our AdamW is a plain torch optimizer
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where this process trains: its rank, the world size, its local rank and its device."""

    rank: int
    world: int
    local_rank: int
    device: Any


def init_distributed(train: TrainConfig, deepspeed_json: str | None) -> Placement:
    """Rank, world and device; initialises DeepSpeed's process group when a DeepSpeed config is given.

    Without a launcher (no RANK/WORLD_SIZE), DeepSpeed runs as a single process of world 1.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if deepspeed_json is None:
        if world > 1:
            raise ValueError(f"WORLD_SIZE={world} but no deepspeed config: multi-process training runs through "
                             "DeepSpeed (add deepspeed=configs/deepspeed/zero2.json)")
        return Placement(rank, world, local, resolve_device(train.device))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(os.environ.get("SCD_CACHE", "~/.cache/scd"))
                                                      .expanduser() / "torch_extensions"))
    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                         ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, default)  # single process without a launcher
    import deepspeed

    use_cuda = torch.cuda.is_available() and train.device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    return Placement(rank, world, local, torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu"))


def barrier() -> None:
    """A process-group barrier when one is initialised (no-op otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------------- engine
class Engine:
    """Drives a recipe's micro-batches through backward / step / log / save.

    ``module``: what is trained (one optimiser, one checkpoint); ``dist``: from
    :func:`init_distributed` (default: single process on ``train.device``);
    ``deepspeed``: a DeepSpeed JSON path or None.  The schedule spans ``total_steps``
    unless a recipe calls :meth:`new_schedule` (per-stage resets).
    """

    def __init__(self, module, train: TrainConfig, *, run_dir: Path | None, metrics=None, dist: Placement | None = None,
                 deepspeed: str | None = None, name: str = "train"):
        self.train_cfg, self.run_dir, self.metrics, self.name = train, run_dir, metrics, name
        self.dist = dist or Placement(0, 1, 0, resolve_device(train.device))
        self.device = self.dist.device
        if train.gradient_checkpointing and hasattr(module, "gradient_checkpointing_enable"):
            module.gradient_checkpointing_enable()
        if deepspeed is not None:
            self.backend = DeepSpeedBackend(module, train, self.device, deepspeed, self.dist.world, self.dist.rank)
        else:
            self.backend = TorchBackend(module, train, self.device)
        self.tokens = 0
        self.wall_prior = 0.0  # training seconds of earlier sessions of this run (restored on resume)
        self._t0: float | None = None
        self.new_schedule(train.max_steps)  # fit() re-creates it when it trains another number of steps
        self.step = 0
        self.last_stats: dict[str, float] = {}  # the logged values of the last step trained

    # -- what recipes use
    @property
    def model(self):
        """The callable that runs the trained module's forward (the DeepSpeed engine under DeepSpeed)."""
        return self.backend.model

    @property
    def module(self):
        """The trained module itself (unwrapped)."""
        return self.backend.module

    def autocast(self):
        return autocast(self.train_cfg, self.device)

    def new_schedule(self, total_steps: int, reset_state: bool = False) -> None:
        self.backend.new_schedule(total_steps, reset_state)
        self.schedule_steps = total_steps

    def all_sum(self, x: float) -> float:
        return self.backend.all_sum(x)

    def weights_changed(self) -> None:
        """Call after editing the trained module's weights in place (a recipe's projection
        in ``on_step_end``) so the backend's master copy follows (DeepSpeed ZeRO-2)."""
        self.backend.weights_changed()

    def save(self, step: int, recipe=None) -> None:
        if self.run_dir is not None:
            extra = {"tokens": self.tokens, "wall_s": self.wall_s(),
                     "recipe": recipe.state() if hasattr(recipe, "state") else {}}
            self.backend.save_state(self.run_dir, step, extra)

    def final_module(self, rebuild):
        """The trained module with its full weights on rank 0 (None on other ranks).

        Under ZeRO-3 the weights are gathered (a collective: every rank must call this) and
        loaded into ``rebuild()``, a fresh module of the same architecture.
        """
        if getattr(self.backend, "stage", 0) < 3:
            return self.module if self.dist.rank == 0 else None
        sd = self.backend.full_state_dict()
        if self.dist.rank != 0:
            return None
        module = rebuild()
        module.load_state_dict(sd, strict=False)
        return module.to(self.device)

    def wall_s(self) -> float:
        """Training seconds so far, summed over the sessions of a resumed run (each up to its last checkpoint)."""
        return round(self.wall_prior + (time.time() - self._t0 if self._t0 is not None else 0.0), 2)

    def clear_state(self) -> None:
        if self.run_dir is not None:
            self.backend.clear_state(self.run_dir)

    # -- the loop
    def resume(self, recipe, total_steps: int) -> int:
        """Load the checkpoint if there is one -> the step to start from (0 without one)."""
        if self.schedule_steps != total_steps:
            self.new_schedule(total_steps)
        if self.run_dir is None or not self.backend.has_state(self.run_dir):
            if self.metrics is not None:
                self.metrics.drop_after(-1)  # killed before the first checkpoint: forget rows logged then
            return 0
        if hasattr(recipe, "before_resume"):
            recipe.before_resume(self)  # e.g. the schedule the checkpoint's state belongs to
        step, extra = self.backend.load_state(self.run_dir)
        self.tokens = int(extra.get("tokens", 0))
        self.wall_prior = float(extra.get("wall_s", 0.0))  # 0 for a checkpoint written before wall_s was saved
        if hasattr(recipe, "load_state"):
            recipe.load_state(extra.get("recipe") or {})
        if self.metrics is not None:
            self.metrics.drop_after(step)  # rows after the checkpoint are recomputed (no duplicates)
        print(f"[{self.name}] resumed at step {step}/{total_steps}", flush=True)
        return step

    def accumulate(self, recipe, step: int) -> dict[str, float]:
        """Forward + backward of every micro-batch of optimiser step ``step``; no update.

        Gradients accumulate on the trained module (tests inspect them; :meth:`train_step`
        then steps).  Returns each loss term and stat (global), ``loss`` and ``n_tokens``.
        """
        world = self.dist.world
        micro = recipe.micro_batches(step, world, self.dist.rank)
        n_global = self.backend.all_sum(sum(recipe.count(mb) for mb in micro))
        denom = max(n_global, 1) / world  # DDP/ZeRO average the ranks' gradients: overall sum / n_global
        loss_sums: dict[str, float] = {}
        stat_sums: dict[str, float] = {}
        tokens: int | None = None
        for j, mb in enumerate(micro):
            with self.autocast():
                terms = recipe.loss_terms(mb, denom)
            loss = sum(terms.loss.values())
            self.backend.backward(loss, last=j == len(micro) - 1)
            for k, v in terms.loss.items():
                loss_sums[k] = loss_sums.get(k, 0.0) + float(v.detach())
            for k, v in terms.stats.items():
                stat_sums[k] = stat_sums.get(k, 0.0) + float(v)
            if terms.tokens is not None:
                tokens = (tokens or 0) + int(terms.tokens)
        out = {k: self.backend.all_sum(v) / world for k, v in loss_sums.items()}
        out.update({k: self.backend.all_sum(v) / max(n_global, 1) for k, v in stat_sums.items()})
        out["loss"] = sum(out[k] for k in loss_sums)
        out["n_tokens"] = int(n_global if tokens is None else self.backend.all_sum(tokens))
        return out

    def train_step(self, recipe, step: int) -> dict[str, float]:
        """Forward + backward of every micro-batch of optimiser step ``step``, then the update.

        Returns the logged values: each loss term and stat (global), ``loss``, ``grad_norm``,
        ``n_tokens`` (the global count, or the recipe's ``Terms.tokens``).
        """
        out = self.accumulate(recipe, step)
        for k, v in out.items():
            check_finite(v, step + 1, k)
        out["grad_norm"] = self.backend.step()
        return out

    def fit(self, recipe, total_steps: int) -> dict:
        """Train ``total_steps`` optimiser steps (resuming if a checkpoint exists) -> train stats."""
        tc = self.train_cfg
        start = self.resume(recipe, total_steps)
        self._t0 = time.time()
        bar, stopped = None, None
        if tqdm is not None and self.dist.rank == 0:
            bar = tqdm(total=total_steps, initial=start, desc=self.name, mininterval=5, disable=None)
        for step in range(start, total_steps):
            self.step = step
            if hasattr(recipe, "on_step_start"):
                recipe.on_step_start(self, step)
            stats = self.train_step(recipe, step)
            self.tokens += stats.pop("n_tokens")
            self.last_stats = stats
            done = self.step = step + 1
            if hasattr(recipe, "on_step_end"):
                recipe.on_step_end(self, done)  # e.g. EMA update, projection, a scheduled checkpoint
            # a recipe with stages (distill) saves its own state at each stage start, after the selection
            boundary = recipe.is_boundary(done) if hasattr(recipe, "is_boundary") else False
            stop = bool(recipe.should_stop(done)) if hasattr(recipe, "should_stop") else False
            if self.metrics is not None and (done % tc.log_every == 0 or boundary or done == total_steps or stop):
                extra = recipe.log_extra() if hasattr(recipe, "log_extra") else {}
                self.metrics.log({"step": done, **extra, **stats, "lr": self.backend.lr(), "tokens": self.tokens})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.3f}")
            if tc.save_every and done % tc.save_every == 0 and done < total_steps and not boundary and not stop:
                self.save(done, recipe)
            fault_point("step")
            if boundary:
                fault_point("stage")  # reliability tests: killed between stages
            if stop:
                stopped = done  # early stop: the recipe's should_stop said so
                break
        if bar is not None:
            bar.close()
        steps = total_steps if stopped is None else stopped
        return {"tokens": self.tokens, "steps": steps, "wall_s": self.wall_s(),
                "peak_mem": peak_memory(self.device)}
