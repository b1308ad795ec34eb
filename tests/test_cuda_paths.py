"""The CUDA ops' path for bank- and global-batch-sized problems: cuBLAS products a chunk of
references at a time, with the fused kernels around them, on the emulated GPU and on a GPU.

The thresholds are lowered for the tests (REID_EXT_CUDA_PRODUCTS_FROM = 0: every problem takes
the products; REID_EXT_CUDA_CHUNK_BYTES: chunks of 64 references, checked by test_chunk_size_is_64),
so that chunk boundaries fall inside the reference set and inside identity groups at small sizes.
"""
import pytest
import torch

import reid_ext
from reid_ext import reference
from conftest import MODES, features


@pytest.fixture
def chunked(monkeypatch, cuda_device):
    """Forces the products path with chunks of 64 references (the floor) for every batch of 24 anchors
    or more: a budget of 24 x 64 float32 cosines."""
    monkeypatch.setenv("REID_EXT_CUDA_PRODUCTS_FROM", "0")
    monkeypatch.setenv("REID_EXT_CUDA_CHUNK_BYTES", str(4 * 24 * 64))
    return cuda_device


def test_chunk_size_is_64(chunked, gen):
    # The tests below are about chunk boundaries: 24 anchors against 150 references must take
    # 3 chunks (3 products of the cosines), and so must 80 against 80 (64 + 16) and 96 against 150.
    on = chunked.torch
    for n, m in ((24, 150), (80, 80), (96, 150)):
        x, bank = features(n, 8, gen, on, torch.float32, requires_grad=False), features(m, 8, gen, on, torch.float32)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            reid_ext.unified_triplet_loss(x, torch.arange(n).to(on) // 4, ref=bank,
                                          ref_labels=torch.arange(m).to(on) // 4, reduction="none")
        assert sum(e.name == "aten::mm" for e in prof.events()) == -(-m // 64), (n, m)


def groups_across_chunks(n):
    """Identities of 4 consecutive rows shifted by 2, so that the chunk boundary at 64 splits one."""
    return (torch.arange(n) + 2) // 4


def value_and_grads(fn, inputs):
    out = fn()
    weight = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    return out.detach().double().cpu(), [g.double().cpu() for g in torch.autograd.grad((out * weight).sum(), inputs)]


def assert_close(ours, theirs, **tol):
    torch.testing.assert_close(ours[0], theirs[0], **tol)
    for a, b in zip(ours[1], theirs[1]):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_unified_self_products_match_reference(chunked, mode, reduction, gen):
    """N = 80 against itself: chunks of 64 and 16 references, the boundary inside an identity."""
    on = chunked.torch
    x = features(80, 8, gen, on, torch.float32)
    labels = groups_across_chunks(80).to(on)
    modalities = (torch.arange(80) % 2).to(on)
    kwargs = dict(gamma=8.0, modalities=modalities, mode=mode, reduction=reduction)
    assert_close(value_and_grads(lambda: reid_ext.unified_triplet_loss(x, labels, **kwargs), [x]),
                 value_and_grads(lambda: reference.unified_triplet_loss(x, labels, **kwargs), [x]), **chunked.tol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bank_grad", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_unified_bank_products_match_reference(chunked, mode, bank_grad, reduction, gen):
    """24 anchors against a bank of 150: chunks of 64, 64 and 22 references."""
    on = chunked.torch
    x = features(24, 8, gen, on, torch.float32)
    labels = (torch.arange(24) // 4).to(on)
    bank = features(150, 8, gen, on, torch.float32, requires_grad=bank_grad)
    bank_labels = groups_across_chunks(150).remainder(9).to(on)
    kwargs = dict(gamma=8.0, modalities=(torch.arange(24) % 2).to(on), mode=mode, ref=bank, ref_labels=bank_labels,
                  ref_modalities=(torch.arange(150) % 3 % 2).to(on), reduction=reduction)
    inputs = [x, bank] if bank_grad else [x]
    assert_close(value_and_grads(lambda: reid_ext.unified_triplet_loss(x, labels, **kwargs), inputs),
                 value_and_grads(lambda: reference.unified_triplet_loss(x, labels, **kwargs), inputs), **chunked.tol)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_batch_hard_products_keep_ties_to_the_lowest_index(chunked, metric, gen):
    """Integer features with few distinct rows: exact ties everywhere, across the chunk boundary."""
    on = chunked.torch
    x = torch.randint(-1, 2, (80, 3), generator=gen).float().to(on).requires_grad_(True)
    labels = torch.randint(0, 6, (80,), generator=gen).to(on)
    ours = reid_ext.batch_hard_triplet_loss(x, labels, metric=metric, reduction="none", return_indices=True)
    theirs = reference.batch_hard_triplet_loss(x.detach().double(), labels, metric=metric, reduction="none",
                                               return_indices=True)
    assert torch.equal(ours[1], theirs[1]) and torch.equal(ours[2], theirs[2])
    torch.testing.assert_close(ours[0].double(), theirs[0], rtol=1e-5, atol=1e-6)


def test_cosine_similarity_products_match_reference(chunked, gen):
    on = chunked.torch
    x, y = features(30, 8, gen, on, torch.float32), features(70, 8, gen, on, torch.float32)
    for other in (y, None):
        inputs = [x] if other is None else [x, y]
        assert_close(value_and_grads(lambda: reid_ext.cosine_similarity(x, other), inputs),
                     value_and_grads(lambda: reference.cosine_similarity(x, other), inputs), **chunked.tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_products_in_half_precision_within_twice_eager(chunked, dtype, gen):
    x64 = features(24, 16, gen, "cpu", torch.float64)
    bank64 = features(150, 16, gen, "cpu", torch.float64)
    labels, bank_labels = torch.arange(24) // 4, groups_across_chunks(150).remainder(6)
    kwargs = dict(reduction="none", gamma=16.0)
    exact = value_and_grads(lambda: reference.unified_triplet_loss(x64, labels, ref=bank64, ref_labels=bank_labels,
                                                                   **kwargs), [x64, bank64])
    on = chunked.torch
    x, bank = (t.detach().to(on, dtype).requires_grad_(True) for t in (x64, bank64))
    args = (x, labels.to(on))
    kwargs.update(ref=bank, ref_labels=bank_labels.to(on))
    ours = value_and_grads(lambda: reid_ext.unified_triplet_loss(*args, **kwargs), [x, bank])
    eager = value_and_grads(lambda: reference.unified_triplet_loss(*args, **kwargs), [x, bank])

    def err(a, b):
        return (a - b).abs().max().item()

    assert err(ours[0], exact[0]) <= 2 * err(eager[0], exact[0]) + 1e-6
    for g_ours, g_eager, g_exact in zip(ours[1], eager[1], exact[1]):
        assert err(g_ours, g_exact) <= 2 * err(g_eager, g_exact) + 1e-6


def test_products_propagate_nan(chunked, gen):
    on = chunked.torch
    x = features(24, 8, gen, on, torch.float32, requires_grad=False)
    bank = features(150, 8, gen, on, torch.float32, requires_grad=False)
    bank[100, 3] = float("nan")  # a bank row in the second chunk, paired with every anchor
    labels, bank_labels = (torch.arange(24) // 4).to(on), (torch.arange(150) % 6).to(on)
    loss = reid_ext.unified_triplet_loss(x, labels, ref=bank, ref_labels=bank_labels, reduction="none")
    assert torch.isnan(loss).all()
    x[5, 0] = float("nan")
    assert torch.isnan(reid_ext.batch_hard_triplet_loss(x, torch.arange(24).to(on), reduction="none")[5])


@pytest.mark.cudasim
def test_products_come_from_cublas_in_bounded_buffers(monkeypatch, gen):
    """On the emulated GPU, the profiler sees the products as aten::mm / aten::addmm calls, and no
    allocation as large as the N x M matrix; without the lowered threshold the tile kernels run."""
    import cudasim

    n, m, d = 32, 300, 8
    x = features(n, d, gen, "cpu", torch.float32)
    bank = features(m, d, gen, "cpu", torch.float32)
    labels, bank_labels = torch.arange(n) // 4, torch.arange(m) % 8

    def profile():
        with cudasim.device(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                      profile_memory=True) as prof:
            loss = reid_ext.unified_triplet_loss(x, labels, ref=bank, ref_labels=bank_labels)
            torch.autograd.grad(loss, [x, bank])
        return prof.events()

    monkeypatch.setenv("REID_EXT_CUDA_CHUNK_BYTES", str(4 * n * 64))
    assert not any(e.name in ("aten::mm", "aten::addmm") for e in profile())  # batch-sized: the tile kernels
    monkeypatch.setenv("REID_EXT_CUDA_PRODUCTS_FROM", "0")
    events = profile()
    products = [e for e in events if e.name in ("aten::mm", "aten::addmm")]
    assert len(products) >= 5 * 3  # per chunk: cosines twice, and both sides' products
    largest = max(e.cpu_memory_usage for e in events if e.name in ("aten::empty", "aten::empty_strided"))
    assert 0 < largest < n * m * 4, largest
