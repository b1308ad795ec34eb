"""reid-ext: fused triplet-mining losses for person re-identification.

Every loss is one fused kernel per direction on CPU and CUDA, never holding
the N x M similarity matrix; `reid_ext.reference` holds the same functions in
plain PyTorch.
"""
import importlib

import torch

_REBUILD = "rebuild it against the installed torch: pip install --no-build-isolation -e ."

try:
    _C = importlib.import_module("reid_ext._C")
except ImportError as err:
    raise ImportError(
        f"reid_ext's compiled extension reid_ext._C is missing or does not load ({err}); "
        f"it may have been built for another torch than {torch.__version__}; {_REBUILD}"
    ) from err

if _C.TORCH_VERSION != torch.__version__:
    raise ImportError(
        f"reid_ext was built for torch {_C.TORCH_VERSION} but torch {torch.__version__} is installed; {_REBUILD}"
    )

from . import reference  # noqa: E402
from .ops import (  # noqa: E402
    batch_hard_triplet_loss,
    cosine_similarity,
    cosine_softmax_loss,
    hetero_center_triplet_loss,
    modality_centers,
    topk_similarity,
    TopKSimilarity,
    unified_triplet_loss,
)
from . import defaults, losses, recipes  # noqa: E402
from . import distributed  # noqa: E402
from .distributed import gather_batch  # noqa: E402
from .memory import CrossBatchMemory  # noqa: E402

WITH_CUDA = bool(_C.WITH_CUDA)

__version__ = "0.1.0"

__all__ = [
    "cosine_similarity",
    "unified_triplet_loss",
    "batch_hard_triplet_loss",
    "modality_centers",
    "hetero_center_triplet_loss",
    "cosine_softmax_loss",
    "topk_similarity",
    "TopKSimilarity",
    "CrossBatchMemory",
    "gather_batch",
    "distributed",
    "defaults",
    "losses",
    "recipes",
    "reference",
    "WITH_CUDA",
]
