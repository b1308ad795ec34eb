"""CrossBatchMemory: ring-buffer contents, checks, state, and use as the losses' reference bank."""
import pytest
import torch

import reid_ext
from reid_ext import reference
from conftest import CUDA, torch_device


def batch(start, rows, dim=3, device="cpu"):
    """Rows whose values and labels encode their global position, so the order can be checked."""
    pos = torch.arange(start, start + rows)
    x = pos[:, None].float().repeat(1, dim).to(device)
    return x, (pos * 10).to(device), (pos % 2).to(device)


def test_ring_buffer_keeps_the_newest_rows(device):
    device = torch_device(device)
    memory = reid_ext.CrossBatchMemory(5, 3, device=device, with_modalities=True)
    assert len(memory) == 0 and memory.embeddings.shape == (0, 3)
    memory.enqueue(*batch(0, 3, device=device))
    assert len(memory) == 3 and memory.labels.tolist() == [0, 10, 20]
    memory.enqueue(*batch(3, 4, device=device))  # wraps: rows 3, 4 at the end, 5, 6 over the oldest
    assert len(memory) == 5
    assert memory.labels.tolist() == [50, 60, 20, 30, 40]
    assert memory.embeddings[:, 0].tolist() == [5, 6, 2, 3, 4]
    assert memory.modalities.tolist() == [1, 0, 0, 1, 0]
    memory.enqueue(*batch(7, 12, device=device))  # larger than the memory: its last 5 rows
    assert sorted(memory.labels.tolist()) == [140, 150, 160, 170, 180]
    memory.reset()
    assert len(memory) == 0


def test_enqueue_detaches_and_converts_labels():
    memory = reid_ext.CrossBatchMemory(4, 2, dtype=torch.float64)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    memory.enqueue(x * 2, torch.tensor([1, 2, 3], dtype=torch.int32))
    assert not memory.embeddings.requires_grad and memory.embeddings.dtype == torch.float64
    assert memory.labels.dtype == torch.int64
    torch.testing.assert_close(memory.embeddings, (x * 2).detach())
    assert memory.modalities is None


def test_enqueue_of_another_dtype_is_refused():
    memory = reid_ext.CrossBatchMemory(4, 2)
    with pytest.raises(TypeError, match="x has dtype torch.float64 but the memory stores torch.float32"):
        memory.enqueue(torch.randn(3, 2, dtype=torch.float64), torch.arange(3))
    assert len(memory) == 0


def test_enqueue_of_its_own_contents():
    memory = reid_ext.CrossBatchMemory(5, 3, with_modalities=True)
    copies = reid_ext.CrossBatchMemory(5, 3, with_modalities=True)
    for m in (memory, copies):
        m.enqueue(*batch(0, 3))
    memory.enqueue(memory.embeddings, memory.labels, memory.modalities)  # views of the buffers themselves
    assert memory.labels.tolist() == [20, 10, 20, 0, 10]  # rows 0..2 again, the last one wrapped over row 0
    copies.enqueue(copies.embeddings.clone(), copies.labels.clone(), copies.modalities.clone())
    memory.enqueue(memory.embeddings, memory.labels, memory.modalities)
    copies.enqueue(copies.embeddings.clone(), copies.labels.clone(), copies.modalities.clone())
    for a, b in zip(memory.as_reference().values(), copies.as_reference().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(size=4.5, dim=4), TypeError, "size must be an integer >= 1, got 4.5"),
    (dict(size=4, dim="8"), TypeError, "dim must be an integer >= 1, got '8'"),
    (dict(size=True, dim=4), TypeError, "size must be an integer >= 1, got True"),
    (dict(size=4, dim=0), ValueError, "dim must be >= 1, got 0"),
    (dict(size=4, dim=4, dtype=torch.int64), TypeError, "dtype must be a floating torch.dtype"),
    (dict(size=4, dim=4, dtype="float32"), TypeError, "dtype must be a floating torch.dtype"),
    (dict(size=4, dim=4, device="gpu"), ValueError, "device must name a torch device"),
])
def test_bad_construction_is_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        reid_ext.CrossBatchMemory(**kwargs)


def test_bad_enqueue_is_named():
    memory = reid_ext.CrossBatchMemory(4, 3)
    with pytest.raises(ValueError, match="x has D=2 but the memory stores D=3"):
        memory.enqueue(torch.randn(2, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels has 3 entries but x has 2"):
        memory.enqueue(torch.randn(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="modalities was given"):
        memory.enqueue(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="modalities is required"):
        reid_ext.CrossBatchMemory(4, 3, with_modalities=True).enqueue(torch.randn(2, 3),
                                                                      torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="size must be >= 1"):
        reid_ext.CrossBatchMemory(0, 3)


def test_state_dict_round_trip():
    memory = reid_ext.CrossBatchMemory(4, 3, with_modalities=True)
    memory.enqueue(*batch(0, 6))
    restored = reid_ext.CrossBatchMemory(4, 3, with_modalities=True)
    restored.load_state_dict(memory.state_dict())
    assert len(restored) == 4 and torch.equal(restored.embeddings, memory.embeddings)
    memory.enqueue(*batch(6, 1))
    restored.enqueue(*batch(6, 1))  # continues at the same write position
    assert torch.equal(restored.labels, memory.labels)


def test_contents_are_the_reference_bank(device):
    gen = torch.Generator().manual_seed(0)
    dtype, tol, device = device.dtype, device.tol, torch_device(device)
    memory = reid_ext.CrossBatchMemory(50, 8, dtype=dtype, device=device, with_modalities=True)
    old = []
    for _ in range(3):
        x = torch.randn(20, 8, generator=gen, dtype=dtype).to(device)
        labels = torch.randint(0, 10, (20,), generator=gen).to(device)
        modalities = torch.randint(0, 2, (20,), generator=gen).to(device)
        memory.enqueue(x, labels, modalities)
        old.append((x, labels, modalities))
    bank, bank_labels, bank_modalities = (torch.cat(parts)[-50:] for parts in zip(*old))  # the newest 50 rows
    x = torch.randn(12, 8, generator=gen, dtype=dtype).to(device).requires_grad_(True)
    labels = torch.randint(0, 10, (12,), generator=gen).to(device)
    modalities = torch.randint(0, 2, (12,), generator=gen).to(device)
    ours = reid_ext.unified_triplet_loss(x, labels, modalities=modalities, mode="cross", **memory.as_reference())
    expected = reference.unified_triplet_loss(x, labels, modalities=modalities, mode="cross", ref=bank,
                                              ref_labels=bank_labels, ref_modalities=bank_modalities)
    torch.testing.assert_close(ours, expected, **tol)  # the row order does not matter to the loss
    ours.backward()
    assert x.grad is not None


@CUDA
def test_enqueue_does_not_synchronize():
    memory = reid_ext.CrossBatchMemory(16, 4, device="cuda", with_modalities=True)
    x, labels, modalities = batch(0, 10, dim=4, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            memory.enqueue(x, labels, modalities)
        reid_ext.unified_triplet_loss(x, labels, **memory.as_reference())
    finally:
        torch.cuda.set_sync_debug_mode("default")
