"""cosine_similarity and unified_triplet_loss against the plain-PyTorch reference."""
import math

import pytest
import torch

import reid_ext
from reid_ext import reference
from conftest import CUDA, LAYOUTS, features, make_labels, torch_device

MODES = ["all", "cross", "intra"]
REDUCTIONS = ["mean", "sum", "none"]


def value_and_grads(fn, inputs, *args, **kwargs):
    """fn's output and the gradients of a fixed random projection of it w.r.t. inputs."""
    out = fn(*args, **kwargs)
    weight = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    grads = torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True) if out.numel() else [None] * len(inputs)
    return out.detach(), grads


def assert_close_all(a, b, **tol):
    (va, ga), (vb, gb) = a, b
    torch.testing.assert_close(va, vb, **tol)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, **tol)


# ---------------------------------------------------------------- cosine_similarity


@pytest.mark.parametrize("with_y", [False, True])
def test_cosine_similarity_matches_reference(device, with_y, gen):
    dtype = device.dtype
    x = features(37, 19, gen, device, dtype)
    with torch.no_grad():
        x[3] = 0.0  # a zero row exercises the eps clamp
    y = features(70, 19, gen, device, dtype) if with_y else None
    inputs = [x] + ([y] if with_y else [])
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    assert_close_all(
        value_and_grads(reid_ext.cosine_similarity, inputs, x, y),
        value_and_grads(reference.cosine_similarity, inputs, x, y),
        **tol,
    )


def test_cosine_similarity_gradcheck(gen):
    x = features(6, 5, gen, "cpu")
    y = features(4, 5, gen, "cpu")
    assert torch.autograd.gradcheck(lambda a, b: reid_ext.cosine_similarity(a, b), (x, y))
    assert torch.autograd.gradcheck(lambda a: reid_ext.cosine_similarity(a), (x,))


