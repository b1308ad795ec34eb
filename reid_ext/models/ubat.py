"""The UBAT network (Li, Qi, Chen and Zhou, IJCNN 2021, arXiv 2103.04607).

One ResNet-50 shared by both modalities (visible and infrared images go
through the same parameters); its conv5 feature map is reduced in channels by
a 1x1 convolution and pooled by global average pooling into the embedding,
which takes all three losses (cosine softmax, unified batch-all triplet,
batch-all hetero-center triplet) and is the retrieval feature, compared by
cosine distance.
"""
from typing import Dict, List, NamedTuple, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import ResNetBackbone, preset
from .resnet import ResNet

__all__ = ["UBATNet", "UBATOutput", "build_ubat"]


class UBATOutput(NamedTuple):
    """What UBATNet returns for B images: embedding Tensor[B, feat_dim], the one feature of every loss."""

    embedding: torch.Tensor

    @property
    def id_features(self) -> Tuple[torch.Tensor, ...]:
        """The input of the classifier (a loss recipe's, reid_ext.recipes)."""
        return (self.embedding,)

    @property
    def metric_features(self) -> Tuple[torch.Tensor, ...]:
        """The input of the triplet losses."""
        return (self.embedding,)


class UBATNet(ResNetBackbone, nn.Module):
    """ResNet-50 of channel scale ``width`` -> 1x1 conv to ``feat_dim`` channels -> global average pooling.

    Args:
        width: channel scale of the ResNet-50 (1.0: ResNet-50 itself).
        feat_dim: channels after the 1x1 convolution, the embedding size.
        last_stride: stride of conv5 (1 keeps twice the spatial resolution; 2 is ResNet-50's).
        zero_init_residual: start every bottleneck as the identity (faster training from scratch;
            loaded backbone weights replace it).

    forward: images Tensor[B, 3, H, W] -> ``UBATOutput``. The parameter names of the backbone are
    torchvision's ResNet-50's (conv1, bn1, layer1..layer4).
    """

    def __init__(self, width: float = 1.0, feat_dim: int = 256, last_stride: int = 1,
                 zero_init_residual: bool = True):
        super().__init__()
        if feat_dim < 1:
            raise ValueError(f"feat_dim must be >= 1, got {feat_dim}")
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        self.width = width
        self.feat_dim = feat_dim
        resnet = ResNet(width=width, zero_init_residual=zero_init_residual)
        if last_stride == 1:  # the stride of conv5 sits in its first block's 3x3 conv and shortcut
            resnet.layer4[0].conv2.stride = (1, 1)
            resnet.layer4[0].downsample[0].stride = (1, 1)
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        self.out_channels = resnet.out_channels
        self.reduction = nn.Conv2d(self.out_channels, feat_dim, 1, bias=False)
        nn.init.kaiming_normal_(self.reduction.weight, mode="fan_in", nonlinearity="linear")

    @property
    def embedding_dim(self) -> int:
        """Size of ``UBATOutput.embedding``: feat_dim."""
        return self.feat_dim

    @property
    def id_feature_dims(self) -> List[int]:
        """The size of ``UBATOutput.id_features``' one feature: [feat_dim]."""
        return [self.feat_dim]

    def forward(self, images: torch.Tensor) -> UBATOutput:
        if images.dim() != 4 or images.size(1) != 3:
            raise ValueError(f"images must be a Tensor[B, 3, H, W], got shape {tuple(images.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        fmap = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        # A 1x1 convolution commutes with average pooling: pooling first gives the same
        # embedding at 1 / (H * W) of the convolution's cost.
        return UBATOutput(embedding=self.reduction(F.adaptive_avg_pool2d(fmap, 1)).flatten(1))

    def backbone_key_map(self) -> Dict[str, List[str]]:
        """For each key of a torchvision ResNet-50 state dict (except fc), the same key here."""
        return {key: [key] for key in self.torchvision_keys()}


def build_ubat(preset_name: str) -> UBATNet:
    """The UBAT network of a named preset ("paper" or "cpu"): its width and reduction width (feat_dim)."""
    p = preset(preset_name)
    return UBATNet(width=p.width, feat_dim=p.feat_dim)
