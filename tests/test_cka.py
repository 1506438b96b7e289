"""CKA estimators: properties, agreement with slow references, streaming, masking, models."""
from __future__ import annotations

import itertools
import math
import statistics

import pytest
import torch

from benchmarks import cka as C
from tests.conftest import tiny_config

F64 = torch.float64


def randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64)


def orthogonal(d, seed=0):
    q, r = torch.linalg.qr(randn(d, d, seed=seed))
    return q * torch.sign(torch.diagonal(r))


# ---------------------------------------------------------------- slow references
def ref_hsic_biased(K, L):
    """tr(K H L H) / (n-1)^2 with explicit H = I - 11^T/n."""
    n = K.shape[0]
    H = torch.eye(n, dtype=F64) - torch.ones(n, n, dtype=F64) / n
    return float(torch.trace(K @ H @ L @ H)) / (n - 1) ** 2


def ref_cka(K, L, hsic):
    return hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))


def ref_rbf(X, factor=1.0):
    """Pairwise distances by loops, median over distinct pairs via statistics.median."""
    n = X.shape[0]
    rows = X.tolist()
    dist = [[math.sqrt(sum((a - b) ** 2 for a, b in zip(rows[i], rows[j]))) for j in range(n)] for i in range(n)]
    sigma = factor * statistics.median(dist[i][j] for i in range(n) for j in range(i + 1, n))
    return torch.tensor([[math.exp(-dist[i][j] ** 2 / (2 * sigma ** 2)) for j in range(n)] for i in range(n)],
                        dtype=F64)


def ref_hsic_unbiased_loops(K, L):
    """The HSIC_1 formula of METHODS.md term by term with Python loops."""
    n = K.shape[0]
    k = [[0.0 if i == j else float(K[i, j]) for j in range(n)] for i in range(n)]
    m = [[0.0 if i == j else float(L[i, j]) for j in range(n)] for i in range(n)]
    tr = sum(k[i][j] * m[j][i] for i in range(n) for j in range(n))
    sk = sum(k[i][j] for i in range(n) for j in range(n))
    sl = sum(m[i][j] for i in range(n) for j in range(n))
    kl = sum(k[i][j] * m[j][q] for i in range(n) for j in range(n) for q in range(n))
    return (tr + sk * sl / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * kl) / (n * (n - 3))


def ref_hsic_ustat(K, L):
    """Song et al. 2007 as a U-statistic over ordered 4-tuples of distinct indices:
    (n-4)!/n! sum (k_ij l_ij + k_ij l_qr - 2 k_ij l_iq)."""
    n = K.shape[0]
    k, m = K.tolist(), L.tolist()
    tot = 0.0
    for i, j, q, r in itertools.permutations(range(n), 4):
        tot += k[i][j] * m[i][j] + k[i][j] * m[q][r] - 2 * k[i][j] * m[i][q]
    return tot * math.factorial(n - 4) / math.factorial(n)


# ---------------------------------------------------------------- properties
def test_self_similarity_is_one():
    X = randn(50, 7)
    assert C.linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert C.kernel_cka(C.rbf_kernel(X), C.rbf_kernel(X)) == pytest.approx(1.0, abs=1e-12)
    K = X @ X.T
    assert C.kernel_cka(K, K, unbiased=True) == pytest.approx(1.0, abs=1e-12)
    mb = C.MinibatchCKA()
    for s in range(3):
        Xb = randn(16, 7, seed=s)
        mb.update(Xb, Xb)
    assert mb.compute() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("side", ["x", "y"])
def test_invariant_to_orthogonal_scaling_and_shift(side):
    X, Y = randn(60, 6, seed=1), randn(60, 6, seed=2) + 0.5 * randn(60, 6, seed=1)
    base = {"linear": C.linear_cka(X, Y),
            "unbiased": C.kernel_cka(X @ X.T, Y @ Y.T, unbiased=True),
            "rbf": C.kernel_cka(C.rbf_kernel(X), C.rbf_kernel(Y))}
    assert 0.1 < base["linear"] < 0.9  # a non-trivial value, so invariance is not vacuous
    Q = orthogonal(6, seed=3)
    for f in (lambda Z: Z @ Q, lambda Z: 3.7 * Z, lambda Z: 0.01 * Z @ Q, lambda Z: Z + 100.0):
        X2, Y2 = (f(X), Y) if side == "x" else (X, f(Y))
        assert C.linear_cka(X2, Y2) == pytest.approx(base["linear"], abs=1e-10)
        Xc, Yc = C.center(X2), C.center(Y2)
        assert C.kernel_cka(Xc @ Xc.T, Yc @ Yc.T, unbiased=True) == pytest.approx(base["unbiased"], abs=1e-10)
        assert C.kernel_cka(C.rbf_kernel(X2), C.rbf_kernel(Y2)) == pytest.approx(base["rbf"], abs=1e-10)


