"""Adaptive weighting, the teacher checkpoint manifest, save schedules and selection rules."""
import json
import math

import pytest
import torch

from scd.core.registry import RegistryError, registry
from scd.losses import kl_divergence
from scd.schedule import (CheckpointEntry, Manifest, ManifestError, dev_loss_milestones, even_steps,
                          hash_checkpoint, read_manifest, save_steps, scd_scores, select_checkpoint,
                          should_save, verify_manifest as verify, write_manifest)
from scd.weighting import adaptive_weight, combine, sample_weights


# ------------------------------------------------------------------------------ weighting
def test_aw_limits():
    student = torch.tensor([1e-3, 5.0, 2.0])   # anchor student loss
    teacher = torch.tensor([5.0, 1e-3, 2.0])   # teacher checkpoint loss
    w = adaptive_weight(student, teacher)
    assert w[0] < 1e-3          # student far better -> gold labels dominate
    assert w[1] > 1 - 1e-3      # teacher far better -> KD dominates
    assert w[2] == 0.5          # equal -> even mix


def test_aw_matches_reference_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(100, generator=g, dtype=torch.float64) * 5 + 1e-3
    b = torch.rand(100, generator=g, dtype=torch.float64) * 5 + 1e-3
    w = adaptive_weight(a, b)
    assert torch.allclose(w, torch.sigmoid(torch.log(a / b)), atol=1e-14)
    assert torch.allclose(w, a / (a + b), atol=1e-14)


def test_aw_stable_for_tiny_and_huge_losses():
    a = torch.tensor([1e-38, 1e30, 1e-30, 0.0, 0.0, 3.0, math.inf, math.inf])
    b = torch.tensor([1e-38 * 3, 1e30 * 3, 1e30, 0.0, 2.0, 0.0, math.inf, 1.0])
    w = adaptive_weight(a, b)
    assert torch.isfinite(w).all()
    assert w[0].item() == pytest.approx(0.25, rel=1e-5)   # a/(a+b) in float32 would underflow the sum
    assert w[1].item() == pytest.approx(0.25, rel=1e-5)   # ... or overflow it
    assert w[2].item() == pytest.approx(1e-60, abs=1e-50)
    assert w[3:].tolist() == [0.5, 0.0, 1.0, 0.5, 1.0]
    assert w.dtype == torch.float32
    assert adaptive_weight(a.half()[:1].clamp_min(1e-4), b.half()[:1]).dtype == torch.float32


def test_aw_weight_is_detached_and_combine_gradients():
    a = torch.tensor([1.0, 3.0], requires_grad=True)
    b = torch.tensor([3.0, 1.0], requires_grad=True)
    w = adaptive_weight(a, b)
    assert not w.requires_grad
    kd = torch.tensor([2.0, 4.0], requires_grad=True)
    ce = torch.tensor([1.0, 1.0], requires_grad=True)
    w_live = a / (a + b)  # a weight that *would* carry gradient: combine must cut it
    loss = combine(kd, ce, w_live).sum()
    loss.backward()
    assert a.grad is None and b.grad is None
    assert torch.allclose(kd.grad, torch.tensor([0.25, 0.75]))
    assert torch.allclose(ce.grad, torch.tensor([0.75, 0.25]))
    assert torch.allclose(combine(kd, ce, w), torch.tensor([0.25 * 2 + 0.75, 0.75 * 4 + 0.25]))


def test_combine_broadcasts_over_tokens():
    kd = torch.arange(6.0).reshape(2, 3)
    ce = torch.ones(2, 3)
    out = combine(kd, ce, torch.tensor([1.0, 0.0]))
    assert torch.equal(out, torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="should be \\[B\\]"):
        combine(kd, ce, torch.tensor([0.5, 0.5, 0.5]))


def test_weighting_registry_rules():
    kd = torch.zeros(4)
    assert sample_weights("none", kd).tolist() == [1.0] * 4  # pure KD
    assert sample_weights("none", kd, alpha=0.3).tolist() == pytest.approx([0.3] * 4)
    w = sample_weights("aw", kd, student_anchor_loss=torch.tensor([1.0, 2.0, 3.0, 4.0]),
                       teacher_ckpt_loss=torch.tensor([1.0, 2.0, 1.0, 12.0]))
    assert w.tolist() == pytest.approx([0.5, 0.5, 0.75, 0.25])
    assert registry("weighting").get("aw").needs_losses and not registry("weighting").get("none").needs_losses
    with pytest.raises(ValueError, match="needs per-sample student_anchor_loss"):
        sample_weights("aw", kd)
    with pytest.raises(ValueError, match="unknown parameter 'beta'; accepted: alpha"):
        sample_weights("none", kd, beta=1.0)
    with pytest.raises(ValueError, match="alpha must be in"):
        sample_weights("none", kd, alpha=2.0)
    with pytest.raises(RegistryError, match="did you mean 'aw'"):
        sample_weights("awx", kd)


