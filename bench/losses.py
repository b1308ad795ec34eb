"""Side-by-side benchmark of reid-ext's losses: forward+backward time and peak memory.

For every loss and size it runs, in one process and on the same inputs:

  reid_ext  the public functions of `reid_ext` (fused kernels);
  eager     `reid_ext.reference`, the plain-PyTorch versions that build the N x M matrix;
  compile   torch.compile of those reference functions (compilation excluded from the timing);
  pml       pytorch-metric-learning, configured to compute the same loss, where it has one.

Time is the median of repeated forward+backward steps after warm-up (CUDA events after a
synchronisation on a GPU, perf_counter on CPU); peak memory is what the step allocates
beyond the inputs that already exist. Results go to stdout as a table and to a JSON file;
`--plot` draws the speedup over eager against N. bench/host_cost.py measures the per-call
cost of each loss against a trivial custom op built the same way. The parts of this one:
bench/harness.py (timing and memory), bench/cases.py (losses, inputs, sizes),
bench/targets.py, bench/report.py (table and plot). See bench/README.md, "What is measured".

    python bench/losses.py --quick                      # a subset, < 2 minutes on 2 CPU cores
    python bench/losses.py                              # the full CPU table
    python bench/losses.py --device cuda --plot cuda.png
"""
import argparse
import gc
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import List, Sequence, Tuple

import harness  # noqa: E402  (sets KINETO_LOG_LEVEL before torch loads)
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import reid_ext  # noqa: E402
from cases import CLASSES, IMPLS, LOSSES, check_agreement, make_inputs, make_step, plan, why_skip  # noqa: E402
from harness import Budget, device_name, git, measure_case  # noqa: E402
from report import format_table, plot  # noqa: E402
from targets import check_targets  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


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

    failures = check_agreement(specs, impls, device, args.classes)
    if failures:
        sys.exit("bench: implementations disagree with the eager reference, so timing them side by side "
                 "would mislead:\n" + "\n".join(failures))
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
        "load_average": {"cores": os.cpu_count(), "start": harness.load_average(), "end": None},
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
        measured, failed = measure_case(lambda impl: make_step(spec, impl, inputs), runnable, device, args.budget)
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
    results["load_average"]["end"] = harness.load_average()
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