def test_not_invariant_to_general_linear_map():
    X = randn(200, 10, seed=4)
    A = randn(10, 10, seed=5)  # invertible, not orthogonal
    assert torch.linalg.matrix_rank(A) == 10
    assert C.linear_cka(X, X @ A) < 0.9
    stretch = torch.diag(torch.logspace(0, 2, 10, dtype=F64)) @ orthogonal(10, seed=6)
    assert C.linear_cka(X, X @ stretch) < 0.6
    assert C.kernel_cka(C.rbf_kernel(X), C.rbf_kernel(X @ stretch)) < 0.6


# ---------------------------------------------------------------- references
@pytest.mark.parametrize("shape", [(40, 5, 3), (12, 30, 20)])  # feature form / Gram form branches
def test_linear_matches_kernel_formula_reference(shape):
    n, dx, dy = shape
    X, Y = randn(n, dx, seed=7), randn(n, dy, seed=8) + randn(n, dx, seed=7)[:, :1] * 2
    ref = ref_cka(X @ X.T, Y @ Y.T, ref_hsic_biased)
    assert C.linear_cka(X, Y) == pytest.approx(ref, abs=1e-12)
    assert C.kernel_cka(X @ X.T, Y @ Y.T) == pytest.approx(ref, abs=1e-12)
    assert float(C.hsic_biased(X @ X.T, Y @ Y.T)) == pytest.approx(ref_hsic_biased(X @ X.T, Y @ Y.T), rel=1e-12)


def test_rbf_matches_reference():
    X, Y = randn(15, 4, seed=9), randn(15, 3, seed=10)
    Y[:, 0] += X[:, 0]
    for factor in (1.0, 0.5):
        Kr, Lr = ref_rbf(X, factor), ref_rbf(Y, factor)
        K, L = C.rbf_kernel(X, factor=factor), C.rbf_kernel(Y, factor=factor)
        torch.testing.assert_close(K, Kr, rtol=1e-10, atol=1e-12)
        assert C.kernel_cka(K, L) == pytest.approx(ref_cka(Kr, Lr, ref_hsic_biased), abs=1e-10)
        assert C.kernel_cka(K, L, unbiased=True) == pytest.approx(ref_cka(Kr, Lr, ref_hsic_unbiased_loops),
                                                                  abs=1e-10)
    assert C.rbf_kernel(X, sigma=2.0)[0, 1] == pytest.approx(math.exp(-float((X[0] - X[1]).square().sum()) / 8))
    # degenerate bandwidth: the sigma -> 0 limit, finite
    same = torch.ones(5, 3, dtype=F64)
    assert torch.equal(C.rbf_kernel(same), torch.ones(5, 5, dtype=F64))


def test_unbiased_hsic_matches_loops_and_u_statistic():
    for n, seed in ((4, 0), (6, 1), (7, 2)):
        X, Y = randn(n, 3, seed=seed), randn(n, 2, seed=seed + 10)
        K, L = X @ X.T, C.rbf_kernel(Y)
        got = float(C.hsic_unbiased(K, L))
        assert got == pytest.approx(ref_hsic_unbiased_loops(K, L), rel=1e-10, abs=1e-12)
        assert got == pytest.approx(ref_hsic_ustat(K, L), rel=1e-10, abs=1e-12)


def test_unbiased_pairs_match_single_pairs():
    n = 9
    Ks = torch.stack([C.linear_gram(randn(n, 4, seed=s)) for s in range(3)])
    Ls = torch.stack([C.rbf_kernel(randn(n, 5, seed=10 + s)) for s in range(2)])
    P = C.hsic_unbiased_pairs(Ks, Ls)
    assert P.shape == (3, 2)
    for a in range(3):
        for b in range(2):
            assert float(P[a, b]) == pytest.approx(ref_hsic_unbiased_loops(Ks[a], Ls[b]), rel=1e-10)
    S = C.hsic_unbiased_self(Ks)
    for a in range(3):
        assert float(S[a]) == pytest.approx(float(C.hsic_unbiased(Ks[a], Ks[a])), rel=1e-12)