def test_aw_rejects_bad_losses():
    with pytest.raises(ValueError, match="sample 1 is nan"):
        adaptive_weight(torch.tensor([1.0, math.nan]), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="teacher checkpoint loss of sample 0 is -1.0"):
        adaptive_weight(torch.tensor([1.0]), torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="different shapes"):
        adaptive_weight(torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="per-sample losses \\[B\\]"):
        adaptive_weight(torch.ones(2, 2), torch.ones(2, 2))


# ------------------------------------------------------------------------------ manifest
def _save(dirpath, name, payload: bytes):
    d = dirpath / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.safetensors").write_bytes(payload)
    (d / "config.json").write_text("{}")  # not a weight file: not hashed
    return d


def _manifest(tmp_path, losses=(3.0, 2.0, 2.5), scores=(None, None, None)):
    m = Manifest(root=tmp_path, score_name="f1")
    for i, (l, s) in enumerate(zip(losses, scores)):
        m.add(step=100 * (i + 1), epoch=float(i + 1), path=_save(tmp_path, f"ckpt/step_{100 * (i + 1)}", bytes([i]) * 64),
              dev_loss=l, dev_score=s)
    return m


def test_manifest_roundtrip_relative_paths_and_verify(tmp_path):
    m = _manifest(tmp_path)
    p = write_manifest(m, tmp_path)
    assert p == tmp_path / "manifest.json"
    data = json.loads(p.read_text())
    assert data["best_index"] == 1 and data["checkpoints"][0]["path"] == "ckpt/step_100"
    assert set(data["checkpoints"][0]) == {"index", "step", "epoch", "path", "sha256", "dev_loss", "dev_score",
                                           "files", "extra"}
    # single weight file: digest == that file's sha256 (comparable with sha256sum)
    import hashlib
    assert data["checkpoints"][2]["sha256"] == hashlib.sha256(bytes([2]) * 64).hexdigest()
    # relocatable: move the whole directory
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    tmp_path.rename(moved)
    m2 = read_manifest(moved)
    assert m2 == m and m2.root == moved
    assert m2.resolve(1) == moved / "ckpt/step_200"
    verify(m2)


def test_verify_names_the_edited_checkpoint(tmp_path):
    m = _manifest(tmp_path)
    write_manifest(m, tmp_path)
    (tmp_path / "ckpt/step_200/config.json").write_text('{"edited": 1}')  # not a weight: still fine
    verify(read_manifest(tmp_path))
    (tmp_path / "ckpt/step_200/model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ManifestError, match=r"checkpoint 1 \(step 200.*modified after the manifest was written "
                                            r"\(changed: model.safetensors\)"):
        verify(read_manifest(tmp_path))
    verify(read_manifest(tmp_path), indices=[0, 2])  # the others are intact
    (tmp_path / "ckpt/step_300/model.safetensors").unlink()
    with pytest.raises(ManifestError, match=r"checkpoint 2 \(step 300.*missing or empty"):
        read_manifest(tmp_path).verify([2])


def test_sharded_checkpoint_hash(tmp_path):
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "model-00001-of-00002.safetensors").write_bytes(b"a")
    (d / "model-00002-of-00002.safetensors").write_bytes(b"b")
    digest, files = hash_checkpoint(d)
    assert len(files) == 2 and digest not in files.values()
    (d / "model-00002-of-00002.safetensors").write_bytes(b"c")
    assert hash_checkpoint(d)[0] != digest
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="holds no weight files"):
        hash_checkpoint(tmp_path / "empty")


def test_best_index_rules():
    def m(losses, scores, higher=True):
        return Manifest(checkpoints=[CheckpointEntry(i, 10 * (i + 1), i, f"c{i}", "x", l, s)
                                     for i, (l, s) in enumerate(zip(losses, scores))], higher_is_better=higher)
    assert m([3, 1, 2], [None] * 3).best_index == 1                       # lowest dev loss
    assert m([3, 1, 2], [0.5, 0.7, 0.9]).best_index == 2                  # dev score wins over loss
    assert m([3, 1, 2], [0.5, 0.7, 0.9], higher=False).best_index == 0    # e.g. an error rate
    assert m([1, 1, 2], [None] * 3).best_index == 0                       # tie -> lowest index
    assert m([3, 1, 2], [0.9, math.nan, 0.9]).best_index == 0             # NaN ignored; tie -> lowest
    assert m([None] * 3, [None] * 3).best_index is None


