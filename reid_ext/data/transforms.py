"""Image transforms for re-ID, written with torch tensor ops (no torchvision).

Random draws use torch's global generator, so a restored RNG state replays
the same augmentations (the trainer's exact resume relies on it); DataLoader
workers get their own seeds from it.
"""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["ReIDTransform", "IMAGENET_MEAN", "IMAGENET_STD", "resize", "to_grayscale", "random_erasing"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a float Tensor[3, h, w] to Tensor[3, *size] (antialiased when shrinking)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def to_grayscale(image: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of a Tensor[3, H, W], replicated to 3 channels."""
    luma = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    return luma.expand(3, -1, -1).clone()


def random_erasing(
    image: torch.Tensor,
    area: Tuple[float, float] = (0.02, 0.4),
    ratio: Tuple[float, float] = (0.3, 3.3),
    attempts: int = 10,
) -> torch.Tensor:
    """Zero (the mean colour, after normalisation) a random rectangle of Tensor[C, H, W], in place.

    The rectangle covers ``area`` of the image with aspect (h / w) in ``ratio``
    (log-uniform); after ``attempts`` draws that do not fit, nothing is erased.
    """
    _, h, w = image.shape
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target = h * w * (area[0] + (area[1] - area[0]) * torch.rand(()).item())
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(()).item())
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < eh < h and 0 < ew < w:
            top = int(torch.randint(0, h - eh + 1, ()).item())
            left = int(torch.randint(0, w - ew + 1, ()).item())
            image[:, top : top + eh, left : left + ew] = 0.0
            return image
    return image


class ReIDTransform:
    """uint8 Tensor[3, h, w] -> normalized float Tensor[3, H, W] at ``size`` = (H, W).

    Training adds, in this order: random grayscale (``grayscale_p``, for
    visible-infrared training), horizontal flip (``flip_p``), zero padding by
    ``pad`` pixels and a random crop back to ``size``, normalisation, and
    random erasing (``erasing_p``). With ``train=False`` it only resizes and
    normalizes. ``pad=None`` means H / 32 pixels (12 at 384 x 128).
    """

    def __init__(
        self,
        size: Tuple[int, int],
        train: bool = False,
        *,
        flip_p: float = 0.5,
        pad: Optional[int] = None,
        erasing_p: float = 0.5,
        grayscale_p: float = 0.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size must be (height, width) with positive entries, got {size}")
        for name, p in (("flip_p", flip_p), ("erasing_p", erasing_p), ("grayscale_p", grayscale_p)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.size = (int(size[0]), int(size[1]))
        self.train = train
        self.flip_p = flip_p
        self.pad = max(1, self.size[0] // 32) if pad is None else int(pad)
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.erasing_p = erasing_p
        self.grayscale_p = grayscale_p
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 3 or image.size(0) != 3:
            raise ValueError(f"image must be a Tensor[3, H, W], got shape {tuple(image.shape)}")
        x = resize(image.float() / 255.0, self.size)
        if self.train:
            if self.grayscale_p and torch.rand(()).item() < self.grayscale_p:
                x = to_grayscale(x)
            if torch.rand(()).item() < self.flip_p:
                x = x.flip(-1)
            if self.pad:
                x = F.pad(x, (self.pad,) * 4)
                top = int(torch.randint(0, 2 * self.pad + 1, ()).item())
                left = int(torch.randint(0, 2 * self.pad + 1, ()).item())
                x = x[:, top : top + self.size[0], left : left + self.size[1]]
        x = (x - self.mean) / self.std
        if self.train and self.erasing_p and torch.rand(()).item() < self.erasing_p:
            x = random_erasing(x.contiguous())
        return x.contiguous()
