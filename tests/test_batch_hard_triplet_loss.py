"""batch_hard_triplet_loss against the plain-PyTorch reference: metrics, soft margin, reductions, the
hardest pairs (ties to the lowest index, anchors without either), the CPU tiles and gradcheck."""
import pytest
import torch

import reid_ext
from reid_ext import reference
from conftest import LAYOUTS, REDUCTIONS, assert_same, features, make_labels, tolerance, torch_device, value_and_grads


METRICS = ["euclidean", "sqeuclidean", "cosine"]


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
