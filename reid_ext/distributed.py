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

cosine_softmax_loss is a per-sample loss and need not be gathered: computed on the
local batch, DDP's averaging already yields the global mean (for equal batch
sizes), provided its weight is averaged too (a submodule of the DDP model).
All ranks must pass batches of the same size (DistributedSampler with
drop_last=True, or a fixed P x K sampler per rank).
"""
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather", "gather_batch"]


def _world_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _gather(tensor: Tensor, group) -> Tensor:
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor, group=group)
    return torch.cat(parts, dim=0)


class _AllGather(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns this rank's rows of the gradient summed over ranks."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        ctx.rows = tensor.size(0)
        ctx.rank = dist.get_rank(group)
        return _gather(tensor, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # A fresh contiguous copy: all_reduce works in place and autograd may share `grad`.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.rows: (ctx.rank + 1) * ctx.rows], None


def all_gather(tensor: Tensor, group: Optional["dist.ProcessGroup"] = None) -> Tensor:
    """Concatenates ``tensor`` (Tensor[B, ...], the same shape on every rank) from all ranks along dim 0.

    Rank r's rows are rows [r*B, (r+1)*B) of the result. Differentiable: the backward returns
    this rank's rows of the gradient summed over all ranks. Without an initialized process
    group (or with one rank) it returns ``tensor`` itself.
    """
    if _world_size(group) == 1:
        return tensor
    if tensor.requires_grad and torch.is_grad_enabled():
        return _AllGather.apply(tensor, group)
    return _gather(tensor, group)


def gather_batch(
    x: Tensor,
    labels: Tensor,
    modalities: Optional[Tensor] = None,
    group: Optional["dist.ProcessGroup"] = None,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """The global batch for mining: embeddings, labels and modalities of all ranks, in rank order.

    Args:
        x (Tensor[B, D]): this rank's embeddings; the gradient of the result flows back to them.
        labels (Tensor[B]): their identities.
        modalities (Tensor[B], optional): their modalities.
        group: the process group (default: the whole world).

    Returns:
        (Tensor[W*B, D], Tensor[W*B], Tensor[W*B] or None) for W ranks.
    """
    if x.size(0) != labels.size(0) or (modalities is not None and modalities.size(0) != x.size(0)):
        raise ValueError("x, labels and modalities must have the same number of rows")
    gathered_modalities = None if modalities is None else all_gather(modalities, group)
    return all_gather(x, group), all_gather(labels, group), gathered_modalities
