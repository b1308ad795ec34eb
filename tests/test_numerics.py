"""Numerical edge cases on every kernel path: NaN features never vanish, and cosine-based ops are
scale-invariant up to the dtype's limits (no overflow in the norms).

The sizes pick the CPU kernel paths of unified_triplet_loss: a batch of 40 is a single tile, 600
is visited in symmetric block pairs; against a bank, 40 x 300 is a single tile, 900 x 300 and
40 x 600 are panels when the gradient comes with the loss (reduction mean/sum, x requiring grad)
and tiles otherwise, and a bank of 131104 rows is too large for panels (two passes). Batch-hard:
40 rows are one GEMM, 300 rows are streamed in tiles.
"""
import pytest
import torch

import reid_ext
from reid_ext import reference
from conftest import torch_device

REDUCTIONS = ["none", "mean", "sum"]
BANKS = [(40, 300), (900, 300), (40, 600), (4, 131104)]


def skip_cpu_only_bank(device, m):
    """The 131104-row bank picks a CPU schedule (too large for panels); on the CUDA kernels it is one
    more column-split case like 40 x 600, at hundreds of times the cost on the emulated GPU."""
    if device.cuda_kernels and m > 2**17:
        pytest.skip("a CPU kernel path; the CUDA kernels' split path is the 40 x 600 case")


def on(device, *tensors):
    return [t.to(torch_device(device)) for t in tensors]


def feats(n, d, gen, device, dtype=torch.float64, requires_grad=False):
    x = torch.randn(n, d, generator=gen, dtype=torch.float64).to(device=torch_device(device), dtype=dtype)
    return x.requires_grad_(requires_grad)


def check_nan_loss(loss, expected, reduction, nan_anchors):
    """The loss is NaN wherever the reference's is, and at least at nan_anchors; reduced, NaN."""
    if reduction == "none":
        torch.testing.assert_close(loss.double(), expected.double(), equal_nan=True, rtol=1e-4, atol=1e-5)
        assert loss[nan_anchors].isnan().all()
    else:
        assert loss.isnan() and expected.isnan()
    if loss.requires_grad:  # the backward runs on NaN statistics without failing
        loss.sum().backward()


# ---------------------------------------------------------------- NaN never vanishes


