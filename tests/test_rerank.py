"""topk_similarity and k-reciprocal re-ranking (reid_ext.evaluation.re_ranking*)."""
import importlib.util
import pathlib

import numpy as np
import pytest
import torch

import cudasim
import reid_ext
from reid_ext.evaluation import distance_matrix, evaluate_dataset, evaluate_rank, re_ranking, re_ranking_distances

# The dense transcription of the standard algorithm lives with the benchmark that times it.
_spec = importlib.util.spec_from_file_location(
    "bench_rerank", pathlib.Path(__file__).resolve().parents[1] / "bench" / "rerank.py"
)
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
dense_re_ranking = _bench.dense_re_ranking


# kTopKFusedMax of csrc/cuda/params.h: on the CUDA devices, larger k take the chunked path.
FUSED_MAX_K = 32


def on(device, t):
    """t on the device, in its test dtype (float64 on CPU, float32 for the CUDA kernels)."""
    return t.to(device=device.torch, dtype=device.dtype)


def exact_order(device, k):
    """Whether topk_similarity computes the similarities bitwise as cosine_similarity does on the
    device, so that its order is exactly that of the dense matrix: on CPU (float64), and in the fused
    CUDA kernel. The chunked CUDA path's products come from at::mm: equal up to rounding."""
    return not device.cuda_kernels or k <= FUSED_MAX_K


def launched(sim):
    """The names of the topk kernels the emulated GPU launched since its counts were reset."""
    return {name for name in sim.launch_counts() if "topk" in name}


@pytest.fixture
def multiprocessors():
    """Sets the emulated GPU's multiprocessor count for one test (its launchers split the columns
    across blocks to fill it)."""
    sim = cudasim.load()
    saved = sim.multiprocessor_count()
    yield sim.set_multiprocessor_count
    sim.set_multiprocessor_count(saved)


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
        # near-ties may swap, but every index must hold its value, once per row
        sim = reid_ext.cosine_similarity(x, y)
        torch.testing.assert_close(sim.gather(1, got.indices), got.values, equal_nan=True)
        assert all(len(set(row)) == k for row in got.indices.tolist())
    return got


# Sizes beyond one tile: on CPU x against itself in blocks of 256 rows, against y in tiles of 512
# columns; on CUDA 64 rows x 64 columns per tile, the columns split across blocks from 128 columns.
TOPK_CASES = [  # (n, m or None for y = x, d, k)
    (1, None, 3, 1),
    (7, 5, 3, 5),  # k = M
    (40, None, 8, 40),  # k = N, beyond the fused CUDA kernel
    (300, None, 16, 21),  # re-ranking's k
    (600, None, 8, 7),
    (130, 1100, 16, 1),
    (130, 1100, 16, 32),  # the fused CUDA kernel's largest k
    (130, 1100, 16, 33),  # and one beyond
]


@pytest.mark.parametrize("n,m,d,k", TOPK_CASES)
@pytest.mark.parametrize("largest", [True, False])
def test_topk_matches_sorted_dense_similarity(device, n, m, d, k, largest, gen):
    x = on(device, torch.randn(n, d, generator=gen, dtype=torch.float64))
    y = None if m is None else on(device, torch.randn(m, d, generator=gen, dtype=torch.float64))
    got = check_topk(x, y, k, largest, exact_indices=exact_order(device, k))
    assert got.values.dtype == got.far.dtype == device.dtype
    if device.dtype == torch.float64:  # no ties in random float64 data: exactly torch.topk (in float32,
        # equal similarities occur, and torch.topk does not order them by index)
        dense = torch.topk(reid_ext.cosine_similarity(x, y), k, largest=largest)
        assert torch.equal(got.indices, dense.indices)


@pytest.mark.parametrize("n,m,d,k", [(600, None, 64, 21), (130, 1100, 32, 5), (9, None, 4, 9)])
@pytest.mark.parametrize("largest", [True, False])
def test_topk_float32_on_cpu(n, m, d, k, largest, gen):
    x = torch.randn(n, d, generator=gen)
    y = None if m is None else torch.randn(m, d, generator=gen)
    got = check_topk(x, y, k, largest, exact_indices=False)
    assert got.values.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [21, 40])
@pytest.mark.parametrize("largest", [True, False])
def test_topk_half_precision_ranks_in_float32(cuda_device, dtype, k, largest, gen):
    # Products and order in float32, outputs in the features' dtype, as cosine_similarity's kernel.
    x = torch.randn(70, 24, generator=gen).to(cuda_device.torch, dtype)
    y = torch.randn(150, 24, generator=gen).to(cuda_device.torch, dtype)
    got = reid_ext.topk_similarity(x, y, k=k, largest=largest)
    assert got.values.dtype == got.far.dtype == dtype and got.indices.dtype == torch.long
    values, indices, far = reference_topk(x.float(), y.float(), k, largest)
    if k <= FUSED_MAX_K:  # the fused kernel: bitwise the float32 similarities, rounded once
        assert torch.equal(got.indices, indices)
        assert torch.equal(got.values, values.to(dtype)) and torch.equal(got.far, far.to(dtype))
    else:
        tol = {"rtol": 1e-2, "atol": 1e-2}
        torch.testing.assert_close(got.values.float(), values, **tol)
        torch.testing.assert_close(got.far.float(), far, **tol)
        sim = reid_ext.cosine_similarity(x.float(), y.float())
        torch.testing.assert_close(sim.gather(1, got.indices), got.values.float(), **tol)
        assert all(len(set(row)) == k for row in got.indices.tolist())


