"""Shared helpers of the benchmark scripts: do_bench medians, copy bandwidth, CSV rows, tables."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import triton
import triton.testing
from rich.console import Console
from rich.table import Table

__all__ = ["DEVICE", "bench_ms", "copy_bandwidth_gbs", "context", "append_csv", "print_table", "markdown_table"]


# Figures only mean something on a GPU; on a CPU the scripts run (slowly, Triton interpreted)
# so that their logic can be checked, and their timings are marked as such in every row.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bench_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile of ``fn``'s runtime in ms (``triton.testing.do_bench``)."""
    if DEVICE.type != "cuda":  # smoke runs only: three calls, wall clock
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), min(times), max(times)
    med, lo, hi = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return float(med), float(lo), float(hi)


def graph_ms(fn: Callable[[], object]) -> float:
    """Median of ``fn`` replayed from a CUDA graph in ms (no host overhead: ``triton.testing.do_bench_cudagraph``);
    NaN off the GPU."""
    if DEVICE.type != "cuda":
        return float("nan")
    return float(triton.testing.do_bench_cudagraph(fn, rep=100, quantiles=[0.5]))


def copy_bandwidth_gbs(nbytes: int = 2**30) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read and written (the decode roofline)."""
    src = torch.randn(nbytes // 2, dtype=torch.float16, device=DEVICE)
    dst = torch.empty_like(src)
    med, _, _ = bench_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / (med * 1e-3) / 1e9


def context() -> dict[str, str]:
    """GPU name, date and library versions for a CSV row."""
    import transformers

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "gpu": gpu,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
    }


def append_csv(path: str | os.PathLike[str], row: dict[str, object]) -> None:
    """Append ``row`` (plus :func:`context`) to ``path``, writing a header for a new file.

    A file whose header differs (another benchmark's, or an older version) is not mixed into:
    the row goes to ``<stem>.<n>.csv`` next to it instead.
    """
    full = {**context(), **row}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while p.exists():
        with p.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header == list(full):
            break
        p = Path(path).with_suffix(f".{n}.csv")
        n += 1
    new = not p.exists()
    with p.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(full))
        if new:
            w.writeheader()
        w.writerow(full)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def print_table(title: str, rows: Sequence[dict[str, object]], columns: Sequence[str] | None = None) -> None:
    """A rich table of ``rows`` on stdout."""
    if not rows:
        return
    columns = list(columns or rows[0])
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*(_fmt(r.get(c, "")) for c in columns))
    Console(width=250).print(table)


def markdown_table(rows: Sequence[dict[str, object]], columns: Sequence[str] | None = None) -> str:
    """The same rows as a Markdown table (for docs/)."""
    if not rows:
        return ""
    columns = list(columns or rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def report_row(title: str, row: dict[str, object], csv_path: str | os.PathLike[str] | None) -> None:
    """Show one finished row at once (long experiments) and append it to ``csv_path`` when given."""
    print_table(title, [row])
    if csv_path:
        append_csv(csv_path, row)
