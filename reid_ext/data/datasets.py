"""Re-ID datasets: a common container and parsers for Market-1501, SYSU-MM01 and RegDB.

A dataset is three lists of ``Sample`` (train, query, gallery). Training
identities are relabelled to 0..C-1; query and gallery keep the dataset's own
identity numbers, which is all that evaluation compares. Camera ids are
0-based (Market-1501's ``c1`` is camera 0, SYSU-MM01's ``cam3`` is camera 2).
Modality 0 is visible light, 1 is infrared / thermal.
"""
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

__all__ = [
    "Sample",
    "ReIDDataset",
    "ImageDataset",
    "PROTOCOLS",
    "load_market1501",
    "load_sysu_mm01",
    "load_regdb",
    "load_image",
]

# How query and gallery are compared (see reid_ext.evaluation.evaluate_dataset):
# "market": evaluate_rank; "sysu-all" / "sysu-indoor": SYSU-MM01's rule and 10
# single-shot gallery trials; "cross-modality": evaluate_rank between
# modalities (RegDB, synthetic visible-infrared).
PROTOCOLS = ("market", "sysu-all", "sysu-indoor", "cross-modality")


class Sample(NamedTuple):
    """One image: ``source`` is a file path or an index into ``ReIDDataset.images``."""

    source: Union[str, int]
    pid: int
    camid: int
    modality: int = 0


@dataclass
class ReIDDataset:
    """Train / query / gallery splits of a re-ID dataset.

    ``images`` holds in-memory images (uint8 ndarray[N, H, W, 3]) when the
    samples' sources are indices (the synthetic dataset), else None.
    """

    name: str
    train: List[Sample]
    query: List[Sample]
    gallery: List[Sample]
    protocol: str = "market"
    images: Optional[np.ndarray] = field(default=None, repr=False)

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(map(repr, PROTOCOLS))}, got {self.protocol!r}")

    @property
    def num_train_pids(self) -> int:
        return len({s.pid for s in self.train})

    @property
    def num_modalities(self) -> int:
        return len({s.modality for s in self.train})

    def summary(self) -> str:
        """One line per split: identities, images and cameras."""
        lines = [f"{self.name} ({self.protocol} protocol)"]
        for split in ("train", "query", "gallery"):
            samples = getattr(self, split)
            lines.append(
                f"  {split:8s} {len({s.pid for s in samples}):5d} ids {len(samples):6d} images "
                f"{len({s.camid for s in samples}):2d} cameras"
            )
        return "\n".join(lines)


def load_image(path: str) -> torch.Tensor:
    """An image file as uint8 Tensor[3, H, W] (RGB; grayscale files are replicated)."""
    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


Transform = Callable[[torch.Tensor], torch.Tensor]