TIE_CASES = [(600, None, 1), (600, None, 9), (300, 1100, 1), (300, 1100, 40), (50, 70, 70)]


@pytest.mark.parametrize("n,m,k", TIE_CASES)
@pytest.mark.parametrize("largest", [True, False])
def test_topk_ties_go_to_the_lowest_index(device, n, m, k, largest, gen):
    # Features in {-1, 0, 1}^4: 81 distinct rows, so every similarity is tied many times over,
    # within and across tiles, and the dot products are exact in any summation order.
    x = on(device, torch.randint(-1, 2, (n, 4), generator=gen))
    y = None if m is None else on(device, torch.randint(-1, 2, (m, 4), generator=gen))
    check_topk(x, y, k, largest)


@pytest.mark.parametrize("largest", [True, False])
def test_topk_ties_across_chunks_of_the_chunked_path(device, largest, gen):
    # On the CUDA devices k = 40 takes the chunked path: at 9000 columns its products come in two
    # chunks of columns (8192 and 808) and three of rows, the running best k merged with each.
    # Integer features as above; the reference is the dense float64 matrix of the CPU op.
    x = torch.randint(-1, 2, (300, 4), generator=gen).double()
    y = torch.randint(-1, 2, (9000, 4), generator=gen).double()
    got = reid_ext.topk_similarity(on(device, x), on(device, y), k=40, largest=largest)
    sim = torch.ops.reid_ext.cosine_similarity(x, y, 1e-12)
    order = torch.sort(sim, dim=1, descending=largest, stable=True)
    assert torch.equal(got.indices.cpu(), order.indices[:, :40])
    torch.testing.assert_close(got.values.cpu().double(), order.values[:, :40])
    torch.testing.assert_close(got.far.cpu().double(), sim.amin(1) if largest else sim.amax(1))


# (n, m, k, {multiprocessors: whether the columns are split}); integer features as above.
SPLIT_CASES = [
    (130, 1100, 21, {1: False, 2: True, 8: True}),  # ties across tiles and across splits
    (20, 70, 32, {1: True, 8: True}),  # the second split has 6 columns, fewer than k
    (10, 300, 32, {2: True}),  # 4 splits of 2, 2, 1 and 0 tiles
]


@pytest.mark.cudasim
@pytest.mark.parametrize("case", range(len(SPLIT_CASES)))
@pytest.mark.parametrize("largest", [True, False])
def test_topk_splits_give_the_same_result_on_the_emulated_gpu(multiprocessors, case, largest):
    n, m, k, split = SPLIT_CASES[case]
    gen = torch.Generator().manual_seed(case)
    x = torch.randint(-1, 2, (n, 4), generator=gen).float()
    y = torch.randint(-1, 2, (m, 4), generator=gen).float()
    sim = cudasim.load()
    results = []
    with cudasim.device():
        for count, splits in split.items():
            multiprocessors(count)
            sim.reset_launch_counts()
            results.append(check_topk(x, y, k, largest))
            merged = any("merge" in name for name in launched(sim))
            assert merged == splits, (count, launched(sim))
    for got in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, results[0]))


@pytest.mark.cudasim
@pytest.mark.parametrize("largest", [True, False])
def test_topk_path_choice_on_the_emulated_gpu(largest):
    # The fused kernel up to k = 32, the chunked path beyond it, with the same order: the first
    # 32 of k = 33 are k = 32 (exact: integer features).
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(-1, 2, (90, 4), generator=gen).float()
    sim = cudasim.load()
    with cudasim.device():
        sim.reset_launch_counts()
        fused = reid_ext.topk_similarity(x, k=FUSED_MAX_K, largest=largest)
        assert "topk_similarity_kernel" in launched(sim), sim.launch_counts()
        sim.reset_launch_counts()
        chunked = reid_ext.topk_similarity(x, k=FUSED_MAX_K + 1, largest=largest)
        assert launched(sim) == set(), sim.launch_counts()
    assert torch.equal(chunked.values[:, :FUSED_MAX_K], fused.values)
    assert torch.equal(chunked.indices[:, :FUSED_MAX_K], fused.indices)
    assert torch.equal(chunked.far, fused.far)


