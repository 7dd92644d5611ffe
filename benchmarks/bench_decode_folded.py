"""Decode attention over the query-folded layout against SDPA (fp16 by default) and the 2-bit byte floor.

One new query token per sequence attends over ``T`` quantized slots plus a full-precision segment
(8 sinks, ``--salient-tokens`` and 128 window tokens) of one layer. Per row:

- ``sdpa_ms``: ``torch.nn.functional.scaled_dot_product_attention`` over K/V in ``--dtype`` (fp16 by
  default) holding the same ``T + fp_slots`` tokens (what a full-precision cache runs);
- ``folded_ms``: :func:`rkv_convert.kernels.decode_folded.decode_folded` (split-K kernel plus
  merge, or one launch), random packed codes and scales/zeros (speed does not depend on the
  values; correctness is ``tests/kernels/test_decode_folded.py``). ``--store default`` (the default) times
  the cache `rkv export` writes by default: 8-bit group metadata, values at ``--bits``, keys at ``--bits`` in
  half the layers and one bit more in the other half (``--key-bits auto``), 32 salient tokens; ``folded_ms`` is
  then the mean of the two layer kinds (``folded_ms_by_key_bits`` gives each), the time per layer a model
  spends. ``--store plain`` times one layer kind as ``--bits``/``--value-bits``/``--group-meta`` say;
- ``floor_ms``: the bytes the folded kernel reads divided by the measured device copy rate
  (read + write), and ``achieved_GBps`` = those bytes over ``folded_ms``.

Timings are ``triton.testing.do_bench`` medians (``benchmarks/_timing.py``), which flush the L2
before each repetition. ``--tune`` times launch settings on a few rows first.

    python benchmarks/bench_decode_folded.py --csv benchmarks/results/decode_attention.csv   # the default store
    python benchmarks/bench_decode_folded.py --dtype bf16 --tune 128-4-2-4 64-8-2-4   # the fp32-operand path
    python benchmarks/bench_decode_folded.py --store plain --salient-tokens 0   # fp16 metadata, 2-bit keys and values
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _timing import (DEVICE, append_csv, bench_ms, copy_bandwidth_gbs, graph_ms, markdown_table,  # noqa: E402
                     print_table)

from rkv_convert.export.format import DEFAULT_SALIENT_TOKENS  # noqa: E402
from rkv_convert.kernels.decode_folded import FOLDED_DEFAULTS, decode_folded  # noqa: E402
from rkv_convert.kernels.folded_params import FoldedParams  # noqa: E402
from rkv_convert.kernels.packed_kv import PackedKV  # noqa: E402
from rkv_convert.quant.hadamard import hadamard_matrix  # noqa: E402

SHAPES = {"llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128)}  # query heads, KV heads, head dim
SINKS_AND_WINDOW = 8 + 128  # full-precision slots besides the salient tokens


def _meta(B: int, n_kv: int, T: int, groups: int, log8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scales and zeros: fp16, or 8-bit codes (uint8 scale, int8 zero)."""
    if log8:
        return (torch.randint(100, 160, (B, n_kv, T, groups), dtype=torch.uint8, device=DEVICE),
                torch.randint(-20, 8, (B, n_kv, T, groups), dtype=torch.int8, device=DEVICE))
    return (torch.rand(2, B, n_kv, T, groups, device=DEVICE) * 0.1 + 0.01).to(torch.float16).unbind(0)


