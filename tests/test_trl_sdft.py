"""Our on-policy SDFT (the unisd recipe, preset ``sdft_onpolicy`` of configs/grids/unisd_ablation.yaml)
against TRL's SDFTTrainer (``trl.experimental.sdft``, trl 1.16.0) on the same tiny model, the same
prompts and teacher contexts and the same sampled completion tokens.  docs/unisd.md ("On-policy SDFT
vs TRL's SDFTTrainer") tabulates every setting where the two differ.

TRL's side is TRL's own code: ``SDFTTrainer.compute_loss`` and the methods it calls, run unbound on
:class:`TRLLoss`, which holds the attributes ``SDFTTrainer.__init__`` sets (the way
benchmarks/perf/bench_distill.py drives GKDTrainer), with a real ``SDFTConfig`` set to the preset's
values; TRL's inputs come from TRL's own tokenisation and teacher-context builder, fed the student's
chat messages and the reference answers.  Our side is one recipe step (``engine.accumulate``).

* same loss and same gradients, at grad_accum 1 (the preset) and 2;
* TRL's importance-sampling clip (default 2.0) is a no-op on-policy: the ratio is 1;
* TRL's ``distillation_alpha`` is our ``loss.alpha`` (0 forward KL, 1 reverse KL, the same JSD between);
* TRL's default top-k support (100 tokens, renormalised) changes the loss; top-k = the whole
  vocabulary gives ours; with the tail bucket the top-k forward KL is a lower bound of ours;
* our EMA teacher update is TRL's ``SyncTeacherModelCallback`` with ``teacher_update_rate = 1 - decay``.
"""
import copy
import dataclasses
import inspect
import os
import types
from collections import defaultdict

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl.experimental.sdft", reason="trl is not installed (the `dev` extra installs it: "
                                                     "pip install -e '.[dev]'); TRL's SDFTTrainer is compared here")

from transformers import TrainerControl, TrainerState  # noqa: E402
from trl.experimental.sdft import SDFTConfig, SDFTTrainer  # noqa: E402
from trl.experimental.sdft.loss_utils import compute_topk_self_distillation_loss  # noqa: E402
from trl.experimental.sdft.sdft_trainer import DemonstrationTeacherContextBuilder  # noqa: E402
from trl.experimental.sdft.teacher_sync import SyncTeacherModelCallback  # noqa: E402
from trl.trainer.utils import pad  # noqa: E402

import unisd.components  # noqa: E402,F401  (first: importing unisd.context first hits an import cycle)
from scd.data.prompts import build_messages  # noqa: E402
from scd.models import load_tokenizer  # noqa: E402
from tests.unisd_tiny import grads, preset, setup_run, step_once, step_recording_teacher  # noqa: E402
from unisd.components.base import build_components  # noqa: E402
from unisd.reduction import sequence_mean  # noqa: E402
from unisd.context import completion_forward  # noqa: E402
from unisd.prompts import TEMPLATES  # noqa: E402
from unisd.train import UniSDLossConfig, make_divergence  # noqa: E402

# TRL's base config still sets the deprecated TrainingArguments.gradient_checkpointing
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")

METHOD = "sdft_onpolicy"
# our released teacher wording as TRL's teacher_prompt_template: TRL fills it with the last user
# turn's text and the privileged context (sdft_trainer.py:161-171)
TRL_TEMPLATE = TEMPLATES["released"].replace("{input}", "{prompt}").replace("{reference}", "{privileged_context}")


