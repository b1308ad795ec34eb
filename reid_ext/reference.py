"""Plain-PyTorch implementations of every reid-ext op, with the same signatures.

They build the full N x M similarity matrix and its masks, as
pytorch-metric-learning, fast-reid and torchreid do. They are the ground truth
of the tests, the "eager" column of the benchmark, and readable documentation
of the math. Arithmetic happens in the input dtype, any floating one. Their
arguments are checked by the fused ops' own checks (the _check_* ops), so both
raise the same errors.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import defaults

_check = torch.ops.reid_ext


__all__ = [
    "cosine_similarity",
    "unified_triplet_loss",
    "batch_hard_triplet_loss",
    "modality_centers",
    "hetero_center_triplet_loss",
    "cosine_softmax_loss",
]


def _reduce(loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sum over anchors, or that sum over max(#valid, 1)."""
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / valid.sum().clamp_min(1).to(total.dtype)


def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(eps)


def cosine_similarity(
    x: torch.Tensor, y: Optional[torch.Tensor] = None, eps: float = defaults.NORM_EPS
) -> torch.Tensor:
    """S (Tensor[N, M]) = <x_i, y_j> / (max(|x_i|, eps) * max(|y_j|, eps)); y=None means y = x."""
    _check._check_cosine_similarity.default(x, y, eps)
    xn = _normalize(x, eps)
    yn = xn if y is None else _normalize(y, eps)
    return xn @ yn.t()


