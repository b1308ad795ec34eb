"""Loss recipes: compositions of the reid_ext.losses modules for a model whose output has
``id_features`` (the classifiers' inputs) and ``metric_features`` (the metric losses' inputs), as
MGNOutput and UBATOutput have. A recipe owns its classifiers' weights, one per identity feature.

* "mgn" (Wang et al. 2018): softmax cross-entropy on each identity feature, plus
  batch-hard triplet loss (Euclidean, margin 1.2) on each metric feature. On
  MGN: softmax on the 3 pooled whole-map features (2048-d) and on the 5 reduced
  stripe features (256-d), triplet on the 3 reduced whole-map features (256-d):

      L = 1/8 sum_{k=1..8} CE(W_k f_k, y) + 1/3 sum_{b=1..3} L_bh(r_b),
      L_bh(r) = 1/N sum_i relu(max_p |r_i - r_p| - min_n |r_i - r_n| + 1.2).

* "ubat" (Li, Qi, Chen and Zhou, IJCNN 2021, arXiv 2103.04607): the same
  placement with cosine softmax where MGN has softmax, the unified batch-all
  triplet loss and, when the batch holds two modalities, the batch-all
  hetero-center triplet loss on the metric features:

      L = 1/K sum_k L_cos(f_k) + 1/B sum_b (L_ubat(r_b) + L_hc(r_b)),
      L_cos(f_i) = CE(s * (cos(f_i, W_c) - m [c = y_i])),
      L_ubat(r_i) = softplus(LSE_n gamma*(S_in + margin) + LSE_p (-gamma*S_ip)),
      L_hc: L_ubat over the (identity, modality) centers (reid_ext.hetero_center_triplet_loss).

  On the UBAT network every term takes its one embedding.

Each term is averaged over its features; the total is id_weight * id term +
metric_weight * metric terms. Losses run in float32 whatever the autocast
dtype of the model. ``gather`` (optional, e.g. ``reid_ext.gather_batch``)
all-gathers the metric losses' inputs across ranks, so that triplets are mined
over the global batch.
"""
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import defaults
from .losses import (
    BatchHardTripletLoss,
    CosineSoftmaxLoss,
    HeteroCenterTripletLoss,
    SoftmaxLoss,
    UnifiedTripletLoss,
)

__all__ = ["MGNLoss", "UBATLoss", "RECIPES", "build_recipe", "Gather"]

# (features, labels, modalities or None) -> the same, concatenated over ranks.
Gather = Callable[
    [torch.Tensor, torch.Tensor, Optional[torch.Tensor]],
    Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]],
]


class _Recipe(nn.Module):
    """What both recipes share: the classifiers over the identity features and the weighted total.

    forward(output, labels, modalities=None, gather=None) -> (total loss, {term name: detached value}).
    """

    def __init__(self, classifiers: List[nn.Module], id_weight: float, metric_weight: float):
        super().__init__()
        self.classifiers = nn.ModuleList(classifiers)
        self.id_weight = id_weight
        self.metric_weight = metric_weight

    def forward(
        self,
        output,
        labels: torch.Tensor,
        modalities: Optional[torch.Tensor] = None,
        gather: Optional[Gather] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if len(output.id_features) != len(self.classifiers):
            raise ValueError(
                f"the recipe has {len(self.classifiers)} classifiers but the output has "
                f"{len(output.id_features)} identity features"
            )
        id_loss = torch.stack([c(f.float(), labels) for c, f in zip(self.classifiers, output.id_features)]).mean()
        metric_inputs = (
            gather(z.float(), labels, modalities) if gather is not None else (z.float(), labels, modalities)
            for z in output.metric_features
        )
        metric, parts = self.metric_terms(metric_inputs, modalities)
        total = self.id_weight * id_loss + self.metric_weight * metric
        return total, {"id": id_loss.detach(), **{k: v.detach() for k, v in parts.items()}}

    def metric_terms(
        self, inputs: Iterator[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]], modalities
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(the metric losses' sum, {term name: value}) over the (features, labels, modalities) of each metric feature."""
        raise NotImplementedError


class MGNLoss(_Recipe):
    """The MGN paper's loss: mean softmax cross-entropy over the identity features + mean batch-hard
    triplet (Euclidean) over the metric features.

    Args:
        num_classes: training identities.
        id_dims: the size of each identity feature, in the output's order (the model's ``id_feature_dims``).
    """

    def __init__(self, num_classes: int, id_dims: Sequence[int], margin: float = defaults.MGN_TRIPLET_MARGIN,
                 id_weight: float = 1.0, metric_weight: float = 1.0):
        super().__init__([SoftmaxLoss(num_classes, d) for d in id_dims], id_weight, metric_weight)
        self.triplet = BatchHardTripletLoss(margin=margin, metric="euclidean")

    def metric_terms(self, inputs, modalities):
        triplet = torch.stack([self.triplet(z, y) for z, y, _ in inputs]).mean()
        return triplet, {"triplet": triplet}


class UBATLoss(_Recipe):
    """UBAT: mean cosine softmax over the identity features + unified batch-all triplet (+ batch-all
    hetero-center) over the metric features.

    The hetero-center term is added for batches with both modalities present (``modalities`` given
    and holding two values). num_classes and id_dims as MGNLoss's; scale and cos_margin are the
    cosine softmax's (defaults.UBAT_COS_SCALE and UBAT_COS_MARGIN train from scratch where
    CosFace's 64 and 0.35 leave low-dimensional features stuck at the loss s * m + log C).
    """

    def __init__(
        self,
        num_classes: int,
        id_dims: Sequence[int],
        scale: float = defaults.UBAT_COS_SCALE,
        cos_margin: float = defaults.UBAT_COS_MARGIN,
        gamma: float = defaults.UNIFIED_GAMMA,
        margin: float = defaults.UNIFIED_MARGIN,
        id_weight: float = 1.0,
        metric_weight: float = 1.0,
    ):
        classifiers = [CosineSoftmaxLoss(num_classes, d, scale=scale, margin=cos_margin) for d in id_dims]
        super().__init__(classifiers, id_weight, metric_weight)
        self.triplet = UnifiedTripletLoss(gamma=gamma, margin=margin)
        self.hetero_center = HeteroCenterTripletLoss(mining="all", gamma=gamma)

    def metric_terms(self, inputs, modalities):
        two_modalities = modalities is not None and bool((modalities != modalities[0]).any())
        triplet, hetero_center = [], []
        for z, y, m in inputs:
            triplet.append(self.triplet(z, y, m))
            if two_modalities:
                hetero_center.append(self.hetero_center(z, y, m))
        metric = torch.stack(triplet).mean()
        parts = {"triplet": metric}
        if hetero_center:
            parts["hetero_center"] = torch.stack(hetero_center).mean()
            metric = metric + parts["hetero_center"]
        return metric, parts


RECIPES = {"mgn": MGNLoss, "ubat": UBATLoss}


def build_recipe(name: str, num_classes: int, id_dims: Sequence[int], **kwargs) -> nn.Module:
    """The loss module of recipe ``name`` ("mgn" or "ubat") with ``num_classes`` identities and one
    classifier per entry of ``id_dims``; keyword arguments go to its class."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(map(repr, RECIPES))}, got {name!r}")
    return RECIPES[name](num_classes, id_dims, **kwargs)