@pytest.mark.parametrize("n, m", BANKS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("grad", [False, True])
def test_unified_nan_anchor_without_positive_in_bank(device, n, m, reduction, grad, gen):
    skip_cpu_only_bank(device, m)
    # Anchor 0 has a NaN feature and no positive in the bank: it is not valid, but its loss is NaN.
    x = feats(n, 8, gen, device, device.dtype)
    bank = feats(m, 8, gen, device, device.dtype)
    labels, bank_labels = on(device, torch.randint(0, 20, (n,), generator=gen), torch.arange(m) % 20)
    with torch.no_grad():
        x[0, 3] = float("nan")
    labels[0] = -1
    x.requires_grad_(grad)
    kwargs = dict(ref=bank, ref_labels=bank_labels, reduction=reduction)
    loss = reid_ext.unified_triplet_loss(x, labels, **kwargs)
    check_nan_loss(loss, reference.unified_triplet_loss(x.detach(), labels, **kwargs), reduction, [0])


@pytest.mark.parametrize("n, m", BANKS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("grad", [False, True])
def test_unified_nan_bank_row_paired_with_anchor_without_positive(device, n, m, reduction, grad, gen):
    skip_cpu_only_bank(device, m)
    # Mode "cross": bank row 1 (modality 1, NaN) pairs only with anchor 0, the one anchor of
    # modality 0, which has no positive in the bank; every other anchor has a finite loss.
    x = feats(n, 8, gen, device, device.dtype, requires_grad=grad)
    bank = feats(m, 8, gen, device, device.dtype)
    labels = torch.randint(0, 20, (n,), generator=gen)
    labels[0] = -1
    modalities = torch.ones(n, dtype=torch.long)
    modalities[0] = 0
    bank_labels, bank_modalities = torch.arange(m) % 20, torch.arange(m) % 2
    labels, modalities, bank_labels, bank_modalities = on(device, labels, modalities, bank_labels, bank_modalities)
    with torch.no_grad():
        bank[1, 5] = float("nan")
    kwargs = dict(modalities=modalities, mode="cross", ref=bank, ref_labels=bank_labels,
                  ref_modalities=bank_modalities, reduction=reduction)
    loss = reid_ext.unified_triplet_loss(x, labels, **kwargs)
    expected = reference.unified_triplet_loss(x.detach(), labels, **kwargs)
    check_nan_loss(loss, expected, reduction, [0])
    if reduction == "none":
        assert loss[1:].isfinite().all()


@pytest.mark.parametrize("n", [40, 600])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("grad", [False, True])
def test_unified_nan_anchor_without_pairs(device, n, reduction, grad, gen):
    # Mode "intra" and anchor 0 the only one of modality 2: it pairs with nothing, so its NaN
    # feature reaches no other anchor, and only its own squared norm can carry it to the loss.
    x = feats(n, 8, gen, device, device.dtype)
    labels = torch.arange(n) // 4
    modalities = torch.arange(n) % 2
    modalities[0] = 2
    labels, modalities = on(device, labels, modalities)
    with torch.no_grad():
        x[0, 2] = float("nan")
    x.requires_grad_(grad)
    kwargs = dict(modalities=modalities, mode="intra", reduction=reduction)
    loss = reid_ext.unified_triplet_loss(x, labels, **kwargs)
    expected = reference.unified_triplet_loss(x.detach(), labels, **kwargs)
    check_nan_loss(loss, expected, reduction, [0])
    if reduction == "none":
        assert loss[1:].isfinite().all()


@pytest.mark.parametrize("n", [1, 40, 300])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("grad", [False, True])
def test_batch_hard_nan_anchor_all_distinct(device, n, metric, reduction, grad, gen):
    # All labels distinct: no anchor is valid. Row n // 2 is NaN: its own loss is NaN, and so is
    # every other anchor's, whose hardest negative is at a NaN distance.
    x = feats(n, 8, gen, device, device.dtype)
    labels = on(device, torch.arange(n))[0]
    with torch.no_grad():
        x[n // 2, 1] = float("nan")
    x.requires_grad_(grad)
    kwargs = dict(metric=metric, reduction=reduction)
    loss = reid_ext.batch_hard_triplet_loss(x, labels, **kwargs)
    expected = reference.batch_hard_triplet_loss(x.detach(), labels, **kwargs)
    check_nan_loss(loss, expected, reduction, list(range(n)))


# ---------------------------------------------------------------- scale invariance of cosine ops

# Beyond these the squared norms overflowed (float32 from about 1.8e19).
SCALES = [pytest.param(torch.float32, 1e25, id="float32-1e25"), pytest.param(torch.float64, 1e300, id="float64-1e300")]


class Scaled:
    """Rows of a random [n, d] matrix in dtype, some (`rows`) multiplied by `scale`.

    x: the op's input (requires grad); plain: the float64 rows it represents, unscaled (requires
    grad), for the reference; c: the per-row factor, Tensor[n, 1]. A scale-invariant f has
    f(x) = f(plain) and, as f(c x) = f(x), grad_x = grad_plain / c.
    """

    def __init__(self, n, d, gen, device, dtype, scale, rows):
        base = torch.randn(n, d, generator=gen, dtype=torch.float64)
        self.c = torch.ones(n, 1, dtype=torch.float64)
        self.c[rows] = scale
        x = (base * self.c).to(dtype)
        self.plain = (x.double() / self.c).to(torch_device(device)).requires_grad_()
        self.x = x.to(torch_device(device)).requires_grad_()
        self.c = self.c.to(torch_device(device))

    def grad_as_plain(self):
        return self.x.grad.double() * self.c


def skip_float64_on_cuda(device, dtype):
    if device.cuda_kernels and dtype == torch.float64:
        pytest.skip("the CUDA kernels take float32, float16 and bfloat16")


def tolerance(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-7, atol=1e-9)


def check_scaled(fn, ref_fn, scaled, dtype, weight_seed=0):
    """fn on the scaled inputs against ref_fn on the plain ones: outputs, and the gradients of a
    fixed random projection of the outputs (compared as plain-input gradients)."""
    out, expected = fn(*(s.x for s in scaled)), ref_fn(*(s.plain for s in scaled))
    tol = tolerance(dtype)
    torch.testing.assert_close(out.detach().double(), expected.detach(), **tol)
    w = torch.randn(expected.shape, generator=torch.Generator().manual_seed(weight_seed), dtype=torch.float64)
    w = w.to(expected.device)
    (out.double() * w).sum().backward()
    (expected * w).sum().backward()
    for s in scaled:
        torch.testing.assert_close(s.grad_as_plain(), s.plain.grad, **tol)


@pytest.mark.parametrize("dtype, scale", SCALES)
@pytest.mark.parametrize("with_y", [False, True])
def test_cosine_similarity_is_scale_invariant(device, dtype, scale, with_y, gen):
    skip_float64_on_cuda(device, dtype)
    scaled = [Scaled(30, 16, gen, device, dtype, scale, [0, 4, 5])]
    if with_y:
        scaled.append(Scaled(20, 16, gen, device, dtype, scale, [1, 2]))
    check_scaled(reid_ext.cosine_similarity, reference.cosine_similarity, scaled, dtype)


@pytest.mark.parametrize("dtype, scale", SCALES)
@pytest.mark.parametrize("n, m", [(40, None), (600, None), (40, 300), (40, 600)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_unified_is_scale_invariant(device, dtype, scale, n, m, reduction, gen):
    skip_float64_on_cuda(device, dtype)
    labels = on(device, torch.arange(n) // 4)[0]
    scaled = [Scaled(n, 16, gen, device, dtype, scale, [0, 1, 7, n - 1])]
    kwargs = dict(gamma=16.0, reduction=reduction)
    if m is None:
        def fn(x):
            return reid_ext.unified_triplet_loss(x, labels, **kwargs)

        def ref_fn(x):
            return reference.unified_triplet_loss(x, labels, **kwargs)
    else:
        bank_labels = on(device, torch.arange(m) % (n // 4))[0]
        scaled.append(Scaled(m, 16, gen, device, dtype, scale, [2, 3, m - 1]))

        def fn(x, bank):
            return reid_ext.unified_triplet_loss(x, labels, ref=bank, ref_labels=bank_labels, **kwargs)

        def ref_fn(x, bank):
            return reference.unified_triplet_loss(x, labels, ref=bank, ref_labels=bank_labels, **kwargs)
    check_scaled(fn, ref_fn, scaled, dtype)


@pytest.mark.parametrize("dtype, scale", SCALES)
@pytest.mark.parametrize("n", [40, 300])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_batch_hard_cosine_is_scale_invariant(device, dtype, scale, n, reduction, gen):
    skip_float64_on_cuda(device, dtype)
    labels = on(device, torch.arange(n) // 4)[0]
    kwargs = dict(metric="cosine", reduction=reduction)
    check_scaled(lambda x: reid_ext.batch_hard_triplet_loss(x, labels, **kwargs),
                 lambda x: reference.batch_hard_triplet_loss(x, labels, **kwargs),
                 [Scaled(n, 16, gen, device, dtype, scale, [0, 5, n - 2])], dtype)


@pytest.mark.parametrize("dtype, scale", SCALES)
def test_modality_centers_is_scale_invariant(device, dtype, scale, gen):
    skip_float64_on_cuda(device, dtype)
    labels, modalities = on(device, torch.arange(24) // 4, torch.arange(24) % 2)
    check_scaled(lambda x: reid_ext.modality_centers(x, labels, modalities)[0],
                 lambda x: reference.modality_centers(x, labels, modalities)[0],
                 [Scaled(24, 16, gen, device, dtype, scale, [0, 3, 9])], dtype)


@pytest.mark.parametrize("dtype, scale", SCALES)
def test_hetero_center_all_is_scale_invariant(device, dtype, scale, gen):
    skip_float64_on_cuda(device, dtype)
    labels, modalities = on(device, torch.arange(32) // 4, torch.arange(32) % 2)
    kwargs = dict(mining="all", gamma=16.0)
    check_scaled(lambda x: reid_ext.hetero_center_triplet_loss(x, labels, modalities, **kwargs),
                 lambda x: reference.hetero_center_triplet_loss(x, labels, modalities, **kwargs),
                 [Scaled(32, 16, gen, device, dtype, scale, [1, 2, 17])], dtype)


@pytest.mark.parametrize("dtype, scale", SCALES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cosine_softmax_is_scale_invariant(device, dtype, scale, reduction, gen):
    skip_float64_on_cuda(device, dtype)
    labels = on(device, torch.randint(0, 10, (24,), generator=gen))[0]
    kwargs = dict(scale=16.0, reduction=reduction)
    check_scaled(lambda x, w: reid_ext.cosine_softmax_loss(x, w, labels, **kwargs),
                 lambda x, w: reference.cosine_softmax_loss(x, w, labels, **kwargs),
                 [Scaled(24, 16, gen, device, dtype, scale, [0, 11]), Scaled(10, 16, gen, device, dtype, scale, [3])],
                 dtype)


@pytest.mark.parametrize("dtype, scale", SCALES)
@pytest.mark.parametrize("with_y", [False, True])
@pytest.mark.parametrize("largest", [True, False])
def test_topk_similarity_is_scale_invariant(device, dtype, scale, with_y, largest, gen):
    skip_float64_on_cuda(device, dtype)
    x = Scaled(30, 16, gen, device, dtype, scale, [0, 4, 5])
    y = Scaled(40, 16, gen, device, dtype, scale, [1, 2, 39]) if with_y else None
    got = reid_ext.topk_similarity(x.x.detach(), None if y is None else y.x.detach(), k=5, largest=largest)
    dense = reference.cosine_similarity(x.plain.detach(), None if y is None else y.plain.detach())
    expected = dense.topk(5, dim=1, largest=largest)
    tol = tolerance(dtype)
    torch.testing.assert_close(got.values.double(), expected.values, **tol)
    assert torch.equal(got.indices, expected.indices)
    far = dense.min(dim=1).values if largest else dense.max(dim=1).values
    torch.testing.assert_close(got.far.double(), far, **tol)
