"""A procedural re-ID dataset: drawn pedestrians seen by differing cameras.

Every identity is a set of attributes: clothing colours (45% of them
achromatic, as in real crowds), a top pattern (solid, horizontal or vertical
stripes, two-tone, a chest logo seen only from the front), top and sleeve
length, trousers / shorts / skirt, hair colour and length, an optional hat,
backpack or shoulder bag (seen from some views only), build and stature, and
near-infrared reflectances for every garment.

Every camera has its own colour cast, brightness, gamma, blur, noise,
lighting direction, background (wall, floor, furniture) and preferred
viewpoints (front, back, left, right) and distances. Every image draws a
viewpoint, stride, arm swing and position, and now and then a clutter patch
(another passer-by) and an occluder. Infrared cameras render
the same people in grey levels from the garments' reflectances, which only
loosely follow the visible colours, as with real near-infrared cameras.

Identification therefore needs invariance to camera colour and viewpoint and
attention to several attributes at once: a real (if small) re-ID problem.
Everything derives from the seed through numpy's SeedSequence, so the same
seed gives the same dataset; a few thousand images take seconds.
"""
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

from .datasets import ReIDDataset, Sample

__all__ = ["make_synthetic"]

VIEWS = ("front", "back", "left", "right")
# Stream ids of the seed sequences, so that identities, cameras, images and
# split decisions draw from independent streams.
_IDENTITY, _CAMERA, _IMAGE, _SPLIT = 1, 2, 3, 4


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """An RGB colour in [0, 1]: 45% achromatic (black to white), else a random hue."""
    if rng.random() < 0.45:
        return np.full(3, rng.uniform(0.05, 0.9), dtype=np.float32)
    hue = rng.random()
    sat = rng.uniform(0.25, 1.0)
    val = rng.uniform(0.25, 0.95)
    # HSV -> RGB on the six hue sectors.
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6.0) % 6.0
    rgb = val - val * sat * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return rgb.astype(np.float32)


_SKIN = np.array([[0.95, 0.8, 0.69], [0.87, 0.68, 0.54], [0.72, 0.52, 0.38], [0.5, 0.34, 0.24], [0.33, 0.22, 0.15]], np.float32)
_HAIR = np.array([[0.06, 0.05, 0.05], [0.25, 0.16, 0.09], [0.55, 0.4, 0.22], [0.85, 0.75, 0.5], [0.6, 0.6, 0.6]], np.float32)


@dataclass
class _Identity:
    colours: dict  # garment name -> RGB ndarray[3]
    ir: dict  # garment name -> near-infrared reflectance in [0, 1]
    pattern: str  # "solid", "hstripes", "vstripes", "split", "logo"
    stripe: float  # stripe period, in units of body height
    waist: float  # where the top ends, in units of body height from the head
    long_sleeves: bool
    bottom: str  # "trousers", "shorts", "skirt"
    bag: str  # "none", "backpack", "shoulder"
    bag_side: int  # +1: on the person's left, -1: right
    long_hair: bool
    hat: bool
    build: float  # width scale
    stature: float  # height scale


def _make_identity(rng: np.random.Generator) -> _Identity:
    colours = {name: _random_colour(rng) for name in ("top", "top2", "bottom", "shoes", "bag", "hat")}
    colours["skin"] = _SKIN[rng.integers(len(_SKIN))]
    colours["hair"] = _HAIR[rng.integers(len(_HAIR))]
    # Near-infrared reflectance follows the visible brightness only in part: it depends on the dye.
    ir = {
        name: float(np.clip(0.1 + 0.35 * rng.random() + 0.45 * colours[name].mean(), 0.0, 1.0))
        for name in ("top", "top2", "bottom", "shoes", "bag", "hat")
    }
    ir["skin"] = float(rng.uniform(0.6, 0.8))
    ir["hair"] = float(rng.uniform(0.15, 0.45))
    return _Identity(
        colours=colours,
        ir=ir,
        pattern=str(rng.choice(["solid", "hstripes", "vstripes", "split", "logo"], p=[0.4, 0.15, 0.15, 0.15, 0.15])),
        stripe=float(rng.uniform(0.04, 0.08)),
        waist=float(rng.uniform(0.47, 0.62)),
        long_sleeves=bool(rng.random() < 0.6),
        bottom=str(rng.choice(["trousers", "shorts", "skirt"], p=[0.65, 0.15, 0.2])),
        bag=str(rng.choice(["none", "backpack", "shoulder"], p=[0.5, 0.25, 0.25])),
        bag_side=int(rng.choice([-1, 1])),
        long_hair=bool(rng.random() < 0.3),
        hat=bool(rng.random() < 0.15),
        build=float(rng.uniform(0.85, 1.15)),
        stature=float(rng.uniform(0.9, 1.0)),
    )


