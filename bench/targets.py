"""The performance targets, named by what they measure, checked against a run's rows."""
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from report import by_case, ratio


@dataclass(frozen=True)
class Target:
    """A performance target: reid_ext against `versus` over the selected sizes."""

    text: str
    losses: Tuple[str, ...]
    versus: str  # "eager" or "compile": a speedup at least `bound`; "memory": a fraction at most
    bound: float
    sizes: Callable[[int, int, Optional[int]], bool]


_TRIPLET = ("unified_triplet_loss/all", "unified_triplet_loss/cross", "batch_hard_triplet_loss",
            "hetero_center_triplet_loss")
_COSINE = ("cosine_similarity", "cosine_softmax_loss")
_HEADLINE = ("unified_triplet_loss/all", "batch_hard_triplet_loss", "hetero_center_triplet_loss")
TARGETS = {
    "cpu": (
        Target(">= 3x faster than eager at N <= 256", _TRIPLET, "eager", 3.0, lambda n, d, m: n <= 256),
        Target(">= 1.5x faster than compile at N <= 256", _TRIPLET, "compile", 1.5, lambda n, d, m: n <= 256),
        Target(">= 2x faster than eager at N = 4096", _TRIPLET, "eager", 2.0, lambda n, d, m: n == 4096),
        Target("peak memory <= 1/4 of eager's at N = 4096", _TRIPLET, "memory", 0.25, lambda n, d, m: n == 4096),
        Target("no slower than compile at any size", _COSINE, "compile", 1.0, lambda n, d, m: True),
        Target(">= 2x faster than eager at the headline sizes N=128, D=2048 and N=4096, D=256", _HEADLINE,
               "eager", 2.0, lambda n, d, m: (n, d) in ((128, 2048), (4096, 256))),
        Target("peak memory <= 1/4 of eager's at N=8192, D=256", _HEADLINE, "memory", 0.25,
               lambda n, d, m: (n, d) == (8192, 256)),
    ),
    "cuda": (
        Target(">= 5x faster than eager at N <= 256", _TRIPLET, "eager", 5.0, lambda n, d, m: n <= 256),
        Target(">= 2x faster than compile at N <= 256", _TRIPLET, "compile", 2.0, lambda n, d, m: n <= 256),
        Target(">= 2x faster than eager against a bank of M = 65536", ("unified_triplet_loss/bank",),
               "eager", 2.0, lambda n, d, m: m == 65536),
        Target("peak memory well under one N x M float32 buffer (<= 1/4 of it) at M = 65536",
               ("unified_triplet_loss/bank",), "nm_buffer", 0.25, lambda n, d, m: m == 65536),
    ),
}


def check_targets(results: dict) -> List[str]:
    """One line per (target, loss): met or missed, with the worst measured ratio and its size."""
    cases = by_case(results["rows"])
    measured = {key[0] for key in cases}
    lines, unmeasured = [], 0
    for target in TARGETS[results["device_type"]]:
        for loss in (loss for loss in target.losses if loss in measured):
            worst = None
            for (name, n, d, m), by_impl in cases.items():
                ours = by_impl.get("reid_ext")
                if name != loss or ours is None or not target.sizes(n, d, m):
                    continue
                if target.versus == "memory":
                    value = ratio(ours, by_impl.get("eager"), "peak_mib")
                elif target.versus == "nm_buffer":
                    value = ours["peak_mib"] / (n * m * 4 / 2**20)
                else:
                    value = ratio(by_impl.get(target.versus), ours, "ms")
                if value is None:
                    continue
                lower_is_better = target.versus in ("memory", "nm_buffer")
                if worst is None or (value > worst[0] if lower_is_better else value < worst[0]):
                    worst = (value, n, d, m)
            if worst is None:
                unmeasured += 1
                continue
            value, n, d, m = worst
            met = value <= target.bound if target.versus in ("memory", "nm_buffer") else value >= target.bound
            shown = f"{value:.3f} of it" if target.versus in ("memory", "nm_buffer") else f"{value:.2f}x"
            where = f"N={n}, D={d}" + (f", M={m}" if m is not None else "")
            lines.append(f"  {'met' if met else 'MISSED':<7} {loss}: {target.text}: worst {shown} ({where})")
    if unmeasured:
        lines.append(f"  n/a     {unmeasured} more: their sizes were not in this run")
    return lines
