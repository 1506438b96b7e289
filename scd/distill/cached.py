"""The distillation recipe's teacher-logit cache (``teacher.cache: {k: 64}``; ``k: full`` is exact).

For each teacher checkpoint a stage selects, the teacher's outputs at the training set's
target positions come from ``scd.teacher_cache`` under a shared root (default
``$SCD_CACHE/teacher_logits``): built once (one teacher pass over the training set) and
reused by every method, seed and grid with the same checkpoint sha256, data hash, max_len,
k, storage dtype and vocab.  The same root holds what else the recipe asks of a teacher
checkpoint, so a second run loads no teacher at all:

* scd_select's probe log-probs (a ``k: full`` cache of the probe set, exact);
* AW's per-sample teacher losses (``per_sample_ce/``, keyed by checkpoint and data hash);
* the KL gap between cached and live targets on the probe (``gap-<probe hash>.json`` in the
  cache's directory; measured once with ``measure_gap``; 0 for ``k: full``).

Distributed: rank 0 builds, the other ranks wait at a barrier and then open the verified cache.
"""
from __future__ import annotations

from pathlib import Path

import torch

from scd.core.engine import barrier
from scd.core.results import atomic_write_json, read_json
from scd.distill.teacher_slot import TeacherSlot, data_hash, rank0_cached
from scd.teacher import per_sample_ce
from scd.teacher_cache import CacheError, TeacherLogitCache, default_root, measure_gap, targets_per_example


class CachedTeacher:
    """Opens (building when missing, stale or corrupt) the caches of the checkpoints in ``slot``'s
    manifest; the slot loads a checkpoint only when something has to be computed."""

    def __init__(self, cfg, slot: TeacherSlot, encoded: list[dict], tok, vocab: int, device, rank: int,
                 probe: list[dict]):
        cc = cfg.teacher.cache
        self.cfg, self.slot, self.encoded, self.device, self.rank, self.probe = cfg, slot, encoded, device, rank, probe
        self.root = Path(cc.root).expanduser() if cc.root else default_root()
        self.key = dict(k=cc.k, max_len=cfg.train.max_len, dtype=cc.dtype, vocab=vocab, pad_id=tok.pad_token_id,
                        temperature=1.0 if cc.k == "full" else cfg.loss.temperature,
                        batch_size=2 * cfg.train.batch_size, teacher_dtype=cfg.teacher.dtype, device=device,
                        share_prefix=cfg.train.share_prefix)
        self.probe_hash = data_hash(probe)
        self.records: dict[int, dict] = {}  # checkpoint -> run.json record of its cache
        self.forwards = 0  # teacher forwards over the training set by this process (cache builds)

    def _open(self, choice: int, encoded: list[dict], **key) -> TeacherLogitCache:
        """Rank 0 opens or builds (loading the checkpoint only to build); then every other rank opens."""
        sha = self.slot.manifest[choice].sha256
        cache = None
        if self.rank == 0:
            try:
                cache = TeacherLogitCache.open_or_build(self.root, None, sha, encoded, **key)
            except CacheError:  # missing, stale or corrupt shards: the teacher computes them
                self.slot.ensure(choice)
                cache = TeacherLogitCache.open_or_build(self.root, self.slot.model, sha, encoded, **key)
        barrier()
        return cache or TeacherLogitCache.open_or_build(self.root, None, sha, encoded, **key)

    def open(self, choice: int) -> TeacherLogitCache:
        """The training-set cache of checkpoint ``choice`` (recorded, with its probe gap on rank 0)."""
        cache = self._open(choice, self.encoded, **self.key)
        self.forwards += cache.teacher_forwards
        rec = {**cache.record(), "checkpoint": choice, "teacher_forwards": cache.teacher_forwards}
        if self.rank == 0:
            rec["gap_kl_probe"] = self.gap(choice, cache)
        self.records[choice] = rec
        return cache

    def gap(self, choice: int, cache: TeacherLogitCache) -> float:
        """Mean KL(live || cached) over the probe's target tokens, measured once per (cache, probe)."""
        path = cache.path / f"gap-{self.probe_hash[:16]}.json"
        if path.exists():
            return float(read_json(path)["kl"])
        self.slot.ensure(choice)
        kl = measure_gap(cache, self.slot.model, self.probe, pad_id=self.key["pad_id"],
                         batch_size=self.cfg.probe.batch_size, device=self.device)
        atomic_write_json(path, {"kl": kl, "probe_sha256": self.probe_hash, "n_probe": len(self.probe)})
        return kl

    def probe_logprobs(self, choice: int, probe: list[dict], batch_size: int) -> list[torch.Tensor]:
        """Checkpoint ``choice``'s log-probs at the probe's targets, [[N_b, vocab]] per batch of
        ``batch_size`` examples (as ``scd.distill.probe.probe_logprobs``), from an exact cache."""
        cache = self._open(choice, probe, **{**self.key, "k": "full", "dtype": "float32", "temperature": 1.0})
        lp = torch.log_softmax(cache.targets(range(len(probe))).float(), -1)  # [M, vocab]
        counts = [sum(targets_per_example(probe[s:s + batch_size])) for s in range(0, len(probe), batch_size)]
        return list(torch.split(lp, counts))

    def per_sample_ce(self, choice: int, dhash: str) -> torch.Tensor:
        """AW: checkpoint ``choice``'s per-example CE [N_train], stored once under the shared root."""
        def compute():
            self.slot.ensure(choice)
            return per_sample_ce(self.slot.model, self.encoded, self.key["pad_id"], self.key["batch_size"],
                                 self.device)[0]

        return rank0_cached(self.root / "per_sample_ce", self.slot.manifest[choice].sha256, dhash, compute,
                            self.rank)

    def record(self) -> dict:
        """run.json's ``train.teacher_cache``."""
        return {"k": self.key["k"], "root": str(self.root), "caches": list(self.records.values()),
                "teacher_forwards_train": self.forwards}
