"""ResNet-50 with torchvision's parameter names, at any width.

The module tree (conv1, bn1, layer1..layer4 of Bottleneck blocks with conv1..3,
bn1..3 and downsample.0/1, fc) reproduces torchvision's ``resnet50`` exactly,
so an ImageNet state dict saved from torchvision loads with
``load_state_dict`` and gives the same outputs. ``width`` scales every channel
count (1.0 is ResNet-50 itself) for fast CPU presets.
"""
from typing import Optional

import torch
import torch.nn as nn

__all__ = ["Bottleneck", "ResNet", "resnet50", "scaled_channels"]


def scaled_channels(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1: the channel count at that width."""
    return max(1, int(round(channels * width)))


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 -> 3x3 (carries the stride) -> 1x1, plus a shortcut.

    Input Tensor[B, inplanes, H, W] -> Tensor[B, planes * 4, H / stride, W / stride].
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def make_layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` bottlenecks; the first changes the resolution (``stride``) and the channels."""
    downsample = None
    if stride != 1 or inplanes != planes * Bottleneck.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * Bottleneck.expansion),
        )
    layers = [Bottleneck(inplanes, planes, stride, downsample)]
    layers += [Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def init_weights(module: nn.Module, zero_init_residual: bool = False) -> None:
    """He initialisation for convolutions, unit scale for batch norm (torchvision's defaults).

    ``zero_init_residual`` zeroes the last batch-norm scale of every bottleneck,
    so that each block starts as the identity: training from scratch
    converges markedly faster (Goyal et al., 2017).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in module.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)


class ResNet(nn.Module):
    """ResNet-50 (layers 3, 4, 6, 3) with every channel count scaled by ``width``.

    Input Tensor[B, 3, H, W] -> logits Tensor[B, num_classes] (global average
    pooling, then ``fc``). ``features`` gives the layer4 map
    Tensor[B, 2048 * width, H / 32, W / 32]. ``zero_init_residual``: see ``init_weights``.
    """

    def __init__(self, width: float = 1.0, num_classes: int = 1000, zero_init_residual: bool = False):
        super().__init__()
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.width = width
        base = scaled_channels(64, width)
        self.conv1 = nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = base
        for i, (mult, blocks, stride) in enumerate(((1, 3, 1), (2, 4, 2), (4, 6, 2), (8, 3, 2)), start=1):
            planes = base * mult
            setattr(self, f"layer{i}", make_layer(inplanes, planes, blocks, stride))
            inplanes = planes * Bottleneck.expansion
        self.out_channels = inplanes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        init_weights(self, zero_init_residual)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def resnet50(width: float = 1.0, num_classes: int = 1000) -> ResNet:
    """ResNet-50 whose state dict matches ``torchvision.models.resnet50()`` at width 1."""
    return ResNet(width=width, num_classes=num_classes)
