"""k-reciprocal re-ranking (reid_ext.rerank, also reid_ext.evaluation.re_ranking*) against the dense algorithm, and its
Jaccard-distance op."""
import importlib.util
import pathlib

import numpy as np
import pytest
import torch

import reid_ext
from reid_ext.evaluation import distance_matrix, evaluate_dataset, evaluate_rank, re_ranking, re_ranking_distances
from conftest import on

# The dense transcription of the standard algorithm lives with the benchmark that times it.
_spec = importlib.util.spec_from_file_location(
    "bench_rerank", pathlib.Path(__file__).resolve().parents[1] / "bench" / "rerank.py"
)
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
dense_re_ranking = _bench.dense_re_ranking


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
    import reid_ext.rerank as rerank

    monkeypatch.setattr(rerank, "_RANK_BLOCK_ELEMENTS", 3 * 70)
    monkeypatch.setattr(rerank, "_BLOCK_ELEMENTS", 50)
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


@pytest.mark.parametrize("q,g,k1,k2", [(15, 45, 20, 6), (60, 300, 20, 6), (30, 90, 40, 3)])
def test_re_ranking_from_features_on_every_device(device, q, g, k1, k2, gen):
    # On the CUDA devices topk_similarity's kernels give the nearest samples (k = 21: the fused
    # kernel; k = 41: the chunked path), and the sparse stages run on the CPU.
    x = on(device, clustered_features(q + g, 16, torch.float64, gen))
    qf, gf = x[:q], x[q:]
    got = re_ranking(qf, gf, k1, k2)
    want = re_ranking_distances(*cosine_distances(qf, gf), k1, k2)
    assert got.device == x.device and got.dtype == device.dtype
    torch.testing.assert_close(got, want, **({} if device.dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}))


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


def jaccard_case():
    """V of N = 3 samples (1 query, 2 gallery) as sorted entries, and each row's nearest samples."""
    rows, cols = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 2, 1, 2])
    vals = torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=torch.float64)
    return rows, cols, vals, torch.tensor([[0, 2], [1, 0], [2, 0]])


def test_jaccard_distance_op_by_hand():
    op = torch.ops.reid_ext._jaccard_distance
    rows, cols, vals, ranks = jaccard_case()
    # m = [min(.5, 0), min(.5, 1)] over the query's columns 0 and 2: 1 - m / (2 - m) = [1, 2/3]
    torch.testing.assert_close(op(rows, cols, vals, ranks, 1, 1), torch.tensor([[1.0, 2 / 3]], dtype=torch.float64))
    # k2 = 2: V'[0] = V'[2] = {0: .25, 2: .75}, V'[1] = {0: .25, 1: .5, 2: .25}: m = [.5, 1]
    torch.testing.assert_close(op(rows, cols, vals, ranks, 1, 2), torch.tensor([[2 / 3, 0.0]], dtype=torch.float64))
    assert op(rows, cols, vals.float(), ranks, 1, 2).dtype == torch.float32
    for args in ((rows, cols, vals, ranks, 1, 2), (rows, cols, vals, ranks, 0, 1),
                 (rows[:0], cols[:0], vals[:0], ranks, 2, 2)):
        torch.library.opcheck(op, args)


def test_jaccard_distance_op_bad_input_names_the_argument():
    op = torch.ops.reid_ext._jaccard_distance
    rows, cols, vals, ranks = jaccard_case()
    for args, message in (
        ((rows, torch.tensor([0, 3, 1, 2]), vals, ranks, 1, 1), r"rows and cols must be in \[0, N\) with N = 3"),
        ((torch.tensor([0, 1, 0, 2]), cols, vals, ranks, 1, 1), r"sorted by \(row, column\) without repeats"),
        ((rows, torch.tensor([0, 0, 1, 2]), vals, ranks, 1, 1), r"sorted by \(row, column\) without repeats"),
        ((rows, cols, vals, torch.tensor([[0, 2], [1, 5], [2, 0]]), 1, 2), r"ranks must be in \[0, N\)"),
        ((rows, cols, vals, ranks[:, :1], 1, 2), r"ranks must have at least min\(k2, N\) = 2 columns"),
        ((rows, cols, vals, ranks, 4, 1), r"num_query must be in \[0, N\] with N = 3"),
        ((rows, cols, vals, ranks, 1, 0), "k2 must be >= 1"),
        ((rows[:3], cols, vals, ranks, 1, 1), r"rows must be a 1-D Tensor\[E\] like vals"),
    ):
        with pytest.raises(ValueError, match=message):
            op(*args)
    with pytest.raises(TypeError, match="rows must be int64"):
        op(rows.int(), cols, vals, ranks, 1, 1)
    with pytest.raises(TypeError, match="vals must be float32 or float64 on CPU"):
        op(rows, cols, vals.half(), ranks, 1, 1)


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
