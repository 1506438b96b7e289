"""Teacher checkpoint manifest, save-schedule rules and checkpoint selection rules.

Scheduled Checkpoint Distillation ("Following the Teacher's Footsteps", arXiv
2601.10114): the teacher's SFT saves N checkpoints over training and writes a
manifest; the student trains in stages and, per stage, a selection rule picks the
checkpoint to distil from.

* ``Manifest`` — JSON ``{version, score_name, higher_is_better, best_index, meta,
  checkpoints: [{index, step, epoch, path, sha256, dev_loss, dev_score, files, extra}]}``
  written atomically next to the checkpoints (paths are relative to the manifest's
  directory).  ``best_index`` is recomputed from the dev metrics on load (the stored
  value is for humans; a disagreement is an error).  ``Manifest.verify`` re-hashes the weight
  files and names the checkpoint (and file) that changed after the manifest was written.
* ``registry("save_schedule")`` — when the teacher saves: ``even_steps``,
  ``dev_loss_milestones``.
* ``registry("selection")`` — which checkpoint a stage uses: ``final``, ``best``,
  ``fixed_order`` (CD), ``scd_select`` (SCD).  Every rule has the signature
  ``select(stage, n_stages, manifest, kl_best_to=None, kl_student_to=None) -> index``.
  Ties are always broken towards the lowest checkpoint index (the earliest).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from scd.core.registry import registry
from scd.core.results import atomic_write_json, read_json, sha256_file

SAVE_SCHEDULES = registry("save_schedule")
SELECTIONS = registry("selection")
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class ManifestError(ValueError):
    """A bad, inconsistent or tampered teacher manifest.  One line, names the checkpoint."""


# ----------------------------------------------------------------------------- hashing
def weight_files(path: str | os.PathLike) -> list[Path]:
    """The weight file(s) of a checkpoint: the file itself, or the ``*.safetensors`` /
    ``*.bin`` / ``*.pt`` / ``*.pth`` files directly inside a checkpoint directory
    (sharded checkpoints, LoRA adapters), sorted by name.  Configs and tokenizer files
    are not weights and are not hashed."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ManifestError(f"checkpoint path {p} does not exist")
    files = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise ManifestError(f"checkpoint directory {p} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    return files


def hash_checkpoint(path: str | os.PathLike) -> tuple[str, dict[str, str]]:
    """(digest, {file name: sha256}) of a checkpoint's weight files.

    One weight file: the digest is that file's sha256 (comparable with ``sha256sum``).
    Several: sha256 of the lines ``"<name>  <sha256>\\n"`` in name order.
    """
    files = weight_files(path)
    per_file = {f.name: sha256_file(f) for f in files}
    if len(per_file) == 1:
        return next(iter(per_file.values())), per_file
    h = hashlib.sha256("".join(f"{n}  {d}\n" for n, d in sorted(per_file.items())).encode())
    return h.hexdigest(), per_file


# ---------------------------------------------------------------------------- manifest
@dataclass
class CheckpointEntry:
    """One saved teacher checkpoint."""

    index: int
    step: int
    epoch: float
    path: str  # relative to the manifest's directory (or absolute)
    sha256: str
    dev_loss: float | None = None
    dev_score: float | None = None
    files: dict[str, str] = field(default_factory=dict)  # weight file name -> sha256
    extra: dict[str, Any] = field(default_factory=dict)  # free-form (train loss, wall time, ...)


_ENTRY_FIELDS = {f.name for f in dataclasses.fields(CheckpointEntry)}
_REQUIRED = ("index", "step", "epoch", "path", "sha256")


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(float(x))


@dataclass
class Manifest:
    """The teacher's checkpoints in save order, with the best one marked.

    ``root`` is the directory relative checkpoint paths are resolved against: the
    directory the manifest file lives in (set by ``read`` / ``write``).
    """

    checkpoints: list[CheckpointEntry] = field(default_factory=list)
    score_name: str | None = None  # what dev_score measures (e.g. "f1")
    higher_is_better: bool = True  # for dev_score; dev_loss is always lower-is-better
    meta: dict[str, Any] = field(default_factory=dict)
    root: Path | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.checkpoints)

    def __getitem__(self, index: int) -> CheckpointEntry:
        if not 0 <= index < len(self.checkpoints):
            raise ManifestError(f"checkpoint index {index} out of range (manifest has {len(self.checkpoints)})")
        return self.checkpoints[index]

    @property
    def indices(self) -> list[int]:
        return [c.index for c in self.checkpoints]

    @property
    def final_index(self) -> int:
        if not self.checkpoints:
            raise ManifestError("teacher manifest has no checkpoints")
        return self.checkpoints[-1].index

    @property
    def best_index(self) -> int | None:
        """Best checkpoint: highest (or lowest, see ``higher_is_better``) finite dev_score
        if any checkpoint has one, else lowest finite dev_loss, else None.  Ties -> lowest index."""
        scored = [c for c in self.checkpoints if _finite(c.dev_score)]
        if scored:
            sign = -1.0 if self.higher_is_better else 1.0
            return min(scored, key=lambda c: (sign * float(c.dev_score), c.index)).index
        with_loss = [c for c in self.checkpoints if _finite(c.dev_loss)]
        if with_loss:
            return min(with_loss, key=lambda c: (float(c.dev_loss), c.index)).index
        return None

    def resolve(self, index: int) -> Path:
        """Absolute path of checkpoint ``index``."""
        p = Path(self[index].path)
        if p.is_absolute():
            return p
        if self.root is None:
            raise ManifestError(f"checkpoint {index} has a relative path ({p}) but the manifest has no root "
                                "directory; read it with Manifest.read(path) or set root=")
        return self.root / p

    def add(self, *, step: int, epoch: float, path: str | os.PathLike, dev_loss: float | None = None,
            dev_score: float | None = None, **extra: Any) -> CheckpointEntry:
        """Hash a just-saved checkpoint and append it (index = its position).  Paths
        under ``root`` are stored relative to it."""
        p = Path(path)
        if not p.is_absolute() and self.root is not None:
            p = self.root / p
        if self.checkpoints and step <= self.checkpoints[-1].step:
            raise ManifestError(f"checkpoint at step {step} is not after the last one (step {self.checkpoints[-1].step})")
        digest, files = hash_checkpoint(p)
        stored = p.resolve()  # no root yet: absolute (set root= for a relocatable manifest)
        if self.root is not None:
            try:
                stored = p.resolve().relative_to(Path(self.root).resolve())
            except ValueError:
                stored = p.resolve()
        entry = CheckpointEntry(index=len(self.checkpoints), step=int(step), epoch=float(epoch), path=str(stored),
                                sha256=digest, dev_loss=dev_loss, dev_score=dev_score, files=files, extra=extra)
        self.checkpoints.append(entry)
        return entry

    # -------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {"version": MANIFEST_VERSION, "score_name": self.score_name, "higher_is_better": self.higher_is_better,
                "best_index": self.best_index, "meta": self.meta,
                "checkpoints": [dataclasses.asdict(c) for c in self.checkpoints]}

    @classmethod
    def from_dict(cls, data: Any, source: str = "manifest") -> "Manifest":
        if not isinstance(data, dict):
            raise ManifestError(f"{source}: expected a JSON object")
        if data.get("version", MANIFEST_VERSION) > MANIFEST_VERSION:
            raise ManifestError(f"{source}: manifest version {data['version']} is newer than this code "
                                f"({MANIFEST_VERSION}); update the suite")
        known = {"version", "score_name", "higher_is_better", "best_index", "meta", "checkpoints"}
        for key in data:
            if key not in known:
                raise ManifestError(f"{source}: unknown key '{key}' (known: {', '.join(sorted(known))})")
        raw = data.get("checkpoints")
        if not isinstance(raw, list):
            raise ManifestError(f"{source}: 'checkpoints' should be a list")
        entries = []
        for i, c in enumerate(raw):
            where = f"{source}: checkpoints[{i}]"
            if not isinstance(c, dict):
                raise ManifestError(f"{where} should be an object")
            for key in _REQUIRED:
                if key not in c:
                    raise ManifestError(f"{where}: missing key '{key}'")
            for key in c:
                if key not in _ENTRY_FIELDS:
                    raise ManifestError(f"{where}: unknown key '{key}' (put free-form values under 'extra')")
            for key, tp in (("index", int), ("step", int), ("epoch", (int, float)), ("path", str), ("sha256", str)):
                if not isinstance(c[key], tp) or isinstance(c[key], bool):
                    raise ManifestError(f"{where}: '{key}' has the wrong type ({type(c[key]).__name__})")
            if c["index"] != i:
                raise ManifestError(f"{where}: index is {c['index']}, expected {i} (checkpoints in save order)")
            if entries and c["step"] <= entries[-1].step:
                raise ManifestError(f"{where}: step {c['step']} is not after the previous step {entries[-1].step}")
            entries.append(CheckpointEntry(**c))
        m = cls(checkpoints=entries, score_name=data.get("score_name"),
                higher_is_better=bool(data.get("higher_is_better", True)), meta=dict(data.get("meta") or {}))
        stored = data.get("best_index")
        if stored is not None and stored != m.best_index:
            raise ManifestError(f"{source}: best_index is {stored} but the dev metrics make it {m.best_index}; "
                                "the manifest was edited by hand?")
        return m

    def write(self, path: str | os.PathLike) -> Path:
        """Write atomically to ``path`` (a file, or a directory -> ``<dir>/manifest.json``)."""
        p = Path(path)
        if p.is_dir():
            p = p / MANIFEST_NAME
        if self.root is None:
            self.root = p.parent
        elif Path(self.root).resolve() != p.parent.resolve():
            raise ManifestError(f"manifest root {self.root} differs from the directory it is written to "
                                f"({p.parent}); relative checkpoint paths would break")
        atomic_write_json(p, self.to_dict())
        return p

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Manifest":
        p = Path(path)
        if p.is_dir():
            p = p / MANIFEST_NAME
        try:
            data = read_json(p)
        except FileNotFoundError:
            raise ManifestError(f"{p}: teacher manifest not found (run the teacher recipe first)") from None
        except ValueError as e:
            raise ManifestError(f"{p}: not valid JSON ({e})") from None
        m = cls.from_dict(data, source=str(p))
        m.root = p.parent
        return m

    def verify(self, indices: Sequence[int] | None = None) -> None:
        """Re-hash the weight files of the given (default: all) checkpoints; raise a
        ManifestError naming the first checkpoint that is missing or changed."""
        for i in self.indices if indices is None else indices:
            c = self[i]
            where = f"teacher checkpoint {c.index} (step {c.step}, {self.resolve(i)})"
            try:
                digest, files = hash_checkpoint(self.resolve(i))
            except ManifestError as e:
                raise ManifestError(f"{where} is missing or empty: {e}") from None
            if digest == c.sha256:
                continue
            changed = [n for n in sorted(set(files) | set(c.files)) if files.get(n) != c.files.get(n)]
            detail = f" (changed: {', '.join(changed)})" if c.files and changed else ""
            raise ManifestError(f"{where} was modified after the manifest was written{detail}: sha256 is "
                                f"{digest[:12]}..., the manifest says {c.sha256[:12]}...")


