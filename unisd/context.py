"""The step context shared by the recipe and the components, and the forward helpers.

Layout of a forward over completions (student and every teacher pass)::

    [ pad pad p0 p1 p2 | c0 c1 c2 pad ]      prompt left-padded to P, completion right-padded to L
    positions = cumsum(attention_mask) - 1    (padding does not shift positions)
    logits at positions P-1 .. P+L-2 predict c0 .. c_{L-1}   -> [B, L, V]

Only ``L + 1`` positions of logits are materialised (``logits_to_keep``), so long
teacher prompts (reference answer, few-shot demonstrations) cost no [P, V] buffer.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
from collections import defaultdict
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from scd.data.prompts import render_prompt
from scd.heads import prefix_cache
from scd.tokens import encode, right_pad, stop_token_ids
from unisd.reduction import sequence_mean
from unisd.sampling import sample_completions, shared_prefix_len, suffix_inputs


@dataclasses.dataclass
class ForwardOut:
    logits: torch.Tensor  # [B, L, V] at the completion positions
    hidden_states: tuple | None = None  # per layer [B, L, H] (hidden_states[0] = embeddings)


@dataclasses.dataclass
class Batch:
    """One micro-batch.  ``completion_*`` are set by the teacher provider."""

    examples: list[dict]
    indices: list[int]  # positions of the examples in ctx.examples
    prompt_ids: list[list[int]]  # student prompts, token ids
    completion_ids: torch.Tensor | None = None  # [B, L]
    completion_mask: torch.Tensor | None = None  # [B, L] 1 on completion tokens
    loss_mask: torch.Tensor | None = None  # [B, L] completion tokens that enter the loss
    on_policy: bool = True  # completions sampled from the student (False: the reference answers)


def completion_forward(model, prompt_ids: Sequence[Sequence[int]], completion_ids: torch.Tensor,
                       completion_mask: torch.Tensor, pad_id: int, *, hidden: bool = False,
                       share_prefix: bool = False) -> ForwardOut:
    """Logits (and hidden states) of ``model`` at the completion positions (see module doc).

    ``share_prefix``: the prompts' common prefix (S tokens, :func:`unisd.sampling.shared_prefix_len`,
    e.g. the system prompt, instruction and few-shot demonstrations) runs once, batch 1, and its KV
    cache is repeated over the batch; the rest runs as ``[S prefix (cached)][pad .. own prompt][completion
    pad]`` with positions ``cumsum(mask) - 1`` as above.  Same logits and gradients (the prefix's
    gradient is the sum over the batch); with dropout, the prefix draws one mask for the whole batch."""
    device = completion_ids.device
    n_shared = shared_prefix_len(prompt_ids) if share_prefix else 0
    p_ids, p_mask = suffix_inputs(prompt_ids, n_shared, pad_id)  # = left_pad(prompt_ids) when n_shared = 0
    P, L = p_ids.shape[1], completion_ids.shape[1]
    ids = torch.cat([p_ids.to(device), completion_ids], dim=1)  # [B, P+L]
    mask = torch.cat([torch.ones(len(prompt_ids), n_shared, dtype=torch.long, device=device), p_mask.to(device),
                      completion_mask.to(torch.long)], dim=1)  # [B, S+P+L]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, n_shared:]
    cache = prefix_cache(model, prompt_ids[0][:n_shared], len(prompt_ids), device) if n_shared else None
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=L + 1,
                output_hidden_states=hidden, past_key_values=cache, use_cache=cache is not None)
    logits = out.logits[:, :-1]  # [B, L, V]: positions P-1 .. P+L-2
    hs = tuple(h[:, P - 1:P - 1 + L] for h in out.hidden_states) if hidden else None
    return ForwardOut(logits=logits, hidden_states=hs)


def token_logps(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[ids].  [B, L, V], [B, L] -> [B, L] (float32; float64 stays float64)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        z = z / temperature
    return torch.gather(F.log_softmax(z, dim=-1), -1, ids.unsqueeze(-1)).squeeze(-1)


def frozen_copy(model):
    """A deep copy in eval mode with every parameter frozen (the teacher)."""
    teacher = copy.deepcopy(model)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any values (sha256; independent of PYTHONHASHSEED)."""
    h = hashlib.sha256("\x00".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class Context:
    """Everything a hook may read or change during training.

    Fixed for the run: ``model`` (student), ``tokenizer``, ``examples`` (training
    records), ``device``, ``seed``, ``needs``, ``teacher`` (frozen/EMA copy when a
    component needs ``teacher_model``), ``autocast`` (a context-manager factory).
    Per optimiser step: ``step`` (steps done before this one), ``n_seq_total``.
    Per micro-batch: ``micro``, ``batch``, ``student`` (ForwardOut), ``per_token``
    (the divergence l_t [B, L]), ``token_weights`` [B, L] and ``sequence_weights`` [B]
    (None = 1), and ``log(key, value)`` for diagnostics (averaged over micro-batches).
    """

    def __init__(self, *, model, tokenizer, examples: list[dict], device, seed: int, needs: set[str],
                 max_prompt_len: int = 512, autocast=None, config: Any = None, shots: dict | None = None,
                 share_prefix: bool = False):
        self.model, self.tokenizer, self.examples = model, tokenizer, examples
        self.device, self.seed, self.needs = device, seed, set(needs)
        self.max_prompt_len = max_prompt_len
        self.autocast = autocast or contextlib.nullcontext
        self.config = config
        self.shots = dict(shots or {})  # task -> few-shot demonstrations of the training prompts
        self.share_prefix = share_prefix  # run the prompts' common prefix once per batch (completion_forward)
        self.teacher = None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.step = 0
        self.micro = 0
        self.n_seq_total = 1
        self.batch: Batch | None = None
        self.student: ForwardOut | None = None
        self.per_token: torch.Tensor | None = None
        self.token_weights: torch.Tensor | None = None
        self.sequence_weights: torch.Tensor | None = None
        self.stats: dict[str, list[float]] = defaultdict(list)
        self.teacher_passes = 0
        self._cache: dict = {}
        self._stop_ids: list[int] | None = None

    # ------------------------------------------------------------------ text -> ids
    def encode(self, texts: Sequence[str], max_len: int | None = None) -> list[list[int]]:
        """Prompt texts -> token ids, left-truncated to ``max_len`` (default max_prompt_len)."""
        n = max_len or self.max_prompt_len
        out = []
        for t in texts:
            ids = encode(self.tokenizer, t)
            out.append(ids[-n:] if len(ids) > n else ids)
        return out

    def encode_target(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ batches
    def shots_for(self, example: dict) -> tuple:
        return tuple(self.shots.get(example.get("task"), ()))

    def begin_micro(self, micro: int, indices: list[int]) -> None:
        self.micro = micro
        exs = [self.examples[i] for i in indices]
        texts = [render_prompt(ex, self.tokenizer, shots=self.shots_for(ex)) for ex in exs]
        self.batch = Batch(examples=exs, indices=list(indices), prompt_ids=self.encode(texts))
        self.student = self.per_token = self.token_weights = self.sequence_weights = None
        self._cache = {}

    def set_completions(self, completions: Sequence[Sequence[int]], *, skip_first: int = 0,
                        on_policy: bool = True) -> None:
        """Token id lists -> batch.completion_ids/mask and the loss mask (first ``skip_first`` masked)."""
        ids, mask = right_pad(completions, self.pad_id)
        loss_mask = mask.clone()
        if skip_first > 0:
            loss_mask[:, :skip_first] = 0
        b = self.batch
        b.completion_ids, b.completion_mask = ids.to(self.device), mask.to(self.device)
        b.loss_mask, b.on_policy = loss_mask.to(self.device), on_policy

    def sample_seed(self, *tag: Any) -> int:
        return stable_seed(self.seed, self.step, self.micro, *tag)

    def sample_completions(self, *, temperature: float, max_new_tokens: int, batch_size: int = 16) -> list[list[int]]:
        return sample_completions(self.model, self.batch.prompt_ids, max_new_tokens=max_new_tokens,
                                  temperature=temperature, seed=self.sample_seed("sample"), pad_id=self.pad_id,
                                  stop_ids=self.stop_ids(), batch_size=batch_size, share_prefix=self.share_prefix)

    def stop_ids(self) -> list[int]:
        if self._stop_ids is None:
            self._stop_ids = stop_token_ids(self.tokenizer)
        return self._stop_ids

    # ------------------------------------------------------------------ forwards
    def forward(self, model, prompt_ids, *, hidden: bool = False) -> ForwardOut:
        b = self.batch
        with self.autocast():
            return completion_forward(model, prompt_ids, b.completion_ids, b.completion_mask, self.pad_id,
                                      hidden=hidden, share_prefix=self.share_prefix)

    def teacher_forward(self, prompt_ids, *, hidden: bool = False, model=None) -> ForwardOut:
        """A no-grad forward of the teacher (default ``ctx.teacher``) over the batch's completions."""
        m = model if model is not None else self.teacher
        if m is None:
            raise RuntimeError("no teacher model: a component must declare needs={'teacher_model'}")
        self.teacher_passes += 1
        with torch.no_grad():
            return self.forward(m, prompt_ids, hidden=hidden)

    def teacher_token_logps(self, prompt_ids, temperature: float = 1.0) -> torch.Tensor:
        """log p_T(y_t | teacher prompt, y_<t) of the completion tokens.  -> [B, L]."""
        out = self.teacher_forward(prompt_ids)
        return token_logps(out.logits, self.batch.completion_ids, temperature)

    def student_token_logps(self, temperature: float = 1.0) -> torch.Tensor:
        """log p_S(y_t) of the completion tokens, with gradient (cached per temperature).  -> [B, L]."""
        key = ("student_logps", float(temperature))
        if key not in self._cache:
            self._cache[key] = token_logps(self.student.logits, self.batch.completion_ids, temperature)
        return self._cache[key]

    # ------------------------------------------------------------------ reductions / logging
    def seq_mean(self, per_token: torch.Tensor, weights: torch.Tensor | None = None,
                 sequence_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over the accumulated batch's sequences of the per-sequence (weighted) token mean."""
        return sequence_mean(per_token, self.batch.loss_mask, weights, self.n_seq_total, sequence_weights)

    def log(self, key: str, value: float) -> None:
        v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        self.stats[key].append(v)

    def pop_stats(self) -> dict[str, float]:
        out = {k: sum(v) / len(v) for k, v in self.stats.items() if v}
        self.stats.clear()
        return out
