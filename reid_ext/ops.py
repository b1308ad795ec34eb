"""Thin wrappers over torch.ops.reid_ext.*, with their fake kernels and autograd.

Each public function checks its arguments (the same checks as the reference),
calls one fused op, and reduces in a couple of tensor ops without host
synchronisation. Backward passes are private ops of their own, so that
torch.compile sees the whole graph.
"""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _checks

__all__ = [
    "cosine_similarity",
    "unified_triplet_loss",
    "batch_hard_triplet_loss",
    "modality_centers",
    "hetero_center_triplet_loss",
    "cosine_softmax_loss",
    "topk_similarity",
    "TopKSimilarity",
]


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
def _cosine_similarity_backward_fake(grad, x, y, eps):
    return torch.empty_like(x), (x.new_empty(0, x.size(1)) if y is None else torch.empty_like(y))


def _cosine_similarity_setup(ctx, inputs, output):
    x, y, eps = inputs
    ctx.eps = eps
    ctx.has_y = y is not None
    ctx.save_for_backward(x, y)


def _cosine_similarity_backward(ctx, grad):
    _no_double_backward("cosine_similarity")
    x, y = ctx.saved_tensors
    grad_x, grad_y = torch.ops.reid_ext._cosine_similarity_backward.default(grad, x, y, ctx.eps)
    return grad_x, (grad_y if ctx.has_y else None), None


torch.library.register_autograd(
    "reid_ext::cosine_similarity", _cosine_similarity_backward, setup_context=_cosine_similarity_setup
)


def _register_gradient_in_forward(op: str, loss_name: str, num_inputs: int, grad_inputs: Tuple[int, ...]) -> None:
    """Autograd of an op that returns (loss, gradient of loss w.r.t. input grad_inputs[0], ...):
    the backward scales the saved gradients."""

    def setup(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(*output[1:])

    def backward(ctx, grad_loss, *_unused):
        _no_double_backward(loss_name)
        grads = [None] * num_inputs
        for position, saved in zip(grad_inputs, ctx.saved_tensors):
            if ctx.needs_input_grad[position]:
                grads[position] = grad_loss * saved
        return tuple(grads)

    torch.library.register_autograd(op, backward, setup_context=setup)


def _grad_in_forward(x: Tensor, reduction: str, *others: Optional[Tensor]) -> bool:
    """Whether a CPU loss may compute its gradient along with its value: when it will be
    differentiated (training) and its reduction is a scalar, so that the backward only scales
    the saved gradient. A kernel that sees whole rows of the pair (or logit) matrix at once then
    computes its dot products once for both directions, one GEMM fewer than a forward and a
    recomputing backward."""
    if x.device.type != "cpu" or reduction == "none" or not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in (x, *others))