def read_manifest(path: str | os.PathLike) -> Manifest:
    return Manifest.read(path)


def write_manifest(manifest: Manifest, path: str | os.PathLike) -> Path:
    return manifest.write(path)


def verify_manifest(manifest: Manifest, indices: Sequence[int] | None = None) -> None:
    """See ``Manifest.verify``."""
    manifest.verify(indices)


# ----------------------------------------------------------------------- save schedules
def _register_save(name: str, needs_dev_history: bool):
    def deco(fn):
        fn.needs_dev_history = needs_dev_history
        return SAVE_SCHEDULES.register(name)(fn)
    return deco


@_register_save("even_steps", needs_dev_history=False)
def even_steps(total_steps: int, *, n_checkpoints: int, dev_history: Sequence | None = None) -> list[int]:
    """N checkpoints evenly spaced over training, the last at the final step (SCD, arXiv 2601.10114).

    Steps count optimizer updates; a checkpoint "at step s" is saved after update s.
    Checkpoint i (0-based) is at floor((i + 1) * total_steps / N); e.g. 300 steps,
    N = 3 -> [100, 200, 300] (one per epoch for a 3-epoch run of 100 steps each).
    """
    total_steps, n = int(total_steps), int(n_checkpoints)
    if n < 1:
        raise ValueError(f"save_schedule 'even_steps': n_checkpoints must be >= 1, got {n}")
    if n > total_steps:
        raise ValueError(f"save_schedule 'even_steps': {n} checkpoints do not fit in {total_steps} steps")
    return [(i + 1) * total_steps // n for i in range(n)]


@_register_save("dev_loss_milestones", needs_dev_history=True)
def dev_loss_milestones(total_steps: int, *, dev_history: Sequence[tuple[int, float]],
                        fractions: Sequence[float] = (0.25, 0.5, 0.75), floor: float | None = None,
                        n_checkpoints: int | None = None) -> list[int]:
    """Save where the dev loss first covers given fractions of its total improvement (ours).

    ``dev_history`` = [(step, dev_loss), ...] in step order; its first entry is the
    initial loss L0 (evaluate before training, step 0).  For each fraction f the
    threshold is L0 - f * (L0 - L_ref), and the milestone is the first later evaluated
    step whose dev loss is <= the threshold.  The final step is always included (the
    last checkpoint is the final teacher).  Returns sorted, de-duplicated steps.

    L_ref: ``floor`` when given (online use during training: the thresholds are fixed,
    so a step once returned stays returned as the history grows — save at step s when
    ``s in dev_loss_milestones(...)``); else the lowest loss in the history (offline
    use: after a dense-save run, pick which checkpoints to keep; f = 1 is then the
    best checkpoint).  Milestones the loss never reached are skipped, so fewer than
    len(fractions) + 1 checkpoints can result.  ``n_checkpoints`` is accepted for a
    uniform call signature and ignored (the count follows from ``fractions``).
    """
    total_steps = int(total_steps)
    hist = [(int(s), float(l)) for s, l in (dev_history or ())]
    for f in fractions:
        if not 0.0 < float(f) <= 1.0:
            raise ValueError(f"save_schedule 'dev_loss_milestones': fractions must be in (0, 1], got {f}")
    if any(b[0] <= a[0] for a, b in zip(hist, hist[1:])):
        raise ValueError("save_schedule 'dev_loss_milestones': dev_history steps must be strictly increasing")
    steps = {total_steps}
    if len(hist) >= 2:
        l0 = hist[0][1]
        ref = float(floor) if floor is not None else min(l for _, l in hist)
        if ref < l0:
            for f in fractions:
                threshold = l0 - float(f) * (l0 - ref)
                hit = next((s for s, l in hist[1:] if l <= threshold), None)
                if hit is not None and hit <= total_steps:
                    steps.add(hit)
    return sorted(steps)


def save_steps(name: str, total_steps: int, **params: Any) -> list[int]:
    """Steps at which to save under the registered save schedule ``name``."""
    return SAVE_SCHEDULES.get(name)(total_steps, **params)


def should_save(name: str, step: int, total_steps: int, **params: Any) -> bool:
    """True when the teacher should save a checkpoint after optimizer step ``step``."""
    return int(step) in save_steps(name, total_steps, **params)


# ---------------------------------------------------------------------- selection rules
def _check_stage(stage: int, n_stages: int, manifest: Manifest) -> None:
    if n_stages < 1 or not 0 <= stage < n_stages:
        raise ValueError(f"stage {stage} out of range for {n_stages} stages")
    if not len(manifest):
        raise ManifestError("teacher manifest has no checkpoints")


def _register_selection(name: str, needs_probe_kl: bool):
    def deco(fn):
        fn.needs_probe_kl = needs_probe_kl
        return SELECTIONS.register(name)(fn)
    return deco


@_register_selection("final", needs_probe_kl=False)
def select_final(stage: int, n_stages: int, manifest: Manifest, kl_best_to=None, kl_student_to=None) -> int:
    """The last saved checkpoint, every stage (plain KD from the final teacher)."""
    _check_stage(stage, n_stages, manifest)
    return manifest.final_index


@_register_selection("best", needs_probe_kl=False)
def select_best(stage: int, n_stages: int, manifest: Manifest, kl_best_to=None, kl_student_to=None) -> int:
    """The manifest's best checkpoint (by dev_score, else dev_loss), every stage (plain KD)."""
    _check_stage(stage, n_stages, manifest)
    best = manifest.best_index
    if best is None:
        raise ManifestError("selection 'best': no checkpoint in the teacher manifest has a dev_score or dev_loss; "
                            "evaluate the teacher on dev or use selection 'final'")
    return best


@_register_selection("fixed_order", needs_probe_kl=False)
def select_fixed_order(stage: int, n_stages: int, manifest: Manifest, kl_best_to=None, kl_student_to=None) -> int:
    """Checkpoints in save order: the CD baseline of SCD (arXiv 2601.10114).

    With as many stages as checkpoints, stage s uses checkpoint s.  Otherwise stage s
    uses the checkpoint at the end of the (s+1)-th of n_stages equal shares of the
    teacher's trajectory: position ceil((s + 1) * C / S) - 1 of C checkpoints, so
    the last stage always gets the final checkpoint and positions never decrease
    (S = 2, C = 4 -> [1, 3]; S = 4, C = 2 -> [0, 0, 1, 1]).
    """
    _check_stage(stage, n_stages, manifest)
    c = len(manifest)
    pos = -(-(stage + 1) * c // n_stages) - 1
    return manifest.checkpoints[pos].index


def _as_kl_map(kls: Mapping[int, float] | Sequence[float], manifest: Manifest, what: str) -> dict[int, float]:
    if isinstance(kls, Mapping):
        out = {int(k): float(v) for k, v in kls.items()}
    else:
        vals = list(kls)
        if len(vals) != len(manifest):
            raise ValueError(f"selection 'scd_select': {what} has {len(vals)} values for {len(manifest)} checkpoints")
        out = {c.index: float(v) for c, v in zip(manifest.checkpoints, vals)}
    valid = set(manifest.indices)
    for k, v in out.items():
        if k not in valid:
            raise ValueError(f"selection 'scd_select': {what} names checkpoint {k}, not in the manifest "
                             f"(indices {min(valid)}..{max(valid)})")
        if math.isnan(v):
            raise ValueError(f"selection 'scd_select': {what}[{k}] is NaN")
    if not out:
        raise ValueError(f"selection 'scd_select': {what} is empty")
    return out


def scd_scores(kl_best_to: Mapping[int, float] | Sequence[float], kl_student_to: Mapping[int, float] | Sequence[float],
               manifest: Manifest) -> dict[int, float]:
    """{checkpoint index: KL(best || c) + KL(student || c)} (SCD, arXiv 2601.10114)."""
    a = _as_kl_map(kl_best_to, manifest, "kl_best_to")
    b = _as_kl_map(kl_student_to, manifest, "kl_student_to")
    if set(a) != set(b):
        raise ValueError(f"selection 'scd_select': kl_best_to covers checkpoints {sorted(a)} but kl_student_to "
                         f"covers {sorted(b)}")
    return {c: a[c] + b[c] for c in sorted(a)}


@_register_selection("scd_select", needs_probe_kl=True)
def select_scd(stage: int, n_stages: int, manifest: Manifest, kl_best_to=None, kl_student_to=None) -> int:
    """SCD's rule (arXiv 2601.10114): c* = argmin_c [KL(best || c) + KL(student || c)].

    ``kl_best_to[c]`` = KL(p_best || p_c) and ``kl_student_to[c]`` = KL(p_student || p_c),
    token-level and averaged over a held-out probe set, precomputed by the recipe
    (e.g. ``scd.losses.kl_divergence(best_logits, c_logits)`` averaged over probe
    tokens).  Dicts keyed by checkpoint index, or sequences in manifest order; the
    candidates are the checkpoints both cover.  Ties -> the lowest index.
    """
    _check_stage(stage, n_stages, manifest)
    if kl_best_to is None or kl_student_to is None:
        raise ValueError("selection 'scd_select' needs kl_best_to and kl_student_to (probe-set KLs to each "
                         "candidate checkpoint); the distillation recipe computes them")
    scores = scd_scores(kl_best_to, kl_student_to, manifest)
    return min(scores, key=lambda c: (scores[c], c))


def select_checkpoint(name: str, stage: int, n_stages: int, manifest: Manifest,
                      kl_best_to=None, kl_student_to=None) -> int:
    """Checkpoint index for ``stage`` (0-based) under the registered selection rule ``name``."""
    return SELECTIONS.get(name)(stage, n_stages, manifest, kl_best_to=kl_best_to, kl_student_to=kl_student_to)