# ---------------------------------------------------------------- unified_triplet_loss


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
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    assert_close_all(
        value_and_grads(reid_ext.unified_triplet_loss, [x], x, labels, **kwargs),
        value_and_grads(reference.unified_triplet_loss, [x], x, labels, **kwargs),
        **tol,
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
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    ours = value_and_grads(reid_ext.unified_triplet_loss, inputs, x, labels, **kwargs)
    assert_close_all(ours, value_and_grads(reference.unified_triplet_loss, inputs, x, labels, **kwargs), **tol)
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
    assert_close_all(ours, value_and_grads(reference.unified_triplet_loss, inputs, x, big(labels), **kwargs), **device.tol)
    assert ours[0].abs().sum() > 0


@pytest.mark.parametrize("mode", MODES)
def test_unified_large_batch(mode, gen):
    """Beyond a single tile (512 anchors) the CPU kernel visits each symmetric pair of 256-blocks
    once (here 5 blocks, the last of 76 rows): same results."""
    x, labels, modalities = unified_case(1100, 8, gen, "cpu", "singletons", mode)
    with torch.no_grad():
        x[700] = 0.0
    kwargs = dict(gamma=6.0, modalities=modalities, mode=mode, reduction="none")
    assert_close_all(
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


def test_unified_nan_feature_gives_nan_loss(device, gen):
    x, labels, _ = unified_case(16, 8, gen, device, "pk", "all", torch.float32)
    with torch.no_grad():
        x[5, 2] = float("nan")
    assert torch.isnan(reid_ext.unified_triplet_loss(x, labels))
    assert torch.isnan(reid_ext.cosine_similarity(x)[5]).all()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_unified_empty_batch_is_zero(device, reduction):
    x = torch.zeros(0, 8, device=torch_device(device), requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long, device=torch_device(device))
    loss = reid_ext.unified_triplet_loss(x, labels, reduction=reduction)
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad.shape == (0, 8)


def test_unified_no_valid_anchor_is_zero(device, gen):
    x, _, _ = unified_case(12, 8, gen, device, "all_distinct", "all", torch.float32)
    loss = reid_ext.unified_triplet_loss(x, torch.arange(12, device=torch_device(device)))
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all()


def test_non_contiguous_inputs(device, gen):
    dtype = device.dtype
    tol = device.tol
    x = features(24, 40, gen, device, dtype, requires_grad=False)[:, ::2].requires_grad_(True)
    labels = (torch.arange(48, device=torch_device(device)) // 4)[::2]
    assert not x.is_contiguous() and not labels.is_contiguous()
    x_c = x.detach().contiguous().requires_grad_(True)
    assert_close_all(
        value_and_grads(reid_ext.unified_triplet_loss, [x], x, labels, gamma=4.0),
        value_and_grads(reference.unified_triplet_loss, [x_c], x_c, labels.contiguous(), gamma=4.0),
        **tol,
    )
    assert_close_all(
        value_and_grads(reid_ext.cosine_similarity, [x], x, x.t().contiguous().t()),
        value_and_grads(reference.cosine_similarity, [x_c], x_c, x_c),
        **tol,
    )


def test_loss_module_matches_function(gen):
    x, labels, _ = unified_case(20, 8, gen, "cpu", "pk", "all")
    module = reid_ext.losses.UnifiedTripletLoss(gamma=10.0, margin=0.2)
    torch.testing.assert_close(module(x, labels), reference.unified_triplet_loss(x, labels, gamma=10.0, margin=0.2))
    assert "gamma=10.0" in repr(module)


# ---------------------------------------------------------------- torch.library / torch.compile


def _opcheck_cases(device):
    gen = torch.Generator().manual_seed(1)
    dtype = device.dtype
    x = torch.randn(12, 6, generator=gen, dtype=dtype).to(torch_device(device)).requires_grad_(True)
    y = torch.randn(9, 6, generator=gen, dtype=dtype).to(torch_device(device)).requires_grad_(True)
    labels = (torch.arange(12) // 3).to(torch_device(device))
    mods = (torch.arange(12) % 2).to(torch_device(device))
    ref_labels = (torch.arange(9) % 4).to(torch_device(device))
    ref_mods = (torch.arange(9) % 2).to(torch_device(device))
    bank = torch.randn(300, 6, generator=gen, dtype=dtype).to(torch_device(device)).requires_grad_(True)
    bank_labels, bank_mods = (torch.arange(300) % 4).to(torch_device(device)), (torch.arange(300) % 2).to(torch_device(device))
    ops = reid_ext.ops._OPS
    loss, _, _, valid, lse_neg, lse_pos = ops.unified_triplet_loss(x.detach(), labels, mods, y.detach(), ref_labels,
                                                                   ref_mods, 4.0, 0.25, "cross", "none", False, False)
    sim = ops.cosine_similarity(x.detach(), y.detach(), 1e-12)
    return [
        (ops.cosine_similarity.default, (x, y, 1e-12)),
        (ops.cosine_similarity.default, (x, None, 1e-12)),
        (ops._cosine_similarity_backward.default, (torch.ones_like(sim), x.detach(), y.detach(), 1e-12)),
        (ops.unified_triplet_loss.default, (x, labels, None, None, None, None, 4.0, 0.25, "all", "none", False, False)),
        (ops.unified_triplet_loss.default,
         (x, labels, mods, y, ref_labels, ref_mods, 4.0, 0.25, "cross", "none", False, False)),
        (ops._unified_triplet_loss_backward.default,
         (torch.ones_like(loss), x.detach(), labels, mods, y.detach(), ref_labels, ref_mods, valid, lse_neg, lse_pos,
          4.0, 0.25, "cross", "none", True)),
        (ops._unified_triplet_loss_backward.default,  # a reduced loss's scalar grad_loss
         (torch.ones(()), x.detach(), labels, mods, y.detach(), ref_labels, ref_mods, valid, lse_neg, lse_pos,
          4.0, 0.25, "cross", "mean", True)),
        # the gradients in the forward: a single tile, a bank against which (on CPU) panels run
        (ops.unified_triplet_loss.default, (x, labels, None, None, None, None, 4.0, 0.25, "all", "mean", True, False)),
        (ops.unified_triplet_loss.default,
         (x, labels, mods, y, ref_labels, ref_mods, 4.0, 0.25, "cross", "sum", False, True)),
        (ops.unified_triplet_loss.default,
         (x, labels, mods, bank, bank_labels, bank_mods, 4.0, 0.25, "intra", "mean", True, True)),
    ]


def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph(device, gen):
    x, labels, modalities = unified_case(24, 16, gen, device, "pk", "cross", torch.float32)

    def step(features):
        sim = reid_ext.cosine_similarity(features)
        return reid_ext.unified_triplet_loss(features, labels, modalities=modalities, mode="cross") + sim.mean()

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if device.name == "cuda" else "aot_eager")
    assert_close_all(value_and_grads(compiled, [x], x), value_and_grads(step, [x], x), rtol=1e-5, atol=1e-6)


def test_torch_compile_inductor_cpu(gen):
    x, labels, _ = unified_case(16, 8, gen, "cpu", "pk", "all", torch.float32)
    compiled = torch.compile(lambda f: reid_ext.unified_triplet_loss(f, labels), fullgraph=True)
    assert_close_all(
        value_and_grads(compiled, [x], x),
        value_and_grads(reid_ext.unified_triplet_loss, [x], x, labels),
        rtol=1e-5, atol=1e-6,
    )


# ---------------------------------------------------------------- half precision on CUDA


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_within_twice_eager(cuda_device, dtype, gen):
    # float64 is a CPU dtype here: the exact values come from the CPU reference.
    x64, labels, modalities = unified_case(128, 64, gen, "cpu", "pk", "cross", torch.float64)
    kwargs = dict(modalities=modalities, mode="cross", reduction="none")
    exact, exact_grad = value_and_grads(reference.unified_triplet_loss, [x64], x64, labels, **kwargs)
    x = x64.detach().to(cuda_device.torch, dtype).requires_grad_(True)
    cuda_kwargs = dict(kwargs, modalities=modalities.to(cuda_device.torch))
    ours, ours_grad = value_and_grads(reid_ext.unified_triplet_loss, [x], x, labels.to(cuda_device.torch), **cuda_kwargs)
    eager, eager_grad = value_and_grads(reference.unified_triplet_loss, [x], x, labels.to(cuda_device.torch), **cuda_kwargs)

    def err(a, b):
        return (a.double().cpu() - b).abs().max().item()

    assert ours.dtype == dtype
    assert err(ours, exact) <= 2 * err(eager, exact) + 1e-6
    assert err(ours_grad[0], exact_grad[0]) <= 2 * err(eager_grad[0], exact_grad[0]) + 1e-6
    sim_exact = reference.cosine_similarity(x64.detach())
    assert err(reid_ext.cosine_similarity(x.detach()), sim_exact) <= 2 * err(
        reference.cosine_similarity(x.detach()), sim_exact) + 1e-6


@CUDA
def test_cuda_matches_cpu_large(gen):
    """Sizes that exercise the split reference range and several tiles on the GPU."""
    x, labels, _ = unified_case(300, 96, gen, "cpu", "pk", "all", torch.float32)
    bank = features(5000, 96, gen, "cpu", torch.float32)
    bank_labels = torch.randint(0, 75, (5000,), generator=gen)
    cpu = value_and_grads(reid_ext.unified_triplet_loss, [x, bank], x, labels, ref=bank, ref_labels=bank_labels,
                          reduction="none")
    xc, bc = (t.detach().cuda().requires_grad_(True) for t in (x, bank))
    gpu = value_and_grads(reid_ext.unified_triplet_loss, [xc, bc], xc, labels.cuda(), ref=bc,
                          ref_labels=bank_labels.cuda(), reduction="none")
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-4, atol=1e-4)
    for g, c in zip(gpu[1], cpu[1]):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-3, atol=1e-5)


@CUDA
def test_no_host_synchronisation(gen):
    """Forward and backward never wait for the GPU, so they can be captured in CUDA graphs."""
    x, labels, modalities = unified_case(200, 32, gen, "cuda", "pk", "cross", torch.float32)
    bank = torch.randn(700, 32, device="cuda", requires_grad=True)
    bank_labels = torch.randint(0, 50, (700,), device="cuda")
    bank_modalities = torch.randint(0, 2, (700,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = reid_ext.unified_triplet_loss(x, labels, modalities=modalities, mode="cross")
        loss = loss + reid_ext.unified_triplet_loss(x, labels, modalities=modalities, mode="cross", ref=bank,
                                                    ref_labels=bank_labels, ref_modalities=bank_modalities)
        loss = loss + reid_ext.cosine_similarity(x, bank).mean()
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


# ---------------------------------------------------------------- bad input

BAD_UNIFIED = [
    (dict(x=torch.randn(4)), "x must be a 2-D"),
    (dict(x=torch.randn(4, 0)), "non-empty feature dimension"),
    (dict(x=torch.randint(0, 3, (4, 3))), "x must be a floating-point Tensor"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), "labels has 5 entries but x has 4"),
    (dict(labels=torch.zeros(4)), "labels must be an integer"),
    (dict(labels=torch.zeros(4, 1, dtype=torch.long)), "labels must be a 1-D"),
    (dict(mode="sideways"), "mode must be one of"),
    (dict(reduction="avg"), "reduction must be one of"),
    (dict(gamma=0.0), "gamma must be a finite number > 0, got 0"),
    (dict(gamma=float("inf")), "gamma must be a finite number > 0, got inf"),
    (dict(gamma=float("nan")), "gamma must be a finite number > 0, got nan"),
    (dict(margin=float("inf")), "margin must be a finite number, got inf"),
    (dict(margin=float("nan")), "margin must be a finite number, got nan"),
    (dict(mode="cross"), "modalities is required when mode='cross'"),
    (dict(modalities=torch.zeros(3, dtype=torch.long)), "modalities has 3 entries"),
    (dict(ref=torch.randn(6, 3)), "ref_labels is required"),
    (dict(ref=torch.randn(6, 2), ref_labels=torch.zeros(6, dtype=torch.long)), "ref has D=2 but x has D=3"),
    (dict(ref=torch.randn(6, 3, dtype=torch.float64), ref_labels=torch.zeros(6, dtype=torch.long)),
     "ref has dtype Double but x has Float"),
    (dict(ref=torch.randn(6, 3), ref_labels=torch.zeros(5, dtype=torch.long)), "ref_labels has 5 entries but ref"),
    (dict(ref=torch.randn(6, 3), ref_labels=torch.zeros(6, dtype=torch.long), mode="intra",
          modalities=torch.zeros(4, dtype=torch.long)), "ref_modalities is required"),
    (dict(ref_labels=torch.zeros(6, dtype=torch.long)), "ref_labels was given without ref"),
]


@pytest.mark.parametrize("override,message", BAD_UNIFIED)
def test_unified_bad_input(override, message):
    args = dict(x=torch.randn(4, 3), labels=torch.zeros(4, dtype=torch.long))
    args.update(override)
    x, labels = args.pop("x"), args.pop("labels")
    for fn in (reid_ext.unified_triplet_loss, reference.unified_triplet_loss):
        with pytest.raises((ValueError, TypeError), match=message):
            fn(x, labels, **args)


@pytest.mark.parametrize("name", ["gamma", "margin"])
def test_a_string_for_a_number_names_the_argument(name):
    for fn in (reid_ext.unified_triplet_loss, reference.unified_triplet_loss):
        with pytest.raises(RuntimeError, match=f"argument '{name}'"):
            fn(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), **{name: "2"})


@CUDA
def test_device_mismatch_is_named():
    with pytest.raises(ValueError, match="labels is on cpu but x is on cuda"):
        reid_ext.unified_triplet_loss(torch.randn(4, 3, device="cuda"), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="y is on cpu but x is on cuda"):
        reid_ext.cosine_similarity(torch.randn(4, 3, device="cuda"), torch.randn(4, 3))


@pytest.mark.parametrize(
    "args,message",
    [
        ((torch.randn(3, 4), torch.randn(3, 5)), "y has D=5 but x has D=4"),
        ((torch.randn(3),), "x must be a 2-D"),
        ((torch.randn(3, 4), None, 0.0), "eps must be a finite number > 0"),
        ((torch.randn(3, 4), None, float("nan")), "eps must be a finite number > 0"),
    ],
)
def test_cosine_bad_input(args, message):
    for fn in (reid_ext.cosine_similarity, reference.cosine_similarity):
        with pytest.raises((ValueError, TypeError), match=message):
            fn(*args)


def test_op_level_checks_name_the_argument():
    """The C++ ops check their arguments too, for callers that skip the Python wrappers."""
    ops = torch.ops.reid_ext
    with pytest.raises(ValueError, match="labels has 3 entries but x has 4"):
        ops.unified_triplet_loss(torch.randn(4, 3), torch.zeros(3, dtype=torch.long), None, None, None, None,
                                 1.0, 0.0, "all", "mean", False, False)
    with pytest.raises(ValueError, match="modalities is required"):
        ops.unified_triplet_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), None, None, None, None,
                                 1.0, 0.0, "cross", "mean", False, False)
    with pytest.raises(TypeError, match="x must be float32 or float64 on CPU, got Half"):
        ops.unified_triplet_loss(torch.randn(4, 3).half(), torch.zeros(4, dtype=torch.long), None, None, None, None,
                                 1.0, 0.0, "all", "mean", False, False)