def test_unbiased_hsic_is_shift_invariant():
    # why CKAMatrix/MinibatchCKA may centre each batch before forming linear Grams
    X, Y = randn(10, 3, seed=1), randn(10, 4, seed=2)
    a = float(C.hsic_unbiased(X @ X.T, Y @ Y.T))
    Xs = X + torch.tensor([5.0, -3.0, 40.0], dtype=F64)
    assert float(C.hsic_unbiased(Xs @ Xs.T, Y @ Y.T)) == pytest.approx(a, rel=1e-9)


def test_unbiased_minibatch_near_zero_for_independent_inputs_biased_is_not():
    mb, biased = C.MinibatchCKA(), []
    for s in range(20):
        X, Y = randn(32, 8, seed=2 * s), randn(32, 8, seed=2 * s + 1)
        mb.update(X, Y)
        biased.append(C.linear_cka(X, Y))
    assert abs(mb.compute()) < 0.05
    assert statistics.mean(biased) > 0.15  # ~0.2: the O(1/n) inflation of the biased estimator
    assert mb.n_batches == 20 and mb.n == 640


def test_unbiased_needs_four_samples():
    K = torch.eye(3, dtype=F64)
    with pytest.raises(ValueError, match="n >= 4"):
        C.hsic_unbiased(K, K)
    with pytest.raises(ValueError, match="n >= 4"):
        C.kernel_cka(K, K, unbiased=True)
    with pytest.raises(ValueError, match="n >= 4"):
        C.MinibatchCKA().update(randn(3, 2), randn(3, 2))
    with pytest.raises(ValueError, match="n >= 4"):
        C.CKAMatrix(1, 1, "unbiased_minibatch").update([randn(3, 2)], [randn(3, 2)])
    with pytest.raises(ValueError, match="before any update"):
        C.MinibatchCKA().compute()


def test_negative_hsic_gives_zero_not_nan():
    X = torch.full((6, 3), 3.7, dtype=F64)  # constant representation: HSIC_1(K, K) = 0 exactly,
    K = X @ X.T                             # but rounding makes it slightly negative
    L = C.linear_gram(randn(6, 2))
    assert float(C.hsic_unbiased(K, K)) < 0
    assert C.kernel_cka(K, L, unbiased=True) == 0.0
    assert C.kernel_cka(K, K, unbiased=True) == 0.0
    out = C.cka_from_hsic(torch.tensor([[0.3, -0.2], [0.1, 0.5]], dtype=F64), torch.tensor([-1e-9, 4.0], dtype=F64),
                          torch.tensor([1.0, 0.0], dtype=F64))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0], [0.05, 0.0]], dtype=F64))
    assert float(C.cka_from_hsic(torch.tensor([[-0.1]]), torch.tensor([1.0]), torch.tensor([1.0]))) == pytest.approx(-0.1)
    mb = C.MinibatchCKA()
    mb.update(K.new_full((6, 3), 2.0), randn(6, 2))
    assert mb.compute() == 0.0
    M = C.CKAMatrix(2, 1, "unbiased_minibatch")
    M.update([torch.full((8, 3), 2.0), randn(8, 3)], [randn(8, 3)])
    res = M.compute()
    assert torch.isfinite(res).all() and res[0, 0] == 0.0


# ---------------------------------------------------------------- layer-pair matrices
def _layers(n, dims, seed, offset=0.0):
    base = randn(n, 4, seed=12345)  # shared by both "models": related representations
    out = []
    for i, d in enumerate(dims):
        W = randn(4, d, seed=100 + seed + i)
        out.append(base @ W + 0.5 * randn(n, d, seed=200 + seed + i) + offset)
    return out


def test_streaming_linear_matrix_equals_direct():
    n = 90
    A = _layers(n, [6, 6, 6], seed=1, offset=1e4)    # big means: LLM-like outlier offsets
    B = _layers(n, [5, 9], seed=2, offset=-3e3)
    M = C.CKAMatrix(3, 2, "linear")
    for lo, hi in ((0, 7), (7, 40), (40, 41), (41, 41), (41, 90)):  # uneven, a single row, an empty batch
        M.update([a[lo:hi] for a in A], [b[lo:hi].float() for b in B])  # float32 in, float64 math
    R = M.compute()
    assert M.n == n and R.shape == (3, 2) and R.dtype == F64
    for i in range(3):
        for j in range(2):
            ref = C.linear_cka(A[i], B[j].float())
            assert float(R[i, j]) == pytest.approx(ref, abs=1e-10)
    assert 0.2 < float(R.min()) and float(R.max()) < 0.99  # non-trivial values


