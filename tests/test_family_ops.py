"""batch_hard_triplet_loss, modality_centers, hetero_center_triplet_loss and cosine_softmax_loss
against the plain-PyTorch reference, and their modules."""
import pytest
import torch

import reid_ext
from reid_ext import reference
from conftest import CUDA, LAYOUTS, features, make_labels, torch_device

METRICS = ["euclidean", "sqeuclidean", "cosine"]
REDUCTIONS = ["mean", "sum", "none"]


def tolerance(dtype):
    return {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}


def value_and_grads(fn, inputs, *args, **kwargs):
    """fn's output (its first element if a tuple) and the gradients of a fixed projection of it."""
    out = fn(*args, **kwargs)
    extra = ()
    if isinstance(out, tuple):
        out, extra = out[0], out[1:]
    weight = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    if out.requires_grad:
        grads = torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)
    else:
        grads = [None] * len(inputs)
    return (out.detach(),) + tuple(extra), grads


def assert_same(ours, theirs, **tol):
    (values_a, grads_a), (values_b, grads_b) = ours, theirs
    for a, b in zip(values_a, values_b):
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, b, **tol)
        else:
            assert torch.equal(a.cpu(), b.cpu()), (a, b)
    for a, b in zip(grads_a, grads_b):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **tol)


def two_modalities(labels):
    """Alternating modalities within each identity, so that every identity with two samples has both."""
    order = torch.argsort(labels.cpu(), stable=True)
    modalities = torch.empty_like(labels.cpu())
    modalities[order] = torch.arange(labels.numel()) % 2
    return modalities.to(labels.device)


# ---------------------------------------------------------------- batch_hard_triplet_loss


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("soft_margin", [False, True])
def test_batch_hard_matches_reference(device, layout, metric, soft_margin, gen):
    dtype = device.dtype
    x = features(45, 24, gen, device, dtype)
    labels = make_labels(layout, 45, gen).to(torch_device(device))
    kwargs = dict(metric=metric, soft_margin=soft_margin, margin=0.5, reduction="none", return_indices=True)
    ours = value_and_grads(reid_ext.batch_hard_triplet_loss, [x], x, labels, **kwargs)
    theirs = value_and_grads(reference.batch_hard_triplet_loss, [x], x, labels, **kwargs)
    assert_same(ours, theirs, **tolerance(dtype))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_batch_hard_reductions(device, reduction, gen):
    dtype = device.dtype
    x = features(40, 16, gen, device, dtype)
    labels = make_labels("singletons", 40, gen).to(torch_device(device))  # some anchors have no positive
    for fn_kwargs in (dict(margin=0.3), dict(soft_margin=True, metric="cosine")):
        assert_same(
            value_and_grads(reid_ext.batch_hard_triplet_loss, [x], x, labels, reduction=reduction, **fn_kwargs),
            value_and_grads(reference.batch_hard_triplet_loss, [x], x, labels, reduction=reduction, **fn_kwargs),
            **tolerance(dtype),
        )


@pytest.mark.parametrize("metric", METRICS)
def test_batch_hard_ties_go_to_the_lowest_index(device, metric):
    # Small integer features: every distance is exact, so the ties below are exact ties.
    x = torch.tensor([[1, 0], [0, 1], [-1, 0], [-1, 0], [0, -1], [2, 0], [2, 0], [0, 2]], dtype=torch.float32)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    x, labels = x.to(torch_device(device)), labels.to(torch_device(device))
    _, pos, neg = reid_ext.batch_hard_triplet_loss(x, labels, metric=metric, return_indices=True)
    # Anchor 0: rows 2 and 3 are its (equally) farthest positives, rows 5 and 6 its closest negatives.
    assert (pos[0].item(), neg[0].item()) == (2, 5)
    _, ref_pos, ref_neg = reference.batch_hard_triplet_loss(x.double(), labels, metric=metric, return_indices=True)
    assert torch.equal(pos, ref_pos) and torch.equal(neg, ref_neg)