class TRLLoss:
    """The slice of ``SDFTTrainer`` that ``compute_loss`` runs: TRL's own methods, on the attributes
    ``SDFTTrainer.__init__`` sets (sdft_trainer.py:245, 268-272, 317-318, 334-346); no Trainer loop,
    one process (``accelerator.gather`` is the identity)."""

    _name = SDFTTrainer._name
    compute_loss = SDFTTrainer.compute_loss
    _compute_self_distillation_loss = SDFTTrainer._compute_self_distillation_loss
    _compute_teacher_student_logits = SDFTTrainer._compute_teacher_student_logits
    _compute_rollout_logps = SDFTTrainer._compute_rollout_logps
    _forward_logits = SDFTTrainer._forward_logits
    _get_teacher_context_for_self_distillation = SDFTTrainer._get_teacher_context_for_self_distillation
    _log_self_distillation_metric = SDFTTrainer._log_self_distillation_metric
    _tokenize_prompts = SDFTTrainer._tokenize_prompts

    def __init__(self, args: SDFTConfig, model, teacher, tokenizer):
        self.args, self.model, self.teacher_model = args, model, teacher
        self.processing_class = self._tokenizer = tokenizer
        if tokenizer.pad_token is None:
            raise ValueError("the test tokenizer needs a pad token (TRL would set eos, :317)")
        self.num_loss_tokens_to_skip = args.num_loss_tokens_to_skip
        self.model_kwarg_keys = inspect.signature(model.forward).parameters.keys()
        self.max_prompt_length = args.max_prompt_length
        self.num_iterations = args.num_iterations
        self.temperature = args.temperature
        self.chat_template_kwargs = args.chat_template_kwargs or {}
        self.use_teacher_server = False
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.current_gradient_accumulation_steps = args.gradient_accumulation_steps  # set by the Trainer loop
        self.accelerator = types.SimpleNamespace(gather=lambda t: t)
        self.teacher_context_builder = DemonstrationTeacherContextBuilder(self)


def params(cfg, name: str):
    """The resolved parameters of component ``name`` in ``cfg``."""
    return next(c.params for c in build_components(cfg.components) if c.name == name)


def trl_args(cfg, tmp_path, **changes) -> SDFTConfig:
    """SDFTConfig set to the preset's values (each read from the resolved config), then ``changes``."""
    ict, ema = params(cfg, "in_context_teacher"), params(cfg, "ema_teacher")
    ours = dict(
        temperature=ict.temperature,  # sampling temperature; TRL divides both logits by it too (:1114)
        max_completion_length=ict.max_new_tokens, num_loss_tokens_to_skip=ict.skip_first_tokens,
        distillation_mode="full_logits", distillation_alpha=cfg.loss.alpha,
        teacher_model_kind="ema", teacher_update_rate=1.0 - ema.decay, teacher_sync_steps=ema.every,
        teacher_prompt_template=TRL_TEMPLATE, max_prompt_length=cfg.loss.max_prompt_len,
        num_generations=1,  # one completion per prompt
        per_device_train_batch_size=cfg.train.batch_size, gradient_accumulation_steps=cfg.train.grad_accum)
    return SDFTConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False,
                      **{**ours, **changes})


@dataclasses.dataclass
class Micro:
    """One micro-batch of our step: what the student and the teacher saw."""

    examples: list
    prompt_ids: list  # student prompts, token ids
    teacher_prompt_ids: list
    completion_ids: torch.Tensor  # [B, L]
    completion_mask: torch.Tensor  # [B, L]
    loss_mask: torch.Tensor  # [B, L]


