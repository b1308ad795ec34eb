"""topk_similarity and k-reciprocal re-ranking (reid_ext.evaluation.re_ranking*)."""
import importlib.util
import pathlib

import numpy as np
import pytest
import torch

import reid_ext
from reid_ext.evaluation import distance_matrix, evaluate_dataset, evaluate_rank, re_ranking, re_ranking_distances

# The dense transcription of the standard algorithm lives with the benchmark that times it.
_spec = importlib.util.spec_from_file_location(
    "bench_rerank", pathlib.Path(__file__).resolve().parents[1] / "bench" / "rerank.py"
)
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
dense_re_ranking = _bench.dense_re_ranking


def reference_topk(x, y, k, largest):
    """Dense cosine similarity, ordered by a stable sort: torch.topk's order (NaN above every
    number) with ties to the lowest index."""
    sim = reid_ext.cosine_similarity(x, y)
    order = torch.sort(sim, dim=1, descending=largest, stable=True)
    far = sim.amin(1) if largest else sim.amax(1)
    return order.values[:, :k], order.indices[:, :k], far


def check_topk(x, y, k, largest, exact_indices=True):
    got = reid_ext.topk_similarity(x, y, k=k, largest=largest)
    values, indices, far = reference_topk(x, y, k, largest)
    torch.testing.assert_close(got.values, values, equal_nan=True)
    torch.testing.assert_close(got.far, far, equal_nan=True)
    assert got.indices.dtype == torch.long
    if exact_indices:
        assert torch.equal(got.indices, indices)
    else:
        # float32: near-ties may swap, but every index must hold its value, once per row
        sim = reid_ext.cosine_similarity(x, y)
        torch.testing.assert_close(sim.gather(1, got.indices), got.values)
        assert all(len(set(row)) == k for row in got.indices.tolist())
    return got


# Sizes beyond one tile: x against itself in blocks of 256 rows, against y in tiles of 512 columns.
TOPK_CASES = [  # (n, m or None for y = x, d, k)
    (1, None, 3, 1),
    (7, 5, 3, 5),  # k = M
    (40, None, 8, 40),  # k = N
    (300, None, 16, 21),
    (600, None, 8, 7),
    (130, 1100, 16, 1),
    (130, 1100, 16, 33),
]


@pytest.mark.parametrize("n,m,d,k", TOPK_CASES)
@pytest.mark.parametrize("largest", [True, False])
def test_topk_matches_sorted_dense_similarity_float64(n, m, d, k, largest, gen):
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = None if m is None else torch.randn(m, d, generator=gen, dtype=torch.float64)
    got = check_topk(x, y, k, largest)
    dense = torch.topk(reid_ext.cosine_similarity(x, y), k, largest=largest)
    assert torch.equal(got.indices, dense.indices)  # no ties in random data: exactly torch.topk


@pytest.mark.parametrize("n,m,d,k", [(600, None, 64, 21), (130, 1100, 32, 5), (9, None, 4, 9)])
@pytest.mark.parametrize("largest", [True, False])
def test_topk_float32(n, m, d, k, largest, gen):
    x = torch.randn(n, d, generator=gen)
    y = None if m is None else torch.randn(m, d, generator=gen)
    got = check_topk(x, y, k, largest, exact_indices=False)
    assert got.values.dtype == torch.float32


@pytest.mark.parametrize("n,m,k", [(600, None, 1), (600, None, 9), (300, 1100, 1), (300, 1100, 40), (50, 70, 70)])
@pytest.mark.parametrize("largest", [True, False])
def test_topk_ties_go_to_the_lowest_index(n, m, k, largest, gen):
    # Features in {-1, 0, 1}^4: 81 distinct rows, so every similarity is tied many times over,
    # within and across tiles, and the dot products are exact in any summation order.
    x = torch.randint(-1, 2, (n, 4), generator=gen).double()
    y = None if m is None else torch.randint(-1, 2, (m, 4), generator=gen).double()
    check_topk(x, y, k, largest)


def test_topk_non_contiguous_inputs(gen):
    base_x = torch.randn(16, 2 * 300, generator=gen, dtype=torch.float64)
    base_y = torch.randn(600, 32, generator=gen, dtype=torch.float64)
    x, y = base_x.t()[::2], base_y[::2, ::2]  # [300, 16] transposed and strided; [300, 16] strided
    assert not x.is_contiguous() and not y.is_contiguous()
    for other in (None, y):
        got = reid_ext.topk_similarity(x, other, k=11)
        want = reid_ext.topk_similarity(x.contiguous(), None if other is None else other.contiguous(), k=11)
        assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)
    check_topk(x, y, 11, True)


