"""modality_centers against the plain-PyTorch reference: unbalanced groups, the order and dtypes of
its outputs, bitwise determinism, gradcheck and the op's check of its group ids."""
import pytest
import torch

import reid_ext
from reid_ext import reference
from conftest import assert_same, features, tolerance, torch_device, value_and_grads


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