# ---------------------------------------------------------------- build


def test_cuda_kernels_registered_when_built_with_cuda():
    names = ["cosine_similarity", "_cosine_similarity_backward", "unified_triplet_loss",
             "_unified_triplet_loss_backward"]
    for name in names:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"reid_ext::{name}", "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"reid_ext::{name}", "CUDA") == reid_ext.WITH_CUDA, name


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


@pytest.mark.parametrize("with_bank", [False, True])
def test_wide_features_match_reference(device, with_bank, gen):
    """D = 130: several 64-column feature chunks and a partial one in every kernel's products."""
    x, labels, modalities = unified_case(70, 130, gen, device, "pk", "cross", device.dtype)
    kwargs = dict(gamma=8.0, modalities=modalities, mode="cross", reduction="none")
    inputs = [x]
    if with_bank:
        bank = features(90, 130, gen, device, device.dtype)
        kwargs.update(ref=bank, ref_labels=torch.randint(0, 17, (90,), generator=gen).to(torch_device(device)),
                      ref_modalities=torch.randint(0, 2, (90,), generator=gen).to(torch_device(device)))
        inputs = [x, bank]
    assert_close_all(value_and_grads(reid_ext.unified_triplet_loss, inputs, x, labels, **kwargs),
                     value_and_grads(reference.unified_triplet_loss, inputs, x, labels, **kwargs), **device.tol)
    y = kwargs.get("ref")
    assert_close_all(value_and_grads(reid_ext.cosine_similarity, inputs, x, y),
                     value_and_grads(reference.cosine_similarity, inputs, x, y), **device.tol)


def test_unified_empty_bank(device, gen):
    """A bank without rows: no anchor has a pair, every loss is 0, and so is every gradient."""
    x, labels, _ = unified_case(10, 8, gen, device, "pk", "all", device.dtype)
    bank = features(0, 8, gen, device, device.dtype)
    bank_labels = torch.zeros(0, dtype=torch.long, device=torch_device(device))
    for reduction in ("none", "mean", "sum"):
        loss = reid_ext.unified_triplet_loss(x, labels, ref=bank, ref_labels=bank_labels, reduction=reduction)
        grad_x, grad_bank = torch.autograd.grad(loss.sum(), [x, bank])
        assert (loss == 0).all() and (grad_x == 0).all() and grad_bank.shape == (0, 8)