@pytest.mark.parametrize("largest", [True, False])
def test_topk_nan_is_larger_than_every_number(largest, gen):
    x = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(30, 6, generator=gen, dtype=torch.float64)
    y[7, 2] = float("nan")  # column 7 is NaN for every row
    x[3, 0] = float("nan")  # row 3 is NaN everywhere
    for k in (1, 5, 30):
        got = check_topk(x, y, k, largest)
        dense = torch.topk(reid_ext.cosine_similarity(x, y), k, largest=largest)
        torch.testing.assert_close(got.values, dense.values, equal_nan=True)
        others = [i for i in range(20) if i != 3]
        if largest:  # NaN first, as torch.topk
            assert (got.indices[others, 0] == 7).all() and got.values[others, 0].isnan().all()
        else:  # NaN last: selected only when k reaches it
            assert (got.indices[others] == 7).any().item() == (k == 30)
        assert got.values[3].isnan().all() and torch.equal(got.indices[3], torch.arange(k))
        assert got.far.isnan().all()  # every row has a NaN similarity


def test_topk_bad_k_is_a_clear_error(gen):
    x = torch.randn(6, 4, generator=gen)
    y = torch.randn(9, 4, generator=gen)
    for other, m in ((None, 6), (y, 9)):
        for k in (0, -1, m + 1):
            with pytest.raises(ValueError, match=rf"k must be in \[1, M\] with M = {m} .*got k={k}"):
                reid_ext.topk_similarity(x, other, k=k)
            with pytest.raises(ValueError, match="k must be in"):  # the op itself, without the wrapper
                torch.ops.reid_ext.topk_similarity(x, other, k, True, 1e-12)
    with pytest.raises(RuntimeError, match="argument 'k'"):
        reid_ext.topk_similarity(x, k=2.0)
    with pytest.raises(ValueError, match="k must be in"):
        reid_ext.topk_similarity(x[:0], None, k=1)  # an empty set of candidates


def test_topk_bad_inputs_name_the_argument(gen):
    x = torch.randn(6, 4, generator=gen)
    with pytest.raises(ValueError, match="x must be a 2-D"):
        reid_ext.topk_similarity(x[0], k=1)
    with pytest.raises(ValueError, match="y has D=3 but x has D=4"):
        reid_ext.topk_similarity(x, torch.randn(5, 3), k=1)
    with pytest.raises(TypeError, match="y has dtype Double but x has Float"):
        reid_ext.topk_similarity(x, x.double(), k=1)
    with pytest.raises(TypeError, match="x must be float32 or float64 on CPU, got Half"):
        reid_ext.topk_similarity(x.half(), k=1)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        reid_ext.topk_similarity(x, k=1, eps=0.0)


def test_topk_empty_x(gen):
    y = torch.randn(5, 4, generator=gen)
    got = reid_ext.topk_similarity(y[:0], y, k=3)
    assert got.values.shape == (0, 3) and got.indices.shape == (0, 3) and got.far.shape == (0,)


def test_topk_is_not_differentiable(gen):
    x = torch.randn(10, 4, generator=gen, requires_grad=True)
    y = torch.randn(12, 4, generator=gen, requires_grad=True)
    for other in (None, y):
        got = reid_ext.topk_similarity(x, other, k=3)
        assert not any(t.requires_grad for t in got)


def test_topk_opcheck(gen):
    x = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    op = torch.ops.reid_ext.topk_similarity.default
    for args in ((x, None, 4, True, 1e-12), (x.float(), y.float(), 9, False, 1e-12),
                 (x.requires_grad_(), y, 1, True, 1e-6), (x[:0], y, 2, True, 1e-12)):
        torch.library.opcheck(op, args)


def test_topk_torch_compile_fullgraph(gen):
    x = torch.randn(40, 8, generator=gen)

    def nearest(features):
        top = reid_ext.topk_similarity(features, k=5)
        return top.values.sum() + top.far.sum(), top.indices

    compiled = torch.compile(nearest, fullgraph=True, backend="aot_eager")
    (value, indices), (want_value, want_indices) = compiled(x), nearest(x)
    torch.testing.assert_close(value, want_value)
    assert torch.equal(indices, want_indices)


# ---------------------------------------------------------------- re-ranking