def _no_double_backward(loss_name: str) -> None:
    """Raises under create_graph=True: the backward kernels are not differentiable themselves,
    and a silently wrong second derivative would be worse than none."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"reid_ext.{loss_name} does not support double backward (create_graph=True)")


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
    if _with_grad_pays(x, ref, reduction):
        loss, _, _ = torch.ops.reid_ext._unified_triplet_loss_with_grad.default(
            x, labels, modalities, ref, ref_labels, ref_modalities, float(gamma), float(margin), _checks.mode_id(mode),
            reduction == "mean", ref is not None and ref.requires_grad,
        )
        return loss
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
    _no_double_backward("unified_triplet_loss")
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

# Problems up to this many pairs (with at most 512 references) are one tile of the CPU kernel.
_SINGLE_TILE_PAIRS = 512 * 512
# Banks up to this size are visited in panels of whole rows of S (at least 32 rows, 2^22 pairs at most).
_PANEL_BANK = (1 << 22) // 32


def _with_grad_pays(x: Tensor, ref: Optional[Tensor], reduction: str) -> bool:
    """Whether the unified loss takes its one-op path (see _grad_in_forward): a single tile, or a
    bank whose panels of whole rows of S give the loss and dL/dS at once."""
    if not _grad_in_forward(x, reduction, ref):
        return False
    m = x.size(0) if ref is None else ref.size(0)
    single_tile = m <= 512 and x.size(0) * m <= _SINGLE_TILE_PAIRS
    return single_tile or (ref is not None and m <= _PANEL_BANK)


@torch.library.register_fake("reid_ext::_unified_triplet_loss_with_grad")
def _unified_with_grad_fake(
    x, labels, modalities, ref, ref_labels, ref_modalities, gamma, margin, mode, mean, ref_requires_grad
):
    grad_ref = torch.empty_like(ref) if (ref is not None and ref_requires_grad) else x.new_empty(0, x.size(1))
    return x.new_empty(()), torch.empty_like(x), grad_ref


_register_gradient_in_forward("reid_ext::_unified_triplet_loss_with_grad", "unified_triplet_loss", 11, (0, 3))



# ---------------------------------------------------------------- batch_hard_triplet_loss


def batch_hard_triplet_loss(
    x: Tensor,
    labels: Tensor,
    *,
    margin: float = 0.3,
    metric: str = "euclidean",
    soft_margin: bool = False,
    reduction: str = "mean",
    return_indices: bool = False,
):
    """Batch-hard triplet loss, fused: the N x N distance matrix is never stored.

    L_i = relu(max_{p in pos(i)} d_ip - min_{n in neg(i)} d_in + margin),
    or softplus(d_ap - d_an) with soft_margin; positives share the label (j != i), negatives do not.

    Args:
        x (Tensor[N, D]): features.
        labels (Tensor[N]): integer identities.
        margin (float): >= 0; unused with soft_margin.
        metric (str): "euclidean" sqrt(max(|x_i - x_j|^2, 1e-12)), "sqeuclidean" |x_i - x_j|^2,
            or "cosine" 1 - cos(x_i, x_j).
        soft_margin (bool): softplus instead of the hinge.
        reduction (str): "mean" (over anchors with a positive and a negative), "sum" or "none".
        return_indices (bool): also return the hardest pair of each anchor.

    Returns:
        loss (Tensor[] or Tensor[N] with reduction="none"; 0 for anchors without a positive or a
        negative), and with return_indices also pos_idx (Tensor[N]) and neg_idx (Tensor[N]), int64,
        -1 where an anchor has none. Ties go to the lowest index. The gradient flows through the
        selected pairs only.
    """
    _checks.check_batch_hard(x, labels, margin, metric, reduction)
    loss, valid, pos_idx, neg_idx, _, _ = torch.ops.reid_ext.batch_hard_triplet_loss.default(
        x, labels, float(margin), _checks.metric_id(metric), bool(soft_margin)
    )
    loss = _checks.reduce_loss(loss, valid, reduction)
    return (loss, pos_idx, neg_idx) if return_indices else loss


@torch.library.register_fake("reid_ext::batch_hard_triplet_loss")
def _batch_hard_fake(x, labels, margin, metric, soft_margin):
    n = x.size(0)
    index = x.new_empty(n, dtype=torch.long)
    dist = x.new_empty(n, dtype=_acc_dtype(x.dtype))
    valid = x.new_empty(n, dtype=torch.bool)
    return x.new_empty(n), valid, index, torch.empty_like(index), dist, torch.empty_like(dist)


@torch.library.register_fake("reid_ext::_batch_hard_triplet_loss_backward")
def _batch_hard_backward_fake(grad_loss, x, pos_idx, neg_idx, dist_ap, dist_an, margin, metric, soft_margin):
    return x.new_empty(x.shape)


def _batch_hard_setup(ctx, inputs, output):
    x, _labels, margin, metric, soft_margin = inputs
    _, valid, pos_idx, neg_idx, dist_ap, dist_an = output
    ctx.mark_non_differentiable(valid, pos_idx, neg_idx, dist_ap, dist_an)
    ctx.margin, ctx.metric, ctx.soft_margin = margin, metric, soft_margin
    ctx.save_for_backward(x, pos_idx, neg_idx, dist_ap, dist_an)


def _batch_hard_backward(ctx, grad_loss, *_unused):
    _no_double_backward("batch_hard_triplet_loss")
    x, pos_idx, neg_idx, dist_ap, dist_an = ctx.saved_tensors
    grad_x = torch.ops.reid_ext._batch_hard_triplet_loss_backward.default(
        grad_loss, x, pos_idx, neg_idx, dist_ap, dist_an, ctx.margin, ctx.metric, ctx.soft_margin
    )
    return grad_x, None, None, None, None


torch.library.register_autograd(
    "reid_ext::batch_hard_triplet_loss", _batch_hard_backward, setup_context=_batch_hard_setup
)


# ---------------------------------------------------------------- modality_centers


def modality_centers(
    x: Tensor, labels: Tensor, modalities: Tensor, *, normalize: bool = True
) -> Tuple[Tensor, Tensor, Tensor]:
    """One center per distinct (label, modality) pair: the mean of its L2-normalized features.

    c_g = (1 / |g|) * sum_{i in g} x_i / max(|x_i|, 1e-12)   (raw x_i with normalize=False)

    Deterministic: on CPU (whatever the number of threads) and on CUDA alike, the same inputs give
    bitwise the same centers and gradients on every run (each center sums its rows in index order;
    no floating-point atomics). CPU and CUDA results may differ from each other by rounding.

    The number of centers G depends on the data, so this wrapper finds the pairs with
    torch.unique, which waits for the device on CUDA (the one host synchronisation). The fused
    op behind it takes the group ids and G and does not synchronise: when they are known in
    advance, call ``torch.ops.reid_ext.modality_centers(x, group, G, normalize)`` directly; it
    returns (centers, counts).

    Args:
        x (Tensor[N, D]): features.
        labels (Tensor[N]): integer identities.
        modalities (Tensor[N]): integer modalities (e.g. 0 = visible, 1 = infrared).
        normalize (bool): average the L2-normalized features (True) or the raw ones.

    Returns:
        centers (Tensor[G, D]), center_labels (Tensor[G]), center_modalities (Tensor[G]), ordered
        by (label, modality).
    """
    _checks.check_centers(x, labels, modalities)
    # One int64 key per row in (label, modality) order, from order-preserving ranks (the position
    # of a value's first occurrence in sorted order, < N): a unique over one dimension is much
    # cheaper than torch.unique(dim=0) over (label, modality) rows.
    n = max(labels.numel(), 1)
    labels_long, modalities_long = labels.long().contiguous(), modalities.long().contiguous()
    sorted_labels = labels_long.sort().values
    sorted_modalities = modalities_long.sort().values
    label_rank = torch.searchsorted(sorted_labels, labels_long)
    modality_rank = torch.searchsorted(sorted_modalities, modalities_long)
    keys, group = torch.unique(label_rank * n + modality_rank, return_inverse=True)
    centers, _ = torch.ops.reid_ext.modality_centers.default(x, group, keys.size(0), bool(normalize))
    center_labels = sorted_labels[keys // n].to(labels.dtype)
    center_modalities = sorted_modalities[keys % n].to(modalities.dtype)
    return centers, center_labels, center_modalities


@torch.library.register_fake("reid_ext::modality_centers")
def _centers_fake(x, group, num_groups, normalize):
    return x.new_empty(num_groups, x.size(1)), x.new_empty(num_groups, dtype=torch.long)


@torch.library.register_fake("reid_ext::_modality_centers_backward")
def _centers_backward_fake(grad_centers, x, group, counts, normalize):
    return x.new_empty(x.shape)


def _centers_setup(ctx, inputs, output):
    x, group, _num_groups, normalize = inputs
    _, counts = output
    ctx.mark_non_differentiable(counts)
    ctx.normalize = normalize
    ctx.save_for_backward(x, group, counts)


def _centers_backward(ctx, grad_centers, _grad_counts):
    _no_double_backward("modality_centers")
    x, group, counts = ctx.saved_tensors
    grad_x = torch.ops.reid_ext._modality_centers_backward.default(grad_centers, x, group, counts, ctx.normalize)
    return grad_x, None, None, None


torch.library.register_autograd("reid_ext::modality_centers", _centers_backward, setup_context=_centers_setup)


# ---------------------------------------------------------------- hetero_center_triplet_loss


def hetero_center_triplet_loss(
    x: Tensor,
    labels: Tensor,
    modalities: Tensor,
    *,
    mining: str = "all",
    gamma: float = 64.0,
    margin: Optional[float] = None,
    reduction: str = "mean",
) -> Tensor:
    """Triplet loss over the modality centers of the batch (one per (label, modality) pair).

    mining="all" (UBAT's batch-all hetero-center loss): unified_triplet_loss(mode="cross") over
    modality_centers(normalize=True), margin default 0.25:
        L_g = softplus(LSE_{n in neg(g)} gamma*(S_gn + margin) + LSE_{p in pos(g)} (-gamma*S_gp)),
        positives and negatives taken among the centers of the other modalities.
    mining="hard" (hetero-center triplet loss): batch_hard_triplet_loss (euclidean) over
    modality_centers(normalize=False), margin default 0.3:
        L_g = relu(max_p |c_g - c_p| - min_n |c_g - c_n| + margin).

    An identity seen in one modality only has a center without a cross-modal positive: an
    invalid anchor, which contributes 0. Finding the centers synchronises with the device once
    (see modality_centers).

    Args:
        x (Tensor[N, D]): features.
        labels (Tensor[N]): integer identities.
        modalities (Tensor[N]): integer modalities.
        mining (str): "all" or "hard".
        gamma (float): scale of mining="all", > 0.
        margin (float, optional): None for the default of the mining.
        reduction (str): "mean" (over valid centers), "sum" or "none" (Tensor[G], per center).

    Returns:
        Tensor[] or Tensor[G] with reduction="none".
    """
    _checks.check_choice("mining", mining, ("all", "hard"))
    centers, center_labels, center_modalities = modality_centers(x, labels, modalities, normalize=mining == "all")
    if mining == "all":
        return unified_triplet_loss(
            centers, center_labels, gamma=gamma, margin=0.25 if margin is None else margin,
            modalities=center_modalities, mode="cross", reduction=reduction,
        )
    return batch_hard_triplet_loss(
        centers, center_labels, margin=0.3 if margin is None else margin, metric="euclidean", reduction=reduction
    )


# ---------------------------------------------------------------- cosine_softmax_loss


def cosine_softmax_loss(
    x: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    scale: float = 64.0,
    margin: float = 0.35,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """Cosine-softmax (CosFace / AM-softmax) cross-entropy, fused with the normalization.

    z_ic = scale * (cos(x_i, weight_c) - margin * [c == label_i]),
    L_i = (1 - eps) * (LSE_c z_ic - z_i,label_i) + eps/C * sum_c (LSE_c z_ic - z_ic), eps = label_smoothing.

    On CPU the N x C logits are never stored; on CUDA the two products with the weights go
    through cuBLAS and everything else is fused around them.

    Args:
        x (Tensor[N, D]): features.
        weight (Tensor[C, D]): class weights (any scale: they are normalized).
        labels (Tensor[N]): integer class indices in [0, C). Out-of-range labels raise on CPU
            and give a NaN loss on CUDA (checking them there would synchronise).
        scale (float): > 0.
        margin (float): additive margin on the target cosine.
        label_smoothing (float): in [0, 1).
        reduction (str): "mean" (over the N anchors), "sum" or "none".

    Returns:
        Tensor[] or Tensor[N] with reduction="none".
    """
    _checks.check_cosine_softmax(x, weight, labels, scale, label_smoothing, reduction)
    if _grad_in_forward(x, reduction, weight) and weight.size(0) <= _CHUNK_CLASSES:
        loss, _, _ = torch.ops.reid_ext._cosine_softmax_loss_with_grad.default(
            x, weight, labels, float(scale), float(margin), float(label_smoothing), reduction == "mean",
            x.requires_grad, weight.requires_grad,
        )
        return loss
    loss, _ = torch.ops.reid_ext.cosine_softmax_loss.default(
        x, weight, labels, float(scale), float(margin), float(label_smoothing)
    )
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / max(x.size(0), 1)


@torch.library.register_fake("reid_ext::cosine_softmax_loss")
def _cosine_softmax_fake(x, weight, labels, scale, margin, label_smoothing):
    n = x.size(0)
    return x.new_empty(n), x.new_empty(n, dtype=_acc_dtype(x.dtype))


@torch.library.register_fake("reid_ext::_cosine_softmax_loss_backward")
def _cosine_softmax_backward_fake(grad_loss, x, weight, labels, lse, scale, margin, label_smoothing, x_requires_grad,
                                  weight_requires_grad):
    grad_x = x.new_empty(x.shape) if x_requires_grad else x.new_empty(0, x.size(1))
    grad_weight = weight.new_empty(weight.shape) if weight_requires_grad else x.new_empty(0, x.size(1))
    return grad_x, grad_weight


def _cosine_softmax_setup(ctx, inputs, output):
    x, weight, labels, scale, margin, label_smoothing = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.scale, ctx.margin, ctx.label_smoothing = scale, margin, label_smoothing
    ctx.save_for_backward(x, weight, labels, lse)


def _cosine_softmax_backward(ctx, grad_loss, _grad_lse):
    _no_double_backward("cosine_softmax_loss")
    x, weight, labels, lse = ctx.saved_tensors
    want_x, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x, grad_weight = torch.ops.reid_ext._cosine_softmax_loss_backward.default(
        grad_loss, x, weight, labels, lse, ctx.scale, ctx.margin, ctx.label_smoothing, want_x, want_weight
    )
    return (grad_x if want_x else None), (grad_weight if want_weight else None), None, None, None, None


torch.library.register_autograd(
    "reid_ext::cosine_softmax_loss", _cosine_softmax_backward, setup_context=_cosine_softmax_setup
)


# Up to this many classes, the CPU kernel's chunks of logits are whole rows: each gives its
# anchors' loss and dL/dz at once (see _grad_in_forward).
_CHUNK_CLASSES = 4096


@torch.library.register_fake("reid_ext::_cosine_softmax_loss_with_grad")
def _cosine_softmax_with_grad_fake(x, weight, labels, scale, margin, label_smoothing, mean, x_requires_grad,
                                   weight_requires_grad):
    grad_x = torch.empty_like(x) if x_requires_grad else x.new_empty(0, x.size(1))
    grad_weight = torch.empty_like(weight) if weight_requires_grad else x.new_empty(0, x.size(1))
    return x.new_empty(()), grad_x, grad_weight


_register_gradient_in_forward("reid_ext::_cosine_softmax_loss_with_grad", "cosine_softmax_loss", 9, (0, 1))


# ---------------------------------------------------------------- topk_similarity


class TopKSimilarity(NamedTuple):
    """What topk_similarity returns (see there)."""

    values: Tensor
    indices: Tensor
    far: Tensor


def topk_similarity(
    x: Tensor, y: Optional[Tensor] = None, *, k: int, largest: bool = True, eps: float = 1e-12
) -> TopKSimilarity:
    """The k most similar rows of y for every row of x, by cosine similarity, fused: the N x M
    similarity matrix is never stored (tiles of y stream past blocks of x).

    values[i] = the k largest S_ij over j (smallest with largest=False), sorted, with
    S_ij = <x_i, y_j> / (max(|x_i|, eps) * max(|y_j|, eps)), as cosine_similarity.

    Ordered as torch.topk of the dense similarity orders, and ties go to the lowest index: the
    result equals ``torch.topk(cosine_similarity(x, y), k, largest=largest)`` up to rounding. A NaN
    similarity (a NaN feature) counts as larger than every number, as in torch.topk: with
    largest=True it comes first, without it comes last; ``far`` of its row is NaN.

    Not differentiable: no output requires grad, whatever the inputs.

    Args:
        x (Tensor[N, D]): features.
        y (Tensor[M, D], optional): other features; None means y = x, each row of x included
            among its own candidates (its similarity with itself is 1).
        k (int): in [1, M].
        largest (bool): the k largest similarities (True) or the k smallest.
        eps (float): lower bound of the norms, > 0.

    Returns:
        TopKSimilarity(values, indices, far): values (Tensor[N, k]), indices (int64 Tensor[N, k])
        into the rows of y, and far (Tensor[N]), the row's similarity at the other end of the
        order over all M columns: its minimum with largest=True (1 - far is the row's largest
        cosine distance), its maximum otherwise.
    """
    _checks.check_features("x", x)
    if y is not None:
        _checks.check_features("y", y)
        _checks.check_same("y", y, x, "x")
    if not isinstance(k, (int, torch.SymInt)) or isinstance(k, bool):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    values, indices, far = torch.ops.reid_ext.topk_similarity.default(x, y, k, bool(largest), float(eps))
    return TopKSimilarity(values, indices, far)


@torch.library.register_fake("reid_ext::topk_similarity")
def _topk_similarity_fake(x, y, k, largest, eps):
    n = x.size(0)
    return x.new_empty(n, k), x.new_empty(n, k, dtype=torch.long), x.new_empty(n)


def _topk_similarity_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _topk_similarity_backward(ctx, *grads):
    raise RuntimeError("reid_ext.topk_similarity is not differentiable")


torch.library.register_autograd(
    "reid_ext::topk_similarity", _topk_similarity_backward, setup_context=_topk_similarity_setup
)
