"""The serving load test's job run by the engine alone, in process (no HTTP): where the engine's time goes.

``--requests`` requests of ``--prompt`` random tokens and ``--new`` greedy tokens are submitted at once to an
:class:`~rkv_convert.serve.engine.Engine` of at most ``--max-batch`` rows (the load test's concurrent
clients), as ``rkv serve`` builds it (decode graphs captured before the first request, unless
``--no-capture``), and run to the end. Reported: tokens/s over the job, prefill and decode seconds, the
mean prefill and decode step, the mean decode batch, and the steps by kind (graph replay, capture, eager).
Comparing with ``bench_serve.py``'s figures for the same job separates the engine from the HTTP layer.
``--profile-steps N`` then runs the job once more and profiles ``N`` decode steps once every request is
admitted (no prefill among them): the kernels of a served step by self time, and the GPU time per step.
The model is ``bench_serve.py``'s random LLaMA-2-7B shape with the store ``rkv export`` writes by default.

    python benchmarks/bench_serve_job.py --csv benchmarks/results/serve_job.csv
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import DEVICE, append_csv, print_table  # noqa: E402
from bench_serve import SHAPES, _rkv_model  # noqa: E402
from bench_serve_engine import _requests  # noqa: E402

from rkv_convert.serve.engine import Engine, EngineConfig, default_budget  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=tuple(SHAPES), default="llama2-7b")
    p.add_argument("--prompt", type=int, default=4096)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--requests", type=int, default=132)
    p.add_argument("--max-batch", type=int, default=128, help="rows at most (the load test's concurrent clients)")
    p.add_argument("--prefill-tokens", type=int, default=8192, help="prompt tokens prefilled per engine step")
    p.add_argument("--capture", default=True, action=argparse.BooleanOptionalAction,
                   help="capture the decode graphs before the job (what rkv serve does)")
    p.add_argument("--profile-steps", type=int, default=0, help="afterwards, profile this many steady decode steps")
    p.add_argument("--csv", type=Path, default=None)
    args = p.parse_args()
    args.checkpoint = None
    rkv = _rkv_model(args)
    vocab = SHAPES[args.shape]["vocab"]
    engine = Engine(rkv, EngineConfig(max_len=args.prompt + args.new, budget_bytes=default_budget(rkv.device, 2**31),
                                      max_batch=args.max_batch, prefill_tokens_per_step=args.prefill_tokens))  # fmt: skip
    start = time.perf_counter()
    graphs = engine.capture_graphs() if args.capture else 0
    capture_s = time.perf_counter() - start
    for r in _requests(2, min(256, args.prompt), 8, vocab):  # compiles the prefill path, untimed
        engine.submit(r, lambda e: None)
    engine.run_until_done()
    before = dict(vars(engine.stats))
    for r in _requests(args.requests, args.prompt, args.new, vocab):
        engine.submit(r, lambda e: None)
    start = time.perf_counter()
    engine.run_until_done()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    d = {k: v - before[k] for k, v in vars(engine.stats).items() if k != "started"}
    row = {"shape": args.shape, "prompt": args.prompt, "new": args.new, "requests": args.requests,
           "max_batch": args.max_batch, "decode_path": engine.decode_path, "graphs_captured": graphs,
           "capture_s": capture_s, "wall_s": wall, "tok_s": args.requests * args.new / wall,
           "prefill_s": d["prefill_seconds"], "prefill_ms_each": 1e3 * d["prefill_seconds"] / max(d["prefills"], 1),
           "decode_s": d["decode_seconds"], "decode_steps": d["decode_steps"],
           "step_ms": 1e3 * d["decode_seconds"] / max(d["decode_steps"], 1),
           "mean_rows": d["decode_tokens"] / max(d["decode_steps"], 1),
           "replay_capture_eager": f"{d['graph_replays']}/{d['graph_captures']}/{d['eager_steps']}",
           "replay_ms": 1e3 * d["graph_replay_seconds"] / max(d["graph_replays"], 1)}  # fmt: skip
    print_table(f"engine job ({DEVICE})", [{"metric": k, "value": v} for k, v in row.items()])
    if args.csv:
        append_csv(args.csv, {**row, "timing": "wall" if DEVICE.type == "cuda" else "cpu-smoke"})
    if args.profile_steps > 0:
        profile_steps(engine, _requests(args.requests, args.prompt, args.new, vocab), args.profile_steps)


def profile_steps(engine: Engine, requests: list, steps: int) -> None:
    """Submit ``requests``, step until none waits, then profile ``steps`` decode steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    for r in requests:
        engine.submit(r, lambda e: None)
    while engine.waiting and engine.has_work:
        engine.step()
    if not engine.has_work:
        raise SystemExit("every request finished before the steady state: raise --new or --requests")
    cuda = DEVICE.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    rows, done = engine.active, 0
    with profile(activities=acts) as prof:
        while done < steps and engine.has_work:
            engine.step()
            done += 1
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"--- {done} decode steps, {rows} rows at the start ({DEVICE})")
    print(events.table(sort_by=key, row_limit=30, max_name_column_width=70))
    if cuda:
        from torch.autograd import DeviceType

        gpu_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)  # kernels only
        print(f"GPU time per step: {gpu_us / 1e3 / max(done, 1):.2f} ms")
    engine.run_until_done()


if __name__ == "__main__":
    main()
