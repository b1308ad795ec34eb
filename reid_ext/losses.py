"""nn.Module losses over the fused ops, called as loss_fn(embeddings, labels, ...)."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import defaults, ops

__all__ = [
    "UnifiedTripletLoss", "BatchHardTripletLoss", "HeteroCenterTripletLoss", "CosineSoftmaxLoss", "SoftmaxLoss",
]


class UnifiedTripletLoss(nn.Module):
    """Unified batch-all triplet loss (UBAT); see reid_ext.unified_triplet_loss.

    L_i = softplus(LSE_{n in neg(i)} gamma*(S_in + margin) + LSE_{p in pos(i)} (-gamma*S_ip)).

    Example:
        >>> loss_fn = UnifiedTripletLoss(gamma=64.0, margin=0.25)
        >>> loss = loss_fn(embeddings, labels)                        # batch against itself
        >>> loss = loss_fn(embeddings, labels, ref=bank, ref_labels=bank_labels)  # against a memory bank
    """

    def __init__(self, gamma: float = defaults.UNIFIED_GAMMA, margin: float = defaults.UNIFIED_MARGIN, mode: str = "all",
                 reduction: str = "mean"):
        super().__init__()
        self.gamma, self.margin, self.mode, self.reduction = gamma, margin, mode, reduction

    def forward(
        self,
        x: Tensor,
        labels: Tensor,
        modalities: Optional[Tensor] = None,
        ref: Optional[Tensor] = None,
        ref_labels: Optional[Tensor] = None,
        ref_modalities: Optional[Tensor] = None,
    ) -> Tensor:
        return ops.unified_triplet_loss(
            x, labels, gamma=self.gamma, margin=self.margin, modalities=modalities, mode=self.mode,
            ref=ref, ref_labels=ref_labels, ref_modalities=ref_modalities, reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, margin={self.margin}, mode={self.mode!r}, reduction={self.reduction!r}"


class BatchHardTripletLoss(nn.Module):
    """Batch-hard triplet loss; see reid_ext.batch_hard_triplet_loss.

    L_i = relu(max_{p in pos(i)} d_ip - min_{n in neg(i)} d_in + margin)   (softplus(d_ap - d_an) with soft_margin)

    Example:
        >>> loss_fn = BatchHardTripletLoss(margin=0.3)          # euclidean, as in MGN
        >>> loss = loss_fn(embeddings, labels)
    """

    def __init__(self, margin: float = defaults.BATCH_HARD_MARGIN, metric: str = defaults.BATCH_HARD_METRIC,
                 soft_margin: bool = False,
                 reduction: str = "mean"):
        super().__init__()
        self.margin, self.metric, self.soft_margin, self.reduction = margin, metric, soft_margin, reduction

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        return ops.batch_hard_triplet_loss(
            x, labels, margin=self.margin, metric=self.metric, soft_margin=self.soft_margin, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, metric={self.metric!r}, soft_margin={self.soft_margin}, "
                f"reduction={self.reduction!r}")


class HeteroCenterTripletLoss(nn.Module):
    """Triplet loss over the (label, modality) centers of a batch; see reid_ext.hetero_center_triplet_loss.

    The positive of a center is the same identity's center in another modality, its negatives the
    other identities' centers in every modality.
    mining="all" (UBAT): L_g = softplus(LSE_n gamma*(S_gn + margin) + LSE_p (-gamma*S_gp)) over the
    normalized centers, i.e. the unified batch-all loss (mode "all") over them;
    mining="hard" (Liu et al.): batch-hard euclidean loss over the raw centers.

    Example:
        >>> loss_fn = HeteroCenterTripletLoss(mining="all", gamma=64.0)
        >>> loss = loss_fn(embeddings, labels, modalities)     # modalities: 0 = visible, 1 = infrared
    """

    def __init__(self, mining: str = "all", gamma: float = defaults.UNIFIED_GAMMA, margin: Optional[float] = None,
                 reduction: str = "mean"):
        super().__init__()
        self.mining, self.gamma, self.margin, self.reduction = mining, gamma, margin, reduction

    def forward(self, x: Tensor, labels: Tensor, modalities: Tensor) -> Tensor:
        return ops.hetero_center_triplet_loss(
            x, labels, modalities, mining=self.mining, gamma=self.gamma, margin=self.margin, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return f"mining={self.mining!r}, gamma={self.gamma}, margin={self.margin}, reduction={self.reduction!r}"


class _ClassifierLoss(nn.Module):
    """A classification loss that owns its bias-free class weights, Tensor[num_classes, dim].

    They start as N(0, defaults.CLASSIFIER_INIT_STD^2) rows: small random directions start every
    class near cosine 0 with each sample, so the first steps are not dominated by an arbitrary class.
    """

    def __init__(self, num_classes: int, dim: int, label_smoothing: float, reduction: str, device, dtype):
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be >= 1, got {num_classes} and {dim}")
        self.num_classes, self.dim = num_classes, dim
        self.label_smoothing, self.reduction = label_smoothing, reduction
        self.weight = nn.Parameter(torch.empty(num_classes, dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=defaults.CLASSIFIER_INIT_STD)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, dim={self.dim}, label_smoothing={self.label_smoothing}, "
                f"reduction={self.reduction!r}")


class SoftmaxLoss(_ClassifierLoss):
    """Softmax cross-entropy of a linear bias-free classifier that owns its class weights (MGN's identity loss).

    L_i = CE(x_i W^T, label_i) (with label smoothing), W (Tensor[num_classes, dim]).

    Example:
        >>> loss_fn = SoftmaxLoss(num_classes=751, dim=2048)
        >>> loss = loss_fn(embeddings, labels)                  # labels in [0, 751)
    """

    def __init__(self, num_classes: int, dim: int, label_smoothing: float = 0.0, reduction: str = "mean",
                 device=None, dtype=None):
        super().__init__(num_classes, dim, label_smoothing, reduction, device, dtype)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(F.linear(x, self.weight), labels, reduction=self.reduction,
                               label_smoothing=self.label_smoothing)


class CosineSoftmaxLoss(_ClassifierLoss):
    """Cosine-softmax (CosFace / AM-softmax) classification loss that owns its class weights; see
    reid_ext.cosine_softmax_loss.

    z_ic = scale * (cos(x_i, weight_c) - margin * [c == label_i]), cross-entropy over z (with label smoothing).
    Only the weights' directions matter (the logits normalize them).

    Example:
        >>> loss_fn = CosineSoftmaxLoss(num_classes=751, dim=2048, scale=64.0, margin=0.35)
        >>> loss = loss_fn(embeddings, labels)                  # labels in [0, 751)
        >>> optimizer = torch.optim.SGD(list(model.parameters()) + list(loss_fn.parameters()), lr=0.01)
    """

    def __init__(self, num_classes: int, dim: int, scale: float = defaults.COSINE_SOFTMAX_SCALE,
                 margin: float = defaults.COSINE_SOFTMAX_MARGIN, label_smoothing: float = 0.0, reduction: str = "mean",
                 device=None, dtype=None):
        super().__init__(num_classes, dim, label_smoothing, reduction, device, dtype)
        self.scale, self.margin = scale, margin

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        return ops.cosine_softmax_loss(
            x, self.weight, labels, scale=self.scale, margin=self.margin, label_smoothing=self.label_smoothing,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return f"scale={self.scale}, margin={self.margin}, " + super().extra_repr()
