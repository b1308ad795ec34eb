"""What every op keeps, written once over a table of op cases and the devices: empty batches, NaN,
non-contiguous and wide inputs, torch.library (opcheck, CUDA kernels), torch.compile, half precision
and large sizes on CUDA, no host synchronisation, bad input named, modules as their functions."""
import pytest
import torch

import reid_ext
from reid_ext import reference
from conftest import CUDA, assert_same, features, make_labels, torch_device, two_modalities, value_and_grads


class Batch:
    """An op case's inputs: features x [N, D], labels of P identities x 4 samples (shuffled) and
    modalities alternating within each identity; `other` [M, D] is the case's second matrix
    (cosine_similarity's y, a bank or a classifier's weight), with a bank's labels and modalities."""

    def __init__(self, x, labels, modalities, other, other_labels, other_modalities):
        self.x, self.labels, self.modalities = x, labels, modalities
        self.other, self.other_labels, self.other_modalities = other, other_labels, other_modalities

    def map(self, floats, ints):
        """The batch with floats applied to its two matrices and ints to its labels and modalities."""
        return Batch(floats(self.x), ints(self.labels), ints(self.modalities), floats(self.other),
                     ints(self.other_labels), ints(self.other_modalities))


def batch(n, d, m, gen, device, dtype):
    x = features(n, d, gen, device, dtype)
    labels = make_labels("pk", n, gen).to(torch_device(device))
    other = features(m, d, gen, device, dtype)
    other_labels = torch.randint(0, max(1, n // 4), (m,), generator=gen).to(torch_device(device))
    other_modalities = torch.randint(0, 2, (m,), generator=gen).to(torch_device(device))
    return Batch(x, labels, two_modalities(labels), other, other_labels, other_modalities)


class Op:
    """An op case: call(lib, batch) gives its (first) output with lib reid_ext or reid_ext.reference;
    `other`: it takes the batch's second matrix; `loss`: it is a loss, which takes a reduction."""

    def __init__(self, call, other=False, loss=True):
        self.call, self.other, self.loss = call, other, loss

    def run(self, lib, b, reduction=None):
        return self.call(lib, b, **({"reduction": reduction} if self.loss and reduction else {}))

    def inputs(self, b):
        """The tensors its gradients are taken with respect to."""
        return [b.x, b.other] if self.other else [b.x]


OPS = {
    "cosine_similarity": Op(lambda lib, b: lib.cosine_similarity(b.x), loss=False),
    "cosine_similarity_y": Op(lambda lib, b: lib.cosine_similarity(b.x, b.other), other=True, loss=False),
    "unified": Op(lambda lib, b, **kw: lib.unified_triplet_loss(b.x, b.labels, **kw)),
    "unified_bank": Op(lambda lib, b, **kw: lib.unified_triplet_loss(b.x, b.labels, ref=b.other,
                                                                     ref_labels=b.other_labels, **kw), other=True),
    "unified_cross": Op(lambda lib, b, **kw: lib.unified_triplet_loss(b.x, b.labels, modalities=b.modalities,
                                                                      mode="cross", **kw)),
    "unified_cross_bank": Op(lambda lib, b, **kw: lib.unified_triplet_loss(
        b.x, b.labels, modalities=b.modalities, mode="cross", ref=b.other, ref_labels=b.other_labels,
        ref_modalities=b.other_modalities, **kw), other=True),
    "batch_hard": Op(lambda lib, b, **kw: lib.batch_hard_triplet_loss(b.x, b.labels, **kw)),
    "batch_hard_cosine": Op(lambda lib, b, **kw: lib.batch_hard_triplet_loss(b.x, b.labels, metric="cosine", **kw)),
    "batch_hard_cosine_soft": Op(lambda lib, b, **kw: lib.batch_hard_triplet_loss(b.x, b.labels, metric="cosine",
                                                                                  soft_margin=True, **kw)),
    "modality_centers": Op(lambda lib, b: lib.modality_centers(b.x, b.labels, b.modalities)[0], loss=False),
    "hetero_all": Op(lambda lib, b, **kw: lib.hetero_center_triplet_loss(b.x, b.labels, b.modalities, **kw)),
    "hetero_hard": Op(lambda lib, b, **kw: lib.hetero_center_triplet_loss(b.x, b.labels, b.modalities,
                                                                          mining="hard", **kw)),
    "cosine_softmax": Op(lambda lib, b, **kw: lib.cosine_softmax_loss(b.x, b.other, b.labels % len(b.other), **kw),
                         other=True),
    "cosine_softmax_smoothed": Op(lambda lib, b, **kw: lib.cosine_softmax_loss(
        b.x, b.other, b.labels % len(b.other), label_smoothing=0.1, **kw), other=True),
}
LOSSES = [name for name, op in OPS.items() if op.loss]


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empty_batch_is_zero(device, name, reduction, gen):
    b = batch(0, 6, 8, gen, device, torch.float32)
    loss = OPS[name].run(reid_ext, b, reduction)
    assert loss.item() == 0.0
    loss.backward()
    assert b.x.grad.shape == (0, 6)


@pytest.mark.parametrize("name", LOSSES)
def test_nan_feature_gives_nan_loss(device, name, gen):
    b = batch(16, 6, 8, gen, device, torch.float32)
    with torch.no_grad():
        b.x[5, 2] = float("nan")
    assert torch.isnan(OPS[name].run(reid_ext, b))


def strided(t):
    """t's values in a view of every other element of a tensor twice as wide."""
    return torch.stack([t, t], -1)[..., 0]


def transposed(t):
    """t's values in column-major order."""
    return t.t().contiguous().t()


@pytest.mark.parametrize("name", OPS)
def test_non_contiguous_inputs(device, name, gen):
    op = OPS[name]
    b = batch(24, 20, 10, gen, device, device.dtype)
    views = b.map(strided, strided)
    assert not any(t.is_contiguous() for t in (views.x, views.labels, views.modalities, views.other))
    # The second matrix every other column as well, column-major (which a GEMM can take without a
    # copy), or contiguous.
    for other in (views.other, transposed(b.other), b.other) if op.other else (views.other,):
        views.other = other
        assert_same(value_and_grads(op.run, op.inputs(views), reid_ext, views),
                    value_and_grads(op.run, op.inputs(b), reference, b), **device.tol)


@pytest.mark.parametrize("name", OPS)
def test_wide_features_match_reference(device, name, gen):
    """D = 130: several 64-column feature chunks and a partial one in every kernel's products."""
    op = OPS[name]
    b = batch(70, 130, 90, gen, device, device.dtype)
    assert_same(value_and_grads(op.run, op.inputs(b), reid_ext, b, "none"),
                value_and_grads(op.run, op.inputs(b), reference, b, "none"), **device.tol)


# ---------------------------------------------------------------- torch.library


def opcheck_cases(device):
    """{op: [its arguments]} for every op and backward op of torch.ops.reid_ext but _jaccard_distance
    (tests/test_rerank.py): the options, a bank, scalar and per-anchor gradients, the gradients in the
    forward (a single tile; a bank against which, on CPU, panels run)."""
    gen = torch.Generator().manual_seed(1)
    dtype, on = device.dtype, torch_device(device)
    x = torch.randn(12, 6, generator=gen, dtype=dtype).to(on).requires_grad_(True)
    y = torch.randn(9, 6, generator=gen, dtype=dtype).to(on).requires_grad_(True)
    weight = torch.randn(5, 6, generator=gen, dtype=dtype).to(on).requires_grad_(True)
    bank = torch.randn(300, 6, generator=gen, dtype=dtype).to(on).requires_grad_(True)
    labels, mods, group = (torch.arange(12) // 3).to(on), (torch.arange(12) % 2).to(on), (torch.arange(12) % 5).to(on)
    ref_labels, ref_mods = (torch.arange(9) % 4).to(on), (torch.arange(9) % 2).to(on)
    bank_labels, bank_mods = (torch.arange(300) % 4).to(on), (torch.arange(300) % 2).to(on)
    topk_x = torch.randn(20, 6, generator=gen, dtype=dtype).to(on).requires_grad_(True)
    topk_y = torch.randn(40, 6, generator=gen, dtype=dtype).to(on)
    ops = reid_ext.ops._OPS
    xd, yd, wd = x.detach(), y.detach(), weight.detach()
    sim = ops.cosine_similarity(xd, yd, 1e-12)
    loss, _, _, valid, lse_neg, lse_pos = ops.unified_triplet_loss(xd, labels, mods, yd, ref_labels, ref_mods, 4.0,
                                                                   0.25, "cross", "none", False, False)
    _, _, _, pos, neg, d_ap, d_an = ops.batch_hard_triplet_loss(xd, labels, 0.3, "euclidean", False, "none", False)
    _, counts = ops.modality_centers(xd, group, 5, True)
    _, _, _, lse = ops.cosine_softmax_loss(xd, wd, labels % 5, 8.0, 0.2, 0.1, "none", False, False)
    ones = torch.ones(12, dtype=dtype, device=on)
    return {
        "cosine_similarity": [(x, y, 1e-12), (x, None, 1e-12)],
        "_cosine_similarity_backward": [(torch.ones_like(sim), xd, yd, 1e-12)],
        "unified_triplet_loss": [
            (x, labels, None, None, None, None, 4.0, 0.25, "all", "none", False, False),
            (x, labels, mods, y, ref_labels, ref_mods, 4.0, 0.25, "cross", "none", False, False),
            (x, labels, None, None, None, None, 4.0, 0.25, "all", "mean", True, False),
            (x, labels, mods, y, ref_labels, ref_mods, 4.0, 0.25, "cross", "sum", False, True),
            (x, labels, mods, bank, bank_labels, bank_mods, 4.0, 0.25, "intra", "mean", True, True),
        ],
        "_unified_triplet_loss_backward": [
            (torch.ones_like(loss), xd, labels, mods, yd, ref_labels, ref_mods, valid, lse_neg, lse_pos, 4.0, 0.25,
             "cross", "none", True),
            (torch.ones(()), xd, labels, mods, yd, ref_labels, ref_mods, valid, lse_neg, lse_pos, 4.0, 0.25,
             "cross", "mean", True),  # a reduced loss's scalar grad_loss
        ],
        "batch_hard_triplet_loss": [(x, labels, 0.3, "euclidean", False, "none", False),
                                    (x, labels, 0.0, "cosine", True, "mean", True)],
        "_batch_hard_triplet_loss_backward": [(ones, xd, pos, neg, d_ap, d_an, 0.3, "euclidean", False, "none")],
        "_modality_groups": [(labels, mods)],
        "modality_centers": [(x, group, 5, True), (x, group, 5, False)],
        "_modality_centers_backward": [(torch.ones(5, 6, dtype=dtype, device=on), xd, group, counts, True)],
        "hetero_center_triplet_loss": [(x, labels, mods, "all", 8.0, 0.25, "mean", True),
                                       (x, labels, mods, "hard", 8.0, 0.3, "sum", True)],
        "cosine_softmax_loss": [(x, weight, labels % 5, 8.0, 0.2, 0.1, "none", False, False),
                                (x, weight, labels % 5, 8.0, 0.2, 0.1, "mean", True, True),
                                (x, wd, labels % 5, 8.0, 0.2, 0.0, "sum", True, False)],
        "_cosine_softmax_loss_backward": [(ones, xd, wd, labels % 5, lse, 8.0, 0.2, 0.1, "none", True, True)],
        "topk_similarity": [(topk_x, None, 4, True, 1e-12), (topk_x, topk_y[:9], 9, False, 1e-12),
                            (topk_x, topk_y, 35, True, 1e-12), (topk_x, topk_y, 1, True, 1e-6),
                            (topk_x[:0], topk_y, 2, True, 1e-12)],
    }


OPCHECKED = ["cosine_similarity", "_cosine_similarity_backward", "unified_triplet_loss",
             "_unified_triplet_loss_backward", "batch_hard_triplet_loss", "_batch_hard_triplet_loss_backward",
             "_modality_groups", "modality_centers", "_modality_centers_backward", "hetero_center_triplet_loss",
             "cosine_softmax_loss", "_cosine_softmax_loss_backward", "topk_similarity"]


@pytest.mark.parametrize("op", OPCHECKED)
def test_opcheck(device, op):
    for args in opcheck_cases(device)[op]:
        torch.library.opcheck(getattr(reid_ext.ops._OPS, op).default, args)


def test_opcheck_covers_every_op():
    """Every op but the wrappers' argument checks (_check_*) is in OPCHECKED or tests/test_rerank.py's."""
    ops = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("reid_ext::")}
    assert {op for op in ops if not op.startswith("_check_")} == set(OPCHECKED) | {"_jaccard_distance"}


# The ops with a kernel per device (hetero_center_triplet_loss and _modality_groups are composite: one
# for every device; _jaccard_distance runs on the CPU only).
KERNELS = ["cosine_similarity", "_cosine_similarity_backward", "unified_triplet_loss", "_unified_triplet_loss_backward",
           "batch_hard_triplet_loss", "_batch_hard_triplet_loss_backward", "modality_centers",
           "_modality_centers_backward", "cosine_softmax_loss", "_cosine_softmax_loss_backward", "topk_similarity"]


@pytest.mark.parametrize("op", KERNELS)
def test_cuda_kernels_registered_when_built_with_cuda(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"reid_ext::{op}", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"reid_ext::{op}", "CUDA") == reid_ext.WITH_CUDA


# ---------------------------------------------------------------- torch.compile


def _backend(device):
    return "inductor" if device.name == "cuda" else "aot_eager"


@pytest.mark.parametrize("name", OPS)
def test_torch_compile_fullgraph(device, name, gen):
    torch._dynamo.reset()  # every case compiles afresh: earlier cases' graphs do not count to its limit
    op = OPS[name]
    b = batch(24, 16, 6, gen, device, torch.float32)

    def step():
        return op.run(reid_ext, b)

    compiled = torch.compile(step, fullgraph=True, backend=_backend(device))
    assert_same(value_and_grads(compiled, op.inputs(b)), value_and_grads(step, op.inputs(b)), rtol=1e-5, atol=1e-6)


def test_torch_compile_fullgraph_of_a_training_step(device, gen):
    """The loss modules and cosine_similarity in one graph, with the classifier's weight a parameter."""
    torch._dynamo.reset()
    b = batch(24, 16, 0, gen, device, torch.float32)
    classifier = reid_ext.losses.CosineSoftmaxLoss(6, 16, device=torch_device(device))
    unified = reid_ext.losses.UnifiedTripletLoss(mode="cross")
    batch_hard = reid_ext.losses.BatchHardTripletLoss()
    hetero = reid_ext.losses.HeteroCenterTripletLoss()

    def step(f):
        return (unified(f, b.labels, b.modalities) + reid_ext.cosine_similarity(f).mean() + batch_hard(f, b.labels)
                + classifier(f, b.labels) + hetero(f, b.labels, b.modalities))

    compiled = torch.compile(step, fullgraph=True, backend=_backend(device))
    inputs = [b.x, classifier.weight]
    assert_same(value_and_grads(compiled, inputs, b.x), value_and_grads(step, inputs, b.x), rtol=1e-5, atol=1e-6)


def test_torch_compile_inductor_cpu(gen):
    b = batch(16, 8, 0, gen, "cpu", torch.float32)
    compiled = torch.compile(lambda f: reid_ext.unified_triplet_loss(f, b.labels), fullgraph=True)
    assert_same(value_and_grads(compiled, [b.x], b.x),
                value_and_grads(reid_ext.unified_triplet_loss, [b.x], b.x, b.labels), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- CUDA


HALF = ["cosine_similarity", "unified_cross", "batch_hard", "batch_hard_cosine", "modality_centers", "hetero_all",
        "hetero_hard", "cosine_softmax"]


@pytest.mark.parametrize("name", HALF)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_within_twice_eager(cuda_device, name, dtype, gen):
    op = OPS[name]
    # The exact values: float64 on the CPU (the CUDA kernels take float32, float16 and bfloat16).
    b64 = batch(128, 64, 40, gen, "cpu", torch.float64)
    on = cuda_device.torch
    b = b64.map(lambda t: t.detach().to(on, dtype).requires_grad_(True), lambda t: t.to(on))
    # cosine_similarity is held to the bound in its values only
    inputs64, inputs = ([], []) if name == "cosine_similarity" else (op.inputs(b64), op.inputs(b))
    (exact, *_), exact_grads = value_and_grads(op.run, inputs64, reference, b64, "none")
    (ours, *_), ours_grads = value_and_grads(op.run, inputs, reid_ext, b, "none")
    (eager, *_), eager_grads = value_and_grads(op.run, inputs, reference, b, "none")

    def err(a, b):
        return (a.cpu().double() - b).abs().max().item()

    assert ours.dtype == dtype
    assert err(ours, exact) <= 2 * err(eager, exact) + 1e-6
    for g_ours, g_eager, g_exact in zip(ours_grads, eager_grads, exact_grads, strict=True):
        assert err(g_ours, g_exact) <= 2 * err(g_eager, g_exact) + 1e-6


# (op case, anchors, rows of its second matrix): several tiles, a split reference range on the GPU,
# many classes.
LARGE = [("unified_bank", 300, 5000), ("batch_hard", 700, 0), ("batch_hard_cosine_soft", 700, 0),
         ("modality_centers", 700, 0), ("cosine_softmax_smoothed", 700, 1500)]


@CUDA
@pytest.mark.parametrize("name,n,m", LARGE)
def test_cuda_matches_cpu_large(name, n, m, gen):
    op = OPS[name]
    b = batch(n, 96, m, gen, "cpu", torch.float32)
    cpu = value_and_grads(op.run, op.inputs(b), reid_ext, b, "none")
    bc = b.map(lambda t: t.detach().cuda().requires_grad_(True), lambda t: t.cuda())
    gpu = value_and_grads(op.run, op.inputs(bc), reid_ext, bc, "none")
    torch.testing.assert_close(gpu[0][0].cpu(), cpu[0][0], rtol=1e-4, atol=1e-4)
    for g, c in zip(gpu[1], cpu[1], strict=True):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-3, atol=1e-5)


# modality_centers' op given the groups: the function counts them, which waits for the GPU.
NO_SYNC_OPS = dict(OPS, modality_centers_op=Op(lambda lib, b: lib.ops._OPS.modality_centers(
    b.x, torch.arange(len(b.x), device=b.x.device) % 7, 7, True)[0], loss=False))
# (op case, anchors, rows of its second matrix)
NO_SYNC = [("unified_cross", 200, 0), ("unified_cross_bank", 200, 700), ("cosine_similarity_y", 200, 700),
           ("batch_hard", 64, 0), ("cosine_softmax", 64, 10), ("modality_centers_op", 64, 0)]


@CUDA
@pytest.mark.parametrize("name,n,m", NO_SYNC)
def test_no_host_synchronisation(name, n, m, gen):
    """Forward and backward never wait for the GPU, so they can be captured in CUDA graphs."""
    b = batch(n, 32, m, gen, "cuda", torch.float32)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = NO_SYNC_OPS[name].run(reid_ext, b)
        out.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all().item()


# ---------------------------------------------------------------- bad input


def _long(n):
    return torch.zeros(n, dtype=torch.long)


# (function, the arguments of a valid call it replaces or adds, the message it raises)
BAD = [
    (reid_ext.cosine_similarity, dict(x=torch.randn(3, 4), y=torch.randn(3, 5)), "y has D=5 but x has D=4"),
    (reid_ext.cosine_similarity, dict(x=torch.randn(3)), "x must be a 2-D"),
    (reid_ext.cosine_similarity, dict(eps=0.0), "eps must be a finite number > 0"),
    (reid_ext.cosine_similarity, dict(eps=float("nan")), "eps must be a finite number > 0"),
    (reid_ext.unified_triplet_loss, dict(x=torch.randn(4)), "x must be a 2-D"),
    (reid_ext.unified_triplet_loss, dict(x=torch.randn(4, 0)), "non-empty feature dimension"),
    (reid_ext.unified_triplet_loss, dict(x=torch.randint(0, 3, (4, 3))), "x must be a floating-point Tensor"),
    (reid_ext.unified_triplet_loss, dict(labels=_long(5)), "labels has 5 entries but x has 4"),
    (reid_ext.unified_triplet_loss, dict(labels=torch.zeros(4)), "labels must be an integer"),
    (reid_ext.unified_triplet_loss, dict(labels=torch.zeros(4, 1, dtype=torch.long)), "labels must be a 1-D"),
    (reid_ext.unified_triplet_loss, dict(mode="sideways"), "mode must be one of"),
    (reid_ext.unified_triplet_loss, dict(reduction="avg"), "reduction must be one of"),
    (reid_ext.unified_triplet_loss, dict(gamma=0.0), "gamma must be a finite number > 0, got 0"),
    (reid_ext.unified_triplet_loss, dict(gamma=float("inf")), "gamma must be a finite number > 0, got inf"),
    (reid_ext.unified_triplet_loss, dict(gamma=float("nan")), "gamma must be a finite number > 0, got nan"),
    (reid_ext.unified_triplet_loss, dict(margin=float("inf")), "margin must be a finite number, got inf"),
    (reid_ext.unified_triplet_loss, dict(margin=float("nan")), "margin must be a finite number, got nan"),
    (reid_ext.unified_triplet_loss, dict(mode="cross"), "modalities is required when mode='cross'"),
    (reid_ext.unified_triplet_loss, dict(modalities=_long(3)), "modalities has 3 entries"),
    (reid_ext.unified_triplet_loss, dict(ref=torch.randn(6, 3)), "ref_labels is required"),
    (reid_ext.unified_triplet_loss, dict(ref=torch.randn(6, 2), ref_labels=_long(6)), "ref has D=2 but x has D=3"),
    (reid_ext.unified_triplet_loss, dict(ref=torch.randn(6, 3).double(), ref_labels=_long(6)),
     "ref has dtype Double but x has Float"),
    (reid_ext.unified_triplet_loss, dict(ref=torch.randn(6, 3), ref_labels=_long(5)),
     "ref_labels has 5 entries but ref"),
    (reid_ext.unified_triplet_loss, dict(ref=torch.randn(6, 3), ref_labels=_long(6), mode="intra", modalities=_long(4)),
     "ref_modalities is required"),
    (reid_ext.unified_triplet_loss, dict(ref_labels=_long(6)), "ref_labels was given without ref"),
    (reid_ext.batch_hard_triplet_loss, dict(metric="manhattan"), "metric must be one of"),
    (reid_ext.batch_hard_triplet_loss, dict(margin=-0.1), "margin must be a finite number >= 0, got -0.1"),
    (reid_ext.batch_hard_triplet_loss, dict(margin=float("nan")), "margin must be a finite number >= 0, got nan"),
    (reid_ext.batch_hard_triplet_loss, dict(reduction="avg"), "reduction must be one of"),
    (reid_ext.batch_hard_triplet_loss, dict(labels=_long(3)), "labels has 3 entries but x"),
    (reid_ext.batch_hard_triplet_loss, dict(x=torch.randn(4)), "x must be a 2-D"),
    (reid_ext.batch_hard_triplet_loss, dict(labels=torch.zeros(4)), "labels must be an integer"),
    (reid_ext.modality_centers, dict(modalities=None), "modalities is required"),
    (reid_ext.modality_centers, dict(modalities=_long(5)), "modalities has 5 entries"),
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


def valid_call(name):
    """The named function's positional parameters and the arguments of a valid call on x [4, 3]."""
    args = dict(x=torch.randn(4, 3), labels=torch.zeros(4, dtype=torch.long))
    positional = ["x", "labels"]
    if name == "cosine_similarity":
        del args["labels"]
        positional = ["x", "y"]
    if name in ("modality_centers", "hetero_center_triplet_loss"):
        args["modalities"] = torch.zeros(4, dtype=torch.long)
        positional.append("modalities")
    if name == "cosine_softmax_loss":
        args["weight"] = torch.randn(5, 3)
        positional.insert(1, "weight")
    return positional, args


@pytest.mark.parametrize("fn,override,message", BAD, ids=lambda v: getattr(v, "__name__", None))
def test_bad_input_names_the_argument(fn, override, message):
    positional, args = valid_call(fn.__name__)
    args.update(override)
    values = [args.pop(k) for k in positional if k in args]
    for impl in (fn, getattr(reference, fn.__name__)):
        with pytest.raises((ValueError, TypeError), match=message):
            impl(*values, **args)


# (op, arguments, the error it raises and its message)
OP_LEVEL = [
    ("unified_triplet_loss", (torch.randn(4, 3), _long(3), None, None, None, None, 1.0, 0.0, "all", "mean", False,
                              False), ValueError, "labels has 3 entries but x has 4"),
    ("unified_triplet_loss", (torch.randn(4, 3), _long(4), None, None, None, None, 1.0, 0.0, "cross", "mean", False,
                              False), ValueError, "modalities is required"),
    ("unified_triplet_loss", (torch.randn(4, 3).half(), _long(4), None, None, None, None, 1.0, 0.0, "all", "mean",
                              False, False), TypeError, "x must be float32 or float64 on CPU, got Half"),
    ("batch_hard_triplet_loss", (torch.randn(4, 3), _long(4), 0.3, "l1", False, "mean", False),
     ValueError, "metric must be one of 'euclidean', 'sqeuclidean', 'cosine', got 'l1'"),
    ("modality_centers", (torch.randn(4, 3), _long(3), 1, True), ValueError, "group has 3 entries but x has 4"),
    ("cosine_softmax_loss", (torch.randn(4, 3), torch.randn(5, 2), _long(4), 1.0, 0.0, 0.0, "mean", False, False),
     ValueError, "weight has D=2 but x has D=3"),
    ("hetero_center_triplet_loss", (torch.randn(4, 3), _long(4), _long(4), "all", 8.0, 0.25, "none", False),
     ValueError, "reduction must be 'mean' or 'sum'"),
]


@pytest.mark.parametrize("op,args,error,message", OP_LEVEL)
def test_op_level_checks_name_the_argument(op, args, error, message):
    """The C++ ops check their arguments too, for callers that skip the Python wrappers."""
    with pytest.raises(error, match=message):
        getattr(torch.ops.reid_ext, op)(*args)


@CUDA
def test_device_mismatch_is_named():
    with pytest.raises(ValueError, match="labels is on cpu but x is on cuda"):
        reid_ext.unified_triplet_loss(torch.randn(4, 3, device="cuda"), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="y is on cpu but x is on cuda"):
        reid_ext.cosine_similarity(torch.randn(4, 3, device="cuda"), torch.randn(4, 3))


# ---------------------------------------------------------------- modules


# (module, the reference's loss of (x, labels, modalities) with the module's options, a fragment of its repr)
MODULES = {
    "unified": (reid_ext.losses.UnifiedTripletLoss(gamma=10.0, margin=0.2),
                lambda x, l, m: reference.unified_triplet_loss(x, l, gamma=10.0, margin=0.2), "gamma=10.0"),
    "batch_hard": (reid_ext.losses.BatchHardTripletLoss(margin=0.2, metric="cosine"),
                   lambda x, l, m: reference.batch_hard_triplet_loss(x, l, margin=0.2, metric="cosine"),
                   "metric='cosine'"),
    "hetero": (reid_ext.losses.HeteroCenterTripletLoss(mining="hard", margin=0.5),
               lambda x, l, m: reference.hetero_center_triplet_loss(x, l, m, mining="hard", margin=0.5),
               "mining='hard'"),
}


@pytest.mark.parametrize("name", MODULES)
def test_modules_match_functions(name, gen):
    module, expected, fragment = MODULES[name]
    x = features(24, 8, gen, "cpu")
    labels = torch.arange(24) // 4
    modalities = torch.arange(24) % 2
    args = (x, labels, modalities) if name == "hetero" else (x, labels)
    torch.testing.assert_close(module(*args), expected(x, labels, modalities))
    assert fragment in repr(module)
