"""Loss recipes for MGN, with every metric loss computed by reid_ext.

* "mgn" (Wang et al. 2018): softmax cross-entropy on each of the 8 reduced
  features, plus batch-hard triplet loss (Euclidean, margin 1.2) on the 3
  max-pooled whole-map features before reduction (``MGNOutput.global_features``).
* "ubat" (Kim et al., arXiv 2103.04607): cosine softmax on each of the 8
  reduced features, plus the unified batch-all triplet loss on the 3 global
  features and, when the batch holds two modalities, the batch-all
  hetero-center triplet loss on them.

Each term is averaged over its features; the total is id_weight * id term +
metric_weight * metric terms. Losses run in float32 whatever the autocast
dtype of the model. ``gather`` (optional, e.g. ``reid_ext.gather_batch``) all-gathers the metric losses'
inputs across ranks, so that triplets are mined over the global batch.
"""
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import reid_ext

from .mgn import MGNOutput

__all__ = ["MGNLoss", "UBATLoss", "RECIPES", "build_recipe", "Gather"]

# (features, labels, modalities or None) -> the same, concatenated over ranks.
Gather = Callable[
    [torch.Tensor, torch.Tensor, Optional[torch.Tensor]],
    Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]],
]


def _metric_inputs(output: MGNOutput, labels, modalities, gather: Optional[Gather]):
    for z in output.global_features:
        z = z.float()
        yield gather(z, labels, modalities) if gather is not None else (z, labels, modalities)


class MGNLoss(nn.Module):
    """The MGN paper's loss: mean cross-entropy over the 8 classifiers + mean batch-hard triplet over 3."""

    def __init__(self, margin: float = 1.2, id_weight: float = 1.0, metric_weight: float = 1.0):
        super().__init__()
        self.margin = margin
        self.id_weight = id_weight
        self.metric_weight = metric_weight

    def forward(
        self,
        output: MGNOutput,
        classifier_weights: Sequence[torch.Tensor],
        labels: torch.Tensor,
        modalities: Optional[torch.Tensor] = None,
        gather: Optional[Gather] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Returns (total loss, {"id": ..., "triplet": ...}); classifier_weights: 8 x Tensor[C, feat_dim]."""
        ce = torch.stack(
            [F.cross_entropy(F.linear(f.float(), w), labels) for f, w in zip(output.features, classifier_weights)]
        ).mean()
        tri = torch.stack(
            [
                reid_ext.batch_hard_triplet_loss(z, y, margin=self.margin, metric="euclidean")
                for z, y, _ in _metric_inputs(output, labels, modalities, gather)
            ]
        ).mean()
        total = self.id_weight * ce + self.metric_weight * tri
        return total, {"id": ce.detach(), "triplet": tri.detach()}


class UBATLoss(nn.Module):
    """UBAT: mean cosine softmax over the 8 classifiers + unified batch-all triplet (+ hetero-center).

    The hetero-center term is added for batches with both modalities present
    (``modalities`` given and holding two values). The cosine-softmax defaults
    (scale 16, margin 0.2) train from scratch; CosFace's 64 and 0.35 leave
    low-dimensional features stuck at the loss s * m + log C.
    """

    def __init__(
        self,
        scale: float = 16.0,
        cos_margin: float = 0.2,
        gamma: float = 64.0,
        margin: float = 0.25,
        id_weight: float = 1.0,
        metric_weight: float = 1.0,
    ):
        super().__init__()
        self.scale = scale
        self.cos_margin = cos_margin
        self.gamma = gamma
        self.margin = margin
        self.id_weight = id_weight
        self.metric_weight = metric_weight

    def forward(
        self,
        output: MGNOutput,
        classifier_weights: Sequence[torch.Tensor],
        labels: torch.Tensor,
        modalities: Optional[torch.Tensor] = None,
        gather: Optional[Gather] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Returns (total loss, {"id", "triplet"[, "hetero_center"]}); classifier_weights: 8 x Tensor[C, feat_dim]."""
        cls = torch.stack(
            [
                reid_ext.cosine_softmax_loss(f.float(), w, labels, scale=self.scale, margin=self.cos_margin)
                for f, w in zip(output.features, classifier_weights)
            ]
        ).mean()
        tri, hc = [], []
        two_modalities = modalities is not None and bool((modalities != modalities[0]).any())
        for z, y, m in _metric_inputs(output, labels, modalities, gather):
            tri.append(reid_ext.unified_triplet_loss(z, y, gamma=self.gamma, margin=self.margin, modalities=m))
            if two_modalities:
                hc.append(reid_ext.hetero_center_triplet_loss(z, y, m, mining="all", gamma=self.gamma))
        metric = torch.stack(tri).mean()
        parts = {"id": cls.detach(), "triplet": metric.detach()}
        if hc:
            hetero = torch.stack(hc).mean()
            parts["hetero_center"] = hetero.detach()
            metric = metric + hetero
        return self.id_weight * cls + self.metric_weight * metric, parts


RECIPES = {"mgn": MGNLoss, "ubat": UBATLoss}


def build_recipe(name: str, **kwargs) -> nn.Module:
    """The loss module of recipe ``name`` ("mgn" or "ubat"), keyword arguments passed on."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(map(repr, RECIPES))}, got {name!r}")
    return RECIPES[name](**kwargs)
