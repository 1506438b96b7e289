"""Completion-only fused loss: the student's lm-head applied only at target positions,
fused with the KD divergence and the hard-label CE over chunks of tokens.

Layer: same as ``scd.losses`` (pure math on tensors; :func:`completion_terms` runs a model's
backbone through ``scd.heads``), kept in its own file so ``scd/losses.py`` stays under the
600-line limit.  The hidden states come from
``scd.heads`` (``target_hidden``); the teacher is live (logits or hidden states + its
head) or cached (``scd.losses.TopKTeacher``, see ``scd.teacher_cache``).

One head matmul per chunk serves both terms; only ``[chunk_size, V]`` logits exist at a
time; the backward recomputes each chunk.  ``chunked_divergence`` is the KD-only form (any
leading shape, a strict vocabulary check).  Numerics: see ``fused_kd_ce``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from scd.heads import fusable_head, head_module, target_hidden, target_labels
from scd.losses import TopKTeacher, ce_per_token, per_token_divergence, resolve_divergence, topk_divergence

Tensor = torch.Tensor


def _compute_dtype(*xs: Tensor) -> torch.dtype:
    """float32 for half inputs, float64 if any input is float64 (as in scd.losses)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _linear(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return F.linear(h, w, b)


def _kd_chunk(student_logits: Tensor, teacher: Tensor | TopKTeacher, name: str, temperature: float,
              scale_by_t2: bool, params: dict) -> Tensor:
    """[c, V] student logits vs a teacher chunk (logits [c, V] or TopKTeacher) -> [c]."""
    if isinstance(teacher, TopKTeacher):
        return topk_divergence(name, student_logits, teacher, temperature, scale_by_t2=scale_by_t2, **params)
    return per_token_divergence(name, student_logits, teacher, temperature, scale_by_t2=scale_by_t2, **params)


class _KdCeSpec:
    """Per chunk of target tokens: student logits [c, V] -> [c, 2] = (kd, ce) in >= fp32.

    ``teacher`` is None (CE only), logits [N, Vt], hidden states [N, Ht] (with
    ``teacher_weight``) or a TopKTeacher; ``labels`` [N] or None (KD only).  KD compares
    the first ``vocab`` logits of both (shared tokenizer ids); CE uses the whole head.
    """

    def __init__(self, teacher, teacher_weight, teacher_bias, labels, vocab, name, params, temperature,
                 scale_by_t2, chunk_size):
        self.teacher, self.teacher_weight, self.teacher_bias = teacher, teacher_weight, teacher_bias
        self.labels, self.vocab, self.name, self.params = labels, vocab, name, params
        self.temperature, self.scale_by_t2, self.chunk_size = temperature, scale_by_t2, chunk_size
        self.keep = False  # keep each chunk's logits from the forward for the backward (no recompute)
        self.kept: dict[int, tuple[Tensor, Any]] = {}  # chunk start -> (student logits, teacher chunk)

    def teacher_chunk(self, sl: slice):
        if sl.start in self.kept:
            return self.kept[sl.start][1]
        if isinstance(self.teacher, TopKTeacher):
            return self.teacher[sl]
        with torch.no_grad():
            t = self.teacher[sl]
            if self.teacher_weight is not None:
                t = _linear(t, self.teacher_weight, self.teacher_bias)  # [c, Vt]
            return t[..., :self.vocab].detach()

    def terms(self, z: Tensor, sl: slice) -> Tensor:
        dt = _compute_dtype(z)
        zero = torch.zeros(z.shape[0], dtype=dt, device=z.device)
        kd = zero if self.teacher is None else _kd_chunk(
            z[..., :self.vocab], self.teacher_chunk(sl), self.name, self.temperature, self.scale_by_t2, self.params)
        ce = zero if self.labels is None else ce_per_token(z, self.labels[sl])
        return torch.stack([kd.to(dt), ce.to(dt)], dim=-1)  # [c, 2]


class _ChunkedKdCe(torch.autograd.Function):
    """Fused lm-head + (KD, CE) over token chunks; autocast off inside; backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, spec: _KdCeSpec) -> Tensor:
        N = hidden.shape[0]
        out = torch.empty(N, 2, dtype=_compute_dtype(hidden, weight), device=hidden.device)
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, N, spec.chunk_size):
                sl = slice(start, min(start + spec.chunk_size, N))
                z = _linear(hidden[sl], weight, bias)  # [c, V]
                out[sl] = spec.terms(z, sl)
                if spec.keep:
                    spec.kept[start] = (z, None if spec.teacher is None else spec.teacher_chunk(sl))
        ctx.save_for_backward(hidden, weight, bias)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, bias = ctx.saved_tensors
        spec: _KdCeSpec = ctx.spec
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = _compute_dtype(hidden, weight)  # lm-head gradient accumulated in >= fp32
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        for start in range(0, hidden.shape[0], spec.chunk_size):
            sl = slice(start, min(start + spec.chunk_size, hidden.shape[0]))
            if start in spec.kept:
                z = spec.kept[start][0].detach()  # kept from the forward
            else:
                with torch.no_grad():
                    z = _linear(hidden[sl], weight, bias)  # [c, V] recomputed
            z.requires_grad_(True)
            with torch.enable_grad():
                terms = spec.terms(z, sl)  # [c, 2]
                (gz,) = torch.autograd.grad(terms, z, grad_outputs=grad_out[sl].to(terms.dtype))
            if need_h:
                dh[sl] = (gz.to(weight.dtype) @ weight).to(hidden.dtype)  # [c, V] @ [V, H]
            if need_w:
                dw.addmm_(gz.to(acc).T, hidden[sl].to(acc))  # [V, c] @ [c, H]
            if need_b:
                db += gz.to(acc).sum(0)
            del z, gz, terms
            spec.kept.pop(start, None)
        return (dh, dw.to(weight.dtype) if need_w else None, db.to(bias.dtype) if need_b else None, None)


def _teacher_head(teacher, teacher_weight, teacher_bias, vocab, V: int):
    """(vocab compared by KD, teacher head weight, bias) detached and in the teacher's dtype."""
    if isinstance(teacher, Tensor):
        v_t = teacher_weight.shape[0] if teacher_weight is not None else teacher.shape[1]
        vocab = vocab or min(V, v_t)
        if teacher_weight is not None:
            teacher_weight = teacher_weight.detach().to(teacher.dtype)
            teacher_bias = None if teacher_bias is None else teacher_bias.detach().to(teacher.dtype)
    return vocab or V, teacher_weight, teacher_bias


def logit_kd_ce(student_logits: Tensor, *, labels: Tensor | None = None, teacher: Tensor | TopKTeacher | None = None,
                teacher_weight: Tensor | None = None, teacher_bias: Tensor | None = None, name: str = "forward_kl",
                temperature: float = 1.0, scale_by_t2: bool = True, vocab: int | None = None,
                **params: Any) -> tuple[Tensor, Tensor]:
    """``fused_kd_ce`` for student logits [N, V] already computed (an adapted or partitioned head, or
    the full-logit reference path): per-token (kd [N], ce [N]), the same teacher forms and numerics."""
    resolve_divergence(name, params)
    vocab, teacher_weight, teacher_bias = _teacher_head(teacher, teacher_weight, teacher_bias, vocab,
                                                        student_logits.shape[-1])
    spec = _KdCeSpec(teacher, teacher_weight, teacher_bias, labels, vocab, name, params, temperature, scale_by_t2,
                     max(student_logits.shape[0], 1))
    out = spec.terms(student_logits, slice(0, student_logits.shape[0]))  # [N, 2]
    return out[:, 0], out[:, 1]


def fused_kd_ce(student_hidden: Tensor, weight: Tensor, *, labels: Tensor | None = None,
                teacher: Tensor | TopKTeacher | None = None, bias: Tensor | None = None,
                teacher_weight: Tensor | None = None, teacher_bias: Tensor | None = None,
                name: str = "forward_kl", temperature: float = 1.0, scale_by_t2: bool = True,
                vocab: int | None = None, head_dtype: torch.dtype | None = None, chunk_size: int = 1024,
                keep_logits_mb: float = 256.0, **params: Any) -> tuple[Tensor, Tensor]:
    """Per-token (kd [N], ce [N]) at target positions with the student's lm-head fused in.

    student_hidden [N, H] final hidden states at the N target positions (see
    ``scd.heads``), weight [V, H] (+ bias [V]) the student head, labels [N] the target
    ids (None: ce is 0).  ``teacher``: None (kd is 0), logits [N, Vt], hidden states
    [N, Ht] with ``teacher_weight`` [Vt, Ht], or a ``TopKTeacher`` (cached).  KD compares
    the first ``vocab`` logits (default: the teacher's / student's common size).  Equal
    (to float rounding) to ``per_token_divergence(name, h @ W.T + b, t_logits)`` and
    ``ce_per_token(h @ W.T + b, labels)``, with gradients for hidden, weight and bias;
    one head matmul serves both terms.

    Memory vs time: when the student's and teacher's [N, V] logits fit in
    ``keep_logits_mb`` they are kept from the forward for the backward (no recomputed
    head matmuls: 2 fewer per chunk with a hidden-state teacher); above it only
    ``[chunk_size, V]`` logits exist at a time and the backward recomputes each chunk.

    bf16: ``head_dtype=torch.bfloat16`` casts hidden, weight and bias to bf16 for the
    head matmuls (the cast is differentiable: fp32 master weights get fp32 gradients,
    rounded through bf16 as under autocast); every log-softmax and divergence runs in
    fp32.  Autocast is disabled inside, so ``head_dtype`` alone picks the matmul dtype.
    """
    resolve_divergence(name, params)  # validate early
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if student_hidden.ndim != 2 or weight.ndim != 2 or weight.shape[1] != student_hidden.shape[1]:
        raise ValueError(f"expected student_hidden [N, H] and weight [V, H], got {tuple(student_hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    N, V = student_hidden.shape[0], weight.shape[0]
    if labels is not None and tuple(labels.shape) != (N,):
        raise ValueError(f"labels {tuple(labels.shape)} should be [{N}] (one per target token)")
    if teacher is not None and len(teacher) != N:
        raise ValueError(f"teacher covers {len(teacher)} tokens but the student has {N}")
    if isinstance(teacher, Tensor) and teacher_weight is not None and teacher_weight.shape[1] != teacher.shape[1]:
        raise ValueError(f"teacher lm-head weight {tuple(teacher_weight.shape)} does not match teacher hidden "
                         f"size {teacher.shape[1]}")
    vocab, teacher_weight, teacher_bias = _teacher_head(teacher, teacher_weight, teacher_bias, vocab, V)
    h, w, b = student_hidden, weight, bias
    if head_dtype is not None:
        h, w = h.to(head_dtype), w.to(head_dtype)
        b = None if b is None else b.to(head_dtype)
    spec = _KdCeSpec(teacher, teacher_weight, teacher_bias, labels, vocab, name, params, temperature,
                     scale_by_t2, int(chunk_size))
    itemsize = torch.finfo(h.dtype).bits // 8 if h.is_floating_point() else 4
    t_bytes = 0 if teacher is None or isinstance(teacher, TopKTeacher) else N * V * teacher.element_size()
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (h, w, b))
    spec.keep = needs_grad and N * V * itemsize + t_bytes <= keep_logits_mb * 2**20
    out = _ChunkedKdCe.apply(h, w, b, spec)  # [N, 2]
    return out[:, 0], out[:, 1]


def chunked_divergence(student_hidden: Tensor, teacher: Tensor | TopKTeacher, weight: Tensor, *,
                       name: str = "forward_kl", bias: Tensor | None = None,
                       teacher_weight: Tensor | None = None, teacher_bias: Tensor | None = None,
                       temperature: float = 1.0, scale_by_t2: bool = True, chunk_size: int = 1024,
                       **params: Any) -> Tensor:
    """Per-token divergence with the student's lm-head fused in, over chunks of tokens: ``fused_kd_ce``
    without the CE term, never keeping logits (the backward recomputes each chunk).

    student_hidden [N, H] (or [..., H]); weight [V, H] (+ bias [V]); ``teacher``: logits [N, V],
    hidden states [N, Ht] with ``teacher_weight`` [V, Ht], or a ``TopKTeacher``.  Returns [N] (or
    [...]), equal (to float rounding) to ``per_token_divergence(name, h @ W.T + b, teacher_logits)``,
    with gradients for ``student_hidden``, ``weight`` and ``bias``; the teacher gets none.  Memory:
    one chunk's ``[chunk_size, V]`` logits and their fp32 intermediates at a time instead of
    ``[N, V]`` logits of both models; cost: one extra lm-head matmul per chunk in the backward.
    """
    lead = student_hidden.shape[:-1]
    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    N, V = h.shape[0], weight.shape[0]
    if isinstance(teacher, TopKTeacher):
        t = teacher[:] if teacher.logp.ndim == 2 else TopKTeacher(
            teacher.logp.reshape(N, -1), teacher.idx.reshape(N, -1), teacher.tail_logmass.reshape(N),
            teacher.temperature)
    else:
        t = teacher.reshape(-1, teacher.shape[-1])
        if teacher_weight is None and t.shape[1] != V:
            raise ValueError(f"teacher logits have vocab {t.shape[1]} but the student lm-head has {V} rows "
                             "(teacher hidden states need teacher_weight=...)")
        if teacher_weight is not None and tuple(teacher_weight.shape) != (V, t.shape[1]):
            raise ValueError(f"teacher lm-head weight {tuple(teacher_weight.shape)} should be [{V}, {t.shape[1]}]")
    kd, _ = fused_kd_ce(h, weight, bias=bias, teacher=t, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                        name=name, temperature=temperature, scale_by_t2=scale_by_t2, vocab=V,
                        chunk_size=chunk_size, keep_logits_mb=0.0, **params)
    return kd.reshape(lead)


def head_dtype(train):
    """dtype of the fused head matmuls for a ``TrainConfig``: bf16 under ``train.dtype: bf16`` (as autocast
    would run the lm-head), else None (the weights' dtype).  Log-softmax and losses stay fp32."""
    return torch.bfloat16 if train.use_bf16 else None


def completion_terms(model, batch: dict, *, head_dtype=None, teacher=None, ce: bool = True,
                     share_prefix: bool = False, **kd) -> tuple[Tensor, Tensor]:
    """Per-target-token (kd [N], ce [N]) with the lm-head applied only at the N target positions of
    ``batch`` (labels [B, T]; see ``scd.heads``).

    ``teacher`` and ``kd`` (teacher_weight, teacher_bias, name, temperature, vocab, params) as in
    :func:`fused_kd_ce`; no teacher: kd is 0; ``ce=False``: no CE term (ce is 0).  A plain
    ``nn.Linear`` head goes through the fused, chunked :func:`fused_kd_ce`; an adapted or ZeRO-3
    partitioned head is called as a module on the target hidden states (its hooks run), then
    :func:`logit_kd_ce`.  Equal (to float rounding) to the full-logit terms at the same positions.
    ``share_prefix``: the batch's common prompt prefix runs once (``scd.heads.backbone_hidden``).
    """
    h = target_hidden(model, batch, share_prefix)  # [N, H]
    labels = target_labels(batch["labels"]) if ce else None  # [N]
    head = fusable_head(model)
    if head is None:
        return logit_kd_ce(head_module(model)(h), labels=labels, teacher=teacher, **kd)
    return fused_kd_ce(h, head[0], bias=head[1], labels=labels, teacher=teacher, head_dtype=head_dtype, **kd)