@dataclass
class _Camera:
    infrared: bool
    gain: np.ndarray  # per-channel colour cast
    brightness: float
    gamma: float
    blur: float  # Gaussian sigma, pixels at 128 x 64
    noise: float
    light: float  # left-right illumination gradient
    wall: np.ndarray
    floor: np.ndarray
    horizon: float
    furniture: List[Tuple[float, float, float, np.ndarray]]  # (x, width, top, colour), fractions of the image
    view_p: np.ndarray  # probabilities of VIEWS
    scale: Tuple[float, float]  # person height / image height


def _make_camera(rng: np.random.Generator, infrared: bool) -> _Camera:
    def dull(r):
        c = _random_colour(r) * r.uniform(0.4, 0.9)
        return np.full(3, c.mean(), np.float32) if infrared else c

    view_p = rng.dirichlet(np.full(len(VIEWS), 0.7))
    near = rng.uniform(0.7, 0.95)
    return _Camera(
        infrared=infrared,
        gain=np.ones(3, np.float32) if infrared else np.clip(1.0 + rng.normal(0.0, 0.25, 3), 0.55, 1.5).astype(np.float32),
        brightness=float(rng.uniform(0.5, 1.3)),
        gamma=float(rng.uniform(0.75, 1.3)),
        blur=float(rng.uniform(0.8, 1.8) if infrared else rng.uniform(0.0, 1.4)),
        noise=float(rng.uniform(0.01, 0.05)),
        light=float(rng.uniform(-0.5, 0.5)),
        wall=dull(rng),
        floor=dull(rng),
        horizon=float(rng.uniform(0.45, 0.8)),
        furniture=[
            (float(rng.random()), float(rng.uniform(0.1, 0.35)), float(rng.uniform(0.1, 0.6)), dull(rng))
            for _ in range(rng.integers(1, 4))
        ],
        view_p=view_p,
        scale=(near - 0.12, near),
    )


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of ndarray[H, W, 3] with edge padding."""
    radius = int(np.ceil(2.5 * sigma))
    if radius < 1:
        return img
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    taps /= taps.sum()
    for axis in (0, 1):
        padded = np.pad(img, [(radius, radius) if a == axis else (0, 0) for a in range(3)], mode="edge")
        n = img.shape[axis]
        img = sum(w * padded.take(np.arange(i, i + n), axis=axis) for i, w in enumerate(taps))
    return img


class _Renderer:
    """Draws one image of an identity seen by a camera, at (height, width)."""

    def __init__(self, height: int, width: int):
        self.h, self.w = height, width
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        self.yy, self.xx = yy, xx

    def render(self, person: _Identity, cam: _Camera, rng: np.random.Generator) -> np.ndarray:
        h, w = self.h, self.w
        grey = cam.infrared

        def colour(name: str) -> np.ndarray:
            if grey:
                return np.full(3, person.ir[name], np.float32)
            return person.colours[name]

        # Scene: wall, floor, furniture, then a clutter patch (another passer-by's coat).
        img = np.empty((h, w, 3), np.float32)
        horizon = int(cam.horizon * h)
        img[:horizon] = cam.wall
        img[horizon:] = cam.floor
        shift = rng.uniform(-0.05, 0.05)
        for x, width, top, c in cam.furniture:
            x0 = int((x + shift) * w)
            img[int(top * h) : horizon, max(x0, 0) : max(x0 + int(width * w), 0)] = c
        if rng.random() < 0.3:
            cx = int(rng.choice([rng.uniform(-0.1, 0.15), rng.uniform(0.85, 1.1)]) * w)
            cy = int(rng.uniform(0.2, 0.6) * h)
            patch = np.full(3, rng.uniform(0.1, 0.9), np.float32) if grey else _random_colour(rng)
            img[max(cy, 0) : cy + int(0.35 * h), max(cx - int(0.12 * w), 0) : max(cx + int(0.12 * w), 0)] = patch

        # Person geometry, in units of body height: ry from the top of the head
        # (0) to the soles (1), rx from the body axis.
        hp = h * rng.uniform(*cam.scale) * person.stature
        y0 = (h - hp) / 2 + rng.uniform(-0.03, 0.03) * h
        cx = w / 2 + rng.uniform(-0.08, 0.08) * w
        ry = (self.yy - y0) / hp
        rx = (self.xx - cx) / hp
        view = VIEWS[rng.choice(len(VIEWS), p=cam.view_p)]
        side_view = view in ("left", "right")
        if view == "left":
            rx = -rx  # draw every side view facing right, then it is mirrored
        # Which of the person's sides (+1 left, -1 right) appears at rx > 0.
        lateral = {"front": 1, "back": -1, "left": 0, "right": 0}[view]
        near_side = 1 if view == "right" else -1
        stride = rng.uniform(-1.0, 1.0)
        build = person.build

        def paint(mask: np.ndarray, c: np.ndarray) -> None:
            img[mask] = c

        # Legs and shoes.
        skin = colour("skin")
        if side_view:
            legs = [stride * 0.12 * np.clip((ry - 0.5) / 0.45, 0, 1), -stride * 0.12 * np.clip((ry - 0.5) / 0.45, 0, 1)]
            leg_half = 0.045 * build
        else:
            spread = 0.045 + 0.015 * abs(stride)
            legs = [np.full_like(rx, spread * build), np.full_like(rx, -spread * build)]
            leg_half = 0.04 * build
        bottom_end = {"trousers": 0.93, "shorts": 0.68, "skirt": 0.5}[person.bottom]
        for centre in legs:
            leg = (np.abs(rx - centre) < leg_half) & (ry >= 0.5) & (ry < 0.93)
            paint(leg & (ry < bottom_end), colour("bottom"))
            paint(leg & (ry >= bottom_end), skin)
            shoe_x = rx - centre - (0.02 if side_view else 0.0)
            paint((np.abs(shoe_x) < leg_half + 0.01) & (ry >= 0.93) & (ry < 1.0), colour("shoes"))
        paint((np.abs(rx) < 0.085 * build) & (ry >= 0.48) & (ry < 0.58), colour("bottom"))  # hips
        if person.bottom == "skirt":
            flare = 0.1 * build + 0.08 * np.clip((ry - 0.5) / 0.22, 0, 1)
            paint((np.abs(rx) < flare) & (ry >= 0.5) & (ry < 0.72), colour("bottom"))

        # Backpack behind the torso in side views; shoulder bag on its side.
        if person.bag == "backpack" and side_view:
            paint((rx > -0.15 * build) & (rx < -0.06 * build) & (ry > 0.18) & (ry < 0.44), colour("bag"))

        # Torso and top pattern.
        shoulder = (0.075 if side_view else 0.12) * build
        taper = 1.0 - 0.15 * np.clip((ry - 0.15) / (person.waist - 0.15), 0, 1)
        torso = (np.abs(rx) < shoulder * taper) & (ry >= 0.15) & (ry < person.waist)
        top = colour("top")
        paint(torso, top)
        if person.pattern == "hstripes":
            paint(torso & (np.floor((ry - 0.15) / person.stripe) % 2 == 1), colour("top2"))
        elif person.pattern == "vstripes":
            paint(torso & (np.floor(rx / (person.stripe * 0.6)) % 2 == 1), colour("top2"))
        elif person.pattern == "split":
            if side_view:
                if near_side == 1:
                    paint(torso, colour("top2"))
            else:
                paint(torso & (rx * lateral > 0), colour("top2"))
        elif person.pattern == "logo" and view == "front":
            paint((np.abs(rx) < 0.05) & (ry > 0.22) & (ry < 0.3), colour("top2"))

        # Arms: two beside the torso seen from the front or back, one swinging in side views.
        sleeve_end = 0.5 if person.long_sleeves else 0.26
        if side_view:
            swing = 0.25 * stride
            arm_x = [swing * np.clip(ry - 0.16, 0, None)]
        else:
            arm_x = [shoulder + 0.03 * build, -shoulder - 0.03 * build]
        for ax in arm_x:
            arm = (np.abs(rx - ax) < 0.03 * build) & (ry >= 0.16) & (ry < 0.54)
            paint(arm & (ry < sleeve_end), top)
            paint(arm & (ry >= sleeve_end), skin)

        if person.bag == "backpack":
            if view == "back":
                paint((np.abs(rx) < 0.085 * build) & (ry > 0.18) & (ry < 0.44), colour("bag"))
            elif view == "front":
                for sx in (-0.06, 0.06):
                    paint((np.abs(rx - sx * build) < 0.012) & (ry > 0.15) & (ry < 0.4), colour("bag"))
        elif person.bag == "shoulder":
            if side_view:
                visible_x = 0.0 if near_side == person.bag_side else None
            else:
                visible_x = (shoulder + 0.06 * build) * person.bag_side * lateral
            if visible_x is not None:
                paint((np.abs(rx - visible_x) < 0.045) & (ry > 0.42) & (ry < 0.56), colour("bag"))

        # Head, face, hair, hat.
        head = ((ry - 0.075) / 0.075) ** 2 + (rx / 0.055) ** 2 < 1.0
        paint(head, skin)
        hair = colour("hair")
        if view == "back":
            paint(head, hair)
            if person.long_hair:
                paint((np.abs(rx) < 0.055) & (ry >= 0.1) & (ry < 0.27), hair)
        elif side_view:
            paint(head & ((rx < -0.01) | (ry < 0.04)), hair)
            if person.long_hair:
                paint((rx > -0.06) & (rx < -0.01) & (ry >= 0.1) & (ry < 0.25), hair)
        else:
            paint(head & ((ry < 0.045) | (np.abs(rx) > 0.042)), hair)
        if person.hat:
            paint((np.abs(rx) < 0.065) & (ry > -0.01) & (ry < 0.045), colour("hat"))

        # Occluder in front of the legs (a bench, a car bonnet) now and then.
        if rng.random() < 0.15:
            top_row = int(rng.uniform(0.7, 0.85) * h)
            img[top_row:] = np.full(3, rng.uniform(0.1, 0.8), np.float32) if grey else _random_colour(rng)

        # Camera response: lighting gradient, colour cast, brightness, gamma, blur, noise.
        img *= (1.0 + cam.light * (self.xx / w - 0.5))[..., None]
        img *= cam.gain * cam.brightness * rng.uniform(0.9, 1.1)
        img = np.clip(img, 0.0, 1.0) ** cam.gamma
        img = _gaussian_blur(img, cam.blur * h / 128.0)
        img += rng.normal(0.0, cam.noise, img.shape).astype(np.float32)
        if grey:
            img = np.repeat(img.mean(axis=2, keepdims=True), 3, axis=2)
        return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def make_synthetic(
    seed: int = 0,
    *,
    num_train_ids: int = 200,
    num_test_ids: int = 100,
    num_cameras: int = 6,
    infrared: bool = False,
    image_size: Tuple[int, int] = (128, 64),
    images_per_camera: Tuple[int, int] = (2, 3),
) -> ReIDDataset:
    """Generate the synthetic re-ID dataset of ``seed``.

    Args:
        num_train_ids, num_test_ids: identities of the two disjoint splits.
        num_cameras: visible-light cameras; every identity passes 2 or more.
        infrared: also two infrared cameras that every identity passes; the
            protocol is then infrared queries against the visible gallery
            ("cross-modality"), else Market-1501's ("market": per test
            identity one query from each of two cameras, the rest is gallery).
        image_size: (height, width) of the stored images.
        images_per_camera: (min, max) images of an identity in each camera it
            passes (test identities get at least 2, one of which may be a query).

    Returns a ``ReIDDataset`` with in-memory images (``images``, uint8
    ndarray[N, H, W, 3]); identities are numbered from 1, test after train.
    """
    if num_train_ids < 2 or num_test_ids < 1:
        raise ValueError(f"need num_train_ids >= 2 and num_test_ids >= 1, got {num_train_ids}, {num_test_ids}")
    if num_cameras < 2:
        raise ValueError(f"num_cameras must be >= 2, got {num_cameras}")
    lo, hi = images_per_camera
    if not 1 <= lo <= hi:
        raise ValueError(f"images_per_camera must be (min, max) with 1 <= min <= max, got {images_per_camera}")
    renderer = _Renderer(*image_size)
    cameras = [_make_camera(np.random.default_rng([seed, _CAMERA, c]), False) for c in range(num_cameras)]
    if infrared:
        cameras += [_make_camera(np.random.default_rng([seed, _CAMERA, num_cameras + c]), True) for c in range(2)]

    images: List[np.ndarray] = []
    train: List[Sample] = []
    query: List[Sample] = []
    gallery: List[Sample] = []
    for pid in range(1, num_train_ids + num_test_ids + 1):
        is_test = pid > num_train_ids
        person = _make_identity(np.random.default_rng([seed, _IDENTITY, pid]))
        rng = np.random.default_rng([seed, _SPLIT, pid])
        visits = sorted(rng.choice(num_cameras, size=rng.integers(2, num_cameras + 1), replace=False).tolist())
        query_cams = set(rng.choice(visits, size=2, replace=False).tolist()) if is_test and not infrared else set()
        visits += list(range(num_cameras, len(cameras)))
        for cam in visits:
            count = int(rng.integers(max(lo, 2) if is_test else lo, hi + 1))
            modality = int(cameras[cam].infrared)
            for k in range(count):
                image_rng = np.random.default_rng([seed, _IMAGE, pid, cam, k])
                sample = Sample(len(images), pid, cam, modality)
                images.append(renderer.render(person, cameras[cam], image_rng))
                if not is_test:
                    train.append(sample)
                elif infrared:
                    (query if modality else gallery).append(sample)
                else:
                    (query if k == 0 and cam in query_cams else gallery).append(sample)
    name = "synthetic-vi" if infrared else "synthetic"
    protocol = "cross-modality" if infrared else "market"
    train = [s._replace(pid=s.pid - 1) for s in train]  # 0..C-1 like every training split
    return ReIDDataset(name, train, query, gallery, protocol=protocol, images=np.stack(images))
