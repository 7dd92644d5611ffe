"""Decode attention, one program per *head group*: ``decode_attention(kernel="group")``.

Same storage layout, arguments and result as :mod:`rkv_convert.kernels.decode_attention`
(read its module docstring first). This kernel covers the common case: a Kronecker-factored
key rotation ``R = kron(A [G, G], B [d, d])`` (every power-of-two Sylvester Hadamard rotation,
e.g. the paper's ``512 = H_4 ⊗ H_128``), one to four key groups per head group and one to four
value groups per head. What it changes against one program per KV head (on an H100 neither
kernel is faster everywhere; docs/benchmarks.md has the side-by-side rows and the reason: both
are instruction-issue-bound, at a similar count of instructions per key token and head):

- **Each key code is unpacked and dequantized once**, not once per head of its group: a
  program owns all ``G`` KV heads of one head group (and their ``G*rep`` query heads). Per
  plane ``j`` the ``G`` chunks' dequantized tiles ``y_g`` are combined into each head's
  ``z_h = Σ_g A[h, g] y_g`` (elementwise) and multiplied by ``B^T``'s plane-``j`` rows
  (``d*d`` tensor-core MACs per key token and head, as before).
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

from ._common import next_pow2
from ._decode_parts import _byte_tiles, _cos_sin, _group_rows, _plane_codes, _select_groups, _softmax_step

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
def _key_plane(krow, tmask, ii, gid_ptr, g: tl.constexpr, j: tl.constexpr,
               s0, s1, s2, s3, z0, z1, z2, z3,
               D: tl.constexpr, GD: tl.constexpr, K_BITS: tl.constexpr, NGK: tl.constexpr):
    """Dequantized ``fp32 [BLOCK_T, d/4]``: plane ``j`` of chunk ``g`` of the rotated key row."""
    K_LOB: tl.constexpr = 4 if K_BITS == 4 else 2
    lo0 = g * D * K_LOB // 8
    hi0 = GD // 4 + g * D // 8
    blo, bhi = _byte_tiles(krow, tmask, ii, lo0, hi0, K_BITS)
    c = _as_float(_plane_codes(krow, tmask, ii, j, lo0, hi0, blo, bhi, K_BITS))
    if NGK == 1:
        return c * s0[:, None] + z0[:, None]
    gid = tl.load(gid_ptr + g * D + j * (D // 4) + ii)
    return c * _select_groups(gid, s0, s1, s2, s3, NGK) + _select_groups(gid, z0, z1, z2, z3, NGK)


@triton.jit
def _head_keys(a_ptr, h: tl.constexpr, y0, y1, y2, y3, bl, bh, kl, kh,
               G: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """Head ``h``'s share of one plane: ``z = Σ_g A[h, g] y_g``, then ``k += z @ B^T`` (two halves)."""
    if G == 1:
        z = y0
    else:
        z = tl.load(a_ptr + h * G) * y0 + tl.load(a_ptr + h * G + 1) * y1
        if G > 2:
            z = z + tl.load(a_ptr + h * G + 2) * y2
        if G > 3:
            z = z + tl.load(a_ptr + h * G + 3) * y3
    z = z.to(DT)
    return tl.dot(z, bl, kl, input_precision=PREC), tl.dot(z, bh, kh, input_precision=PREC)


@triton.jit
def _head_scores(s, h: tl.constexpr, k_lo, k_hi, cos, sin, q_lo, q_hi, qhead, DT: tl.constexpr, PREC: tl.constexpr):
    """Put head ``h``'s scores (RoPE'd pre-RoPE key halves against its query rows) into its columns of ``s``."""
    r_lo = (k_lo * cos - k_hi * sin).to(DT)
    r_hi = (k_hi * cos + k_lo * sin).to(DT)
    sh = tl.dot(r_lo, tl.trans(q_lo), input_precision=PREC)
    sh = tl.dot(r_hi, tl.trans(q_hi), sh, input_precision=PREC)
    return tl.where(qhead[None, :] == h, sh, s)


