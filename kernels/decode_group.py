"""Decode attention, one program per *head group*: ``decode_attention(kernel="group")``.

Same storage layout, arguments and result as :mod:`rkv_convert.kernels.decode_attention`
(read its module docstring first). This kernel covers the common case: a Kronecker-factored
key rotation ``R = kron(A [G, G], B [d, d])`` (every power-of-two Sylvester Hadamard rotation,
e.g. the paper's ``512 = H_4 ⊗ H_128``), one to four key groups per head group and one to four
value groups per head. What it changes against one program per KV head (on an H100 neither
kernel is faster everywhere; docs/benchmarks.md has the side-by-side rows and the reason: both
are instruction-issue-bound, at a similar count of instructions per key token and head):

- **Each key code is unpacked and dequantized once**, not once per head of its group: a
  program owns all ``G`` KV heads of one head group (and their ``G*rep`` query heads).
- **Codes are read as int32 words** and split into channel order in registers
  (:func:`_words_to_codes`), so a chunk's ``d`` channels meet ``B^T`` in one ``K = d`` dot
  (``d*d`` tensor-core MACs per key token and head) after the heads' combination
  ``z_h = Σ_g A[h, g] y_g`` of the dequantized chunks ``y_g``.
- **No one-hot dots, no layout round trips for scales:** per-channel key scales and zeros
  come from a chain of at most three selects on the channel's group id; codes become floats
  by the exponent trick (``bits(2^23 + c) - 2^23``), not a conversion instruction.
- **Values are never dequantized per element** when a head has one value group (the default,
  ``g_v = d``): ``Σ_t p_t (s_t c_t + z_t) = (p ⊙ s) · c + Σ_t p_t z_t``, so the value scale
  goes into the softmax weights and the zero into one running sum per query row.
- **RoPE angles depend on the position only**: cos/sin are computed once per token for all
  the group's heads.

All query heads of the group share one score tile ``[BLOCK_T, QP]`` (column ``r`` is query
head ``hg*G*rep + r``, reading KV head ``r // rep`` of the group) and one online softmax;
each head's keys fill its own columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import device_guard, next_pow2
from ._decode_parts import _group_rows, _select_groups, _slot_rope, _softmax_step

__all__ = ["group_kernel_supports", "launch_group_kernel"]

_MAX_GROUP_QUERIES = 64  # query heads per head group held in one score tile
_MAX_SELECT_GROUPS = 4  # key groups per head group / value groups per head reached by a select chain


def group_kernel_supports(*, factored: bool, G: int, rep: int, d: int, n_gk: int, n_gv: int) -> str | None:
    """None if the head-group kernel covers this configuration, else the reason it does not."""
    if not factored:
        return "the key rotation is not Kronecker-factored (kron(A [G, G], B [d, d]))"
    if G > 4:
        return f"{G} heads per rotation group (the kernel unrolls at most 4)"
    if G * rep > _MAX_GROUP_QUERIES:
        return f"{G * rep} query heads per head group (at most {_MAX_GROUP_QUERIES})"
    if d & (d - 1) or d < 64:
        return f"head dim {d} is not a power of two >= 64"
    if n_gk > _MAX_SELECT_GROUPS or n_gv > _MAX_SELECT_GROUPS:
        return f"{n_gk} key groups per head group / {n_gv} value groups per head (at most {_MAX_SELECT_GROUPS} each)"
    return None


@triton.jit
def _as_float(codes):
    """int32 codes ``0 <= c < 2^23`` to exact fp32: ``bits(2^23 + c) - 2^23`` (integer OR, one float add)."""
    return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _field(lo, hi, sh, i: tl.constexpr, BITS: tl.constexpr, SCALED: tl.constexpr):
    """Code ``i`` of each packed word (``hi``/``sh``: the 3-bit high bits' words and shifts).

    ``SCALED`` (2 and 4 bits): the code left in place within its byte, ``c * 2^(BITS*(i % (8/BITS)))``,
    which costs one shift per byte instead of one per code (callers fold the factor elsewhere).
    """
    if SCALED:
        PB: tl.constexpr = 8 // BITS
        f = (lo >> (8 * (i // PB))) & (((1 << BITS) - 1) << (BITS * (i % PB)))
    elif BITS == 4:
        f = (lo >> (4 * i)) & 15
    else:
        f = (lo >> (2 * i)) & 3
        if BITS == 3:
            f = f | (((hi >> (sh + i)) & 1) << 2)
    return f


@triton.jit
def _words_to_codes(lo, hi, sh, BITS: tl.constexpr, ROWS: tl.constexpr, NW: tl.constexpr, SCALED: tl.constexpr):
    """int32 codes ``[ROWS, NW * per_word]`` in channel order from packed int32 words ``[ROWS, NW]``.

    Word ``w`` holds channels ``per_word*w + i`` (16 per word at 2/3 bits, 8 at 4 bits). Each
    ``tl.join`` appends an axis of 2, so joining fields that differ in bit ``k`` of ``i``,
    highest bit first, lays them out in channel order after the reshape (in registers).
    """
    if BITS == 4:  # one exit: Triton 3.6 checks every return's type, even in a dead constexpr branch
        j0 = tl.join(_field(lo, hi, sh, 0, BITS, SCALED), _field(lo, hi, sh, 4, BITS, SCALED))
        j1 = tl.join(_field(lo, hi, sh, 1, BITS, SCALED), _field(lo, hi, sh, 5, BITS, SCALED))
        j2 = tl.join(_field(lo, hi, sh, 2, BITS, SCALED), _field(lo, hi, sh, 6, BITS, SCALED))
        j3 = tl.join(_field(lo, hi, sh, 3, BITS, SCALED), _field(lo, hi, sh, 7, BITS, SCALED))
        codes = tl.reshape(tl.join(tl.join(j0, j2), tl.join(j1, j3)), (ROWS, NW * 8))
    else:
        j0 = tl.join(_field(lo, hi, sh, 0, BITS, SCALED), _field(lo, hi, sh, 8, BITS, SCALED))
        j1 = tl.join(_field(lo, hi, sh, 1, BITS, SCALED), _field(lo, hi, sh, 9, BITS, SCALED))
        j2 = tl.join(_field(lo, hi, sh, 2, BITS, SCALED), _field(lo, hi, sh, 10, BITS, SCALED))
        j3 = tl.join(_field(lo, hi, sh, 3, BITS, SCALED), _field(lo, hi, sh, 11, BITS, SCALED))
        j4 = tl.join(_field(lo, hi, sh, 4, BITS, SCALED), _field(lo, hi, sh, 12, BITS, SCALED))
        j5 = tl.join(_field(lo, hi, sh, 5, BITS, SCALED), _field(lo, hi, sh, 13, BITS, SCALED))
        j6 = tl.join(_field(lo, hi, sh, 6, BITS, SCALED), _field(lo, hi, sh, 14, BITS, SCALED))
        j7 = tl.join(_field(lo, hi, sh, 7, BITS, SCALED), _field(lo, hi, sh, 15, BITS, SCALED))
        k0 = tl.join(j0, j4)
        k1 = tl.join(j1, j5)
        k2 = tl.join(j2, j6)
        k3 = tl.join(j3, j7)
        codes = tl.reshape(tl.join(tl.join(k0, k2), tl.join(k1, k3)), (ROWS, NW * 16))
    return codes


@triton.jit
def _chunk_codes(row, tmask, w0, hi0, D: tl.constexpr, BITS: tl.constexpr, ROWS: tl.constexpr,
                 SCALED: tl.constexpr = False):
    """Codes ``int32 [ROWS, D]`` of one ``D``-channel chunk: low words from word ``w0``, 3-bit high words from ``hi0``.

    ``SCALED``: codes times ``2^(BITS*(i % (8/BITS)))`` for channel ``i`` of a word (see :func:`_field`).
    """
    PER: tl.constexpr = 8 if BITS == 4 else 16
    NW: tl.constexpr = D // PER
    wi = tl.arange(0, NW)
    lo = tl.load(row[:, None] + w0 + wi[None, :], mask=tmask[:, None], other=0)
    if BITS == 3:  # channel PER*w + i: high bit 16*(w % 2) + i of high word w // 2
        hi = tl.load(row[:, None] + hi0 + wi[None, :] // 2, mask=tmask[:, None], other=0)
        sh = (16 * (wi % 2))[None, :]
    else:
        hi = lo
        sh = wi[None, :]
    return _words_to_codes(lo, hi, sh, BITS, ROWS, NW, SCALED)


@triton.jit
def _key_chunk(krow, tmask, gid_ptr, g: tl.constexpr, s0, s1, s2, s3, z0, z1, z2, z3,
               D: tl.constexpr, GD: tl.constexpr, K_BITS: tl.constexpr, NGK: tl.constexpr,
               BLOCK_T: tl.constexpr, DT: tl.constexpr):
    """Dequantized chunk ``g`` (``DT [BLOCK_T, D]``, channel order) of the rotated key rows."""
    PER: tl.constexpr = 8 if K_BITS == 4 else 16
    c = _as_float(_chunk_codes(krow, tmask, g * (D // PER), GD // 16 + g * (D // 32), D, K_BITS, BLOCK_T))
    if NGK == 1:
        y = c * s0[:, None] + z0[:, None]
    else:
        gid = tl.load(gid_ptr + g * D + tl.arange(0, D))
        y = c * _select_groups(gid, s0, s1, s2, s3, NGK) + _select_groups(gid, z0, z1, z2, z3, NGK)
    return y.to(DT)


@triton.jit
def _head_scores(s, h: tl.constexpr, a_ptr, y0, y1, y2, y3, bl, bh, mean_ptr, c, cos, sin, q_lo, q_hi, qhead,
                 G: tl.constexpr, HALF: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """Head ``h``: ``z = Σ_g A[h, g] y_g``, ``k = z @ B^T + μ_h`` (two halves), RoPE, its score columns."""
    if G == 1:
        z = y0
    else:
        z = tl.load(a_ptr + h * G).to(DT) * y0 + tl.load(a_ptr + h * G + 1).to(DT) * y1
        if G > 2:
            z = z + tl.load(a_ptr + h * G + 2).to(DT) * y2
        if G > 3:
            z = z + tl.load(a_ptr + h * G + 3).to(DT) * y3
    k_lo = tl.dot(z, bl, input_precision=PREC) + tl.load(mean_ptr + h * 2 * HALF + c)[None, :]
    k_hi = tl.dot(z, bh, input_precision=PREC) + tl.load(mean_ptr + h * 2 * HALF + HALF + c)[None, :]
    return tl.where(qhead[None, :] == h, _rope_scores(k_lo, k_hi, cos, sin, q_lo, q_hi, DT, PREC), s)


@triton.jit
def _rope_scores(k_lo, k_hi, cos, sin, q_lo, q_hi, DT: tl.constexpr, PREC: tl.constexpr):
    """Scores ``[BLOCK_T, QP]`` of pre-RoPE key halves, RoPE'd at their positions, against every query row."""
    r_lo = (k_lo * cos - k_hi * sin).to(DT)
    r_hi = (k_hi * cos + k_lo * sin).to(DT)
    sh = tl.dot(r_lo, tl.trans(q_lo), input_precision=PREC)
    return tl.dot(r_hi, tl.trans(q_hi), sh, input_precision=PREC)


@triton.jit
def _dequant_values(c, vs_row, vz_row, valid, D: tl.constexpr, GV: tl.constexpr, NGV: tl.constexpr, DT: tl.constexpr):
    """Value codes ``c [BLOCK_T, D]`` dequantized with per-channel scale/zero (selects on each channel's
    value group), in ``DT``; empty slots 0 (their scales may hold NaN)."""
    s0, s1, s2, s3 = _group_rows(vs_row, valid, NGV)
    z0, z1, z2, z3 = _group_rows(vz_row, valid, NGV)
    gidv = tl.arange(0, D) // GV
    v = c * _select_groups(gidv, s0, s1, s2, s3, NGV) + _select_groups(gidv, z0, z1, z2, z3, NGV)
    return tl.where(valid[:, None], v, 0.0).to(DT)


@triton.jit
def _head_values(vrow, tmask, valid, ph, vs_row, vz_row, acc, accz,
                 D: tl.constexpr, V_BITS: tl.constexpr, GV: tl.constexpr, NGV: tl.constexpr,
                 BLOCK_T: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """Add one KV head's ``ph^T @ v`` (``ph [BLOCK_T, QP]``: weights of its query columns, others 0)."""
    c = _as_float(_chunk_codes(vrow, tmask, 0, D // 16, D, V_BITS, BLOCK_T))
    if NGV == 1:  # fold: (p ⊙ s) · codes + Σ p z
        vs = tl.load(vs_row, mask=valid, other=0.0).to(tl.float32)
        vz = tl.load(vz_row, mask=valid, other=0.0).to(tl.float32)
        accz = accz + tl.sum(ph * vz[:, None], 0)
        acc = tl.dot(tl.trans((ph * vs[:, None]).to(DT)), c.to(DT), acc, input_precision=PREC)
    else:  # per-channel scale/zero by selects on the channel's value group
        v = _dequant_values(c, vs_row, vz_row, valid, D, GV, NGV, DT)
        acc = tl.dot(tl.trans(ph.to(DT)), v, acc, input_precision=PREC)
    return acc, accz


@triton.jit
def _fp_segment(fk_base, fv_base, fpos_row, s_fkh, s_fkt, s_fvh, s_fvt, f_stop, freq, rope_scaling,
                q_lo, q_hi, qhead, qmask, qk_scale, m_i, l_i, acc, accz, vcol,
                D: tl.constexpr, G: tl.constexpr, QP: tl.constexpr, BLOCK_T: tl.constexpr,
                DT: tl.constexpr, PREC: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """Online-softmax step over the full-precision segment (sinks + window, slots ``< f_stop``) of
    the ``G`` KV heads at ``fk_base``/``fv_base``: pre-RoPE original keys, RoPE'd here.

    ``vcol`` (``[D]`` or a scalar) scales the value columns, as the caller's accumulator holds them.
    """
    HALF: tl.constexpr = D // 2
    c = tl.arange(0, HALF)
    cc = tl.arange(0, D)
    for f0 in range(0, f_stop, BLOCK_T):
        f = f0 + tl.arange(0, BLOCK_T)
        ff = f.to(tl.int64)
        fmask, valid, cos, sin = _slot_rope(fpos_row, f, f_stop, freq, rope_scaling, USE_LIBDEVICE)
        s = tl.zeros((BLOCK_T, QP), tl.float32)
        for h in tl.static_range(G):
            k_row = fk_base + h * s_fkh + ff[:, None] * s_fkt
            k_lo = tl.load(k_row + c[None, :], mask=fmask[:, None], other=0.0).to(tl.float32)
            k_hi = tl.load(k_row + HALF + c[None, :], mask=fmask[:, None], other=0.0).to(tl.float32)
            s = tl.where(qhead[None, :] == h, _rope_scores(k_lo, k_hi, cos, sin, q_lo, q_hi, DT, PREC), s)
        s = tl.where(valid[:, None] & qmask[None, :], s * qk_scale, float("-inf"))
        m_i, l_i, alpha, p = _softmax_step(s, m_i, l_i)
        acc = acc * alpha[:, None]
        accz = accz * alpha
        for h in tl.static_range(G):
            ph = tl.where(qhead[None, :] == h, p, 0.0)
            v_row = fv_base + h * s_fvh + ff[:, None] * s_fvt + cc[None, :]
            v = tl.load(v_row, mask=valid[:, None], other=0.0).to(tl.float32)  # empty slots may hold NaN
            acc = tl.dot(tl.trans(ph.to(DT)), (v * vcol).to(DT), acc, input_precision=PREC)
    return m_i, l_i, acc, accz


@triton.jit
def _store_partial(o_ptr, lse_ptr, acc, m_i, l_i, row, qmask, D: tl.constexpr):
    """Write one program's normalised partial output ``acc / l`` and its log2-sum-exp at ``row``
    (``[B, n_q, n_parts]`` index of each query row; rows without a valid token get 0 and -inf)."""
    has = l_i > 0.0
    inv_l = 1.0 / tl.where(has, l_i, 1.0)
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(o_ptr + row[:, None] * D + tl.arange(0, D)[None, :], acc * inv_l[:, None], mask=qmask[:, None])
    tl.store(lse_ptr + row, lse, mask=qmask)


@triton.jit
def _group_kernel(
    q_ptr, kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr, pos_ptr,
    a_ptr, bt_ptr, mean_ptr, gid_ptr, freq_ptr, fk_ptr, fv_ptr, fpos_ptr, o_ptr, lse_ptr,
    s_qb, s_qh,
    s_kcb, s_kch, s_kct, s_ksb, s_ksh, s_kst, s_kzb, s_kzh, s_kzt,
    s_vcb, s_vch, s_vct, s_vsb, s_vsh, s_vst, s_vzb, s_vzh, s_vzt,
    s_pb, s_fkb, s_fkh, s_fkt, s_fvb, s_fvh, s_fvt, s_fpb,
    T, F, tokens_per_split, n_splits, n_parts, n_q, qk_scale, rope_scaling,
    D: tl.constexpr, G: tl.constexpr, REP: tl.constexpr, QP: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, NGK: tl.constexpr, GV: tl.constexpr, NGV: tl.constexpr,
    BLOCK_T: tl.constexpr, HAS_FP: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr,
):
    """Grid ``(B, n_hg, n_parts)``; writes fp32 partial outputs and log2-sum-exp per part.

    ``kw``/``vw``: the packed codes as int32 words (strides in words). ``a fp32 [G, G]`` and
    ``bt [d, d]`` (``B^T``) are the rotation's factors; ``gid int32 [n_hg, Gd]`` the key group
    of each rotated channel.
    """
    b = tl.program_id(0).to(tl.int64)
    hg = tl.program_id(1)
    split = tl.program_id(2)
    GD: tl.constexpr = G * D
    HALF: tl.constexpr = D // 2

    qi = tl.arange(0, QP)
    qmask = qi < G * REP
    qhead = qi // REP  # head of the group each score column belongs to
    c = tl.arange(0, HALF)
    cc = tl.arange(0, D)
    q_row = q_ptr + b * s_qb + (hg * G * REP + qi)[:, None] * s_qh
    q_lo = tl.load(q_row + c[None, :], mask=qmask[:, None], other=0.0).to(DT)
    q_hi = tl.load(q_row + HALF + c[None, :], mask=qmask[:, None], other=0.0).to(DT)
    freq = tl.load(freq_ptr + c)
    mean_base = mean_ptr + hg * GD
    gid_base = gid_ptr + hg * GD

    m_i = tl.full((QP,), -1.0e30, tl.float32)
    l_i = tl.zeros((QP,), tl.float32)
    acc = tl.zeros((QP, D), tl.float32)
    accz = tl.zeros((QP,), tl.float32)

    t_start = split * tokens_per_split
    t_stop = tl.minimum(T, t_start + tokens_per_split)
    kw_base = kw_ptr + b * s_kcb + hg * s_kch
    ks_base = ks_ptr + b * s_ksb + hg * s_ksh
    kz_base = kz_ptr + b * s_kzb + hg * s_kzh
    bt_base = bt_ptr + cc[:, None] * D + c[None, :]
    for t0 in range(t_start, t_stop, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tt = t.to(tl.int64)
        tmask, valid, cos, sin = _slot_rope(pos_ptr + b * s_pb, t, t_stop, freq, rope_scaling, USE_LIBDEVICE)
        s0, s1, s2, s3 = _group_rows(ks_base + tt * s_kst, valid, NGK)
        z0, z1, z2, z3 = _group_rows(kz_base + tt * s_kzt, valid, NGK)
        krow = kw_base + tt * s_kct
        y0 = _key_chunk(krow, tmask, gid_base, 0, s0, s1, s2, s3, z0, z1, z2, z3, D, GD, K_BITS, NGK, BLOCK_T, DT)
        y1 = y0
        y2 = y0
        y3 = y0
        if G > 1:
            y1 = _key_chunk(krow, tmask, gid_base, 1, s0, s1, s2, s3, z0, z1, z2, z3, D, GD, K_BITS, NGK, BLOCK_T, DT)
        if G > 2:
            y2 = _key_chunk(krow, tmask, gid_base, 2, s0, s1, s2, s3, z0, z1, z2, z3, D, GD, K_BITS, NGK, BLOCK_T, DT)
        if G > 3:
            y3 = _key_chunk(krow, tmask, gid_base, 3, s0, s1, s2, s3, z0, z1, z2, z3, D, GD, K_BITS, NGK, BLOCK_T, DT)
        bl = tl.load(bt_base)
        bh = tl.load(bt_base + HALF)
        s = tl.zeros((BLOCK_T, QP), tl.float32)
        for h in tl.static_range(G):
            s = _head_scores(s, h, a_ptr, y0, y1, y2, y3, bl, bh, mean_base, c, cos, sin, q_lo, q_hi, qhead,
                             G, HALF, DT, PREC)
        s = tl.where(valid[:, None] & qmask[None, :], s * qk_scale, float("-inf"))
        m_i, l_i, alpha, p = _softmax_step(s, m_i, l_i)
        acc = acc * alpha[:, None]
        accz = accz * alpha
        for h in tl.static_range(G):
            kv = hg * G + h
            ph = tl.where(qhead[None, :] == h, p, 0.0)
            acc, accz = _head_values(
                vw_ptr + b * s_vcb + kv * s_vch + tt * s_vct, tmask, valid, ph,
                vs_ptr + b * s_vsb + kv * s_vsh + tt * s_vst, vz_ptr + b * s_vzb + kv * s_vzh + tt * s_vzt,
                acc, accz, D, V_BITS, GV, NGV, BLOCK_T, DT, PREC)

    if HAS_FP:  # the last program index attends to the full-precision segment
        m_i, l_i, acc, accz = _fp_segment(
            fk_ptr + b * s_fkb + hg * G * s_fkh, fv_ptr + b * s_fvb + hg * G * s_fvh, fpos_ptr + b * s_fpb,
            s_fkh, s_fkt, s_fvh, s_fvt, tl.where(split == n_splits, F, 0), freq, rope_scaling,
            q_lo, q_hi, qhead, qmask, qk_scale, m_i, l_i, acc, accz, 1.0,
            D, G, QP, BLOCK_T, DT, PREC, USE_LIBDEVICE)
    _store_partial(o_ptr, lse_ptr, acc + accz[:, None], m_i, l_i, (b * n_q + hg * G * REP + qi) * n_parts + split,
                   qmask, D)


def launch_group_kernel(
    q: torch.Tensor,
    cache: tuple[torch.Tensor, ...],
    fp: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    a: torch.Tensor,
    bt: torch.Tensor,
    mean: torch.Tensor,
    gid: torch.Tensor,
    freq: torch.Tensor,
    o_part: torch.Tensor,
    lse_part: torch.Tensor,
    dims: dict[str, int],
    tokens_per_split: int,
    num_splits: int,
    has_fp: bool,
    k_bits: int,
    v_bits: int,
    v_group_size: int,
    n_gk: int,
    qk_scale: float,
    rope_scaling: float,
    dot_dtype: torch.dtype,
    precision: str,
    use_libdevice: bool,
    block_t: int,
    num_warps: int,
    num_stages: int,
) -> object:
    """Launch :func:`_group_kernel` over ``(B, n_hg, n_parts)`` (arguments prepared by ``decode_attention``).

    Returns what the launch returns (the compiled kernel on CUDA).

    ``bt``: ``B^T`` in channel order; ``gid``: int32 ``[n_hg, Gd]`` in channel order.
    """
    k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos = cache
    k_codes, v_codes = _as_words(k_codes), _as_words(v_codes)
    fk, fv, fpos = fp
    B, n_q, d, G, n_hg, rep, T, F = (dims[k] for k in ("B", "n_q", "d", "G", "n_hg", "rep", "T", "F"))
    n_parts = o_part.shape[2]
    with device_guard(q):  # Triton launches on the current device
        return _group_kernel[(B, n_hg, n_parts)](
            q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos,
            a, bt, mean, gid, freq, fk, fv, fpos, o_part, lse_part,
            *launch_strides(q, (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos), fp),
            T, F, tokens_per_split, num_splits, n_parts, n_q, qk_scale, rope_scaling,
            D=d, G=G, REP=rep, QP=max(16, next_pow2(G * rep)),
            K_BITS=k_bits, V_BITS=v_bits, NGK=n_gk, GV=v_group_size, NGV=d // v_group_size,
            BLOCK_T=block_t, HAS_FP=has_fp, DT=tl.float16 if dot_dtype == torch.float16 else tl.float32,
            PREC=precision, USE_LIBDEVICE=use_libdevice,
            num_warps=num_warps, num_stages=num_stages,
        )


def launch_strides(q: torch.Tensor, cache: tuple[torch.Tensor, ...], fp: tuple[torch.Tensor, ...]) -> tuple[int, ...]:
    """The stride arguments of every decode kernel, in their order: queries (batch, head), the
    seven cache tensors (three leading dims each; ``pos`` one) and the fp segment (three, three, one)."""
    k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos = cache
    fk, fv, fpos = fp
    return (q.stride(0), q.stride(1),
            *k_codes.stride()[:3], *k_scale.stride()[:3], *k_zero.stride()[:3],
            *v_codes.stride()[:3], *v_scale.stride()[:3], *v_zero.stride()[:3],
            pos.stride(0), *fk.stride()[:3], *fv.stride()[:3], fpos.stride(0))  # fmt: skip


def _as_words(codes: torch.Tensor) -> torch.Tensor:
    """A uint8 code tensor (rows of whole 4-byte words, last dim contiguous) viewed as int32 words.

    Copies only when an outer stride is not a whole number of words.
    """
    if codes.shape[-1] % 4:
        raise ValueError(f"packed rows of {codes.shape[-1]} bytes are not whole int32 words")
    if any(s % 4 for s in codes.stride()[:-1]):
        codes = codes.contiguous()
    return codes.view(torch.int32)
