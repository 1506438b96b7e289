"""Layer-wise CKA of the evaluated model against a reference model on probe texts of the eval tasks."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from benchmarks.cka import model_cka, plot_cka_heatmap
from benchmarks.evaluate.model_io import load_model, run_model_path, slug
from benchmarks.tasks.suite import expand_tasks, task_examples
from scd.models import check_same_tokenizer


@dataclasses.dataclass(frozen=True)
class CKAOptions:
    """Layer-wise CKA between the evaluated model and ``reference`` (off when None)."""

    reference: str | None = None  # model name/path or run dir (e.g. the teacher / pre-degradation model)
    tasks: tuple[str, ...] = ()  # probe prompts come from these tasks (default: the eval tasks)
    split: str = "test"
    n_examples: int = 64  # probe prompts in total
    max_length: int = 128  # tokens per probe prompt (right-truncated)
    batch_size: int = 8
    layers: tuple[int, ...] | None = None  # hidden-state indices of the evaluated model (None: all)
    reference_layers: tuple[int, ...] | None = None
    estimator: str = "linear"  # see benchmarks.cka.ESTIMATORS
    unit: str = "tokens"  # see benchmarks.cka.UNITS
    minibatch_size: int | None = 1024
    heatmap: bool = True

    def __post_init__(self) -> None:
        if self.n_examples < 4:
            raise ValueError("cka.n_examples must be >= 4")



def cka_batches(tokenizer, texts: Sequence[str], batch_size: int, max_length: int, device: str):
    """Right-padded, right-truncated probe batches {input_ids, attention_mask}."""
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        yield {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def run_cka(model, tokenizer, opts: CKAOptions, *, default_tasks: Sequence[str] = (), out_dir: Path | None = None,
            reference_model=None) -> dict:
    """CKA(evaluated model layers x reference model layers) on probe texts: the ``input``
    field (no instruction, no chat template, so probes do not share a long common
    prefix) of the first examples of each probe task."""
    tasks = list(opts.tasks) or list(default_tasks)
    if not tasks:
        raise ValueError("cka: no probe tasks (set cka.tasks or evaluate at least one task)")
    per_task = max(1, -(-opts.n_examples // len(tasks)))
    texts = []
    for task in expand_tasks(tasks):
        texts += [ex["input"] for ex in task_examples(task, opts.split, per_task)]
    texts = texts[:opts.n_examples]
    device = str(next(model.parameters()).device)
    ref_name = opts.reference
    if reference_model is None:
        ref_path = run_model_path(Path(ref_name)) if (Path(ref_name) / "run.json").exists() else ref_name
        reference_model, ref_tok = load_model(str(ref_path), dtype=str(next(model.parameters()).dtype)
                                              .replace("torch.", ""), device=device)
        check_same_tokenizer(ref_tok, tokenizer, "reference", "model")
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        res = model_cka(model, reference_model, cka_batches(tokenizer, texts, opts.batch_size, opts.max_length,
                                                            device),
                        layers_a=list(opts.layers) if opts.layers is not None else None,
                        layers_b=list(opts.reference_layers) if opts.reference_layers is not None else None,
                        estimator=opts.estimator, unit=opts.unit, minibatch_size=opts.minibatch_size)
    finally:
        tokenizer.padding_side = old_side
    res["reference"] = ref_name
    res["probe"] = {"tasks": tasks, "split": opts.split, "n_texts": len(texts), "max_length": opts.max_length}
    if opts.heatmap and out_dir is not None:
        png = out_dir / f"cka_{slug(ref_name)}.png"
        plot_cka_heatmap(res["matrix"], png, title=f"CKA: model (rows) vs {slug(ref_name)} (cols)")
        res["heatmap"] = png.name
    return {slug(ref_name): res}

