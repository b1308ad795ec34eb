"""Side-by-side benchmark of reid-ext's losses: forward+backward time and peak memory.

For every loss and size it runs, in one process and on the same inputs:

  reid_ext  the public functions of `reid_ext` (fused kernels);
  eager     `reid_ext.reference`, the plain-PyTorch versions that build the N x M matrix;
  compile   torch.compile of those reference functions (compilation excluded from the timing);
  pml       pytorch-metric-learning, configured to compute the same loss, where it has one.

Time is the median of repeated forward+backward steps after warm-up (CUDA events after a
synchronisation on a GPU, perf_counter on CPU); peak memory is what the step allocates
beyond the inputs that already exist. Results go to stdout as a table and to a JSON file;
`--plot` draws the speedup over eager against N. See bench/README.md and DESIGN.md,
"Performance: how to measure".

    python bench/losses.py --quick                      # a subset, < 2 minutes on 2 CPU cores
    python bench/losses.py                              # the full CPU table
    python bench/losses.py --device cuda --plot cuda.png
"""
import argparse
import gc
import itertools
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# Kineto, behind torch.profiler, prints a line to stderr at every profiling session start and
# stop unless its log level is at least 6; the CPU memory measurement below opens one session
# per step, and those lines would tear up the progress bar. Must be set before torch loads.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from tqdm import tqdm  # noqa: E402

import reid_ext  # noqa: E402
from reid_ext import reference  # noqa: E402

IMPLS = ("reid_ext", "eager", "compile", "pml")
K = 4  # samples per identity in a P x K batch, K / 2 of them in each of the two modalities
CLASSES = 751  # cosine_softmax_loss classes: the identities of Market-1501's training set
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------- inputs and losses


@dataclass
class Inputs:
    """One case's tensors; `leaves` receive gradients, `grad_out` seeds a non-scalar output."""

    x: torch.Tensor
    labels: torch.Tensor
    modalities: torch.Tensor
    ref: Optional[torch.Tensor] = None
    ref_labels: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    grad_out: Optional[torch.Tensor] = None

    @property
    def leaves(self) -> List[torch.Tensor]:
        return [t for t in (self.x, self.weight) if t is not None]


