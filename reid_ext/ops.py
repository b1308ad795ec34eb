"""The public functions over torch.ops.reid_ext.*, with their fake kernels and autograd.

Each function is one op call: the op checks its arguments (in C++, naming the one that is
wrong), reduces over the anchors, and chooses its kernel path from the problem. In training
(a scalar reduction, an input that requires grad) the op also returns the gradients, which
the backward only scales: one custom autograd node and no Python-side tensor work per call.
With reduction="none" a backward op recomputes the pairs. Backward ops are ops of their own,
so that torch.compile sees the whole graph.
"""
import contextlib
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import defaults

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

# The op namespace the public functions call: torch.ops.reid_ext, or (tools/cudasim) the
# emulated-GPU build of the CUDA kernels, which has the same schemas on CPU tensors.
_OPS = torch.ops.reid_ext
# Per op name: its fake kernel; its (backward, setup_context). _register applies them.
_FAKES = {}
_AUTOGRAD = {}


def _fake(name: str):
    def collect(fn):
        _FAKES[name] = fn
        return fn

    return collect


def _wants_grad(t) -> bool:
    """Whether the op should return t's gradient with the loss (t is being trained)."""
    return isinstance(t, Tensor) and t.requires_grad and torch.is_grad_enabled()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-anchor statistics: the kernels accumulate in at least float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _loss_like(x: Tensor, reduction: str) -> Tensor:
    return x.new_empty(()) if reduction != "none" else x.new_empty(x.size(0))


def _grad_like(t: Optional[Tensor], wanted: bool, x: Tensor) -> Tensor:
    """A gradient output of a fake kernel: t's shape when the op computes it, else [0, D]."""
    return t.new_empty(t.shape) if (wanted and t is not None) else x.new_empty(0, x.size(1))