def test_minibatch_matrix_matches_pairwise_minibatch_cka():
    A = _layers(48, [5, 5], seed=3)
    B = _layers(48, [7, 7, 7], seed=4)
    for est, kernel in (("unbiased_minibatch", "linear"), ("rbf", "rbf")):
        M = C.CKAMatrix(2, 3, est)
        pair = [[C.MinibatchCKA(kernel) for _ in range(3)] for _ in range(2)]
        for lo in range(0, 48, 16):
            M.update([a[lo:lo + 16] for a in A], [b[lo:lo + 16] for b in B])
            for i in range(2):
                for j in range(3):
                    pair[i][j].update(A[i][lo:lo + 16], B[j][lo:lo + 16])
        R = M.compute()
        for i in range(2):
            for j in range(3):
                assert float(R[i, j]) == pytest.approx(pair[i][j].compute(), abs=1e-10)
    # one batch of RBF == kernel_cka with unbiased HSIC
    M = C.CKAMatrix(1, 1, "rbf", rbf_factor=0.7)
    M.update([A[0]], [B[0]])
    ref = C.kernel_cka(C.rbf_kernel(A[0], factor=0.7), C.rbf_kernel(B[0], factor=0.7), unbiased=True)
    assert float(M.compute()[0, 0]) == pytest.approx(ref, abs=1e-12)


def test_minibatch_buffering_uses_fixed_size_minibatches():
    A, B = _layers(50, [4], seed=5), _layers(50, [3], seed=6)
    M = C.CKAMatrix(1, 1, "unbiased_minibatch", minibatch_size=16)
    for lo, hi in ((0, 5), (5, 30), (30, 50)):  # uneven incoming batches
        M.update([A[0][lo:hi]], [B[0][lo:hi]])
    ref = C.MinibatchCKA()
    for lo, hi in ((0, 16), (16, 32), (32, 48)):
        ref.update(A[0][lo:hi], B[0][lo:hi])
    # 2 leftover rows (< 4) are dropped and reported
    assert M.minibatches == 3 and M.dropped == 2 and M.n == 50
    assert float(M.compute()[0, 0]) == pytest.approx(ref.compute(), abs=1e-12)
    M.update([A[0][:3]], [B[0][:3]])  # leftover now 5 -> a final smaller minibatch
    ref.update(torch.cat([A[0][48:], A[0][:3]]), torch.cat([B[0][48:], B[0][:3]]))
    assert M.minibatches == 4 and M.dropped == 0
    assert float(M.compute()[0, 0]) == pytest.approx(ref.compute(), abs=1e-12)
    assert float(M.compute()[0, 0]) == pytest.approx(ref.compute(), abs=1e-12)  # compute() has no side effects


def test_matrix_input_errors():
    with pytest.raises(ValueError, match="unknown CKA estimator 'cosine'"):
        C.CKAMatrix(1, 1, "cosine")
    M = C.CKAMatrix(2, 1)
    with pytest.raises(ValueError, match="expected 2 layer states, got 1"):
        M.update([randn(5, 2)], [randn(5, 2)])
    with pytest.raises(ValueError, match="same number of rows"):
        M.update([randn(5, 2), randn(4, 2)], [randn(5, 2)])
    with pytest.raises(ValueError, match="at least 2 samples"):
        M.compute()


