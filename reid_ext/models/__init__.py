"""MGN, the UBAT network, their ResNet-50 backbone, model presets and loss recipes."""
from .backbone import PRESETS, ModelPreset, load_backbone_weights
from .mgn import MGN, MGNOutput, build_mgn
from .recipes import RECIPES, MGNLoss, UBATLoss, build_recipe
from .resnet import ResNet, resnet50
from .ubat import UBATNet, UBATOutput, build_ubat

# Model name -> (builder(preset, num_classes, **options), its default loss recipe).
MODELS = {"mgn": (build_mgn, "mgn"), "ubat": (build_ubat, "ubat")}


def build_model(name: str, preset: str, num_classes: int, **options):
    """The model ``name`` ("mgn" or "ubat") of a named preset with ``num_classes`` identities;
    ``options`` go to its builder (build_mgn: triplet_on)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {', '.join(map(repr, MODELS))}, got {name!r}")
    return MODELS[name][0](preset, num_classes, **options)


__all__ = [
    "MGN",
    "MGNOutput",
    "ModelPreset",
    "PRESETS",
    "build_mgn",
    "UBATNet",
    "UBATOutput",
    "build_ubat",
    "MODELS",
    "build_model",
    "load_backbone_weights",
    "RECIPES",
    "MGNLoss",
    "UBATLoss",
    "build_recipe",
    "ResNet",
    "resnet50",
]