@pytest.mark.parametrize("metric", METRICS)
def test_batch_hard_tiled_matches_reference(metric, gen):
    """Beyond 256 x 256 pairs the CPU kernel streams 32-row blocks past 256-column tiles (here 10
    blocks, tiles of 256 and 44 columns); below, one GEMM gives all dot products."""
    x = features(300, 16, gen, "cpu")
    labels = make_labels("pk", 300, gen)
    kwargs = dict(metric=metric, margin=0.5, reduction="none", return_indices=True)
    assert_same(value_and_grads(reid_ext.batch_hard_triplet_loss, [x], x, labels, **kwargs),
                value_and_grads(reference.batch_hard_triplet_loss, [x], x, labels, **kwargs))


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
@pytest.mark.parametrize("n", [60, 300])  # one GEMM; tiles (ties across the column tiles)
def test_batch_hard_many_ties_match_reference(metric, n, gen):
    x = torch.randint(-1, 2, (n, 3), generator=gen).double()  # few distinct rows: ties everywhere
    labels = torch.randint(0, 6, (n,), generator=gen)
    _, pos, neg = reid_ext.batch_hard_triplet_loss(x, labels, metric=metric, return_indices=True)
    _, ref_pos, ref_neg = reference.batch_hard_triplet_loss(x, labels, metric=metric, return_indices=True)
    assert torch.equal(pos, ref_pos) and torch.equal(neg, ref_neg)


def test_batch_hard_without_positive_or_negative(device, gen):
    x = features(6, 4, gen, device, torch.float32)
    labels = torch.tensor([0, 0, 1, 2, 3, 3], device=torch_device(device))  # anchors 2 and 3 have no positive
    loss, pos, neg = reid_ext.batch_hard_triplet_loss(x, labels, reduction="none", return_indices=True)
    assert pos.tolist()[2:4] == [-1, -1] and (neg >= 0).all()
    assert loss[2] == 0 and loss[3] == 0
    x1 = features(5, 4, gen, device, torch.float32)
    loss, pos, neg = reid_ext.batch_hard_triplet_loss(x1, torch.zeros(5, dtype=torch.long, device=torch_device(device)),
                                                      return_indices=True)
    assert (neg == -1).all() and (pos >= 0).all()
    loss.backward()
    assert loss.item() == 0 and (x1.grad == 0).all()


def test_batch_hard_gradient_flows_through_selected_pairs_only(gen):
    x = features(12, 5, gen, "cpu")
    labels = torch.arange(12) // 3
    loss, pos, neg = reid_ext.batch_hard_triplet_loss(x, labels, margin=10.0, reduction="none", return_indices=True)
    grad, = torch.autograd.grad(loss[0], x)
    touched = {0, pos[0].item(), neg[0].item()}
    assert {i for i in range(12) if grad[i].abs().sum() > 0} == touched


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("soft_margin", [False, True])
def test_batch_hard_gradcheck(metric, soft_margin, gen):
    x = features(10, 4, gen, "cpu")
    labels = torch.arange(10) // 3

    def fn(a):
        return reid_ext.batch_hard_triplet_loss(a, labels, metric=metric, soft_margin=soft_margin, margin=1.0,
                                                reduction="none")

    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("metric", METRICS)
def test_batch_hard_nan_feature_gives_nan_loss(device, metric, gen):
    x = features(16, 8, gen, device, torch.float32, requires_grad=False)
    x[5, 2] = float("nan")
    labels = (torch.arange(16) // 4).to(torch_device(device))
    loss = reid_ext.batch_hard_triplet_loss(x, labels, metric=metric, reduction="none")
    # Row 5 is a candidate of every anchor: every anchor's hardest pair is the NaN one.
    assert torch.isnan(loss).all()


# ---------------------------------------------------------------- modality_centers


def unbalanced_groups(device):
    # (label, modality) groups of sizes 1 to 7, listed out of order.
    labels = torch.tensor([3, 0, 3, 1, 1, 1, 0, 3, 3, 3, 0, 2, 3, 3, 1, 0, 3, 1, 1, 1])
    modalities = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1])
    return labels.to(torch_device(device)), modalities.to(torch_device(device))


@pytest.mark.parametrize("normalize", [True, False])
def test_centers_match_reference(device, normalize, gen):
    dtype = device.dtype
    labels, modalities = unbalanced_groups(device)
    x = features(labels.numel(), 9, gen, device, dtype)
    with torch.no_grad():
        x[4] = 0.0  # a zero row exercises the eps clamp of the normalization
    assert_same(
        value_and_grads(reid_ext.modality_centers, [x], x, labels, modalities, normalize=normalize),
        value_and_grads(reference.modality_centers, [x], x, labels, modalities, normalize=normalize),
        **tolerance(dtype),
    )


def test_centers_order_and_dtypes():
    labels = torch.tensor([5, 2, 5, 2, 9], dtype=torch.int32)
    modalities = torch.tensor([1, 1, 0, 1, 0], dtype=torch.int16)
    centers, center_labels, center_modalities = reid_ext.modality_centers(torch.ones(5, 3), labels, modalities)
    assert center_labels.tolist() == [2, 5, 5, 9] and center_modalities.tolist() == [1, 0, 1, 0]
    assert center_labels.dtype == torch.int32 and center_modalities.dtype == torch.int16
    assert centers.shape == (4, 3)