def _pair_masks(labels, modalities, mode, ref_labels, ref_modalities, self_ref):
    same = labels[:, None] == ref_labels[None, :]
    allowed = torch.ones_like(same)
    if mode == "cross":
        allowed = modalities[:, None] != ref_modalities[None, :]
    elif mode == "intra":
        allowed = modalities[:, None] == ref_modalities[None, :]
    if self_ref:
        allowed = allowed & ~torch.eye(same.size(0), dtype=torch.bool, device=same.device)
    return same & allowed, ~same & allowed


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)), exact at every x, as the fused ops compute it (F.softplus returns x
    itself beyond its threshold of 20, an error of up to exp(-20) = 2e-9)."""
    return torch.logaddexp(x, torch.zeros_like(x))


def _invalid_anchor_loss(x: torch.Tensor, *stats: torch.Tensor) -> torch.Tensor:
    """The loss of an anchor without a positive or a negative: 0, unless a NaN reached it, from
    its own feature row or from a paired reference through its statistics (NaN never vanishes)."""
    nan = x.isnan().any(dim=1)
    for stat in stats:
        nan = nan | stat.isnan()
    return torch.where(nan, float("nan"), 0.0).to(x.dtype)


def _masked_logsumexp(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Rows without any entry get a finite dummy, so that backward never sees
    # exp(-inf - -inf); the caller replaces those rows' losses by _invalid_anchor_loss.
    has_any = mask.any(dim=1, keepdim=True)
    filled = torch.where(mask, values, torch.where(has_any, float("-inf"), 0.0))
    return torch.logsumexp(filled, dim=1)


def unified_triplet_loss(
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    gamma: float = defaults.UNIFIED_GAMMA,
    margin: float = defaults.UNIFIED_MARGIN,
    modalities: Optional[torch.Tensor] = None,
    mode: str = "all",
    ref: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    ref_modalities: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """L_i = softplus(LSE_{n in neg(i)} gamma*(S_in + margin) + LSE_{p in pos(i)} (-gamma*S_ip))."""
    _check._check_unified_triplet_loss.default(x, labels, modalities, ref, ref_labels, ref_modalities, gamma, margin,
                                               mode, reduction)
    self_ref = ref is None
    if self_ref:
        ref, ref_labels, ref_modalities = x, labels, modalities
    sim = cosine_similarity(x, ref)
    pos, neg = _pair_masks(labels, modalities, mode, ref_labels, ref_modalities, self_ref)
    lse_neg = _masked_logsumexp(gamma * (sim + margin), neg)
    lse_pos = _masked_logsumexp(-gamma * sim, pos)
    valid = pos.any(dim=1) & neg.any(dim=1)
    loss = torch.where(valid, _softplus(lse_neg + lse_pos), _invalid_anchor_loss(x, lse_neg, lse_pos))
    return _reduce(loss, valid, reduction)


def _distances(x: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "cosine":
        return 1.0 - cosine_similarity(x)
    sq = (x * x).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.t())).clamp_min(0.0)
    if metric == "sqeuclidean":
        return d2
    return d2.clamp_min(1e-12).sqrt()


def _first_index_of(values: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    n = values.size(1)
    cols = torch.arange(n, device=values.device).expand_as(values)
    # A NaN target (torch.max/min propagate NaN) is the first NaN candidate, so the NaN reaches
    # the loss of every anchor that has one among its candidates.
    hit = mask & ((values == target[:, None]) | (values.isnan() & target.isnan()[:, None]))
    return torch.where(hit, cols, n).min(dim=1).values


def batch_hard_triplet_loss(
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = defaults.BATCH_HARD_MARGIN,
    metric: str = "euclidean",
    soft_margin: bool = False,
    reduction: str = "mean",
    return_indices: bool = False,
):
    """L_i = relu(max_{p in pos(i)} d_ip - min_{n in neg(i)} d_in + margin) (softplus(d_ap - d_an) with soft_margin)."""
    _check._check_batch_hard_triplet_loss.default(x, labels, margin, metric, reduction)
    n = x.size(0)
    if n == 0:  # max/min below cannot reduce over an empty row
        loss = _reduce(x.sum(dim=1), torch.zeros(0, dtype=torch.bool, device=x.device), reduction)
        none = torch.zeros(0, dtype=torch.long, device=x.device)
        return (loss, none, none) if return_indices else loss
    dist = _distances(x, metric)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    pos, neg = same & ~eye, ~same
    has_pos, has_neg = pos.any(dim=1), neg.any(dim=1)
    valid = has_pos & has_neg
    with torch.no_grad():
        # Indices from detached values; ties go to the lowest index.
        d = dist.detach()
        hardest_pos = torch.where(pos, d, float("-inf")).max(dim=1).values
        hardest_neg = torch.where(neg, d, float("inf")).min(dim=1).values
        pos_idx = torch.where(has_pos, _first_index_of(d, hardest_pos, pos), -1)
        neg_idx = torch.where(has_neg, _first_index_of(d, hardest_neg, neg), -1)
    d_ap = dist.gather(1, pos_idx.clamp_min(0)[:, None]).squeeze(1)
    d_an = dist.gather(1, neg_idx.clamp_min(0)[:, None]).squeeze(1)
    diff = d_ap - d_an
    per_anchor = _softplus(diff) if soft_margin else F.relu(diff + margin)
    # The distances that exist (d_ap, d_an gather column 0 where they do not).
    no_dist = torch.zeros_like(d_ap)
    invalid = _invalid_anchor_loss(x, torch.where(has_pos, d_ap, no_dist), torch.where(has_neg, d_an, no_dist))
    loss = torch.where(valid, per_anchor, invalid)
    loss = _reduce(loss, valid, reduction)
    if return_indices:
        return loss, pos_idx, neg_idx
    return loss


def modality_centers(
    x: torch.Tensor, labels: torch.Tensor, modalities: torch.Tensor, *, normalize: bool = True
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """centers (Tensor[G, D]): mean of (L2-normalized) x over each distinct (label, modality), in that order."""
    _check._check_modality_centers.default(x, labels, modalities)
    feats = _normalize(x, 1e-12) if normalize else x
    keys = torch.stack([labels.long(), modalities.long()], dim=1)
    uniq, group = torch.unique(keys, dim=0, return_inverse=True)
    # [N, G]; a comparison rather than F.one_hot, which rejects an empty batch.
    one_hot = (group[:, None] == torch.arange(uniq.size(0), device=x.device)[None, :]).to(feats.dtype)
    counts = one_hot.sum(dim=0)
    centers = (one_hot.t() @ feats) / counts[:, None]
    return centers, uniq[:, 0].to(labels.dtype), uniq[:, 1].to(modalities.dtype)


def hetero_center_triplet_loss(
    x: torch.Tensor,
    labels: torch.Tensor,
    modalities: torch.Tensor,
    *,
    mining: str = "all",
    gamma: float = defaults.UNIFIED_GAMMA,
    margin: Optional[float] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Over the centers g: "all" L_g = log(1 + sum_{n: y_n != y_g} sum_{p != g: y_p = y_g} exp(gamma*(S_gn - S_gp + m)))
    on normalized centers (unified_triplet_loss, mode "all"); "hard" batch-hard euclidean over the raw centers."""
    if margin is None:
        margin = defaults.hetero_center_margin(mining)
    _check._check_hetero_center_triplet_loss.default(x, labels, modalities, mining, gamma, margin, reduction)
    if mining == "all":
        # Mode "all": a center's only same-label partners are its other-modality centers, and its
        # negatives are the other identities' centers in every modality.
        centers, c_labels, _ = modality_centers(x, labels, modalities, normalize=True)
        return unified_triplet_loss(centers, c_labels, gamma=gamma, margin=margin, reduction=reduction)
    centers, c_labels, _ = modality_centers(x, labels, modalities, normalize=False)
    return batch_hard_triplet_loss(centers, c_labels, margin=margin, metric="euclidean", reduction=reduction)


def cosine_softmax_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    scale: float = defaults.COSINE_SOFTMAX_SCALE,
    margin: float = defaults.COSINE_SOFTMAX_MARGIN,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy over logits scale * (cos(x_i, weight_c) - margin * [c == label_i]), weight: Tensor[C, D]."""
    _check._check_cosine_softmax_loss.default(x, weight, labels, scale, margin, label_smoothing, reduction)
    cos = cosine_similarity(x, weight)
    target = F.one_hot(labels.long(), weight.size(0)).to(cos.dtype)
    logits = scale * (cos - margin * target)
    if reduction != "mean":
        return F.cross_entropy(logits, labels.long(), label_smoothing=label_smoothing, reduction=reduction)
    # Sum over max(N, 1), so that an empty batch gives 0 rather than 0/0.
    total = F.cross_entropy(logits, labels.long(), label_smoothing=label_smoothing, reduction="sum")
    return total / max(x.size(0), 1)
