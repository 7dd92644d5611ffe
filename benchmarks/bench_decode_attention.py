"""Decode attention: the packed rkv kernel against fp16 SDPA and against the 2-bit floor.

One new query token per sequence attends over ``T`` cached tokens of one layer. Per row:

- ``sdpa_ms``: ``torch.nn.functional.scaled_dot_product_attention`` over fp16 K/V ``[B, n_kv, T, d]``
  (what transformers' fp16 cache runs), and the GB/s it reaches on those bytes;
- ``rkv_ms``: ``rkv_convert.kernels.decode_attention`` over the same tokens stored packed
  (keys centred, rotated per head group of ``G`` heads, ``bits``-bit codes, fp16 scale/zero per
  group) plus a full-precision segment as the runtime keeps it (8 sinks, 1 scratch slot, a
  128-token window), and the GB/s it reaches on the bytes it reads (the default kernel, one
  program per KV head);
- ``rkv_chunk_ms``: ``kernel="chunk"`` over the same tokens quantized *without* the channel
  permutation (key groups = the rotated head chunks, ``rkv calibrate --permutation none``), the
  layout that kernel needs, timed side by side;
- ``floor_ms``: the bytes rkv reads divided by the measured device copy rate (read + write).

Inputs are random (never zeros); the packed cache is made by the write kernel from the same fp16 keys
and values the SDPA rows read. Rows are appended to a CSV with GPU name, date and versions.

    python benchmarks/bench_decode_attention.py --csv benchmarks/results/decode_attention.csv
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _timing import DEVICE, append_csv, bench_ms, copy_bandwidth_gbs, markdown_table, print_table  # noqa: E402

from rkv_convert.kernels.decode_attention import KERNEL_DEFAULTS, decode_attention, prepare_rotation  # noqa: E402
from rkv_convert.kernels.packed_kv import PackedKV  # noqa: E402
from rkv_convert.kernels.quantize_pack import group_ids_from_perm, quantize_pack  # noqa: E402
from rkv_convert.quant.hadamard import hadamard_matrix  # noqa: E402

# name: (query heads, KV heads, head dim)
SHAPES = {"llama2-7b": (32, 32, 128), "llama2-13b": (40, 40, 128), "llama3-8b": (32, 8, 128)}
FP_SLOTS = 8 + 1 + 128  # sinks, scratch slot, recent window (the runtime's defaults)


class PackedLayer:
    """One layer's packed cache for ``B`` sequences of ``T`` tokens, made from fp16 ``k, v [B, n_kv, T, d]``."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, bits: int, g_k: int, g_v: int, head_group: int,
                 permute: bool = True, chunk: int = 8192):
        B, n_kv, T, d = k.shape
        self.G, self.d, self.bits, self.g_k, self.g_v = head_group, d, bits, g_k, g_v
        Gd, n_hg = head_group * d, n_kv // head_group
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.rotation = hadamard_matrix(Gd).to(k.device)
        self.mean = (0.1 * torch.randn(n_kv * d, generator=gen)).to(k.device)
        perm = torch.cat([torch.randperm(Gd, generator=gen) + h * Gd for h in range(n_hg)])
        if not permute:  # key groups of consecutive rotated channels
            perm = torch.arange(n_hg * Gd)
        self.gid = group_ids_from_perm(perm, Gd, g_k).to(k.device)
        dev, u8, f16 = k.device, torch.uint8, torch.float16
        self.k_codes = torch.empty(B, n_hg, T, Gd * bits // 8, dtype=u8, device=dev)
        self.k_scale = torch.empty(B, n_hg, T, Gd // g_k, dtype=f16, device=dev)
        self.k_zero = torch.empty_like(self.k_scale)
        self.v_codes = torch.empty(B, n_kv, T, d * bits // 8, dtype=u8, device=dev)
        self.v_scale = torch.empty(B, n_kv, T, d // g_v, dtype=f16, device=dev)
        self.v_zero = torch.empty_like(self.v_scale)
        for b in range(B):
            for t0 in range(0, T, chunk):
                t1 = min(t0 + chunk, T)
                rows = k[b, :, t0:t1].transpose(0, 1).reshape(t1 - t0, n_hg, Gd)
                c, s, z = quantize_pack(rows, bits, g_k, 0.9, rotation=self.rotation, mean=self.mean, gid=self.gid)
                self.k_codes[b, :, t0:t1], self.k_scale[b, :, t0:t1], self.k_zero[b, :, t0:t1] = (
                    c.transpose(0, 1), s.transpose(0, 1), z.transpose(0, 1))
                c, s, z = quantize_pack(v[b, :, t0:t1].transpose(0, 1), bits, g_v, 0.9)
                self.v_codes[b, :, t0:t1], self.v_scale[b, :, t0:t1], self.v_zero[b, :, t0:t1] = (
                    c.transpose(0, 1), s.transpose(0, 1), z.transpose(0, 1))
        self.pos = torch.arange(T, dtype=torch.int32, device=dev).repeat(B, 1)
        self.fp_k = torch.randn(B, n_kv, FP_SLOTS, d, dtype=f16, device=dev)
        self.fp_v = torch.randn_like(self.fp_k)
        self.fp_pos = torch.arange(T, T + FP_SLOTS, dtype=torch.int32, device=dev).repeat(B, 1)
        self.fp_pos[:, 8] = -1  # the scratch slot is always empty
        self.inv_freq = (1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)).to(dev)
        self.prepared = prepare_rotation(self.rotation, d, torch.float16, self.gid)  # once per layer, as the runtime does

    def tensors(self, T: int) -> tuple[torch.Tensor, ...]:
        """The first ``T`` tokens (views, no copies)."""
        return (self.k_codes[:, :, :T], self.k_scale[:, :, :T], self.k_zero[:, :, :T],
                self.v_codes[:, :, :T], self.v_scale[:, :, :T], self.v_zero[:, :, :T], self.pos[:, :T])

    def bytes_read(self, T: int) -> int:
        quant = sum(t.numel() * t.element_size() for t in self.tensors(T))
        fp = sum(t.numel() * t.element_size() for t in (self.fp_k, self.fp_v, self.fp_pos))
        return quant + fp

    def attend(self, q: torch.Tensor, T: int, **options: object) -> torch.Tensor:
        return decode_attention(
            q, PackedKV(*self.tensors(T), self.fp_k, self.fp_v, self.fp_pos), rotation=self.prepared, k_mean=self.mean, k_gid=self.gid, inv_freq=self.inv_freq,
            attention_scaling=1.0, sm_scale=self.d**-0.5, k_bits=self.bits, v_bits=self.bits,
            k_group_size=self.g_k, v_group_size=self.g_v, **options,
        )  # fmt: skip


def _fits(B: int, n_kv: int, T: int, d: int, bits: int, budget: float) -> bool:
    fp16 = 2 * B * n_kv * T * d * 2
    return fp16 * (1 + 2 * bits / 16 + 0.1) < budget  # fp16 K/V and two packed layers


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    copy_gbs = copy_bandwidth_gbs()
    print(f"device copy rate (read + write): {copy_gbs:.0f} GB/s on {DEVICE}")
    rows: list[dict[str, object]] = []
    for name in args.shapes:
        n_q, n_kv, d = SHAPES[name]
        G = math.gcd(n_kv, args.head_group)
        for B in args.batches:
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
                budget = args.memory_fraction * torch.cuda.mem_get_info()[0]
            else:
                budget = float("inf")
            contexts = [T for T in args.contexts if _fits(B, n_kv, T, d, args.bits, budget)]
            for T in args.contexts:
                if T not in contexts:
                    print(f"skip {name} B={B} T={T}: does not fit in memory")
            if not contexts:
                continue
            T_max = max(contexts)
            k = torch.randn(B, n_kv, T_max, d, dtype=torch.float16, device=DEVICE)
            v = torch.randn_like(k)
            layer = PackedLayer(k, v, args.bits, args.key_group, args.value_group, G)
            by_chunk = PackedLayer(k, v, args.bits, args.key_group, args.value_group, G, permute=False) \
                if args.compare_chunk else None
            q = torch.randn(B, n_q, d, dtype=torch.float16, device=DEVICE)
            for T in contexts:
                kt, vt = k[:, :, :T], v[:, :, :T]
                sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], kt, vt, enable_gqa=n_q != n_kv)  # noqa: E731
                sdpa_ms = bench_ms(sdpa)[0]
                rkv_ms, rkv_lo, rkv_hi = bench_ms(lambda: layer.attend(q, T, kernel="head"))
                chunk_ms = float("nan")
                if by_chunk is not None:
                    chunk_ms = bench_ms(lambda: by_chunk.attend(q, T, kernel="chunk", **args.chunk_kw))[0]
                dense_ms = float("nan")
                if args.compare_dense and layer.prepared.factored and G > 1:
                    dense_ms = bench_ms(lambda: layer.attend(q, T, kernel="head", factored=False))[0]
                fp16_bytes = 2 * kt.numel() * 2
                rkv_bytes = layer.bytes_read(T)
                row = {
                    "shape": name, "batch": B, "context": T, "n_q": n_q, "n_kv": n_kv, "head_dim": d, "head_group": G,
                    "bits": args.bits, "key_group": args.key_group, "value_group": args.value_group,
                    "sdpa_ms": sdpa_ms, "rkv_ms": rkv_ms, "rkv_p20_ms": rkv_lo, "rkv_p80_ms": rkv_hi,
                    "floor_ms": rkv_bytes / (copy_gbs * 1e9) * 1e3,
                    "speedup_vs_sdpa": sdpa_ms / rkv_ms,
                    "rotation": "factored" if layer.prepared.factored else "dense", "rkv_dense_ms": dense_ms,
                    "rkv_chunk_ms": chunk_ms, "chunk_vs_head": rkv_ms / chunk_ms,
                    "chunk_speedup_vs_sdpa": sdpa_ms / chunk_ms,
                    "rkv_chunk_GBs": by_chunk.bytes_read(T) / (chunk_ms * 1e-3) / 1e9 if by_chunk else float("nan"),
                    "sdpa_GBs": fp16_bytes / (sdpa_ms * 1e-3) / 1e9,
                    "rkv_GBs": rkv_bytes / (rkv_ms * 1e-3) / 1e9,
                    "copy_GBs": copy_gbs,
                    "bits_per_elem": 8 * rkv_bytes / (2 * B * n_kv * (T + FP_SLOTS) * d),
                }  # fmt: skip
                row["floor_fraction"] = row["floor_ms"] / rkv_ms
                rows.append(row)
                if args.csv:
                    append_csv(args.csv, {**row, "timing": "do_bench" if DEVICE.type == "cuda" else "cpu-smoke"})
                print(f"{name} B={B} T={T}: sdpa {sdpa_ms:.3f} ms, rkv head {rkv_ms:.3f} ms ({row['speedup_vs_sdpa']:.2f}x), "
                      f"chunk {chunk_ms:.3f} ({row['chunk_speedup_vs_sdpa']:.2f}x), "
                      f"floor {row['floor_ms']:.3f} ms", flush=True)  # fmt: skip
            del k, v, layer, by_chunk
    return rows


def tune(args: argparse.Namespace) -> list[dict[str, object]]:
    """Tokens per inner step, warps and stages of each kernel at mid-size shapes (informs the defaults)."""
    rows = []
    for name in args.tune_shapes:
        n_q, n_kv, d = SHAPES[name]
        B, T = args.tune_batch, args.tune_context
        k = torch.randn(B, n_kv, T, d, dtype=torch.float16, device=DEVICE)
        v = torch.randn_like(k)
        G = math.gcd(n_kv, args.head_group)
        layers = {"permuted": PackedLayer(k, v, args.bits, args.key_group, args.value_group, G)}
        if "chunk" in args.tune_kernels:
            layers["by_chunk"] = PackedLayer(k, v, args.bits, args.key_group, args.value_group, G, permute=False)
        q = torch.randn(B, n_q, d, dtype=torch.float16, device=DEVICE)
        for kernel in args.tune_kernels:
            layer = layers["by_chunk" if kernel == "chunk" else "permuted"]
            for block_t, warps, *stages in args.tune:
                kw = dict(block_t=block_t, num_warps=warps, num_stages=stages[0] if stages else None, kernel=kernel)
                try:
                    ms = bench_ms(lambda: layer.attend(q, T, **kw))[0]
                except Exception as err:  # e.g. out of shared memory for a large tile: record, go on
                    print(f"tune {name} {kernel} {block_t}x{warps}x{stages}: {type(err).__name__}: {err}"[:300])
                    ms = float("nan")
                rows.append({"shape": name, "batch": B, "context": T, "kernel": kernel, "block_t": block_t,
                             "num_warps": warps, "num_stages": stages[0] if stages else KERNEL_DEFAULTS[kernel]["num_stages"], "rkv_ms": ms})
                print(rows[-1], flush=True)
        del k, v, layers
    return rows


def _launch(kernel: str, spec: str, tuned: list[dict[str, object]]) -> dict[str, int]:
    """Keyword arguments of ``kernel``'s launch in the sweep from ``--chunk-launch``."""
    if spec == "default":
        return {}
    if spec == "tuned":
        total: dict[tuple[int, int, int], float] = {}  # summed over the tuned shapes
        for r in tuned:
            if r["kernel"] == kernel:
                key = (int(r["block_t"]), int(r["num_warps"]), int(r["num_stages"]))
                total[key] = total.get(key, 0.0) + float(r["rkv_ms"])
        total = {k: v for k, v in total.items() if v == v}  # drop failed configurations (NaN)
        if not total:
            raise SystemExit(f"--{kernel}-launch tuned needs --tune rows of that kernel (--tune-kernels {kernel})")
        block_t, warps, stages = min(total, key=total.get)
        return {"block_t": block_t, "num_warps": warps, "num_stages": stages}
    block_t, warps, stages = (int(x) for x in spec.split("x"))
    return {"block_t": block_t, "num_warps": warps, "num_stages": stages}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536])
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--key-group", type=int, default=128)
    p.add_argument("--value-group", type=int, default=128)
    p.add_argument("--head-group", type=int, default=4, help="KV heads per key rotation group (gcd with the KV heads)")
    p.add_argument("--compare-dense", action=argparse.BooleanOptionalAction, default=False,
                   help="also time the head kernel's dense inverse rotation (G*d*d MACs per key) beside the factored one")
    p.add_argument("--compare-chunk", action=argparse.BooleanOptionalAction, default=True,
                   help="also time kernel='chunk' over the same tokens quantized without the channel permutation")
    p.add_argument("--memory-fraction", type=float, default=0.8, help="share of free GPU memory a row may use")
    p.add_argument("--tune", type=lambda s: tuple(int(x) for x in s.split("x")), nargs="*", default=[],
                   help="block_t x num_warps [x num_stages] to time at --tune-batch/--tune-context, e.g. 32x4 64x4x2 128x8")
    p.add_argument("--tune-shapes", nargs="+", default=["llama2-7b"], choices=list(SHAPES))
    p.add_argument("--tune-kernels", nargs="+", default=["head", "chunk"], choices=["head", "chunk"])
    p.add_argument("--tune-only", action="store_true", help="skip the sweep, run only --tune")
    p.add_argument("--chunk-launch", default="default",
                   help="launch settings of the chunk kernel in the sweep: 'default', 'tuned' (fastest chunk row of "
                        "--tune, which then runs first) or block_t x num_warps x num_stages, e.g. 64x4x1")
    p.add_argument("--tune-batch", type=int, default=8)
    p.add_argument("--tune-context", type=int, default=16384)
    p.add_argument("--csv", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None, help="also write the table as Markdown here")
    args = p.parse_args()
    tuned = tune(args) if args.tune else []
    args.chunk_kw = _launch("chunk", args.chunk_launch, tuned)
    print(f"launch settings in the sweep: chunk {args.chunk_kw or 'defaults'}", flush=True)
    rows = [] if args.tune_only else run(args)
    cols = ["shape", "batch", "context", "sdpa_ms", "rkv_ms", "rkv_chunk_ms", "floor_ms",
            "speedup_vs_sdpa", "chunk_speedup_vs_sdpa", "sdpa_GBs", "rkv_GBs", "rkv_chunk_GBs", "bits_per_elem"]  # fmt: skip
    if args.compare_dense:
        cols.insert(6, "rkv_dense_ms")
    print_table(f"decode attention, {args.bits}-bit, one layer ({DEVICE})", rows, cols)
    print_table("kernel block_t x num_warps", tuned)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_table(rows, cols) + ("\n" + markdown_table(tuned) if tuned else ""))


if __name__ == "__main__":
    main()