def test_manifest_validation_errors(tmp_path):
    m = _manifest(tmp_path)
    p = write_manifest(m, tmp_path)
    data = json.loads(p.read_text())
    bad = json.loads(json.dumps(data))
    del bad["checkpoints"][1]["sha256"]
    with pytest.raises(ManifestError, match=r"checkpoints\[1\]: missing key 'sha256'"):
        Manifest.from_dict(bad, "m.json")
    bad = json.loads(json.dumps(data))
    bad["checkpoints"][0]["dev_los"] = 1.0
    with pytest.raises(ManifestError, match=r"checkpoints\[0\]: unknown key 'dev_los'"):
        Manifest.from_dict(bad, "m.json")
    bad = json.loads(json.dumps(data))
    bad["checkpoints"][2]["step"] = 50
    with pytest.raises(ManifestError, match="step 50 is not after"):
        Manifest.from_dict(bad, "m.json")
    bad = json.loads(json.dumps(data))
    bad["checkpoints"][1]["dev_loss"] = 9.0  # best moves to 2, but the stored best_index says 1
    with pytest.raises(ManifestError, match="best_index is 1 but the dev metrics make it 2"):
        Manifest.from_dict(bad, "m.json")
    with pytest.raises(ManifestError, match="teacher manifest not found"):
        read_manifest(tmp_path / "nope.json")
    with pytest.raises(ManifestError, match="differs from the directory"):
        m.write(tmp_path / "sub" / "manifest.json")
    with pytest.raises(ManifestError, match="not after the last one"):
        m.add(step=300, epoch=3.0, path=tmp_path / "ckpt/step_300")


# -------------------------------------------------------------------------- save schedules
def test_even_steps():
    assert even_steps(300, n_checkpoints=3) == [100, 200, 300]
    assert even_steps(10, n_checkpoints=3) == [3, 6, 10]
    assert even_steps(7, n_checkpoints=7) == list(range(1, 8))
    assert save_steps("even_steps", 100, n_checkpoints=4) == [25, 50, 75, 100]
    assert should_save("even_steps", 50, 100, n_checkpoints=4) and not should_save("even_steps", 51, 100, n_checkpoints=4)
    with pytest.raises(ValueError, match="do not fit"):
        even_steps(2, n_checkpoints=3)


HISTORY = [(0, 4.0), (10, 3.6), (20, 3.4), (30, 2.9), (40, 2.45), (50, 2.05), (60, 2.0), (70, 2.1)]


def test_dev_loss_milestones_offline():
    # L0 = 4, min = 2: thresholds 3.5 (f=.25), 3.0 (f=.5), 2.5 (f=.75), 2.0 (f=1)
    assert dev_loss_milestones(70, dev_history=HISTORY) == [20, 30, 40, 70]
    assert dev_loss_milestones(70, dev_history=HISTORY, fractions=(0.25, 0.5, 0.75, 1.0)) == [20, 30, 40, 60, 70]
    # two fractions reached at the same evaluation give one checkpoint
    assert dev_loss_milestones(70, dev_history=HISTORY, fractions=(0.5, 0.55)) == [30, 70]
    assert dev_loss_milestones(70, dev_history=HISTORY[:1]) == [70]            # nothing observed yet
    assert dev_loss_milestones(70, dev_history=[(0, 2.0), (10, 2.5)]) == [70]  # no improvement
    assert registry("save_schedule").get("dev_loss_milestones").needs_dev_history


def test_dev_loss_milestones_online_is_prefix_stable():
    # with a fixed floor, a milestone once returned stays returned as evaluations arrive
    seen: set[int] = set()
    for n in range(1, len(HISTORY) + 1):
        now = set(dev_loss_milestones(70, dev_history=HISTORY[:n], floor=0.0)) - {70}
        assert seen <= now
        seen = now
    # floor 0: thresholds 3.0, 2.0, 1.0 -> first hits at steps 30 and 60; 1.0 never reached
    assert sorted(seen) == [30, 60]
    with pytest.raises(ValueError, match="fractions"):
        dev_loss_milestones(70, dev_history=HISTORY, fractions=(0.0,))


# -------------------------------------------------------------------------- selection rules
def _four(best_scores=(0.1, 0.4, 0.9, 0.6)):
    return Manifest(checkpoints=[CheckpointEntry(i, 10 * (i + 1), i, f"c{i}", "x", None, s)
                                 for i, s in enumerate(best_scores)])