def make_layer(B: int, n_kv: int, T: int, d: int, bits: int, g_k: int, g_v: int,
               dtype: torch.dtype = torch.float16, value_bits: int | None = None,
               log8: bool = False, fp_slots: int = SINKS_AND_WINDOW) -> tuple[PackedKV, FoldedParams]:  # fmt: skip
    """One layer's packed cache (random codes, scales and zeros: fp16 or ``log8`` 8-bit codes) and constants; the
    fp segment of ``fp_slots`` in ``dtype`` (the model's, as the runtime keeps it)."""
    dev, u8 = DEVICE, torch.uint8
    v_bits = bits if value_bits is None else value_bits
    kc = torch.randint(0, 256, (B, n_kv, T, d * bits // 8), dtype=u8, device=dev)
    vc = torch.randint(0, 256, (B, n_kv, T, d * v_bits // 8), dtype=u8, device=dev)
    ks, kz = _meta(B, n_kv, T, d // g_k, log8)
    vs, vz = _meta(B, n_kv, T, d // g_v, log8)
    pos = torch.arange(T, dtype=torch.int32, device=dev).repeat(B, 1)
    pos[1:, : T // 8] = -1  # left padding in all but the first sequence
    fp_k = torch.randn(B, n_kv, fp_slots, d, dtype=dtype, device=dev)
    fp_v = torch.randn_like(fp_k)
    fp_pos = torch.arange(T, T + fp_slots, dtype=torch.int32, device=dev).repeat(B, 1)
    rot = torch.stack([hadamard_matrix(d)[:, torch.randperm(d)] for _ in range(n_kv)]).to(dev)
    params = FoldedParams(rotation=rot, mean=torch.randn(n_kv, d, device=dev), attention_scaling=1.0,
                          inv_freq=(1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)).to(dev),
                          sm_scale=d**-0.5, bits=bits, g_k=g_k, g_v=g_v, v_bits=v_bits,
                          meta_bases=(1e-3, 1e-3) if log8 else None)  # fmt: skip
    return PackedKV(kc, ks, kz, vc, vs, vz, pos, fp_k, fp_v, fp_pos), params


def bytes_read(kv: PackedKV, params: FoldedParams) -> int:
    per_layer = sum(t.numel() * t.element_size() for t in kv)
    return per_layer + params.rotation.numel() * 4 + params.mean.numel() * 4


def _fits(B: int, n_kv: int, T: int, d: int, fp_slots: int, budget: float) -> bool:
    return 2 * B * n_kv * (T + fp_slots) * d * 2 * 1.25 < budget  # fp16 K/V, the packed layers and slack


def layer_kinds(args: argparse.Namespace) -> list[tuple[int, int, bool]]:
    """(key bits, value bits, 8-bit metadata) of each layer kind the row averages over."""
    if args.store == "default":
        return [(args.bits, args.bits, True), (args.bits + 1, args.bits, True)]
    return [(args.bits, args.value_bits or args.bits, args.group_meta == "log8")]


def _compiled_stats() -> list[str]:
    """Registers, spills and shared memory of every compiled variant of the kernel (Triton's cache)."""
    from rkv_convert.kernels.decode_folded import _folded_kernel

    out = []
    for cache in getattr(_folded_kernel, "device_caches", {}).values():
        for item in cache if isinstance(cache, tuple) else (cache,):
            if isinstance(item, dict):
                for k in item.values():
                    if hasattr(k, "n_regs"):
                        c = k.metadata.constants if hasattr(k.metadata, "constants") else {}
                        out.append(f"regs={k.n_regs} spills={k.n_spills} smem={k.metadata.shared} "
                                   f"warps={k.metadata.num_warps} stages={k.metadata.num_stages} {str(c)[:0]}")
    return out


def host_us(fn, n: int = 200) -> float:
    """Host time per call, enqueue only (the GPU work is far shorter than the queue depth)."""
    import time

    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize() if DEVICE.type == "cuda" else None
    return dt


def _launch(cfg: str, B: int, n_kv: int, T: int) -> dict[str, object]:
    """Keyword arguments of ``decode_folded`` from ``BLOCK-WARPS-STAGES-RESIDENT[-UNPACK]`` (``RESIDENT``: programs
    per SM in one round of ``default_splits``' long-context grids)."""
    from rkv_convert.kernels.decode_folded import default_splits

    block_n, warps, stages, resident, *rest = cfg.split("-")
    return dict(block_n=int(block_n), num_warps=int(warps), num_stages=int(stages),
                num_splits=default_splits(B * n_kv, T, int(block_n), DEVICE, int(resident)),
                unpack=rest[0] if rest else "auto")


def tune(args: argparse.Namespace) -> str:
    """Time each launch setting on the tuning rows (graph replay); return the best overall."""
    seen, score = 0, {cfg: 0.0 for cfg in args.tune}
    for name, B, T in args.tune_rows:
        n_q, n_kv, d = SHAPES[name]
        k_bits, v_bits, log8 = layer_kinds(args)[-1]  # the widest kind
        kv, params = make_layer(B, n_kv, T, d, k_bits, args.key_group, args.value_group, args.dtype, v_bits, log8,
                                args.fp_slots)  # fmt: skip
        q = torch.randn(B, n_q, d, dtype=args.dtype, device=DEVICE)
        nbytes = bytes_read(kv, params)
        times = {}
        for cfg in args.tune:
            kw = _launch(cfg, B, n_kv, T)
            fn = lambda: decode_folded(q, kv, params, **kw)  # noqa: E731
            try:
                ms, gms = bench_ms(fn)[0], graph_ms(fn)
                times[cfg] = gms
                print(f"tune {name} B={B} T={T} {cfg} splits={kw['num_splits']}: {ms:.4f} ms eager, {gms:.4f} ms "
                      f"graph ({nbytes / gms / 1e6:.0f} GB/s), host {host_us(fn):.1f} us", flush=True)
            except Exception as err:  # a configuration that does not compile or fit: record, go on
                print(f"tune {name} B={B} T={T} {cfg}: {type(err).__name__}: {str(err)[:300]}", flush=True)
            stats = _compiled_stats()
            for line in stats[seen:]:
                print(f"    compiled: {line}", flush=True)
            seen = len(stats)
        best = min(times.values(), default=float("nan"))
        for cfg in args.tune:
            score[cfg] += times.get(cfg, float("inf")) / best
        del kv, params
    pick = min(score, key=score.get)
    print(f"tune: best launch setting {pick} (sum of time / row best: {score[pick]:.3f})", flush=True)
    return pick


def run(args: argparse.Namespace, launch: str) -> list[dict[str, object]]:
    copy_gbs = copy_bandwidth_gbs()
    print(f"device copy rate (read + write): {copy_gbs:.0f} GB/s on {DEVICE}", flush=True)
    rows = []
    kinds = layer_kinds(args)
    fp_slots = args.fp_slots
    for name in args.shapes:
        n_q, n_kv, d = SHAPES[name]
        for B in args.batches:
            torch.cuda.empty_cache() if DEVICE.type == "cuda" else None
            budget = 0.9 * torch.cuda.mem_get_info()[0] if DEVICE.type == "cuda" else float("inf")
            contexts = [T for T in args.contexts if _fits(B, n_kv, T, d, fp_slots, budget)]
            for T in sorted(set(args.contexts) - set(contexts)):
                print(f"skip {name} B={B} T={T}: does not fit in memory")
            if not contexts:
                continue
            T_max = max(contexts)
            k = torch.randn(B, n_kv, T_max + fp_slots, d, dtype=args.dtype, device=DEVICE)
            v = torch.randn_like(k)
            layers = [make_layer(B, n_kv, T_max, d, kb, args.key_group, args.value_group, args.dtype, vb, log8, fp_slots)
                      for kb, vb, log8 in kinds]  # fmt: skip
            q = torch.randn(B, n_q, d, dtype=args.dtype, device=DEVICE)
            for T in contexts:
                kt, vt = k[:, :, : T + fp_slots], v[:, :, : T + fp_slots]
                sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], kt, vt, enable_gqa=n_q != n_kv)  # noqa: E731
                sdpa_ms = bench_ms(sdpa)[0]
                sdpa_graph_ms = graph_ms(sdpa)
                kw = _launch(launch, B, n_kv, T)
                timed = []  # per layer kind: eager median, p20, p80, graph median, host us, bytes
                for kv_all, params in layers:
                    kv = kv_all.truncated(T)
                    fn = lambda: decode_folded(q, kv, params, **kw)  # noqa: E731
                    ms, lo, hi = bench_ms(fn)
                    host = host_us(fn, n=50) if DEVICE.type == "cuda" else float("nan")
                    timed.append((ms, lo, hi, graph_ms(fn), host, bytes_read(kv, params)))
                mean = [sum(t[i] for t in timed) / len(timed) for i in range(6)]
                folded_ms, lo, hi, folded_graph_ms, folded_host_us, nbytes = mean
                row = {
                    "shape": name, "batch": B, "context": T, "query_dtype": str(args.dtype).removeprefix("torch."),
                    "n_q": n_q, "n_kv": n_kv, "head_dim": d, "store": args.store,
                    "key_bits": "+".join(str(kb) for kb, _, _ in kinds), "value_bits": kinds[0][1],
                    "group_meta": "log8" if kinds[0][2] else "fp16",
                    "key_group": args.key_group, "value_group": args.value_group,
                    "fp_slots": fp_slots, "sdpa_ms": sdpa_ms, "folded_ms": folded_ms, "folded_p20_ms": lo,
                    "folded_p80_ms": hi, "speedup_vs_sdpa": sdpa_ms / folded_ms,
                    "folded_ms_by_key_bits": ";".join(f"{kb}:{t[0]:.5f}" for (kb, _, _), t in zip(kinds, timed)),
                    "floor_ms": nbytes / (copy_gbs * 1e9) * 1e3,
                    "achieved_GBps": nbytes / (folded_ms * 1e-3) / 1e9,
                    "sdpa_GBps": 2 * kt.numel() * 2 / (sdpa_ms * 1e-3) / 1e9, "copy_GBps": copy_gbs,
                    "sdpa_graph_ms": sdpa_graph_ms, "folded_graph_ms": folded_graph_ms,
                    "graph_speedup_vs_sdpa": sdpa_graph_ms / folded_graph_ms,
                    "graph_ms_by_key_bits": ";".join(f"{kb}:{t[3]:.5f}" for (kb, _, _), t in zip(kinds, timed)),
                    "folded_host_us": folded_host_us, "launch": launch, "num_splits": kw["num_splits"],
                }  # fmt: skip
                row["floor_fraction"] = row["floor_ms"] / folded_ms
                rows.append(row)
                if args.csv:
                    append_csv(args.csv, {**row, "timing": "do_bench" if DEVICE.type == "cuda" else "cpu-smoke"})
                print(f"{name} B={B} T={T}: sdpa {sdpa_ms:.4f} ms, folded {folded_ms:.4f} ms "
                      f"({row['speedup_vs_sdpa']:.2f}x; by key bits {row['folded_ms_by_key_bits']}), floor "
                      f"{row['floor_ms']:.4f} ms ({row['floor_fraction']:.0%}), {row['achieved_GBps']:.0f} GB/s; graph: "
                      f"sdpa {sdpa_graph_ms:.4f}, folded {folded_graph_ms:.4f} ({row['graph_speedup_vs_sdpa']:.2f}x; "
                      f"{row['graph_ms_by_key_bits']}); host {folded_host_us:.1f} us", flush=True)  # fmt: skip
            del k, v, layers
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096, 16384, 32768, 65536])
    ap.add_argument("--store", default="default", choices=("default", "plain"),
                    help="default: the store `rkv export` writes (log8 metadata, keys at --bits and --bits + 1 in half "
                         "the layers each, 32 salient tokens); plain: one layer kind as the options below say")
    ap.add_argument("--bits", type=int, default=2, help="key code bits (default store: the lower layer kind's)")
    ap.add_argument("--value-bits", type=int, default=None, help="value code bits, plain store (default: --bits)")
    ap.add_argument("--group-meta", default="fp16", choices=("fp16", "log8"), help="group scales and zeros, plain store")
    ap.add_argument("--salient-tokens", type=int, default=None,
                    help="full-precision salient slots beside the 8 sinks and 128 window tokens (default: 32 for the "
                         "default store, 0 for plain)")
    ap.add_argument("--key-group", type=int, default=64)
    ap.add_argument("--value-group", type=int, default=64)
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"),
                    help="queries, fp segment and SDPA's K/V (bf16/fp32: the kernel's fp32-operand path)")
    ap.add_argument("--tune", nargs="*", default=[],
                    help="launch settings BLOCK-WARPS-STAGES-RESIDENT[-UNPACK]; the best one times the table")
    ap.add_argument("--tune-rows", nargs="*", default=[("llama2-7b", 8, 16384), ("llama3-8b", 8, 16384)],
                    type=lambda s: (s.split(":")[0], int(s.split(":")[1]), int(s.split(":")[2])),
                    help="rows to tune on, SHAPE:BATCH:CONTEXT")
    ap.add_argument("--no-table", action="store_true", help="only the tuning rows")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    args.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    default_salient = DEFAULT_SALIENT_TOKENS if args.store == "default" else 0
    salient = default_salient if args.salient_tokens is None else args.salient_tokens
    args.fp_slots = SINKS_AND_WINDOW + salient
    d = FOLDED_DEFAULTS
    launch = f"{d['block_n']}-{d['num_warps']}-{d['num_stages']}-{d['resident']}"
    if args.tune:
        launch = tune(args)
    if args.no_table:
        return
    rows = run(args, launch)
    cols = ["shape", "batch", "context", "sdpa_ms", "folded_ms", "speedup_vs_sdpa", "floor_ms", "floor_fraction",
            "achieved_GBps", "sdpa_graph_ms", "folded_graph_ms", "graph_speedup_vs_sdpa"]
    store = f"{args.store} store, keys {rows[0]['key_bits']} bits, {rows[0]['fp_slots']} fp slots" if rows else args.store
    print_table(f"decode attention, folded layout ({store}) vs SDPA ({str(args.dtype).removeprefix('torch.')})", rows, cols)
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(rows, cols))


if __name__ == "__main__":
    main()
