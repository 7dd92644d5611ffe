"""One prompt's prefill: fp16 transformers against the serving engine's prefill into the packed cache, by store.

The serving engine prefills each request alone into a batch-1 cache (``Engine._prefill``'s forward: the
model's own attention in full precision, then sinks, salient tokens, window and store written). This times
that forward for the store ``rkv export`` writes by default, the same with searched group ranges
(``--group-ranges searched``), and the plain store (fp16 group metadata, 2-bit keys and values, no salient tokens), against the fp16 model's forward with transformers' own cache, on
``bench_serve.py``'s random LLaMA-2-7B shape: medians of ``--reps`` after one warm-up, wall time and the host
time until the forward returned. ``--profile`` prints the CUDA kernels of one prefill of each, by self time.

    python benchmarks/bench_prefill.py --csv benchmarks/results/prefill.csv
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _random_model import calibrated_rkv  # noqa: E402
from _timing import DEVICE, append_csv, print_table  # noqa: E402
from bench_serve import SHAPES, _random_model  # noqa: E402

from rkv_convert.export.writer import checkpoint_from_artifact  # noqa: E402
from rkv_convert.quant.quantizer import GroupRanges  # noqa: E402
from rkv_convert.runtime.cache import CacheSettings  # noqa: E402
from rkv_convert.runtime.generate import RkvModel  # noqa: E402
from rkv_convert.serve.engine import Engine, EngineConfig  # noqa: E402


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """Median wall and host seconds of ``fn`` (one warm-up call first)."""
    wall, host = [], []
    for i in range(reps + 1):
        _sync()
        start = time.perf_counter()
        fn()
        returned = time.perf_counter() - start
        _sync()
        if i:
            wall.append(time.perf_counter() - start)
            host.append(returned)
    return statistics.median(wall), statistics.median(host)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=tuple(SHAPES), default="llama2-7b")
    p.add_argument("--prompt", type=int, default=4096)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--csv", type=Path, default=None)
    args = p.parse_args()
    vocab = SHAPES[args.shape]["vocab"]
    model = _random_model(args.shape, args.prompt + 64)
    default, artifact, _ = calibrated_rkv(model, vocab=vocab, samples=8, seqlen=min(512, args.prompt), head_group=1,
                                          key_group=64, value_group=64, bits=2)  # fmt: skip
    cfg = default.checkpoint.config
    searched_ck = checkpoint_from_artifact(artifact, bits=2, key_bits=cfg.key_bits, group_meta=cfg.meta,
                                           salient_tokens=cfg.salient_tokens, group_ranges=GroupRanges.SEARCHED)
    plain_ck = checkpoint_from_artifact(artifact, bits=2)
    stores = {"default": default} | {name: RkvModel(model, ck, settings=CacheSettings.from_config(ck.config))
                                     for name, ck in (("default, searched ranges", searched_ck), ("plain", plain_ck))}
    ids = torch.randint(0, vocab, (1, args.prompt), device=DEVICE)
    positions = torch.arange(args.prompt, device=DEVICE)[None]

    def fp16() -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, logits_to_keep=1)

    def rkv_prefill(rkv: RkvModel) -> Callable[[], None]:
        engine = Engine(rkv, EngineConfig(max_len=args.prompt + 64, budget_bytes=2**30, max_batch=1, cuda_graph=False))

        def run() -> None:
            single = engine.cache.single(reserve_tokens=args.prompt)
            with torch.no_grad(), rkv.attached() as m:
                m(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions, use_cache=True,
                  logits_to_keep=1, **{rkv.cache_argument: single})  # fmt: skip

        return run

    runs = {"fp16 transformers": fp16} | {f"rkv, {name} store": rkv_prefill(m) for name, m in stores.items()}
    rows = []
    for name, fn in runs.items():
        wall, host = timed(fn, args.reps)
        rows.append({"prefill": name, "prompt": args.prompt, "ms": 1e3 * wall, "host_ms": 1e3 * host})
    for row in rows:
        row["vs_fp16"] = rows[0]["ms"] / row["ms"]
        if args.csv:
            append_csv(args.csv, {"shape": args.shape, **row, "timing": "wall" if DEVICE.type == "cuda" else "cpu-smoke"})
    print_table(f"one prefill ({DEVICE}, {args.shape})", rows)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
        key = "self_cuda_time_total" if DEVICE.type == "cuda" else "self_cpu_time_total"
        for name, fn in runs.items():
            with profile(activities=acts) as prof:
                fn()
                _sync()
            print(f"--- {name}")
            print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60))


if __name__ == "__main__":
    main()