def perturb_(model, seed: int = 0) -> None:
    """Scale every teacher weight by 1 + 0.5 N(0, 1): at step 0 the teacher equals the student, and
    for near-equal distributions every divergence agrees to second order (no direction would show)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.5 * torch.randn(p.shape, generator=g))


def recorded_step(run) -> tuple[dict, list[Micro]]:
    """Our step 0 (forward + backward of every micro-batch), and what each micro-batch saw."""
    seen: list[Micro] = []

    def record(prompt_ids):
        b = run.ctx.batch
        seen.append(Micro(list(b.examples), [list(p) for p in b.prompt_ids], [list(p) for p in prompt_ids],
                          b.completion_ids.clone(), b.completion_mask.clone(), b.loss_mask.clone()))

    terms, _ = step_recording_teacher(run, record)
    return terms, seen


def trl_inputs(trl: TRLLoss, micro: Micro, pad_id: int) -> dict:
    """TRL's training batch for ``micro``, built as ``sample_rollouts`` and ``_prepare_training_batch`` do
    (sdft_trainer.py:654-706, 624-652) with our sampled completions in place of TRL's generation."""
    prompts = [build_messages(ex) for ex in micro.examples]  # the conversational "prompt" column
    contexts = [ex["target"] for ex in micro.examples]  # the "privileged_context" column
    ids = trl._tokenize_prompts(prompts)
    assert ids == micro.prompt_ids  # same student prompts, token for token
    prompt_ids = pad([torch.tensor(i) for i in ids], padding_value=pad_id, padding_side="left")
    prompt_mask = pad([torch.ones(len(i), dtype=torch.long) for i in ids], padding_value=0, padding_side="left")
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": micro.completion_ids,
             "completion_mask": micro.completion_mask}
    batch.update(trl.teacher_context_builder.build(prompts, contexts, micro.completion_ids, micro.completion_mask))
    for row in range(len(ids)):  # same teacher context + completion, token for token
        keep = batch["teacher_attention_mask"][row].bool()
        completion = micro.completion_ids[row][micro.completion_mask[row].bool()].tolist()
        assert batch["teacher_input_ids"][row][keep].tolist() == micro.teacher_prompt_ids[row] + completion
    old = trl._compute_rollout_logps(prompt_ids, prompt_mask, micro.completion_ids, micro.completion_mask)
    if old is not None:  # only when TRL reuses rollouts over optimiser steps (:797)
        batch["old_per_token_logps"] = old
    return batch


def trl_step(trl: TRLLoss, micros: list[Micro], pad_id: int) -> tuple[float, dict]:
    """TRL's loss summed over the micro-batches (compute_loss divides by grad_accum, :821) and its gradients."""
    trl.model.zero_grad(set_to_none=True)
    total = 0.0
    for micro in micros:
        loss = trl.compute_loss(trl.model, trl_inputs(trl, micro, pad_id))
        loss.backward()
        total += float(loss.detach())
    return total, grads(trl.model)


def ours_kd(run, micro: Micro, loss_cfg: UniSDLossConfig, temperature: float, n_total: int) -> torch.Tensor:
    """Our per-token divergence and reduction (unisd.train.make_divergence, sequence_mean) for ``loss_cfg``."""
    pad_id = run.ctx.pad_id
    with torch.no_grad():
        zs = completion_forward(run.ctx.model, micro.prompt_ids, micro.completion_ids, micro.completion_mask, pad_id)
        zt = completion_forward(run.ctx.teacher, micro.teacher_prompt_ids, micro.completion_ids,
                                micro.completion_mask, pad_id)
    per_token = make_divergence(loss_cfg)(zs.logits, zt.logits, temperature)  # [B, L]
    return sequence_mean(per_token, micro.loss_mask, n_sequences_total=n_total)


@pytest.fixture(scope="module")
def smol_tokenizer_module():
    return load_tokenizer("smollm2-135m")  # tests/conftest.py's smol_tokenizer, once per module


@pytest.fixture(scope="module")
def recorded(smol_tokenizer_module):
    """grad_accum -> our recorded step of the preset with that grad_accum (built once per module)."""
    cache: dict = {}

    def get(grad_accum: int):
        if grad_accum not in cache:
            cfg = preset(METHOD)
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=grad_accum))
            run = setup_run(smol_tokenizer_module, {}, cfg=cfg)
            perturb_(run.ctx.teacher)
            terms, micros = recorded_step(run)
            assert len(micros) == grad_accum and set(terms) == {"kd"}
            cache[grad_accum] = types.SimpleNamespace(cfg=cfg, run=run, kd=terms["kd"], grads=grads(run.ctx.model),
                                                      micros=micros)
        return cache[grad_accum]

    return get


@pytest.fixture(params=[1, 2], ids=["accum1", "accum2"])
def step(request, recorded):
    """Our recorded step: grad_accum 1 (the preset as shipped) or 2."""
    return recorded(request.param)


@pytest.fixture
def step1(recorded):
    return recorded(1)


