"""Teacher-logit cache (scd.teacher_cache): exactness, top-k error, reuse, corruption, staleness."""
import json
import warnings

import pytest
import torch

from scd.completion_loss import fused_kd_ce
from scd.heads import head_weight, target_hidden, target_labels, target_logits
from scd.losses import TopKTeacher
from scd.models import TinyConfig, tiny_model
from scd.core.train import collate as pad_batch
from scd.teacher_cache import CacheKey, TeacherLogitCache, data_hash, measure_gap

V = 101
SHAPE = TinyConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                   num_key_value_heads=2)


def encoded_examples(n=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, c = 3 + int(torch.randint(0, 8, (1,), generator=g)), 1 + i % 4
        ids = torch.randint(1, V, (p + c,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


@pytest.fixture()
def teacher():
    t = tiny_model(V, SHAPE, seed=7).eval()
    t.calls = 0

    def count(*_a, **_k):
        t.calls += 1
    t.register_forward_pre_hook(count)
    return t


def open_cache(root, teacher, enc, k, **kw):
    return TeacherLogitCache.open_or_build(root, teacher, "sha-teacher", enc, k=k, max_len=32, batch_size=4,
                                           shard_examples=4, **kw)


def kd_loss(student, batch, teacher_targets):
    h = target_hidden(student, batch)
    kd, _ = fused_kd_ce(h, head_weight(student)[0], teacher=teacher_targets, labels=target_labels(batch["labels"]))
    return kd.mean()


def test_full_cache_equals_live_teacher(tmp_path, teacher):
    enc = encoded_examples()
    cache = open_cache(tmp_path, teacher, enc, "full")
    assert cache.n_examples == 11 and cache.n_targets == sum(1 + i % 4 for i in range(11))
    idx = [9, 2, 5, 0]  # a training batch in collate order
    batch = pad_batch([enc[i] for i in idx], pad_id=0)
    with torch.no_grad():
        live = target_logits(teacher, batch)
    cached = cache.targets(idx)
    torch.testing.assert_close(cached, live, rtol=0, atol=1e-5)
    student = tiny_model(V, SHAPE, seed=1)
    l_live, l_cached = kd_loss(student, batch, live).detach(), kd_loss(student, batch, cached).detach()
    assert float(l_live) > 1e-3
    assert abs(float(l_live) - float(l_cached)) <= 1e-6 * float(l_live)
    assert measure_gap(cache, teacher, [enc[i] for i in idx], example_indices=idx) < 1e-6


def test_topk_error_is_bounded_and_decreases_with_k(tmp_path, teacher):
    enc = encoded_examples()
    idx = list(range(11))
    batch = pad_batch(enc, pad_id=0)
    student = tiny_model(V, SHAPE, seed=1)
    with torch.no_grad():
        exact = float(kd_loss(student, batch, target_logits(teacher, batch)))
    errs, gaps = [], []
    for k in (4, 16, 64, V):
        cache = open_cache(tmp_path, teacher, enc, k)
        assert isinstance(cache.targets(idx), TopKTeacher) and cache.targets(idx).k == k
        with torch.no_grad():
            errs.append(exact - float(kd_loss(student, batch, cache.targets(idx))))
        gaps.append(measure_gap(cache, teacher, enc, example_indices=idx))
        # the cached targets of training examples = the live top-k of the probe path
        assert abs(gaps[-1] - measure_gap(cache, teacher, enc)) < 1e-5
    print("top-k KD error", dict(zip((4, 16, 64, V), errs)), "KL gap", dict(zip((4, 16, 64, V), gaps)))
    assert all(e >= -1e-5 for e in errs)  # bucketed forward KL is a lower bound (data processing)
    assert errs[0] > errs[1] > errs[2] > abs(errs[3]) and abs(errs[3]) < 1e-5  # k = V exact
    assert errs[0] < exact  # bounded by the loss itself
    assert gaps[0] > gaps[1] > gaps[2] > 0 and gaps[3] < 1e-5


def test_second_open_does_no_teacher_forward(tmp_path, teacher):
    enc = encoded_examples()
    first = open_cache(tmp_path, teacher, enc, 8)
    assert teacher.calls == 3  # 3 shards of 4, 4, 3 examples at batch 4
    assert first.built_shards == 3 and first.teacher_forwards == 3
    calls = teacher.calls
    second = open_cache(tmp_path, teacher, enc, 8)
    assert teacher.calls == calls and second.built_shards == 0 and second.id == first.id
    third = open_cache(tmp_path, None, enc, 8)  # complete: no teacher needed at all
    a, b = first.targets([3, 10]), third.targets([3, 10])
    assert torch.equal(a.logp, b.logp) and torch.equal(a.idx, b.idx)
    assert json.loads((first.path / "index.json").read_text())["key"]["k"] == 8


def test_corrupt_shard_detected_and_rebuilt(tmp_path, teacher):
    enc = encoded_examples()
    cache = open_cache(tmp_path, teacher, enc, "full")
    ref = cache.targets([5, 6])
    shard = cache.path / "shard-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-20:-10] = bytes(b ^ 0xFF for b in raw[-20:-10])  # flip bytes in the data
    shard.write_bytes(bytes(raw))
    calls = teacher.calls
    with pytest.warns(UserWarning, match="corrupt"):
        again = open_cache(tmp_path, teacher, enc, "full")
    assert again.built_shards == 1 and teacher.calls == calls + 1  # only that shard's 4 examples
    assert torch.equal(again.targets([5, 6]), ref)
    (cache.path / "shard-00002.safetensors").unlink()
    with pytest.warns(UserWarning, match="missing"):
        assert open_cache(tmp_path, teacher, enc, "full").built_shards == 1
    with pytest.raises(Exception, match="incomplete"):
        (cache.path / "shard-00000.safetensors").unlink()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            open_cache(tmp_path, None, enc, "full")


def test_shared_prefix_cache_has_its_own_id_and_equal_values(tmp_path, teacher, monkeypatch):
    """A cache built with train.share_prefix (the examples' common prompt prefix run once per batch)
    holds the plain cache's values to float rounding, under its own id; off, the id is the old one."""
    import scd.heads
    seen = []
    original = scd.heads.shared_prefix_len
    monkeypatch.setattr(scd.heads, "shared_prefix_len", lambda *a: seen.append(original(*a)) or seen[-1])
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(1, V, (18,), generator=g).tolist()
    enc = [{"input_ids": prefix + e["input_ids"], "labels": [-100] * 18 + e["labels"]} for e in encoded_examples()]
    plain = TeacherLogitCache.open_or_build(tmp_path, teacher, "sha-teacher", enc, k="full", max_len=64,
                                            batch_size=4, shard_examples=4)
    shared = TeacherLogitCache.open_or_build(tmp_path, teacher, "sha-teacher", enc, k="full", max_len=64,
                                             batch_size=4, shard_examples=4, share_prefix=True)
    assert shared.id != plain.id and shared.built_shards == 3
    assert len(seen) == 3 and min(seen) >= 18  # one shared-prefix forward per batch of the build
    assert "share_prefix" not in plain.key.to_dict() and shared.key.to_dict()["share_prefix"] is True
    idx = list(range(len(enc)))
    torch.testing.assert_close(shared.targets(idx), plain.targets(idx), rtol=1e-5, atol=1e-5)


def test_key_change_rebuilds(tmp_path, teacher):
    enc = encoded_examples()
    a = open_cache(tmp_path, teacher, enc, 8)
    calls = teacher.calls
    b = open_cache(tmp_path, teacher, enc, 16)  # other k: other id, built anew
    c = TeacherLogitCache.open_or_build(tmp_path, teacher, "sha-other", enc, k=8, max_len=32, batch_size=4,
                                        shard_examples=4)  # other teacher checkpoint
    enc2 = encoded_examples(seed=1)
    d = open_cache(tmp_path, teacher, enc2, 8)  # other data
    assert len({a.id, b.id, c.id, d.id}) == 4 and teacher.calls == calls + 9
    assert data_hash(enc) != data_hash(enc2)
    # a stale index under the right id (e.g. written by an older key schema) is never used
    index = json.loads((a.path / "index.json").read_text())
    index["key"]["max_len"] = 64
    (a.path / "index.json").write_text(json.dumps(index))
    with pytest.warns(UserWarning, match="stale .*max_len"):
        again = open_cache(tmp_path, teacher, enc, 8)
    assert again.built_shards == 3 and json.loads((a.path / "index.json").read_text())["key"]["max_len"] == 32


def test_bad_arguments():
    with pytest.raises(Exception, match="positive int or 'full'"):
        CacheKey("t", "d", 8, k=0)
    with pytest.raises(Exception, match="dtype"):
        CacheKey("t", "d", 8, k=4, dtype="int8")
    assert CacheKey("t", "d", 8, k=4).id != CacheKey("t", "d", 8, k=4, temperature=2.0).id