def test_topk_non_contiguous_inputs(device, gen):
    base_x = on(device, torch.randn(16, 2 * 300, generator=gen, dtype=torch.float64))
    base_y = on(device, torch.randn(600, 32, generator=gen, dtype=torch.float64))
    x, y = base_x.t()[::2], base_y[::2, ::2]  # [300, 16] transposed and strided; [300, 16] strided
    assert not x.is_contiguous() and not y.is_contiguous()
    for other in (None, y):
        for k in (11, 40):
            got = reid_ext.topk_similarity(x, other, k=k)
            want = reid_ext.topk_similarity(x.contiguous(), None if other is None else other.contiguous(), k=k)
            assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)
    check_topk(x, y, 11, True)


@pytest.mark.parametrize("largest", [True, False])
def test_topk_nan_is_larger_than_every_number(device, largest, gen):
    x = on(device, torch.randn(20, 6, generator=gen, dtype=torch.float64))
    y = on(device, torch.randn(40, 6, generator=gen, dtype=torch.float64))
    y[7, 2] = float("nan")  # column 7 is NaN for every row
    x[3, 0] = float("nan")  # row 3 is NaN everywhere
    for k in (1, 5, 40):  # on CUDA: the fused kernel, then the chunked path
        got = check_topk(x, y, k, largest, exact_indices=exact_order(device, k))
        dense = torch.topk(reid_ext.cosine_similarity(x, y), k, largest=largest)
        torch.testing.assert_close(got.values, dense.values, equal_nan=True)
        others = [i for i in range(20) if i != 3]
        if largest:  # NaN first, as torch.topk
            assert (got.indices[others, 0] == 7).all() and got.values[others, 0].isnan().all()
        else:  # NaN last: selected only when k reaches it
            assert (got.indices[others] == 7).any().item() == (k == 40)
        assert got.values[3].isnan().all() and torch.equal(got.indices[3].cpu(), torch.arange(k))
        assert got.far.isnan().all()  # every row has a NaN similarity


def test_topk_bad_k_is_a_clear_error(device, gen):
    x = on(device, torch.randn(6, 4, generator=gen))
    y = on(device, torch.randn(9, 4, generator=gen))
    for other, m in ((None, 6), (y, 9)):
        for k in (0, -1, m + 1):
            with pytest.raises(ValueError, match=rf"k must be in \[1, M\] with M = {m} .*got k={k}"):
                reid_ext.topk_similarity(x, other, k=k)
            with pytest.raises(ValueError, match="k must be in"):  # the op itself, without the wrapper
                reid_ext.ops._OPS.topk_similarity(x, other, k, True, 1e-12)
    with pytest.raises(RuntimeError, match="argument 'k'"):
        reid_ext.topk_similarity(x, k=2.0)
    with pytest.raises(ValueError, match="k must be in"):
        reid_ext.topk_similarity(x[:0], None, k=1)  # an empty set of candidates


def test_topk_bad_inputs_name_the_argument(device, gen):
    x = on(device, torch.randn(6, 4, generator=gen))
    with pytest.raises(ValueError, match="x must be a 2-D"):
        reid_ext.topk_similarity(x[0], k=1)
    with pytest.raises(ValueError, match="y has D=3 but x has D=4"):
        reid_ext.topk_similarity(x, x[:, :3], k=1)
    other, name = (torch.float32, "Float") if x.dtype == torch.float64 else (torch.float64, "Double")
    with pytest.raises(TypeError, match=f"y has dtype {name} but x has"):
        reid_ext.topk_similarity(x, x.to(other), k=1)
    if device.cuda_kernels:  # the CUDA glue's shared dtype check (scalar_kind) raises a RuntimeError
        error, message, bad = RuntimeError, "x must be float32, float16 or bfloat16 on CUDA, got Double", x.double()
    else:
        error, message, bad = TypeError, "x must be float32 or float64 on CPU, got Half", x.half()
    with pytest.raises(error, match=message):
        reid_ext.topk_similarity(bad, k=1)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        reid_ext.topk_similarity(x, k=1, eps=0.0)


def test_topk_empty_x(device, gen):
    y = on(device, torch.randn(40, 4, generator=gen))
    for k in (3, 35):
        got = reid_ext.topk_similarity(y[:0], y, k=k)
        assert got.values.shape == (0, k) and got.indices.shape == (0, k) and got.far.shape == (0,)


def test_topk_is_not_differentiable(device, gen):
    x = on(device, torch.randn(10, 4, generator=gen)).requires_grad_(True)
    y = on(device, torch.randn(40, 4, generator=gen)).requires_grad_(True)
    for other, k in ((None, 3), (y, 3), (y, 35)):
        got = reid_ext.topk_similarity(x, other, k=k)
        assert not any(t.requires_grad for t in got)


def test_topk_opcheck(device, gen):
    x = on(device, torch.randn(20, 6, generator=gen))
    y = on(device, torch.randn(40, 6, generator=gen))
    op = reid_ext.ops._OPS.topk_similarity.default
    for args in ((x, None, 4, True, 1e-12), (x, y[:9], 9, False, 1e-12), (x, y, 35, True, 1e-12),
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
