"""A/B of two decode kernels from ``bench_decode_folded.py`` CSVs: the former kernel, a candidate, the former again.

Run the benchmark three times on one machine, in the order former, candidate, former (the second former run shows
the drift between runs; it may cover fewer rows), then

    python benchmarks/compare_decode_runs.py FORMER.csv CANDIDATE.csv [FORMER_AGAIN.csv]

prints per row the CUDA-graph replay times, the candidate's speedup over the mean of the former runs, its ratio to
fp16 SDPA (the former's in brackets) and the spread between the two former runs, then the median, min and max speedup
per shape. Reads each CSV's last row per (shape, batch, context): a CSV the benchmark appended to holds the newest.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path
from typing import NamedTuple

Key = tuple[str, int, int]


class RowAB(NamedTuple):
    """One table row of the A/B: graph-replay microseconds and ratios."""

    key: Key
    sdpa_us: float
    former_us: float
    candidate_us: float
    former_again_us: float | None
    speedup: float  # mean former time / candidate time
    candidate_vs_sdpa: float
    former_vs_sdpa: float


def read_rows(path: str | Path) -> dict[Key, dict[str, str]]:
    """The last row per ``(shape, batch, context)`` of a ``bench_decode_folded.py`` CSV."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "folded_graph_ms" not in rows[0]:
        raise ValueError(f"{path}: not a bench_decode_folded.py CSV (no folded_graph_ms column)")
    return {(r["shape"], int(r["batch"]), int(r["context"])): r for r in rows}


def compare(former: dict[Key, dict[str, str]], candidate: dict[Key, dict[str, str]],
            former_again: dict[Key, dict[str, str]] | None = None) -> list[RowAB]:
    """Rows present in both ``former`` and ``candidate``, in the former run's order."""
    out = []
    for key, f in former.items():
        c = candidate.get(key)
        if c is None:
            continue
        f_us, c_us = float(f["folded_graph_ms"]) * 1e3, float(c["folded_graph_ms"]) * 1e3
        again = (former_again or {}).get(key)
        a_us = float(again["folded_graph_ms"]) * 1e3 if again else None
        mean_former = f_us if a_us is None else (f_us + a_us) / 2
        out.append(RowAB(key, float(c["sdpa_graph_ms"]) * 1e3, f_us, c_us, a_us, mean_former / c_us,
                         float(c["graph_speedup_vs_sdpa"]), float(f["graph_speedup_vs_sdpa"])))
    return out


def report(rows: list[RowAB]) -> str:
    """The per-row table and the per-shape summary as text."""
    lines = ["shape      batch context | SDPA us | former us | cand us | former again us | former spread | "
             "cand speedup | cand x SDPA (former)"]
    for r in rows:
        again = "-" if r.former_again_us is None else f"{r.former_again_us:.2f}"
        spread = "-" if r.former_again_us is None else f"{abs(r.former_again_us / r.former_us - 1) * 100:.1f} %"
        lines.append(f"{r.key[0]:<10} {r.key[1]:>5} {r.key[2]:>7} | {r.sdpa_us:7.2f} | {r.former_us:9.2f} | "
                     f"{r.candidate_us:7.2f} | {again:>15} | {spread:>13} | {r.speedup:12.3f} | "
                     f"{r.candidate_vs_sdpa:.2f}x ({r.former_vs_sdpa:.2f}x)")
    for shape in dict.fromkeys(r.key[0] for r in rows):
        sp = [r.speedup for r in rows if r.key[0] == shape]
        lines.append(f"{shape}: candidate speedup median {statistics.median(sp):.3f}, min {min(sp):.3f}, "
                     f"max {max(sp):.3f} over {len(sp)} rows")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("former")
    ap.add_argument("candidate")
    ap.add_argument("former_again", nargs="?", default=None)
    args = ap.parse_args()
    try:
        again = read_rows(args.former_again) if args.former_again else None
        rows = compare(read_rows(args.former), read_rows(args.candidate), again)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"compare_decode_runs.py: {e}") from None
    if not rows:
        raise SystemExit("compare_decode_runs.py: the two CSVs share no (shape, batch, context) row")
    print(report(rows))


if __name__ == "__main__":
    main()
