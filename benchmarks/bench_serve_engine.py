"""The serving engine's decode step alone (no HTTP): eager steps against CUDA-graph replays.

For each ``--rows`` count, one engine per decode path (``cuda_graph=False`` and ``True``) on the same
model admits that many requests of ``--prompt`` random tokens (prefilled one by one, untimed), runs
``--warmup`` decode steps (compiles the kernels and, for the graph path, captures the bucket), then
times ``--steps`` decode steps (``Engine.step`` with nothing waiting: one decode forward, its
bookkeeping and sampling; wall time, each step ends with its tokens on the host). Reports the median
step time, decode tokens/s and the graph / eager ratio, and checks that both paths gave the same
greedy tokens for every request. The model is the random LLaMA-2-7B shape of ``bench_serve.py``
(calibrated on random tokens; default folded keys, 2 bits, groups of 64) or ``--shape tiny`` for a
CPU check of the script (eager only there: graphs need CUDA).

    python benchmarks/bench_serve_engine.py --rows 8,32,64 --prompt 4096 --csv benchmarks/results/serve_engine.csv
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import DEVICE, append_csv, print_table  # noqa: E402
from bench_serve import SHAPES, _rkv_model  # noqa: E402

from rkv_convert.runtime.generate import SamplingOptions  # noqa: E402
from rkv_convert.serve.engine import Engine, EngineConfig  # noqa: E402
from rkv_convert.serve.requests import GenerationRequest  # noqa: E402


def _requests(rows: int, prompt: int, new: int, vocab: int) -> list[GenerationRequest]:
    gen = torch.Generator().manual_seed(rows)
    greedy = SamplingOptions(temperature=0.0)
    return [GenerationRequest(f"r{i}", tuple(torch.randint(0, vocab, (prompt,), generator=gen).tolist()), max_tokens=new,
                              sampling=greedy) for i in range(rows)]  # fmt: skip


def time_steps(rkv, rows: int, args, cuda_graph: bool) -> tuple[list[float], dict[str, list[int]], str]:
    """Step times (s) of one engine with ``rows`` requests decoding, their tokens, and the decode path."""
    vocab = SHAPES[args.shape]["vocab"]
    new = args.warmup + args.steps + 1
    requests = _requests(rows, args.prompt, new, vocab)
    engine = Engine(rkv, EngineConfig(max_len=args.prompt + new, budget_bytes=int(args.cache_memory * 2**30), max_batch=rows,
                                      prefill_tokens_per_step=args.prompt * rows, cuda_graph=cuda_graph))  # fmt: skip
    tokens: dict[str, list[int]] = {r.id: [] for r in requests}
    for r in requests:
        engine.submit(r, lambda e: e.token is not None and tokens[e.request_id].append(e.token))
    engine.step()  # every prefill, then the first decode step
    if engine.active != rows:
        raise RuntimeError(f"only {engine.active} of {rows} requests were admitted (raise --cache-memory)")
    for _ in range(args.warmup):
        engine.step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    engine.run_until_done()
    return times, tokens, engine.decode_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=tuple(SHAPES), default="llama2-7b")
    p.add_argument("--rows", default="8,32,64", help="comma-separated decode batch sizes")
    p.add_argument("--prompt", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cache-memory", type=float, default=60.0, help="engine cache budget in GiB")
    p.add_argument("--csv", type=Path, default=None)
    args = p.parse_args()
    args.checkpoint, args.new = None, 0
    rkv = _rkv_model(args)
    table = []
    for rows in (int(r) for r in args.rows.split(",")):
        eager_t, eager_tok, _ = time_steps(rkv, rows, args, cuda_graph=False)
        row = {"shape": args.shape, "rows": rows, "prompt": args.prompt, "steps": args.steps,
               "eager_ms": 1e3 * statistics.median(eager_t)}  # fmt: skip
        row["eager_tok_s"] = rows / (row["eager_ms"] / 1e3)
        if DEVICE.type == "cuda":
            graph_t, graph_tok, path = time_steps(rkv, rows, args, cuda_graph=True)
            if path != "CUDA graph":
                raise RuntimeError(f"the graph engine ran {path}")
            row["graph_ms"] = 1e3 * statistics.median(graph_t)
            row["graph_tok_s"] = rows / (row["graph_ms"] / 1e3)
            row["graph_speedup"] = row["eager_ms"] / row["graph_ms"]
            row["same_tokens"] = sum(graph_tok[k] == eager_tok[k] for k in eager_tok)
        table.append(row)
        print_table(f"engine decode step ({DEVICE})", [row])
        if args.csv:
            append_csv(args.csv, row)
    print_table(f"engine decode step ({DEVICE})", table)


if __name__ == "__main__":
    main()
