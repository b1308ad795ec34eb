"""Thin wrappers over torch.ops.reid_ext.*, with their fake kernels and autograd.

Each public function checks its arguments (the same checks as the reference),
calls one fused op, and reduces in a couple of tensor ops without host
synchronisation. Backward passes are private ops of their own, so that
torch.compile sees the whole graph.
"""
from typing import Optional

import torch
from torch import Tensor

from . import _checks

__all__ = ["cosine_similarity", "unified_triplet_loss"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate in: at least float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- cosine_similarity


def cosine_similarity(x: Tensor, y: Optional[Tensor] = None, eps: float = 1e-12) -> Tensor:
    """Pairwise cosine similarity.

    Args:
        x (Tensor[N, D]): features.
        y (Tensor[M, D], optional): other features; None means y = x.
        eps (float): lower bound of the norms.

    Returns:
        S (Tensor[N, M]): S_ij = <x_i, y_j> / (max(|x_i|, eps) * max(|y_j|, eps)).
    """
    _checks.check_cosine_similarity(x, y, eps)
    return torch.ops.reid_ext.cosine_similarity.default(x, y, float(eps))


@torch.library.register_fake("reid_ext::cosine_similarity")
def _cosine_similarity_fake(x, y, eps):
    return x.new_empty(x.size(0), x.size(0) if y is None else y.size(0))


@torch.library.register_fake("reid_ext::_cosine_similarity_backward")
def _cosine_similarity_backward_fake(grad, sim, x, y, eps):
    return torch.empty_like(x), (x.new_empty(0, x.size(1)) if y is None else torch.empty_like(y))


def _cosine_similarity_setup(ctx, inputs, output):
    x, y, eps = inputs
    ctx.eps = eps
    ctx.has_y = y is not None
    ctx.save_for_backward(output, x, y)


def _cosine_similarity_backward(ctx, grad):
    sim, x, y = ctx.saved_tensors
    grad_x, grad_y = torch.ops.reid_ext._cosine_similarity_backward.default(grad, sim, x, y, ctx.eps)
    return grad_x, (grad_y if ctx.has_y else None), None


torch.library.register_autograd(
    "reid_ext::cosine_similarity", _cosine_similarity_backward, setup_context=_cosine_similarity_setup
)


# ---------------------------------------------------------------- unified_triplet_loss


def unified_triplet_loss(
    x: Tensor,
    labels: Tensor,
    *,
    gamma: float = 64.0,
    margin: float = 0.25,
    modalities: Optional[Tensor] = None,
    mode: str = "all",
    ref: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    ref_modalities: Optional[Tensor] = None,
    reduction: str = "mean",
) -> Tensor:
    """Unified batch-all triplet loss (UBAT), fused: the N x M similarity matrix is never stored.

    L_i = softplus(LSE_{n in neg(i)} gamma*(S_in + margin) + LSE_{p in pos(i)} (-gamma*S_ip))
        = log(1 + sum_{n, p} exp(gamma*(S_in - S_ip + margin))) over all triplets of anchor i.

    Args:
        x (Tensor[N, D]): anchor features.
        labels (Tensor[N]): integer identities.
        gamma (float): scale, > 0.
        margin (float): margin added to negative similarities.
        modalities (Tensor[N], optional): integer modality of each anchor; required unless mode="all".
        mode (str): which references pair with an anchor: "all", "cross" (other modality) or
            "intra" (same modality).
        ref (Tensor[M, D], optional): a reference bank (e.g. a cross-batch memory); None means the
            batch itself with j != i. Receives a gradient when it requires grad.
        ref_labels (Tensor[M], optional): identities of ref; required with ref.
        ref_modalities (Tensor[M], optional): modalities of ref; required with ref unless mode="all".
        reduction (str): "mean" (over anchors with a positive and a negative), "sum" or "none".

    Returns:
        Tensor[] or Tensor[N] with reduction="none" (0 for anchors without a positive or a negative).
    """
    _checks.check_unified(x, labels, gamma, modalities, mode, ref, ref_labels, ref_modalities, reduction)
    loss, valid, _, _ = torch.ops.reid_ext.unified_triplet_loss.default(
        x, labels, modalities, ref, ref_labels, ref_modalities, float(gamma), float(margin), _checks.mode_id(mode)
    )
    return _checks.reduce_loss(loss, valid, reduction)


@torch.library.register_fake("reid_ext::unified_triplet_loss")
def _unified_fake(x, labels, modalities, ref, ref_labels, ref_modalities, gamma, margin, mode):
    n = x.size(0)
    stats = x.new_empty(n, dtype=_acc_dtype(x.dtype))
    return x.new_empty(n), x.new_empty(n, dtype=torch.bool), stats, torch.empty_like(stats)


@torch.library.register_fake("reid_ext::_unified_triplet_loss_backward")
def _unified_backward_fake(
    grad_loss, x, labels, modalities, ref, ref_labels, ref_modalities, valid, lse_neg, lse_pos, gamma, margin, mode,
    ref_requires_grad,
):
    grad_ref = torch.empty_like(ref) if (ref is not None and ref_requires_grad) else x.new_empty(0, x.size(1))
    return torch.empty_like(x), grad_ref


def _unified_setup(ctx, inputs, output):
    x, labels, modalities, ref, ref_labels, ref_modalities, gamma, margin, mode = inputs
    _, valid, lse_neg, lse_pos = output
    ctx.mark_non_differentiable(valid, lse_neg, lse_pos)
    ctx.gamma, ctx.margin, ctx.mode = gamma, margin, mode
    ctx.save_for_backward(x, labels, modalities, ref, ref_labels, ref_modalities, valid, lse_neg, lse_pos)


def _unified_backward(ctx, grad_loss, _grad_valid, _grad_lse_neg, _grad_lse_pos):
    x, labels, modalities, ref, ref_labels, ref_modalities, valid, lse_neg, lse_pos = ctx.saved_tensors
    ref_requires_grad = ref is not None and ctx.needs_input_grad[3]
    grad_x, grad_ref = torch.ops.reid_ext._unified_triplet_loss_backward.default(
        grad_loss, x, labels, modalities, ref, ref_labels, ref_modalities, valid, lse_neg, lse_pos,
        ctx.gamma, ctx.margin, ctx.mode, ref_requires_grad,
    )
    return grad_x, None, None, (grad_ref if ref_requires_grad else None), None, None, None, None, None


torch.library.register_autograd(
    "reid_ext::unified_triplet_loss", _unified_backward, setup_context=_unified_setup
)
