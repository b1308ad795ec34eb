"""The loss benchmark's report: the table of a run, and the plot of its speedups."""
import itertools
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from cases import IMPLS, LOSSES


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


def by_case(rows: List[dict]) -> Dict[Tuple, Dict[str, dict]]:
    """{(loss, N, D, M): {impl: row}}, in the order the cases ran."""
    cases: Dict[Tuple, Dict[str, dict]] = {}
    for row in rows:
        cases.setdefault((row["loss"], row["N"], row["D"], row["M"]), {})[row["impl"]] = row
    return cases


def ratio(num: Optional[dict], den: Optional[dict], key: str) -> Optional[float]:
    if num is None or den is None or not den[key]:
        return None
    return num[key] / den[key]


COLUMNS = (["N", "D", "M"] + [f"{impl} ms" for impl in IMPLS] + [f"{impl} MiB" for impl in IMPLS]
           + ["x eager", "x compile", "mem/eager"])


def format_table(results: dict, markdown: bool = False) -> str:
    """Per loss, one line per size: ms and MiB per implementation, then reid_ext's speedups
    over eager and compile and its peak memory over eager's."""
    cases = by_case(results["rows"])
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
                + [_times(ratio(eager, ours, "ms")), _times(ratio(compiled, ours, "ms")),
                   _num(ratio(ours, eager, "peak_mib"))]
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


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, whatever display the machine has
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    cases = by_case(results["rows"])
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