@pytest.mark.parametrize("normalize", [True, False])
def test_centers_are_bitwise_deterministic(device, normalize):
    gen = torch.Generator().manual_seed(7)
    n = 300 if device.name == "cudasim" else 3000  # the emulated GPU runs a thread per CUDA thread
    x = torch.randn(n, 96, generator=gen).to(torch_device(device)).requires_grad_(True)
    labels = torch.randint(0, 40, (n,), generator=gen).to(torch_device(device))
    modalities = torch.randint(0, 3, (n,), generator=gen).to(torch_device(device))
    runs = []
    threads = torch.get_num_threads()
    try:
        for num_threads in (threads, 1, threads):  # on CPU, also across thread counts
            torch.set_num_threads(num_threads)
            centers, _, _ = reid_ext.modality_centers(x, labels, modalities, normalize=normalize)
            weight = torch.linspace(-1, 1, centers.numel(), device=torch_device(device)).view_as(centers)
            grad, = torch.autograd.grad((centers * weight).sum(), x)
            runs.append((centers.detach(), grad))
    finally:
        torch.set_num_threads(threads)
    for centers, grad in runs[1:]:
        assert torch.equal(centers, runs[0][0]) and torch.equal(grad, runs[0][1])


def test_centers_gradcheck(gen):
    labels, modalities = unbalanced_groups("cpu")
    x = features(labels.numel(), 4, gen, "cpu")
    for normalize in (True, False):
        assert torch.autograd.gradcheck(
            lambda a: reid_ext.modality_centers(a, labels, modalities, normalize=normalize)[0], (x,)
        )


def test_centers_raw_op_checks_group_ids():
    with pytest.raises(ValueError, match=r"group\[1\] = 3 is not in \[0, num_groups=3\)"):
        torch.ops.reid_ext.modality_centers(torch.randn(3, 2), torch.tensor([0, 3, 1]), 3, True)


# ---------------------------------------------------------------- hetero_center_triplet_loss


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mining", ["all", "hard"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_hetero_matches_reference(device, layout, mining, reduction, gen):
    dtype = device.dtype
    x = features(48, 16, gen, device, dtype)
    labels = make_labels(layout, 48, gen).to(torch_device(device))
    modalities = two_modalities(labels)
    kwargs = dict(mining=mining, gamma=8.0, reduction=reduction)
    assert_same(
        value_and_grads(reid_ext.hetero_center_triplet_loss, [x], x, labels, modalities, **kwargs),
        value_and_grads(reference.hetero_center_triplet_loss, [x], x, labels, modalities, **kwargs),
        **tolerance(dtype),
    )


@pytest.mark.parametrize("mining", ["all", "hard"])
def test_hetero_identity_in_one_modality_is_an_invalid_anchor(mining, gen):
    x = features(10, 6, gen, "cpu")
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    modalities = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 0])  # identity 2: visible only
    loss = reid_ext.hetero_center_triplet_loss(x, labels, modalities, mining=mining, reduction="none")
    assert loss.shape == (5,) and loss[4] == 0  # centers (0,0) (0,1) (1,0) (1,1) (2,0)
    expected = reference.hetero_center_triplet_loss(x, labels, modalities, mining=mining, reduction="none")
    torch.testing.assert_close(loss, expected)
    mean = reid_ext.hetero_center_triplet_loss(x, labels, modalities, mining=mining)
    torch.testing.assert_close(mean, loss[:4].sum() / 4)


def test_hetero_gradcheck(gen):
    x = features(12, 4, gen, "cpu")
    labels = torch.arange(12) // 4
    modalities = torch.arange(12) % 2
    for mining in ("all", "hard"):
        assert torch.autograd.gradcheck(
            lambda a: reid_ext.hetero_center_triplet_loss(a, labels, modalities, mining=mining, gamma=2.0,
                                                          margin=2.0), (x,)
        )


# ---------------------------------------------------------------- cosine_softmax_loss


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cosine_softmax_matches_reference(device, label_smoothing, reduction, gen):
    dtype = device.dtype
    x = features(37, 20, gen, device, dtype)
    weight = features(300, 20, gen, device, dtype)  # more classes than one CPU tile
    with torch.no_grad():
        x[3] = 0.0
    labels = torch.randint(0, 300, (37,), generator=gen).to(torch_device(device))
    kwargs = dict(scale=16.0, margin=0.2, label_smoothing=label_smoothing, reduction=reduction)
    assert_same(
        value_and_grads(reid_ext.cosine_softmax_loss, [x, weight], x, weight, labels, **kwargs),
        value_and_grads(reference.cosine_softmax_loss, [x, weight], x, weight, labels, **kwargs),
        **tolerance(dtype),
    )


