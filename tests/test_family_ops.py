"""batch_hard_triplet_loss, modality_centers, hetero_center_triplet_loss and cosine_softmax_loss
against the plain-PyTorch reference, and their modules."""
import pytest
import torch

import reid_ext
from reid_ext import reference
from conftest import LAYOUTS, features, make_labels, torch_device

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


# ---------------------------------------------------------------- modules


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
