"""cosine_similarity against the plain-PyTorch reference: values and gradients, with and without y."""
import pytest
import torch

import reid_ext
from reid_ext import reference
from conftest import assert_same, features, value_and_grads


@pytest.mark.parametrize("with_y", [False, True])
def test_cosine_similarity_matches_reference(device, with_y, gen):
    dtype = device.dtype
    x = features(37, 19, gen, device, dtype)
    with torch.no_grad():
        x[3] = 0.0  # a zero row exercises the eps clamp
    y = features(70, 19, gen, device, dtype) if with_y else None
    inputs = [x] + ([y] if with_y else [])
    assert_same(
        value_and_grads(reid_ext.cosine_similarity, inputs, x, y),
        value_and_grads(reference.cosine_similarity, inputs, x, y),
        **device.tol,
    )


def test_cosine_similarity_gradcheck(gen):
    x = features(6, 5, gen, "cpu")
    y = features(4, 5, gen, "cpu")
    assert torch.autograd.gradcheck(lambda a, b: reid_ext.cosine_similarity(a, b), (x, y))
    assert torch.autograd.gradcheck(lambda a: reid_ext.cosine_similarity(a), (x,))


def test_nan_feature_gives_nan_row(device, gen):
    x = features(16, 8, gen, device, torch.float32, requires_grad=False)
    x[5, 2] = float("nan")
    assert torch.isnan(reid_ext.cosine_similarity(x)[5]).all()