@triton.jit
def _value_planes(vrow, tmask, ii, valid, ph, vs_row, vz_row, acc0, acc1, acc2, acc3, accz,
                  PW: tl.constexpr, V_BITS: tl.constexpr, GV: tl.constexpr, NGV: tl.constexpr, DT: tl.constexpr,
                  PREC: tl.constexpr):
    """Add one KV head's ``ph^T @ v`` (``ph [BLOCK_T, QP]``: weights of its query columns, others 0)."""
    vlo, vhi = _byte_tiles(vrow, tmask, ii, 0, PW, V_BITS)
    if NGV == 1:  # fold: (p ⊙ s) · codes + Σ p z
        vs = tl.load(vs_row, mask=valid, other=0.0).to(tl.float32)
        vz = tl.load(vz_row, mask=valid, other=0.0).to(tl.float32)
        accz = accz + tl.sum(ph * vz[:, None], 0)
        pt = tl.trans((ph * vs[:, None]).to(DT))
        acc0 = tl.dot(pt, _as_float(_plane_codes(vrow, tmask, ii, 0, 0, PW, vlo, vhi, V_BITS)).to(DT),
                      acc0, input_precision=PREC)
        acc1 = tl.dot(pt, _as_float(_plane_codes(vrow, tmask, ii, 1, 0, PW, vlo, vhi, V_BITS)).to(DT),
                      acc1, input_precision=PREC)
        acc2 = tl.dot(pt, _as_float(_plane_codes(vrow, tmask, ii, 2, 0, PW, vlo, vhi, V_BITS)).to(DT),
                      acc2, input_precision=PREC)
        acc3 = tl.dot(pt, _as_float(_plane_codes(vrow, tmask, ii, 3, 0, PW, vlo, vhi, V_BITS)).to(DT),
                      acc3, input_precision=PREC)
    else:  # per-channel scale/zero by selects on the channel's value group (4i + j) // GV
        s0, s1, s2, s3 = _group_rows(vs_row, valid, NGV)
        z0, z1, z2, z3 = _group_rows(vz_row, valid, NGV)
        pt = tl.trans(ph.to(DT))
        for j in tl.static_range(4):
            gidv = (4 * ii + j) // GV
            c = _as_float(_plane_codes(vrow, tmask, ii, j, 0, PW, vlo, vhi, V_BITS))
            v = c * _select_groups(gidv, s0, s1, s2, s3, NGV) + _select_groups(gidv, z0, z1, z2, z3, NGV)
            v = tl.where(valid[:, None], v, 0.0).to(DT)
            if j == 0:
                acc0 = tl.dot(pt, v, acc0, input_precision=PREC)
            elif j == 1:
                acc1 = tl.dot(pt, v, acc1, input_precision=PREC)
            elif j == 2:
                acc2 = tl.dot(pt, v, acc2, input_precision=PREC)
            else:
                acc3 = tl.dot(pt, v, acc3, input_precision=PREC)
    return acc0, acc1, acc2, acc3, accz


@triton.jit
def _fp_values(v_row, valid, ph, acc0, acc1, acc2, acc3, DT: tl.constexpr, PREC: tl.constexpr):
    """Add ``ph^T @ v`` for full-precision value rows (``v_row``: pointers to channel ``4i`` of each row).

    Rows of empty slots load as zeros: they may hold garbage (NaN), and ``0 * NaN`` would poison the dot.
    """
    pt = tl.trans(ph.to(DT))
    m = valid[:, None]
    acc0 = tl.dot(pt, tl.load(v_row, mask=m, other=0.0).to(DT), acc0, input_precision=PREC)
    acc1 = tl.dot(pt, tl.load(v_row + 1, mask=m, other=0.0).to(DT), acc1, input_precision=PREC)
    acc2 = tl.dot(pt, tl.load(v_row + 2, mask=m, other=0.0).to(DT), acc2, input_precision=PREC)
    acc3 = tl.dot(pt, tl.load(v_row + 3, mask=m, other=0.0).to(DT), acc3, input_precision=PREC)
    return acc0, acc1, acc2, acc3


