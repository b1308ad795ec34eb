"""Datasets (synthetic, Market-1501, SYSU-MM01, RegDB parsing), samplers and transforms."""
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from reid_ext.data import (
    CrossModalityPKSampler,
    ImageDataset,
    PKSampler,
    ReIDTransform,
    Sample,
    load_market1501,
    load_regdb,
    load_sysu_mm01,
    make_synthetic,
)
from reid_ext.data.transforms import random_erasing, to_grayscale


def _write_image(path, colour=(200, 30, 30), size=(16, 8)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (size[1], size[0]), colour).save(path)


# --------------------------------------------------------------------------- Market-1501


@pytest.fixture
def market_root(tmp_path):
    files = {
        "bounding_box_train": [
            "0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg", "0007_c3s3_077419_03.jpg",
            "0007_c6s3_077419_01.jpg", "0010_c1s1_002301_01.jpg", "Thumbs.db",
        ],
        "query": ["0001_c1s1_001051_00.jpg", "0003_c3s1_000551_00.jpg"],
        "bounding_box_test": [
            "0001_c2s1_000301_01.jpg", "0001_c1s1_001051_03.jpg", "0003_c6s2_000712_02.jpg",
            "0000_c4s1_000001_01.jpg", "-1_c1s1_000401_03.jpg", "-1_c5s1_000401_01.jpg",
        ],
    }
    root = tmp_path / "Market-1501-v15.09.15"
    for folder, names in files.items():
        for name in names:
            path = root / folder / name
            if name.endswith(".jpg"):
                _write_image(str(path))
            else:
                path.write_bytes(b"")
    return tmp_path


def test_market1501_parsing(market_root):
    data = load_market1501(str(market_root))  # the parent of the versioned folder works too
    assert data.protocol == "market" and data.images is None
    # Train: relabelled 0..C-1 by original id order, cameras 0-based, Thumbs.db ignored.
    assert sorted((s.pid, s.camid) for s in data.train) == [(0, 0), (0, 1), (1, 2), (1, 5), (2, 0)]
    assert data.num_train_pids == 3 and data.num_modalities == 1
    assert sorted((s.pid, s.camid) for s in data.query) == [(1, 0), (3, 2)]
    # Gallery: junk (-1) dropped, distractors (0000) kept, original ids.
    assert sorted((s.pid, s.camid) for s in data.gallery) == [(0, 3), (1, 0), (1, 1), (3, 5)]
    assert all(os.path.isfile(s.source) for s in data.train + data.query + data.gallery)
    image, pid, camid, modality = ImageDataset(data.query, ReIDTransform((32, 16)))[0]
    assert image.shape == (3, 32, 16) and modality == 0


def test_market1501_missing_folder_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="bounding_box_train"):
        load_market1501(str(tmp_path))


# --------------------------------------------------------------------------- SYSU-MM01 and RegDB


def test_sysu_mm01_parsing(tmp_path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "train_id.txt").write_text("1,2\n")
    (tmp_path / "exp" / "val_id.txt").write_text("3\n")
    (tmp_path / "exp" / "test_id.txt").write_text("4,5\n")
    for cam in range(1, 7):
        for pid in (1, 2, 3, 4, 5):
            if pid == 5 and cam == 4:  # not every identity passes every camera
                continue
            for k in range(2):
                _write_image(str(tmp_path / f"cam{cam}" / f"{pid:04d}" / f"{k + 1:04d}.jpg"))
    data = load_sysu_mm01(str(tmp_path), mode="all")
    assert data.protocol == "sysu-all"
    assert data.num_train_pids == 3 and data.num_modalities == 2
    assert len(data.train) == 3 * 6 * 2
    assert all(s.modality == (s.camid in (2, 5)) for s in data.train)  # cam3, cam6 are infrared
    assert {s.camid for s in data.query} == {2, 5} and {s.pid for s in data.query} == {4, 5}
    assert {s.camid for s in data.gallery} == {0, 1, 3, 4}
    assert len(data.gallery) == 2 * 4 * 2 - 2
    indoor = load_sysu_mm01(str(tmp_path), mode="indoor")
    assert indoor.protocol == "sysu-indoor" and {s.camid for s in indoor.gallery} == {0, 1}
    with pytest.raises(ValueError, match="mode"):
        load_sysu_mm01(str(tmp_path), mode="outdoor")


