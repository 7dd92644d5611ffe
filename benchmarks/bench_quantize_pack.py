"""The write kernel: centre + grouped-head rotation + quantize + pack, against its torch reference.

Rows as the cache writes them: keys ``[tokens, n_hg, G*d]`` (centred, rotated by ``H_{G*d}``,
grouped by a permutation) and values ``[tokens, n_kv, d]``, for one decode step of a batch
(``B`` tokens) and for a prefill block (``B * T`` tokens). GB/s counts the fp16 rows read and the
codes, scales and zeros written.

    python benchmarks/bench_quantize_pack.py --csv benchmarks/results/quantize_pack.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import DEVICE, append_csv, bench_ms, markdown_table, print_table  # noqa: E402

from rkv_convert.kernels.quantize_pack import group_ids_from_perm, quantize_pack  # noqa: E402
from rkv_convert.quant.hadamard import hadamard_matrix  # noqa: E402


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    n_kv, d, G = args.kv_heads, args.head_dim, args.head_group
    n_hg, Gd = n_kv // G, G * d
    gen = torch.Generator().manual_seed(0)
    rotation = hadamard_matrix(Gd).to(DEVICE)
    mean = torch.randn(n_kv * d, generator=gen).to(DEVICE)
    gid = group_ids_from_perm(torch.cat([torch.randperm(Gd, generator=gen) + h * Gd for h in range(n_hg)]), Gd, args.key_group).to(DEVICE)
    rows = []
    for tokens in args.tokens:
        keys = torch.randn(tokens, n_hg, Gd, dtype=torch.float16, device=DEVICE) + 0.5
        values = torch.randn(tokens, n_kv, d, dtype=torch.float16, device=DEVICE)
        for what, x, kw, g in (
            ("keys", keys, dict(rotation=rotation, mean=mean, gid=gid), args.key_group),
            ("values", values, {}, args.value_group),
        ):
            timings = {}
            for backend in ("triton", "reference"):
                fn = lambda: quantize_pack(x, args.bits, g, 0.9, backend=backend, **kw)  # noqa: E731
                timings[backend] = bench_ms(fn)[0]
            codes, scale, zero = quantize_pack(x, args.bits, g, 0.9, backend="triton", **kw)
            moved = x.numel() * 2 + codes.numel() + 2 * scale.numel() * 2
            row = {
                "what": what, "tokens": tokens, "width": x.shape[-1], "bits": args.bits, "group": g,
                "triton_ms": timings["triton"], "reference_ms": timings["reference"],
                "speedup_vs_reference": timings["reference"] / timings["triton"],
                "triton_GBs": moved / (timings["triton"] * 1e-3) / 1e9,
            }  # fmt: skip
            rows.append(row)
            if args.csv:
                append_csv(args.csv, {**row, "timing": "do_bench" if DEVICE.type == "cuda" else "cpu-smoke"})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--head-group", type=int, default=4)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--key-group", type=int, default=128)
    p.add_argument("--value-group", type=int, default=128)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 4096, 32768],
                   help="rows per call: a decode step writes B tokens, a prefill B*T")
    p.add_argument("--csv", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args()
    rows = run(args)
    print_table(f"quantize + pack, {args.kv_heads} KV heads of {args.head_dim}, G={args.head_group} ({DEVICE})", rows)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_table(rows))


if __name__ == "__main__":
    main()
