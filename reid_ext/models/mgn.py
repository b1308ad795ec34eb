"""MGN: the Multiple Granularity Network of Wang et al. (2018).

A ResNet-50 is split after res_conv4_1 (``layer3[0]``). The rest of conv4 and
all of conv5 are copied into three branches:

* global: conv5 downsamples as in ResNet-50; one feature over the whole map;
* part-2 and part-3: conv5 keeps the resolution (stride 1), so that horizontal
  stripes keep enough rows; one feature over the whole map plus one per
  stripe (2 and 3 stripes).

Every feature is a global max pooling, then a 1x1 conv + BN + ReLU reduction to
``feat_dim`` (256 in the paper). The 8 reduced features each have a
classifier; their concatenation (8 * 256 = 2048-d) is the retrieval feature.
The triplet loss takes the three whole-map max-pooled features before
reduction (2048-d each), as in the paper's Figure 2. (Re-implementations that
apply it to the reduced features instead drive those ReLU outputs to zero
when training from scratch.)
"""
import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Mapping, NamedTuple, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .resnet import ResNet, make_layer

__all__ = ["MGN", "MGNOutput", "MGNPreset", "PRESETS", "build_mgn", "load_backbone_weights"]

# (branch name, number of horizontal stripes); the global branch has none.
BRANCHES: Tuple[Tuple[str, int], ...] = (("global", 0), ("part2", 2), ("part3", 3))
NUM_FEATURES = len(BRANCHES) + sum(n for _, n in BRANCHES)  # 3 whole-map + 5 stripe features = 8


class MGNOutput(NamedTuple):
    """What MGN returns for a batch of B images.

    embedding: Tensor[B, 8 * feat_dim], the retrieval feature (the 8 reduced features concatenated).
    features: 8 x Tensor[B, feat_dim], the reduced features: first the whole-map features of
        the global, part2 and part3 branches, then the 2 part2 stripes, then the 3 part3
        stripes, top to bottom; each has a classifier (``MGN.classifiers``, same order).
    global_features: 3 x Tensor[B, C5], the max-pooled whole-map conv5 features of the three
        branches before reduction (C5 = 2048 * width), for the triplet loss.
    """

    embedding: torch.Tensor
    features: Tuple[torch.Tensor, ...]
    global_features: Tuple[torch.Tensor, ...]


def _reduction(in_channels: int, feat_dim: int) -> nn.Sequential:
    reduction = nn.Sequential(
        nn.Conv2d(in_channels, feat_dim, 1, bias=False), nn.BatchNorm2d(feat_dim), nn.ReLU(inplace=True)
    )
    nn.init.kaiming_normal_(reduction[0].weight, mode="fan_in", nonlinearity="relu")
    return reduction


class MGN(nn.Module):
    """MGN over a ResNet-50 of channel scale ``width``.

    Args:
        num_classes: training identities; 0 builds no classifiers (inference only).
        width: channel scale of the ResNet-50 (1.0 in the paper).
        feat_dim: size of each of the 8 reduced features (256 in the paper).
        zero_init_residual: start every bottleneck as the identity (faster
            training from scratch; loaded backbone weights replace it).

    forward: images Tensor[B, 3, H, W] -> ``MGNOutput``. H should be a multiple of
    16 * 6 = 96 so that the conv4 map splits into 2 and 3 equal stripes
    (384 x 128 in the paper); other sizes pool overlapping stripes.
    """

    def __init__(self, num_classes: int, width: float = 1.0, feat_dim: int = 256, zero_init_residual: bool = True):
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if feat_dim < 1:
            raise ValueError(f"feat_dim must be >= 1, got {feat_dim}")
        self.width = width
        self.feat_dim = feat_dim
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
        self.classifiers = nn.ModuleList(
            # No bias: the same weight then serves as a linear softmax classifier
            # and as the class centres of a cosine softmax.
            nn.Linear(feat_dim, num_classes, bias=False) for _ in range(NUM_FEATURES if num_classes else 0)
        )
        for classifier in self.classifiers:
            nn.init.normal_(classifier.weight, std=0.001)

    @property
    def embedding_dim(self) -> int:
        """Size of ``MGNOutput.embedding``: 8 * feat_dim."""
        return NUM_FEATURES * self.feat_dim

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
        return MGNOutput(
            embedding=torch.cat(features, dim=1),
            features=features,
            global_features=tuple(z.flatten(1) for z in pooled),
        )

    def backbone_key_map(self) -> Dict[str, List[str]]:
        """For each key of a torchvision ResNet-50 state dict (except fc), the MGN keys it fills."""
        mapping: Dict[str, List[str]] = {}
        with torch.device("meta"):  # only the names are needed: allocate nothing
            names = ResNet(width=self.width).state_dict()
        for key in names:
            head, _, rest = key.partition(".")
            if head == "fc":
                continue
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

    def load_backbone_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy a torchvision-style ResNet-50 state dict (e.g. ImageNet weights) into the backbone.

        ``fc.*`` is ignored; every other key must be present with this model's
        shapes (the same ``width``). A ``module.`` prefix (from DDP) is stripped.
        """
        state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
        mapping = self.backbone_key_map()
        missing = sorted(set(mapping) - set(state_dict))
        unexpected = sorted(k for k in state_dict if k not in mapping and not k.startswith("fc."))
        if missing or unexpected:
            raise ValueError(
                "state_dict is not a ResNet-50 state dict: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        own = self.state_dict()
        remapped = {}
        for key, targets in mapping.items():
            value = state_dict[key]
            for target in targets:
                if own[target].shape != value.shape:
                    raise ValueError(
                        f"state_dict[{key!r}] has shape {tuple(value.shape)} but the backbone (width "
                        f"{self.width}) expects {tuple(own[target].shape)}"
                    )
                remapped[target] = value
        self.load_state_dict(remapped, strict=False)


def load_backbone_weights(model: MGN, path: str) -> None:
    """Load ResNet-50 weights from a local file (a torchvision state dict) into ``model``'s backbone.

    Nothing is downloaded. The file may also be a checkpoint dict holding the
    state dict under "state_dict" or "model".
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    model.load_backbone_state_dict(state)


@dataclass(frozen=True)
class MGNPreset:
    """A model size: ResNet-50 channel scale, reduced feature size, input (height, width)."""

    width: float
    feat_dim: int
    input_size: Tuple[int, int]


PRESETS: Dict[str, MGNPreset] = {
    # The paper: full ResNet-50, 256-d reductions, 384 x 128 inputs.
    "paper": MGNPreset(width=1.0, feat_dim=256, input_size=(384, 128)),
    # Same architecture at 1/8 of the channels and a quarter of the resolution:
    # trains in minutes on two CPU cores.
    "cpu": MGNPreset(width=0.125, feat_dim=64, input_size=(96, 32)),
}


def build_mgn(preset: str, num_classes: int) -> MGN:
    """The MGN of a named preset ("paper" or "cpu") with ``num_classes`` classifiers."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(map(repr, PRESETS))}, got {preset!r}")
    p = PRESETS[preset]
    return MGN(num_classes, width=p.width, feat_dim=p.feat_dim)
