"""Cache writes of the *query-folded* layout: RoPE'd mean, centre, rotate, quantize and pack keys
and values of many tokens in one launch, straight into the store.

For each token ``n`` (position ``p = max(pos, 0)``) of KV head ``h`` (layout:
:mod:`rkv_convert.kernels.decode_folded`):

- keys: ``y = (k_post - RoPE_p(mu_h)) @ R_h`` (:func:`rkv_convert.runtime.ops.fold_keys` of
  :func:`~rkv_convert.runtime.ops.mean_at`), then the quantizer of
  :mod:`rkv_convert.kernels.quantize_pack` over groups of ``g_k`` consecutive channels of ``y``;
- values: the same quantizer over groups of ``g_v`` consecutive channels.

Outputs are the store's own rows (``[B, n_kv, n, width]``, any leading strides), so the cache
passes views of its slots and nothing is copied afterwards.

One program per ``(BLOCK_T tokens, KV head, sequence)``; small grids (``split_kv``, :func:`split_kv_default`) take
one for the keys and another for the values. ``RoPE_p(mu)`` is formed in registers
(cos/sin of ``p * inv_freq`` by the fast unit after a Cody-Waite reduction) and subtracted; the
rotation is two tensor-core dots over the halves of the head (``rotate_half`` pairs channel ``i``
with ``i + d/2``). fp16 and bf16 keys: fp16 operands (the centred keys and ``R_h`` rounded to fp16),
fp32 sums, the reference's math for these keys (``fold_keys(..., operands=torch.float16)``); the
rounding moves ``y`` by about ``2**-11`` of its size, a thousandth of a 2-bit step, so it flips a code
only where ``y`` sits within that of a rounding boundary (about 0.1 % of codes against fp32 operands).
The centred keys must stay inside the fp16 range (``|k - RoPE(mu)| < 65504``; real keys are orders of
magnitude smaller). fp32 keys: IEEE fp32 dots. (Tried on the H200: operands split in two, ``x_hi + x_lo``
and ``R_hi + R_lo`` in three products, about fp32 accuracy at about half the speed; folding the mean term
into two more dots, ``cos_p @ P + sin_p @ Q``, 30 % against 47 % of the copy rate.)

Exactness against :func:`encode_folded_ref`: values bit for bit (the quantizer's IEEE rules); keys
up to the order of the fp32 sums, which moves a code by one step where ``y`` sits on a rounding
boundary (as :func:`~rkv_convert.kernels.quantize_pack.quantize_pack` with a rotation). With searched group
ranges (``FoldedParams.ranges``) each group's candidate errors are summed in the compiler's order, so where two
candidates tie to within that order a group may take the other one (at most 0.5 % of groups in the tests).
Every token's arithmetic is its own (the dots' reduction order is fixed by the compiled kernel), so a token
encodes the same whichever batch or block it comes in; the runtime's tiles depend on the head dim, key dtype and
group ranges alone.

Dispatch (see :mod:`rkv_convert.kernels._common`): ``backend="auto"`` runs the kernel on CUDA
tensors or under ``TRITON_INTERPRET=1``, else :func:`encode_folded_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from rkv_convert.quant.quantizer import RANGE_FRACTIONS, SCALE_FLOOR, GroupRanges
from rkv_convert.runtime.ops import fold_keys, mean_at

from ._common import Backend, cdiv, device_guard, resolve_backend, triton_interpreting
from ._decode_parts import _cos_sin
from ._occupancy import sm_count
from .folded_params import FoldedParams
from .packed_kv import PackedKV
from .quantize_pack import _codes, _meta8, _reciprocal, _scale_zero, _store_packed, quantize_pack_ref

__all__ = ["encode_folded", "encode_folded_ref", "encode_folded_supports", "split_kv_default"]

# Launch settings: tokens per program and warps (the best of benchmarks/bench_cache_writes.py --tune on an H200,
# head dim 128), and a register cap for min-max group ranges at head dim 128 (128: four 4-warp programs per SM;
# 1.10x-1.13x faster than a cap of 168, three programs, at 16 x 4,096 and 1 x 32,768 tokens of llama2-7b and
# llama3-8b heads on an H100, thirty-third session). Head dim 64 and searched ranges keep the former cap, 168 (not
# re-tuned). Head dim 256 takes 8 warps and no cap: with 4 warps its program spills 1.3 KB of registers (sm_90
# compile). fp16/bf16 keys; fp32 keys take their own settings (_launch).
# ``split_per_sm``: grids of at most this many programs per SM run keys and values in separate programs
# (``split_kv``): on an H100 (CUDA-graph replay, thirty-seventh session, writes_split_H100_s37.csv) 1.09x-1.25x
# faster at 48-192 programs (llama3-8b 1 x 1,024 tokens, smollm2 heads 1 x 1,024, 1 x 4,096, 32 x 128),
# 0.87x-0.95x at 512-768 and 0.96x-1.01x from 1,536 (the key programs' dots then fill the SMs anyway).
ENCODE_DEFAULTS: dict[str, int] = {"block_t": 64, "num_warps": 4, "maxnreg": 128, "split_per_sm": 2}
_UNTUNED_MAXNREG = 168  # head dim 64 and searched ranges


def _launch(head_dim: int, fp16_dots: bool, block_t: int | None, num_warps: int | None,
            search: bool = False) -> tuple[int, dict[str, int]]:  # fmt: skip
    """``(block_t, launch options)``. fp16/bf16 keys: ``ENCODE_DEFAULTS`` below head dim 256 (the register cap at
    head dim 128 with min-max ranges, else 168), with 8 warps when the group ranges are searched (H200, llama2-7b
    heads, 16 x 4,096 tokens: 3.8 ms against 10.6 ms with 4 warps; 16 or 32 tokens per program were slower); at 256,
    8 warps and no register cap. fp32 keys (IEEE fp32 dots): 8 warps, 64 tokens at head dim 64 and 16 above, no cap.
    For sm_90 the former settings (64 tokens x 4 warps capped at 168 registers; 32 x 8 at head dim 256) spilled 7
    and 15 KB per thread at head dims 128 and 256 and took 10-14 s to compile on a CPU; 16 x 8 spills 80 B and
    6.7 KB and compiles in 1-4 s (seventh session; fp32 writes are not timed on a GPU: the benchmarks run fp16)."""
    if not fp16_dots:
        default_t, options = (64 if head_dim <= 64 else 16), {"num_warps": 8}
    elif head_dim < 256:
        cap = ENCODE_DEFAULTS["maxnreg"] if head_dim == 128 and not search else _UNTUNED_MAXNREG
        default_t, options = ENCODE_DEFAULTS["block_t"], {"num_warps": 8 if search else ENCODE_DEFAULTS["num_warps"],
                                                          "maxnreg": cap}  # fmt: skip
    else:
        default_t, options = ENCODE_DEFAULTS["block_t"], {"num_warps": 8}
    if num_warps is not None:
        options["num_warps"] = num_warps
    return default_t if block_t is None else block_t, options


def split_kv_default(programs: int, device: torch.device) -> bool:
    """Whether a grid of ``programs`` (token blocks x KV heads x sequences) writes keys and values in separate
    programs by default: at most ``ENCODE_DEFAULTS["split_per_sm"]`` per SM (:func:`sm_count`: 4 off CUDA)."""
    return programs <= ENCODE_DEFAULTS["split_per_sm"] * sm_count(device)


def encode_folded_supports(head_dim: int) -> str | None:
    """None when the kernel can encode heads of ``head_dim`` channels, else the reason it cannot."""
    if head_dim & (head_dim - 1) or head_dim < 32:
        return f"the Triton encoder needs a power-of-two head dim >= 32, got {head_dim}"
    return None


def _check(key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor, p: FoldedParams, out: PackedKV | None) -> None:
    if key.dim() != 4 or key.shape != value.shape:
        raise ValueError(f"key and value must both be [B, n_kv, n, d], got {tuple(key.shape)} and {tuple(value.shape)}")
    b, n_kv, n, d = key.shape
    if (n_kv, d) != (p.n_kv, p.head_dim):
        raise ValueError(f"key {tuple(key.shape)} does not fit {p.n_kv} KV heads of {p.head_dim}")
    if tuple(pos.shape) != (b, n):
        raise ValueError(f"pos must be [{b}, {n}], got {tuple(pos.shape)}")
    if out is not None:
        k_width, k_groups, v_width, v_groups = p.row_widths
        u8, (s_dt, z_dt) = torch.uint8, p.group_meta.dtypes
        want = ((k_width, u8), (k_groups, s_dt), (k_groups, z_dt), (v_width, u8), (v_groups, s_dt), (v_groups, z_dt))
        for name, got, (width, dtype) in zip(PackedKV._fields, out[:6], want):
            if got is None or got.shape != (b, n_kv, n, width) or got.dtype != dtype:
                raise ValueError(f"out.{name} must be {dtype} {[b, n_kv, n, width]}, got "
                                 f"{None if got is None else (got.dtype, list(got.shape))}")  # fmt: skip
        if out.pos is None or out.pos.shape != (b, n) or out.pos.dtype != torch.int32:
            raise ValueError(f"out.pos must be int32 {[b, n]}, got {None if out.pos is None else (out.pos.dtype, list(out.pos.shape))}")


def encode_folded_ref(key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor, params: FoldedParams,
                      k_clip: float, v_clip: float, out: PackedKV | None = None) -> PackedKV:  # fmt: skip
    """Pure-torch reference of :func:`encode_folded`: ``fold_keys`` of ``mean_at`` (fp16 operands for fp16/bf16
    keys, as the kernel), then ``quantize_pack_ref`` (8-bit metadata: ``params.meta_bases``; group ranges:
    ``params.ranges``)."""
    _check(key, value, pos, params, out)
    p = params
    operands = torch.float32 if key.dtype == torch.float32 else torch.float16
    y = fold_keys(key, mean_at(p.mean, pos, p.inv_freq, p.attention_scaling), p.rotation, operands)
    k_rows = (t.transpose(1, 2) for t in quantize_pack_ref(y.transpose(1, 2), p.bits, p.g_k, k_clip,
                                                           meta_base=p.key_meta_base, ranges=p.ranges))  # fmt: skip
    v_rows = (t.transpose(1, 2) for t in quantize_pack_ref(value.transpose(1, 2), p.value_bits, p.g_v, v_clip,
                                                           meta_base=p.value_meta_base, ranges=p.ranges))  # fmt: skip
    rows = PackedKV(*k_rows, *v_rows, pos.to(torch.int32))
    if out is None:
        return rows
    for dst, src in zip(out[:7], rows):
        dst.copy_(src)
    return out


@triton.jit
def _stored_meta(mn, mx, lo_frac, hi_frac, scale_floor, meta_base, LEVELS: tl.constexpr, META8: tl.constexpr,
                 USE_LIBDEVICE: tl.constexpr):  # fmt: skip
    """``(stored scale, stored zero, fp32 scale, fp32 zero)`` of groups with range ``[lo_frac*min, hi_frac*max]``
    (fp16, or ``META8``: 8-bit codes with ``meta_base``; ``quant.quantizer.stored_group_meta``)."""
    if META8:  # one return statement: the branches' stored types differ
        stored_s, stored_z, scale, zero = _meta8(mn, mx, lo_frac, hi_frac, scale_floor, meta_base, LEVELS, USE_LIBDEVICE)
    else:
        stored_s, stored_z = _scale_zero(mn, mx, lo_frac, hi_frac, scale_floor, LEVELS, USE_LIBDEVICE)
        scale, zero = stored_s.to(tl.float32), stored_z.to(tl.float32)
    return stored_s, stored_z, scale, zero


@triton.jit
def _group_error(x3, scale, zero, LEVELS: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """Squared error ``[BLOCK_T, NG]`` of groups ``x3`` stored with fp32 ``scale, zero``, in the code domain
    (``quant.quantizer``'s ``_group_error``; the sum's order is the compiler's). Full-rate ops only: the
    rounding adds and subtracts ``1.5 * 2**23`` instead of converting to integers and back."""
    t = (x3 - zero[:, :, None]) * _reciprocal(scale)[:, :, None]
    c = tl.minimum(tl.maximum(t, 0.0), LEVELS * 1.0)
    if USE_LIBDEVICE:  # explicit IEEE adds: the compiler must not fold (c + m) - m into c
        c = libdevice.sub_rn(libdevice.add_rn(c, 12582912.0), 12582912.0)
    else:
        c = (c + 12582912.0) - 12582912.0
    d = c - t
    return tl.sum(d * d, axis=2) * (scale * scale)


@triton.jit
def _try_range(x3, mn, mx, lo_frac: tl.constexpr, hi_frac: tl.constexpr, best, scale_floor, meta_base,
               LEVELS: tl.constexpr, META8: tl.constexpr, USE_LIBDEVICE: tl.constexpr):  # fmt: skip
    """``best`` (error, stored scale, stored zero, fp32 scale, fp32 zero per group) with each group's entries
    replaced where the range ``[lo_frac*min, hi_frac*max]`` has a smaller error."""
    cand = _stored_meta(mn, mx, lo_frac, hi_frac, scale_floor, meta_base, LEVELS, META8, USE_LIBDEVICE)
    err = _group_error(x3, cand[2], cand[3], LEVELS, USE_LIBDEVICE)
    better = err < best[0]
    return (tl.where(better, err, best[0]), tl.where(better, cand[0], best[1]), tl.where(better, cand[1], best[2]),
            tl.where(better, cand[2], best[3]), tl.where(better, cand[3], best[4]))  # fmt: skip


@triton.jit
def _one_copy(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``x [ROWS, COLS]`` unchanged, moved to a layout that holds each entry on one thread.

    A reduction over a group's channels leaves the group's result on every thread that held some of its
    channels (4 copies for keys from the rotation's dot, 8 for values at the default tiles), and every copy
    would run the group's metadata math (divisions, ``log2``, ``exp2``). An identity gather makes the compiler
    convert the layout first. sm_90, llama2-7b heads, 2-bit keys: 4,032 -> 3,184 SASS instructions per warp with
    8-bit metadata, 3,104 -> 3,000 with fp16 metadata; on an H100 (CUDA-graph replay, thirty-third session,
    ``docs/benchmarks.md``) writes at head dim 128 ran 1.27x-1.41x faster with 8-bit metadata, 1.07x-1.23x with
    fp16 metadata (together with the register cap of ``ENCODE_DEFAULTS``, 128 instead of 168). Not used with
    searched ranges (their errors are compared in the elements' layout: more instructions, not fewer) nor for fp16
    metadata below head dim 128 (5-10 % slower there)."""
    rows = tl.arange(0, ROWS)[:, None] + tl.zeros((ROWS, COLS), tl.int32)
    return tl.gather(x, rows, 0)


@triton.jit
def _quantize_rows(x, codes_ptr, c_row, sz_row, scale_ptr, zero_ptr, tmask, clip, scale_floor, meta_base,
                   BLOCK_T: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr,
                   META8: tl.constexpr, SEARCH: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr,
                   USE_LIBDEVICE: tl.constexpr):  # fmt: skip
    """Quantize fp32 rows ``x [BLOCK_T, D]`` (tokens ``tmask``) in groups of ``GS`` consecutive channels; store codes,
    scales, zeros (fp16, or ``META8``: 8-bit codes with ``meta_base``). ``SEARCH``: each group takes the best of
    ``quant.quantizer.range_candidates`` (fractions ``F0, F1``), in its order, by squared error."""
    NG: tl.constexpr = D // GS
    LEVELS: tl.constexpr = (1 << BITS) - 1
    x3 = tl.reshape(x, (BLOCK_T, NG, GS))
    g = tl.arange(0, NG)
    mn, mx = tl.min(x3, axis=2), tl.max(x3, axis=2)
    if not SEARCH and (META8 or D >= 128):  # where it measured faster (see _one_copy)
        mn, mx = _one_copy(mn, BLOCK_T, NG), _one_copy(mx, BLOCK_T, NG)
    stored_s, stored_z, scale, zero = _stored_meta(mn, mx, clip, clip, scale_floor, meta_base, LEVELS, META8,
                                                   USE_LIBDEVICE)  # fmt: skip
    if SEARCH:
        best = (_group_error(x3, scale, zero, LEVELS, USE_LIBDEVICE), stored_s, stored_z, scale, zero)
        best = _try_range(x3, mn, mx, F0, F0, best, scale_floor, meta_base, LEVELS, META8, USE_LIBDEVICE)
        best = _try_range(x3, mn, mx, F0, F1, best, scale_floor, meta_base, LEVELS, META8, USE_LIBDEVICE)
        best = _try_range(x3, mn, mx, F1, F0, best, scale_floor, meta_base, LEVELS, META8, USE_LIBDEVICE)
        best = _try_range(x3, mn, mx, F1, F1, best, scale_floor, meta_base, LEVELS, META8, USE_LIBDEVICE)
        stored_s, stored_z, scale, zero = best[1], best[2], best[3], best[4]
    tl.store(scale_ptr + sz_row[:, None] + g[None, :], stored_s, mask=tmask[:, None])
    tl.store(zero_ptr + sz_row[:, None] + g[None, :], stored_z, mask=tmask[:, None])
    codes = _codes(x3, _reciprocal(scale)[:, :, None], zero[:, :, None], LEVELS, USE_LIBDEVICE)
    _store_packed(codes_ptr, c_row, tmask, tl.reshape(codes, (BLOCK_T, D)), 0, BLOCK_T, D, D, BITS)


@triton.jit(do_not_specialize=["n"])  # lengths: one compile for all
def _encode_folded_kernel(
    k_ptr, v_ptr, pos_ptr, rot_ptr, mean_ptr, freq_ptr,
    kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr,
    n, rope_scaling, k_clip, v_clip, scale_floor, k_base, v_base,
    s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_pb,
    s_kcb, s_kch, s_kct, s_ksb, s_ksh, s_kst, s_vcb, s_vch, s_vct, s_vsb, s_vsh, s_vst,
    D: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr, GK: tl.constexpr, GV: tl.constexpr,
    BLOCK_T: tl.constexpr, FP16_DOTS: tl.constexpr, META8: tl.constexpr, SEARCH: tl.constexpr,
    K_F0: tl.constexpr, K_F1: tl.constexpr, V_F0: tl.constexpr, V_F1: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
    SPLIT_KV: tl.constexpr,
):
    """Grid ``(cdiv(n, BLOCK_T), n_kv, B)``, or ``(cdiv(n, BLOCK_T), 2 n_kv, B)`` with ``SPLIT_KV`` (program ``2h``
    writes head ``h``'s keys, ``2h + 1`` its values); ``FP16_DOTS``: fp16 operands, fp32 sums (fp16/bf16 keys), else
    IEEE fp32; ``META8``: 8-bit group metadata with bases ``k_base``/``v_base``; ``SEARCH``: searched group ranges with
    the fractions ``K_F*``/``V_F*`` of the key and value widths."""
    b = tl.program_id(2).to(tl.int64)
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    tmask = t < n
    if SPLIT_KV:
        h = tl.program_id(1) // 2
        keys = tl.program_id(1) % 2 == 0
        values = tl.program_id(1) % 2 == 1
    else:
        h = tl.program_id(1)
        keys = True
        values = True
    if keys:
        _encode_keys(k_ptr, pos_ptr, rot_ptr, mean_ptr, freq_ptr, kc_ptr, ks_ptr, kz_ptr, b, h, t, tmask,
                     rope_scaling, k_clip, scale_floor, k_base, s_kb, s_kh, s_kt, s_pb, s_kcb, s_kch, s_kct,
                     s_ksb, s_ksh, s_kst, D, K_BITS, GK, BLOCK_T, FP16_DOTS, META8, SEARCH, K_F0, K_F1,
                     USE_LIBDEVICE)  # fmt: skip
    if values:
        _encode_values(v_ptr, vc_ptr, vs_ptr, vz_ptr, b, h, t, tmask, v_clip, scale_floor, v_base,
                       s_vb, s_vh, s_vt, s_vcb, s_vch, s_vct, s_vsb, s_vsh, s_vst, D, V_BITS, GV, BLOCK_T,
                       META8, SEARCH, V_F0, V_F1, USE_LIBDEVICE)  # fmt: skip


@triton.jit
def _encode_keys(k_ptr, pos_ptr, rot_ptr, mean_ptr, freq_ptr, kc_ptr, ks_ptr, kz_ptr, b, h, t, tmask,
                 rope_scaling, k_clip, scale_floor, k_base, s_kb, s_kh, s_kt, s_pb, s_kcb, s_kch, s_kct,
                 s_ksb, s_ksh, s_kst, D: tl.constexpr, K_BITS: tl.constexpr, GK: tl.constexpr,
                 BLOCK_T: tl.constexpr, FP16_DOTS: tl.constexpr, META8: tl.constexpr, SEARCH: tl.constexpr,
                 K_F0: tl.constexpr, K_F1: tl.constexpr, USE_LIBDEVICE: tl.constexpr):  # fmt: skip
    """Keys of tokens ``t`` of head ``h``: centre by ``RoPE_p(mu)``, rotate by ``R_h``, quantize and store."""
    H: tl.constexpr = D // 2
    i = tl.arange(0, H)
    j = tl.arange(0, D)

    # RoPE_p(mu) = mu * cos + rotate_half(mu) * sin, one half of the head at a time.
    p = tl.maximum(tl.load(pos_ptr + b * s_pb + t, mask=tmask, other=0), 0)
    cos, sin = _cos_sin(p.to(tl.float32)[:, None] * tl.load(freq_ptr + i)[None, :], USE_LIBDEVICE)
    mu_lo = tl.load(mean_ptr + h * D + i)[None, :] * rope_scaling  # the scaling on [d/2] means, not [T, d/2] cos/sin
    mu_hi = tl.load(mean_ptr + h * D + H + i)[None, :] * rope_scaling
    k_row = k_ptr + b * s_kb + h * s_kh + t * s_kt
    k_lo = tl.load(k_row[:, None] + i[None, :], mask=tmask[:, None], other=0.0).to(tl.float32) - (mu_lo * cos - mu_hi * sin)
    k_hi = tl.load(k_row[:, None] + H + i[None, :], mask=tmask[:, None], other=0.0).to(tl.float32) - (mu_hi * cos + mu_lo * sin)
    r_rows = rot_ptr + h * D * D + i[:, None] * D + j[None, :]  # R_h [d, d]: fp16 for FP16_DOTS, else fp32
    if FP16_DOTS:
        y = tl.dot(k_lo.to(tl.float16), tl.load(r_rows))
        y = tl.dot(k_hi.to(tl.float16), tl.load(r_rows + H * D), y)
    else:  # fp32 keys: IEEE fp32 dots
        y = tl.dot(k_lo, tl.load(r_rows), input_precision="ieee")
        y = tl.dot(k_hi, tl.load(r_rows + H * D), y, input_precision="ieee")
    _quantize_rows(y, kc_ptr, b * s_kcb + h * s_kch + t * s_kct, b * s_ksb + h * s_ksh + t * s_kst, ks_ptr, kz_ptr,
                   tmask, k_clip, scale_floor, k_base, BLOCK_T, D, K_BITS, GK, META8, SEARCH, K_F0, K_F1,
                   USE_LIBDEVICE)  # fmt: skip


@triton.jit
def _encode_values(v_ptr, vc_ptr, vs_ptr, vz_ptr, b, h, t, tmask, v_clip, scale_floor, v_base,
                   s_vb, s_vh, s_vt, s_vcb, s_vch, s_vct, s_vsb, s_vsh, s_vst, D: tl.constexpr, V_BITS: tl.constexpr,
                   GV: tl.constexpr, BLOCK_T: tl.constexpr, META8: tl.constexpr, SEARCH: tl.constexpr,
                   V_F0: tl.constexpr, V_F1: tl.constexpr, USE_LIBDEVICE: tl.constexpr):  # fmt: skip
    """Values of tokens ``t`` of head ``h``: quantize and store."""
    j = tl.arange(0, D)
    v = tl.load(v_ptr + b * s_vb + h * s_vh + t[:, None] * s_vt + j[None, :], mask=tmask[:, None], other=0.0)
    _quantize_rows(v.to(tl.float32), vc_ptr, b * s_vcb + h * s_vch + t * s_vct, b * s_vsb + h * s_vsh + t * s_vst,
                   vs_ptr, vz_ptr, tmask, v_clip, scale_floor, v_base, BLOCK_T, D, V_BITS, GV, META8, SEARCH,
                   V_F0, V_F1, USE_LIBDEVICE)  # fmt: skip


def _rows_strides(t: torch.Tensor, name: str) -> tuple[int, int, int]:
    if t.stride(-1) != 1:
        raise ValueError(f"{name} needs a contiguous last dimension, got strides {t.stride()}")
    return t.stride(0), t.stride(1), t.stride(2)


def encode_folded(
    key: torch.Tensor,
    value: torch.Tensor,
    pos: torch.Tensor,
    params: FoldedParams,
    k_clip: float,
    v_clip: float,
    out: PackedKV | None = None,
    *,
    block_t: int | None = None,
    num_warps: int | None = None,
    split_kv: bool | None = None,
    backend: Backend = "auto",
) -> PackedKV:
    """Encode ``n`` tokens for the folded store (module docstring).

    Args:
        key: ``[B, n_kv, n, d]`` post-RoPE keys, fp16/bf16/fp32 (any strides, last dim contiguous).
        value: ``[B, n_kv, n, d]`` values (same).
        pos: int ``[B, n]`` RoPE positions (``-1``, padding, encodes at position 0).
        params: the layer's :class:`FoldedParams` (bits, groups, ``R_h``, ``mu_h``, RoPE).
        k_clip, v_clip: clip ratios of the key and value quantizers.
        out: store rows to write (a :class:`PackedKV` of ``n``-slot views, ``fp_*`` unused); None: new tensors.
        block_t, num_warps: launch settings (None: ``_launch``'s for the head dim and key dtype; a benchmark's
            knob). The register cap of ``ENCODE_DEFAULTS`` applies to fp16/bf16 keys below head dim 256.
        split_kv: keys and values in separate programs (twice the programs, each with about half the work);
            None: where the grid has at most ``ENCODE_DEFAULTS["split_per_sm"]`` programs per SM.
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (see ``_common``).

    Returns:
        ``out`` (or the new rows) with the codes, scales, zeros and ``pos``.
    """
    if not resolve_backend(backend, key):
        return encode_folded_ref(key, value, pos, params, k_clip, v_clip, out)
    _check(key, value, pos, params, out)
    reason = encode_folded_supports(params.head_dim)
    if reason:
        raise ValueError(reason)
    if key.dtype not in (torch.float16, torch.bfloat16, torch.float32) or value.dtype != key.dtype:
        raise ValueError(f"key and value must share one of fp16/bf16/fp32, got {key.dtype} and {value.dtype}")
    b, n_kv, n, d = key.shape
    rows = params.empty_rows(b, n, key.device) if out is None else out
    # every stride checked before anything is written
    strides = (*_rows_strides(key, "key"), *_rows_strides(value, "value"), _rows_strides(rows.pos[None], "out.pos")[1],
               *_rows_strides(rows.k_codes, "k_codes"), *_rows_strides(rows.k_scale, "k_scale"),
               *_rows_strides(rows.v_codes, "v_codes"), *_rows_strides(rows.v_scale, "v_scale"))  # fmt: skip
    for a, c in ((rows.k_scale, rows.k_zero), (rows.v_scale, rows.v_zero)):
        if a.stride() != c.stride():
            raise ValueError(f"scales and zeros must share strides, got {a.stride()} and {c.stride()}")
    rows.pos.copy_(pos)  # the kernel reads the positions back from here
    if b * n == 0:
        return rows
    fp16_dots = key.dtype != torch.float32
    search = params.ranges is GroupRanges.SEARCHED
    block_t, launch = _launch(d, fp16_dots, block_t, num_warps, search)
    (k_f0, k_f1), (v_f0, v_f1) = RANGE_FRACTIONS[params.bits], RANGE_FRACTIONS[params.value_bits]
    rotation, mean, inv_freq = params.encode_operands(key.device, fp16_dots)
    if split_kv is None:
        split_kv = split_kv_default(cdiv(n, block_t) * n_kv * b, key.device)
    with device_guard(key):  # Triton launches on the current device
        _encode_folded_kernel[(cdiv(n, block_t), n_kv * (2 if split_kv else 1), b)](
            key, value, rows.pos, rotation, mean, inv_freq, *rows[:6],
            n, float(params.attention_scaling), float(k_clip), float(v_clip), SCALE_FLOOR,
            params.key_meta_base or 1.0, params.value_meta_base or 1.0, *strides,
            D=d, K_BITS=params.bits, V_BITS=params.value_bits, GK=params.g_k, GV=params.g_v,
            BLOCK_T=block_t, FP16_DOTS=fp16_dots, META8=params.meta_bases is not None,
            SEARCH=search, K_F0=k_f0, K_F1=k_f1, V_F0=v_f0, V_F1=v_f1,
            USE_LIBDEVICE=not triton_interpreting(), SPLIT_KV=split_kv, **launch,
        )  # fmt: skip
    return rows

