"""Security rules (docs/reliability.md): weights only through safetensors or
``torch.load(weights_only=True)``, no pickle / eval / exec / unsafe YAML, trust_remote_code
off unless a config says so, asset downloads pinned by sha256, and results paths that
cannot escape the results directory."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from scd.cli import main as cli_main
from scd.core.results import ResultsError, safe_join
from tests.reliability._helpers import REPO, SHAPE

PACKAGES = ("scd", "unisd", "benchmarks")


def sources() -> list[Path]:
    out = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    assert len(out) > 30
    return out


def calls(path: Path):
    """(dotted callee name, ast.Call) of every call in a source file."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), node


def kw(node: ast.Call, name: str):
    for k in node.keywords:
        if k.arg == name:
            return k.value
    return None


def test_every_torch_load_passes_weights_only_true():
    found = []
    for p in sources():
        for name, node in calls(p):
            if name == "torch.load":
                v = kw(node, "weights_only")
                where = f"{p.relative_to(REPO)}:{node.lineno}"
                assert isinstance(v, ast.Constant) and v.value is True, f"{where}: torch.load without weights_only=True"
                found.append(where)
    assert found, "no torch.load call found: the scan is broken"


def test_no_pickle_eval_exec_or_unsafe_yaml():
    banned = {"eval", "exec", "pickle.load", "pickle.loads", "marshal.loads", "yaml.load", "yaml.unsafe_load",
              "yaml.full_load", "dill.load", "cloudpickle.load", "__import__"}
    bad = []
    for p in sources():
        text = p.read_text()
        if re.search(r"^\s*import (c?pickle|dill|marshal)\b|^\s*from (c?pickle|dill) import", text, re.M):
            bad.append(f"{p.relative_to(REPO)}: imports a pickle module")
        for name, node in calls(p):
            if name in banned:
                bad.append(f"{p.relative_to(REPO)}:{node.lineno}: {name}(")
    assert not bad, bad


def test_trust_remote_code_is_off_unless_the_config_says_so():
    from scd.models import ModelConfig

    assert ModelConfig().trust_remote_code is False
    offenders = []
    for p in sources():
        for name, node in calls(p):
            v = kw(node, "trust_remote_code")
            if v is not None and isinstance(v, ast.Constant) and v.value is not False:
                offenders.append(f"{p.relative_to(REPO)}:{node.lineno}: {name}(trust_remote_code={v.value!r})")
    assert not offenders, offenders
    # every place that forwards it takes it from the model config
    forwarded = [ast.unparse(kw(node, "trust_remote_code")) for p in sources() for _, node in calls(p)
                 if kw(node, "trust_remote_code") is not None]
    assert forwarded and all(f in ("trust_remote_code", "cfg.trust_remote_code") or f.endswith(".trust_remote_code")
                             for f in forwarded), forwarded


def test_weights_are_written_as_safetensors():
    """save_pretrained always with safe_serialization=True; no torch.save of a state_dict outside the
    optimiser state (loaded back with weights_only=True)."""
    saves = []
    for p in sources():
        for name, node in calls(p):
            if name.endswith("save_pretrained") and "tokenizer" not in name and "tok" != name.split(".")[0]:
                v = kw(node, "safe_serialization")
                if v is not None:
                    assert isinstance(v, ast.Constant) and v.value is True, f"{p}:{node.lineno}"
            if name == "torch.save":
                saves.append(str(p.relative_to(REPO)))
    # optimiser/RNG state of the resumable checkpoint and the retrieval embedding cache (tensors only),
    # both read back with weights_only=True (test above)
    assert sorted(saves) == ["scd/core/engine.py", "unisd/retrieval.py"], saves


def test_every_asset_download_is_pinned_by_sha256(tmp_path):
    from scd.core import assets

    assert assets.DISTS
    for name, d in assets.DISTS.items():
        assert re.fullmatch(r"[0-9a-f]{64}", d.sha256), f"asset {name}: sha256 {d.sha256!r} is not 64 hex digits"
        assert d.version and d.filename, name
    # a file that does not match is refused and deleted
    d = next(iter(assets.DISTS.values()))
    f = tmp_path / d.filename
    f.write_bytes(b"tampered")
    with pytest.raises(assets.AssetError, match="sha256 mismatch"):
        assets.verify(f, d)
    assert not f.exists()


# ------------------------------------------------------------------------ results paths
@pytest.mark.parametrize("parts", [("..", "x"), ("a", "..", "..", "x"), ("/etc", "passwd"), ("../../x",)])
def test_safe_join_refuses_escapes(tmp_path, parts):
    with pytest.raises(ResultsError, match="escapes the results directory"):
        safe_join(tmp_path / "results", *parts)


def test_safe_join_refuses_symlink_escape(tmp_path):
    root = tmp_path / "results"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(ResultsError):
        safe_join(root, "link", "x")
    assert safe_join(root, "g", "run") == (root / "g" / "run").resolve()


SFT = f"""\
recipe: sft
method: METHOD
grid: GRID
model: {{name: tiny, tiny: {SHAPE}}}
data: {{tasks: [rotten_tomatoes], limit_per_task: 4}}
train: {{max_steps: 1, batch_size: 2, max_len: 64}}
"""


@pytest.mark.parametrize("method, grid", [("../../../escaped", "null"), ("sft", "../../escaped"),
                                          ("sft", "/tmp/escaped-abs")])
def test_cli_default_run_dir_cannot_escape(tmp_path, monkeypatch, capsys, method, grid):
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    cfg = work / "c.yaml"
    cfg.write_text(SFT.replace("METHOD", method).replace("GRID", grid))
    before = set(tmp_path.rglob("*"))
    rc = cli_main(["run", str(cfg), "--results-dir", str(work / "results")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: path ") and "escapes the results directory" in err[-1], err
    assert set(tmp_path.rglob("*")) == before  # nothing written anywhere
    assert not Path("/tmp/escaped-abs").exists()


def test_grid_run_dirs_cannot_escape(tmp_path):
    from benchmarks import grid as G

    with pytest.raises(ResultsError, match="escapes the results directory"):
        G.grid_dir(tmp_path / "results", "../../x")


def test_on_demand_teacher_run_dir_cannot_escape(tmp_path, monkeypatch):
    import tests.fake_recipe  # noqa: F401  (registers the pure-Python recipe "fake")
    from scd.distill import ensure_dependency

    monkeypatch.chdir(tmp_path)
    results = tmp_path / "work" / "results"
    (tmp_path / "work").mkdir()
    cfg = tmp_path / "work" / "teacher.yaml"
    cfg.write_text("recipe: fake\nmethod: ../../escaped\ntrain: {steps: 1}\n")
    before = set(tmp_path.rglob("*"))
    with pytest.raises(ResultsError, match="escapes the results directory"):
        ensure_dependency(str(cfg), 0, str(results), "teacher")
    assert set(tmp_path.rglob("*")) == before  # refused before anything was written
    # control: the same config with a plain method name is trained, inside the results dir
    cfg.write_text("recipe: fake\nmethod: teacher\ntrain: {steps: 1}\n")
    run_dir = ensure_dependency(str(cfg), 0, str(results), "teacher")
    assert results in run_dir.parents and (run_dir / "run.json").is_file()
    assert [p for p in tmp_path.rglob("run.json") if results not in p.parents] == []