def test_matched_layers_relative_depth():
    assert C.matched_layers(4, 4) == [0, 1, 2, 3]
    assert C.matched_layers(4, 8) == [0, 2, 5, 7]
    assert C.matched_layers(8, 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert C.matched_layers(15, 30) == [round(i * 29 / 14 + 1e-9) for i in range(15)]
    assert C.matched_layers(1, 5) == [4]


# ---------------------------------------------------------------- masking and models
def test_select_units_ignores_masked_positions():
    h = randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    garbage = h.clone()
    garbage[mask == 0] = 1e6 * randn(int((mask == 0).sum()), 3, seed=9)
    for unit in ("tokens", "mean_pool"):
        torch.testing.assert_close(C.select_units(h, mask, unit), C.select_units(garbage, mask, unit))
    tok = C.select_units(h, mask, "tokens")
    assert tok.shape == (7, 3)
    pooled = C.select_units(h, mask, "mean_pool")
    torch.testing.assert_close(pooled[1], h[1, 1:].mean(0))
    empty = torch.tensor([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    assert C.select_units(h, empty, "mean_pool").shape == (1, 3)
    with pytest.raises(ValueError, match="unknown CKA unit"):
        C.select_units(h, mask, "words")
    # skip_first counts real tokens, whatever the padding side
    torch.testing.assert_close(C.select_units(h, mask, "tokens", skip_first=1),
                               torch.cat([h[0, 1:3], h[1, 2:5]]))
    torch.testing.assert_close(C.select_units(h, mask, "mean_pool", skip_first=2),
                               torch.stack([h[0, 2], h[1, 3:5].mean(0)]))


VOCAB = 1000


@pytest.fixture(scope="module")
def tiny_models():
    from scd.models import tiny_model

    shape = tiny_config(num_hidden_layers=3)
    return tiny_model(VOCAB, shape, seed=0), tiny_model(VOCAB, shape, seed=1)


def _seqs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]


def _right_padded(seqs, pad_value=None, seed=0):
    T = max(len(s) for s in seqs)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(seqs), T), generator=g) if pad_value is None else \
        torch.full((len(seqs), T), pad_value)
    am = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        am[i, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": am}


def test_model_cka_self_is_one_and_other_seed_is_lower(tiny_models):
    a, b = tiny_models
    a.train()  # dropout-free here, but model_cka must still switch to eval and back
    batches = [_right_padded(_seqs([12, 9, 16, 5], seed=s)) for s in range(3)]
    self_res = C.model_cka(a, a, batches, estimator="linear")
    assert self_res["layers_a"] == [1, 2, 3] and self_res["n"] == 3 * 42
    assert self_res["diagonal"] == pytest.approx([1.0] * 3, abs=1e-9)
    assert self_res["mean_matched"] == pytest.approx(1.0, abs=1e-9)
    other = C.model_cka(a, b, batches, layers_a=[0, 1, 2, 3], layers_b=[0, 1, 2, 3])
    assert max(other["matched"]) < 0.4 and other["mean_matched"] < 0.35  # ~0.2 (biased, n = 126)
    assert len(other["matrix"]) == 4 and len(other["matrix"][0]) == 4
    mb = C.model_cka(a, a, batches, estimator="unbiased_minibatch", unit="tokens", minibatch_size=32)
    assert mb["matched"] == pytest.approx([1.0] * 3, abs=1e-9)
    assert mb["n_minibatches"] == 4 and mb["n_dropped"] == 0  # 126 tokens: 3 x 32 + a final 30
    assert a.training is True
    pooled = C.model_cka(a, b, batches, unit="mean_pool")
    assert pooled["n"] == 12 and pooled["unit"] == "mean_pool"


def test_model_cka_padding_garbage_does_not_change_result(tiny_models):
    a, b = tiny_models
    seqs = _seqs([10, 4, 7, 13], seed=5)
    clean = [{"input_ids": s[None], "attention_mask": torch.ones(1, len(s), dtype=torch.long)} for s in seqs]
    padded_garbage = [_right_padded(seqs[:2], seed=11), _right_padded(seqs[2:], seed=12)]
    padded_zero = [_right_padded(seqs[:2], pad_value=0), _right_padded(seqs[2:], pad_value=0)]
    for unit in ("tokens", "mean_pool"):
        ref = C.model_cka(a, b, clean, unit=unit)
        for batches in (padded_garbage, padded_zero):
            got = C.model_cka(a, b, batches, unit=unit)
            assert got["n"] == ref["n"]
            torch.testing.assert_close(torch.tensor(got["matrix"]), torch.tensor(ref["matrix"]),
                                       atol=1e-5, rtol=0)
    # without the mask the padded garbage would count (proves the mask matters)
    unmasked = C.model_cka(a, b, [{"input_ids": p["input_ids"]} for p in padded_garbage])
    assert unmasked["n"] > ref["n"]


def test_collect_hidden_streams_and_restores_mode(tiny_models):
    a, _ = tiny_models
    a.train()
    batches = [_right_padded(_seqs([3, 6], seed=s)) for s in range(2)]
    gen = C.collect_hidden(a, batches, layers=[-1, 0])
    first = next(gen)
    assert [t.shape for t in first] == [(9, 32), (9, 32)]
    assert a.training is False
    rest = list(gen)
    assert len(rest) == 1 and a.training is True
    with pytest.raises(ValueError, match="out of range"):
        next(C.collect_hidden(a, batches, layers=[7]))


def test_heatmap_png(tmp_path):
    M = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)).tolist()
    p = C.plot_cka_heatmap(M, tmp_path / "sub" / "cka.png", "student vs teacher",
                           xticklabels=[f"T{i}" for i in range(6)])
    data = p.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="tick labels"):
        C.plot_cka_heatmap(M, tmp_path / "x.png", xticklabels=[1, 2])


