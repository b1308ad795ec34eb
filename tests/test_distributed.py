"""Global mining under torch.distributed: two gloo ranks on CPU against one process on the whole batch."""
import gc

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import reid_ext

WORLD = 2
# Rows per rank: 3 identities x 4 samples, 2 in each modality; then unequal batches (a short last batch).
SIZES = [(12, 12), (4, 3)]
IN_DIM, DIM, CLASSES = 10, 8, 6


def global_batch(sizes):
    total = sum(sizes)
    ids = max(2, total // 4)
    gen = torch.Generator().manual_seed(total)
    inputs = torch.randn(total, IN_DIM, generator=gen, dtype=torch.float64)
    # Identities span both ranks, so that global mining finds pairs no single rank holds.
    labels = torch.arange(total) % ids
    modalities = (torch.arange(total) // ids) % 2
    return inputs, labels, modalities


def make_model():
    torch.manual_seed(1)
    return torch.nn.Linear(IN_DIM, DIM).double()


def losses():
    """name -> (loss(emb, labels, modalities, classifier)); every rank computes it on the gathered batch."""
    return {
        "unified": lambda e, l, m, c: reid_ext.unified_triplet_loss(e, l, gamma=8.0, modalities=m, mode="cross"),
        "batch_hard": lambda e, l, m, c: reid_ext.batch_hard_triplet_loss(e, l),
        "hetero_all": lambda e, l, m, c: reid_ext.hetero_center_triplet_loss(e, l, m, gamma=8.0),
        "hetero_hard": lambda e, l, m, c: reid_ext.hetero_center_triplet_loss(e, l, m, mining="hard"),
        "cosine_softmax": lambda e, l, m, c: c(e, l % CLASSES),
    }


def single_process(name, sizes):
    """Loss and gradients of one process on the concatenated batch."""
    inputs, labels, modalities = global_batch(sizes)
    model = make_model()
    torch.manual_seed(2)
    classifier = reid_ext.losses.CosineSoftmaxLoss(CLASSES, DIM, scale=8.0, dtype=torch.float64)
    loss = losses()[name](model(inputs), labels, modalities, classifier)
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()], classifier.weight.grad


def check_rank(rank, name, loss_fn, sizes):
    """This rank's loss and gradients under DDP and global mining against one process on the whole batch."""
    inputs, labels, modalities = global_batch(sizes)
    own = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    model = DistributedDataParallel(make_model())
    torch.manual_seed(2)
    classifier = reid_ext.losses.CosineSoftmaxLoss(CLASSES, DIM, scale=8.0, dtype=torch.float64)
    emb = model(inputs[own])
    emb.retain_grad()
    emb_all, labels_all, modalities_all = reid_ext.gather_batch(emb, labels[own], modalities[own])
    assert torch.equal(labels_all, labels) and torch.equal(modalities_all, modalities)
    loss = loss_fn(emb_all, labels_all, modalities_all, classifier)
    loss.backward()

    expected_loss, expected_grads, expected_weight_grad = single_process(name, sizes)
    torch.testing.assert_close(loss.detach(), expected_loss, msg=f"{name} {sizes}")
    for got, expected in zip(model.parameters(), expected_grads):  # after DDP's average over ranks
        torch.testing.assert_close(got.grad, expected, msg=f"{name} {sizes}")
    if name == "cosine_softmax":  # not under DDP: the full gradient on every rank
        torch.testing.assert_close(classifier.weight.grad, expected_weight_grad, msg=f"{name} {sizes}")
    # This rank's rows receive the gradient of sum over ranks of the (identical) losses.
    inputs_leaf = inputs.clone().requires_grad_(True)
    single = make_model()
    torch.manual_seed(2)
    single_classifier = reid_ext.losses.CosineSoftmaxLoss(CLASSES, DIM, scale=8.0, dtype=torch.float64)
    emb_single = single(inputs_leaf)
    emb_single.retain_grad()
    loss_fn(emb_single, labels, modalities, single_classifier).backward()
    torch.testing.assert_close(emb.grad, WORLD * emb_single.grad[own], msg=f"{name} {sizes}")


def worker(rank, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for sizes in SIZES:
            for name, loss_fn in losses().items():
                check_rank(rank, name, loss_fn, sizes)
        # Teardown in order: DDP's reducers (kept alive by reference cycles) are freed while the process group
        # still runs, and no rank destroys the group while the other still communicates; a reducer or gloo
        # thread left for interpreter shutdown can abort the process.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_global_mining_matches_single_process(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)


def test_without_process_group_gather_is_identity():
    assert not dist.is_initialized()
    x = torch.randn(4, 3, requires_grad=True)
    labels = torch.arange(4)
    gathered, gathered_labels, modalities = reid_ext.gather_batch(x, labels)
    assert gathered is x and gathered_labels is labels and modalities is None
    with pytest.raises(ValueError, match="same number of rows"):
        reid_ext.gather_batch(x, torch.arange(3))
