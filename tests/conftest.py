"""The shared harness: the devices a test runs its ops on, labels in named layouts, features.

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
        self.tol = {"rtol": 1e-4, "atol": 1e-5} if self.cuda_kernels else {}

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


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
