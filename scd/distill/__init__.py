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

The package, read in this order:

    config.py        DistillConfig and its blocks (teacher, stages, loss, weighting, probe)
    loss.py          token_terms, kd_weights, micro_batch_loss (pure tensor math)
    teacher_slot.py  TeacherSlot (in-place switches), manifests, dependency runs, AW caches
    probe.py         select_stage and scd_select's probe KLs
    recipe.py        DistillRecipe (driven by scd.core.engine.Engine) and run():
                     dependencies -> manifest + sha256 check -> student, tokenizer check ->
                     data -> AW anchor losses -> engine (plain PyTorch or DeepSpeed) -> fit
                     (resume; per stage: select, switch the teacher in place, reset the
                     optimiser) -> save, evaluate, run.json

Only one teacher checkpoint is resident at a time: the teacher module is built once
and later checkpoints are copied into its existing tensors (``load_weights_in_place``);
every switch is timed and logged to metrics.jsonl.  The teacher runs in eval mode
under ``torch.no_grad``.
"""
from scd.distill.config import (DistillConfig, DistillLossConfig, SelectionProbeConfig, StagesConfig, TeacherSource,
                                WeightingConfig)
from scd.distill.loss import kd_weights, micro_batch_loss, token_terms
from scd.distill.probe import probe_encoded, probe_kl, probe_logprobs, select_stage
from scd.distill.recipe import DistillRecipe, run
from scd.distill.teacher_slot import (TeacherSlot, anchor_model_dir, cached_per_sample_ce, data_hash,
                                      ensure_dependency, find_manifest, load_weights_in_place)

__all__ = ["DistillConfig", "DistillLossConfig", "DistillRecipe", "SelectionProbeConfig", "StagesConfig", "TeacherSlot",
           "TeacherSource", "WeightingConfig", "anchor_model_dir", "cached_per_sample_ce", "data_hash",
           "ensure_dependency", "find_manifest", "kd_weights", "load_weights_in_place", "micro_batch_loss",
           "probe_encoded", "probe_kl", "probe_logprobs", "run", "select_stage", "token_terms"]