@triton.jit
def _group_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, pos_ptr,
    a_ptr, btp_ptr, mean_ptr, gidp_ptr, freq_ptr, fk_ptr, fv_ptr, fpos_ptr, o_ptr, lse_ptr,
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

    ``a fp32 [G, G]`` and ``btp [d, d]`` (``B^T``, rows in plane order) are the rotation's
    factors; ``gidp [n_hg, Gd]`` the key group of each rotated channel, in plane order.
    """
    b = tl.program_id(0).to(tl.int64)
    hg = tl.program_id(1)
    split = tl.program_id(2)
    GD: tl.constexpr = G * D
    HALF: tl.constexpr = D // 2
    PW: tl.constexpr = D // 4

    qi = tl.arange(0, QP)
    qmask = qi < G * REP
    qhead = qi // REP  # head of the group each score column belongs to
    c = tl.arange(0, HALF)
    ii = tl.arange(0, PW)
    q_row = q_ptr + b * s_qb + (hg * G * REP + qi)[:, None] * s_qh
    q_lo = tl.load(q_row + c[None, :], mask=qmask[:, None], other=0.0).to(DT)
    q_hi = tl.load(q_row + HALF + c[None, :], mask=qmask[:, None], other=0.0).to(DT)
    freq = tl.load(freq_ptr + c)
    mean_base = mean_ptr + hg * GD
    gid_base = gidp_ptr + hg * GD

    m_i = tl.full((QP,), -1.0e30, tl.float32)
    l_i = tl.zeros((QP,), tl.float32)
    acc0 = tl.zeros((QP, PW), tl.float32)
    acc1 = tl.zeros((QP, PW), tl.float32)
    acc2 = tl.zeros((QP, PW), tl.float32)
    acc3 = tl.zeros((QP, PW), tl.float32)
    accz = tl.zeros((QP,), tl.float32)

    t_start = split * tokens_per_split
    t_stop = tl.minimum(T, t_start + tokens_per_split)
    kc_base = kc_ptr + b * s_kcb + hg * s_kch
    ks_base = ks_ptr + b * s_ksb + hg * s_ksh
    kz_base = kz_ptr + b * s_kzb + hg * s_kzh
    bt_base = btp_ptr + ii[:, None] * D + c[None, :]
    for t0 in range(t_start, t_stop, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < t_stop
        tt = t.to(tl.int64)
        p_t = tl.load(pos_ptr + b * s_pb + tt, mask=tmask, other=-1)
        valid = tmask & (p_t >= 0)
        cos, sin = _cos_sin(p_t.to(tl.float32)[:, None] * freq[None, :], USE_LIBDEVICE)
        cos = cos * rope_scaling
        sin = sin * rope_scaling
        s0, s1, s2, s3 = _group_rows(ks_base + tt * s_kst, valid, NGK)
        z0, z1, z2, z3 = _group_rows(kz_base + tt * s_kzt, valid, NGK)
        krow = kc_base + tt * s_kct
        k0l = tl.zeros((BLOCK_T, HALF), tl.float32)
        k0h = tl.zeros((BLOCK_T, HALF), tl.float32)
        if G > 1:
            k1l = tl.zeros((BLOCK_T, HALF), tl.float32)
            k1h = tl.zeros((BLOCK_T, HALF), tl.float32)
        if G > 2:
            k2l = tl.zeros((BLOCK_T, HALF), tl.float32)
            k2h = tl.zeros((BLOCK_T, HALF), tl.float32)
        if G > 3:
            k3l = tl.zeros((BLOCK_T, HALF), tl.float32)
            k3h = tl.zeros((BLOCK_T, HALF), tl.float32)
        for j in tl.static_range(4):
            bl = tl.load(bt_base + j * PW * D)
            bh = tl.load(bt_base + j * PW * D + HALF)
            y0 = _key_plane(krow, tmask, ii, gid_base, 0, j, s0, s1, s2, s3, z0, z1, z2, z3, D, GD, K_BITS, NGK)
            y1 = y0
            y2 = y0
            y3 = y0
            if G > 1:
                y1 = _key_plane(krow, tmask, ii, gid_base, 1, j, s0, s1, s2, s3, z0, z1, z2, z3, D, GD, K_BITS, NGK)
            if G > 2:
                y2 = _key_plane(krow, tmask, ii, gid_base, 2, j, s0, s1, s2, s3, z0, z1, z2, z3, D, GD, K_BITS, NGK)
            if G > 3:
                y3 = _key_plane(krow, tmask, ii, gid_base, 3, j, s0, s1, s2, s3, z0, z1, z2, z3, D, GD, K_BITS, NGK)
            k0l, k0h = _head_keys(a_ptr, 0, y0, y1, y2, y3, bl, bh, k0l, k0h, G, DT, PREC)
            if G > 1:
                k1l, k1h = _head_keys(a_ptr, 1, y0, y1, y2, y3, bl, bh, k1l, k1h, G, DT, PREC)
            if G > 2:
                k2l, k2h = _head_keys(a_ptr, 2, y0, y1, y2, y3, bl, bh, k2l, k2h, G, DT, PREC)
            if G > 3:
                k3l, k3h = _head_keys(a_ptr, 3, y0, y1, y2, y3, bl, bh, k3l, k3h, G, DT, PREC)
        s = tl.zeros((BLOCK_T, QP), tl.float32)
        s = _head_scores(s, 0, k0l + tl.load(mean_base + c)[None, :], k0h + tl.load(mean_base + HALF + c)[None, :],
                         cos, sin, q_lo, q_hi, qhead, DT, PREC)
        if G > 1:
            s = _head_scores(s, 1, k1l + tl.load(mean_base + D + c)[None, :],
                             k1h + tl.load(mean_base + D + HALF + c)[None, :], cos, sin, q_lo, q_hi, qhead, DT, PREC)
        if G > 2:
            s = _head_scores(s, 2, k2l + tl.load(mean_base + 2 * D + c)[None, :],
                             k2h + tl.load(mean_base + 2 * D + HALF + c)[None, :], cos, sin, q_lo, q_hi, qhead, DT,
                             PREC)
        if G > 3:
            s = _head_scores(s, 3, k3l + tl.load(mean_base + 3 * D + c)[None, :],
                             k3h + tl.load(mean_base + 3 * D + HALF + c)[None, :], cos, sin, q_lo, q_hi, qhead, DT,
                             PREC)
        s = tl.where(valid[:, None] & qmask[None, :], s * qk_scale, float("-inf"))
        m_i, l_i, alpha, p = _softmax_step(s, m_i, l_i)
        acc0 = acc0 * alpha[:, None]
        acc1 = acc1 * alpha[:, None]
        acc2 = acc2 * alpha[:, None]
        acc3 = acc3 * alpha[:, None]
        accz = accz * alpha
        for h in tl.static_range(G):
            kv = hg * G + h
            ph = tl.where(qhead[None, :] == h, p, 0.0)
            acc0, acc1, acc2, acc3, accz = _value_planes(
                vc_ptr + b * s_vcb + kv * s_vch + tt * s_vct, tmask, ii, valid, ph,
                vs_ptr + b * s_vsb + kv * s_vsh + tt * s_vst, vz_ptr + b * s_vzb + kv * s_vzh + tt * s_vzt,
                acc0, acc1, acc2, acc3, accz, PW, V_BITS, GV, NGV, DT, PREC)

    if HAS_FP:  # the last program index attends to the full-precision segment
        f_stop = tl.where(split == n_splits, F, 0)
        for f0 in range(0, f_stop, BLOCK_T):
            f = f0 + tl.arange(0, BLOCK_T)
            fmask = f < f_stop
            ff = f.to(tl.int64)
            p_t = tl.load(fpos_ptr + b * s_fpb + ff, mask=fmask, other=-1)
            valid = fmask & (p_t >= 0)
            cos, sin = _cos_sin(p_t.to(tl.float32)[:, None] * freq[None, :], USE_LIBDEVICE)
            cos = cos * rope_scaling
            sin = sin * rope_scaling
            s = tl.zeros((BLOCK_T, QP), tl.float32)
            for h in tl.static_range(G):
                k_row = fk_ptr + b * s_fkb + (hg * G + h) * s_fkh + ff[:, None] * s_fkt
                k_lo = tl.load(k_row + c[None, :], mask=fmask[:, None], other=0.0).to(tl.float32)
                k_hi = tl.load(k_row + HALF + c[None, :], mask=fmask[:, None], other=0.0).to(tl.float32)
                s = _head_scores(s, h, k_lo, k_hi, cos, sin, q_lo, q_hi, qhead, DT, PREC)
            s = tl.where(valid[:, None] & qmask[None, :], s * qk_scale, float("-inf"))
            m_i, l_i, alpha, p = _softmax_step(s, m_i, l_i)
            acc0 = acc0 * alpha[:, None]
            acc1 = acc1 * alpha[:, None]
            acc2 = acc2 * alpha[:, None]
            acc3 = acc3 * alpha[:, None]
            accz = accz * alpha
            for h in tl.static_range(G):
                ph = tl.where(qhead[None, :] == h, p, 0.0)
                v_row = fv_ptr + b * s_fvb + (hg * G + h) * s_fvh + ff[:, None] * s_fvt + 4 * ii[None, :]
                acc0, acc1, acc2, acc3 = _fp_values(v_row, valid, ph, acc0, acc1, acc2, acc3, DT, PREC)

    has = l_i > 0.0
    inv_l = 1.0 / tl.where(has, l_i, 1.0)
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    row = (b * n_q + hg * G * REP + qi) * n_parts + split  # [B, n_q, n_parts]
    o_row = o_ptr + row[:, None] * D + 4 * ii[None, :]
    tl.store(o_row, (acc0 + accz[:, None]) * inv_l[:, None], mask=qmask[:, None])
    tl.store(o_row + 1, (acc1 + accz[:, None]) * inv_l[:, None], mask=qmask[:, None])
    tl.store(o_row + 2, (acc2 + accz[:, None]) * inv_l[:, None], mask=qmask[:, None])
    tl.store(o_row + 3, (acc3 + accz[:, None]) * inv_l[:, None], mask=qmask[:, None])
    tl.store(lse_ptr + row, lse, mask=qmask)


def launch_group_kernel(
    q: torch.Tensor,
    cache: tuple[torch.Tensor, ...],
    fp: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    a: torch.Tensor,
    btp: torch.Tensor,
    mean: torch.Tensor,
    gidp: torch.Tensor,
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
) -> None:
    """Launch :func:`_group_kernel` over ``(B, n_hg, n_parts)``; arguments prepared by ``decode_attention``."""
    k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos = cache
    fk, fv, fpos = fp
    B, n_q, d, G, n_hg, rep, T, F = (dims[k] for k in ("B", "n_q", "d", "G", "n_hg", "rep", "T", "F"))
    n_parts = o_part.shape[2]
    _group_kernel[(B, n_hg, n_parts)](
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos,
        a, btp, mean, gidp, freq, fk, fv, fpos, o_part, lse_part,
        q.stride(0), q.stride(1),
        *k_codes.stride()[:3], *k_scale.stride()[:3], *k_zero.stride()[:3],
        *v_codes.stride()[:3], *v_scale.stride()[:3], *v_zero.stride()[:3],
        pos.stride(0), *fk.stride()[:3], *fv.stride()[:3], fpos.stride(0),
        T, F, tokens_per_split, num_splits, n_parts, n_q, qk_scale, rope_scaling,
        D=d, G=G, REP=rep, QP=max(16, next_pow2(G * rep)),
        K_BITS=k_bits, V_BITS=v_bits, NGK=n_gk, GV=v_group_size, NGV=d // v_group_size,
        BLOCK_T=block_t, HAS_FP=has_fp, DT=tl.float16 if dot_dtype == torch.float16 else tl.float32,
        PREC=precision, USE_LIBDEVICE=use_libdevice,
        num_warps=num_warps, num_stages=num_stages,
    )