def float64_copy(run):
    """``run`` with float64 copies of its student and teacher (its context's other fields shared): in
    float32 a JSD over 49k tokens loses ~1e-4 of its value to cancellation, differently in each code.
    In float64 what is left (~1e-9) is RoPE: TRL's forward passes no position_ids (sdft_trainer.py:
    1103-1107), so a left-padded row's positions are shifted by its padding; attention depends on
    position differences only, but transformers computes the rotary angles in float32, so padded rows
    differ by ~1e-8 in their logits (the longest row of a batch, unpadded, agrees to 1e-16)."""
    ctx = copy.copy(run.ctx)
    ctx.model, ctx.teacher = copy.deepcopy(run.ctx.model).double(), copy.deepcopy(run.ctx.teacher).double()
    return types.SimpleNamespace(ctx=ctx)


def _rel_err(a: dict, b: dict) -> float:
    assert set(a) == set(b) and a
    scale = max(float(v.abs().max()) for v in a.values())
    return max(float((a[n] - b[n]).abs().max()) for n in a) / scale


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_trl_compute_loss_equals_ours(step, tmp_path, num_iterations):
    """Same data, TRL set to the preset: same loss and gradients.  num_iterations 2 makes TRL compute
    old log-probs, so its default clip (distillation_is_clip 2.0) is active: on the first use of a
    rollout the ratio is exactly 1, as it always is in our recipe (each sample is used once)."""
    cfg, run = step.cfg, step.run
    args = trl_args(cfg, tmp_path, num_iterations=num_iterations)
    assert args.distillation_is_clip == SDFTConfig.distillation_is_clip and args.distillation_is_clip is not None
    trl = TRLLoss(args, run.ctx.model, run.ctx.teacher, run.ctx.tokenizer)
    micro, skip = step.micros[0], params(cfg, "in_context_teacher").skip_first_tokens
    inputs = trl_inputs(trl, micro, run.ctx.pad_id)
    assert ("old_per_token_logps" in inputs) == (num_iterations > 1)  # the clip acts only with old log-probs
    dl = trl._compute_teacher_student_logits(run.ctx.model, run.ctx.teacher, inputs)
    assert torch.equal(dl.loss_mask.bool(), micro.loss_mask.bool())  # the first `skip` completion tokens masked
    assert skip == 3 and micro.loss_mask[:, :skip].sum() == 0 and micro.loss_mask.sum() > 0
    loss, g = trl_step(trl, step.micros, run.ctx.pad_id)
    assert loss == pytest.approx(step.kd, rel=1e-5)  # float32
    assert _rel_err(step.grads, g) < 1e-5  # of the largest gradient entry
    # the check sees the settings: TRL's defaults for them give another loss
    for change in ({"num_loss_tokens_to_skip": 0}, {"temperature": 1.0}, {"distillation_alpha": 0.5}):
        other, _ = trl_step(TRLLoss(trl_args(cfg, tmp_path, **change), run.ctx.model, run.ctx.teacher,
                                    run.ctx.tokenizer), step.micros, run.ctx.pad_id)
        assert abs(other - step.kd) > 1e-2 * step.kd, change


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_trl_distillation_alpha_is_our_loss_alpha(step1, tmp_path, alpha):
    """TRL's compute_divergence (loss_utils.py:23-41) with distillation_alpha = a is our loss.alpha = a:
    0 forward KL(p_T||p_S), 1 reverse KL, between (1-a) KL(p_S||M) + a KL(p_T||M), M = (1-a) p_S + a p_T
    (0.25 tells a from 1 - a).  In float64, both sides: see :func:`float64_copy`."""
    step = step1
    cfg, run = step.cfg, float64_copy(step.run)
    trl = TRLLoss(trl_args(cfg, tmp_path, distillation_alpha=alpha), run.ctx.model, run.ctx.teacher,
                  run.ctx.tokenizer)
    micro = step.micros[0]
    with torch.no_grad():
        theirs = float(trl.compute_loss(run.ctx.model, trl_inputs(trl, micro, run.ctx.pad_id)))
    temperature = params(cfg, "in_context_teacher").temperature
    ours = float(ours_kd(run, micro, UniSDLossConfig(alpha=alpha), temperature, len(micro.examples)))
    assert theirs == pytest.approx(ours, rel=1e-7)  # not 1e-15: see :func:`float64_copy`
    # the mirrored weight (forward <-> reverse KL) lies far outside the tolerance: the check tells them apart
    mirrored = float(ours_kd(run, micro, UniSDLossConfig(alpha=1.0 - alpha), temperature, len(micro.examples)))
    assert alpha == 0.5 or abs(mirrored - ours) > 1e-3 * ours


