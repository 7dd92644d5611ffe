"""Instruction counts of the decode and cache-write kernels, compiled for an H100/H200 (sm_90) without a GPU.

Compiles the default layout's ``_folded_kernel`` (llama-2-7b and llama-3-8b head shapes, 2 bits,
groups of 64, fp16) and the pre-RoPE ``_decode_kernel`` (``kernel="head"``) and ``_chunk_kernel``
(``kernel="chunk"``) at the paper's shape (head groups of 4, d = 128, 2 bits, groups of 128, fp16,
MHA), and the cache-write ``_encode_folded_kernel`` at its default launch for fp16 keys (both kinds of group
metadata), with Triton's own compiler and bundled ``cuobjdump``, and prints registers, stack (spills),
shared memory, the instructions of the main loop's body and the most frequent SASS opcodes. Static
counts, not a profile: they show what a kernel issues per loop iteration. Pointer and stride
arguments are marked divisible by 16, as Triton specializes them at launch (the folded kernel's
scale rows and the runtime's whole-block capacities rely on it); counts differ somewhat between Triton
releases (the GPU runs 3.6).

    python benchmarks/kernel_sass_stats.py                     # all four kernels, their default tiles
    python benchmarks/kernel_sass_stats.py --no-fp-segment     # without the full-precision segment's loop
    python benchmarks/kernel_sass_stats.py --block-t 32 --num-warps 8
    python benchmarks/kernel_sass_stats.py --fp32-tiles           # and fp32 operands: spills, default vs previous settings
    python benchmarks/kernel_sass_stats.py --key-bits 3 --group-meta log8   # the folded kernel's 3-bit keys, 8-bit metadata
    python benchmarks/kernel_sass_stats.py --prep                 # the folded layout's prep launch only (compile seconds)
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rkv_convert.kernels import decode_attention as head_module  # noqa: E402
from rkv_convert.kernels import decode_chunk as chunk_module  # noqa: E402
from rkv_convert.kernels import decode_folded as folded_module  # noqa: E402
from rkv_convert.kernels.decode_folded import FOLDED_DEFAULTS  # noqa: E402

_POINTERS = {"kc_ptr": "*u8", "vc_ptr": "*u8", "kw_ptr": "*i32", "vw_ptr": "*i32", "pos_ptr": "*i32", "fpos_ptr": "*i32",
             "gidp_ptr": "*i32", "gid_ptr": "*i32", "a_ptr": "*fp32", "mean_ptr": "*fp32", "freq_ptr": "*fp32",
             "o_ptr": "*fp32", "lse_ptr": "*fp32", "beta_ptr": "*fp32", "vcol_ptr": "*fp32",
             "qr_ptr": "*fp32", "bias_ptr": "*fp32"}  # fmt: skip
_FLOATS = {"qk_scale", "cap_scale", "rope_scaling", "k_clip", "v_clip", "scale_floor", "k_base", "v_base"}
_UNALIGNED = {"s_fpb", "s_pb"}  # position rows: any capacity


def compile_sm90(fn: triton.JITFunction, constexprs: dict, num_warps: int, num_stages: int, aligned: bool = False,
                 pointers: dict[str, str] | None = None, maxnreg: int | None = None):
    """Compile ``fn`` for sm_90 (fp16 for every pointer not listed above or in ``pointers``, int32 scalars);
    ``aligned``: pointers and ``s_*`` strides divisible by 16, as Triton specializes them at launch."""
    names = fn.arg_names
    pointer_types = {**_POINTERS, **(pointers or {})}
    signature = {}
    for n in names:
        if n in constexprs:
            signature[n] = "constexpr"
        elif n.endswith("_ptr"):
            signature[n] = pointer_types.get(n, "*fp16")
        else:
            signature[n] = "fp32" if n in _FLOATS else "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if aligned and n not in constexprs and (n.endswith("_ptr") or n.startswith("s_")) and n not in _UNALIGNED}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _cuobjdump(compiled, flag: str) -> str:
    """``cuobjdump FLAG`` of a compiled kernel's cubin (Triton's bundled copy)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def loop_body(sass: str) -> int:
    """Instructions between the target and the source of the longest backward branch of ``sass`` (the main loop)."""
    best = 0
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]+)\*/.*\bBRA\s+0x([0-9a-f]+)", line)
        if m and int(m.group(2), 16) < int(m.group(1), 16):
            best = max(best, (int(m.group(1), 16) - int(m.group(2), 16)) // 16 + 1)
    return best


def sass_stats(compiled) -> tuple[int, int, collections.Counter, str]:
    """Registers, stack bytes, an opcode histogram and the SASS text of a compiled kernel."""
    usage = _cuobjdump(compiled, "-res-usage")
    sass = _cuobjdump(compiled, "-sass")
    ops: collections.Counter = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if m:
            ops[m.group(2)] += 1
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    return regs, stack, ops, sass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--block-t", type=int, default=None, help="tokens per step (default: each kernel's)")
    p.add_argument("--num-warps", type=int, default=None)
    p.add_argument("--top", type=int, default=12, help="opcodes to list")
    p.add_argument("--fp32-tiles", action="store_true", help="also fp32 operands: default launch settings and the previous (spilling) ones")
    p.add_argument("--fp-segment", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the full-precision segment's loop too (--no-fp-segment: the token loop of the store only)")
    p.add_argument("--key-bits", type=int, default=2, choices=(2, 3, 4), help="folded kernel: key code bits")
    p.add_argument("--group-meta", default="fp16", choices=("fp16", "log8"), help="folded kernel: group metadata")
    p.add_argument("--prep", action="store_true", help="only the folded layout's prep launch: compile seconds, registers, "
                   "spills, by operand type and head dim, fp32 also in one step per dot (before the chunked dots)")
    args = p.parse_args()
    if args.prep:
        prep_kernel()
        return
    common = dict(D=128, G=4, REP=1, QP=16, K_BITS=2, V_BITS=2, NGK=4, GV=128, NGV=1, HAS_FP=args.fp_segment,
                  PREC="tf32", USE_LIBDEVICE=True, SOFTCAP=False)  # fmt: skip
    kernels = {
        "head": (head_module._decode_kernel,
                 dict(common, NGK_PAD=16, NGV_PAD=16, DOT_DTYPE=tl.float16, KRON=True)),
        "chunk": (chunk_module._chunk_kernel, {k: v for k, v in dict(common, DT=tl.float16).items() if k != "NGK"}),
    }  # fmt: skip
    for shape, rep in (("llama2-7b", 1), ("llama3-8b", 4)):
        cx = dict(D=128, REP=rep, R=rep, NG=2, GK=64, NGV=2, GV=64, K_BITS=args.key_bits, V_BITS=2, K_I8=True,
                  K_FAST=True, V_FAST=True, BLOCK_N=args.block_t or FOLDED_DEFAULTS["block_n"], BLOCK_F=64,
                  HAS_FP=args.fp_segment, DIRECT=False, DT=tl.float16, PREC="tf32", SOFTCAP=False,
                  NUM_STAGES=FOLDED_DEFAULTS["num_stages"], MASKLESS=True, META8=args.group_meta == "log8",
                  BIAS_SCALE=folded_module.bias_scale(torch.float16))  # fmt: skip
        warps = args.num_warps or FOLDED_DEFAULTS["num_warps"]
        meta = {"qr_ptr": "*fp16", "bias_ptr": "*fp16"}  # fp16 queries: fp16 rotated queries and mean bias
        if cx["META8"]:
            meta |= {"ks_ptr": "*u8", "kz_ptr": "*i8", "vs_ptr": "*u8", "vz_ptr": "*i8"}
        c = compile_sm90(folded_module._folded_kernel, cx, warps, cx["NUM_STAGES"], aligned=True, pointers=meta,
                         maxnreg=FOLDED_DEFAULTS["maxnreg"])  # fmt: skip
        regs, stack, ops, sass = sass_stats(c)
        print(f"folded ({shape} heads, K{args.key_bits} {args.group_meta}): {cx['BLOCK_N']} slots x {warps} warps x {cx['NUM_STAGES']} stages: {regs} "
              f"registers, {stack} B stack, {c.metadata.shared} B shared memory, main loop {loop_body(sass)} "
              f"instructions per warp per block")
        print("  " + ", ".join(f"{op} {n}" for op, n in ops.most_common(args.top)))
    for name, (fn, cx) in kernels.items():  # (not marked aligned: the figures in docs/benchmarks.md)
        dflt = head_module.KERNEL_DEFAULTS[name]
        block_t = args.block_t or dflt["block_t"]
        warps = args.num_warps or dflt["num_warps"]
        regs, stack, ops, _ = sass_stats(compile_sm90(fn, dict(cx, BLOCK_T=block_t), warps, dflt["num_stages"]))
        heads = 1 if name == "head" else cx["G"]
        total = sum(ops.values())
        print(f"{name}: {block_t} tokens x {warps} warps, {heads} head(s) per program: {regs} registers, "
              f"{stack} B stack, {total} SASS instructions = {total * warps / (block_t * heads):.0f} "
              f"warp-instructions per key token and head")
        print("  " + ", ".join(f"{op} {n}" for op, n in ops.most_common(args.top)))
    write_kernel()
    if args.fp32_tiles:
        fp32_tiles()


def _encode_constexprs(d: int, group: int, block_t: int, fp16_dots: bool, meta8: bool, split_kv: bool = False) -> dict:
    """Constexprs of ``_encode_folded_kernel`` for 2-bit keys and values, min-max group ranges."""
    return dict(D=d, K_BITS=2, V_BITS=2, GK=group, GV=group, BLOCK_T=block_t, FP16_DOTS=fp16_dots, META8=meta8,
                SEARCH=False, K_F0=1.0, K_F1=1.0, V_F0=1.0, V_F1=1.0, USE_LIBDEVICE=True, SPLIT_KV=split_kv)  # fmt: skip


def write_kernel() -> None:
    """The cache-write kernel at its default launch for fp16 keys (llama2-7b heads, 64 x 4 warps, 2-bit keys, groups
    of 64, min-max ranges) with each kind of group metadata: registers, stack and SASS instructions per warp (one
    program writes 64 tokens of one KV head; there is no loop), then with keys and values in separate programs
    (``split_kv``: both branches compiled, a program runs one)."""
    from rkv_convert.kernels import encode_folded

    block_t, launch = encode_folded._launch(128, True, None, None)
    for meta8, split in ((True, False), (False, False), (True, True)):
        pointers = {"k_ptr": "*fp16", "v_ptr": "*fp16", "rot_ptr": "*fp16",
                    **({"ks_ptr": "*u8", "kz_ptr": "*i8", "vs_ptr": "*u8", "vz_ptr": "*i8"} if meta8 else {})}
        c = compile_sm90(encode_folded._encode_folded_kernel, _encode_constexprs(128, 64, block_t, True, meta8, split),
                         launch["num_warps"], 1, aligned=True, pointers=pointers, maxnreg=launch.get("maxnreg"))
        regs, stack, ops, _ = sass_stats(c)
        label = f"K2 {'log8' if meta8 else 'fp16'}{', split_kv' if split else ''}"
        print(f"encode (llama2-7b heads, {label}): {block_t} tokens x {launch['num_warps']} "
              f"warps (cap {launch.get('maxnreg')}): {regs} registers, {stack} B stack, {sum(ops.values())} SASS "
              f"instructions per warp")


def prep_kernel() -> None:
    """The folded layout's prep launch (mean bias and rotated queries, GQA 4) at head dims 64/128/256: compile seconds,
    registers, stack and SASS instructions; fp16 queries, then fp32 operands (fp32 and bf16 queries) as launched
    (IEEE dots over ``_IEEE_CHUNK`` channels in loops) and in one unrolled step per dot (the former form)."""
    import time

    settings = [("fp16", True, False), ("fp32", False, False), ("fp32, one step", False, True)]
    for d in (64, 128, 256):
        for label, fp16, one_step in settings:
            cx = folded_module._prep_constexprs(4, 4, d, fp16, use_libdevice=True)
            if one_step:
                cx |= {"HB": d // 2, "KB": d}
            t = "*fp16" if fp16 else "*fp32"
            t0 = time.perf_counter()
            c = compile_sm90(folded_module._query_prep_kernel, cx, 4, 3, aligned=True,
                             pointers={"q_ptr": t, "bias_ptr": t, "rot_ptr": t, "qr_ptr": t})  # fmt: skip
            seconds = time.perf_counter() - t0
            regs, stack, ops, _ = sass_stats(c)
            print(f"prep, head dim {d}, {label}: compiled in {seconds:.1f} s, {regs} registers, {stack} B stack, "
                  f"{sum(ops.values())} SASS instructions")


# fp32-operand launch settings before the eighth session (4 warps), which spilled for sm_90: folded decode
# (slots per block, stages) per head dim, cache writes (tokens, register cap; head dim 256: 8 warps, no cap).
FP32_DECODE_PREVIOUS = {64: (128, 2), 128: (128, 2), 256: (32, 1)}
FP32_ENCODE_PREVIOUS = {64: (64, 168), 128: (64, 168), 256: (32, None)}


def fp32_tiles() -> None:
    """The folded decode kernel with fp32 operands (fp32 and bf16 queries) and the cache-write kernel for fp32
    keys, head dims 64/128/256 (GQA 4, groups of 32): registers and spills (stack) at the default launch
    settings (8 warps, spill-free) and at the previous 4-warp ones."""
    from rkv_convert.kernels import encode_folded

    for d in (64, 128, 256):
        t = folded_module._tiles(d, fp16=False)
        settings = [("default", t["block_n"], t["num_stages"], t["num_warps"]),
                    ("previous", *FP32_DECODE_PREVIOUS[d], 4)]  # fmt: skip
        for label, block_n, stages, warps in settings:
            cx = dict(D=d, REP=4, R=4, NG=d // 32, GK=32, NGV=d // 32, GV=32, K_BITS=2, V_BITS=2, K_I8=False,
                      K_FAST=False, V_FAST=False, BLOCK_N=block_n, BLOCK_F=t["block_f"], HAS_FP=True, DIRECT=False,
                      DT=tl.float32, PREC="ieee", SOFTCAP=False, NUM_STAGES=stages, MASKLESS=True, META8=False)  # fmt: skip
            regs, stack, _, _ = sass_stats(compile_sm90(folded_module._folded_kernel, cx, warps, stages, aligned=True))
            print(f"folded fp32, head dim {d}, {label}: {block_n} slots x {warps} warps x {stages} stages: {regs} "
                  f"registers, {stack} B stack")
    fp32 = {"k_ptr": "*fp32", "v_ptr": "*fp32", "rot_ptr": "*fp32"}
    for d in (64, 128, 256):
        block_t, launch = encode_folded._launch(d, False, None, None)
        old_t, old_cap = FP32_ENCODE_PREVIOUS[d]
        settings = [("default", block_t, launch["num_warps"], launch.get("maxnreg")),
                    ("previous", old_t, 4 if old_cap else 8, old_cap)]  # fmt: skip
        for label, tokens, warps, cap in settings:
            c = compile_sm90(encode_folded._encode_folded_kernel, _encode_constexprs(d, 32, tokens, False, False),
                             warps, 1, pointers=fp32, maxnreg=cap)
            regs, stack, _, _ = sass_stats(c)
            print(f"encode fp32 keys, head dim {d}, {label}: {tokens} tokens x {warps} warps"
                  f"{f' (cap {cap})' if cap else ''}: {regs} registers, {stack} B stack")


if __name__ == "__main__":
    main()
