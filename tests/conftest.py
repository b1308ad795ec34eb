import pytest
import torch

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


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