# ---------------------------------------------------------------- real model (slow)
@pytest.mark.slow
def test_smollm2_self_one_and_random_init_lower():
    from scd.core.assets import model_dir

    if not (model_dir("smollm2-135m") / "config.json").exists():
        pytest.skip("SmolLM2 asset not fetched (make assets)")
    from scd.models import ModelConfig, build_model

    model, tok = build_model(ModelConfig(name="smollm2-135m"))
    rand, _ = build_model(ModelConfig(name="tiny", tiny=_smollm2_shape(model.config)), seed=0, tokenizer=tok)
    texts = ["The movie was a delight from start to finish.", "Paris is the capital of France.",
             "def add(a, b): return a + b", "Students learn faster with feedback."]
    enc = tok(texts, return_tensors="pt", padding=True)
    layers = [1, 10, 20, 30]
    same = C.model_cka(model, model, [enc], layers_a=layers, layers_b=layers)
    assert same["diagonal"] == pytest.approx([1.0] * 4, abs=1e-6)
    diff = C.model_cka(model, rand, [enc], layers_a=layers, layers_b=layers)
    assert diff["mean_matched"] < 0.8


def _smollm2_shape(cfg):
    from scd.models import TinyConfig

    return TinyConfig(num_hidden_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
                      intermediate_size=cfg.intermediate_size, num_attention_heads=cfg.num_attention_heads,
                      num_key_value_heads=cfg.num_key_value_heads, tie_word_embeddings=cfg.tie_word_embeddings)


def test_bench_cka_smoke(tmp_path, capsys):
    import json

    from benchmarks.perf import bench_cka

    out = tmp_path / "bench.json"
    bench_cka.main(["--n", "64", "200", "--layers", "2", "--dim", "16", "--batch", "50", "--device", "cpu",
                    "--out", str(out)])
    rec = json.loads(out.read_text())
    assert [r["n"] for r in rec["rows"]] == [64, 200] and rec["device"].startswith("CPU")
    for r in rec["rows"]:
        assert r["max_abs_diff"] < 1e-10 and r["speedup"] > 0 and r["stream_s"] > 0
    assert "speed-up" in capsys.readouterr().out
    # the Gram baseline is skipped (with a note) when it would not fit
    bench_cka.main(["--n", "100", "--layers", "2", "--dim", "8", "--max-gram-gb", "1e-6", "--out", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    assert row["gram_s"] is None and "GiB" in row["gram_skipped"]


def test_cli_writes_matrix_and_heatmap(tmp_path, smol_tokenizer):
    """`python -m benchmarks.cka` (benchmarks.cka.cli.main) on the tiny model against itself: every
    matched layer pair has CKA 1, the json names the layers and counts the real tokens."""
    import json

    from benchmarks.cka.cli import main

    texts = ["the film is a delight", "a dull, lifeless mess", "not bad at all", "I would watch it again"]
    src = tmp_path / "texts.jsonl"
    src.write_text("".join(json.dumps({"input": t}) + "\n" for t in texts))
    out = tmp_path / "out"
    assert main(["--model-a", "tiny", "--model-b", "tiny", "--texts", str(src), "--out", str(out),
                 "--batch-size", "2", "--device", "cpu"]) == 0
    res = json.loads((out / "cka.json").read_text())
    n_layers = len(res["layers_a"])
    assert res["layers_a"] == res["layers_b"] == list(range(1, n_layers + 1))
    assert res["matched"] == pytest.approx([1.0] * n_layers, abs=1e-9)
    assert res["n"] == sum(len(smol_tokenizer(t)["input_ids"]) for t in texts) and res["n_texts"] == 4
    assert (out / "cka.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
