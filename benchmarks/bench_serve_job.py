"""The serving load test's job run by the engine alone, in process (no HTTP): where the engine's time goes.

``--requests`` requests of ``--prompt`` random tokens and ``--new`` greedy tokens are submitted at once to an
:class:`~rkv_convert.serve.engine.Engine` of at most ``--max-batch`` rows (the load test's concurrent
clients), as ``rkv serve`` builds it (decode graphs captured before the first request, unless
``--no-capture``), and run to the end. Reported: tokens/s over the job, prefill and decode seconds, the
mean prefill and decode step, the mean decode batch, and the steps by kind (graph replay, capture, eager).
Comparing with ``bench_serve.py``'s figures for the same job separates the engine from the HTTP layer.
``--profile-steps N`` then runs the job once more and profiles ``N`` decode steps once every request is
admitted (no prefill among them): the kernels of a served step by self time, and the GPU time per step.
``--step-parts ROWS [ROWS ...]`` instead times steady steps of an engine of each row count (admitted two
per step, as in the job, so that the rows' window flushes fall on different steps): the step's wall time,
the host time of the row cache's ``begin_step`` and ``flush``, the bare replay of the step's graph (GPU
time), and the wall time of the steps with and without a window flush.
The model is ``bench_serve.py``'s random LLaMA-2-7B shape with the store ``rkv export`` writes by default.

    python benchmarks/bench_serve_job.py --csv benchmarks/results/serve_job.csv
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
    p.add_argument("--step-parts", type=int, nargs="+", default=None, metavar="ROWS",
                   help="instead of the job: where steady decode steps of these row counts spend their time")
    p.add_argument("--csv", type=Path, default=None)
    args = p.parse_args()
    if args.step_parts and min(args.step_parts) < 1:
        p.error(f"--step-parts takes row counts of at least 1, got {args.step_parts}")
    args.checkpoint = None
    rkv = _rkv_model(args)
    vocab = SHAPES[args.shape]["vocab"]
    if args.step_parts:
        rows = [step_parts(rkv, n, args.prompt, vocab) for n in args.step_parts]
        print_table(f"decode step parts ({DEVICE}, {args.shape}, {args.prompt}-token prompts)", rows)
        for row in rows if args.csv else ():
            append_csv(args.csv, {"shape": args.shape, "prompt": args.prompt, **row,
                                  "timing": "wall" if DEVICE.type == "cuda" else "cpu-smoke"})  # fmt: skip
        return
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


def _timed_method(obj: object, name: str, seconds: list[float]) -> None:
    """Wrap ``obj.name`` so that each call appends its host seconds to ``seconds``."""
    method = getattr(obj, name)

    def timed(*args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    setattr(obj, name, timed)


def step_parts(rkv, rows: int, prompt: int, vocab: int) -> dict[str, object]:
    """Medians over one flush period of steady decode steps (``flush_block`` steps: with prompts of at least
    ``recent_window + flush_block`` tokens every row flushes once in it) of an engine with ``rows`` requests,
    in milliseconds."""
    steps = rkv.settings.flush_block
    new = rows // 2 + steps + 8  # no request ends before the timed steps do
    engine = Engine(rkv, EngineConfig(max_len=prompt + new, budget_bytes=default_budget(rkv.device, 2**31),
                                      max_batch=rows, prefill_tokens_per_step=2 * prompt))  # fmt: skip
    cuda = DEVICE.type == "cuda" and engine.graph is not None
    if cuda:
        engine.capture_graphs()
    for r in _requests(rows, prompt, new, vocab):
        engine.submit(r, lambda e: None)
    while engine.waiting:  # two admissions per step, as in the job: the rows' flushes fall on different steps
        engine.step()
    for _ in range(3):
        engine.step()
    begin, flush, walls, flushed = [], [], [], []
    _timed_method(engine.cache, "begin_step", begin)
    _timed_method(engine.cache, "flush", flush)
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        if cuda:
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
        flushed.append(bool(engine.cache.state.flush_rows.numel()))  # begin_step's flushing rows of this step
    row = {"rows": engine.active, "bound": engine.graph.bound(engine.active) if engine.graph else engine.active,
           "step_ms": 1e3 * statistics.median(walls), "begin_step_ms": 1e3 * statistics.median(begin),
           "flush_ms": 1e3 * statistics.median(flush) if flush else 0.0}  # fmt: skip
    with_flush = [w for w, f in zip(walls, flushed) if f]
    without = [w for w, f in zip(walls, flushed) if not f]
    row["steps_with_flush"] = f"{len(with_flush)}/{steps}"
    row["with_flush_ms"] = 1e3 * statistics.median(with_flush) if with_flush else float("nan")
    row["without_flush_ms"] = 1e3 * statistics.median(without) if without else float("nan")
    if cuda:  # the step's graph alone
        graph = engine.graph.graphs[engine.graph.bound(engine.active)].graph
        start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        replays = []
        for _ in range(10):
            start_ev.record()
            graph.replay()
            end_ev.record()
            torch.cuda.synchronize()
            replays.append(start_ev.elapsed_time(end_ev))
        row["bare_replay_ms"] = statistics.median(replays)
    return row


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