def make_inputs(n: int, d: int, m: Optional[int], kind: str, device: torch.device, seed: int = 0) -> Inputs:
    """A P x K batch laid out as a visible-infrared re-ID sampler does: the first half of the
    batch is modality 0, the second half modality 1, and every identity has K / 2 samples in
    each half, so that each anchor has positives in its own and in the other modality."""
    gen = torch.Generator().manual_seed(seed)
    halves = (n // 2, n - n // 2)
    labels = torch.cat([torch.arange(h) // (K // 2) for h in halves])
    modalities = torch.cat([torch.full((h,), i) for i, h in enumerate(halves)])
    t = Inputs(x=torch.randn(n, d, generator=gen), labels=labels, modalities=modalities)
    if kind == "bank":
        # A detached memory bank (as CrossBatchMemory holds, so it takes no gradient) in which
        # every identity of the batch has M / P entries.
        t.ref = torch.randn(m, d, generator=gen)
        t.ref_labels = torch.arange(m) % (int(labels.max()) + 1)
    elif kind == "classes":
        t.weight = torch.randn(m, d, generator=gen)
        t.labels = labels % m
    elif kind == "matrix":
        t.grad_out = torch.randn(n, n, generator=gen)
    for name in ("x", "labels", "modalities", "ref", "ref_labels", "weight", "grad_out"):
        value = getattr(t, name)
        if value is not None:
            setattr(t, name, value.to(device))
    for leaf in t.leaves:
        leaf.requires_grad_(True)
    return t


@dataclass
class Step:
    """One forward+backward: `forward()` returns the output, `leaves` get their .grad reset."""

    forward: Callable[[], torch.Tensor]
    leaves: List[torch.Tensor]
    grad_out: Optional[torch.Tensor] = None

    def run(self) -> torch.Tensor:
        out = self.forward()
        out.backward(self.grad_out)
        return out

    def clear(self) -> None:
        for leaf in self.leaves:
            leaf.grad = None


@dataclass(frozen=True)
class LossSpec:
    """A benchmarked loss: which function, how to call it, and its pytorch-metric-learning twin."""

    name: str
    fn: str  # the function's name in reid_ext and in reid_ext.reference
    call: Callable[[Callable, Inputs], torch.Tensor]
    kind: str = "batch"  # "batch": the batch is its own reference set; "bank", "classes", "matrix"
    triplet: bool = True  # a triplet loss: gets the extra memory row and the triplet targets
    pml: Optional[Callable[[Inputs], Step]] = None
    no_pml: str = ""  # why there is no pml equivalent, when pml is None


def _pml_cosine_similarity(t: Inputs) -> Step:
    from pytorch_metric_learning.distances import CosineSimilarity

    similarity = CosineSimilarity()
    return Step(lambda: similarity(t.x), [t.x], t.grad_out)


def _pml_batch_hard(t: Inputs) -> Step:
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.losses import TripletMarginLoss
    from pytorch_metric_learning.miners import BatchHardMiner
    from pytorch_metric_learning.reducers import MeanReducer

    # Raw (non-normalized) euclidean distances for both the miner and the loss, as
    # metric="euclidean" is. The miner emits one triplet per anchor that has a positive and a
    # negative, so MeanReducer divides by the number of valid anchors, as reduction="mean"
    # does; pml's default AvgNonZeroReducer would drop the anchors with zero loss.
    def distance():
        return LpDistance(normalize_embeddings=False, p=2, power=1)

    miner = BatchHardMiner(distance=distance())
    loss = TripletMarginLoss(margin=0.3, distance=distance(), reducer=MeanReducer())
    return Step(lambda: loss(t.x, t.labels, miner(t.x, t.labels)), [t.x])


def _pml_cosface(t: Inputs) -> Step:
    from pytorch_metric_learning.losses import CosFaceLoss
    from pytorch_metric_learning.reducers import MeanReducer

    classes, dim = t.weight.shape
    loss = CosFaceLoss(classes, dim, margin=0.35, scale=64.0, reducer=MeanReducer()).to(t.x.device)
    # pml keeps its class weights as W[D, C]: start from the same weights as the others.
    with torch.no_grad():
        loss.W.copy_(t.weight.t())
    return Step(lambda: loss(t.x, t.labels), [t.x, loss.W])


_NO_UNIFIED = "pml has no unified batch-all loss; its CircleLoss adds adaptive per-pair weights"

LOSSES: Dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("cosine_similarity", "cosine_similarity", lambda f, t: f(t.x),
                 kind="matrix", triplet=False, pml=_pml_cosine_similarity),
        LossSpec("unified_triplet_loss/all", "unified_triplet_loss", lambda f, t: f(t.x, t.labels),
                 no_pml=_NO_UNIFIED),
        LossSpec("unified_triplet_loss/cross", "unified_triplet_loss",
                 lambda f, t: f(t.x, t.labels, modalities=t.modalities, mode="cross"), no_pml=_NO_UNIFIED),
        LossSpec("unified_triplet_loss/bank", "unified_triplet_loss",
                 lambda f, t: f(t.x, t.labels, ref=t.ref, ref_labels=t.ref_labels), kind="bank",
                 no_pml=_NO_UNIFIED),
        LossSpec("batch_hard_triplet_loss", "batch_hard_triplet_loss", lambda f, t: f(t.x, t.labels),
                 pml=_pml_batch_hard),
        LossSpec("hetero_center_triplet_loss", "hetero_center_triplet_loss",
                 lambda f, t: f(t.x, t.labels, t.modalities), no_pml="pml has no modality-center loss"),
        LossSpec("cosine_softmax_loss", "cosine_softmax_loss", lambda f, t: f(t.x, t.weight, t.labels),
                 kind="classes", triplet=False, pml=_pml_cosface),
    )
}


def make_step(spec: LossSpec, impl: str, t: Inputs) -> Step:
    if impl == "pml":
        return spec.pml(t)
    if impl == "reid_ext":
        fn = getattr(reid_ext, spec.fn)
    elif impl == "eager":
        fn = getattr(reference, spec.fn)
    else:
        # One static graph per case, the most favourable setting for compile. The reset keeps
        # earlier sizes from counting against dynamo's recompile limit, past which it would
        # silently fall back to eager.
        torch._dynamo.reset()
        fn = torch.compile(getattr(reference, spec.fn), dynamic=False)
    return Step(lambda: spec.call(fn, t), t.leaves, t.grad_out)


# ---------------------------------------------------------------- measurement


@dataclass
class Budget:
    warmup: int  # steps before timing (the first one of `compile` compiles)
    min_reps: int
    min_time_s: float  # after min_reps, more rounds until they add up to this per implementation
    max_reps: int
    max_step_s: float  # skip an implementation whose warm-up step takes longer


class TooSlow(Exception):
    pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(step: Step, device: torch.device, budget: Budget, compiles: bool) -> None:
    for i in range(budget.warmup):
        step.clear()
        start = time.perf_counter()
        step.run()
        _sync(device)
        seconds = time.perf_counter() - start
        if compiles and i == 0:
            continue  # compilation, not a step
        if seconds > budget.max_step_s:
            raise TooSlow(f"one step took {seconds:.0f} s (> --max-step-s {budget.max_step_s:g})")
        if seconds > 1.0:
            break  # per-call caches are warm after one step this long


def time_once(step: Step, device: torch.device) -> float:
    """One forward+backward in milliseconds; the previous step's gradients are freed first."""
    step.clear()
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        begin.record()
        step.run()
        end.record()
        torch.cuda.synchronize(device)
        return begin.elapsed_time(end)
    start = time.perf_counter()
    step.run()
    return (time.perf_counter() - start) * 1e3


def measure_case(spec: LossSpec, impls: Sequence[str], inputs: Inputs, device: torch.device,
                 budget: Budget) -> Tuple[Dict[str, Tuple[float, float]], Dict[str, str]]:
    """({impl: (median ms, peak MiB)}, {impl: why it was skipped}) for one case.

    The implementations are timed in interleaved rounds, one step each per round, so that
    a burst of load from other processes lands on all of them alike and their ratios stay
    fair; each one's time is the median of its steps.
    """
    steps: Dict[str, Step] = {}
    skipped: Dict[str, str] = {}
    for impl in impls:
        try:
            step = make_step(spec, impl, inputs)
            warm_up(step, device, budget, compiles=impl == "compile")
            steps[impl] = step
        except (TooSlow, torch.cuda.OutOfMemoryError) as err:
            skipped[impl] = str(err).splitlines()[0]
        except Exception as err:  # noqa: BLE001 - recorded, reported, and fails the run at the end
            skipped[impl] = f"error: {type(err).__name__}: {err}".splitlines()[0]
    times: Dict[str, List[float]] = {impl: [] for impl in steps}
    rounds, spent = 0, 0.0
    while steps and (rounds < budget.min_reps
                     or (spent < budget.min_time_s * len(steps) and rounds < budget.max_reps)):
        for impl, step in steps.items():
            ms = time_once(step, device)
            times[impl].append(ms)
            spent += ms / 1e3
        rounds += 1
    measured = {impl: (statistics.median(times[impl]), peak_mib(steps[impl], device)) for impl in steps}
    return measured, skipped


def peak_mib(step: Step, device: torch.device) -> float:
    """Peak bytes allocated by one forward+backward step beyond what was allocated before it.

    CUDA: the caching allocator's own high-water mark, reset before the step.
    CPU: PyTorch's CPU allocator keeps no high-water mark, so the step runs once under
    torch.profiler with profile_memory=True, which records every tensor allocation and free
    with its size; the peak of their running sum is the same quantity as on CUDA. It sees
    tensors (outputs, saved activations, gradients, an op's scratch tensors), not memory a
    kernel takes from malloc directly. A block allocated before the step and freed in it has
    no event (torch warns once), which is right: its allocation is not in the sum either.
    Process RSS would not do: freed memory stays mapped, so a step's RSS peak depends on the
    steps before it.
    """
    step.clear()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step.run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step.run()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak / 2**20


# ---------------------------------------------------------------- agreement check


def check_agreement(specs: Sequence[LossSpec], impls: Sequence[str], device: torch.device, classes: int) -> None:
    """Before timing anything: reid_ext and pml must compute the eager reference's loss and
    gradient, or the comparison would not be between equals. Half of the identities are tight
    clusters, so that many anchors have a zero loss: a reducer that drops those (pml's
    default AvgNonZeroReducer) or a distance that normalizes would then disagree."""
    failures = []
    for spec in specs:
        m = {"bank": 64, "classes": classes}.get(spec.kind)
        t = make_inputs(32, 64, m, spec.kind, device, seed=1)
        centers = torch.randn(32, 64, generator=torch.Generator().manual_seed(2)).to(device)
        tight = t.labels % 2 == 0
        with torch.no_grad():
            t.x[tight] = centers[t.labels[tight]] + 0.05 * t.x[tight]
        expected_step = make_step(spec, "eager", t)
        expected_step.clear()
        expected = expected_step.run().detach()
        expected_grad = t.x.grad.clone()
        for impl in impls:
            if impl not in ("reid_ext", "pml") or (impl == "pml" and spec.pml is None):
                continue
            step = make_step(spec, impl, t)
            step.clear()
            try:
                torch.testing.assert_close(step.run().detach(), expected, rtol=1e-3, atol=1e-4)
                torch.testing.assert_close(t.x.grad, expected_grad, rtol=1e-3, atol=1e-4)
            except AssertionError as err:
                failures.append(f"{spec.name}, {impl} vs eager: {err}")
    if failures:
        sys.exit("bench: implementations disagree with the eager reference, so timing them side by side "
                 "would mislead:\n" + "\n".join(failures))


# ---------------------------------------------------------------- what to run


@dataclass(frozen=True)
class Case:
    loss: str
    n: int
    d: int
    m: Optional[int]  # bank rows or classes; None when the batch is its own reference set


# The largest peak bytes per (anchor, reference) pair among eager, compile and pml, measured
# at N = 1024, D = 256 on CPU and rounded up: N x M times this is about what they allocate.
PAIR_BYTES = {"matrix": 12, "batch": 32, "bank": 32, "classes": 24}


def plan(specs: Sequence[LossSpec], args) -> List[Case]:
    cases = []
    for spec in specs:
        if spec.kind == "bank":
            cases += [Case(spec.name, args.bank_n, d, m) for m in args.bank_m for d in args.d]
            continue
        m = args.classes if spec.kind == "classes" else None
        cases += [Case(spec.name, n, d, m) for n in args.n for d in args.d]
        if spec.triplet and args.memory_row:
            n, d = args.memory_row
            if Case(spec.name, n, d, m) not in cases:
                cases.append(Case(spec.name, n, d, m))
    return cases


def why_skip(spec: LossSpec, impl: str, case: Case, max_gb: float) -> Optional[str]:
    if impl == "reid_ext":
        return None  # O(N + M) extra memory by design: that is what the benchmark shows
    pairs = case.n * (case.m or case.n)
    need_gb = PAIR_BYTES[spec.kind] * pairs / 1e9
    if need_gb > max_gb:
        return f"would need about {need_gb:.3g} GB for its N x M matrices (> --max-gb {max_gb:g})"
    return None


# ---------------------------------------------------------------- report


def _num(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


def _times(value: Optional[float]) -> str:
    return "-" if value is None else f"{_num(value)}x"


def _by_case(rows: List[dict]) -> Dict[Tuple, Dict[str, dict]]:
    """{(loss, N, D, M): {impl: row}}, in the order the cases ran."""
    cases: Dict[Tuple, Dict[str, dict]] = {}
    for row in rows:
        cases.setdefault((row["loss"], row["N"], row["D"], row["M"]), {})[row["impl"]] = row
    return cases


def _ratio(num: Optional[dict], den: Optional[dict], key: str) -> Optional[float]:
    if num is None or den is None or not den[key]:
        return None
    return num[key] / den[key]


COLUMNS = (["N", "D", "M"] + [f"{impl} ms" for impl in IMPLS] + [f"{impl} MiB" for impl in IMPLS]
           + ["x eager", "x compile", "mem/eager"])


def format_table(results: dict, markdown: bool = False) -> str:
    """Per loss, one line per size: ms and MiB per implementation, then reid_ext's speedups
    over eager and compile and its peak memory over eager's."""
    cases = _by_case(results["rows"])
    lines = []
    for loss in dict.fromkeys(key[0] for key in cases):
        note = results["no_pml_equivalent"].get(loss)
        note = f" (pml: none, {note})" if note else ""
        table = []
        for (name, n, d, m), by_impl in cases.items():
            if name != loss:
                continue
            ours, eager, compiled = by_impl.get("reid_ext"), by_impl.get("eager"), by_impl.get("compile")
            table.append(
                [str(n), str(d), "-" if m is None else str(m)]
                + [_num(by_impl[i]["ms"]) if i in by_impl else "-" for i in IMPLS]
                + [_num(by_impl[i]["peak_mib"]) if i in by_impl else "-" for i in IMPLS]
                + [_times(_ratio(eager, ours, "ms")), _times(_ratio(compiled, ours, "ms")),
                   _num(_ratio(ours, eager, "peak_mib"))]
            )
        if markdown:
            lines += ["", f"`{loss}`{note}", "",
                      "| " + " | ".join(COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
            lines += ["| " + " | ".join(cells) + " |" for cells in table]
        else:
            table.insert(0, COLUMNS)
            widths = [max(len(cells[i]) for cells in table) for i in range(len(COLUMNS))]
            lines += ["", loss + note] + ["  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in table]
    lines.append("")
    for skip in results["skipped"]:
        size = f"N={skip['N']} D={skip['D']}" + (f" M={skip['M']}" if skip["M"] is not None else "")
        lines.append(f"skipped: {skip['loss']} {skip['impl']} {size}: {skip['reason']}")
    if not results["skipped"]:
        lines.append(f"skipped: nothing (eager, compile and pml run where their N x M matrices need at most "
                     f"--max-gb {results['max_gb']:g} GB and a step takes at most --max-step-s "
                     f"{results['timing']['max_step_s']:g} s)")
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    """A performance target of the issues: reid_ext against `versus` over the selected sizes."""

    text: str
    losses: Tuple[str, ...]
    versus: str  # "eager" or "compile": a speedup at least `bound`; "memory": a fraction at most
    bound: float
    sizes: Callable[[int, int, Optional[int]], bool]


_TRIPLET = ("unified_triplet_loss/all", "unified_triplet_loss/cross", "batch_hard_triplet_loss",
            "hetero_center_triplet_loss")
_COSINE = ("cosine_similarity", "cosine_softmax_loss")
_ISSUES_2_3 = ("unified_triplet_loss/all", "batch_hard_triplet_loss", "hetero_center_triplet_loss")
TARGETS = {
    "cpu": (
        Target(">= 3x faster than eager at N <= 256", _TRIPLET, "eager", 3.0, lambda n, d, m: n <= 256),
        Target(">= 1.5x faster than compile at N <= 256", _TRIPLET, "compile", 1.5, lambda n, d, m: n <= 256),
        Target(">= 2x faster than eager at N = 4096", _TRIPLET, "eager", 2.0, lambda n, d, m: n == 4096),
        Target("peak memory <= 1/4 of eager's at N = 4096", _TRIPLET, "memory", 0.25, lambda n, d, m: n == 4096),
        Target("no slower than compile at any size", _COSINE, "compile", 1.0, lambda n, d, m: True),
        Target(">= 2x faster than eager at N=128, D=2048 and N=4096, D=256 (issues 2, 3)", _ISSUES_2_3,
               "eager", 2.0, lambda n, d, m: (n, d) in ((128, 2048), (4096, 256))),
        Target("peak memory <= 1/4 of eager's at N=8192, D=256 (issues 2, 3)", _ISSUES_2_3, "memory", 0.25,
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
    cases = _by_case(results["rows"])
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
                    value = _ratio(ours, by_impl.get("eager"), "peak_mib")
                elif target.versus == "nm_buffer":
                    value = ours["peak_mib"] / (n * m * 4 / 2**20)
                else:
                    value = _ratio(by_impl.get(target.versus), ours, "ms")
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


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        sys.exit("bench: --plot needs matplotlib, an optional benchmark dependency: pip install matplotlib")
    cases = _by_case(results["rows"])
    losses = list(dict.fromkeys(key[0] for key in cases))
    cols = min(len(losses), 3)
    rows = math.ceil(len(losses) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax, loss in zip(axes.flat, losses):
        bank = LOSSES[loss].kind == "bank"
        for impl, color in zip(("reid_ext", "compile", "pml"), ("C0", "C1", "C2")):
            dims = sorted({key[2] for key in cases if key[0] == loss})
            for d, style in zip(dims, itertools.cycle(("o-", "s--", "^:", "d-."))):
                points = sorted(
                    (key[3] if bank else key[1], by_impl["eager"]["ms"] / by_impl[impl]["ms"])
                    for key, by_impl in cases.items()
                    if key[0] == loss and key[2] == d and impl in by_impl and "eager" in by_impl
                )
                if points:
                    ax.plot(*zip(*points), style, color=color, label=f"{impl}, D={d}")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set(xscale="log", yscale="log", title=loss, ylabel="speedup over eager",
               xlabel=f"bank size M (N = {next(k[1] for k in cases if k[0] == loss)})" if bank else "batch size N")
        ax.set_xticks(sorted({key[3] if bank else key[1] for key in cases if key[0] == loss}))
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
        # Speedups span less than a decade or two: label 1, 2, 5, 10, ... rather than decades.
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize="small")
    for ax in axes.flat[len(losses):]:
        ax.set_visible(False)
    fig.suptitle(f"forward+backward, {results['device']}, torch {results['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


# ---------------------------------------------------------------- main


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu-{model}"


def _load_average() -> Optional[float]:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def git(*argv: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *argv], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def _ints(text: str) -> Tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _memory_row(text: str) -> Tuple[int, ...]:
    if text == "none":
        return ()
    n, d = text.lower().split("x")
    return int(n), int(d)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Forward+backward time and peak memory of reid-ext's losses against eager PyTorch, "
                    "torch.compile and pytorch-metric-learning.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="a subset: one size per loss (N=128, D=256; a bank of 1024), short timing; "
                             "under 2 minutes on 2 CPU cores")
    parser.add_argument("--losses", default=",".join(LOSSES),
                        help="comma-separated names or prefixes, e.g. unified_triplet_loss for its three "
                             "variants (default: all)")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of %(default)s")
    parser.add_argument("--n", type=_ints, help="batch sizes N (default 16,64,128,256,512,1024,4096)")
    parser.add_argument("--d", type=_ints, help="feature sizes D (default 256,2048)")
    parser.add_argument("--bank-m", type=_ints,
                        help="reference bank sizes M (default 4096,16384 on CPU; 4096,16384,65536 on CUDA)")
    parser.add_argument("--bank-n", type=int, help="anchors against the bank (default 1024)")
    parser.add_argument("--classes", type=int, default=CLASSES,
                        help="cosine_softmax_loss classes C (default %(default)s)")
    parser.add_argument("--memory-row", type=_memory_row,
                        help="an extra NxD size for the triplet losses, for their memory targets, or 'none' "
                             "(default 8192x256)")
    parser.add_argument("--max-gb", type=float, default=8.0,
                        help="skip eager, compile and pml where their N x M matrices would need more "
                             "(default %(default)s)")
    parser.add_argument("--max-step-s", type=float, default=60.0,
                        help="skip an implementation whose warm-up step takes longer (default %(default)s)")
    parser.add_argument("--matmul-precision", choices=("highest", "high", "medium"),
                        help="torch.set_float32_matmul_precision for every implementation "
                             "(default: highest on CPU, high on CUDA, as the CUDA targets are stated)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", type=Path,
                        help="JSON results (default bench/results/<device>.json; <device>-quick.json with --quick)")
    parser.add_argument("--plot", type=Path, help="draw the speedup over eager against N into this PNG")
    parser.add_argument("--load", type=Path, help="print (and --plot) a saved JSON instead of running")
    parser.add_argument("--markdown", action="store_true", help="print the table in Markdown (for the README)")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        # on a GPU also the global batches of several ranks against themselves (N = 8192)
        "n": (128,) if quick else (16, 64, 128, 256, 512, 1024, 4096) + ((8192,) if args.device == "cuda" else ()),
        "d": (256,) if quick else (256, 2048),
        "bank_m": (1024,) if quick else (4096, 16384) + ((65536,) if args.device == "cuda" else ()),
        "bank_n": 128 if quick else 1024,
        "memory_row": () if quick else (8192, 256),
        "matmul_precision": "high" if args.device == "cuda" else "highest",
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.budget = (Budget(warmup=2, min_reps=3, min_time_s=0.2, max_reps=20, max_step_s=args.max_step_s)
                   if quick else
                   Budget(warmup=3, min_reps=5, min_time_s=1.0, max_reps=100, max_step_s=args.max_step_s))
    return args


def select(text: str, names: Sequence[str], what: str) -> List[str]:
    chosen = []
    for item in filter(None, text.split(",")):
        hits = [name for name in names if name == item or name.startswith(item)]
        if not hits:
            sys.exit(f"bench: unknown {what} {item!r}; choose from {', '.join(names)}")
        chosen += [hit for hit in hits if hit not in chosen]
    return chosen


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench: --device cuda, but torch sees no CUDA device")
    if device.type == "cuda" and not reid_ext.WITH_CUDA:
        sys.exit("bench: --device cuda, but reid_ext was built without its CUDA kernels")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision(args.matmul_precision)
    specs = [LOSSES[name] for name in select(args.losses, list(LOSSES), "loss")]
    impls = select(args.impls, IMPLS, "implementation")
    try:
        import pytorch_metric_learning

        pml_version = pytorch_metric_learning.__version__
    except ImportError:
        pml_version = None
        if "pml" in impls:
            print("pytorch-metric-learning is not installed: the pml rows are skipped "
                  "(pip install pytorch-metric-learning)")
            impls.remove("pml")

    check_agreement(specs, impls, device, args.classes)
    print("checked against eager (loss and gradient at N=32, D=64): "
          + ", ".join(i for i in impls if i in ("reid_ext", "pml")))

    name = device_name(device)
    results = {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable] + sys.argv)),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        # Other processes' load distorts CPU timings, sub-millisecond steps most of all.
        "load_average": {"cores": os.cpu_count(), "start": _load_average(), "end": None},
        "float32_matmul_precision": args.matmul_precision,
        "pytorch_metric_learning": pml_version,
        "timing": vars(args.budget),
        "max_gb": args.max_gb,
        "no_pml_equivalent": {s.name: s.no_pml for s in specs if s.pml is None and "pml" in impls},
        "rows": [],
        "skipped": [],
    }
    # A file name from the device name: "Intel(R) Xeon(R) Processor" -> "Intel_Xeon_Processor".
    stem = "_".join(re.sub(r"\((R|TM)\)|[^A-Za-z0-9.-]+", " ", name).split())
    out = args.out or RESULTS / (stem + ("-quick" if args.quick else "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    cases = plan(specs, args)
    progress = tqdm(cases, unit="case", dynamic_ncols=True)
    for case in progress:
        spec = LOSSES[case.loss]
        progress.set_description(f"{case.loss} N={case.n} D={case.d}" + (f" M={case.m}" if case.m else ""))
        runnable, skipped = [], {}
        for impl in impls:
            if impl == "pml" and spec.pml is None:
                continue
            reason = why_skip(spec, impl, case, args.max_gb)
            if reason is None:
                runnable.append(impl)
            else:
                skipped[impl] = reason
        # Reference cycles of the previous case (compiled functions) are collected now rather
        # than in the middle of a timed step.
        gc.collect()
        inputs = make_inputs(case.n, case.d, case.m, spec.kind, device)
        measured, failed = measure_case(spec, runnable, inputs, device, args.budget)
        del inputs
        skipped.update(failed)
        for impl, (ms, mib) in measured.items():
            results["rows"].append({"loss": case.loss, "impl": impl, "N": case.n, "D": case.d, "M": case.m,
                                    "ms": round(ms, 4), "peak_mib": round(mib, 3)})
        for impl, reason in skipped.items():
            results["skipped"].append({"loss": case.loss, "impl": impl, "N": case.n, "D": case.d, "M": case.m,
                                       "reason": reason})
            progress.write(f"skipped {case.loss} {impl} N={case.n} D={case.d}: {reason}")
        # After every case, so that an interrupted long run keeps what it measured.
        out.write_text(json.dumps(results, indent=1) + "\n")
    progress.close()
    results["load_average"]["end"] = _load_average()
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {out}")
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    results = json.loads(args.load.read_text()) if args.load else run(args)
    print(f"\n{results['device']}, torch {results['torch']}, commit {results['commit']}"
          + (" (with uncommitted changes)" if results["dirty"] else "")
          + (f", {results['threads']} threads" if results["threads"] else "")
          + f", float32 matmul precision {results['float32_matmul_precision']}")
    load = results.get("load_average")
    if load and None not in (load["start"], load["end"]):
        print(f"1-minute load average (this run included) {load['start']:.1f} at the start, "
              f"{load['end']:.1f} at the end, on {load['cores']} cores")
    print(f"command: {results['command']}")
    print("forward+backward, median ms and peak MiB; x eager / x compile: reid_ext's speedup; "
          "mem/eager: reid_ext's peak over eager's")
    print(format_table(results, markdown=args.markdown))
    print(f"\ntargets ({results['device_type']}):")
    print("\n".join(check_targets(results)))
    if args.plot:
        plot(results, args.plot)
    errors = [s for s in results["skipped"] if s["reason"].startswith("error:")]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
