"""nn.Module losses over the fused ops, called as loss_fn(embeddings, labels, ...)."""
from typing import Optional

import torch
from torch import Tensor, nn

from . import ops

__all__ = ["UnifiedTripletLoss"]


class UnifiedTripletLoss(nn.Module):
    """Unified batch-all triplet loss (UBAT); see reid_ext.unified_triplet_loss.

    L_i = softplus(LSE_{n in neg(i)} gamma*(S_in + margin) + LSE_{p in pos(i)} (-gamma*S_ip)).

    Example:
        >>> loss_fn = UnifiedTripletLoss(gamma=64.0, margin=0.25)
        >>> loss = loss_fn(embeddings, labels)                        # batch against itself
        >>> loss = loss_fn(embeddings, labels, ref=bank, ref_labels=bank_labels)  # against a memory bank
    """

    def __init__(self, gamma: float = 64.0, margin: float = 0.25, mode: str = "all", reduction: str = "mean"):
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