def _no_double_backward(loss_name: str) -> None:
    """Raises under create_graph=True: the backward kernels are not differentiable themselves,
    and a silently wrong second derivative would be worse than none."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"reid_ext.{loss_name} does not support double backward (create_graph=True)")


def _computed(asked: bool, t: Optional[Tensor]) -> bool:
    """Whether the op's forward left nothing to compute for t: its gradient was asked for, or t
    takes none (a raw op call may ask for less than autograd will need: then the backward op runs)."""
    return asked or t is None or not t.requires_grad


def _scaled(grad_loss: Tensor, saved: Tensor, needed: bool) -> Optional[Tensor]:
    return grad_loss * saved if needed else None


# ---------------------------------------------------------------- cosine_similarity


def cosine_similarity(x: Tensor, y: Optional[Tensor] = None, eps: float = defaults.NORM_EPS) -> Tensor:
    """Pairwise cosine similarity.

    Args:
        x (Tensor[N, D]): features.
        y (Tensor[M, D], optional): other features; None means y = x.
        eps (float): lower bound of the norms, finite and > 0.

    Returns:
        S (Tensor[N, M]): S_ij = <x_i, y_j> / (max(|x_i|, eps) * max(|y_j|, eps)).
    """
    return _OPS.cosine_similarity.default(x, y, eps)


@_fake("cosine_similarity")
def _cosine_similarity_fake(x, y, eps):
    return x.new_empty(x.size(0), x.size(0) if y is None else y.size(0))


@_fake("_cosine_similarity_backward")
def _cosine_similarity_backward_fake(grad, x, y, eps):
    return torch.empty_like(x), (x.new_empty(0, x.size(1)) if y is None else torch.empty_like(y))


def _cosine_similarity_setup(ctx, inputs, output):
    x, y, eps = inputs
    ctx.eps = eps
    ctx.has_y = y is not None
    ctx.save_for_backward(x, y)


def _cosine_similarity_backward(ops, ctx, grad):
    _no_double_backward("cosine_similarity")
    x, y = ctx.saved_tensors
    grad_x, grad_y = ops._cosine_similarity_backward.default(grad, x, y, ctx.eps)
    return grad_x, (grad_y if ctx.has_y else None), None


_AUTOGRAD["cosine_similarity"] = (_cosine_similarity_backward, _cosine_similarity_setup)


# ---------------------------------------------------------------- unified_triplet_loss


def unified_triplet_loss(
    x: Tensor,
    labels: Tensor,
    *,
    gamma: float = defaults.UNIFIED_GAMMA,
    margin: float = defaults.UNIFIED_MARGIN,
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
        gamma (float): scale, finite and > 0.
        margin (float): finite margin added to negative similarities.
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
    return _OPS.unified_triplet_loss.default(
        x, labels, modalities, ref, ref_labels, ref_modalities, gamma, margin, mode, reduction, _wants_grad(x),
        _wants_grad(ref),
    )[0]


@_fake("unified_triplet_loss")
def _unified_fake(x, labels, modalities, ref, ref_labels, ref_modalities, gamma, margin, mode, reduction, grad_x,
                  grad_ref):
    n, scalar = x.size(0), reduction != "none"
    stats = x.new_empty(n, dtype=_acc_dtype(x.dtype))
    return (_loss_like(x, reduction), _grad_like(x, scalar and grad_x, x), _grad_like(ref, scalar and grad_ref, x),
            x.new_empty(n, dtype=torch.bool), stats, torch.empty_like(stats))


@_fake("_unified_triplet_loss_backward")
def _unified_backward_fake(grad_loss, x, labels, modalities, ref, ref_labels, ref_modalities, valid, lse_neg, lse_pos,
                           gamma, margin, mode, reduction, grad_ref):
    return torch.empty_like(x), _grad_like(ref, grad_ref, x)


def _unified_setup(ctx, inputs, output):
    x, labels, modalities, ref, ref_labels, ref_modalities, gamma, margin, mode, reduction, grad_x, grad_ref = inputs
    _, saved_grad_x, saved_grad_ref, valid, lse_neg, lse_pos = output
    ctx.mark_non_differentiable(saved_grad_x, saved_grad_ref, valid, lse_neg, lse_pos)
    ctx.in_forward = reduction != "none" and _computed(grad_x, x) and _computed(grad_ref, ref)
    if ctx.in_forward:
        ctx.save_for_backward(saved_grad_x, saved_grad_ref)
        return
    ctx.gamma, ctx.margin, ctx.mode, ctx.reduction = gamma, margin, mode, reduction
    ctx.save_for_backward(x, labels, modalities, ref, ref_labels, ref_modalities, valid, lse_neg, lse_pos)


def _unified_backward(ops, ctx, grad_loss, *_unused):
    _no_double_backward("unified_triplet_loss")
    want_x, want_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    if ctx.in_forward:
        grad_x, grad_ref = ctx.saved_tensors
        return (_scaled(grad_loss, grad_x, want_x), None, None, _scaled(grad_loss, grad_ref, want_ref)) + (None,) * 8
    x, labels, modalities, ref, ref_labels, ref_modalities, valid, lse_neg, lse_pos = ctx.saved_tensors
    grad_x, grad_ref = ops._unified_triplet_loss_backward.default(
        grad_loss, x, labels, modalities, ref, ref_labels, ref_modalities, valid, lse_neg, lse_pos,
        ctx.gamma, ctx.margin, ctx.mode, ctx.reduction, want_ref,
    )
    return (grad_x, None, None, grad_ref if want_ref else None) + (None,) * 8


_AUTOGRAD["unified_triplet_loss"] = (_unified_backward, _unified_setup)


# ---------------------------------------------------------------- batch_hard_triplet_loss


def batch_hard_triplet_loss(
    x: Tensor,
    labels: Tensor,
    *,
    margin: float = defaults.BATCH_HARD_MARGIN,
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
        margin (float): finite and >= 0; unused with soft_margin.
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
    loss, _, _, pos_idx, neg_idx, _, _ = _OPS.batch_hard_triplet_loss.default(
        x, labels, margin, metric, soft_margin, reduction, _wants_grad(x))
    return (loss, pos_idx, neg_idx) if return_indices else loss


@_fake("batch_hard_triplet_loss")
def _batch_hard_fake(x, labels, margin, metric, soft_margin, reduction, grad_x):
    n = x.size(0)
    index = x.new_empty(n, dtype=torch.long)
    dist = x.new_empty(n, dtype=_acc_dtype(x.dtype))
    return (_loss_like(x, reduction), _grad_like(x, reduction != "none" and grad_x, x),
            x.new_empty(n, dtype=torch.bool), index, torch.empty_like(index), dist, torch.empty_like(dist))


@_fake("_batch_hard_triplet_loss_backward")
def _batch_hard_backward_fake(grad_loss, x, pos_idx, neg_idx, dist_ap, dist_an, margin, metric, soft_margin,
                              reduction):
    return x.new_empty(x.shape)


def _batch_hard_setup(ctx, inputs, output):
    x, _labels, margin, metric, soft_margin, reduction, grad_x = inputs
    _, saved_grad_x, valid, pos_idx, neg_idx, dist_ap, dist_an = output
    ctx.mark_non_differentiable(saved_grad_x, valid, pos_idx, neg_idx, dist_ap, dist_an)
    ctx.in_forward = reduction != "none" and _computed(grad_x, x)
    if ctx.in_forward:
        ctx.save_for_backward(saved_grad_x)
        return
    ctx.margin, ctx.metric, ctx.soft_margin, ctx.reduction = margin, metric, soft_margin, reduction
    ctx.save_for_backward(x, pos_idx, neg_idx, dist_ap, dist_an)


def _batch_hard_backward(ops, ctx, grad_loss, *_unused):
    _no_double_backward("batch_hard_triplet_loss")
    if ctx.in_forward:
        (grad_x,) = ctx.saved_tensors
        return (grad_loss * grad_x,) + (None,) * 6
    x, pos_idx, neg_idx, dist_ap, dist_an = ctx.saved_tensors
    grad_x = ops._batch_hard_triplet_loss_backward.default(
        grad_loss, x, pos_idx, neg_idx, dist_ap, dist_an, ctx.margin, ctx.metric, ctx.soft_margin, ctx.reduction
    )
    return (grad_x,) + (None,) * 6


_AUTOGRAD["batch_hard_triplet_loss"] = (_batch_hard_backward, _batch_hard_setup)


# ---------------------------------------------------------------- modality_centers


def modality_centers(
    x: Tensor, labels: Tensor, modalities: Tensor, *, normalize: bool = True
) -> Tuple[Tensor, Tensor, Tensor]:
    """One center per distinct (label, modality) pair: the mean of its L2-normalized features.

    c_g = (1 / |g|) * sum_{i in g} x_i / max(|x_i|, 1e-12)   (raw x_i with normalize=False)

    Deterministic: on CPU (whatever the number of threads) and on CUDA alike, the same inputs give
    bitwise the same centers and gradients on every run (each center sums its rows in index order;
    no floating-point atomics). CPU and CUDA results may differ from each other by rounding.

    The number of centers G depends on the data, so finding the pairs waits for the device on
    CUDA (the one host synchronisation). The fused op behind it takes the group ids and G and
    does not synchronise: when they are known in advance, call
    ``torch.ops.reid_ext.modality_centers(x, group, G, normalize)`` directly; it returns
    (centers, counts).

    Args:
        x (Tensor[N, D]): features.
        labels (Tensor[N]): integer identities.
        modalities (Tensor[N]): integer modalities (e.g. 0 = visible, 1 = infrared).
        normalize (bool): average the L2-normalized features (True) or the raw ones.

    Returns:
        centers (Tensor[G, D]), center_labels (Tensor[G]), center_modalities (Tensor[G]), ordered
        by (label, modality).
    """
    torch.ops.reid_ext._check_modality_centers.default(x, labels, modalities)
    group, center_labels, center_modalities = _OPS._modality_groups.default(labels, modalities)
    centers, _ = _OPS.modality_centers.default(x, group, center_labels.size(0), normalize)
    return centers, center_labels, center_modalities


@_fake("_modality_groups")
def _groups_fake(labels, modalities):
    groups = torch.library.get_ctx().new_dynamic_size()
    return labels.new_empty(labels.shape, dtype=torch.long), labels.new_empty(groups), modalities.new_empty(groups)


@_fake("modality_centers")
def _centers_fake(x, group, num_groups, normalize):
    return x.new_empty(num_groups, x.size(1)), x.new_empty(num_groups, dtype=torch.long)


@_fake("_modality_centers_backward")
def _centers_backward_fake(grad_centers, x, group, counts, normalize):
    return x.new_empty(x.shape)


def _centers_setup(ctx, inputs, output):
    x, group, _num_groups, normalize = inputs
    _, counts = output
    ctx.mark_non_differentiable(counts)
    ctx.normalize = normalize
    ctx.save_for_backward(x, group, counts)


def _centers_backward(ops, ctx, grad_centers, _grad_counts):
    _no_double_backward("modality_centers")
    x, group, counts = ctx.saved_tensors
    grad_x = ops._modality_centers_backward.default(grad_centers, x, group, counts, ctx.normalize)
    return grad_x, None, None, None


_AUTOGRAD["modality_centers"] = (_centers_backward, _centers_setup)


# ---------------------------------------------------------------- hetero_center_triplet_loss


def hetero_center_triplet_loss(
    x: Tensor,
    labels: Tensor,
    modalities: Tensor,
    *,
    mining: str = "all",
    gamma: float = defaults.UNIFIED_GAMMA,
    margin: Optional[float] = None,
    reduction: str = "mean",
) -> Tensor:
    """Triplet loss over the modality centers of the batch (one per (label, modality) pair).

    The positive of a center is the same identity's center in another modality; its negatives
    are the centers of every other identity, in every modality (the hetero-center triplet loss
    of Liu et al., which UBAT rewrites in batch-all form).

    mining="all" (UBAT's batch-all hetero-center loss): over modality_centers(normalize=True),
    every (positive, negative) pair of a center, margin default 0.25:
        L_g = log(1 + sum_{n: y_n != y_g} sum_{p != g: y_p = y_g} exp(gamma*(S_gn - S_gp + margin)))
            = softplus(LSE_n gamma*(S_gn + margin) + LSE_p (-gamma*S_gp)),
    i.e. unified_triplet_loss(mode="all") over the centers: a center's only same-label
    partners are its other-modality centers.
    mining="hard" (hetero-center triplet loss): batch_hard_triplet_loss (euclidean) over
    modality_centers(normalize=False), margin default 0.3:
        L_g = relu(max_p |c_g - c_p| - min_n |c_g - c_n| + margin).

    An identity seen in one modality only has a center without a cross-modal positive: an
    invalid anchor, which contributes 0. Finding the centers synchronises with the device once
    (see modality_centers). With a scalar reduction this is one op (centers, loss and gradient);
    reduction="none" composes modality_centers and the per-center loss.

    Args:
        x (Tensor[N, D]): features.
        labels (Tensor[N]): integer identities.
        modalities (Tensor[N]): integer modalities.
        mining (str): "all" or "hard".
        gamma (float): scale of mining="all", finite and > 0.
        margin (float, optional): None for the default of the mining.
        reduction (str): "mean" (over valid centers), "sum" or "none" (Tensor[G], per center).

    Returns:
        Tensor[] or Tensor[G] with reduction="none".
    """
    if margin is None:
        margin = defaults.hetero_center_margin(mining)
    if reduction != "none":
        return _OPS.hetero_center_triplet_loss.default(
            x, labels, modalities, mining, gamma, margin, reduction, _wants_grad(x))[0]
    torch.ops.reid_ext._check_hetero_center_triplet_loss.default(x, labels, modalities, mining, gamma, margin, reduction)
    centers, center_labels, _ = modality_centers(x, labels, modalities, normalize=mining == "all")
    if mining == "all":
        return unified_triplet_loss(centers, center_labels, gamma=gamma, margin=margin, reduction="none")
    return batch_hard_triplet_loss(centers, center_labels, margin=margin, metric="euclidean", reduction="none")


@_fake("hetero_center_triplet_loss")
def _hetero_fake(x, labels, modalities, mining, gamma, margin, reduction, grad_x):
    return x.new_empty(()), _grad_like(x, grad_x, x)


def _hetero_setup(ctx, inputs, output):
    _, grad_x = output
    ctx.mark_non_differentiable(grad_x)
    ctx.computed = inputs[-1]
    ctx.save_for_backward(grad_x)


def _hetero_backward(ops, ctx, grad_loss, _grad_x):
    _no_double_backward("hetero_center_triplet_loss")
    (grad_x,) = ctx.saved_tensors
    if not ctx.computed:
        raise RuntimeError("hetero_center_triplet_loss computes its gradient in the forward: call it with grad_x=True")
    return (grad_loss * grad_x,) + (None,) * 7


_AUTOGRAD["hetero_center_triplet_loss"] = (_hetero_backward, _hetero_setup)


# ---------------------------------------------------------------- cosine_softmax_loss


def cosine_softmax_loss(
    x: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    scale: float = defaults.COSINE_SOFTMAX_SCALE,
    margin: float = defaults.COSINE_SOFTMAX_MARGIN,
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
        scale (float): finite and > 0.
        margin (float): finite additive margin on the target cosine.
        label_smoothing (float): in [0, 1).
        reduction (str): "mean" (over the N anchors), "sum" or "none".

    Returns:
        Tensor[] or Tensor[N] with reduction="none".
    """
    return _OPS.cosine_softmax_loss.default(
        x, weight, labels, scale, margin, label_smoothing, reduction, _wants_grad(x), _wants_grad(weight))[0]


@_fake("cosine_softmax_loss")
def _cosine_softmax_fake(x, weight, labels, scale, margin, label_smoothing, reduction, grad_x, grad_weight):
    scalar = reduction != "none"
    return (_loss_like(x, reduction), _grad_like(x, scalar and grad_x, x), _grad_like(weight, scalar and grad_weight, x),
            x.new_empty(x.size(0), dtype=_acc_dtype(x.dtype)))


@_fake("_cosine_softmax_loss_backward")
def _cosine_softmax_backward_fake(grad_loss, x, weight, labels, lse, scale, margin, label_smoothing, reduction,
                                  grad_x, grad_weight):
    return _grad_like(x, grad_x, x), _grad_like(weight, grad_weight, x)


def _cosine_softmax_setup(ctx, inputs, output):
    x, weight, labels, scale, margin, label_smoothing, reduction, grad_x, grad_weight = inputs
    _, saved_grad_x, saved_grad_weight, lse = output
    ctx.mark_non_differentiable(saved_grad_x, saved_grad_weight, lse)
    ctx.in_forward = reduction != "none" and _computed(grad_x, x) and _computed(grad_weight, weight)
    if ctx.in_forward:
        ctx.save_for_backward(saved_grad_x, saved_grad_weight)
        return
    ctx.scale, ctx.margin, ctx.label_smoothing, ctx.reduction = scale, margin, label_smoothing, reduction
    ctx.save_for_backward(x, weight, labels, lse)


def _cosine_softmax_backward(ops, ctx, grad_loss, *_unused):
    _no_double_backward("cosine_softmax_loss")
    want_x, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if ctx.in_forward:
        grad_x, grad_weight = ctx.saved_tensors
        return (_scaled(grad_loss, grad_x, want_x), _scaled(grad_loss, grad_weight, want_weight)) + (None,) * 7
    x, weight, labels, lse = ctx.saved_tensors
    grad_x, grad_weight = ops._cosine_softmax_loss_backward.default(
        grad_loss, x, weight, labels, lse, ctx.scale, ctx.margin, ctx.label_smoothing, ctx.reduction, want_x,
        want_weight,
    )
    return (grad_x if want_x else None, grad_weight if want_weight else None) + (None,) * 7


_AUTOGRAD["cosine_softmax_loss"] = (_cosine_softmax_backward, _cosine_softmax_setup)


# ---------------------------------------------------------------- topk_similarity


class TopKSimilarity(NamedTuple):
    """What topk_similarity returns (see there)."""

    values: Tensor
    indices: Tensor
    far: Tensor


def topk_similarity(
    x: Tensor, y: Optional[Tensor] = None, *, k: int, largest: bool = True, eps: float = defaults.NORM_EPS
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
        eps (float): lower bound of the norms, finite and > 0.

    Returns:
        TopKSimilarity(values, indices, far): values (Tensor[N, k]), indices (int64 Tensor[N, k])
        into the rows of y, and far (Tensor[N]), the row's similarity at the other end of the
        order over all M columns: its minimum with largest=True (1 - far is the row's largest
        cosine distance), its maximum otherwise.
    """
    return TopKSimilarity(*_OPS.topk_similarity.default(x, y, k, largest, eps))


@_fake("topk_similarity")
def _topk_similarity_fake(x, y, k, largest, eps):
    n = x.size(0)
    return x.new_empty(n, k), x.new_empty(n, k, dtype=torch.long), x.new_empty(n)


def _topk_similarity_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _topk_similarity_backward(ops, ctx, *grads):
    raise RuntimeError("reid_ext.topk_similarity is not differentiable")


_AUTOGRAD["topk_similarity"] = (_topk_similarity_backward, _topk_similarity_setup)


@_fake("_jaccard_distance")
def _jaccard_distance_fake(rows, cols, vals, ranks, num_query, k2):
    return vals.new_empty(num_query, ranks.size(0) - num_query)


# ---------------------------------------------------------------- registration


def _register(namespace: str) -> None:
    """Registers the fake kernels and the autograd of every op of `namespace` (which has the
    schemas of csrc/schemas.h); each backward calls the backward op of its forward's namespace."""
    ops = getattr(torch.ops, namespace)
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"{namespace}::{name}", fake)

    def bound(backward):
        def backward_in_namespace(ctx, *grads):
            return backward(ops, ctx, *grads)

        return backward_in_namespace

    for name, (backward, setup) in _AUTOGRAD.items():
        torch.library.register_autograd(f"{namespace}::{name}", bound(backward), setup_context=setup)


def _register_checks() -> None:
    """The _check_* ops (reid_ext.reference's argument checks) have no outputs to fake."""
    for name in ("cosine_similarity", "unified_triplet_loss", "batch_hard_triplet_loss", "modality_centers",
                 "hetero_center_triplet_loss", "cosine_softmax_loss"):
        torch.library.register_fake(f"reid_ext::_check_{name}", lambda *args: None)


@contextlib.contextmanager
def _calling(namespace: str):
    """Within it, the public functions call the ops of `namespace` (tools/cudasim: the
    emulated CUDA build, on CPU tensors)."""
    global _OPS
    saved = _OPS
    _OPS = getattr(torch.ops, namespace)
    try:
        yield
    finally:
        _OPS = saved


_register("reid_ext")
_register_checks()
