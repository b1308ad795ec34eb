"""Re-ID data: datasets (synthetic, Market-1501, SYSU-MM01, RegDB), PK samplers, transforms."""
from .datasets import (
    PROTOCOLS,
    ImageDataset,
    ReIDDataset,
    Sample,
    load_image,
    load_market1501,
    load_regdb,
    load_sysu_mm01,
)
from .samplers import CrossModalityPKSampler, PKSampler
from .synthetic import make_synthetic
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ReIDTransform

__all__ = [
    "PROTOCOLS",
    "ImageDataset",
    "ReIDDataset",
    "Sample",
    "load_image",
    "load_market1501",
    "load_regdb",
    "load_sysu_mm01",
    "CrossModalityPKSampler",
    "PKSampler",
    "make_synthetic",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ReIDTransform",
]
