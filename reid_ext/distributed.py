"""Global mining under torch.distributed: every rank mines over the batches of all ranks.

With DistributedDataParallel each rank sees only its own share of the global
batch, so its hardest (or all) positives and negatives are found among far fewer
samples than a single process would see. ``gather_batch`` concatenates the
embeddings, labels and modalities of all ranks in rank order; the gathered
embeddings stay differentiable, with the gradient flowing back to each rank's
own rows.

Usage, the same for every loss (each rank computes the same global loss)::

    model = DistributedDataParallel(model)
    emb = model(images)                                   # this rank's rows
    emb_all, labels_all, mods_all = reid_ext.gather_batch(emb, labels, modalities)
    loss = reid_ext.hetero_center_triplet_loss(emb_all, labels_all, mods_all)
    loss.backward()

Why the gradients come out right: the backward of the gather sums, over ranks,
the gradient that each rank's loss sends to this rank's rows (the gradient of
sum_r loss_r). Every rank computes the same loss L, so that is world_size times
dL/d(own rows); DDP then averages the parameter gradients over the ranks, which
divides by world_size. The model's gradients are exactly those of L computed by
a single process over the concatenated batch. A loss module with parameters of
its own (CosineSoftmaxLoss) receives the full dL/dweight on every rank, identical
everywhere, whether or not DDP wraps it.

Ranks may hold batches of different sizes (the last batch of an epoch is often
smaller): the sizes are gathered first, and every rank's rows keep their place
in rank order.

cosine_softmax_loss is a per-sample loss and need not be gathered: computed on the
local batch, DDP's averaging already yields the global mean (for equal batch
sizes), provided its weight is averaged too (a submodule of the DDP model).
"""
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather", "gather_batch"]


def _world_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _gather_sizes(rows: int, device: torch.device, group) -> List[int]:
    """The number of rows of every rank (one small all_gather, then one host synchronisation)."""
    mine = torch.tensor([rows], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, mine, group=group)
    return [int(size) for size in torch.cat(sizes).tolist()]


def _gather(tensor: Tensor, sizes: List[int], group) -> Tensor:
    # all_gather needs one shape on every rank: pad each rank's rows to the largest batch.
    tensor = tensor.contiguous()
    largest = max(sizes)
    padded = tensor.new_zeros((largest, *tensor.shape[1:]))
    padded[: tensor.size(0)] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:rows] for part, rows in zip(parts, sizes)], dim=0)


class _AllGather(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns this rank's rows of the gradient summed over ranks."""

    @staticmethod
    def forward(ctx, tensor: Tensor, sizes: List[int], group) -> Tensor:
        ctx.group = group
        rank = dist.get_rank(group)
        ctx.rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        return _gather(tensor, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # A fresh contiguous copy: all_reduce works in place and autograd may share `grad`.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rows], None, None


def _all_gather(tensor: Tensor, sizes: List[int], group) -> Tensor:
    if tensor.requires_grad and torch.is_grad_enabled():
        return _AllGather.apply(tensor, sizes, group)
    return _gather(tensor, sizes, group)


def all_gather(tensor: Tensor, group: Optional["dist.ProcessGroup"] = None) -> Tensor:
    """Concatenates ``tensor`` (Tensor[B_r, ...] on rank r; B_r may differ) from all ranks along dim 0.

    Rank r's rows are rows [B_0 + ... + B_{r-1}, B_0 + ... + B_r) of the result. Differentiable:
    the backward returns this rank's rows of the gradient summed over all ranks. Without an
    initialized process group (or with one rank) it returns ``tensor`` itself.
    """
    if _world_size(group) == 1:
        return tensor
    return _all_gather(tensor, _gather_sizes(tensor.size(0), tensor.device, group), group)


def gather_batch(
    x: Tensor,
    labels: Tensor,
    modalities: Optional[Tensor] = None,
    group: Optional["dist.ProcessGroup"] = None,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """The global batch for mining: embeddings, labels and modalities of all ranks, in rank order.

    Args:
        x (Tensor[B, D]): this rank's embeddings (B may differ between ranks); the gradient of
            the result flows back to them.
        labels (Tensor[B]): their identities.
        modalities (Tensor[B], optional): their modalities.
        group: the process group (default: the whole world).

    Returns:
        (Tensor[M, D], Tensor[M], Tensor[M] or None), M the sum of the ranks' B.
    """
    if x.size(0) != labels.size(0) or (modalities is not None and modalities.size(0) != x.size(0)):
        raise ValueError("x, labels and modalities must have the same number of rows")
    if _world_size(group) == 1:
        return x, labels, modalities
    sizes = _gather_sizes(x.size(0), x.device, group)  # once for the three tensors
    gathered_modalities = None if modalities is None else _all_gather(modalities, sizes, group)
    return _all_gather(x, sizes, group), _all_gather(labels, sizes, group), gathered_modalities