def test_final_best_and_fixed_order():
    m = _four()
    assert [select_checkpoint("final", s, 3, m) for s in range(3)] == [3, 3, 3]
    assert [select_checkpoint("best", s, 3, m) for s in range(3)] == [2, 2, 2]
    assert [select_checkpoint("fixed_order", s, 4, m) for s in range(4)] == [0, 1, 2, 3]
    assert [select_checkpoint("fixed_order", s, 2, m) for s in range(2)] == [1, 3]
    assert [select_checkpoint("fixed_order", s, 8, m) for s in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [select_checkpoint("fixed_order", s, 3, m) for s in range(3)] == [1, 2, 3]
    assert select_checkpoint("fixed_order", 0, 1, m) == 3
    with pytest.raises(ValueError, match="stage 4 out of range"):
        select_checkpoint("fixed_order", 4, 4, m)
    with pytest.raises(ManifestError, match="no checkpoint in the teacher manifest has a dev_score"):
        select_checkpoint("best", 0, 1, _four((None,) * 4))
    with pytest.raises(RegistryError, match="did you mean 'scd_select'"):
        select_checkpoint("scd_selct", 0, 1, m)


def test_scd_select_constructed_case():
    m = _four()
    kl_best = {0: 3.0, 1: 2.0, 2: 0.0, 3: 1.0}
    kl_student = {0: 0.1, 1: 0.3, 2: 2.5, 3: 3.5}
    # sums: 3.1, 2.3, 2.5, 4.5 -> checkpoint 1
    assert scd_scores(kl_best, kl_student, m) == {0: 3.1, 1: 2.3, 2: 2.5, 3: 4.5}
    assert select_checkpoint("scd_select", 0, 4, m, kl_best, kl_student) == 1
    # as the student moves on, the choice moves towards the best checkpoint
    assert select_checkpoint("scd_select", 1, 4, m, kl_best, {0: 2.0, 1: 1.0, 2: 0.2, 3: 1.0}) == 2
    # sequences in manifest order work too
    assert select_checkpoint("scd_select", 0, 4, m, [3.0, 2.0, 0.0, 1.0], [0.1, 0.3, 2.5, 3.5]) == 1
    # ties -> lowest index
    assert select_checkpoint("scd_select", 0, 4, m, {0: 1.0, 1: 0.5, 2: 0.5, 3: 0.0},
                             {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.5}) == 1
    # a subset of candidates
    assert select_checkpoint("scd_select", 0, 4, m, {2: 0.0, 3: 1.0}, {2: 2.5, 3: 1.0}) == 3
    assert registry("selection").get("scd_select").needs_probe_kl


def test_scd_select_on_distributions():
    # Probe-set KLs computed from logits.  Teacher trajectory z_a = base + a * dir,
    # a = 0..4, best = the last.  For small steps KL is ~quadratic and symmetric, so
    # KL(best || c) + KL(student || c) is minimal halfway between student and best.
    g = torch.Generator().manual_seed(3)
    base = torch.randn(32, 20, generator=g, dtype=torch.float64)
    direction = 0.1 * torch.randn(32, 20, generator=g, dtype=torch.float64)
    ckpt_logits = [base + a * direction for a in range(5)]
    m = Manifest(checkpoints=[CheckpointEntry(i, 10 * (i + 1), i, f"c{i}", "x", None, 0.1 * i) for i in range(5)])
    assert m.best_index == 4

    def probe(student_logits):
        kb = {c: kl_divergence(ckpt_logits[4], z).mean().item() for c, z in enumerate(ckpt_logits)}
        ks = {c: kl_divergence(student_logits, z).mean().item() for c, z in enumerate(ckpt_logits)}
        return kb, ks

    assert select_checkpoint("scd_select", 0, 3, m, *probe(ckpt_logits[0])) == 2   # halfway from 0 to 4
    assert select_checkpoint("scd_select", 1, 3, m, *probe(ckpt_logits[2])) == 3   # halfway from 2 to 4
    assert select_checkpoint("scd_select", 2, 3, m, *probe(ckpt_logits[4])) == 4   # student caught up


def test_scd_select_errors():
    m = _four()
    with pytest.raises(ValueError, match="needs kl_best_to and kl_student_to"):
        select_checkpoint("scd_select", 0, 1, m)
    with pytest.raises(ValueError, match="covers checkpoints"):
        select_checkpoint("scd_select", 0, 1, m, {0: 1.0, 1: 1.0}, {0: 1.0})
    with pytest.raises(ValueError, match=r"kl_student_to\[1\] is NaN"):
        select_checkpoint("scd_select", 0, 1, m, {0: 1.0, 1: 1.0}, {0: 1.0, 1: math.nan})
    with pytest.raises(ValueError, match="checkpoint 7, not in the manifest"):
        select_checkpoint("scd_select", 0, 1, m, {7: 1.0}, {7: 1.0})
    with pytest.raises(ValueError, match="3 values for 4 checkpoints"):
        select_checkpoint("scd_select", 0, 1, m, [1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
