"""What a training run (train_mgn.py) writes and reads back: files written atomically, checkpoints
that hold only tensors and plain data, RNG states, metric logs and their plot.
"""
import json
import os
import random
import re
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch

__all__ = [
    "METRIC_KEYS",
    "atomic_write",
    "write_json",
    "write_jsonl",
    "save_checkpoint",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
    "plot_curves",
]

METRIC_KEYS = ("rank1", "mAP", "mINP")


def atomic_write(path: str, write: Callable, mode: str = "wb") -> None:
    """``write(file)`` into a temporary file, flushed to disk, then renamed over ``path``.

    Readers never see a partial file, and neither a crash nor a power loss leaves a truncated
    one under ``path``: the data is on disk before the rename, the rename once the directory is synced.
    """
    tmp = f"{path}.tmp"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, obj: Dict[str, object]) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"), mode="w")


def write_jsonl(path: str, records: List[Dict[str, object]]) -> None:
    atomic_write(path, lambda f: f.writelines(json.dumps(record) + "\n" for record in records), mode="w")


def save_checkpoint(path: str, state: Dict[str, object]) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str, required: Sequence[str]) -> Dict[str, object]:
    """A checkpoint with the ``required`` keys, loaded with weights_only=True: a file that holds anything
    but tensors and plain data is refused (ValueError) before any of it runs."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for foreign objects, RuntimeError for a file that is no zip archive
        # Not torch's advice to allowlist the object: that is what an attacker would want.
        foreign = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        reason = f"it refers to {foreign.group(1)}, which is not plain data" if foreign else first_line
        raise ValueError(
            f"{path} is not a checkpoint this trainer can load safely ({reason}); "
            "checkpoints hold only tensors and plain data and are loaded with weights_only=True"
        ) from None
    missing = [key for key in required if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"{path} is not a checkpoint of this trainer: it lacks {', '.join(missing)}")
    return state


def rng_state() -> Dict[str, object]:
    """The RNG states of torch, CUDA, numpy and Python as tensors and plain data (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: Dict[str, object]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))


def plot_curves(path: str, history: List[Dict[str, object]]) -> None:
    """PNG of the training losses (left) and the evaluation metrics (right) against epochs."""
    import matplotlib

    matplotlib.use("Agg")  # files only, whatever display the machine has
    import matplotlib.pyplot as plt

    losses = sorted({k for r in history if "loss" in r for k in r if k.startswith("loss")})
    metric_series = {k: [(r["epoch"], r[k]) for r in history if k in r] for k in METRIC_KEYS}
    if any("rerank" in r for r in history):
        metric_series["re-ranked mAP"] = [(r["epoch"], r["rerank"]["mAP"]) for r in history if "rerank" in r]
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for key in losses:
        points = [(r["epoch"], r[key]) for r in history if key in r]
        loss_ax.plot(*zip(*points), marker=".", label=key)
    for name, points in metric_series.items():
        if points:
            metric_ax.plot(*zip(*points), marker="o", label=name)
    for ax, title in ((loss_ax, "training loss"), (metric_ax, "test metrics")):
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
