"""Shared test helpers: the one tiny model shape, configs built from the shipped configs/*.yaml
plus dotted overrides, and a subprocess runner of the real CLI.

Test modules import the helpers with ``from tests.conftest import ...``; the fixtures below
need no import.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `from tests.conftest import ...` under a bare `pytest` too
    sys.path.insert(0, str(ROOT))

from scd.core.config import apply_overrides, load_config, load_yaml  # noqa: E402

# The one tiny model of the tests: a random-init 2-layer Llama (with the SmolLM2 tokenizer's 49k
# vocabulary, ~3.2 M parameters, almost all in the embedding).  Tests that need another shape say
# so with tiny_shape(num_hidden_layers=4, ...).
TINY_SHAPE = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64,
              "num_attention_heads": 4, "num_key_value_heads": 2}

# Wall-clock fields of metrics.jsonl rows: everything else of a resumed run equals the uninterrupted one.
TIME_KEYS = ("time", "switch_s", "probe_s", "probe_load_s")


def tiny_shape(**changes: Any) -> dict:
    """:data:`TINY_SHAPE` with ``changes`` (a fresh dict, for a config's ``model.tiny``)."""
    return {**TINY_SHAPE, **changes}


def tiny_config(**changes: Any):
    """:class:`scd.models.TinyConfig` of :func:`tiny_shape` (``tie_word_embeddings=False`` etc. in ``changes``)."""
    from scd.models import TinyConfig  # torch: only for the tests that build a model

    return TinyConfig(**tiny_shape(**changes))


def strip_time(rows: list[dict]) -> list[dict]:
    """metrics.jsonl rows without their wall-clock fields (:data:`TIME_KEYS`)."""
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]


# ------------------------------------------------------------------------ shipped configs
def shipped(path: str | os.PathLike) -> Path:
    """A shipped config's absolute path (``configs/scd/sft_tiny.yaml`` is relative to the repository)."""
    p = Path(path)
    return p if p.is_absolute() else ROOT / p


def _plain(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def dotted(overrides: Mapping[str, Any] | None) -> list[str]:
    """``{"train.max_steps": 2, "model.tiny": {...}}`` -> ``["train.max_steps=2", "model.tiny={...}"]``:
    the command-line form of :func:`scd.core.config.apply_overrides`, each value written as YAML so that
    it parses back to the same Python value (a mapping or list replaces the key's whole value)."""
    out = []
    for key, value in (overrides or {}).items():
        text = yaml.safe_dump(_plain(value), default_flow_style=True, width=1 << 30)
        text = text.removesuffix("...\n").strip()  # a scalar's dump ends with a document-end marker
        out.append(f"{key}={text}")
    return out


def shipped_data(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> dict:
    """The raw mapping of a shipped config with dotted ``overrides`` applied (not validated)."""
    data, _ = load_yaml(shipped(path))
    return apply_overrides(data, dotted(overrides))


def shipped_yaml(tmp_path: str | os.PathLike, path: str | os.PathLike,
                 overrides: Mapping[str, Any] | None = None, name: str | None = None) -> Path:
    """Write the shipped config ``path`` with ``overrides`` to ``tmp_path/<name or its file name>``;
    the file is validated only when loaded (tests of config errors load it themselves)."""
    out = Path(tmp_path) / (name or Path(path).name)
    text = yaml.safe_dump(shipped_data(path, overrides), sort_keys=False, allow_unicode=True)
    out.write_text(f"# {Path(path).as_posix()} + test overrides\n{text}", encoding="utf-8")
    return out


def load_shipped(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> Any:
    """The shipped config ``path`` with ``overrides``, validated into its recipe's dataclass."""
    return load_config(shipped(path), dotted(overrides))


# -------------------------------------------------------------------------------- the CLI
def cli_env(env: Mapping[str, str | None] | None = None, fault: str | None = None) -> dict:
    """Environment of a CLI subprocess: one thread, this checkout's code first on PYTHONPATH, no
    inherited fault injection (``fault`` sets ``SCD_FAULT``); ``env`` entries set to None are removed."""
    out = dict(os.environ, OMP_NUM_THREADS="1")
    out["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([out["PYTHONPATH"]] if out.get("PYTHONPATH") else []))
    out.pop("SCD_FAULT", None)
    if fault:
        out["SCD_FAULT"] = fault
    for key, value in (env or {}).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def cli_cmd(args: list) -> list[str]:
    return [sys.executable, "-m", "scd", *(str(a) for a in args)]


def run_cli(args: list, *, env: Mapping[str, str | None] | None = None, fault: str | None = None,
            cwd: str | os.PathLike = ROOT, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -m scd ARGS`` in a subprocess (environment: :func:`cli_env`); output captured as text."""
    return subprocess.run(cli_cmd(args), cwd=cwd, env=cli_env(env, fault), capture_output=True, text=True,
                          timeout=timeout)


def run_config(cfg: str | os.PathLike, run_dir: str | os.PathLike, **kw: Any) -> subprocess.CompletedProcess:
    """``python -m scd run CFG --run-dir RUN_DIR`` (see :func:`run_cli`)."""
    return run_cli(["run", cfg, "--run-dir", run_dir], **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(args: list, world: int, *, fault: str | None = None, cwd: str | os.PathLike = ROOT,
                 timeout: float = 900) -> list[subprocess.CompletedProcess]:
    """``world`` ranks of ``python -m scd ARGS`` with torchrun-style variables (RANK, WORLD_SIZE, ...; none of
    them for ``world`` 1), started together; waits for all of them."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        dist = {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port}
        if world == 1:
            dist.update(WORLD_SIZE=None, RANK=None, LOCAL_RANK=None)
        procs.append(subprocess.Popen(cli_cmd(args), cwd=cwd, env=cli_env(dist, fault), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def smol_tokenizer():
    from scd.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture()
def tiny_cfg():
    from scd.models import ModelConfig

    return ModelConfig(name="tiny", tiny=tiny_config())
