"""Decode attention over a *query-folded* packed cache: post-RoPE keys, centred and rotated per KV head.

Storage layout of one decoder layer (``B`` batch, ``n_kv`` KV heads of ``d`` channels, ``cap``
slots; codes packed along channels with :func:`rkv_convert.quant.packing.pack_codes`):

- Keys: the key ``k_n`` (pre-RoPE) of the token at position ``n`` is stored as
  ``y_n = RoPE_n(k_n - mu_h) @ R_h`` (``mu_h fp32 [d]`` the calibrated pre-RoPE mean, ``R_h fp32
  [d, d]`` any orthonormal matrix, one per KV head, no mixing across heads), quantized per token,
  asymmetric min/max over groups of ``g_k`` consecutive channels of ``y`` (``quant.quantizer``).
- Values: as stored today (already rotated by the exported weights), groups of ``g_v``
  consecutive channels.
- RoPE: Llama ``rotate_half`` (channel ``i`` pairs with ``i + d/2``), angle ``n * inv_freq[i mod
  d/2]``, cos/sin times ``attention_scaling``: :func:`rkv_convert.runtime.ops.rope`.
- Full-precision segment (sinks + recent window): *post-RoPE* keys and values as the model made them.

Tensors travel as one :class:`PackedKV`; the per-layer constants as :class:`FoldedParams`.

Decode (one query token per sequence, ``q [B, n_q, d]`` post-RoPE, ``n_q = n_kv * rep``, query
head ``i`` reads KV head ``i // rep``). Since ``RoPE_n(k_n) = y_n R_h^T + RoPE_n(mu_h)``,

    q · RoPE_n(k_n) = (q R_h) · y_n + q · RoPE_n(mu_h),
    q · RoPE_n(mu)  = Σ_{i<d/2} A_i cos(n θ_i) + B_i sin(n θ_i)   (times attention_scaling),
    A_i = q_i mu_i + q_{i+d/2} mu_{i+d/2},   B_i = q_{i+d/2} mu_i - q_i mu_{i+d/2}.

Two launches (plus the split-K merge):

1. **Query prep** (grid ``(B, T / 64 + n_kv)``). The first ``T / 64`` programs write the mean bias
   ``bias[b, i, t] = q_i · RoPE_{pos[b,t]}(mu)`` for every query head and slot, ``-inf`` for empty
   slots (``pos == -1``). The coefficients ``A, B`` are
   formed in the kernel; cos/sin of each slot's own position (the fast hardware unit after a
   Cody-Waite reduction) meet them in two dots. It reads the positions once for all heads and
   writes ``2 n_q`` bytes per slot (fp16 for fp16 queries, whose dots already round their operands to
   fp16, stored at 1/64 of its value so that it keeps fp32's range where it matters: :func:`bias_scale`;
   ``4 n_q`` in fp32 otherwise), which the main kernel reads back: beside the default store's 80 bytes
   per slot and KV head, 2.5 % more for MHA, 10 % for a GQA group of 4 (fp32: 5 % and 20 %). The fp16
   bias made llama3-8b heads 1.005x-1.056x faster (median 1.039x) on an H100, llama2-7b heads 0.989x-1.018x
   (``decode_fp16_bias_ab_H100_s36.log``).
   The last ``n_kv`` programs write ``q' = q R_h`` for their KV head's query rows (fp16 operands and
   result for fp16 queries, fp32 sums; else fp32; :func:`rotate_queries` is the reference), so that the
   attention launch needs no other op before it.
2. **Attention** (grid ``(B, n_kv, n_parts)``, one program per KV head, its ``rep`` query heads
   and one contiguous split of slots; split-K with a log-sum-exp merge, or one launch when there
   is a single part). Per program, once: its rows of ``q'`` (from the prep launch). Per block of
   ``BLOCK_N`` slots:

   - **Codes as four planes.** Plane ``j`` of a packed byte tile ``[BLOCK_N, d/4]`` holds channels
     ``4i + j`` (one shift per byte, no interleave); each plane meets the matching rows of ``q'`` in
     a ``tl.dot``.
   - **Integer key dots** (fp16 queries, head dim >= 128: :func:`int8_key_dots`). The codes are
     integers, so the key dots are int8 x int8 -> int32, exact: each column ``(r, g)`` of ``q'`` is
     rounded once per program to ``step * round(q' / step)``, ``step = max|q'| / 127``
     (:func:`round_query_int8`; the reference does the same for these calls). On CUDA a 2-bit plane
     is one shift and one mask per four codes (3 bits: one more shift, mask and or for the high bit,
     whose bytes are picked per channel pair once per block). The rounding adds about 1.4 % of the score error that
     2-bit keys already make (``test_int8_query_costs_little_next_to_two_bit_keys``); it cut the main
     loop from 1,058 to 870 SASS instructions per warp and block (llama2-7b heads) and ran 1.07x-1.18x
     faster at >= 16k tokens on an H200. Other calls use fp16 (fp32 for fp32/bf16 queries) key dots.
   - **Scales and zeros on score entries, not key elements.** The dot's columns are
     ``(query row r, key group g)`` pairs (zero-padded to the dot's minimum width of 16): column
     ``(r, g)`` of ``q'`` keeps only group ``g``'s channels, so one dot gives every group's partial
     dot ``q'_g · c_g``; then ``score_r = Σ_g s_g (q'_g · c_g) + z_g Σ q'_g + bias_r``. With 8-bit
     group metadata (``FoldedParams.meta_bases``) ``s_g, z_g`` are decoded from their byte codes after
     the load (one ``exp2`` per slot and group: ``quant.quantizer.group_scale_zero``).
   - **Deferred sums:** the softmax denominator and the value zero terms are kept per slot of the block and
     summed over slots once after the loop: only the running max needs a reduction across warps per block.
   - **Values:** the softmax weights times each value group's scale make the left operand
     ``[(r, g), BLOCK_N]`` of a dot with each value plane, formed as rows from the transposed weights and
     scales (transposing a ``[BLOCK_N, (r, g)]`` tile instead cost 57 more instructions per warp and block);
     zeros become one running sum per ``(r, g)``.
     On CUDA, 2-bit value planes become fp16 ``4 + code`` directly by byte permutes (two ``prmt`` per
     four codes, no conversion instruction); the bias ``4`` is folded into the zero term.
   - Every load of a block (codes, scales, zeros, bias) is issued ``num_stages - 1`` blocks ahead
     (``cp.async`` into shared memory): scales and zeros are read as whole ``[BLOCK_N, groups]``
     rows, which needs the slot stride of the scale tensors to be their group count.
   - Full-precision segment in parts of its own after the splits (one part, or one per 64-slot block
     beside short splits: :func:`fp_slots_per_part`), or inside the only split.

Other dot operands are fp16 for fp16 queries and fp32 (IEEE) for fp32/bf16 queries, accumulation fp32
everywhere.

Measured status: ``docs/benchmarks.md`` (the latest H200 and H100 runs; CUDA-graph replay against fp16 SDPA).
Still instruction-bound, not byte-bound: the value planes' byte gathers and conversions and the
per-block score assembly dominate the 796 instructions per warp and block for llama2-7b heads, 787 for llama3-8b
(``benchmarks/kernel_sass_stats.py --group-meta log8``, Triton 3.6, sm_90, fp16 rotated queries and bias; 794 / 779
compiled with them as fp32 pointers before the fp16 bias, 851 with the transposed value operand, 879 before the
deferred sums).

Dispatch (see :mod:`rkv_convert.kernels._common`): ``backend="auto"`` runs the kernels on CUDA
tensors or under ``TRITON_INTERPRET=1``, else :func:`decode_folded_ref`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import triton
import triton.language as tl

from rkv_convert.runtime.ops import dequantize_values, rope

from ._chunk_parts import _log2_logits, logit_scales
from ._common import Backend, cdiv, device_guard, next_pow2, resolve_backend, split_slots, triton_interpreting
from ._decode_parts import _byte_tiles, _cos_sin, _plane_codes
from ._occupancy import sm_count
from ._split_merge import merge_parts
from .folded_params import FoldedParams
from .packed_kv import PackedKV

__all__ = ["FOLDED_DEFAULTS", "bias_scale", "decode_folded", "decode_folded_ref", "folded_scores_ref", "int8_key_dots",
           "mean_scores_ref", "rotate_queries", "round_query_int8"]

# Launch settings: the best of benchmarks/bench_decode_folded.py --tune on an H200. ``maxnreg``: a register
# cap for fp16 queries at these tiles (the compiler picks 142-150): four programs per SM instead of three,
# 1.05x-1.11x faster at 4k-64k contexts on the H200 (CUDA-graph replay; 112 and 96 were no faster).
# ``waves``: programs per SM that short splits and the fp segment's parts may fill together
# (:func:`fp_slots_per_part`); ``resident``: the programs per SM the register cap allows (65,536 registers per
# SM on sm_80/sm_90), one round of :func:`default_splits`' long-context grids.
FOLDED_DEFAULTS: dict[str, int] = {"block_n": 128, "num_warps": 4, "num_stages": 2, "maxnreg": 128, "waves": 8}
FOLDED_DEFAULTS["resident"] = 65536 // (FOLDED_DEFAULTS["maxnreg"] * FOLDED_DEFAULTS["num_warps"] * 32)
_BIAS_BLOCK = 64
# Channels per IEEE fp32 dot in the prep launch (fp32 and bf16 queries): at head dim 256 its one-step dots spilled
# 6.9 KB per thread and took about 8 s to compile for sm_90 on a CPU, now 0.6 s (``benchmarks/kernel_sass_stats.py --prep``).
_IEEE_CHUNK = 32


def bias_scale(dtype: torch.dtype) -> float:
    """What the stored mean bias is multiplied by to give ``q · RoPE_pos(mu)``: 64 for the fp16 bias of fp16 queries
    (stored as 1/64 of its value, exactly, so that sums up to 64 x 65,504 stay finite: each of its ``d/2`` terms
    is already an fp16 operand), 1 for the fp32 bias of other queries."""
    return 64.0 if dtype == torch.float16 else 1.0


class _Dims(NamedTuple):
    """The dimensions of one call (``T`` store slots read, ``F`` full-precision slots)."""

    B: int
    n_q: int
    n_kv: int
    d: int
    rep: int
    T: int
    F: int


def _dims(q: torch.Tensor, kv: PackedKV, p: FoldedParams, n_tokens: int | None) -> _Dims:
    """Validate shapes against the layout; return the dimensions."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, n_q, d], got {tuple(q.shape)}")
    B, n_q, d = q.shape
    n_kv = p.n_kv
    if d != p.head_dim or n_q % n_kv:
        raise ValueError(f"q {tuple(q.shape)} does not fit {n_kv} KV heads of {p.head_dim}")
    cap = kv.k_codes.shape[2] if kv.k_codes.dim() == 4 else -1
    T = cap if n_tokens is None else int(n_tokens)
    if not 0 <= T <= max(cap, 0):
        raise ValueError(f"n_tokens={n_tokens} outside the cache's {cap} slots")
    k_width, k_groups, v_width, v_groups = p.row_widths
    u8, i32, (s_dt, z_dt) = torch.uint8, torch.int32, p.group_meta.dtypes
    want = [
        ("k_codes", kv.k_codes, (B, n_kv, cap, k_width), u8),
        ("k_scale", kv.k_scale, (B, n_kv, cap, k_groups), s_dt),
        ("k_zero", kv.k_zero, (B, n_kv, cap, k_groups), z_dt),
        ("v_codes", kv.v_codes, (B, n_kv, cap, v_width), u8),
        ("v_scale", kv.v_scale, (B, n_kv, cap, v_groups), s_dt),
        ("v_zero", kv.v_zero, (B, n_kv, cap, v_groups), z_dt),
        ("pos", kv.pos, (B, cap), i32),
    ]
    F = 0
    if kv.fp_k is not None or kv.fp_v is not None or kv.fp_pos is not None:
        if kv.fp_k is None or kv.fp_v is None or kv.fp_pos is None:
            raise ValueError("fp_k, fp_v and fp_pos go together")
        F = kv.fp_k.shape[2]
        want += [("fp_k", kv.fp_k, (B, n_kv, F, d), None), ("fp_v", kv.fp_v, (B, n_kv, F, d), None),
                 ("fp_pos", kv.fp_pos, (B, F), i32)]  # fmt: skip
    for name, t, shape, dtype in want:
        if t.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if dtype is not None and t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    return _Dims(B, n_q, n_kv, d, n_q // n_kv, T, F)


def mean_scores_ref(
    q: torch.Tensor, pos: torch.Tensor, params: FoldedParams, compute_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The mean term ``q · RoPE_pos(mu_h)`` ``fp32 [B, n_q, T]`` (``pos [B, T]``, ``-1`` read as 0):
    the reference of the mean-bias kernel. ``compute_dtype`` rounds the dot's operands."""
    B, n_q, d = q.shape
    n_kv, T = params.n_kv, pos.shape[1]
    qf = q.float().reshape(B, n_kv, n_q // n_kv, d)
    mu = params.mean.to(q.device, torch.float32)[None, :, None, :].expand(B, n_kv, T, d)
    mu_rope = rope(mu, pos.clamp_min(0), params.inv_freq, params.attention_scaling)  # [B, n_kv, T, d]
    cd = compute_dtype
    return (qf.to(cd) @ mu_rope.to(cd).transpose(-1, -2)).float().reshape(B, n_q, T)


def rotate_queries(q: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """``q' = q R_h`` as ``[B, n_kv, rep, d]`` (query head ``h*rep + r`` by its KV head's ``R_h``,
    ``rotation [n_kv, d, d]``): the reference of the kernel's rotation (``_rotate_block``, in the launch
    that writes the mean bias).

    fp16 queries: ``R_h`` rounded to fp16, products summed in fp32, ``q'`` rounded to fp16 (what the
    kernel's dots take: its fp16 key dots round ``q'`` to fp16, its integer dots to 8 bits); other
    dtypes in fp32. One batched product per KV head (a broadcast ``matmul`` would copy ``R`` once per
    sequence)."""
    B, n_q, d = q.shape
    n_kv = rotation.shape[0]
    rep = n_q // n_kv
    a = q.reshape(B, n_kv, rep, d).transpose(0, 1).reshape(n_kv, B * rep, d).float()
    half = q.dtype == torch.float16
    r = rotation.to(q.device, torch.float16 if half else torch.float32).float()
    out = torch.bmm(a, r)
    return (out.half() if half else out).view(n_kv, B, rep, d).transpose(0, 1)


def int8_key_dots(q_dtype: torch.dtype, head_dim: int) -> bool:
    """True if the kernel takes integer key dots (``q R_h`` rounded to 8 bits, :func:`round_query_int8`):
    fp16 queries at head dims >= 128 (an 8-bit dot needs 32 channels per code plane)."""
    return q_dtype == torch.float16 and head_dim >= 128


def round_query_int8(q_rot: torch.Tensor, group: int) -> torch.Tensor:
    """``q' = q R_h`` as the kernel's integer key dots see it (fp16 queries): per query row and key
    group of ``group`` channels, ``step * round(q' / step)`` with ``step = max|q'| / 127``
    (round half up)."""
    shape = q_rot.shape
    g = q_rot.float().reshape(*shape[:-1], shape[-1] // group, group)
    amax = g.abs().amax(-1, keepdim=True)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    return (torch.floor(g * (127.0 / amax) + 0.5) * (amax / 127.0)).reshape(shape)


def folded_scores_ref(
    q: torch.Tensor, y: torch.Tensor, pos: torch.Tensor, params: FoldedParams, compute_dtype: torch.dtype = torch.float32,
    query_int8: bool = False,
) -> torch.Tensor:
    """Unscaled scores ``q · RoPE_pos(k)`` ``fp32 [B, n_q, T]`` from folded keys ``y [B, n_kv, T, d]``.

    ``(q R_h) · y + q · RoPE_pos(mu_h)`` (module docstring, :func:`mean_scores_ref`); ``pos [B, T]``,
    ``-1`` read as 0. ``compute_dtype`` rounds the operands of both dots and ``query_int8`` rounds
    ``q R_h`` to 8 bits per key group (:func:`round_query_int8`; tests: the error a low-precision
    kernel may have).
    """
    B, n_q, _ = q.shape
    q_rot = rotate_queries(q, params.rotation).float()
    cd = compute_dtype
    if query_int8:  # the codes are integers: the kernel's dot is exact, only q' is rounded
        q_rot, cd_keys = round_query_int8(q_rot, params.g_k), torch.float32
    else:
        cd_keys = cd
    s = (q_rot.to(cd_keys) @ y.to(cd_keys).transpose(-1, -2)).float().reshape(B, n_q, -1)
    return s + mean_scores_ref(q, pos, params, cd)


def decode_folded_ref(
    q: torch.Tensor,
    kv: PackedKV,
    params: FoldedParams,
    *,
    n_tokens: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
    query_int8: bool | None = None,
) -> torch.Tensor:
    """Pure-torch reference of :func:`decode_folded` (arguments as there), fp32 math.

    Dequantize (``runtime.ops.dequantize_values``, consecutive groups, for keys and values), fold
    (:func:`folded_scores_ref`), attend over valid slots and the fp segment. A sequence without
    any valid token gets zeros. ``compute_dtype`` (tests only) rounds every matmul's operands;
    ``query_int8`` rounds ``q R_h`` to 8 bits as the kernel does (None: where the kernel does,
    :func:`int8_key_dots`), so that ``backend="reference"`` computes the kernel's math.

    Returns:
        ``[B, n_q, d]`` in ``q.dtype``.
    """
    dm = _dims(q, kv, params, n_tokens)
    B, d, rep, T = dm.B, dm.d, dm.rep, dm.T
    cd = compute_dtype
    if query_int8 is None:
        query_int8 = int8_key_dots(q.dtype, d)
    if T:
        y = dequantize_values(kv.k_codes[:, :, :T], kv.k_scale[:, :, :T], kv.k_zero[:, :, :T], params.bits, d,
                              params.key_meta_base)  # fmt: skip
        v = dequantize_values(kv.v_codes[:, :, :T], kv.v_scale[:, :, :T], kv.v_zero[:, :, :T], params.value_bits, d,
                              params.value_meta_base)  # fmt: skip
    else:  # (the dequantizer cannot view an empty tensor with -1)
        y = v = q.new_zeros(B, dm.n_kv, 0, d, dtype=torch.float32)
    pos = kv.pos[:, :T]
    scores = folded_scores_ref(q, y, pos, params, cd, query_int8)  # [B, n_q, T]
    valid = pos >= 0
    if dm.F:
        fk = kv.fp_k.float().repeat_interleave(rep, 1)  # [B, n_q, F, d]
        s_fp = (q.float()[:, :, None, :].to(cd) @ fk.to(cd).transpose(-1, -2)).float().squeeze(2)
        scores = torch.cat([scores, s_fp], -1)
        v = torch.cat([v, kv.fp_v.float()], 2)
        valid = torch.cat([valid, kv.fp_pos >= 0], 1)
    v = torch.where(valid[:, None, :, None], v, 0.0).repeat_interleave(rep, 1)  # empty slots may hold garbage
    scores = scores * params.sm_scale
    if params.softcap is not None:
        scores = params.softcap * torch.tanh(scores / params.softcap)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(scores, -1).nan_to_num(0.0)
    out = (p[:, :, None, :].to(cd) @ v.to(cd)).float().squeeze(2)
    return out.to(q.dtype)


@triton.jit
def _u2_plane_fp16(b, J: tl.constexpr):
    """fp16 ``4 + ((b >> 2J) & 3)`` of a uint8 tile, by byte permutes: no conversion instruction.

    The code lands in bits 8-9 of an fp16 whose exponent is that of 4.0 (one unit = 1 there).
    """
    if J == 0:
        asm: tl.constexpr = ("{.reg .b32 t, z; mov.b32 z, 0; and.b32 t, $2, 0x03030303; or.b32 t, t, 0x44444444; "
                             "prmt.b32 $0, t, z, 0x1404; prmt.b32 $1, t, z, 0x3424;}")
    elif J == 1:
        asm: tl.constexpr = ("{.reg .b32 t, z; mov.b32 z, 0; shr.b32 t, $2, 2; and.b32 t, t, 0x03030303; "
                             "or.b32 t, t, 0x44444444; prmt.b32 $0, t, z, 0x1404; prmt.b32 $1, t, z, 0x3424;}")
    elif J == 2:
        asm: tl.constexpr = ("{.reg .b32 t, z; mov.b32 z, 0; shr.b32 t, $2, 4; and.b32 t, t, 0x03030303; "
                             "or.b32 t, t, 0x44444444; prmt.b32 $0, t, z, 0x1404; prmt.b32 $1, t, z, 0x3424;}")
    else:
        asm: tl.constexpr = ("{.reg .b32 t, z; mov.b32 z, 0; shr.b32 t, $2, 6; and.b32 t, t, 0x03030303; "
                             "or.b32 t, t, 0x44444444; prmt.b32 $0, t, z, 0x1404; prmt.b32 $1, t, z, 0x3424;}")
    return tl.inline_asm_elementwise(asm, "=r,=r,r", [b], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _field_i8(b, SHIFT: tl.constexpr, WIDTH: tl.constexpr):
    """int8 ``(b >> SHIFT) & (2**WIDTH - 1)`` of a uint8 tile, four codes per register (one shift, one mask):
    2-bit codes at shifts 0, 2, 4, 6, 4-bit codes at 0 and 4."""
    if WIDTH == 4 and SHIFT == 0:
        asm: tl.constexpr = "and.b32 $0, $1, 0x0F0F0F0F;"
    elif WIDTH == 4:
        asm: tl.constexpr = "{.reg .b32 t; shr.b32 t, $1, 4; and.b32 $0, t, 0x0F0F0F0F;}"
    elif SHIFT == 0:
        asm: tl.constexpr = "and.b32 $0, $1, 0x03030303;"
    elif SHIFT == 2:
        asm: tl.constexpr = "{.reg .b32 t; shr.b32 t, $1, 2; and.b32 $0, t, 0x03030303;}"
    elif SHIFT == 4:
        asm: tl.constexpr = "{.reg .b32 t; shr.b32 t, $1, 4; and.b32 $0, t, 0x03030303;}"
    else:
        asm: tl.constexpr = "{.reg .b32 t; shr.b32 t, $1, 6; and.b32 $0, t, 0x03030303;}"
    return tl.inline_asm_elementwise(asm, "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)


@triton.jit
def _u3_plane_i8(lo, hi2, J: tl.constexpr):
    """int8 3-bit codes of plane ``J``, four per register: the low two bits ``(lo >> 2J) & 3`` from the
    ``U2_LSB4`` bytes, the high bit from ``hi2``, whose byte ``i`` is high-plane byte ``i // 2`` (channel
    ``4i + J`` at its bit ``4 * (i % 2) + J``: bytes 0 and 2 of a register use bit ``J``, bytes 1 and 3 bit ``4 + J``)."""
    if J == 0:
        asm: tl.constexpr = ("{.reg .b32 t, a, c; and.b32 t, $1, 0x03030303; shl.b32 a, $2, 2; and.b32 a, a, 0x00040004; "
                             "shr.b32 c, $2, 2; and.b32 c, c, 0x04000400; or.b32 t, t, a; or.b32 $0, t, c;}")
    elif J == 1:
        asm: tl.constexpr = ("{.reg .b32 t, a, c; shr.b32 t, $1, 2; and.b32 t, t, 0x03030303; shl.b32 a, $2, 1; "
                             "and.b32 a, a, 0x00040004; shr.b32 c, $2, 3; and.b32 c, c, 0x04000400; or.b32 t, t, a; "
                             "or.b32 $0, t, c;}")
    elif J == 2:
        asm: tl.constexpr = ("{.reg .b32 t, a, c; shr.b32 t, $1, 4; and.b32 t, t, 0x03030303; "
                             "and.b32 a, $2, 0x00040004; shr.b32 c, $2, 4; and.b32 c, c, 0x04000400; or.b32 t, t, a; "
                             "or.b32 $0, t, c;}")
    else:
        asm: tl.constexpr = ("{.reg .b32 t, a, c; shr.b32 t, $1, 6; and.b32 t, t, 0x03030303; shr.b32 a, $2, 1; "
                             "and.b32 a, a, 0x00040004; shr.b32 c, $2, 5; and.b32 c, c, 0x04000400; or.b32 t, t, a; "
                             "or.b32 $0, t, c;}")
    return tl.inline_asm_elementwise(asm, "=r,r,r", [lo, hi2], dtype=tl.int8, is_pure=True, pack=4)


@triton.jit
def _cols(x, N: tl.constexpr, P: tl.constexpr, U: tl.constexpr):
    """``[N, P*U] -> [N, U]``: the used columns (pad index 0; the padded ones hold zeros)."""
    if P > 1:
        out = tl.sum(tl.reshape(x, (N, P, U)), 1)
    else:
        out = x
    return out


@triton.jit
def _pad_rows(x, P: tl.constexpr, U: tl.constexpr, N: tl.constexpr):
    """``[U, N] -> [P*U, N]`` with zeros in the padded rows."""
    if P > 1:
        pad = tl.arange(0, P)
        out = tl.reshape(tl.where((pad == 0)[:, None, None], x[None, :, :], 0.0), (P * U, N))
    else:
        out = x
    return out


@triton.jit
def _planes(row, tmask, ii, PW: tl.constexpr, BITS: tl.constexpr, FAST: tl.constexpr, DT: tl.constexpr):
    """The four code planes ``DT [BLOCK_N, PW]`` of a slot block: int8 ``DT``, the codes (FAST: 2-, 3- and 4-bit
    codes by shift and mask, every byte of a row loaded as one contiguous tile); else the codes as ``DT`` (FAST:
    fp16 ``4 + code`` by byte permutes, 2 bits)."""
    if FAST and DT == tl.int8 and BITS == 4:  # channel 4i+j: byte 2i + j//2, nibble j%2; whole rows, split in registers
        bb = tl.arange(0, 2 * PW)
        raw = tl.load(row[:, None] + bb[None, :], mask=tmask[:, None], other=0)
        even, odd = tl.split(tl.reshape(raw, (raw.shape[0], PW, 2)))  # bytes 2i and 2i + 1
        p0, p1 = _field_i8(even, 0, 4), _field_i8(even, 4, 4)
        p2, p3 = _field_i8(odd, 0, 4), _field_i8(odd, 4, 4)
    elif FAST:
        raw = tl.load(row[:, None] + ii[None, :], mask=tmask[:, None], other=0)
        if DT == tl.int8 and BITS == 3:  # high bit of channel 4i+j: bit 4*(i%2)+j of byte PW + i//2
            hh = tl.arange(0, PW // 2)
            hi = tl.load(row[:, None] + PW + hh[None, :], mask=tmask[:, None], other=0)  # whole rows: cp.async
            hi2 = tl.reshape(tl.join(hi, hi), (hi.shape[0], PW))  # byte i: high-plane byte i // 2
            p0, p1 = _u3_plane_i8(raw, hi2, 0), _u3_plane_i8(raw, hi2, 1)
            p2, p3 = _u3_plane_i8(raw, hi2, 2), _u3_plane_i8(raw, hi2, 3)
        elif DT == tl.int8:
            p0, p1, p2, p3 = _field_i8(raw, 0, 2), _field_i8(raw, 2, 2), _field_i8(raw, 4, 2), _field_i8(raw, 6, 2)
        else:
            p0, p1 = _u2_plane_fp16(raw, 0), _u2_plane_fp16(raw, 1)
            p2, p3 = _u2_plane_fp16(raw, 2), _u2_plane_fp16(raw, 3)
    else:
        lo, hi = _byte_tiles(row, tmask, ii, 0, PW, BITS)
        p0 = _codes_as(_plane_codes(row, tmask, ii, 0, 0, PW, lo, hi, BITS), DT)
        p1 = _codes_as(_plane_codes(row, tmask, ii, 1, 0, PW, lo, hi, BITS), DT)
        p2 = _codes_as(_plane_codes(row, tmask, ii, 2, 0, PW, lo, hi, BITS), DT)
        p3 = _codes_as(_plane_codes(row, tmask, ii, 3, 0, PW, lo, hi, BITS), DT)
    return p0, p1, p2, p3


@triton.jit
def _codes_as(codes, DT: tl.constexpr):
    """Integer codes as dot operands of type ``DT``."""
    if DT == tl.int8:
        out = codes.to(tl.int8)
    else:
        out = codes.to(tl.float32).to(DT)
    return out


@triton.jit
def _q_plane(qr_col, cmask, ii, col_g, j: tl.constexpr, PW: tl.constexpr, GK: tl.constexpr, DT: tl.constexpr):
    """Rows ``4i + j`` of ``q'`` (plane-ordered rows ``qr_col``) as ``[PW, QC]``: column ``(pad, r, g)``
    keeps group ``g``'s channels of query row ``r`` (zeros in padded columns)."""
    keep = cmask & (((4 * ii + j) // GK)[:, None] == col_g[None, :])
    return tl.load(qr_col[None, :] + j * PW + ii[:, None], mask=keep, other=0.0).to(DT)


@triton.jit
def _bias_terms(q_ptr, mean_ptr, freq_ptr, p_t, s_qb, s_qh, rope_scaling, b, h0, acc,
                N_Q: tl.constexpr, NQP: tl.constexpr, REP: tl.constexpr, H: tl.constexpr, HB: tl.constexpr,
                BLOCK_T: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, USE_LIBDEVICE: tl.constexpr):  # fmt: skip
    """``acc`` (None: zeros) plus the terms of frequencies ``h0 .. h0+HB-1`` of the mean bias (:func:`_bias_block`)
    as ``[BLOCK_T, NQP]``."""
    hh = h0 + tl.arange(0, HB)
    qi = tl.arange(0, NQP)
    qm = (qi < N_Q)[None, :]
    q_row = q_ptr + b * s_qb + qi[None, :] * s_qh + hh[:, None]
    q_lo = tl.load(q_row, mask=qm, other=0.0).to(tl.float32)  # [HB, NQP]
    q_hi = tl.load(q_row + H, mask=qm, other=0.0).to(tl.float32)
    mu_row = mean_ptr + (qi // REP)[None, :] * (2 * H) + hh[:, None]
    mu_lo = tl.load(mu_row, mask=qm, other=0.0)
    mu_hi = tl.load(mu_row + H, mask=qm, other=0.0)
    coef_a = (q_lo * mu_lo + q_hi * mu_hi) * rope_scaling
    coef_b = (q_hi * mu_lo - q_lo * mu_hi) * rope_scaling
    freq = tl.load(freq_ptr + hh)
    c, s = _cos_sin(tl.maximum(p_t, 0).to(tl.float32)[:, None] * freq[None, :], USE_LIBDEVICE)
    acc = tl.dot(c.to(DT), coef_a.to(DT), acc, input_precision=PREC)
    return tl.dot(s.to(DT), coef_b.to(DT), acc, input_precision=PREC)


@triton.jit
def _bias_block(q_ptr, mean_ptr, freq_ptr, pos_ptr, bias_ptr, s_qb, s_qh, s_pb, s_bb, s_bh, T, W, rope_scaling, b, blk,
                N_Q: tl.constexpr, NQP: tl.constexpr, REP: tl.constexpr, H: tl.constexpr, HB: tl.constexpr,
                BLOCK_T: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
                OUT_SCALE: tl.constexpr):  # fmt: skip
    """Slots ``blk*BLOCK_T ..`` of ``bias[b, i, t] = q_i · RoPE_{pos[b, t]}(mu_{i // REP})`` times ``OUT_SCALE``,
    ``-inf`` where ``pos < 0`` and for ``T <= t < W`` (the row's padding to whole slot blocks). ``HB < H``:
    the frequencies in a loop of ``HB`` (IEEE fp32 dots unroll into FMAs, so one step over all of them
    would be a long, spilling body)."""
    t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    p_t = tl.load(pos_ptr + b * s_pb + t, mask=tmask, other=-1)
    if HB == H:
        acc = _bias_terms(q_ptr, mean_ptr, freq_ptr, p_t, s_qb, s_qh, rope_scaling, b, 0, None,
                          N_Q, NQP, REP, H, HB, BLOCK_T, DT, PREC, USE_LIBDEVICE)  # fmt: skip
    else:
        acc = tl.zeros((BLOCK_T, NQP), tl.float32)
        for h0 in tl.range(0, H, HB):
            acc = _bias_terms(q_ptr, mean_ptr, freq_ptr, p_t, s_qb, s_qh, rope_scaling, b, h0, acc,
                              N_Q, NQP, REP, H, HB, BLOCK_T, DT, PREC, USE_LIBDEVICE)  # fmt: skip
    qi = tl.arange(0, NQP)
    qm = (qi < N_Q)[None, :]
    acc = tl.where((p_t >= 0)[:, None], acc * OUT_SCALE, float("-inf"))
    tl.store(bias_ptr + b * s_bb + qi[None, :] * s_bh + t[:, None], acc, mask=(t < W)[:, None] & qm)


@triton.jit
def _rotate_block(q_ptr, rot_ptr, qr_ptr, s_qb, s_qh, s_rb, s_rh, s_rr, b, h,
                  D: tl.constexpr, REP: tl.constexpr, RP: tl.constexpr, BE: tl.constexpr, KB: tl.constexpr,
                  RDT: tl.constexpr, RPREC: tl.constexpr):  # fmt: skip
    """``q' = q R_h`` for the ``REP`` query rows of KV head ``h``: :func:`rotate_queries`'s math (``RDT``
    operands, fp32 sums, stored in ``qr``'s dtype), ``BE`` output channels per dot. ``KB < D``: both loops
    run (not unrolled) with ``KB`` input channels per dot, for IEEE fp32 dots (see :func:`_bias_block`)."""
    rows = tl.arange(0, RP)
    rmask = (rows < REP)[:, None]
    q_rows = q_ptr + b * s_qb + (h * REP + rows)[:, None] * s_qh
    if KB == D:
        kk = tl.arange(0, D)
        qv = tl.load(q_rows + kk[None, :], mask=rmask, other=0.0).to(RDT)
        for e0 in tl.static_range(0, D, BE):
            ee = e0 + tl.arange(0, BE)
            r = tl.load(rot_ptr + h * D * D + kk[:, None] * D + ee[None, :]).to(RDT)
            acc = tl.dot(qv, r, input_precision=RPREC)
            tl.store(qr_ptr + b * s_rb + h * s_rh + rows[:, None] * s_rr + ee[None, :], acc, mask=rmask)
    else:
        for e0 in tl.range(0, D, BE):
            ee = e0 + tl.arange(0, BE)
            acc = tl.zeros((RP, BE), tl.float32)
            for k0 in tl.range(0, D, KB):
                kk = k0 + tl.arange(0, KB)
                qv = tl.load(q_rows + kk[None, :], mask=rmask, other=0.0).to(RDT)
                r = tl.load(rot_ptr + h * D * D + kk[:, None] * D + ee[None, :]).to(RDT)
                acc = tl.dot(qv, r, acc, input_precision=RPREC)
            tl.store(qr_ptr + b * s_rb + h * s_rh + rows[:, None] * s_rr + ee[None, :], acc, mask=rmask)


@triton.jit(do_not_specialize=["T", "NB"])  # lengths: one compile for all
def _query_prep_kernel(
    q_ptr, mean_ptr, freq_ptr, pos_ptr, bias_ptr, rot_ptr, qr_ptr, s_qb, s_qh, s_pb, s_bb, s_bh, s_rb, s_rh, s_rr,
    T, W, NB, rope_scaling,
    N_Q: tl.constexpr, NQP: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, USE_LIBDEVICE: tl.constexpr, OUT_SCALE: tl.constexpr,
    HB: tl.constexpr, RP: tl.constexpr, BE: tl.constexpr, KB: tl.constexpr, RDT: tl.constexpr,
    RPREC: tl.constexpr,
):
    """Grid ``(B, NB + n_kv)``: programs ``0 .. NB-1`` write the mean bias of their ``BLOCK_T`` slots
    (:func:`_bias_block`), program ``NB + h`` the rotated queries of KV head ``h`` (:func:`_rotate_block`):
    what the attention kernel reads, in one launch."""
    b = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    if pid < NB:
        _bias_block(q_ptr, mean_ptr, freq_ptr, pos_ptr, bias_ptr, s_qb, s_qh, s_pb, s_bb, s_bh, T, W, rope_scaling, b, pid,
                    N_Q, NQP, REP, D // 2, HB, BLOCK_T, DT, PREC, USE_LIBDEVICE, OUT_SCALE)  # fmt: skip
    else:
        _rotate_block(q_ptr, rot_ptr, qr_ptr, s_qb, s_qh, s_rb, s_rh, s_rr, b, pid - NB, D, REP, RP, BE, KB, RDT, RPREC)


@triton.jit
def _meta8_decode(e, z, base):
    """fp32 ``(scale, zero)`` from 8-bit codes (``quant.quantizer.group_scale_zero``): ``base * 2**(e/16)``, ``scale * z / 4``."""
    scale = base * tl.exp2(e * 0.0625)
    return scale, scale * z * 0.25


@triton.jit(do_not_specialize=["T", "F", "n_parts", "fp_first", "fp_per_part"])  # lengths: one compile for all
def _folded_kernel(
    q_ptr, qr_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, bias_ptr, fk_ptr, fv_ptr, fpos_ptr, o_ptr, lse_ptr,
    s_qb, s_qh, s_rb, s_rh, s_rr, s_kcb, s_kch, s_kct, s_ksb, s_ksh, s_vcb, s_vch, s_vct, s_vsb, s_vsh,
    s_bb, s_bh, s_fb, s_fh, s_ft, s_fpb,
    T, F, tokens_per_split, n_parts, fp_first, fp_per_part, n_q, qk_scale, cap_scale, k_base, v_base,
    D: tl.constexpr, REP: tl.constexpr, R: tl.constexpr,
    NG: tl.constexpr, GK: tl.constexpr, NGV: tl.constexpr, GV: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_I8: tl.constexpr, K_FAST: tl.constexpr, V_FAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, HAS_FP: tl.constexpr, DIRECT: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, SOFTCAP: tl.constexpr, NUM_STAGES: tl.constexpr, MASKLESS: tl.constexpr,
    META8: tl.constexpr, BIAS_SCALE: tl.constexpr,
):
    """Grid ``(B, n_kv, n_parts)``. ``DIRECT`` (one part): the normalised output in ``o_ptr [B, n_q, d]``;
    else fp32 partial outputs ``o_ptr [B, n_q, n_parts, d]`` and log2-sum-exp ``lse_ptr [B, n_q, n_parts]``.

    Parts ``0 .. fp_first-1`` read the quantized slots in splits of ``tokens_per_split``; part
    ``fp_first + j`` reads full-precision slots ``[j*fp_per_part, (j+1)*fp_per_part)`` (``DIRECT``:
    the one part reads both).

    ``MASKLESS``: every block lies within the store's capacity and the bias row, so no load needs a
    bounds mask and no scale a select: slots past ``T`` and empty slots are excluded by their
    ``-inf`` bias alone, which needs their codes, scales and zeros finite (the cache zero-fills its
    stores and writes only quantized values). Fewer instructions and registers in the main loop.

    ``META8``: scales and zeros are 8-bit codes, decoded with the bases ``k_base``, ``v_base``."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    split = tl.program_id(2)
    PW: tl.constexpr = D // 4
    UK: tl.constexpr = R * NG  # used key columns (r, g)
    UV: tl.constexpr = R * NGV  # used value rows (r, g)
    QC: tl.constexpr = UK if UK >= 16 else 16
    QCV: tl.constexpr = UV if UV >= 16 else 16
    KP: tl.constexpr = QC // UK
    VP: tl.constexpr = QCV // UV
    KB: tl.constexpr = 4.0 if (K_FAST and not K_I8) else 0.0  # fp16 codes by byte permutes hold 4 + code
    VB: tl.constexpr = 4.0 if V_FAST else 0.0

    ii = tl.arange(0, PW)
    kk = tl.arange(0, D)
    rr = tl.arange(0, R)
    rmask = rr < REP
    col = tl.arange(0, QC)  # column (pad, r, g)
    col_r = (col % UK) // NG
    col_g = col % NG
    gk = tl.arange(0, NG)
    gv = tl.arange(0, NGV)

    q_col = q_ptr + b * s_qb + (h * REP + col_r) * s_qh  # [QC]: column (pad, r, g) reads query row r
    qr_col = qr_ptr + b * s_rb + h * s_rh + col_r * s_rr  # the same rows of q' (plane order, [B, n_kv, rep, d])
    cmask = ((col < UK) & (col_r < REP))[None, :]
    q0 = _q_plane(qr_col, cmask, ii, col_g, 0, PW, GK, tl.float32)
    q1 = _q_plane(qr_col, cmask, ii, col_g, 1, PW, GK, tl.float32)
    q2 = _q_plane(qr_col, cmask, ii, col_g, 2, PW, GK, tl.float32)
    q3 = _q_plane(qr_col, cmask, ii, col_g, 3, PW, GK, tl.float32)
    if K_I8:  # q' in 8 bits per column (r, g): round(q' * 127 / max|q'|), the scale applied to the dot
        amax = tl.maximum(tl.maximum(tl.max(tl.abs(q0), 0), tl.max(tl.abs(q1), 0)),
                          tl.maximum(tl.max(tl.abs(q2), 0), tl.max(tl.abs(q3), 0)))
        amax = tl.where(amax > 0.0, amax, 1.0)  # an all-zero column stays zero
        q_step = amax / 127.0
        q_inv = 127.0 / amax
        q0 = tl.floor(q0 * q_inv[None, :] + 0.5)
        q1 = tl.floor(q1 * q_inv[None, :] + 0.5)
        q2 = tl.floor(q2 * q_inv[None, :] + 0.5)
        q3 = tl.floor(q3 * q_inv[None, :] + 0.5)
        qsum = (tl.sum(q0, 0) + tl.sum(q1, 0) + tl.sum(q2, 0) + tl.sum(q3, 0)) * q_step
        q0, q1, q2, q3 = q0.to(tl.int8), q1.to(tl.int8), q2.to(tl.int8), q3.to(tl.int8)
    else:
        q0, q1, q2, q3 = q0.to(DT), q1.to(DT), q2.to(DT), q3.to(DT)
        qsum = (tl.sum(q0.to(tl.float32), 0) + tl.sum(q1.to(tl.float32), 0)
                + tl.sum(q2.to(tl.float32), 0) + tl.sum(q3.to(tl.float32), 0))
    qsum3 = tl.reshape(_cols(qsum[None, :], 1, KP, UK), (R, NG))

    m_i = tl.full((R,), -1.0e30, tl.float32)
    l_part = tl.zeros((BLOCK_N, R), tl.float32)  # per-slot partial sums, reduced over slots once after the loop
    z_part = tl.zeros((BLOCK_N, R, NGV), tl.float32)
    a0 = tl.zeros((QCV, PW), tl.float32)
    a1 = tl.zeros((QCV, PW), tl.float32)
    a2 = tl.zeros((QCV, PW), tl.float32)
    a3 = tl.zeros((QCV, PW), tl.float32)

    t_start = split * tokens_per_split
    t_stop = tl.minimum(T, t_start + tokens_per_split)
    kc_base = kc_ptr + b * s_kcb + h * s_kch
    ks_base = ks_ptr + b * s_ksb + h * s_ksh
    kz_base = kz_ptr + b * s_ksb + h * s_ksh
    vc_base = vc_ptr + b * s_vcb + h * s_vch
    vs_base = vs_ptr + b * s_vsb + h * s_vsh
    vz_base = vz_ptr + b * s_vsb + h * s_vsh
    bias_base = bias_ptr + b * s_bb + (h * REP + rr)[None, :] * s_bh
    for t0 in tl.range(t_start, t_stop, BLOCK_N, num_stages=NUM_STAGES):
        t = t0 + tl.arange(0, BLOCK_N)
        tt = t.to(tl.int64)
        if MASKLESS:
            tmask = tl.full((BLOCK_N,), 1, tl.int1)  # constant: the compiler drops the masks
        else:
            tmask = t < t_stop
        bias = tl.load(bias_base + tt[:, None], mask=tmask[:, None] & rmask[None, :], other=float("-inf"))
        bias = bias.to(tl.float32) * BIAS_SCALE
        kp0, kp1, kp2, kp3 = _planes(kc_base + tt * s_kct, tmask, ii, PW, K_BITS, K_FAST, tl.int8 if K_I8 else DT)
        sk = tl.load(ks_base + tt[:, None] * NG + gk[None, :], mask=tmask[:, None], other=0).to(tl.float32)
        zk = tl.load(kz_base + tt[:, None] * NG + gk[None, :], mask=tmask[:, None], other=0).to(tl.float32)
        if META8:
            sk, zk = _meta8_decode(sk, zk, k_base)
        if K_I8:  # exact integer dots
            iacc = tl.dot(kp0, q0, out_dtype=tl.int32)
            iacc = tl.dot(kp1, q1, iacc, out_dtype=tl.int32)
            iacc = tl.dot(kp2, q2, iacc, out_dtype=tl.int32)
            iacc = tl.dot(kp3, q3, iacc, out_dtype=tl.int32)
            acc = iacc.to(tl.float32) * q_step[None, :]
        else:
            acc = tl.dot(kp0, q0, input_precision=PREC)
            acc = tl.dot(kp1, q1, acc, input_precision=PREC)
            acc = tl.dot(kp2, q2, acc, input_precision=PREC)
            acc = tl.dot(kp3, q3, acc, input_precision=PREC)
        if not MASKLESS:  # slots past the split may hold anything: zero their scales
            valid = tl.max(bias, 1) > float("-inf")
            sk = tl.where(valid[:, None], sk, 0.0)
            zk = tl.where(valid[:, None], zk, 0.0)
        acc3 = tl.reshape(_cols(acc, BLOCK_N, KP, UK), (BLOCK_N, R, NG))
        if KB != 0.0:
            zk = zk - KB * sk
        s = tl.sum(acc3 * sk[:, None, :] + zk[:, None, :] * qsum3[None, :, :], 2)
        if MASKLESS and not SOFTCAP:  # a -inf bias keeps the logit -inf
            s = _log2_logits(s + bias, qk_scale, cap_scale, SOFTCAP)
        else:  # (the cap's tanh would make it finite)
            s = tl.where(bias > float("-inf"), _log2_logits(s + bias, qk_scale, cap_scale, SOFTCAP), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[None, :])
        l_part = l_part * alpha[None, :] + p
        m_i = m_new
        sv = tl.load(vs_base + tt[:, None] * NGV + gv[None, :], mask=tmask[:, None], other=0).to(tl.float32)
        zv = tl.load(vz_base + tt[:, None] * NGV + gv[None, :], mask=tmask[:, None], other=0).to(tl.float32)
        if META8:
            sv, zv = _meta8_decode(sv, zv, v_base)
        if not MASKLESS:
            sv = tl.where(valid[:, None], sv, 0.0)
            zv = tl.where(valid[:, None], zv, 0.0)
        z_part = z_part * alpha[None, :, None] + p[:, :, None] * (zv - VB * sv)[:, None, :]
        w = tl.reshape(tl.trans(p)[:, None, :] * tl.trans(sv)[None, :, :], (UV, BLOCK_N))
        w_t = _pad_rows(w, VP, UV, BLOCK_N).to(DT)
        alpha_c = tl.reshape(tl.broadcast_to(alpha[None, :, None], (VP, R, NGV)), (QCV,))[:, None]
        vp0, vp1, vp2, vp3 = _planes(vc_base + tt * s_vct, tmask, ii, PW, V_BITS, V_FAST, DT)
        a0 = tl.dot(w_t, vp0, a0 * alpha_c, input_precision=PREC)
        a1 = tl.dot(w_t, vp1, a1 * alpha_c, input_precision=PREC)
        a2 = tl.dot(w_t, vp2, a2 * alpha_c, input_precision=PREC)
        a3 = tl.dot(w_t, vp3, a3 * alpha_c, input_precision=PREC)

    l_i = tl.sum(l_part, 0)
    zacc = tl.sum(z_part, 0)
    if HAS_FP:  # the full-precision parts attend to their slots of the segment (post-RoPE keys)
        f_lo = tl.where(split >= fp_first, (split - fp_first) * fp_per_part, F)
        f_stop = tl.minimum(F, f_lo + fp_per_part)
        qd_t = tl.load(q_col[None, :] + kk[:, None], mask=cmask & (col_g == 0)[None, :], other=0.0).to(DT)
        fk_base = fk_ptr + b * s_fb + h * s_fh
        fv_base = fv_ptr + b * s_fb + h * s_fh
        for f0 in range(f_lo, f_stop, BLOCK_F):
            f = f0 + tl.arange(0, BLOCK_F)
            fmask = f < f_stop
            ff = f.to(tl.int64)
            fvalid = fmask & (tl.load(fpos_ptr + b * s_fpb + ff, mask=fmask, other=-1) >= 0)
            kf = tl.load(fk_base + ff[:, None] * s_ft + kk[None, :], mask=fvalid[:, None], other=0.0).to(DT)
            sf = _cols(tl.dot(kf, qd_t, input_precision=PREC), BLOCK_F, KP, UK)
            s = tl.sum(tl.reshape(sf, (BLOCK_F, R, NG)), 2)  # only g = 0 holds the dot
            s = tl.where(fvalid[:, None] & rmask[None, :], _log2_logits(s, qk_scale, cap_scale, SOFTCAP), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[None, :])
            l_i = l_i * alpha + tl.sum(p, 0)
            m_i = m_new
            zacc = zacc * alpha[:, None]
            w = tl.reshape(tl.broadcast_to(tl.trans(p)[:, None, :], (R, NGV, BLOCK_F)), (UV, BLOCK_F))
            w_t = _pad_rows(w, VP, UV, BLOCK_F).to(DT)
            alpha_c = tl.reshape(tl.broadcast_to(alpha[None, :, None], (VP, R, NGV)), (QCV,))[:, None]
            vf = tl.load(fv_base + ff[:, None] * s_ft + kk[None, :], mask=fvalid[:, None], other=0.0).to(DT)
            v_even, v_odd = tl.split(tl.reshape(vf, (BLOCK_F, PW, 2, 2)))  # channel 4i + 2u + w: split w
            v0, v2 = tl.split(v_even)  # then u
            v1, v3 = tl.split(v_odd)
            a0 = tl.dot(w_t, v0, a0 * alpha_c, input_precision=PREC)
            a1 = tl.dot(w_t, v1, a1 * alpha_c, input_precision=PREC)
            a2 = tl.dot(w_t, v2, a2 * alpha_c, input_precision=PREC)
            a3 = tl.dot(w_t, v3, a3 * alpha_c, input_precision=PREC)

    has = l_i > 0.0
    inv_l = 1.0 / tl.where(has, l_i, 1.0)
    if DIRECT:
        dst = o_ptr + ((b * n_q + h * REP + rr) * D)[:, None]
    else:
        row = (b * n_q + h * REP + rr) * n_parts + split
        dst = o_ptr + (row * D)[:, None]
        tl.store(lse_ptr + row, tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf")), mask=rmask)
    _store_plane(a0, zacc, inv_l, gv, ii, 0, dst, rmask, R, NGV, VP, UV, PW, GV)
    _store_plane(a1, zacc, inv_l, gv, ii, 1, dst, rmask, R, NGV, VP, UV, PW, GV)
    _store_plane(a2, zacc, inv_l, gv, ii, 2, dst, rmask, R, NGV, VP, UV, PW, GV)
    _store_plane(a3, zacc, inv_l, gv, ii, 3, dst, rmask, R, NGV, VP, UV, PW, GV)


@triton.jit
def _store_plane(acc, zacc, inv_l, gv, ii, j: tl.constexpr, dst, rmask, R: tl.constexpr, NGV: tl.constexpr,
                 VP: tl.constexpr, UV: tl.constexpr, PW: tl.constexpr, GV: tl.constexpr):
    """Channels ``4i + j`` of the normalised output: row ``(0, r, g(c))`` of plane accumulator ``j``."""
    sel = (gv[:, None] == ((4 * ii + j) // GV)[None, :]).to(tl.float32)  # [NGV, PW]
    used = tl.reshape(tl.trans(_cols(tl.trans(acc), PW, VP, UV)), (R, NGV, PW))
    o = tl.sum(used * sel[None, :, :], 1) + tl.sum(zacc[:, :, None] * sel[None, :, :], 1)
    o = o * inv_l[:, None]
    tl.store(dst + (4 * ii + j)[None, :], o.to(dst.dtype.element_ty), mask=rmask[:, None])


def _last_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tensors the kernel addresses with one stride set (copies only when they differ)."""
    a, b = _last_contig(a), _last_contig(b)
    if a.stride() != b.stride():
        a, b = a.contiguous(), b.contiguous()
    return a, b


def _group_rows(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A scale/zero pair with one stride set and whole ``[slots, groups]`` rows (slot stride = group count)."""
    a, b = _same_strides(a, b)
    if a.stride(-2) != a.shape[-1]:
        a, b = a.contiguous(), b.contiguous()
    return a, b


def _tiles(d: int, fp16: bool) -> dict[str, int]:
    """Slots per block, pipeline depth, warps and fp-segment block for a head dim and operand type.

    fp16 operands (fp16 queries): the tuned defaults; head dim 256 in 64-slot blocks (fp32 operands at the
    defaults needed 327,680 B of shared memory on an H200, limit 232,448). fp32 operands (fp32 and bf16
    queries): 8 warps, and 128-, 64- and 32-slot blocks (the last without pipelining) at head dims 64, 128
    and 256: the largest that compile for sm_90 without register spills. With 4 warps these kernels spilled
    288, 872 and 1,728 B per thread (the former settings: 128, 128 and 32 slots) and took 1.4-3.6x longer to
    compile on a CPU (``python benchmarks/kernel_sass_stats.py --fp32-tiles``; seventh session). Their speed
    is not timed on a GPU: the benchmarks run fp16.
    """
    if fp16:
        if d < 256:
            return {"block_n": FOLDED_DEFAULTS["block_n"], "num_stages": FOLDED_DEFAULTS["num_stages"],
                    "num_warps": FOLDED_DEFAULTS["num_warps"], "block_f": 64}  # fmt: skip
        return {"block_n": 64, "num_stages": 2, "num_warps": FOLDED_DEFAULTS["num_warps"], "block_f": 32}
    if d <= 64:
        return {"block_n": 128, "num_stages": 2, "num_warps": 8, "block_f": 64}
    if d < 256:
        return {"block_n": 64, "num_stages": 2, "num_warps": 8, "block_f": 64}
    return {"block_n": 32, "num_stages": 1, "num_warps": 8, "block_f": 32}


def default_splits(programs: int, T: int, block_n: int, device: torch.device,
                   resident: int = FOLDED_DEFAULTS["resident"]) -> int:
    """Context splits of ``programs`` (batch x KV heads) over ``T`` slots in blocks of ``block_n``.

    - Below 64 blocks (8k slots): ``max(2, blocks // 16)`` programs per SM, rounded up. These rows are
      bound by fixed costs, and a split of one or two blocks spends most of its time in its prologue,
      epilogue and the merge (seventh session, H200: llama2-7b batch 8 at 1k 38.2 -> 33.9 us).
    - From 64 blocks: one round of ``resident`` programs per SM, rounded down, ``resident * SMs //
      programs`` splits; where one split per head already fills between one and two rounds, two (0-2 %
      faster than one for llama2-7b heads at batch 32, 8k-64k). A grid just past a whole round runs a
      second, mostly empty one. Each split reads at least 2 blocks, 4 from 128 blocks on: shorter splits
      only add prologues and merge work.

    An H100 sweep of every split count (thirty-fifth session, ``docs/benchmarks.md``; llama2-7b and
    llama3-8b heads, batch 1/8/32, 1k-64k slots, CUDA-graph replay): this rule is within 1.11x of the
    fastest count in all 42 rows (mean 1.007x; 1.084x and 1.006x when re-measured on another H100) and
    never slower than the former one (about 8 programs per SM,
    rounded up; up to 1.29x slower, llama3-8b batch 1 at 16k, mean 1.068x).
    """
    n_blocks = cdiv(T, block_n)
    if n_blocks == 0:
        return 0
    sms = sm_count(device)
    if n_blocks < 64:
        splits = cdiv(max(2, n_blocks // 16) * sms, programs)
    else:
        per_round = resident * sms
        splits = per_round // programs or (2 if programs <= 2 * per_round else 1)
        splits = min(splits, n_blocks // (4 if n_blocks >= 128 else 2))
    splits = max(1, min(n_blocks, splits))
    return cdiv(n_blocks, cdiv(n_blocks, splits))  # no empty split


def fp_slots_per_part(F: int, num_splits: int, tokens_per_split: int, block_f: int, programs: int,
                      device: torch.device) -> int:
    """Full-precision slots per part beside ``num_splits`` splits of ``tokens_per_split`` quantized slots.

    The fp segment (136 fp16 slots by default) reads about as many bytes as 800 two-bit slots, so next
    to short splits one part for all of it outlasts them: then it is read in parts of ``block_f``
    slots, in parallel, as long as the grid stays within ``FOLDED_DEFAULTS["waves"]`` programs per SM
    (more programs there cost more than the wait). On an H200 (seventh session,
    ``docs/benchmarks.md``): llama3-8b shape, batch 1, 1k slots 12.3 -> 9.8 us; at llama2-7b batch 32, 1k,
    where the grid is full, parts took 128.1 us against 114.7 for one."""
    whole = cdiv(max(F, 1), block_f) * block_f
    parts = cdiv(F, block_f)
    sms = sm_count(device)
    short = tokens_per_split <= 2 * FOLDED_DEFAULTS["block_n"]
    return block_f if short and programs * (num_splits + parts) <= FOLDED_DEFAULTS["waves"] * sms else whole


def _whole_blocks(T: int, block_n: int, capacity: int) -> bool:
    """True if the blocks covering slots ``[0, T)`` lie inside a store of ``capacity`` slots: the kernel
    then reads them without bounds masks (``MASKLESS``; the runtime's stores are whole 128-slot blocks)."""
    return cdiv(T, block_n) * block_n <= capacity


def _query_prep(q: torch.Tensor, pos: torch.Tensor, params: FoldedParams, T: int, interp: bool,
                width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bias, qr)`` in one launch: ``bias [B, n_q, width]`` (fp16 for fp16 queries, else fp32) times
    :func:`bias_scale` = ``q · RoPE_pos(mu)`` per query head and slot for the first ``T`` slots, ``-inf`` on
    empty slots and on ``[T, width)`` (``width``: default ``T``; a ``[1, 1, 1]`` placeholder when it is 0), and
    ``qr [B, n_kv, rep, d]`` = ``q R_h`` in plane order (:func:`rotate_queries`: fp16 for fp16 queries, else
    fp32). The main kernel pads ``width`` to a multiple of 16: row strides stay 16-aligned, so one compile
    serves every ``T``."""
    B, n_q, d = q.shape
    n_kv = params.n_kv
    rep = n_q // n_kv
    fp16 = q.dtype == torch.float16
    width = T if width is None else width
    dev = q.device
    # fp16 bias: half the bytes the attention kernel reads per slot; a [1, 1, 1] placeholder without slots, of the
    # same dtype: the attention kernel's one compile serves both
    bias = torch.empty((B, n_q, width) if width else (1, 1, 1), device=dev, dtype=_prep_dtype(fp16))
    qr = torch.empty(B, n_kv, rep, d, device=dev, dtype=_prep_dtype(fp16))
    rot = params.rotation_planes(dev, q.dtype)
    _, mean, freq = params.kernel_operands(dev)
    n_blocks = cdiv(width, _BIAS_BLOCK)
    _query_prep_kernel[(B, n_blocks + n_kv)](
        q, mean, freq, pos, bias, rot, qr, q.stride(0), q.stride(1), pos.stride(0), bias.stride(0), bias.stride(1),
        *qr.stride()[:3], T, width, n_blocks, float(params.attention_scaling),
        **_prep_constexprs(n_q, rep, d, fp16, use_libdevice=not interp),
    )  # fmt: skip
    return bias, qr


def _prep_dtype(fp16: bool) -> torch.dtype:
    """What the prep launch writes (mean bias and rotated queries): fp16 for fp16 queries, else fp32."""
    return torch.float16 if fp16 else torch.float32


def _prep_constexprs(n_q: int, rep: int, d: int, fp16: bool, use_libdevice: bool) -> dict:
    """The prep launch's compile-time arguments for ``n_q`` query heads in groups of ``rep`` of ``d`` channels
    (``fp16``: fp16 queries; else fp32 operands, IEEE dots, reduced ``_IEEE_CHUNK`` channels at a time)."""
    return dict(
        N_Q=n_q, NQP=max(16, next_pow2(n_q)), REP=rep, D=d, BLOCK_T=_BIAS_BLOCK,
        DT=tl.float16 if fp16 else tl.float32, PREC="tf32" if fp16 else "ieee", USE_LIBDEVICE=use_libdevice,
        OUT_SCALE=1.0 / bias_scale(_prep_dtype(fp16)),
        HB=d // 2 if fp16 else min(d // 2, _IEEE_CHUNK), RP=max(16, next_pow2(rep)), BE=min(d, 64),
        KB=d if fp16 else min(d, _IEEE_CHUNK), RDT=tl.float16 if fp16 else tl.float32, RPREC="ieee",
    )  # fmt: skip


def decode_folded(
    q: torch.Tensor,
    kv: PackedKV,
    params: FoldedParams,
    *,
    n_tokens: int | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    unpack: Literal["auto", "convert"] = "auto",
    backend: Backend = "auto",
) -> torch.Tensor:
    """Attention of one new query token per sequence over a folded packed cache (module docstring).

    Args:
        q: ``[B, n_q, d]`` post-RoPE queries, fp16/bf16/fp32; ``d`` a power of two >= 64 for the kernel.
        kv: the layer's :class:`PackedKV`.
        params: the layer's :class:`FoldedParams` (tensors on ``q``'s device or movable there).
        n_tokens: slots ``[0, n_tokens)`` of the quantized store are read (None: all ``cap``;
            slots with ``pos == -1`` are skipped either way).
        num_splits: context splits of the quantized slots (None: :func:`default_splits`). With one split
            the fp segment joins it and the output is written by the one launch; otherwise the fp segment is
            its own part and a merge kernel follows.
        block_n: slots per inner step (power of two >= 16); num_warps, num_stages: launch settings
            (``num_stages - 1`` blocks of loads in flight ahead of the one computed). None: the
            defaults for fp16 queries (smaller blocks at head dim 256), else ``_tiles``' spill-free ones.
        unpack: ``"auto"``: codes of fp16 calls are unpacked by inline PTX where it can (CUDA only: 2-bit
            keys, and 3- and 4-bit keys with integer key dots, by shift and mask into int8; 2-bit values by byte
            permutes into fp16), other codes by integer conversion; ``"convert"``: always the latter (the same
            dots and results).
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (see ``_common``).

    Returns:
        ``[B, n_q, d]`` in ``q.dtype`` (the rotated value space).
    """
    if not resolve_backend(backend, q):
        return decode_folded_ref(q, kv, params, n_tokens=n_tokens)
    B, n_q, n_kv, d, rep, T, F = _dims(q, kv, params, n_tokens)
    if d & (d - 1) or d < 64:
        raise ValueError(f"the Triton kernel needs a power-of-two head dim >= 64, got {d}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"queries must be fp16/bf16/fp32, got {q.dtype}")
    if unpack not in ("auto", "convert"):
        raise ValueError(f"unpack must be 'auto' or 'convert', got {unpack!r}")
    fp16 = q.dtype == torch.float16
    tiles = _tiles(d, fp16)
    block_n = tiles["block_n"] if block_n is None else block_n
    num_warps = tiles["num_warps"] if num_warps is None else num_warps
    num_stages = tiles["num_stages"] if num_stages is None else num_stages
    if block_n & (block_n - 1) or block_n < 16:
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    dev = q.device
    has_fp = F > 0
    if num_splits is None:
        num_splits = default_splits(B * n_kv, T, block_n, dev)
    num_splits, tokens_per_split = split_slots(T, block_n, num_splits)
    direct = num_splits <= 1  # one part reads the store and the fp segment
    if direct:
        n_parts, fp_first, fp_per_part = 1, 0, max(F, 1)
    else:
        fp_per_part = fp_slots_per_part(F, num_splits, tokens_per_split, tiles["block_f"], B * n_kv, dev)
        n_parts, fp_first = num_splits + cdiv(F, fp_per_part), num_splits

    interp = triton_interpreting()
    prmt = fp16 and not interp and unpack == "auto"  # inline PTX: not in the interpreter
    R = next_pow2(rep)
    maskless = _whole_blocks(T, block_n, kv.k_codes.shape[2])
    padded = cdiv(T, block_n) * block_n
    qc = q if q.stride(-1) == 1 else q.contiguous()  # rows at any stride
    kc, vc, pos = _last_contig(kv.k_codes), _last_contig(kv.v_codes), _last_contig(kv.pos)
    ks, kz = _group_rows(kv.k_scale, kv.k_zero)
    vs, vz = _group_rows(kv.v_scale, kv.v_zero)
    if has_fp:
        fk, fv = _same_strides(kv.fp_k, kv.fp_v)
        fpos = _last_contig(kv.fp_pos)
    else:
        fk = fv = qc.new_empty(1, 1, 1, d)
        fpos = pos.new_empty(1, 1)
    f32 = dict(device=dev, dtype=torch.float32)
    if direct:
        o_part = torch.empty(B, n_q, d, device=dev, dtype=q.dtype)
        lse_part = o_part
    else:
        o_part = torch.empty(B, n_q, n_parts, d, **f32)
        lse_part = torch.empty(B, n_q, n_parts, **f32)
    qk_scale, cap_scale = logit_scales(params.sm_scale, params.softcap)
    defaults = tuple(FOLDED_DEFAULTS[k] for k in ("block_n", "num_warps", "num_stages"))
    cap = {"maxnreg": FOLDED_DEFAULTS["maxnreg"]} if fp16 and (block_n, num_warps, num_stages) == defaults else {}
    with device_guard(qc):  # Triton launches on the current device
        bias, qr = _query_prep(qc, pos, params, T, interp, width=(padded if maskless else cdiv(T, 16) * 16) if T else 0)
        _folded_kernel[(B, n_kv, n_parts)](
            qc, qr, kc, ks, kz, vc, vs, vz, bias, fk, fv, fpos, o_part, lse_part,
            qc.stride(0), qc.stride(1), *qr.stride()[:3], *kc.stride()[:3], *ks.stride()[:2], *vc.stride()[:3], *vs.stride()[:2],
            bias.stride(0), bias.stride(1), *fk.stride()[:3], fpos.stride(0),
            T, F, tokens_per_split, n_parts, fp_first, fp_per_part, n_q, qk_scale, cap_scale,
            params.key_meta_base or 1.0, params.value_meta_base or 1.0,
            D=d, REP=rep, R=R, NG=d // params.g_k, GK=params.g_k, NGV=d // params.g_v, GV=params.g_v,
            K_BITS=params.bits, V_BITS=params.value_bits,
            K_I8=int8_key_dots(q.dtype, d), V_FAST=params.value_bits == 2 and prmt,
            K_FAST=prmt and (params.bits == 2 or (params.bits in (3, 4) and int8_key_dots(q.dtype, d))),
            BLOCK_N=block_n, BLOCK_F=tiles["block_f"], HAS_FP=has_fp, DIRECT=direct,
            DT=tl.float16 if fp16 else tl.float32, PREC="tf32" if fp16 else "ieee",
            SOFTCAP=params.softcap is not None, NUM_STAGES=num_stages, MASKLESS=maskless,
            META8=params.meta_bases is not None, BIAS_SCALE=bias_scale(bias.dtype), num_warps=num_warps, **cap,
        )  # fmt: skip
    return o_part if direct else merge_parts(o_part, lse_part, q.dtype)
