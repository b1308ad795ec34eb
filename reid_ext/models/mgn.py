"""MGN: the Multiple Granularity Network of Wang et al. (2018).

A ResNet-50 is split after res_conv4_1 (``layer3[0]``). The rest of conv4 and
all of conv5 are copied into three branches:

* global: conv5 downsamples as in ResNet-50; one feature over the whole map;
* part-2 and part-3: conv5 keeps the resolution (stride 1), so that horizontal
  stripes keep enough rows; one feature over the whole map plus one per
  stripe (2 and 3 stripes).

Every feature is a global max pooling, then a 1x1 conv + BN + ReLU reduction to
``feat_dim`` (256 in the paper). The losses sit where the paper puts them:
identity softmax on the three whole-map pooled features (2048-d) and on the
five reduced stripe features, triplet loss on the three reduced whole-map
features (no triplet loss on stripes, which may hold only background). The
concatenation of the 8 reduced features (8 * 256 = 2048-d) is the retrieval
feature.

``triplet_on="pooled"`` is a variant that swaps the roles of the whole-map
features: softmax on all 8 reduced features, triplet on the 3 pooled ones.
Trained from scratch (the CPU preset), the paper's placement drives the ReLU
outputs of the 3 reduced whole-map features to zero within a few epochs (the
triplet loss then stays at its margin); the variant keeps them alive.
"""
import copy
from collections import OrderedDict
from typing import Dict, List, NamedTuple, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import ResNetBackbone, preset
from .resnet import ResNet, make_layer

__all__ = ["MGN", "MGNOutput", "build_mgn"]

# (branch name, number of horizontal stripes); the global branch has none.
BRANCHES: Tuple[Tuple[str, int], ...] = (("global", 0), ("part2", 2), ("part3", 3))
NUM_FEATURES = len(BRANCHES) + sum(n for _, n in BRANCHES)  # 3 whole-map + 5 stripe features = 8
TRIPLET_ON = ("reduced", "pooled")


class MGNOutput(NamedTuple):
    """What MGN returns for a batch of B images.

    embedding: Tensor[B, 8 * feat_dim], the retrieval feature (the 8 reduced features concatenated).
    features: 8 x Tensor[B, feat_dim], the reduced features: first the whole-map features of
        the global, part2 and part3 branches, then the 2 part2 stripes, then the 3 part3
        stripes, top to bottom.
    global_features: 3 x Tensor[B, C5], the max-pooled whole-map conv5 features of the three
        branches before reduction (C5 = 2048 * width).
    id_features: the 8 inputs of the classifiers (a loss recipe's, reid_ext.recipes): the 3
        global_features, then the 5 reduced stripes (all 8 reduced features with triplet_on="pooled").
    metric_features: the 3 inputs of the triplet losses: the reduced whole-map features
        (global_features with triplet_on="pooled").
    """

    embedding: torch.Tensor
    features: Tuple[torch.Tensor, ...]
    global_features: Tuple[torch.Tensor, ...]
    id_features: Tuple[torch.Tensor, ...]
    metric_features: Tuple[torch.Tensor, ...]


def _reduction(in_channels: int, feat_dim: int) -> nn.Sequential:
    reduction = nn.Sequential(
        nn.Conv2d(in_channels, feat_dim, 1, bias=False), nn.BatchNorm2d(feat_dim), nn.ReLU(inplace=True)
    )
    nn.init.kaiming_normal_(reduction[0].weight, mode="fan_in", nonlinearity="relu")
    return reduction


