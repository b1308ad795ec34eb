"""What MGN and the UBAT network share: model presets, loading ResNet-50 weights."""
from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple

import torch

from .resnet import ResNet

__all__ = ["ModelPreset", "PRESETS", "preset", "ResNetBackbone", "load_backbone_weights"]


@dataclass(frozen=True)
class ModelPreset:
    """A model size: ResNet-50 channel scale, reduction width (feat_dim), input (height, width)."""

    width: float
    feat_dim: int
    input_size: Tuple[int, int]


PRESETS: Dict[str, ModelPreset] = {
    # MGN's paper: full ResNet-50, 256-d reductions, 384 x 128 inputs.
    "paper": ModelPreset(width=1.0, feat_dim=256, input_size=(384, 128)),
    # Same architecture at 1/8 of the channels and a quarter of the resolution:
    # trains in minutes on two CPU cores.
    "cpu": ModelPreset(width=0.125, feat_dim=64, input_size=(96, 32)),
}


def preset(name: str) -> ModelPreset:
    """PRESETS[name], with an error naming the choices."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(map(repr, PRESETS))}, got {name!r}")
    return PRESETS[name]


class ResNetBackbone:
    """Mixin for a model holding a ResNet-50 of channel scale ``self.width``: loads torchvision weights.

    The model says where each torchvision key goes with ``backbone_key_map()``.
    """

    width: float

    def torchvision_keys(self) -> List[str]:
        """The keys of a torchvision ResNet-50 state dict at this width, without fc."""
        with torch.device("meta"):  # only the names are needed: allocate nothing
            names = ResNet(width=self.width).state_dict()
        return [key for key in names if not key.startswith("fc.")]

    def backbone_key_map(self) -> Dict[str, List[str]]:
        """For each key of a torchvision ResNet-50 state dict (except fc), the model keys it fills."""
        raise NotImplementedError

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


def load_backbone_weights(model: ResNetBackbone, path: str) -> None:
    """Load ResNet-50 weights from a local file (a torchvision state dict) into ``model``'s backbone.

    Nothing is downloaded, and the file is loaded with weights_only=True (it cannot run code).
    The file may also be a checkpoint dict holding the state dict under "state_dict" or "model".
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    model.load_backbone_state_dict(state)
