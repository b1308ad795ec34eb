"""The per-call cost of each loss at batch sizes where the work is negligible, against the floor of
any custom op: a trivial one built the way reid-ext's ops are (a TORCH_LIBRARY schema, a one-line
C++ CPU kernel, and its fake kernel and autograd registered from Python through torch.library),
so that the ratio shows what reid-ext's Python side, checks and autograd node add.

    python bench/host_cost.py                     # N = 16, D = 16 and N = 64, D = 256, one thread

Each case runs forward+backward; the median over interleaved rounds (bench/harness.py).
"""
import argparse
import sys
from pathlib import Path

import harness  # noqa: F401  (sets KINETO_LOG_LEVEL before torch loads)
import torch
from torch.utils import cpp_extension

import reid_ext
from harness import Budget, Step, measure_case

BUILD = Path(__file__).resolve().parent.parent / "build" / "bench-trivial-op"
SOURCE = """
#include <ATen/ATen.h>
#include <torch/library.h>

at::Tensor twice_sum(const at::Tensor& x) { return (x * 2).sum(); }

TORCH_LIBRARY(reid_ext_bench, m) { m.def("twice_sum(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(reid_ext_bench, CPU, m) { m.impl("twice_sum", &twice_sum); }
"""


def trivial_op():
    """torch.ops.reid_ext_bench.twice_sum: 2 * sum(x), with autograd registered as reid-ext's."""
    if not hasattr(torch.ops, "reid_ext_bench") or not hasattr(torch.ops.reid_ext_bench, "twice_sum"):
        BUILD.mkdir(parents=True, exist_ok=True)
        cpp_extension.load_inline("reid_ext_bench_trivial", cpp_sources=[SOURCE], is_python_module=False,
                                  build_directory=str(BUILD))
        torch.library.register_fake("reid_ext_bench::twice_sum", lambda x: x.new_empty(()))

        def setup(ctx, inputs, output):
            ctx.shape = inputs[0].shape

        def backward(ctx, grad):
            return (2 * grad).expand(ctx.shape)

        torch.library.register_autograd("reid_ext_bench::twice_sum", backward, setup_context=setup)
    return torch.ops.reid_ext_bench.twice_sum.default


def cases(n: int, d: int):
    """(name, forward) per loss and the trivial op, on one P x K batch with two modalities."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen, requires_grad=True)
    labels = torch.arange(n) // 4
    modalities = torch.arange(n) % 2
    weight = torch.randn(8, d, generator=gen, requires_grad=True)
    op = trivial_op()
    return x, weight, [
        ("trivial custom op", lambda: op(x)),
        ("unified_triplet_loss", lambda: reid_ext.unified_triplet_loss(x, labels)),
        ("unified_triplet_loss/cross", lambda: reid_ext.unified_triplet_loss(x, labels, modalities=modalities,
                                                                              mode="cross")),
        ("batch_hard_triplet_loss", lambda: reid_ext.batch_hard_triplet_loss(x, labels)),
        ("hetero_center_triplet_loss", lambda: reid_ext.hetero_center_triplet_loss(x, labels, modalities)),
        ("cosine_softmax_loss", lambda: reid_ext.cosine_softmax_loss(x, weight, labels % 8)),
    ]


def run(sizes, budget: Budget):
    rows = []
    for n, d in sizes:
        x, weight, named = cases(n, d)
        steps = {name: Step(forward, [x, weight]) for name, forward in named}
        measured, skipped = measure_case(lambda name: steps[name], list(steps), torch.device("cpu"), budget)
        if skipped:
            sys.exit(f"host_cost: {skipped}")
        floor = measured["trivial custom op"][0]
        for name, (ms, _) in measured.items():
            rows.append({"N": n, "D": d, "loss": name, "us": round(ms * 1e3, 1), "x_trivial": round(ms / floor, 2)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run([(16, 16), (64, 256)], Budget(warmup=20, min_reps=200, min_time_s=2.0, max_reps=2000, max_step_s=10))
    print(f"forward+backward per call, {harness.device_name(torch.device('cpu'))}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); x trivial: over the trivial custom op with autograd")
    for row in rows:
        print(f"  N={row['N']:<4} D={row['D']:<4} {row['loss']:<28} {row['us']:8.1f} us  {row['x_trivial']:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