def random_distances(q, g, kind, rng):
    """(q_g, q_q, g_g) float64 without ties: uniform non-symmetric ones, or symmetric ones of
    clustered points (whose k-reciprocal sets overlap, so that the 2/3 expansion rule fires)."""
    n = q + g
    if kind == "uniform":
        a = rng.uniform(0.1, 2.0, (n, n))
    else:
        centers = rng.normal(size=(max(1, n // 5), 8))
        points = centers[rng.integers(0, len(centers), n)] + 0.3 * rng.normal(size=(n, 8))
        a = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    return a[:q, q:], a[:q, :q], a[q:, q:]


RERANK_OPTIONS = [(20, 6, 0.3), (3, 1, 0.0), (5, 3, 0.5), (7, 2, 0.3), (1, 12, 1.0), (2, 2, 0.7), (4, 40, 0.3)]


@pytest.mark.parametrize("q,g", [(1, 1), (1, 4), (3, 2), (5, 30), (12, 40), (40, 25)])
@pytest.mark.parametrize("k1,k2,lambda_value", RERANK_OPTIONS)
@pytest.mark.parametrize("kind", ["uniform", "clustered"])
def test_re_ranking_distances_matches_the_dense_algorithm(q, g, k1, k2, lambda_value, kind):
    # k1 + 1 and k2 reach past Q + G in the small cases: the standard code then takes every row.
    rng = np.random.default_rng(q * 1000 + g)
    q_g, q_q, g_g = random_distances(q, g, kind, rng)
    want = dense_re_ranking(q_g, q_q, g_g, k1, k2, lambda_value, dtype=np.float64)
    got = re_ranking_distances(q_g, q_q, g_g, k1, k2, lambda_value)
    assert got.shape == (q, g) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_re_ranking_in_many_small_blocks(monkeypatch):
    # Blocks of a few rows for the ranking and the bitmaps, of a few pairs for the Jaccard sums:
    # every block boundary the full-size problems cross, at the sizes of a test.
    import reid_ext.evaluation as evaluation

    monkeypatch.setattr(evaluation, "_RANK_BLOCK_ELEMENTS", 3 * 70)
    monkeypatch.setattr(evaluation, "_BLOCK_ELEMENTS", 50)
    rng = np.random.default_rng(7)
    q_g, q_q, g_g = random_distances(20, 50, "clustered", rng)
    want = dense_re_ranking(q_g, q_q, g_g, 20, 6, 0.3, dtype=np.float64)
    np.testing.assert_allclose(re_ranking_distances(q_g, q_q, g_g).numpy(), want, rtol=1e-12, atol=1e-12)
    x = torch.from_numpy(rng.normal(size=(70, 8)))
    distances = cosine_distances(x[:20], x[20:])
    torch.testing.assert_close(re_ranking(x[:20], x[20:]), re_ranking_distances(*distances), rtol=1e-10, atol=1e-10)


def test_re_ranking_distances_tensors_and_float32():
    rng = np.random.default_rng(5)
    q_g, q_q, g_g = random_distances(20, 80, "clustered", rng)
    want = dense_re_ranking(*(a.astype(np.float32) for a in (q_g, q_q, g_g)))  # the standard code's float32
    got = re_ranking_distances(*(torch.from_numpy(a).float() for a in (q_g, q_q, g_g)))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def clustered_features(n, d, dtype, gen):
    centers = torch.randn(max(1, n // 6), d, generator=gen, dtype=dtype)
    return centers[torch.randint(0, len(centers), (n,), generator=gen)] + 0.5 * torch.randn(
        n, d, generator=gen, dtype=dtype
    )


def cosine_distances(qf, gf):
    def d(a, b):
        return 1 - reid_ext.cosine_similarity(a, b)

    return d(qf, gf), d(qf, qf), d(gf, gf)


@pytest.mark.parametrize("q,g", [(1, 1), (2, 9), (15, 45), (60, 300)])
@pytest.mark.parametrize("k1,k2,lambda_value", [(20, 6, 0.3), (5, 1, 0.5), (2, 30, 0.1)])
def test_re_ranking_from_features_is_re_ranking_of_cosine_distances(q, g, k1, k2, lambda_value, gen):
    x = clustered_features(q + g, 16, torch.float64, gen)
    qf, gf = x[:q], x[q:]
    got = re_ranking(qf, gf, k1, k2, lambda_value)
    want = re_ranking_distances(*cosine_distances(qf, gf), k1, k2, lambda_value)
    assert got.shape == (q, g) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_re_ranking_features_float32_matches_dense_float32(gen):
    x = clustered_features(240, 32, torch.float32, gen)
    qf, gf = x[:40], x[40:]
    want = dense_re_ranking(*(t.numpy() for t in cosine_distances(qf, gf)))
    np.testing.assert_allclose(re_ranking(qf, gf).numpy(), want, rtol=1e-5, atol=2e-6)


def test_re_ranked_distances_are_accepted_by_evaluate_rank(gen):
    x = clustered_features(60, 16, torch.float32, gen)
    pids = np.arange(60) % 10
    camids = np.arange(60) // 30
    result = evaluate_rank(re_ranking(x[:10], x[10:]), pids[:10], pids[10:], camids[:10], camids[10:])
    assert 0 < result["mAP"] <= 1


def test_evaluate_dataset_with_and_without_re_ranking_from_the_same_features(gen):
    images = clustered_features(60, 12, torch.float32, gen).view(60, 3, 2, 2)
    pids, camids = torch.arange(60) % 10, torch.arange(60) // 30
    loaders = [
        torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(images[part], pids[part], camids[part], torch.zeros(len(pids[part]))),
            batch_size=16,
        )
        for part in (slice(0, 10), slice(10, 60))
    ]
    got = evaluate_dataset(torch.nn.Flatten(), *loaders, "market", torch.device("cpu"), flip=False, rerank=True, k1=5)
    qf, gf = images[:10].flatten(1), images[10:].flatten(1)
    labels = (pids[:10].numpy(), pids[10:].numpy(), camids[:10].numpy(), camids[10:].numpy())
    plain = evaluate_rank(distance_matrix(qf, gf), *labels)
    reranked = evaluate_rank(re_ranking(qf, gf, k1=5), *labels)
    assert got["mAP"] == plain["mAP"] and got["rerank"]["mAP"] == reranked["mAP"]
    assert got["rerank"]["rank1"] == reranked["cmc"][0] and got["mAP"] != reranked["mAP"]
    assert "rerank" not in evaluate_dataset(torch.nn.Flatten(), *loaders, "market", torch.device("cpu"), flip=False)


def test_re_ranking_empty_query_or_gallery(gen):
    x = torch.randn(5, 4, generator=gen)
    assert re_ranking(x[:0], x).shape == (0, 5)
    assert re_ranking(x, x[:0]).shape == (5, 0)
    assert re_ranking_distances(np.zeros((0, 3)), np.zeros((0, 0)), np.zeros((3, 3))).shape == (0, 3)


def test_re_ranking_nan_feature_makes_every_distance_nan(gen):
    # As in the standard code: every row's largest distance, which scales the row, is NaN.
    x = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    x[13, 1] = float("nan")
    assert re_ranking(x[:10], x[10:]).isnan().all()
    distances = cosine_distances(x[:10], x[10:])
    assert re_ranking_distances(*distances).isnan().all()
    with np.errstate(invalid="ignore"):
        assert np.isnan(dense_re_ranking(*(t.numpy() for t in distances), dtype=np.float64)).all()


def test_re_ranking_bad_input_names_the_argument(gen):
    x = torch.randn(6, 4, generator=gen)
    q_g, q_q, g_g = cosine_distances(x[:2], x[2:])
    for kwargs, message in (
        (dict(k1=0), "k1 must be an int >= 1"),
        (dict(k2=0), "k2 must be an int >= 1"),
        (dict(k1=2.5), "k1 must be an int >= 1"),
        (dict(lambda_value=1.5), r"lambda_value must be in \[0, 1\]"),
    ):
        with pytest.raises(ValueError, match=message):
            re_ranking(x[:2], x[2:], **kwargs)
        with pytest.raises(ValueError, match=message):
            re_ranking_distances(q_g, q_q, g_g, **kwargs)
    with pytest.raises(ValueError, match="gf has D=3 but qf has D=4"):
        re_ranking(x, torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"q_q_dist must have shape \(2, 2\)"):
        re_ranking_distances(q_g, g_g, g_g)
    with pytest.raises(ValueError, match=r"g_g_dist must have shape \(4, 4\)"):
        re_ranking_distances(q_g, q_q, q_q)
    with pytest.raises(TypeError, match="g_g_dist is torch.float64"):
        re_ranking_distances(q_g, q_q, g_g.double())
    with pytest.raises(TypeError, match="q_g_dist must be float32 or float64"):
        re_ranking_distances(q_g.half(), q_q.half(), g_g.half())
