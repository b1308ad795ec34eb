"""hetero_center_triplet_loss against the plain-PyTorch reference: both minings, label layouts and
reductions, identities seen in one modality only, and gradcheck."""
import pytest
import torch

import reid_ext
from reid_ext import reference
from conftest import (LAYOUTS, REDUCTIONS, assert_same, features, make_labels, tolerance, torch_device, two_modalities,
                      value_and_grads)


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