class MGN(ResNetBackbone, nn.Module):
    """MGN over a ResNet-50 of channel scale ``width``.

    Args:
        width: channel scale of the ResNet-50 (1.0 in the paper).
        feat_dim: size of each of the 8 reduced features (256 in the paper).
        zero_init_residual: start every bottleneck as the identity (faster
            training from scratch; loaded backbone weights replace it).
        triplet_on: "reduced" (the paper: triplet on the 3 reduced whole-map features, softmax on
            the 3 pooled ones and the 5 stripes) or "pooled" (the variant: triplet on the 3 pooled
            whole-map features, softmax on the 8 reduced ones).

    forward: images Tensor[B, 3, H, W] -> ``MGNOutput``. H should be a multiple of
    16 * 6 = 96 so that the conv4 map splits into 2 and 3 equal stripes
    (384 x 128 in the paper); other sizes pool overlapping stripes.
    """

    def __init__(self, width: float = 1.0, feat_dim: int = 256, zero_init_residual: bool = True,
                 triplet_on: str = "reduced"):
        super().__init__()
        if feat_dim < 1:
            raise ValueError(f"feat_dim must be >= 1, got {feat_dim}")
        if triplet_on not in TRIPLET_ON:
            raise ValueError(f"triplet_on must be one of {', '.join(map(repr, TRIPLET_ON))}, got {triplet_on!r}")
        self.width = width
        self.feat_dim = feat_dim
        self.triplet_on = triplet_on
        # Split a ResNet-50, so that all three branches start from the same
        # weights (the same ImageNet weights once loaded).
        resnet = ResNet(width=width, zero_init_residual=zero_init_residual)
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2 = resnet.layer1, resnet.layer2
        self.res_conv4_1 = resnet.layer3[0]
        conv4 = nn.Sequential(*resnet.layer3[1:])
        conv4_channels = resnet.layer3[-1].conv3.out_channels
        planes = resnet.layer4[0].conv1.out_channels
        branches = []
        for _, stripes in BRANCHES:
            if stripes == 0:
                conv5 = copy.deepcopy(resnet.layer4)
            else:
                conv5 = make_layer(conv4_channels, planes, len(resnet.layer4), stride=1)
                conv5.load_state_dict(resnet.layer4.state_dict())
            branches.append(nn.Sequential(OrderedDict(conv4=copy.deepcopy(conv4), conv5=conv5)))
        self.branches = nn.ModuleList(branches)
        self.out_channels = resnet.out_channels
        self.reductions = nn.ModuleList(_reduction(self.out_channels, feat_dim) for _ in range(NUM_FEATURES))
    @property
    def embedding_dim(self) -> int:
        """Size of ``MGNOutput.embedding``: 8 * feat_dim."""
        return NUM_FEATURES * self.feat_dim

    @property
    def id_feature_dims(self) -> List[int]:
        """The size of each of ``MGNOutput.id_features``, in order (a loss recipe's classifiers)."""
        whole_map_dim = self.out_channels if self.triplet_on == "reduced" else self.feat_dim
        return [whole_map_dim] * len(BRANCHES) + [self.feat_dim] * (NUM_FEATURES - len(BRANCHES))

    def forward(self, images: torch.Tensor) -> MGNOutput:
        if images.dim() != 4 or images.size(1) != 3:
            raise ValueError(f"images must be a Tensor[B, 3, H, W], got shape {tuple(images.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.res_conv4_1(self.layer2(self.layer1(x)))
        pooled: List[torch.Tensor] = []  # Tensor[B, C5, 1, 1] each
        stripes: List[torch.Tensor] = []
        for branch, (_, n) in zip(self.branches, BRANCHES):
            fmap = branch(x)
            pooled.append(F.adaptive_max_pool2d(fmap, 1))
            if n:
                parts = F.adaptive_max_pool2d(fmap, (n, 1))  # [B, C5, n, 1], one row per stripe
                stripes.extend(parts.split(1, dim=2))
        features = tuple(reduce(z).flatten(1) for reduce, z in zip(self.reductions, pooled + stripes))
        global_features = tuple(z.flatten(1) for z in pooled)
        whole_map, stripe_features = features[: len(BRANCHES)], features[len(BRANCHES):]
        if self.triplet_on == "reduced":
            id_features, metric_features = global_features + stripe_features, whole_map
        else:
            id_features, metric_features = features, global_features
        return MGNOutput(torch.cat(features, dim=1), features, global_features, id_features, metric_features)

    def backbone_key_map(self) -> Dict[str, List[str]]:
        """For each key of a torchvision ResNet-50 state dict (except fc), the MGN keys it fills."""
        mapping: Dict[str, List[str]] = {}
        for key in self.torchvision_keys():
            head, _, rest = key.partition(".")
            if head == "layer3":
                index, _, tail = rest.partition(".")
                if index == "0":
                    mapping[key] = [f"res_conv4_1.{tail}"]
                else:
                    block = f"{int(index) - 1}.{tail}"
                    mapping[key] = [f"branches.{b}.conv4.{block}" for b in range(len(BRANCHES))]
            elif head == "layer4":
                mapping[key] = [f"branches.{b}.conv5.{rest}" for b in range(len(BRANCHES))]
            else:
                mapping[key] = [key]
        return mapping


def build_mgn(preset_name: str, triplet_on: str = "reduced") -> MGN:
    """The MGN of a named preset ("paper" or "cpu"); triplet_on: see MGN."""
    p = preset(preset_name)
    return MGN(width=p.width, feat_dim=p.feat_dim, triplet_on=triplet_on)
