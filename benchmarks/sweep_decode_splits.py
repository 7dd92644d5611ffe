"""Context splits of the folded decode: every candidate count against ``default_splits``' choice, per row.

For each (shape, batch, context) row, one layer of the default store's 2-bit-key kind (8-bit group metadata,
32 salient tokens beside 8 sinks and a 128-token window) is decoded with each candidate split count, replayed
from a CUDA graph (``triton.testing.do_bench_cudagraph``). A row reports the fastest count, the count
``default_splits`` picks and ``former_splits`` (the rule before the thirty-fifth session: about 8 programs per
SM, rounded up; kept here as the experiment's baseline). ``default_over_best`` is how much slower the default
is than the fastest count measured; ``former_over_default`` how much slower the former rule's count is.

    python benchmarks/sweep_decode_splits.py --csv benchmarks/results/decode_splits_sweep.csv
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).parent))
from _timing import DEVICE, append_csv, print_table  # noqa: E402
from bench_decode_folded import SHAPES, SINKS_AND_WINDOW, make_layer  # noqa: E402

from rkv_convert.export.format import DEFAULT_SALIENT_TOKENS  # noqa: E402
from rkv_convert.kernels._common import cdiv, split_slots  # noqa: E402
from rkv_convert.kernels._occupancy import sm_count  # noqa: E402
from rkv_convert.kernels.decode_folded import FOLDED_DEFAULTS, decode_folded, default_splits  # noqa: E402

CANDIDATES = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def former_splits(programs: int, T: int, block_n: int, sms: int) -> int:
    """The former rule: ``min(8, max(2, blocks // 16))`` programs per SM, rounded up."""
    n_blocks = cdiv(T, block_n)
    waves = min(8, max(2, n_blocks // 16))
    splits = max(1, min(n_blocks, cdiv(waves * sms, programs)))
    return cdiv(n_blocks, cdiv(n_blocks, splits))


def graph_us(fn: Callable[[], object]) -> float:
    """Median time of ``fn`` replayed from a CUDA graph, in microseconds (short repetitions: a sweep times hundreds)."""
    return 1000 * float(triton.testing.do_bench_cudagraph(fn, rep=40, quantiles=[0.5]))


def sweep_row(name: str, B: int, T: int, max_programs: int) -> tuple[dict[str, object], list[dict[str, object]]]:
    """The row's summary and one record per split count timed."""
    n_q, n_kv, d = SHAPES[name]
    block_n = FOLDED_DEFAULTS["block_n"]
    kv, params = make_layer(B, n_kv, T, d, 2, 64, 64, torch.float16, 2, True, SINKS_AND_WINDOW + DEFAULT_SALIENT_TOKENS)
    q = torch.randn(B, n_q, d, dtype=torch.float16, device=DEVICE)
    programs, n_blocks = B * n_kv, cdiv(T, block_n)
    chosen = default_splits(programs, T, block_n, DEVICE)  # already a count with no empty split
    former = former_splits(programs, T, block_n, sm_count(DEVICE))
    counts = {split_slots(T, block_n, s)[0] for s in CANDIDATES if s <= n_blocks and programs * s <= max_programs}
    times: dict[int, float] = {}
    for s in sorted(counts | {chosen, former}):
        times[s] = graph_us(lambda: decode_folded(q, kv, params, num_splits=s))
    best = min(times, key=times.get)
    summary = {"shape": name, "batch": B, "context": T, "programs": programs, "best_splits": best,
               "best_us": times[best], "default_splits": chosen, "default_us": times[chosen],
               "default_over_best": times[chosen] / times[best], "former_splits": former,
               "former_us": times[former], "former_over_default": times[former] / times[chosen]}  # fmt: skip
    records = [{"shape": name, "batch": B, "context": T, "programs": programs, "splits": s,
                "blocks_per_split": cdiv(n_blocks, s), "graph_us": us, "is_default": s == chosen,
                "is_former": s == former} for s, us in times.items()]  # fmt: skip
    return summary, records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096, 8192, 12288, 16384, 32768, 65536])
    ap.add_argument("--max-programs", type=int, default=8192, help="skip counts whose grid exceeds this")
    ap.add_argument("--csv", default=None, help="one row per split count timed")
    args = ap.parse_args()
    if DEVICE.type != "cuda":
        sys.exit("sweep_decode_splits.py times CUDA-graph replays: it needs a CUDA device")
    summaries = []
    for name in args.shapes:
        for B in args.batches:
            for T in args.contexts:
                summary, records = sweep_row(name, B, T, args.max_programs)
                summaries.append(summary)
                print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()),
                      flush=True)
                for r in records if args.csv else ():
                    append_csv(args.csv, r)
    print_table("decode split counts (CUDA-graph replay, us)", summaries)
    worst = max(s["default_over_best"] for s in summaries)
    mean = sum(s["default_over_best"] for s in summaries) / len(summaries)
    print(f"default / best: worst {worst:.3f}x, mean {mean:.3f}x over {len(summaries)} rows; "
          f"former / default: {min(s['former_over_default'] for s in summaries):.3f}x-"
          f"{max(s['former_over_default'] for s in summaries):.3f}x")


if __name__ == "__main__":
    main()
