"""cosine_softmax_loss against the plain-PyTorch reference: margin, label smoothing, reductions, the
CPU chunks and the gradient in the forward, labels out of range, and its module's weight."""
import pytest
import torch

import reid_ext
from reid_ext import reference
from conftest import REDUCTIONS, assert_same, features, tolerance, torch_device, value_and_grads


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


def test_cosine_softmax_module_owns_its_weight(gen):
    torch.manual_seed(0)
    module = reid_ext.losses.CosineSoftmaxLoss(num_classes=6, dim=8, scale=10.0, margin=0.1, dtype=torch.float64)
    assert [name for name, _ in module.named_parameters()] == ["weight"]
    assert module.weight.shape == (6, 8)
    assert 0.5 < module.weight.std().item() / reid_ext.defaults.CLASSIFIER_INIT_STD < 1.5  # N(0, std^2) rows
    x = features(12, 8, gen, "cpu")
    labels = torch.arange(12) % 6
    loss = module(x, labels)
    torch.testing.assert_close(loss, reference.cosine_softmax_loss(x, module.weight, labels, scale=10.0, margin=0.1))
    loss.backward()
    assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    assert "num_classes=6" in repr(module)
    with pytest.raises(ValueError, match="num_classes and dim must be >= 1"):
        reid_ext.losses.CosineSoftmaxLoss(num_classes=0, dim=8)
