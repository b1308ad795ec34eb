"""Benchmark: reid_ext's k-reciprocal re-ranking against the dense numpy algorithm.

For each size Q x G (random float32 features of dimension D), every case runs in a fresh
subprocess, on the same inputs:

  mm                    torch.mm of the stacked (Q+G) x D features with their transpose: the
                        similarity product that neither side can skip (the floor);
  re_ranking            reid_ext.evaluation.re_ranking(qf, gf) from the features;
  distances             the three cosine distance matrices 1 - S (Q x G, Q x Q, G x G), the
                        numpy algorithm's input, by reid_ext.cosine_similarity;
  re_ranking_distances  reid_ext.evaluation.re_ranking_distances on those float32 matrices;
  numpy                 the dense numpy algorithm on the same matrices: torchreid's or
                        fast-reid's re_ranking if importable, else ``dense_re_ranking`` below.

Time: the first run is a warm-up; if it took under --repeat-below-s, the median of --repeats more
runs, else that one run. Peak memory: the increase of the subprocess's peak resident set size
(VmHWM, reset through /proc/self/clear_refs once the inputs exist and a run on a 4 x 16 problem
has loaded the code) over its resident size then, during the first run: everything the case
allocates, whatever the allocator. The numpy
algorithm is skipped where its dense matrices would exceed --max-numpy-gb.

    python bench/rerank.py                               # Q x G = 500 x 3000 and 3368 x 15913, D = 2048
    python bench/rerank.py --sizes 500x3000 --repeats 1  # one size, fewer runs

``dense_re_ranking`` is a transcription of the re_ranking function that fast-reid and torchreid
ship; tests/test_rerank.py checks reid_ext against it too.
"""
import argparse
import gc
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CASES = ("mm", "re_ranking", "distances", "re_ranking_distances", "numpy")


def dense_re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3, dtype=np.float32):
    """The standard k-reciprocal re-ranking on dense (Q+G) x (Q+G) matrices, in ``dtype``
    (float32 as the standard code; float64 for the tests). Returns ndarray[Q, G]."""
    num_query = q_g_dist.shape[0]
    full = np.block([[q_q_dist, q_g_dist], [q_g_dist.T, g_g_dist]])
    squared = np.square(full).astype(dtype)
    original = (squared / squared.max(axis=0)).T  # each column by its maximum, then transposed
    n = original.shape[0]
    rank = np.argsort(original, axis=1)

    def reciprocal(i, k):
        forward = rank[i, : k + 1]
        return forward[(rank[forward, : k + 1] == i).any(axis=1)]

    half = int(np.around(k1 / 2.0))
    V = np.zeros((n, n), dtype=dtype)
    for i in range(n):
        members = reciprocal(i, k1)
        expansion = members
        for c in members:
            candidate = reciprocal(c, half)
            if len(np.intersect1d(candidate, members)) > 2.0 / 3 * len(candidate):
                expansion = np.append(expansion, candidate)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        V[i, expansion] = weight / weight.sum()
    if k2 != 1:
        expanded = np.zeros_like(V)
        for i in range(n):
            expanded[i] = V[rank[i, :k2]].mean(axis=0)
        V = expanded
    holders = [np.flatnonzero(V[:, f]) for f in range(n)]  # the rows that hold column f
    jaccard = np.zeros((num_query, n), dtype=dtype)
    for i in range(num_query):
        overlap = np.zeros(n, dtype=dtype)
        for f in np.flatnonzero(V[i]):
            overlap[holders[f]] += np.minimum(V[i, f], V[holders[f], f])
        jaccard[i] = 1 - overlap / (2 - overlap)
    final = jaccard * (1 - lambda_value) + original[:num_query] * lambda_value
    return final[:, num_query:]


# ---------------------------------------------------------------- one case, in its own process


