"""The timing harness of the benchmarks: one forward+backward step, its warm-up, its median time
in interleaved rounds, and its peak memory (see bench/README.md, "What is measured")."""
import os

# Kineto, behind torch.profiler, prints a line to stderr at every profiling session start and
# stop unless its log level is at least 6; the CPU memory measurement below opens one session
# per step, and those lines would tear up the progress bar. Must be set before torch loads.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


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


def measure_case(make: Callable[[str], Step], impls: Sequence[str], device: torch.device,
                 budget: Budget) -> Tuple[Dict[str, Tuple[float, float]], Dict[str, str]]:
    """({impl: (median ms, peak MiB)}, {impl: why it was skipped}) for one case, whose step for
    each implementation make(impl) builds.

    The implementations are timed in interleaved rounds, one step each per round, so that
    a burst of load from other processes lands on all of them alike and their ratios stay
    fair; each one's time is the median of its steps.
    """
    steps: Dict[str, Step] = {}
    skipped: Dict[str, str] = {}
    for impl in impls:
        try:
            step = make(impl)
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


def load_average() -> Optional[float]:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def git(*argv: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *argv], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()
