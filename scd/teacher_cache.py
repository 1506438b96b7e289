"""Teacher-logit cache, shared by every method, seed and grid that uses the same teacher.

The teacher checkpoints never change, so its outputs at the training set's target
positions are computed once and reused: KD, CD, SCD, SCD+AW (and the AW per-sample
losses, the SCD probe) all read the same cache.  One cache holds, for every target
token of every training example (positions as in ``scd.heads.target_positions``):

* ``k = 64`` (an int): the k most probable tokens' log-probabilities and ids plus the
  log-mass of the rest (``scd.losses.TopKTeacher``; the loss is the bucketed divergence
  of ``scd.losses.topk_divergence``, a lower bound of the full-vocabulary value whose
  gap shrinks with the teacher's tail mass), or
* ``k = "full"``: the full logits (exact: the same loss as a live teacher).

Key and id: ``cache_id = sha256(key)[:16]`` of the key {teacher sha256 (the checkpoint
digest of ``scd.schedule.hash_checkpoint``), data sha256 (token ids + labels of the
encoded examples: covers data, template, tokenizer and truncation), max_len, k, storage
dtype, temperature, vocab, teacher compute dtype, extra}.  Layout under ``root``
(default ``$SCD_CACHE/teacher_logits``, outside every run dir)::

    <root>/<cache_id>/index.json            key, shard list with sha256, counts
    <root>/<cache_id>/shard-00000.safetensors  examples [start, end): logp/idx/tail or logits,
                                               and offsets (targets per example)

Every file is written to a temp name and renamed (the index last), so a crash leaves
no half cache.  Opening verifies the key and each shard's sha256; a stale index (key
mismatch) rebuilds everything, a missing or corrupt shard rebuilds that shard, each
with a warning.  Nothing unverified is ever used.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from scd.core.assets import cache_root
from scd.core.results import atomic_write_json, read_json, sha256_file
from scd.core.train import collate
from scd.heads import target_logits
from scd.losses import TopKTeacher, kl_divergence, teacher_topk

CACHE_VERSION = 1
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
Tensor = torch.Tensor


class CacheError(RuntimeError):
    """A cache that cannot be used (bad arguments, or a rebuild that failed verification)."""


def default_root() -> Path:
    """``$SCD_CACHE/teacher_logits`` (default ``~/.cache/scd/teacher_logits``)."""
    return cache_root() / "teacher_logits"


def data_hash(encoded: Sequence[dict]) -> str:
    """sha256 of the encoded examples' token ids and labels (the same digest as scd.distill.data_hash)."""
    h = hashlib.sha256()
    for e in encoded:
        h.update(json.dumps([list(e["input_ids"]), list(e["labels"])], separators=(",", ":")).encode())
    return h.hexdigest()


def targets_per_example(encoded: Sequence[dict]) -> list[int]:
    """Number of next-token targets of each example (labels[1:] != -100)."""
    return [sum(1 for x in e["labels"][1:] if x != -100) for e in encoded]