def standard_re_ranking():
    """(name, function) of the numpy algorithm: torchreid's or fast-reid's if importable, else ours."""
    try:
        from torchreid.utils.rerank import re_ranking

        return "torchreid.utils.rerank.re_ranking", re_ranking
    except ImportError:
        pass
    try:
        from fastreid.evaluation.rerank import re_ranking

        return "fastreid.evaluation.rerank.re_ranking", re_ranking
    except ImportError:
        pass
    return "bench/rerank.py dense_re_ranking (torchreid and fast-reid are not importable)", dense_re_ranking


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def make_case(case: str, q: int, g: int, d: int, seed: int):
    """(function to time, name of the numpy implementation or None) on random features."""
    import torch

    import reid_ext
    from reid_ext.evaluation import re_ranking, re_ranking_distances

    x = torch.randn(q + g, d, generator=torch.Generator().manual_seed(seed))
    qf, gf = x[:q], x[q:]

    def distances():
        return tuple(1 - reid_ext.cosine_similarity(a, b) for a, b in ((qf, gf), (qf, qf), (gf, gf)))

    if case == "mm":
        return (lambda: torch.mm(x, x.t())), None
    if case == "re_ranking":
        return (lambda: re_ranking(qf, gf)), None
    if case == "distances":
        return distances, None
    dist = distances()
    if case == "re_ranking_distances":
        return (lambda: re_ranking_distances(*dist)), None
    dist = tuple(t.numpy() for t in dist)
    name, standard = standard_re_ranking()
    return (lambda: standard(*dist)), name


