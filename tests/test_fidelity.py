"""Fidelity to the papers and to exact math: the losses against brute-force enumerations of their triplets."""
import itertools

import pytest
import torch

import reid_ext
from reid_ext import reference

FUNCTIONS = [pytest.param(reid_ext, id="fused"), pytest.param(reference, id="reference")]


def brute_force_hetero_center(x, labels, modalities, gamma, margin):
    """Per center: log(1 + sum over every (positive, negative) pair of exp(gamma*(S_gn - S_gp + margin))),
    positives the same identity's centers in other modalities, negatives every other identity's centers."""
    keys = sorted({(int(y), int(m)) for y, m in zip(labels, modalities)})
    xn = x / x.norm(dim=1, keepdim=True)
    centers = torch.stack([xn[(labels == y) & (modalities == m)].mean(0) for y, m in keys])
    sim = centers / centers.norm(dim=1, keepdim=True)
    sim = sim @ sim.t()
    losses = []
    for g, (y, m) in enumerate(keys):
        pos = [p for p, (yp, mp) in enumerate(keys) if yp == y and mp != m]
        neg = [n for n, (yn, _) in enumerate(keys) if yn != y]
        if not pos or not neg:
            losses.append(x.new_zeros(()))
            continue
        terms = [gamma * (sim[g, n] - sim[g, p] + margin) for p, n in itertools.product(pos, neg)]
        losses.append(torch.logsumexp(torch.stack([x.new_zeros(()), *terms]), 0))
    return torch.stack(losses)


@pytest.mark.parametrize("functions", FUNCTIONS)
@pytest.mark.parametrize("num_modalities", [2, 3])
def test_batch_all_hetero_center_takes_negatives_in_every_modality(functions, num_modalities):
    gen = torch.Generator().manual_seed(num_modalities)
    labels = torch.arange(24) % 4
    modalities = (torch.arange(24) // 4) % num_modalities
    labels[-2:] = 7  # an identity seen in one modality only: its center has no positive
    modalities[-2:] = 0
    x = torch.randn(24, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    got = functions.hetero_center_triplet_loss(x, labels, modalities, mining="all", gamma=8.0, reduction="none")
    expected = brute_force_hetero_center(x, labels, modalities, 8.0, 0.25)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(got.sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)


def brute_force_unified(x, labels, gamma, margin):
    """L_i = log(1 + sum_n sum_p exp(gamma*(S_in - S_ip + margin))) by enumerating the triplets."""
    xn = x / x.norm(dim=1, keepdim=True)
    sim = xn @ xn.t()
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool)
    losses = []
    for i in range(len(labels)):
        pos, neg = (same[i] & ~eye[i]).nonzero().flatten(), (~same[i]).nonzero().flatten()
        terms = gamma * (sim[i, neg][None, :] - sim[i, pos][:, None] + margin)
        losses.append(torch.logsumexp(torch.cat([x.new_zeros(1), terms.flatten()]), 0))
    return torch.stack(losses)


def test_reference_unified_softplus_is_exact_beyond_20():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(12) % 4
    got = reference.unified_triplet_loss(x, labels, gamma=25.0, reduction="none")
    # Anchors whose loss lies where F.softplus's threshold (20) cut it off by more than 1e-12.
    assert ((got > 20) & (got < 26)).sum() >= 2
    expected = brute_force_unified(x, labels, 25.0, 0.25)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=0)
    (grad,) = torch.autograd.grad(got.sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-11, atol=1e-13)
    fused = reid_ext.unified_triplet_loss(x, labels, gamma=25.0, reduction="none")
    torch.testing.assert_close(fused, expected, rtol=1e-13, atol=0)


def test_reference_soft_margin_is_exact_beyond_20():
    gen = torch.Generator().manual_seed(0)
    x = (8 * torch.randn(12, 6, generator=gen, dtype=torch.float64)).requires_grad_(True)
    labels = torch.arange(12) % 4
    got, pos_idx, neg_idx = reference.batch_hard_triplet_loss(
        x, labels, soft_margin=True, reduction="none", return_indices=True
    )
    diff = (x - x[pos_idx]).norm(dim=1) - (x - x[neg_idx]).norm(dim=1)
    assert ((diff > 20) & (diff < 26)).sum() >= 2
    expected = torch.log1p(torch.exp(diff))  # no overflow below 700 in float64
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=0)
    (grad,) = torch.autograd.grad(got.sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-11, atol=1e-13)