def test_trl_default_topk_support(step1, tmp_path):
    """TRL's default distillation_mode topk_logits (distillation_topk 100, no tail bucket) takes the
    divergence over the student's top-k tokens, renormalised (loss_utils.py:68-99).  With k = the
    vocabulary it is ours; with k = 100 it is another loss; with the tail bucket (the top-k tokens
    plus one bucket for the rest) its forward KL is a coarse-graining of ours, hence never larger."""
    step = step1
    cfg, run = step.cfg, step.run
    default = SDFTConfig.__dataclass_fields__
    assert default["distillation_mode"].default == "topk_logits" and default["distillation_add_tail"].default is False
    k_default = default["distillation_topk"].default
    trl = TRLLoss(trl_args(cfg, tmp_path), run.ctx.model, run.ctx.teacher, run.ctx.tokenizer)
    micro = step.micros[0]
    with torch.no_grad():
        dl = trl._compute_teacher_student_logits(run.ctx.model, run.ctx.teacher,
                                                 trl_inputs(trl, micro, run.ctx.pad_id))
        vocab = dl.student_logits.shape[-1]
        full = make_divergence(UniSDLossConfig(alpha=0.0))(dl.student_logits, dl.teacher_logits, 1.0)  # [B, L]

        def topk(k, tail):
            return compute_topk_self_distillation_loss(dl.student_logits, dl.teacher_logits, distillation_topk=k,
                                                       distillation_alpha=0.0, distillation_add_tail=tail)

        m = micro.loss_mask.bool()
        assert torch.allclose(topk(vocab, False)[m], full[m], rtol=1e-4, atol=1e-6)
        tail = topk(k_default, True)[m]
        assert bool((tail <= full[m] + 1e-5).all()) and float(tail.sum()) < 0.99 * float(full[m].sum())
        ours = float(sequence_mean(full, micro.loss_mask))
        theirs = float(sequence_mean(topk(k_default, False), micro.loss_mask))
        assert abs(theirs - ours) > 1e-2 * ours


def test_ema_teacher_update_is_trl_sync_callback(smol_tokenizer_module, tmp_path, monkeypatch):
    """One optimiser step of the preset: our EMA teacher (decay 0.98 every step) equals TRL's
    SyncTeacherModelCallback (teacher_sync.py:62, trainer/callbacks.py:130-132) at rate 1 - decay.
    Its ``sync_target_model`` asks accelerate's global state for DeepSpeed ZeRO-3 first (callbacks.py:
    135-146), which needs an ``Accelerator``; without ZeRO-3 it runs ``_sync_target_model``, called here."""
    monkeypatch.setattr(SyncTeacherModelCallback, "sync_target_model",
                        staticmethod(SyncTeacherModelCallback._sync_target_model))
    cfg = preset(METHOD)
    run = setup_run(smol_tokenizer_module, {}, cfg=cfg)
    perturb_(run.ctx.teacher)  # the teacher differs from the student, so an update is visible
    before, teacher0 = copy.deepcopy(run.ctx.teacher), copy.deepcopy(run.ctx.teacher)
    step_once(run, update=True)  # update, then the EMA at step 1
    args = trl_args(cfg, tmp_path)
    SyncTeacherModelCallback(teacher_model=teacher0, accelerator=None).on_step_end(
        args, TrainerState(global_step=run.engine.step), TrainerControl(), model=run.ctx.model)
    ours, theirs = dict(run.ctx.teacher.named_parameters()), dict(teacher0.named_parameters())
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        assert torch.allclose(t, theirs[name], rtol=0, atol=1e-7), name
    assert any(not torch.equal(t, dict(before.named_parameters())[n]) for n, t in ours.items())  # it moved
