"""unified_triplet_loss against the plain-PyTorch reference: modes, reductions, banks, the CPU
kernel's paths (tiles, panels, the gradient in the forward), gradcheck and its edge cases."""
import math

import pytest
import torch

import reid_ext
from reid_ext import reference
from conftest import LAYOUTS, MODES, REDUCTIONS, assert_same, features, make_labels, torch_device, value_and_grads


def unified_case(n, d, gen, device, layout, mode, dtype=torch.float64, requires_grad=True):
    x = features(n, d, gen, device, dtype, requires_grad)
    labels = make_labels(layout, n, gen).to(torch_device(device))
    modalities = torch.randint(0, 2, (n,), generator=gen).to(torch_device(device))
    return x, labels, modalities


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_unified_matches_reference(device, layout, mode, reduction, gen):
    dtype = device.dtype
    x, labels, modalities = unified_case(45, 24, gen, device, layout, mode, dtype)
    kwargs = dict(gamma=8.0, margin=0.3, modalities=modalities, mode=mode, reduction=reduction)
    assert_same(
        value_and_grads(reid_ext.unified_triplet_loss, [x], x, labels, **kwargs),
        value_and_grads(reference.unified_triplet_loss, [x], x, labels, **kwargs),
        **device.tol,
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ref_requires_grad", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_unified_reference_bank(device, mode, ref_requires_grad, reduction, gen):
    dtype = device.dtype
    x, labels, modalities = unified_case(33, 16, gen, device, "pk", mode, dtype)
    bank = features(150, 16, gen, device, dtype, requires_grad=ref_requires_grad)
    bank_labels = torch.randint(0, 12, (150,), generator=gen).to(torch_device(device))
    bank_modalities = torch.randint(0, 2, (150,), generator=gen).to(torch_device(device))
    kwargs = dict(gamma=16.0, modalities=modalities, mode=mode, ref=bank, ref_labels=bank_labels,
                  ref_modalities=bank_modalities, reduction=reduction)
    inputs = [x, bank] if ref_requires_grad else [x]
    ours = value_and_grads(reid_ext.unified_triplet_loss, inputs, x, labels, **kwargs)
    assert_same(ours, value_and_grads(reference.unified_triplet_loss, inputs, x, labels, **kwargs), **device.tol)
    if not ref_requires_grad:
        loss = reid_ext.unified_triplet_loss(x, labels, **kwargs)
        assert loss.grad_fn is not None and not bank.requires_grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_bank", [False, True])
def test_unified_labels_beyond_int32(device, mode, with_bank, gen):
    """The CPU kernel compares labels and modalities as int32 codes: values beyond int32 that
    agree in their low 32 bits must still count as different."""
    x, labels, modalities = unified_case(40, 8, gen, device, "pk", mode, device.dtype)
    big = lambda v: v * 2**32 + 7  # every value is 7 in its low 32 bits
    kwargs = dict(gamma=8.0, modalities=big(modalities), mode=mode, reduction="none")
    inputs = [x]
    if with_bank:
        bank = features(70, 8, gen, device, device.dtype)
        kwargs.update(ref=bank, ref_labels=big(torch.randint(0, 12, (70,), generator=gen).to(torch_device(device))),
                      ref_modalities=big(torch.randint(0, 2, (70,), generator=gen).to(torch_device(device))))
        inputs = [x, bank]
    ours = value_and_grads(reid_ext.unified_triplet_loss, inputs, x, big(labels), **kwargs)
    assert_same(ours, value_and_grads(reference.unified_triplet_loss, inputs, x, big(labels), **kwargs), **device.tol)
    assert ours[0][0].abs().sum() > 0


@pytest.mark.parametrize("mode", MODES)
def test_unified_large_batch(mode, gen):
    """Beyond a single tile (512 anchors) the CPU kernel visits each symmetric pair of 256-blocks
    once (here 5 blocks, the last of 76 rows): same results."""
    x, labels, modalities = unified_case(1100, 8, gen, "cpu", "singletons", mode)
    with torch.no_grad():
        x[700] = 0.0
    kwargs = dict(gamma=6.0, modalities=modalities, mode=mode, reduction="none")
    assert_same(
        value_and_grads(reid_ext.unified_triplet_loss, [x], x, labels, **kwargs),
        value_and_grads(reference.unified_triplet_loss, [x], x, labels, **kwargs),
    )
    with torch.no_grad():
        x[1050, 3] = float("nan")
    loss = reid_ext.unified_triplet_loss(x, labels, **kwargs)
    expected = reference.unified_triplet_loss(x, labels, **kwargs)
    assert torch.equal(torch.isnan(loss), torch.isnan(expected)) and torch.isnan(loss).any()


@pytest.mark.parametrize("mode", MODES)
def test_unified_gradcheck(mode, gen):
    x, labels, modalities = unified_case(10, 5, gen, "cpu", "pk", mode)
    bank = features(7, 5, gen, "cpu")
    bank_labels = torch.randint(0, 4, (7,), generator=gen)
    bank_modalities = torch.randint(0, 2, (7,), generator=gen)

    def batch(a):
        return reid_ext.unified_triplet_loss(a, labels, gamma=3.0, modalities=modalities, mode=mode, reduction="none")

    def with_bank(a, b):
        return reid_ext.unified_triplet_loss(a, labels, gamma=3.0, modalities=modalities, mode=mode, ref=b,
                                             ref_labels=bank_labels, ref_modalities=bank_modalities)

    assert torch.autograd.gradcheck(batch, (x,))
    assert torch.autograd.gradcheck(lambda a: batch(a).sum(), (x,))
    assert torch.autograd.gradcheck(with_bank, (x, bank))


def _two_pass(x, labels, modalities, ref, ref_labels, ref_modalities, gamma, margin, mode, reduction):
    """The reduced loss and its gradients from the per-anchor forward and the backward op."""
    ops = torch.ops.reid_ext
    loss, _, _, valid, lse_neg, lse_pos = ops.unified_triplet_loss(
        x, labels, modalities, ref, ref_labels, ref_modalities, gamma, margin, mode, reduction, False, False)
    grad_x, grad_ref = ops._unified_triplet_loss_backward(
        torch.ones_like(loss), x, labels, modalities, ref, ref_labels, ref_modalities, valid, lse_neg, lse_pos,
        gamma, margin, mode, reduction, ref is not None)
    return loss, grad_x, grad_ref


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize(
    "shape", [(45, None), (131, None), (300, None), (600, None), (40, 200), (500, 300), (1000, 300), (300, 20000),
              (4, 131073)])
def test_unified_gradient_in_forward_matches_two_pass(mode, reduction, shape, gen):
    """The op's gradient in the forward equals the backward op's, on every CPU path: one tile for
    both directions (up to 512 x 512 pairs); panels of whole rows against a bank (256 + 256 + 256
    + 232 rows at M=300, 209 + 91 rows at M=20000: 2^22 pairs at most); else a forward and a
    backward pass (600 anchors against themselves; a bank over 131072)."""
    n, m = shape
    x, labels, modalities = unified_case(n, 12, gen, "cpu", "pk", mode, requires_grad=False)
    ref = ref_labels = ref_modalities = None
    if m is not None:
        ref = features(m, 12, gen, "cpu", requires_grad=False)
        ref_labels = torch.randint(0, n // 4, (m,), generator=gen)
        ref_modalities = torch.randint(0, 2, (m,), generator=gen)
    args = (x, labels, modalities, ref, ref_labels, ref_modalities, 6.0, 0.2, mode, reduction)
    loss, grad_x, grad_ref, *_ = torch.ops.reid_ext.unified_triplet_loss(*args, True, ref is not None)
    expected = _two_pass(*args)
    torch.testing.assert_close(loss, expected[0])
    torch.testing.assert_close(grad_x, expected[1])
    torch.testing.assert_close(grad_ref, expected[2])
    if ref is not None:  # a detached bank gets no gradient, and the anchors the same one
        _, grad_x_only, no_grad_ref, *_ = torch.ops.reid_ext.unified_triplet_loss(*args, True, False)
        torch.testing.assert_close(grad_x_only, expected[1])
        assert no_grad_ref.shape == (0, x.size(1))
    # and both equal the reference (131 anchors: the odd split of the mirrored dot products)
    kwargs = dict(gamma=6.0, margin=0.2, modalities=modalities, mode=mode, ref=ref, ref_labels=ref_labels,
                  ref_modalities=ref_modalities, reduction=reduction)
    x_ref = x.clone().requires_grad_(True)
    expected_loss = reference.unified_triplet_loss(x_ref, labels, **kwargs)
    torch.testing.assert_close(loss, expected_loss.detach())
    torch.testing.assert_close(grad_x, torch.autograd.grad(expected_loss, x_ref)[0])


def test_gradient_in_forward_exactly_when_training(device, gen):
    """The op returns the gradients with the loss when it will be differentiated with a scalar
    reduction, whatever the size or device (the op picks its own kernel path), and not otherwise."""
    x, labels, _ = unified_case(64, 8, gen, device, "pk", "all", device.dtype)
    ops = reid_ext.ops._OPS

    def grads(x, reduction="mean", **kwargs):
        _, grad_x, grad_ref, *_ = ops.unified_triplet_loss(
            x, labels, None, kwargs.get("ref"), kwargs.get("ref_labels"), None, 8.0, 0.25, "all", reduction,
            reid_ext.ops._wants_grad(x), reid_ext.ops._wants_grad(kwargs.get("ref")))
        return grad_x.size(0), grad_ref.size(0)

    assert grads(x) == (64, 0) and grads(x, "sum") == (64, 0)
    assert grads(x, "none") == (0, 0)
    assert grads(x.detach()) == (0, 0)
    with torch.no_grad():
        assert grads(x) == (0, 0)
    bank = features(100, 8, gen, device, device.dtype)
    bank_labels = torch.randint(0, 16, (100,), generator=gen).to(torch_device(device))
    assert grads(x.detach(), ref=bank, ref_labels=bank_labels) == (0, 100)
    loss = reid_ext.unified_triplet_loss(x, labels, ref=bank, ref_labels=bank_labels, gamma=8.0)
    grad_x, grad_bank = torch.autograd.grad(2.0 * loss, [x, bank])
    expected = reference.unified_triplet_loss(x, labels, ref=bank, ref_labels=bank_labels, gamma=8.0)
    expected_x, expected_bank = torch.autograd.grad(2.0 * expected, [x, bank])
    torch.testing.assert_close(grad_x, expected_x, **device.tol)
    torch.testing.assert_close(grad_bank, expected_bank, **device.tol)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_raises(reduction, gen):
    x, labels, _ = unified_case(16, 8, gen, "cpu", "pk", "all")
    loss = reid_ext.unified_triplet_loss(x, labels, reduction=reduction).sum()
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_unified_large_gamma_stays_finite(device, gen):
    x, labels, _ = unified_case(32, 8, gen, device, "pk", "all", torch.float32)
    loss = reid_ext.unified_triplet_loss(x, labels, gamma=1000.0)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert torch.isfinite(x.grad).all()
    expected = reference.unified_triplet_loss(x.detach().double(), labels, gamma=1000.0)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-3)


def test_unified_no_valid_anchor_is_zero(device, gen):
    x, _, _ = unified_case(12, 8, gen, device, "all_distinct", "all", torch.float32)
    loss = reid_ext.unified_triplet_loss(x, torch.arange(12, device=torch_device(device)))
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all()


def test_unified_empty_bank(device, gen):
    """A bank without rows: no anchor has a pair, every loss is 0, and so is every gradient."""
    x, labels, _ = unified_case(10, 8, gen, device, "pk", "all", device.dtype)
    bank = features(0, 8, gen, device, device.dtype)
    bank_labels = torch.zeros(0, dtype=torch.long, device=torch_device(device))
    for reduction in ("none", "mean", "sum"):
        loss = reid_ext.unified_triplet_loss(x, labels, ref=bank, ref_labels=bank_labels, reduction=reduction)
        grad_x, grad_bank = torch.autograd.grad(loss.sum(), [x, bank])
        assert (loss == 0).all() and (grad_x == 0).all() and grad_bank.shape == (0, 8)


def test_triplet_identity():
    """The log-sum-exp form equals the explicit sum over all triplets of an anchor."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    gamma, margin = 2.0, 0.25
    sim = reference.cosine_similarity(x)
    expected = []
    for i in range(10):
        total = 0.0
        for n in range(10):
            for p in range(10):
                if labels[n] != labels[i] and labels[p] == labels[i] and p != i:
                    total += math.exp(gamma * (sim[i, n] - sim[i, p] + margin))
        expected.append(math.log1p(total))
    got = reid_ext.unified_triplet_loss(x, labels, gamma=gamma, margin=margin, reduction="none")
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("name", ["gamma", "margin"])
def test_a_string_for_a_number_names_the_argument(name):
    for fn in (reid_ext.unified_triplet_loss, reference.unified_triplet_loss):
        with pytest.raises(RuntimeError, match=f"argument '{name}'"):
            fn(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), **{name: "2"})