def test_regdb_parsing(tmp_path):
    (tmp_path / "idx").mkdir()
    for split, pids in (("train", (0, 1)), ("test", (0, 1, 2))):
        for modality, folder in (("visible", "Visible"), ("thermal", "Thermal")):
            lines = []
            for pid in pids:
                for k in range(2):
                    rel = f"{folder}/{split}{pid}/{modality}_{k}.bmp"
                    _write_image(str(tmp_path / rel))
                    lines.append(f"{rel} {pid}")
            (tmp_path / "idx" / f"{split}_{modality}_3.txt").write_text("\n".join(lines) + "\n")
    data = load_regdb(str(tmp_path), trial=3)
    assert data.protocol == "cross-modality" and data.num_train_pids == 2 and data.num_modalities == 2
    assert len(data.train) == 8
    assert {(s.camid, s.modality) for s in data.query} == {(0, 0)}
    assert {(s.camid, s.modality) for s in data.gallery} == {(1, 1)}
    reverse = load_regdb(str(tmp_path), trial=3, query="thermal")
    assert {s.modality for s in reverse.query} == {1}
    with pytest.raises(FileNotFoundError, match="train_visible_4"):
        load_regdb(str(tmp_path), trial=4)


# --------------------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(0, num_train_ids=12, num_test_ids=8)


def test_synthetic_is_deterministic_and_seeded(synthetic):
    again = make_synthetic(0, num_train_ids=12, num_test_ids=8)
    assert np.array_equal(synthetic.images, again.images)
    assert synthetic.train == again.train and synthetic.query == again.query
    other = make_synthetic(1, num_train_ids=12, num_test_ids=8)
    assert not np.array_equal(synthetic.images[:10], other.images[:10])


def test_synthetic_splits_follow_the_market_protocol(synthetic):
    assert synthetic.images.dtype == np.uint8 and synthetic.images.shape[1:] == (128, 64, 3)
    assert synthetic.num_train_pids == 12 and sorted({s.pid for s in synthetic.train}) == list(range(12))
    test_pids = {s.pid for s in synthetic.query}
    assert len(test_pids) == 8 and test_pids == {s.pid for s in synthetic.gallery}
    assert len(synthetic.query) == 16  # one query from each of two cameras per identity
    # Every query has a gallery match from another camera (the protocol removes same-camera ones).
    for q in synthetic.query:
        assert any(g.pid == q.pid and g.camid != q.camid for g in synthetic.gallery)
    assert len({s.camid for s in synthetic.train}) == 6


def test_synthetic_cameras_differ_in_appearance(synthetic):
    means = {}
    for s in synthetic.train + synthetic.gallery:
        means.setdefault(s.camid, []).append(synthetic.images[s.source].reshape(-1, 3).mean(0))
    cam_means = np.array([np.mean(v, axis=0) for _, v in sorted(means.items())])
    # Colour cast, brightness and background move each camera's mean colour.
    assert np.ptp(cam_means, axis=0).max() > 20


def test_synthetic_infrared_modality():
    data = make_synthetic(0, num_train_ids=6, num_test_ids=4, infrared=True)
    assert data.protocol == "cross-modality" and data.num_modalities == 2
    ir = [s for s in data.train if s.modality == 1]
    assert ir and {s.pid for s in ir} == {s.pid for s in data.train}
    img = data.images[ir[0].source]
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])
    assert {s.modality for s in data.query} == {1} and {s.modality for s in data.gallery} == {0}


def test_default_synthetic_size():
    data = make_synthetic(0)
    assert data.num_train_pids >= 100 and len({s.pid for s in data.gallery}) >= 100
    assert len({s.camid for s in data.gallery}) >= 4


# --------------------------------------------------------------------------- samplers


