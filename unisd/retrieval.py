"""Sentence embeddings with the packaged all-MiniLM-L6-v2 encoder, and nearest neighbours.

The encoder is loaded with ``transformers.AutoModel`` from ``<cache>/raw/minilm/model``
(the sentence-transformers folder) and pooled as sentence-transformers does for this
model (``1_Pooling/config.json``: mean over non-padding tokens, then L2
normalisation, ``2_Normalize``).  Embeddings are cached on disk under
``<cache>/embeddings/<sha256 of the texts>.pt`` so every run of a grid reuses them.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModel, AutoTokenizer

from scd.core.assets import cache_root, raw_dir, require
from scd.core.results import atomic_write_bytes


def mean_pool(last_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over unmasked tokens.  [B, T, H], [B, T] -> [B, H]."""
    m = mask.to(last_hidden.dtype).unsqueeze(-1)  # [B, T, 1]
    return (last_hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def default_encoder_path() -> Path:
    return require(raw_dir("minilm") / "model", "the MiniLM sentence encoder (run `make assets`)")


@torch.no_grad()
def encode_texts(texts: Sequence[str], path: str | Path | None = None, *, batch_size: int = 64,
                 max_length: int = 256, cache: bool = True, device=None) -> torch.Tensor:
    """L2-normalised sentence embeddings.  N texts -> [N, 384] float32 (CPU)."""
    path = Path(path) if path is not None else default_encoder_path()
    key = hashlib.sha256(("\x00".join([str(path.name), str(max_length), *texts])).encode("utf-8")).hexdigest()[:24]
    cache_file = cache_root() / "embeddings" / f"minilm-{key}.pt"
    if cache and cache_file.exists():
        emb = torch.load(cache_file, weights_only=True)
        if emb.shape[0] == len(texts):
            return emb
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path), use_safetensors=True).eval().to(device or "cpu")
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tok(list(texts[start:start + batch_size]), padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        enc = {k: v.to(model.device) for k, v in enc.items()}
        hidden = model(**enc).last_hidden_state.float()  # [b, T, H]
        out.append(torch.nn.functional.normalize(mean_pool(hidden, enc["attention_mask"]), dim=-1).cpu())
    emb = torch.cat(out) if out else torch.zeros((0, model.config.hidden_size))
    if cache:
        buf = io.BytesIO()
        torch.save(emb, buf)
        atomic_write_bytes(cache_file, buf.getvalue())
    return emb


def nearest(emb: torch.Tensor, k: int, groups: Sequence | None = None) -> list[list[int]]:
    """For each row, the indices of the k most cosine-similar OTHER rows of the same group.

    emb [N, D] L2-normalised.  Fewer than k when the group is smaller than k + 1.
    Ties break towards the lower index.  Memory: one [n_g, n_g] matrix per group.
    """
    n = emb.shape[0]
    g = list(groups) if groups is not None else [0] * n
    members: dict = {}
    for i, key in enumerate(g):
        members.setdefault(key, []).append(i)
    out: list[list[int]] = [[] for _ in range(n)]
    for idx in members.values():
        sub = emb[idx] @ emb[idx].T  # [n_g, n_g]
        sub.fill_diagonal_(float("-inf"))
        order = torch.sort(-sub, dim=1, stable=True).indices[:, :min(k, len(idx) - 1)]  # [n_g, k]
        for r, i in enumerate(idx):
            out[i] = [idx[c] for c in order[r].tolist()]
    return out
