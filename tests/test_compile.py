"""torch.compile(fullgraph=True) of every loss module, with dynamic shapes and several batch sizes in a
row: the ops choose their kernel paths in C++, so no guard on a batch size (or on the data-dependent
number of modality centers) can break the graph."""
import pytest
import torch

import reid_ext
from reid_ext import reference
from conftest import features


def losses(dim: int, classes: int):
    """(name, module, loss(module, x, labels, modalities, bank, bank_labels)) for every loss module."""
    cosine_softmax = reid_ext.losses.CosineSoftmaxLoss(classes, dim, scale=8.0, margin=0.2)
    return [
        ("unified", reid_ext.losses.UnifiedTripletLoss(gamma=8.0),
         lambda mod, x, l, m, b, bl: mod(x, l)),
        ("unified_bank", reid_ext.losses.UnifiedTripletLoss(gamma=8.0, mode="cross"),
         lambda mod, x, l, m, b, bl: mod(x, l, m, ref=b, ref_labels=bl, ref_modalities=bl % 2)),
        ("batch_hard", reid_ext.losses.BatchHardTripletLoss(margin=0.3),
         lambda mod, x, l, m, b, bl: mod(x, l)),
        ("hetero_all", reid_ext.losses.HeteroCenterTripletLoss(mining="all", gamma=8.0),
         lambda mod, x, l, m, b, bl: mod(x, l, m)),
        ("hetero_hard", reid_ext.losses.HeteroCenterTripletLoss(mining="hard"),
         lambda mod, x, l, m, b, bl: mod(x, l, m)),
        ("cosine_softmax", cosine_softmax,
         lambda mod, x, l, m, b, bl: mod(x, l % classes)),
    ]


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("name", ["unified", "unified_bank", "batch_hard", "hetero_all", "hetero_hard",
                                  "cosine_softmax"])
def test_loss_modules_compile_fullgraph_over_batch_sizes(name, dynamic, gen):
    torch._dynamo.reset()  # every case compiles afresh: earlier cases' graphs do not count to its limit
    dim, classes = 8, 5
    _, module, call = next(case for case in losses(dim, classes) if case[0] == name)
    compiled = torch.compile(lambda *args: call(module, *args), fullgraph=True, dynamic=dynamic, backend="aot_eager")
    bank = features(40, dim, gen, "cpu", torch.float32, requires_grad=False)
    bank_labels = torch.arange(40) % 7
    for n in (16, 24, 12, 32):  # several batch sizes in a row
        x = features(n, dim, gen, "cpu", torch.float32)
        labels = (torch.arange(n) // 4) % 7
        modalities = torch.arange(n) % 2
        args = (x, labels, modalities, bank, bank_labels)
        eager = call(module, *args)
        (eager_grad,) = torch.autograd.grad(eager, [x])
        ours = compiled(*args)
        (ours_grad,) = torch.autograd.grad(ours, [x])
        torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours_grad, eager_grad, rtol=1e-5, atol=1e-6)


def test_compiled_hetero_matches_the_reference_under_dynamic_shapes(gen):
    """The case that broke before: hetero-center under dynamic shapes, whose centers' number G is
    data-dependent (an unbacked size in the graph)."""
    torch._dynamo.reset()
    step = torch.compile(lambda x, l, m: reid_ext.hetero_center_triplet_loss(x, l, m, gamma=8.0), fullgraph=True,
                         dynamic=True, backend="aot_eager")
    for n in (16, 20):
        x = features(n, 6, gen, "cpu")
        labels, modalities = torch.arange(n) // 4, torch.arange(n) % 2
        torch.testing.assert_close(step(x, labels, modalities),
                                   reference.hetero_center_triplet_loss(x, labels, modalities, gamma=8.0))
