"""MGN and its ResNet-50 backbone, model presets and loss recipes."""
from .mgn import MGN, PRESETS, MGNOutput, MGNPreset, build_mgn, load_backbone_weights
from .recipes import RECIPES, MGNLoss, UBATLoss, build_recipe
from .resnet import ResNet, resnet50

__all__ = [
    "MGN",
    "MGNOutput",
    "MGNPreset",
    "PRESETS",
    "build_mgn",
    "load_backbone_weights",
    "RECIPES",
    "MGNLoss",
    "UBATLoss",
    "build_recipe",
    "ResNet",
    "resnet50",
]