def test_pk_sampler_batches():
    labels = [i // 5 for i in range(50)] + [10, 11]  # 10 ids x 5 images, 2 singletons
    sampler = PKSampler(labels, num_identities=4, num_instances=2, seed=1)
    sampler.set_epoch(0)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        counts = Counter(labels[i] for i in batch)
        assert len(batch) == 8 and len(counts) == 4 and set(counts.values()) == {2}
    sampler.set_epoch(0)
    assert list(sampler) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_pk_sampler_ranks_split_one_plan():
    labels = [i // 4 for i in range(80)]
    full = PKSampler(labels, 4, 4, seed=0)
    parts = [PKSampler(labels, 4, 4, seed=0, rank=r, world_size=2) for r in range(2)]
    for s in (full, *parts):
        s.set_epoch(3)
    plan = list(full)
    assert len(parts[0]) == len(parts[1]) == len(plan) // 2
    assert list(parts[0]) == plan[0::2][: len(parts[0])] and list(parts[1]) == plan[1::2][: len(parts[1])]


def test_pk_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_identities"):
        PKSampler([0, 0, 1, 1], num_identities=3, num_instances=2)
    with pytest.raises(ValueError, match="num_instances"):
        PKSampler([0, 0, 1, 1], num_identities=2, num_instances=0)
    with pytest.raises(ValueError, match="rank"):
        PKSampler([0, 0, 1, 1], 2, 2, rank=2, world_size=2)


def test_cross_modality_sampler_batches():
    labels = [i // 6 for i in range(60)]
    modalities = [i % 2 for i in range(60)]
    sampler = CrossModalityPKSampler(labels, modalities, num_identities=3, num_instances=2, seed=0)
    sampler.set_epoch(0)
    batches = list(sampler)
    assert len(batches) == 30 // 6
    for batch in batches:
        assert len(batch) == 12
        for j in range(3):  # per identity: K visible then K infrared
            group = batch[4 * j : 4 * j + 4]
            assert len({labels[i] for i in group}) == 1
            assert [modalities[i] for i in group] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="both 0"):
        CrossModalityPKSampler(labels, [0] * 60, 3, 2)


# --------------------------------------------------------------------------- transforms


def test_eval_transform_resizes_and_normalizes():
    image = torch.full((3, 128, 64), 255, dtype=torch.uint8)
    out = ReIDTransform((96, 32))(image)
    assert out.shape == (3, 96, 32) and out.dtype == torch.float32
    expected = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(out[:, 50, 10], expected)


def test_train_transform_flip_pad_and_determinism():
    image = torch.zeros((3, 16, 8), dtype=torch.uint8)
    image[:, :, 0] = 255  # a bright left column
    flip = ReIDTransform((16, 8), train=True, flip_p=1.0, pad=0, erasing_p=0.0)
    out = flip(image)
    assert (out[:, :, -1] > out[:, :, 0]).all()  # now on the right
    augment = ReIDTransform((16, 8), train=True, pad=2)
    torch.manual_seed(5)
    a = torch.stack([augment(image) for _ in range(8)])
    torch.manual_seed(5)
    b = torch.stack([augment(image) for _ in range(8)])
    torch.testing.assert_close(a, b)
    assert a.shape == (8, 3, 16, 8)


def test_grayscale_and_random_erasing():
    image = torch.rand(3, 20, 10)
    gray = to_grayscale(image)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    torch.manual_seed(0)
    erased = random_erasing(torch.ones(3, 20, 10), area=(0.2, 0.2), ratio=(1.0, 1.0))
    zeros = (erased == 0).all(dim=0).sum().item()
    assert 0 < zeros <= 0.25 * 200


def test_transform_rejects_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        ReIDTransform((0, 8))
    with pytest.raises(ValueError, match="erasing_p"):
        ReIDTransform((8, 8), erasing_p=1.5)
    with pytest.raises(ValueError, match="image"):
        ReIDTransform((8, 8))(torch.zeros(8, 8, dtype=torch.uint8))


def test_image_dataset_transform_per_modality():
    images = np.zeros((2, 8, 4, 3), np.uint8)
    samples = [Sample(0, 0, 0, 0), Sample(1, 0, 1, 1)]
    dataset = ImageDataset(samples, {0: lambda x: x[:1].float(), 1: lambda x: x.float() + 1}, images)
    assert dataset[0][0].shape == (1, 8, 4) and dataset[1][0].shape == (3, 8, 4) and dataset[1][0].min() == 1
    with pytest.raises(ValueError, match=r"no entry for modalities \[1\]"):
        ImageDataset(samples, {0: lambda x: x}, images)
