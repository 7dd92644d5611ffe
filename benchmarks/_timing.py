"""Shared timing helpers of the benchmark scripts: do_bench medians, CSV rows with context."""

from __future__ import annotations

import csv
import datetime as _dt
import os
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.testing

__all__ = ["bench_ms", "context", "append_csv"]


def bench_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile of ``fn``'s runtime in ms (``triton.testing.do_bench``)."""
    med, lo, hi = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return float(med), float(lo), float(hi)


def context() -> dict[str, str]:
    """GPU name, date and library versions for a CSV row."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "gpu": gpu,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }


def append_csv(path: str | os.PathLike[str], row: dict[str, object]) -> None:
    """Append ``row`` (plus :func:`context`) to ``path``, writing a header for a new file."""
    full = {**context(), **row}
    p = Path(path)
    new = not p.exists()
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(full))
        if new:
            w.writeheader()
        w.writerow(full)