def run_case(case: str, q: int, g: int, d: int, seed: int, repeats: int, repeat_below_s: float, save=None) -> dict:
    import torch

    make_case(case, 4, 16, d, seed)[0]()  # loads and pages in the code paths: not part of the peak
    fn, name = make_case(case, q, g, d, seed)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak resident size starts again from the current one
    base_kib = _status_kib("VmRSS")
    start = time.perf_counter()
    out = fn()
    times = [time.perf_counter() - start]
    peak_mib = (_status_kib("VmHWM") - base_kib) / 1024
    if save is not None:
        np.save(save, np.asarray(out))
    del out
    if times[0] < repeat_below_s:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return {"case": case, "Q": q, "G": g, "D": d, "s": statistics.median(times), "runs": [round(t, 4) for t in times],
            "peak_mib": round(peak_mib, 1), "impl": name, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------- the driver


def numpy_gb(q: int, g: int) -> float:
    """What the dense algorithm holds at once: the input distances, the concatenated, squared and
    scaled (Q+G)^2 float32 matrices, V and its expansion, and the int64 argsort: about 9 x 4 (Q+G)^2 bytes."""
    return 9 * 4 * (q + g) ** 2 / 2**30


def spawn(case, q, g, args, save=None) -> dict:
    command = [sys.executable, __file__, "--worker", case, "--sizes", f"{q}x{g}", "--d", str(args.d),
               "--seed", str(args.seed), "--threads", str(args.threads), "--repeats", str(args.repeats),
               "--repeat-below-s", str(args.repeat_below_s)] + (["--save", save] if save else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"case": case, "Q": q, "G": g, "D": args.d, "error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}g}"


def table(rows) -> str:
    lines = ["| Q x G | case | s | runs | peak MiB | x numpy time | peak / numpy's |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        cells = [f"{row['Q']} x {row['G']}", row["case"], _fmt(row.get("s")), str(len(row.get("runs", []))),
                 _fmt(row.get("peak_mib"), 4), _fmt(row.get("speedup")), _fmt(row.get("mem_ratio"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows) -> list:
    by = {(r["Q"], r["G"], r["case"]): r for r in rows if "s" in r}
    lines = []

    def verdict(ok):
        return "met" if ok else "MISSED"

    for q, g in sorted({(r["Q"], r["G"]) for r in rows}):
        rr, rd, mm, npy = (by.get((q, g, c)) for c in ("re_ranking", "re_ranking_distances", "mm", "numpy"))
        if rd and npy:
            speed, mem = npy["s"] / rd["s"], rd["peak_mib"] / max(npy["peak_mib"], 1e-9)
            lines.append(f"{q} x {g}: re_ranking_distances {speed:.1f}x faster than numpy (target >= 20x: "
                         f"{verdict(speed >= 20)}), peak {mem:.3f} of numpy's (target <= 0.25: {verdict(mem <= 0.25)})")
        if rr and mm:
            ratio = rr["s"] / mm["s"]
            lines.append(f"{q} x {g}: re_ranking {ratio:.2f}x the (Q+G) x (Q+G) torch.mm (target <= 2: "
                         f"{verdict(ratio <= 2)})")
        if rr and q + g > 10000:
            lines.append(f"{q} x {g}: re_ranking {rr['s']:.1f} s (target < 60: {verdict(rr['s'] < 60)}), peak "
                         f"{rr['peak_mib']:.0f} MiB (target < 2048: {verdict(rr['peak_mib'] < 2048)})")
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Time and peak memory of reid_ext's re-ranking against the "
                                                 "dense numpy algorithm.")
    parser.add_argument("--sizes", default="500x3000,3368x15913", help="comma-separated QxG (default %(default)s)")
    parser.add_argument("--d", type=int, default=2048, help="feature dimension (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (default %(default)s)")
    parser.add_argument("--repeat-below-s", type=float, default=20.0,
                        help="repeat only cases whose warm-up run is shorter (default %(default)s)")
    parser.add_argument("--max-numpy-gb", type=float, default=4.0,
                        help="skip the numpy algorithm where its dense matrices would need more (default %(default)s)")
    parser.add_argument("--out", type=Path, help="JSON results (default bench/results/rerank-<cpu>.json)")
    parser.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = [tuple(int(v) for v in size.lower().split("x")) for size in args.sizes.split(",")]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))  # this checkout's reid_ext
    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        (q, g), = args.sizes
        print(json.dumps(run_case(args.worker, q, g, args.d, args.seed, args.repeats, args.repeat_below_s, args.save)))
        return 0
    from harness import device_name, git, load_average
    from tqdm import tqdm

    name = device_name(torch.device("cpu"))
    # as bench/losses.py names its files: "cpu-Intel(R) Xeon(R) Processor" -> "Intel_Xeon_Processor"
    stem = "_".join(re.sub(r"\((R|TM)\)|[^A-Za-z0-9.-]+", " ", name.removeprefix("cpu-")).split())
    out = args.out or RESULTS / f"rerank-{stem}.json"
    results = {"command": shlex.join(["python", "bench/rerank.py"] + (sys.argv[1:] if argv is None else argv)),
               "device": name, "torch": torch.__version__, "threads": args.threads, "cores": os.cpu_count(),
               "commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", ".")),
               "numpy_impl": standard_re_ranking()[0], "load_average": {"start": load_average()},
               "peak_memory": "VmHWM increase of the case's subprocess during its first run", "rows": []}
    plan = [(q, g, case) for q, g in args.sizes for case in CASES]
    with tempfile.TemporaryDirectory() as tmp:
        for q, g, case in tqdm(plan, unit="case"):
            if case == "numpy" and numpy_gb(q, g) > args.max_numpy_gb:
                row = {"case": case, "Q": q, "G": g, "D": args.d,
                       "skipped": f"needs about {numpy_gb(q, g):.1f} GB > --max-numpy-gb {args.max_numpy_gb}"}
            else:
                save = os.path.join(tmp, f"{q}x{g}-{case}.npy") if case in ("re_ranking", "numpy") else None
                row = spawn(case, q, g, args, save)
            results["rows"].append(row)
            tqdm.write(json.dumps(row))
        for q, g in args.sizes:
            rows = {r["case"]: r for r in results["rows"] if (r["Q"], r["G"]) == (q, g)}
            npy = rows["numpy"] if "s" in rows.get("numpy", {}) else None
            if npy:
                diff = np.abs(np.load(os.path.join(tmp, f"{q}x{g}-re_ranking.npy"))
                              - np.load(os.path.join(tmp, f"{q}x{g}-numpy.npy"))).max()
                rows["re_ranking"]["max_abs_diff_to_numpy"] = float(diff)
                for case, row in rows.items():
                    if "s" in row and case != "numpy":
                        row["speedup"] = npy["s"] / row["s"]
                        row["mem_ratio"] = row["peak_mib"] / max(npy["peak_mib"], 1e-9)
    results["load_average"]["end"] = load_average()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    markdown = table(results["rows"])
    out.with_suffix(".md").write_text(f"`{results['command']}` ({name}, {args.threads} threads, commit "
                                      f"{results['commit']})\n\n{markdown}\n")
    print(f"\n{name}, torch {results['torch']}, {args.threads} threads, commit {results['commit']}; numpy: "
          f"{results['numpy_impl']}; 1-minute load average {results['load_average']['start']:.1f} at the start, "
          f"{results['load_average']['end']:.1f} at the end")
    print(markdown)
    for row in results["rows"]:
        if "skipped" in row or "error" in row:
            print(f"{row['Q']} x {row['G']} {row['case']}: {row.get('skipped') or 'error: ' + row['error']}")
        if "max_abs_diff_to_numpy" in row:
            print(f"{row['Q']} x {row['G']}: max |re_ranking - numpy| = {row['max_abs_diff_to_numpy']:.2e}")
    print("targets:\n" + "\n".join(targets(results["rows"])))
    print(f"results: {out}")
    return 1 if any("error" in row for row in results["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