@dataclass(frozen=True)
class CacheKey:
    """Everything the cached values depend on."""

    teacher_sha256: str
    data_sha256: str
    max_len: int | None
    k: int | str  # an int, or "full"
    dtype: str = "float32"  # storage dtype of log-probs / logits
    temperature: float = 1.0
    vocab: int | None = None  # logits sliced to the first `vocab` ids (shared tokenizer prefix)
    teacher_dtype: str = "float32"  # dtype the teacher ran in
    extra: str = ""  # anything else the caller wants in the key (e.g. the prompt template name)
    share_prefix: bool = False  # the teacher ran with train.share_prefix (equal to float rounding; its own id)

    def __post_init__(self) -> None:
        if self.k != "full" and not (isinstance(self.k, int) and self.k >= 1):
            raise CacheError(f"teacher cache k must be a positive int or 'full', got {self.k!r}")
        if self.dtype not in STORAGE_DTYPES:
            raise CacheError(f"teacher cache dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.dtype!r}")
        if not self.temperature > 0:
            raise CacheError(f"teacher cache temperature must be > 0, got {self.temperature}")

    def to_dict(self) -> dict:
        return {"version": CACHE_VERSION, "teacher_sha256": self.teacher_sha256, "data_sha256": self.data_sha256,
                "max_len": self.max_len, "k": self.k, "dtype": self.dtype, "temperature": float(self.temperature),
                "vocab": self.vocab, "teacher_dtype": self.teacher_dtype, "extra": self.extra,
                **({"share_prefix": True} if self.share_prefix else {})}  # (omitted when off: ids unchanged)

    @property
    def id(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ compute (teacher forwards)
@torch.no_grad()
def teacher_target_outputs(teacher, items: Sequence[dict], key: CacheKey, pad_id: int, device) -> dict[str, Tensor]:
    """One batch of examples -> the tensors stored for it (on CPU).

    Full: logits [M, V] in the storage dtype.  Top-k: logp [M, k], idx [M, k] int32,
    tail [M] float32 (log-mass of the rest).  M = the batch's target tokens, row-major.
    """
    batch = {n: t.to(device) for n, t in collate(list(items), pad_id).items()}
    logits = target_logits(teacher, batch, key.share_prefix)  # [M, Vt]
    if key.vocab is not None:
        logits = logits[..., :key.vocab]
    store = STORAGE_DTYPES[key.dtype]
    if key.k == "full":
        return {"logits": logits.to(store).cpu()}
    k = min(int(key.k), logits.shape[-1])
    t = teacher_topk(logits, k, key.temperature)
    return {"logp": t.logp.to(store).cpu(), "idx": t.idx.to(torch.int32).cpu(), "tail": t.tail_logmass.float().cpu()}


def compute_shard(teacher, items: Sequence[dict], key: CacheKey, pad_id: int, device, batch_size: int) -> dict:
    """All stored tensors of one shard (examples ``items``), plus ``offsets`` [n+1] int64."""
    parts: list[dict[str, Tensor]] = []
    for s in range(0, len(items), batch_size):
        parts.append(teacher_target_outputs(teacher, items[s:s + batch_size], key, pad_id, device))
    out = {name: torch.cat([p[name] for p in parts]).contiguous() for name in parts[0]}
    counts = torch.tensor([0] + targets_per_example(items), dtype=torch.int64)
    out["offsets"] = counts.cumsum(0)
    n_rows = out["logits" if key.k == "full" else "logp"].shape[0]
    if int(out["offsets"][-1]) != n_rows:
        raise CacheError("teacher target count does not match the examples' labels (collate order changed?)")
    return out


def _write_shard(path: Path, tensors: dict[str, Tensor], key: CacheKey) -> str:
    """Atomic safetensors write; returns the file's sha256."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"cache_id": key.id})
    os.replace(tmp, path)
    return sha256_file(path)


# ------------------------------------------------------------------ the cache
class TeacherLogitCache:
    """A verified, loaded cache: ``targets(example_indices)`` gives the teacher side of the loss."""

    def __init__(self, path: Path, key: CacheKey, tensors: dict[str, Tensor], offsets: Tensor,
                 built_shards: int, teacher_forwards: int):
        self.path, self.key, self._t, self._offsets = Path(path), key, tensors, offsets  # offsets [n_ex + 1]
        self.built_shards, self.teacher_forwards = built_shards, teacher_forwards

    @property
    def id(self) -> str:
        return self.key.id

    @property
    def k(self) -> int | str:
        return self.key.k

    @property
    def n_examples(self) -> int:
        return self._offsets.shape[0] - 1

    @property
    def n_targets(self) -> int:
        return int(self._offsets[-1])

    def rows(self, example_indices: Sequence[int]) -> Tensor:
        """Cache rows [M] of the targets of these examples, in collate (row-major) order."""
        idx = [int(i) for i in example_indices]
        bad = [i for i in idx if not 0 <= i < self.n_examples]
        if bad:
            raise IndexError(f"teacher cache {self.id} has {self.n_examples} examples; asked for {bad[:5]}")
        spans = [torch.arange(int(self._offsets[i]), int(self._offsets[i + 1])) for i in idx]
        return torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)

    def targets(self, example_indices: Sequence[int], device=None) -> TopKTeacher | Tensor:
        """Teacher targets at the target positions of these examples (collate order).

        k = "full": logits [M, V] (pass as the teacher of ``fused_kd_ce``); else a
        ``TopKTeacher`` with log-probs upcast to float32.
        """
        r = self.rows(example_indices)
        if self.key.k == "full":
            out = self._t["logits"][r]
            return out if device is None else out.to(device)
        t = TopKTeacher(self._t["logp"][r].float(), self._t["idx"][r].long(), self._t["tail"][r],
                        float(self.key.temperature))
        return t if device is None else t.to(device)

    def record(self) -> dict:
        """What a run.json records about the cache."""
        return {"id": self.id, "k": self.key.k, "dtype": self.key.dtype, "path": str(self.path),
                "n_examples": self.n_examples, "n_targets": self.n_targets, "built_shards": self.built_shards,
                "teacher_sha256": self.key.teacher_sha256, "data_sha256": self.key.data_sha256}

    # -------------------------------------------------------------- open / build
    @classmethod
    def open_or_build(cls, root: str | os.PathLike | None, teacher, teacher_sha: str, encoded: Sequence[dict], *,
                      k: int | str = 64, max_len: int | None = None, dtype: str = "float32",
                      temperature: float = 1.0, vocab: int | None = None, pad_id: int = 0, batch_size: int = 16,
                      device=None, shard_examples: int = 1024, extra: str = "",
                      teacher_dtype: str | None = None, share_prefix: bool = False) -> "TeacherLogitCache":
        """Open the cache of (teacher, encoded examples, k, ...) under ``root``, building what
        is missing, stale or corrupt (with a warning) by running ``teacher`` once over it.

        ``teacher`` may be None when the cache is known to be complete (an incomplete one
        then raises; ``teacher_dtype`` then names the dtype it ran in, default float32).
        ``device`` defaults to the teacher's.
        """
        if not encoded:
            raise CacheError("teacher cache: no examples")
        if teacher_dtype is None:
            teacher_dtype = "float32" if teacher is None else str(next(teacher.parameters()).dtype)
        teacher_dtype = teacher_dtype.replace("torch.", "")
        key = CacheKey(teacher_sha, data_hash(encoded), max_len, k, dtype, float(temperature), vocab, teacher_dtype,
                       extra, share_prefix)
        path = Path(root if root is not None else default_root()) / key.id
        plan = _plan_shards(len(encoded), shard_examples)
        good = _verified_shards(path, key, plan)
        todo = [i for i in range(len(plan)) if i not in good]
        forwards = 0
        if todo:
            if teacher is None:
                raise CacheError(f"teacher cache {key.id} under {path.parent} is incomplete and no teacher was given")
            device = device if device is not None else next(teacher.parameters()).device
            path.mkdir(parents=True, exist_ok=True)
            was_training = teacher.training
            teacher.eval()
            for i in todo:
                s, e = plan[i]
                tensors = compute_shard(teacher, encoded[s:e], key, pad_id, device, batch_size)
                good[i] = {"file": _shard_name(i), "start": s, "end": e, "n_targets": int(tensors["offsets"][-1]),
                           "sha256": _write_shard(path / _shard_name(i), tensors, key)}
                forwards += math.ceil((e - s) / batch_size)
            teacher.train(was_training)
            _write_index(path, key, [good[i] for i in range(len(plan))], len(encoded))
        return cls._load(path, key, [good[i] for i in range(len(plan))], len(todo), forwards)

    @classmethod
    def _load(cls, path: Path, key: CacheKey, shards: list[dict], built: int, forwards: int) -> "TeacherLogitCache":
        parts, offsets, base = [], [torch.zeros(1, dtype=torch.int64)], 0
        for sh in shards:
            t = load_file(str(path / sh["file"]))
            offsets.append(t.pop("offsets")[1:] + base)
            base += sh["n_targets"]
            parts.append(t)
        tensors = {n: torch.cat([p[n] for p in parts]) for n in parts[0]}
        return cls(path, key, tensors, torch.cat(offsets), built, forwards)


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _plan_shards(n: int, per_shard: int) -> list[tuple[int, int]]:
    if per_shard < 1:
        raise CacheError(f"shard_examples must be >= 1, got {per_shard}")
    return [(s, min(s + per_shard, n)) for s in range(0, n, per_shard)]


def _write_index(path: Path, key: CacheKey, shards: list[dict], n_examples: int) -> None:
    atomic_write_json(path / "index.json", {"version": CACHE_VERSION, "id": key.id, "key": key.to_dict(),
                                            "n_examples": n_examples, "shards": shards})


def _verified_shards(path: Path, key: CacheKey, plan: list[tuple[int, int]]) -> dict[int, dict]:
    """{shard number: index entry} of the shards that can be used as they are; warns about the rest."""
    index_path = path / "index.json"
    if not index_path.exists():
        return {}
    try:
        index = read_json(index_path)
        stored_key, shards = index["key"], index["shards"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"teacher cache {path}: unreadable index ({e}); rebuilding", stacklevel=3)
        return {}
    if stored_key != key.to_dict():
        diff = sorted(n for n in set(stored_key) | set(key.to_dict()) if stored_key.get(n) != key.to_dict().get(n))
        warnings.warn(f"teacher cache {path}: stale (key differs in {', '.join(diff)}); rebuilding", stacklevel=3)
        return {}
    good = {}
    for i, (s, e) in enumerate(plan):
        entry = next((sh for sh in shards if sh.get("file") == _shard_name(i)), None)
        f = path / _shard_name(i)
        if entry is None or (entry.get("start"), entry.get("end")) != (s, e):
            warnings.warn(f"teacher cache {path}: shard {i} missing from the index; rebuilding it", stacklevel=3)
        elif not f.exists():
            warnings.warn(f"teacher cache {path}: {f.name} is missing; rebuilding it", stacklevel=3)
        elif sha256_file(f) != entry.get("sha256"):
            warnings.warn(f"teacher cache {path}: {f.name} is corrupt (sha256 mismatch); rebuilding it", stacklevel=3)
        else:
            good[i] = entry
    return good


# ------------------------------------------------------------------ gap to the live teacher
def _uniform_tail_logprobs(t: TopKTeacher, vocab: int) -> Tensor:
    """[M, V] full-vocabulary log-probs of a top-k cache, the tail mass spread evenly over the other ids."""
    rest = max(vocab - t.k, 1)
    out = (t.tail_logmass.float() - math.log(rest)).unsqueeze(-1).expand(-1, vocab).clone()
    return out.scatter(-1, t.idx.long(), t.logp.float())


@torch.no_grad()
def measure_gap(cache: TeacherLogitCache, live_teacher, probe_encoded: Sequence[dict], *,
                example_indices: Sequence[int] | None = None, pad_id: int = 0, batch_size: int = 16,
                device=None) -> float:
    """Mean over target tokens of KL(live teacher || cached teacher), for run.json.

    ``example_indices`` given: ``probe_encoded[j]`` is cached example ``example_indices[j]``
    and its stored targets are compared (catches a stale or mis-keyed cache as well as the
    top-k truncation).  Otherwise the live logits are compressed with the cache's settings.
    A top-k target is read as a full distribution with its tail mass spread evenly over
    the other ids.  0 for k = "full" against the same teacher.
    """
    device = device if device is not None else next(live_teacher.parameters()).device
    total, n = 0.0, 0
    for s in range(0, len(probe_encoded), batch_size):
        items = probe_encoded[s:s + batch_size]
        batch = {k: v.to(device) for k, v in collate(list(items), pad_id).items()}
        live = target_logits(live_teacher, batch).float()  # [M, Vt]
        if cache.key.vocab is not None:
            live = live[..., :cache.key.vocab]
        if example_indices is not None:
            cached = cache.targets(list(example_indices)[s:s + batch_size], device=device)
        elif cache.key.k == "full":
            cached = live.to(STORAGE_DTYPES[cache.key.dtype])
        else:
            cached = teacher_topk(live, min(int(cache.key.k), live.shape[-1]), cache.key.temperature)
            cached = TopKTeacher(cached.logp.to(STORAGE_DTYPES[cache.key.dtype]).float(), cached.idx,
                                 cached.tail_logmass, cached.temperature)
        tau = cache.key.temperature
        q = cached.float() / tau if isinstance(cached, Tensor) else _uniform_tail_logprobs(cached, live.shape[-1])
        total += float(kl_divergence(live / tau, q).sum())
        n += live.shape[0]
    return total / max(n, 1)
