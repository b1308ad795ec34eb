"""Loss recipes, compositions of reid_ext.losses modules, for any model whose output has
``id_features`` (one per classifier) and ``metric_features`` (MGNOutput, UBATOutput).

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
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import reid_ext
from reid_ext.losses import BatchHardTripletLoss, HeteroCenterTripletLoss, UnifiedTripletLoss

__all__ = ["MGNLoss", "UBATLoss", "RECIPES", "build_recipe", "Gather"]

# (features, labels, modalities or None) -> the same, concatenated over ranks.
Gather = Callable[
    [torch.Tensor, torch.Tensor, Optional[torch.Tensor]],
    Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]],
]


def _metric_inputs(output, labels, modalities, gather: Optional[Gather]):
    for z in output.metric_features:
        z = z.float()
        yield gather(z, labels, modalities) if gather is not None else (z, labels, modalities)


def _check_classifiers(output, classifier_weights: Sequence[torch.Tensor]) -> None:
    if len(classifier_weights) != len(output.id_features):
        raise ValueError(
            f"classifier_weights has {len(classifier_weights)} entries but the output has "
            f"{len(output.id_features)} identity features"
        )


class MGNLoss(nn.Module):
    """The MGN paper's loss: mean softmax cross-entropy over the identity features + mean batch-hard
    triplet (Euclidean) over the metric features."""

    def __init__(self, margin: float = 1.2, id_weight: float = 1.0, metric_weight: float = 1.0):
        super().__init__()
        self.triplet = BatchHardTripletLoss(margin=margin, metric="euclidean")
        self.id_weight = id_weight
        self.metric_weight = metric_weight

    def forward(
        self,
        output,
        classifier_weights: Sequence[torch.Tensor],
        labels: torch.Tensor,
        modalities: Optional[torch.Tensor] = None,
        gather: Optional[Gather] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(total loss, {"id": ..., "triplet": ...}); classifier_weights[k]: Tensor[C, dim of id_features[k]]."""
        _check_classifiers(output, classifier_weights)
        ce = torch.stack(
            [F.cross_entropy(F.linear(f.float(), w), labels) for f, w in zip(output.id_features, classifier_weights)]
        ).mean()
        tri = torch.stack([self.triplet(z, y) for z, y, _ in _metric_inputs(output, labels, modalities, gather)]).mean()
        total = self.id_weight * ce + self.metric_weight * tri
        return total, {"id": ce.detach(), "triplet": tri.detach()}


class UBATLoss(nn.Module):
    """UBAT: mean cosine softmax over the identity features + unified batch-all triplet (+ batch-all
    hetero-center) over the metric features.

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
        self.triplet = UnifiedTripletLoss(gamma=gamma, margin=margin)
        self.hetero_center = HeteroCenterTripletLoss(mining="all", gamma=gamma)
        self.id_weight = id_weight
        self.metric_weight = metric_weight

    def forward(
        self,
        output,
        classifier_weights: Sequence[torch.Tensor],
        labels: torch.Tensor,
        modalities: Optional[torch.Tensor] = None,
        gather: Optional[Gather] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Returns (total loss, {"id", "triplet"[, "hetero_center"]}); classifier_weights as MGNLoss's."""
        _check_classifiers(output, classifier_weights)
        cls = torch.stack(
            [
                reid_ext.cosine_softmax_loss(f.float(), w, labels, scale=self.scale, margin=self.cos_margin)
                for f, w in zip(output.id_features, classifier_weights)
            ]
        ).mean()
        tri, hc = [], []
        two_modalities = modalities is not None and bool((modalities != modalities[0]).any())
        for z, y, m in _metric_inputs(output, labels, modalities, gather):
            tri.append(self.triplet(z, y, m))
            if two_modalities:
                hc.append(self.hetero_center(z, y, m))
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