def test_cosine_softmax_gradient_to_one_side(device, gen):
    dtype = device.dtype
    x = features(9, 6, gen, device, dtype)
    weight = features(5, 6, gen, device, dtype, requires_grad=False)
    labels = torch.randint(0, 5, (9,), generator=gen).to(torch_device(device))
    assert_same(value_and_grads(reid_ext.cosine_softmax_loss, [x], x, weight, labels),
                value_and_grads(reference.cosine_softmax_loss, [x], x, weight, labels), **tolerance(dtype))
    frozen = x.detach()
    weight.requires_grad_(True)
    assert_same(value_and_grads(reid_ext.cosine_softmax_loss, [weight], frozen, weight, labels),
                value_and_grads(reference.cosine_softmax_loss, [weight], frozen, weight, labels), **tolerance(dtype))


@pytest.mark.parametrize("shape", [(140, 4000), (5, 4500)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cosine_softmax_chunks(shape, reduction, gen):
    """More logits than one CPU chunk: several anchor chunks (140 x 4000), or class chunks (C > 4096)."""
    n, num_classes = shape
    x = features(n, 6, gen, "cpu")
    weight = features(num_classes, 6, gen, "cpu")
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    kwargs = dict(scale=8.0, margin=0.3, label_smoothing=0.1, reduction=reduction)
    assert_same(
        value_and_grads(reid_ext.cosine_softmax_loss, [x, weight], x, weight, labels, **kwargs),
        value_and_grads(reference.cosine_softmax_loss, [x, weight], x, weight, labels, **kwargs),
    )


@pytest.mark.parametrize("shape", [(37, 300), (0, 300), (140, 4000), (5, 4500)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("wants", [(True, True), (True, False), (False, True)])
def test_cosine_softmax_gradient_in_forward_matches_two_ops(shape, reduction, wants, gen):
    """The gradients the op returns with the reduced loss (on CPU each chunk's dot products serve
    both directions when chunks are whole rows: one chunk at 37 x 300, chunks of 131 and 9 anchors
    at 140 x 4000; else the two passes, as for C > 4096) equal the backward op's."""
    n, num_classes = shape
    x = features(n, 6, gen, "cpu", requires_grad=False)
    weight = features(num_classes, 6, gen, "cpu", requires_grad=False)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    ops = torch.ops.reid_ext
    total, grad_x, grad_w, _ = ops.cosine_softmax_loss(x, weight, labels, 8.0, 0.3, 0.1, reduction, *wants)
    loss, _, _, lse = ops.cosine_softmax_loss(x, weight, labels, 8.0, 0.3, 0.1, "none", False, False)
    expected_x, expected_w = ops._cosine_softmax_loss_backward(torch.ones(()), x, weight, labels, lse, 8.0, 0.3, 0.1,
                                                               reduction, *wants)
    torch.testing.assert_close(total, loss.sum() / (max(n, 1) if reduction == "mean" else 1))
    torch.testing.assert_close(grad_x, expected_x)
    torch.testing.assert_close(grad_w, expected_w)
    if wants[1]:
        assert grad_w.shape == weight.shape and (n > 0 or (grad_w == 0).all())


def test_cosine_softmax_gradcheck(gen):
    x = features(7, 4, gen, "cpu")
    weight = features(5, 4, gen, "cpu")
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    assert torch.autograd.gradcheck(
        lambda a, w: reid_ext.cosine_softmax_loss(a, w, labels, scale=4.0, label_smoothing=0.1, reduction="none"),
        (x, weight),
    )
    assert torch.autograd.gradcheck(
        lambda a, w: reid_ext.cosine_softmax_loss(a, w, labels, scale=4.0, label_smoothing=0.1), (x, weight)
    )


def test_cosine_softmax_label_out_of_range():
    with pytest.raises(ValueError, match=r"labels\[1\] = 5 is not a class index in \[0, C=5\)"):
        reid_ext.cosine_softmax_loss(torch.randn(2, 3), torch.randn(5, 3), torch.tensor([0, 5]))


def test_cosine_softmax_label_out_of_range_is_nan_on_cuda(cuda_device):
    on = cuda_device.torch
    loss = reid_ext.cosine_softmax_loss(torch.randn(2, 3, device=on), torch.randn(5, 3, device=on),
                                        torch.tensor([0, 5], device=on), reduction="none")
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1])


# ---------------------------------------------------------------- shared edge cases


def all_losses(device):
    """(name, loss(x, labels, modalities)) for every loss of this file, with a fixed weight for cosine-softmax."""
    weight = torch.randn(8, 6, generator=torch.Generator().manual_seed(3)).to(torch_device(device))
    return [
        ("batch_hard", lambda x, l, m: reid_ext.batch_hard_triplet_loss(x, l)),
        ("batch_hard_cosine_soft", lambda x, l, m: reid_ext.batch_hard_triplet_loss(x, l, metric="cosine",
                                                                                      soft_margin=True)),
        ("hetero_all", lambda x, l, m: reid_ext.hetero_center_triplet_loss(x, l, m)),
        ("hetero_hard", lambda x, l, m: reid_ext.hetero_center_triplet_loss(x, l, m, mining="hard")),
        ("cosine_softmax", lambda x, l, m: reid_ext.cosine_softmax_loss(x, weight.to(x.dtype), l % 8)),
    ]


def test_empty_batch_is_zero(device):
    x = torch.zeros(0, 6, device=torch_device(device), requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long, device=torch_device(device))
    for name, fn in all_losses(device):
        loss = fn(x, empty, empty)
        assert loss.item() == 0.0, name
        loss.backward()
        assert x.grad.shape == (0, 6), name


def test_nan_feature_gives_nan_loss(device, gen):
    x = features(16, 6, gen, device, torch.float32, requires_grad=False)
    x[5, 2] = float("nan")
    labels = (torch.arange(16) // 4).to(torch_device(device))
    for name, fn in all_losses(device):
        assert torch.isnan(fn(x, labels, two_modalities(labels))), name


def test_non_contiguous_inputs(device, gen):
    dtype = device.dtype
    x = features(24, 12, gen, device, dtype, requires_grad=False)[:, ::2].requires_grad_(True)
    labels = (torch.arange(48, device=torch_device(device)) // 4)[::2]
    modalities = (torch.arange(48, device=torch_device(device)) % 2)[::2]
    weight = features(10, 12, gen, device, dtype)[:, ::2]
    assert not x.is_contiguous() and not labels.is_contiguous() and not weight.is_contiguous()
    x_c = x.detach().contiguous().requires_grad_(True)
    for name, fn in all_losses(device):
        assert_same(value_and_grads(fn, [x], x, labels, modalities),
                    value_and_grads(fn, [x_c], x_c, labels.contiguous(), modalities.contiguous()),
                    **tolerance(dtype))
    assert_same(value_and_grads(reid_ext.cosine_softmax_loss, [x], x, weight, labels % 10),
                value_and_grads(reference.cosine_softmax_loss, [x_c], x_c, weight.contiguous(), labels % 10),
                **tolerance(dtype))


# ---------------------------------------------------------------- modules


def test_modules_match_functions(gen):
    x = features(24, 8, gen, "cpu")
    labels = torch.arange(24) // 4
    modalities = torch.arange(24) % 2
    module = reid_ext.losses.BatchHardTripletLoss(margin=0.2, metric="cosine")
    torch.testing.assert_close(module(x, labels), reference.batch_hard_triplet_loss(x, labels, margin=0.2,
                                                                                      metric="cosine"))
    assert "metric='cosine'" in repr(module)
    module = reid_ext.losses.HeteroCenterTripletLoss(mining="hard", margin=0.5)
    torch.testing.assert_close(module(x, labels, modalities),
                               reference.hetero_center_triplet_loss(x, labels, modalities, mining="hard", margin=0.5))
    assert "mining='hard'" in repr(module)


def test_cosine_softmax_module_owns_its_weight(gen):
    torch.manual_seed(0)
    module = reid_ext.losses.CosineSoftmaxLoss(num_classes=6, dim=8, scale=10.0, margin=0.1, dtype=torch.float64)
    assert [name for name, _ in module.named_parameters()] == ["weight"]
    assert module.weight.shape == (6, 8) and 0.001 < module.weight.std().item() < 0.1
    x = features(12, 8, gen, "cpu")
    labels = torch.arange(12) % 6
    loss = module(x, labels)
    torch.testing.assert_close(loss, reference.cosine_softmax_loss(x, module.weight, labels, scale=10.0, margin=0.1))
    loss.backward()
    assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    assert "num_classes=6" in repr(module)
    with pytest.raises(ValueError, match="num_classes and dim must be >= 1"):
        reid_ext.losses.CosineSoftmaxLoss(num_classes=0, dim=8)


# ---------------------------------------------------------------- torch.library / torch.compile


def _opcheck_cases(device):
    gen = torch.Generator().manual_seed(1)
    dtype = device.dtype
    x = torch.randn(12, 6, generator=gen, dtype=dtype).to(torch_device(device)).requires_grad_(True)
    weight = torch.randn(5, 6, generator=gen, dtype=dtype).to(torch_device(device)).requires_grad_(True)
    labels = (torch.arange(12) // 3).to(torch_device(device))
    group = (torch.arange(12) % 5).to(torch_device(device))
    ops = reid_ext.ops._OPS
    xd = x.detach()
    _, _, _, pos, neg, d_ap, d_an = ops.batch_hard_triplet_loss(xd, labels, 0.3, "euclidean", False, "none", False)
    _, counts = ops.modality_centers(xd, group, 5, True)
    _, _, _, lse = ops.cosine_softmax_loss(xd, weight.detach(), labels % 5, 8.0, 0.2, 0.1, "none", False, False)
    ones = torch.ones(12, dtype=dtype, device=torch_device(device))
    modalities = (torch.arange(12) % 2).to(torch_device(device))
    return [
        (ops.batch_hard_triplet_loss.default, (x, labels, 0.3, "euclidean", False, "none", False)),
        (ops.batch_hard_triplet_loss.default, (x, labels, 0.0, "cosine", True, "mean", True)),
        (ops._batch_hard_triplet_loss_backward.default, (ones, xd, pos, neg, d_ap, d_an, 0.3, "euclidean", False,
                                                         "none")),
        (ops._modality_groups.default, (labels, modalities)),
        (ops.modality_centers.default, (x, group, 5, True)),
        (ops.modality_centers.default, (x, group, 5, False)),
        (ops._modality_centers_backward.default, (torch.ones(5, 6, dtype=dtype, device=torch_device(device)), xd,
                                                  group, counts, True)),
        (ops.hetero_center_triplet_loss.default, (x, labels, modalities, "all", 8.0, 0.25, "mean", True)),
        (ops.hetero_center_triplet_loss.default, (x, labels, modalities, "hard", 8.0, 0.3, "sum", True)),
        (ops.cosine_softmax_loss.default, (x, weight, labels % 5, 8.0, 0.2, 0.1, "none", False, False)),
        (ops.cosine_softmax_loss.default, (x, weight, labels % 5, 8.0, 0.2, 0.1, "mean", True, True)),
        (ops.cosine_softmax_loss.default, (x, weight.detach(), labels % 5, 8.0, 0.2, 0.0, "sum", True, False)),
        (ops._cosine_softmax_loss_backward.default, (ones, xd, weight.detach(), labels % 5, lse, 8.0, 0.2, 0.1,
                                                     "none", True, True)),
    ]


def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph(device, gen):
    dtype = torch.float32
    x = features(24, 16, gen, device, dtype)
    labels = (torch.arange(24) // 4).to(torch_device(device))
    modalities = two_modalities(labels)
    classifier = reid_ext.losses.CosineSoftmaxLoss(6, 16, device=torch_device(device))
    batch_hard = reid_ext.losses.BatchHardTripletLoss()
    hetero = reid_ext.losses.HeteroCenterTripletLoss()

    def step(f):
        return batch_hard(f, labels) + classifier(f, labels) + hetero(f, labels, modalities)

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if device.name == "cuda" else "aot_eager")
    assert_same(value_and_grads(compiled, [x, classifier.weight], x),
                value_and_grads(step, [x, classifier.weight], x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- CUDA


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_within_twice_eager(cuda_device, dtype, gen):
    # The exact values: float64 on the CPU (the ops take float32/16/bfloat16 on CUDA).
    x64 = features(128, 64, gen, "cpu", torch.float64)
    labels = torch.arange(128) // 4
    modalities = two_modalities(labels)
    weight64 = features(40, 64, gen, "cpu", torch.float64)
    cases = [
        ("batch_hard", lambda x, w, l, m, lib: lib.batch_hard_triplet_loss(x, l, reduction="none"), False),
        ("batch_hard_cosine", lambda x, w, l, m, lib: lib.batch_hard_triplet_loss(x, l, metric="cosine",
                                                                                   reduction="none"), False),
        ("centers", lambda x, w, l, m, lib: lib.modality_centers(x, l, m)[0], False),
        ("hetero_all", lambda x, w, l, m, lib: lib.hetero_center_triplet_loss(x, l, m, reduction="none"), False),
        ("hetero_hard", lambda x, w, l, m, lib: lib.hetero_center_triplet_loss(x, l, m, mining="hard",
                                                                                reduction="none"), False),
        ("cosine_softmax", lambda x, w, l, m, lib: lib.cosine_softmax_loss(x, w, l % 40, reduction="none"), True),
    ]

    def err(a, b):
        return (a.cpu().double() - b).abs().max().item()

    gpu = labels.to(cuda_device.torch), modalities.to(cuda_device.torch)
    for name, fn, with_weight in cases:
        inputs64 = [x64, weight64] if with_weight else [x64]
        (exact, *_), exact_grads = value_and_grads(fn, inputs64, x64, weight64, labels, modalities, reference)
        x = x64.detach().to(cuda_device.torch, dtype).requires_grad_(True)
        w = weight64.detach().to(cuda_device.torch, dtype).requires_grad_(True)
        inputs = [x, w] if with_weight else [x]
        (ours, *_), ours_grads = value_and_grads(fn, inputs, x, w, *gpu, reid_ext)
        (eager, *_), eager_grads = value_and_grads(fn, inputs, x, w, *gpu, reference)
        assert ours.dtype == dtype, name
        assert err(ours, exact) <= 2 * err(eager, exact) + 1e-6, name
        for g_ours, g_eager, g_exact in zip(ours_grads, eager_grads, exact_grads):
            assert err(g_ours, g_exact) <= 2 * err(g_eager, g_exact) + 1e-6, name


@CUDA
def test_cuda_matches_cpu_large(gen):
    """Sizes with several tiles, a split reference range on the GPU, and many classes."""
    x = features(700, 96, gen, "cpu", torch.float32)
    labels = torch.randint(0, 150, (700,), generator=gen)
    modalities = two_modalities(labels)
    weight = features(1500, 96, gen, "cpu", torch.float32)
    cases = [
        (lambda a, w, l, m: reid_ext.batch_hard_triplet_loss(a, l, reduction="none"), False),
        (lambda a, w, l, m: reid_ext.batch_hard_triplet_loss(a, l, metric="cosine", soft_margin=True,
                                                             reduction="none"), False),
        (lambda a, w, l, m: reid_ext.modality_centers(a, l, m)[0], False),
        (lambda a, w, l, m: reid_ext.cosine_softmax_loss(a, w, l, label_smoothing=0.1, reduction="none"), True),
    ]
    for fn, with_weight in cases:
        cpu = value_and_grads(fn, [x, weight] if with_weight else [x], x, weight, labels, modalities)
        xc, wc = (t.detach().cuda().requires_grad_(True) for t in (x, weight))
        gpu = value_and_grads(fn, [xc, wc] if with_weight else [xc], xc, wc, labels.cuda(), modalities.cuda())
        torch.testing.assert_close(gpu[0][0].cpu(), cpu[0][0], rtol=1e-4, atol=1e-4)
        for g, c in zip(gpu[1], cpu[1]):
            torch.testing.assert_close(g.cpu(), c, rtol=1e-3, atol=1e-5)


@CUDA
def test_cuda_ops_do_not_synchronize(gen):
    x = features(64, 32, gen, "cuda", torch.float32)
    weight = features(10, 32, gen, "cuda", torch.float32)
    labels = torch.arange(64, device="cuda") // 4
    group = torch.arange(64, device="cuda") % 7
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = (reid_ext.batch_hard_triplet_loss(x, labels) + reid_ext.cosine_softmax_loss(x, weight, labels % 10)
                + torch.ops.reid_ext.modality_centers(x, group, 7, True)[0].sum())
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_kernels_registered_when_built_with_cuda():
    for name in ["batch_hard_triplet_loss", "_batch_hard_triplet_loss_backward", "modality_centers",
                 "_modality_centers_backward", "cosine_softmax_loss", "_cosine_softmax_loss_backward"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"reid_ext::{name}", "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"reid_ext::{name}", "CUDA") == reid_ext.WITH_CUDA, name


# ---------------------------------------------------------------- bad input


BAD = [
    (reid_ext.batch_hard_triplet_loss, dict(metric="manhattan"), "metric must be one of"),
    (reid_ext.batch_hard_triplet_loss, dict(margin=-0.1), "margin must be a finite number >= 0, got -0.1"),
    (reid_ext.batch_hard_triplet_loss, dict(margin=float("nan")), "margin must be a finite number >= 0, got nan"),
    (reid_ext.batch_hard_triplet_loss, dict(reduction="avg"), "reduction must be one of"),
    (reid_ext.batch_hard_triplet_loss, dict(labels=torch.zeros(3, dtype=torch.long)), "labels has 3 entries but x"),
    (reid_ext.batch_hard_triplet_loss, dict(x=torch.randn(4)), "x must be a 2-D"),
    (reid_ext.batch_hard_triplet_loss, dict(labels=torch.zeros(4)), "labels must be an integer"),
    (reid_ext.modality_centers, dict(modalities=None), "modalities is required"),
    (reid_ext.modality_centers, dict(modalities=torch.zeros(5, dtype=torch.long)), "modalities has 5 entries"),
    (reid_ext.modality_centers, dict(x=torch.randn(4, 0)), "non-empty feature dimension"),
    (reid_ext.hetero_center_triplet_loss, dict(mining="semi"), "mining must be one of"),
    (reid_ext.hetero_center_triplet_loss, dict(gamma=0.0), "gamma must be a finite number > 0"),
    (reid_ext.hetero_center_triplet_loss, dict(gamma=float("inf")), "gamma must be a finite number > 0"),
    (reid_ext.hetero_center_triplet_loss, dict(mining="hard", margin=float("nan")), "margin must be a finite"),
    (reid_ext.hetero_center_triplet_loss, dict(mining="hard", reduction="avg"), "reduction must be one of"),
    (reid_ext.cosine_softmax_loss, dict(weight=torch.randn(5, 2)), "weight has D=2 but x has D=3"),
    (reid_ext.cosine_softmax_loss, dict(weight=torch.randn(5, 3, dtype=torch.float64)), "weight has dtype"),
    (reid_ext.cosine_softmax_loss, dict(scale=0.0), "scale must be a finite number > 0"),
    (reid_ext.cosine_softmax_loss, dict(scale=float("nan")), "scale must be a finite number > 0"),
    (reid_ext.cosine_softmax_loss, dict(margin=float("inf")), "margin must be a finite number"),
    (reid_ext.cosine_softmax_loss, dict(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\)"),
    (reid_ext.cosine_softmax_loss, dict(x=torch.randint(0, 3, (4, 3))), "x must be a floating-point Tensor"),
]


@pytest.mark.parametrize("fn,override,message", BAD, ids=lambda v: getattr(v, "__name__", None))
def test_bad_input(fn, override, message):
    name = fn.__name__
    args = dict(x=torch.randn(4, 3), labels=torch.zeros(4, dtype=torch.long))
    if name in ("modality_centers", "hetero_center_triplet_loss"):
        args["modalities"] = torch.zeros(4, dtype=torch.long)
    if name == "cosine_softmax_loss":
        args["weight"] = torch.randn(5, 3)
    args.update(override)
    positional = [args.pop(k) for k in ("x", "weight", "labels", "modalities") if k in args]
    for impl in (fn, getattr(reference, name)):
        with pytest.raises((ValueError, TypeError), match=message):
            impl(*positional, **args)


def test_op_level_checks_name_the_argument():
    """The C++ ops check their arguments too, for callers that skip the Python wrappers."""
    ops = torch.ops.reid_ext
    with pytest.raises(ValueError, match="metric must be one of 'euclidean', 'sqeuclidean', 'cosine', got 'l1'"):
        ops.batch_hard_triplet_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 0.3, "l1", False, "mean",
                                    False)
    with pytest.raises(ValueError, match="group has 3 entries but x has 4"):
        ops.modality_centers(torch.randn(4, 3), torch.zeros(3, dtype=torch.long), 1, True)
    with pytest.raises(ValueError, match="weight has D=2 but x has D=3"):
        ops.cosine_softmax_loss(torch.randn(4, 3), torch.randn(5, 2), torch.zeros(4, dtype=torch.long), 1.0, 0.0, 0.0,
                                "mean", False, False)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        ops.hetero_center_triplet_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long),
                                       torch.zeros(4, dtype=torch.long), "all", 8.0, 0.25, "none", False)


def test_wide_features_match_reference(device, gen):
    """D = 130: several 64-column feature chunks and a partial one in every kernel."""
    x = features(70, 130, gen, device, device.dtype)
    labels = make_labels("pk", 70, gen).to(torch_device(device))
    modalities = two_modalities(labels)
    weight = features(30, 130, gen, device, device.dtype)
    cases = [
        (lambda lib: lib.batch_hard_triplet_loss(x, labels, metric="cosine", reduction="none"), [x]),
        (lambda lib: lib.batch_hard_triplet_loss(x, labels, reduction="none"), [x]),
        (lambda lib: lib.modality_centers(x, labels, modalities)[0], [x]),
        (lambda lib: lib.cosine_softmax_loss(x, weight, labels % 30, reduction="none"), [x, weight]),
    ]
    for fn, inputs in cases:
        assert_same(value_and_grads(fn, inputs, reid_ext), value_and_grads(fn, inputs, reference),
                    **tolerance(device.dtype))
