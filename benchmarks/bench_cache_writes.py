"""Cache writes of the default (folded) layout: the fused kernel against the device copy rate.

A write encodes ``B x n`` tokens of every KV head of one layer: keys ``y = (k - RoPE(mu)) @ R_h``
quantized and packed, values quantized and packed, into slots of a preallocated store (as
``RkvCacheLayer._store`` does: a prefill block, or a decode flush of ``flush_block`` tokens per
sequence). Bytes moved = fp16 keys and values read + codes, scales, zeros and positions written;
``pct_of_copy`` divides that rate by the device-to-device copy rate measured in the same run; ``fused_ms`` is
``do_bench`` of eager calls, which at small rows (tens of microseconds) times the host's launch path, and
``graph_ms`` / ``graph_pct_of_copy`` the same write replayed from a CUDA graph: the kernel alone (a prefill
queues its writes far ahead of the GPU, so their host time is hidden there).

``composed_ms`` times what the cache ran before the fused kernel (kept here as the experiment's
baseline, not in the package): torch ``mean_at`` + ``fold_keys``, two ``quantize_pack`` launches,
then copies into the store.

    python benchmarks/bench_cache_writes.py --csv benchmarks/results/cache_writes.csv
    python benchmarks/bench_cache_writes.py --tune          # block_t x num_warps grid, default rows
    python benchmarks/bench_cache_writes.py --split-kv 0 1  # keys and values in one program per block, then in two
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import (DEVICE, append_csv, bench_ms, copy_bandwidth_gbs, graph_ms, markdown_table,  # noqa: E402
                     print_table)

from rkv_convert.kernels.folded_params import FoldedParams  # noqa: E402
from rkv_convert.kernels._common import cdiv  # noqa: E402
from rkv_convert.kernels.encode_folded import ENCODE_DEFAULTS, encode_folded, split_kv_default  # noqa: E402
from rkv_convert.kernels.packed_kv import PackedKV  # noqa: E402
from rkv_convert.kernels.quantize_pack import quantize_pack  # noqa: E402
from rkv_convert.quant.hadamard import hadamard_matrix  # noqa: E402
from rkv_convert.quant.quantizer import GroupRanges  # noqa: E402
from rkv_convert.runtime.ops import fold_keys, mean_at  # noqa: E402

SHAPES = {"llama2-7b": (32, 128), "llama3-8b": (8, 128), "smollm2": (3, 64)}  # KV heads, head dim
ROWS = [(32, 128), (1, 4096), (16, 4096), (1, 32768)]  # (sequences, tokens each): flush at batch 32, prefills


def make_params(n_kv: int, d: int, bits: int, g_k: int, g_v: int, log8: bool = False,
                ranges: GroupRanges = GroupRanges.MINMAX) -> FoldedParams:
    rot = torch.stack([hadamard_matrix(d)[:, torch.randperm(d)] for _ in range(n_kv)])
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    return FoldedParams(rotation=rot.to(DEVICE), mean=torch.randn(n_kv, d, device=DEVICE), inv_freq=inv_freq.to(DEVICE),
                        attention_scaling=1.0, sm_scale=d**-0.5, bits=bits, g_k=g_k, g_v=g_v,
                        meta_bases=(1e-4, 1e-4) if log8 else None, ranges=ranges)  # fmt: skip


def composed_write(key, value, pos, p: FoldedParams, store: PackedKV, lo: int) -> None:
    """The write path before the fused kernel (torch fold, then the generic encoder, then copies)."""
    n = key.shape[2]
    y = fold_keys(key, mean_at(p.mean, pos, p.inv_freq, p.attention_scaling), p.rotation)
    parts = [t.transpose(1, 2) for t in quantize_pack(y.transpose(1, 2), p.bits, p.g_k, 0.9)]
    parts += [t.transpose(1, 2) for t in quantize_pack(value.transpose(1, 2), p.value_bits, p.g_v, 0.9)]
    for dst, src in zip(store[:6], parts):
        dst[:, :, lo : lo + n] = src
    store.pos[:, lo : lo + n] = pos


def moved_bytes(B: int, n: int, n_kv: int, d: int, p: FoldedParams) -> int:
    kw, kg, vw, vg = p.row_widths
    meta = p.group_meta.bits // 8  # bytes of scale and zero per group
    return B * n * (n_kv * (2 * d * 2 + kw + vw + meta * (kg + vg)) + 4)


def run(args: argparse.Namespace, copy_gbs: float) -> list[dict[str, object]]:
    rows = []
    launches = list(itertools.product(args.block_t, args.num_warps)) if args.tune else [(None, None)]
    settings = [(t, w, None if s == "auto" else s == "1") for (t, w), s in itertools.product(launches, args.split_kv)]
    for shape in args.shapes:
        n_kv, d = SHAPES[shape]
        p = make_params(n_kv, d, args.bits, args.key_group, args.value_group, args.group_meta == "log8",
                        GroupRanges(args.group_ranges))
        for B, n in args.rows:
            lo = 128  # write past the first block, as a flush does
            store = p.empty_rows(B, lo + n, DEVICE)
            key = torch.randn(B, n_kv, n, d, device=DEVICE, dtype=torch.float16) + 0.3
            value = torch.randn(B, n_kv, n, d, device=DEVICE, dtype=torch.float16)
            pos = (torch.arange(n, device=DEVICE, dtype=torch.int32) + lo).expand(B, n).contiguous()
            out = PackedKV(*(t[:, :, lo:] for t in store[:6]), store.pos[:, lo:])
            moved = moved_bytes(B, n, n_kv, d, p)
            composed = None if args.tune or args.group_meta == "log8" or args.group_ranges != "minmax" else bench_ms(lambda: composed_write(key, value, pos, p, store, lo))[0]
            for block_t, warps, split in settings:
                def write() -> None:
                    encode_folded(key, value, pos, p, 0.9, 0.9, out, block_t=block_t, num_warps=warps, split_kv=split)

                ms, gms = bench_ms(write)[0], graph_ms(write)
                programs = cdiv(n, block_t or ENCODE_DEFAULTS["block_t"]) * n_kv * B  # the write's grid
                gbs, graph_gbs = (moved / (t * 1e-3) / 1e9 for t in (ms, gms))
                row = {"shape": shape, "sequences": B, "tokens": n, "bits": args.bits, "group_meta": args.group_meta,
                       "group_ranges": args.group_ranges, "g_k": args.key_group,
                       "g_v": args.value_group, "block_t": block_t or ENCODE_DEFAULTS["block_t"],
                       "num_warps": warps or (8 if p.ranges is GroupRanges.SEARCHED else ENCODE_DEFAULTS["num_warps"]),
                       "split_kv": int(split if split is not None else split_kv_default(programs, DEVICE)),
                       "fused_ms": ms, "GBs": gbs,
                       "pct_of_copy": 100 * gbs / copy_gbs, "graph_ms": gms,
                       "graph_pct_of_copy": 100 * graph_gbs / copy_gbs,
                       "composed_ms": composed if composed is not None else "",
                       "speedup_vs_composed": composed / ms if composed is not None else ""}  # fmt: skip
                rows.append(row)
                if args.csv:
                    append_csv(args.csv, {**row, "copy_GBs": copy_gbs,
                                          "timing": "do_bench" if DEVICE.type == "cuda" else "cpu-smoke"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rows", nargs="+", type=lambda s: tuple(int(x) for x in s.split("x")), default=ROWS,
                    help="sequences x tokens, e.g. 16x4096")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--key-group", type=int, default=64)
    ap.add_argument("--value-group", type=int, default=64)
    ap.add_argument("--group-meta", default="log8", choices=("fp16", "log8"),
                    help="group scales and zeros (log8: 8-bit, what `rkv export` writes by default)")
    ap.add_argument("--group-ranges", default="minmax", choices=[r.value for r in GroupRanges],
                    help="how the writes set each group's range (searched: the best of five by squared error)")
    ap.add_argument("--tune", action="store_true", help="time every --block-t x --num-warps setting")
    ap.add_argument("--block-t", nargs="+", type=int, default=[32, 64, 128])
    ap.add_argument("--num-warps", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--split-kv", nargs="+", default=["auto"], choices=("auto", "0", "1"),
                    help="keys and values in separate programs (encode_folded's split_kv; auto: its default for the "
                         "grid); several: time each")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    copy_gbs = copy_bandwidth_gbs() if DEVICE.type == "cuda" else float("nan")
    rows = run(args, copy_gbs)
    print_table(f"cache writes, folded layout, {args.bits}-bit ({DEVICE}; copy rate {copy_gbs:.0f} GB/s)", rows)
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(rows))


if __name__ == "__main__":
    main()
