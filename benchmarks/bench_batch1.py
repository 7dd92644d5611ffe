"""Batch-1 decode speed of a checkpoint: ``RkvModel.generate`` (packed cache) against fp16 ``generate``.

Issue 11's batch-1 row: one short prompt, ``--new`` greedy tokens (EOS ignored via
``min_new_tokens``), the same weights both ways. rkv is timed four ways: ``RkvModel.generate``
and ``stream_generate`` (what ``rkv run`` calls), each with decode steps replayed from a CUDA
graph and eagerly. rkv runs through ``rkv_convert.load`` (its
default backend: Triton on CUDA); fp16 runs the loaded model's stock ``generate`` without the
rkv handler attached (transformers' ``DynamicCache``). Medians of ``--repeats`` timed runs after
one warm-up each. At batch 1 both are bound by host time per step, not by the GPU.

    python benchmarks/bench_batch1.py rkv-out/checkpoint --csv benchmarks/results/batch1.csv
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rkv_convert.runtime.generate import GenerationStats, SamplingOptions, stream_generate

sys.path.insert(0, str(Path(__file__).parent))
from _timing import append_csv, print_table  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and the sea."


def _seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs after one warm-up."""
    times = []
    for i in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path, help="folder written by `rkv export`")
    p.add_argument("--new", type=int, default=128, help="new tokens per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--csv", type=Path, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_batch1.py: needs a CUDA GPU (the figures are GPU decode speeds)")
    import rkv_convert

    rkv = rkv_convert.load(args.checkpoint, device="cuda", dtype=torch.float16)
    ids = rkv.tokenizer(PROMPT, return_tensors="pt").input_ids.cuda()
    kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
    greedy = SamplingOptions(temperature=0.0)

    def generate(graph: bool) -> None:
        rkv.cuda_graph = graph
        rkv.generate(ids, **kw)
        paths.add(rkv.last_decode_path)

    def stream(graph: bool) -> None:
        stats = GenerationStats()
        for _ in stream_generate(rkv, ids, max_new_tokens=args.new, sampling=greedy, stats=stats, cuda_graph=graph):
            pass
        paths.add(stats.decode_path)

    paths: set[str] = set()
    t_fp = _seconds(lambda: rkv.model.generate(ids, **kw), args.repeats)
    timed = {
        "RkvModel.generate, CUDA graph": _seconds(lambda: generate(True), args.repeats),
        "RkvModel.generate, eager": _seconds(lambda: generate(False), args.repeats),
        "stream_generate (rkv run), CUDA graph": _seconds(lambda: stream(True), args.repeats),
        "stream_generate (rkv run), eager": _seconds(lambda: stream(False), args.repeats),
    }
    rows = [{"checkpoint": str(args.checkpoint), "path": path, "prompt_tokens": ids.shape[1], "new": args.new,
             "rkv_tok_s": args.new / t, "fp16_tok_s": args.new / t_fp, "ratio": t_fp / t}
            for path, t in timed.items()]  # fmt: skip
    print(f"decode paths: {sorted(paths)}")
    print_table("batch 1: rkv (packed cache) vs fp16 generate, same weights", rows)
    if args.csv is not None:
        for row in rows:
            append_csv(args.csv, row)


if __name__ == "__main__":
    main()
