"""The resident teacher and the runs the distillation recipe depends on.

* :class:`TeacherSlot`: one teacher module; later checkpoints are copied into its
  existing tensors (:func:`load_weights_in_place`), every load timed.
* :func:`find_manifest` / :func:`anchor_model_dir`: where a teacher run's checkpoints and
  an SFT anchor's weights are.
* :func:`ensure_dependency` (from ``scd.core.dependencies``): a teacher / anchor run named by a config,
  trained once.
* :func:`cached_per_sample_ce`: AW's per-sample losses, cached per (model, data) hash.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from scd.core.dependencies import ensure_dependency  # noqa: F401  (re-exported: scd.distill.ensure_dependency)
from scd.core.engine import barrier
from scd.core.results import read_json
from scd.models import torch_dtype
from scd.schedule import hash_checkpoint
from scd.teacher import per_sample_ce

def load_weights_in_place(model, ckpt_dir: str | os.PathLike) -> None:
    """Copy a checkpoint's safetensors into ``model``'s existing tensors (no new module).

    One tensor at a time, so peak extra memory is one tensor; dtype is converted to
    the model's.  Every parameter must be covered, except tied weights (shared storage).
    """
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
        t0 = time.perf_counter()
        path = self.manifest.resolve(index)
        in_place = self.model is not None
        if in_place:
            load_weights_in_place(self.model, path)
        else:
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


def data_hash(encoded: list[dict]) -> str:
    """sha256 of the tokenised examples (covers data, prompts, tokenizer and max_len)."""
    h = hashlib.sha256()
    for e in encoded:
        h.update(json.dumps([e["input_ids"], e["labels"]], separators=(",", ":")).encode())
    return h.hexdigest()


def cached_per_sample_ce(cache_dir: Path, model_sha: str, dhash: str, compute) -> torch.Tensor:
    """Per-sample CE [N] from ``cache_dir/ce-<model sha>-<data hash>.safetensors``, or
    ``compute()`` once and cache it (atomic write)."""
    path = Path(cache_dir) / f"ce-{model_sha[:16]}-{dhash[:16]}.safetensors"
    if path.exists():
        return load_file(str(path))["loss"]
    losses = compute().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({"loss": losses}, str(tmp), metadata={"model_sha256": model_sha, "data_sha256": dhash})
    os.replace(tmp, path)
    return losses


def rank0_cached(cache_dir: Path, sha: str, dhash: str, compute, rank: int):
    """cached_per_sample_ce computed by rank 0; other ranks wait at a barrier, then read the file."""
    out = cached_per_sample_ce(cache_dir, sha, dhash, compute) if rank == 0 else None
    barrier()
    if out is None:
        out = cached_per_sample_ce(cache_dir, sha, dhash, compute)
    return out


def anchor_losses(anchor_dir: Path, encoded: list[dict], pad_id: int, batch_size: int, dtype: str, device,
                  cache_dir: Path, dhash: str, rank: int):
    """AW: the student anchor's per-sample CE [N_train], computed once (rank 0) and cached."""
    def compute():
        m = AutoModelForCausalLM.from_pretrained(str(anchor_dir), dtype=torch_dtype(dtype),
                                                 use_safetensors=True).to(device)
        losses = per_sample_ce(m, encoded, pad_id, batch_size, device)[0]
        del m
        return losses

    return rank0_cached(cache_dir, hash_checkpoint(anchor_dir)[0], dhash, compute, rank)
