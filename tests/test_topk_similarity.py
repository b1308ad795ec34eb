"""topk_similarity against the sorted dense cosine similarity: its CPU tiles and CUDA paths (fused
kernel, chunked path, column splits), ties, NaN, half precision, bad input, and torch.compile."""
import pytest
import torch

import cudasim
import reid_ext
from conftest import on


# kTopKFusedMax of csrc/cuda/params.h: on the CUDA devices, larger k take the chunked path.
FUSED_MAX_K = 32


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


def test_topk_torch_compile_fullgraph(gen):
    x = torch.randn(40, 8, generator=gen)

    def nearest(features):
        top = reid_ext.topk_similarity(features, k=5)
        return top.values.sum() + top.far.sum(), top.indices

    compiled = torch.compile(nearest, fullgraph=True, backend="aot_eager")
    (value, indices), (want_value, want_indices) = compiled(x), nearest(x)
    torch.testing.assert_close(value, want_value)
    assert torch.equal(indices, want_indices)
