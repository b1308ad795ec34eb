"""The shared harness: the devices a test runs its ops on, labels in named layouts, features, and
the comparison of an op's values and gradients with the reference's.

Device-parametrized tests take the `device` fixture: "cpu"; "cudasim", reid-ext's CUDA
kernels on the emulated GPU (tools/cudasim: CPU threads, CPU tensors); and "cuda" where a
GPU exists. `cuda_device` is the two CUDA-kernel devices only. The emulated tier alone:
``python -m pytest -m cudasim``; under a sanitizer: ``python tools/cudasim.py pytest
--sanitizer address -m cudasim``.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import cudasim  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def tolerance(dtype):
    """The tolerance of an op against the reference in dtype: float64's default, float32's looser."""
    return {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}


class Device:
    """Where a device-parametrized test runs its ops.

    name: "cpu", "cudasim" or "cuda"; torch: the torch.device its tensors live on (the
    emulated GPU's memory is the CPU's); dtype: the dtype its op tests check in (float64 on
    CPU, float32 for the CUDA kernels, which take float32/float16/bfloat16); tol: the
    tolerance of that dtype against the float64 reference.
    """

    def __init__(self, name: str):
        self.name = name
        self.torch = torch.device("cuda" if name == "cuda" else "cpu")
        self.cuda_kernels = name != "cpu"
        self.dtype = torch.float32 if self.cuda_kernels else torch.float64
        self.tol = tolerance(self.dtype)

    def __repr__(self) -> str:
        return self.name


SIM = pytest.param("cudasim", marks=pytest.mark.cudasim)
GPU = pytest.param("cuda", marks=CUDA)


def _on(name: str):
    if name == "cudasim":
        sim = cudasim.load()
        count = sim.multiprocessor_count()
        with cudasim.device():
            yield Device(name)
        sim.set_multiprocessor_count(count)
    else:
        yield Device(name)


@pytest.fixture(params=["cpu", SIM, GPU])
def device(request):
    yield from _on(request.param)


@pytest.fixture(params=[SIM, GPU])
def cuda_device(request):
    yield from _on(request.param)


def torch_device(device) -> torch.device:
    """A Device's torch.device; a device name or torch.device as it is."""
    return device.torch if isinstance(device, Device) else torch.device(device)


def features(n, d, gen, device, dtype=torch.float64, requires_grad=True):
    x = torch.randn(n, d, generator=gen, dtype=torch.float64).to(device=torch_device(device), dtype=dtype)
    return x.requires_grad_(requires_grad)


def make_labels(layout: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """Integer labels of n samples in a named layout."""
    if layout == "pk":  # P identities x K = 4 samples, shuffled
        return (torch.arange(n) // 4)[torch.randperm(n, generator=generator)]
    if layout == "singletons":  # random identities, several appearing once
        return torch.randint(0, max(1, n // 2), (n,), generator=generator)
    if layout == "one_identity":
        return torch.zeros(n, dtype=torch.long)
    if layout == "all_distinct":
        return torch.arange(n)
    raise ValueError(layout)


LAYOUTS = ["pk", "singletons", "one_identity", "all_distinct"]
MODES = ["all", "cross", "intra"]
REDUCTIONS = ["mean", "sum", "none"]


def two_modalities(labels):
    """Alternating modalities within each identity, so that every identity with two samples has both."""
    order = torch.argsort(labels.cpu(), stable=True)
    modalities = torch.empty_like(labels.cpu())
    modalities[order] = torch.arange(labels.numel()) % 2
    return modalities.to(labels.device)


def on(device, t):
    """t on the device, in its test dtype (float64 on CPU, float32 for the CUDA kernels)."""
    return t.to(device=device.torch, dtype=device.dtype)


def value_and_grads(fn, inputs, *args, **kwargs):
    """fn's outputs (a tuple's elements, or the one tensor) and the gradients w.r.t. inputs of a fixed
    projection of the first (None for an input it does not reach; all None for an empty output)."""
    out = fn(*args, **kwargs)
    values = out if isinstance(out, tuple) else (out,)
    first = values[0]
    weight = torch.linspace(-1.0, 2.0, first.numel(), dtype=first.dtype, device=first.device).view_as(first)
    if first.numel() and inputs:
        grads = torch.autograd.grad((first * weight).sum(), inputs, allow_unused=True)
    else:
        grads = [None] * len(inputs)
    return (first.detach(),) + tuple(values[1:]), grads


def assert_same(ours, theirs, **tol):
    """Two value_and_grads results agree: floating values and gradients within tol, integer ones exactly."""
    (values_a, grads_a), (values_b, grads_b) = ours, theirs
    for a, b in zip(values_a, values_b, strict=True):
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, b, **tol)
        else:
            assert torch.equal(a.cpu(), b.cpu()), (a, b)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **tol)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
