"""MGN, the UBAT network, their ResNet-50 backbone and model presets (their loss recipes: reid_ext.recipes)."""
from .backbone import PRESETS, ModelPreset, load_backbone_weights
from .mgn import MGN, MGNOutput, build_mgn
from .resnet import ResNet, resnet50
from .ubat import UBATNet, UBATOutput, build_ubat

# Model name -> (builder(preset, **options), its default loss recipe in reid_ext.recipes).
MODELS = {"mgn": (build_mgn, "mgn"), "ubat": (build_ubat, "ubat")}


def build_model(name: str, preset: str, **options):
    """The model ``name`` ("mgn" or "ubat") of a named preset; ``options`` go to its builder
    (build_mgn: triplet_on)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {', '.join(map(repr, MODELS))}, got {name!r}")
    return MODELS[name][0](preset, **options)


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
    "ResNet",
    "resnet50",
]