class ImageDataset(torch.utils.data.Dataset):
    """``Sample`` list -> (image, pid, camid, modality), image = transform(uint8 Tensor[3, H, W]).

    ``transform`` is one callable, or a mapping modality -> callable (e.g. random grayscale for
    visible images only). ``images`` is the in-memory array for index sources (``ReIDDataset.images``).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Union[Transform, Mapping[int, Transform]],
        images: Optional[np.ndarray] = None,
    ):
        self.samples = list(samples)
        if isinstance(transform, Mapping):
            missing = sorted({s.modality for s in self.samples} - set(transform))
            if missing:
                raise ValueError(f"transform has no entry for modalities {missing} of the samples")
        self.transform = transform
        self.images = images

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int, int, int]:
        sample = self.samples[index]
        if isinstance(sample.source, str):
            image = load_image(sample.source)
        else:
            if self.images is None:
                raise ValueError(f"sample {index} refers to in-memory image {sample.source} but images is None")
            image = torch.from_numpy(self.images[sample.source]).permute(2, 0, 1)
        transform = self.transform[sample.modality] if isinstance(self.transform, Mapping) else self.transform
        return transform(image), sample.pid, sample.camid, sample.modality


def relabel(samples: Iterable[Sample]) -> List[Sample]:
    """Identities renumbered 0..C-1 in increasing order of the original ids."""
    samples = list(samples)
    mapping: Dict[int, int] = {pid: i for i, pid in enumerate(sorted({s.pid for s in samples}))}
    return [s._replace(pid=mapping[s.pid]) for s in samples]


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: no folder {path}")


# Market-1501 file names: <pid>_c<camera>s<sequence>_<frame>_<box>.jpg, pid -1 = junk.
_MARKET_NAME = re.compile(r"^(-1|\d{4})_c(\d)s\d+_\d+_\d+\.jpg$")


def _market_split(folder: str) -> List[Sample]:
    _require_dir(folder, "Market-1501")
    samples = []
    for name in sorted(os.listdir(folder)):
        match = _MARKET_NAME.match(name)
        if match is None:  # Thumbs.db and the like
            continue
        pid, cam = int(match.group(1)), int(match.group(2))
        if pid == -1:  # junk detections: ignored by the protocol
            continue
        samples.append(Sample(os.path.join(folder, name), pid, cam - 1, 0))
    return samples


def load_market1501(root: str) -> ReIDDataset:
    """Market-1501 from ``root`` holding bounding_box_train/, query/ and bounding_box_test/.

    Junk images (identity -1) are dropped everywhere. Identity 0000 (the
    distractors) stays in the gallery as an identity that matches no query,
    as the standard protocol counts them; it is dropped from train and query.
    ``root`` may also be the folder containing Market-1501-v15.09.15/.
    """
    nested = os.path.join(root, "Market-1501-v15.09.15")
    if not os.path.isdir(os.path.join(root, "bounding_box_train")) and os.path.isdir(nested):
        root = nested
    train = [s for s in _market_split(os.path.join(root, "bounding_box_train")) if s.pid != 0]
    query = [s for s in _market_split(os.path.join(root, "query")) if s.pid != 0]
    gallery = _market_split(os.path.join(root, "bounding_box_test"))
    if not train:
        raise ValueError(f"Market-1501: no training images in {root}/bounding_box_train")
    return ReIDDataset("market1501", relabel(train), query, gallery, protocol="market")


# SYSU-MM01: cameras 1, 2, 4, 5 are visible (2 indoor), 3 and 6 infrared (3 indoor).
SYSU_VISIBLE_CAMS = (1, 2, 4, 5)
SYSU_INFRARED_CAMS = (3, 6)
SYSU_INDOOR_VISIBLE_CAMS = (1, 2)


def _sysu_ids(root: str, name: str) -> List[int]:
    path = os.path.join(root, "exp", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SYSU-MM01: no split file {path}")
    with open(path) as f:
        return [int(token) for token in f.read().replace("\n", ",").split(",") if token.strip()]


def _sysu_samples(root: str, pids: Iterable[int], cams: Iterable[int]) -> List[Sample]:
    samples = []
    for cam in cams:
        modality = 1 if cam in SYSU_INFRARED_CAMS else 0
        for pid in sorted(pids):
            folder = os.path.join(root, f"cam{cam}", f"{pid:04d}")
            if not os.path.isdir(folder):  # not every identity passes every camera
                continue
            for name in sorted(os.listdir(folder)):
                if name.lower().endswith((".jpg", ".jpeg", ".png")):
                    samples.append(Sample(os.path.join(folder, name), pid, cam - 1, modality))
    return samples


def load_sysu_mm01(root: str, mode: str = "all") -> ReIDDataset:
    """SYSU-MM01 from ``root`` holding cam1/ .. cam6/<pid>/<img>.jpg and exp/{train,val,test}_id.txt.

    Train: the train and val identities (395), all six cameras. Query: the
    infrared images (cam3, cam6) of the 96 test identities. Gallery: their
    visible images, cameras 1, 2, 4, 5 (mode "all") or 1, 2 (mode "indoor");
    evaluation draws single-shot galleries from it (``reid_ext.evaluation.evaluate_sysu``).
    """
    if mode not in ("all", "indoor"):
        raise ValueError(f"mode must be 'all' or 'indoor', got {mode!r}")
    _require_dir(root, "SYSU-MM01")
    train_ids = _sysu_ids(root, "train_id.txt") + _sysu_ids(root, "val_id.txt")
    test_ids = _sysu_ids(root, "test_id.txt")
    train = _sysu_samples(root, train_ids, SYSU_VISIBLE_CAMS + SYSU_INFRARED_CAMS)
    query = _sysu_samples(root, test_ids, SYSU_INFRARED_CAMS)
    gallery = _sysu_samples(root, test_ids, SYSU_VISIBLE_CAMS if mode == "all" else SYSU_INDOOR_VISIBLE_CAMS)
    if not train:
        raise ValueError(f"SYSU-MM01: no training images under {root}/cam*/")
    return ReIDDataset("sysu_mm01", relabel(train), query, gallery, protocol=f"sysu-{mode}")


def _regdb_list(root: str, name: str, modality: int) -> List[Sample]:
    path = os.path.join(root, "idx", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"RegDB: no split file {path}")
    samples = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) != 2:
                continue
            # One camera per modality: visible = camera 0, thermal = camera 1.
            samples.append(Sample(os.path.join(root, parts[0]), int(parts[1]), modality, modality))
    return samples


def load_regdb(root: str, trial: int = 1, query: str = "visible") -> ReIDDataset:
    """RegDB from ``root`` holding Visible/, Thermal/ and idx/{train,test}_{visible,thermal}_<trial>.txt.

    ``trial`` (1..10) picks one of the ten standard 206/206-identity splits.
    ``query`` "visible" is the visible-to-thermal protocol (thermal gallery);
    "thermal" the reverse.
    """
    if not 1 <= trial <= 10:
        raise ValueError(f"trial must be in 1..10, got {trial}")
    if query not in ("visible", "thermal"):
        raise ValueError(f"query must be 'visible' or 'thermal', got {query!r}")
    _require_dir(root, "RegDB")
    train = _regdb_list(root, f"train_visible_{trial}.txt", 0) + _regdb_list(root, f"train_thermal_{trial}.txt", 1)
    visible = _regdb_list(root, f"test_visible_{trial}.txt", 0)
    thermal = _regdb_list(root, f"test_thermal_{trial}.txt", 1)
    q, g = (visible, thermal) if query == "visible" else (thermal, visible)
    return ReIDDataset("regdb", relabel(train), q, g, protocol="cross-modality")
