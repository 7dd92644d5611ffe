"""Decode attention over a packed RotateKV cache: one new query token per sequence.

Storage layout of one decoder layer (``B`` batch, ``n_kv`` KV heads of ``d`` channels,
head groups of ``G`` consecutive heads, ``Gd = G*d``, ``n_hg = n_kv/G``; bits ``b_k, b_v``;
groups ``g_k`` (divides ``Gd``) and ``g_v`` (divides ``d``); codes packed with
:func:`rkv_convert.quant.packing.pack_codes`):

- ``k_codes uint8 [B, n_hg, T, Gd*b_k/8]``: codes of the centred, rotated pre-RoPE key
  ``y = (k - mean) @ R`` of each head group, in *rotated* channel order (never permuted).
- ``k_scale, k_zero fp16 [B, n_hg, T, Gd/g_k]``; ``k_gid int32 [n_hg, Gd]``: group of each
  rotated channel (from the calibrated permutation; see ``quantize_pack.group_ids_from_perm``).
- ``k_mean fp32 [n_kv*d]``, ``rotation fp32 [Gd, Gd]`` orthonormal (any size, e.g. 192).
  Decode: ``k = ŷ @ R.T + mean``, then RoPE at the key's own position.
- ``v_codes uint8 [B, n_kv, T, d*b_v/8]``, ``v_scale, v_zero fp16 [B, n_kv, T, d/g_v]``:
  values as stored (already rotated by the exported weights), groups of consecutive channels.
- ``pos int32 [B, T]``: RoPE position of each slot, ``-1`` = empty (zero attention weight).
- Full-precision segment (sinks + recent window): ``fp_k [B, n_kv, F, d]`` *pre-RoPE*
  original keys (not centred, not rotated), ``fp_v [B, n_kv, F, d]``, ``fp_pos int32 [B, F]``
  (``-1`` = empty); fp16/bf16/fp32.
- RoPE: Llama ``rotate_half`` convention (channel ``i`` pairs with ``i + d/2``), angle
  ``pos * inv_freq[i mod d/2]`` (``inv_freq fp32 [d/2]``), cos/sin times ``attention_scaling``,
  computed in fp32 from each key's position.

``q [B, n_q, d]`` is post-RoPE, ``n_q = n_kv * rep`` (query head ``i`` reads KV head
``i // rep``, as ``repeat_kv``). The output ``[B, n_q, d]`` (dtype of ``q``) is in the rotated
value space: ``softmax(sm_scale * q·k) @ v`` over every valid quantized and fp-segment token.

Kernel: grid ``(B, n_kv, n_splits + has_fp)``. A program owns one KV head and its ``rep``
query heads, and one contiguous split of the quantized tokens (the last program index
holds the fp segment). Per block of ``BLOCK_T`` tokens it unpacks the codes of the head
group's ``Gd`` rotated channels (``G`` chunks of ``d``), dequantizes them with per-channel
scale/zero expanded by an exact one-hot ``tl.dot`` (no gathers), reconstructs the head's
pre-RoPE key with one ``tl.dot`` per chunk against the slice ``R[j*d:(j+1)*d, :]^T``
(split in the two RoPE halves, so RoPE is elementwise on ``(k_lo, k_hi)``), adds the mean,
and runs an online softmax (fp32 ``m, l, acc``) with P@V on dequantized values. A second
small kernel merges the splits by log-sum-exp. Accumulation is fp32 everywhere; dot
operands are fp16 for fp16 queries, IEEE fp32 for fp32 queries, and TF32 (fp32 operands,
10-bit mantissa, more precise than bf16) for bf16 queries: Triton's CPU interpreter (3.9)
computes bf16 dots wrongly, and one dot type per path keeps the tested code the shipped code.

Compared with one program per head group, one program per KV head re-reads and unpacks the
head group's key codes ``G`` times (from cache) but keeps every tile at ``d`` channels
(no padding of ``Gd = 192`` to 256, no masking of other heads).

Dispatch (see :mod:`rkv_convert.kernels._common`): ``backend="auto"`` runs the kernel on
CUDA tensors or under ``TRITON_INTERPRET=1``, else :func:`decode_attention_ref`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from rkv_convert.quant.packing import packed_width, unpack_codes

from ._common import Backend, next_pow2, resolve_backend, triton_interpreting

__all__ = ["decode_attention", "decode_attention_ref", "num_splits_for"]

_LOG2E = 1.0 / math.log(2.0)


def _dims(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    pos: torch.Tensor,
    rotation: torch.Tensor,
    k_mean: torch.Tensor,
    k_gid: torch.Tensor,
    inv_freq: torch.Tensor,
    k_bits: int,
    v_bits: int,
    k_group_size: int,
    v_group_size: int,
    fp_k: torch.Tensor | None,
    fp_v: torch.Tensor | None,
    fp_pos: torch.Tensor | None,
) -> dict[str, int]:
    """Validate shapes against the storage layout; return the dimensions."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, n_q, d], got {tuple(q.shape)}")
    B, n_q, d = q.shape
    if d % 2:
        raise ValueError(f"head dim must be even, got {d}")
    Gd = rotation.shape[0]
    if rotation.dim() != 2 or rotation.shape[1] != Gd or Gd % d:
        raise ValueError(f"rotation must be [G*d, G*d] with d={d}, got {tuple(rotation.shape)}")
    G = Gd // d
    if k_codes.dim() != 4 or k_codes.shape[0] != B:
        raise ValueError(f"k_codes must be [B, n_hg, T, Gd*b/8], got {tuple(k_codes.shape)}")
    n_hg, T = k_codes.shape[1], k_codes.shape[2]
    n_kv = n_hg * G
    if n_q % n_kv:
        raise ValueError(f"{n_q} query heads are not a multiple of {n_kv} KV heads")
    if Gd % k_group_size or d % v_group_size:
        raise ValueError(f"key group {k_group_size} must divide {Gd}, value group {v_group_size} must divide {d}")
    want = {
        "k_codes": (k_codes, (B, n_hg, T, packed_width(Gd, k_bits))),
        "k_scale": (k_scale, (B, n_hg, T, Gd // k_group_size)),
        "k_zero": (k_zero, (B, n_hg, T, Gd // k_group_size)),
        "v_codes": (v_codes, (B, n_kv, T, packed_width(d, v_bits))),
        "v_scale": (v_scale, (B, n_kv, T, d // v_group_size)),
        "v_zero": (v_zero, (B, n_kv, T, d // v_group_size)),
        "pos": (pos, (B, T)),
        "k_mean": (k_mean, (n_kv * d,)),
        "k_gid": (k_gid, (n_hg, Gd)),
        "inv_freq": (inv_freq, (d // 2,)),
    }
    F = 0
    if fp_k is not None or fp_v is not None or fp_pos is not None:
        if fp_k is None or fp_v is None or fp_pos is None:
            raise ValueError("fp_k, fp_v and fp_pos go together")
        F = fp_k.shape[2]
        want.update(fp_k=(fp_k, (B, n_kv, F, d)), fp_v=(fp_v, (B, n_kv, F, d)), fp_pos=(fp_pos, (B, F)))
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    for name in ("k_codes", "v_codes"):
        if want[name][0].dtype != torch.uint8:
            raise ValueError(f"{name} must be uint8")
    for name in ("k_scale", "k_zero", "v_scale", "v_zero"):
        if want[name][0].dtype != torch.float16:
            raise ValueError(f"{name} must be float16")
    return dict(B=B, n_q=n_q, d=d, G=G, Gd=Gd, n_hg=n_hg, n_kv=n_kv, rep=n_q // n_kv, T=T, F=F)


def _rope(k: torch.Tensor, p: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> torch.Tensor:
    """rotate_half RoPE of fp32 ``k [B, H, T, d]`` at positions ``p [B, T]``."""
    ang = p.float()[:, None, :, None] * inv_freq.float()  # [B, 1, T, d/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1) * scaling
    sin = torch.cat([ang.sin(), ang.sin()], -1) * scaling
    half = k.shape[-1] // 2
    rot_half = torch.cat([-k[..., half:], k[..., :half]], -1)
    return k * cos + rot_half * sin


def decode_attention_ref(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    pos: torch.Tensor,
    *,
    rotation: torch.Tensor,
    k_mean: torch.Tensor,
    k_gid: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    sm_scale: float,
    k_bits: int,
    v_bits: int,
    k_group_size: int,
    v_group_size: int,
    fp_k: torch.Tensor | None = None,
    fp_v: torch.Tensor | None = None,
    fp_pos: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Pure-torch reference of :func:`decode_attention` (arguments as there).

    Unpack, dequantize, unrotate, add the mean, RoPE at each key's position, ``repeat_kv``,
    softmax with ``-inf`` for empty slots, matmul with the dequantized values; all in fp32.
    A sequence without any valid token gets zeros (the kernel does the same).
    ``compute_dtype`` (tests only) rounds the matmul operands to a lower precision, as the
    kernel does for fp16/bf16 queries, to measure the error a low-precision computation has.

    Returns:
        ``[B, n_q, d]`` in ``q.dtype``.
    """
    dm = _dims(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos, rotation, k_mean, k_gid,
               inv_freq, k_bits, v_bits, k_group_size, v_group_size, fp_k, fp_v, fp_pos)
    B, d, G, Gd, n_hg, n_kv, rep, T = (dm[k] for k in ("B", "d", "G", "Gd", "n_hg", "n_kv", "rep", "T"))
    cd = compute_dtype

    def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.to(cd) @ b.to(cd)).float()

    codes = unpack_codes(k_codes, k_bits, Gd).float()  # [B, n_hg, T, Gd]
    idx = k_gid.long().to(q.device)[None, :, None, :].expand(B, n_hg, T, Gd)
    y = codes * torch.gather(k_scale.float(), -1, idx) + torch.gather(k_zero.float(), -1, idx)
    k = mm(y, rotation.float().T) + k_mean.float().reshape(n_hg, 1, Gd)
    k = k.reshape(B, n_hg, T, G, d).transpose(2, 3).reshape(B, n_kv, T, d)
    k = _rope(k, pos, inv_freq, attention_scaling)
    vq = unpack_codes(v_codes, v_bits, d).float()
    v = vq * v_scale.float().repeat_interleave(v_group_size, -1) + v_zero.float().repeat_interleave(v_group_size, -1)
    valid = pos >= 0
    if fp_k is not None:
        k = torch.cat([k, _rope(fp_k.float(), fp_pos, inv_freq, attention_scaling)], 2)
        v = torch.cat([v, fp_v.float()], 2)
        valid = torch.cat([valid, fp_pos >= 0], 1)
    v = torch.where(valid[:, None, :, None], v, 0.0)  # empty slots may hold garbage
    k = k.repeat_interleave(rep, 1)  # repeat_kv: query head i reads KV head i // rep
    v = v.repeat_interleave(rep, 1)
    scores = mm(q.float()[:, :, None, :], k.transpose(-1, -2)).squeeze(2) * sm_scale  # [B, n_q, S]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(scores, -1).nan_to_num(0.0)  # a row without any valid token: zeros
    out = mm(p[:, :, None, :], v).squeeze(2)
    return out.to(q.dtype)


@triton.jit
def _unpack(row_ptr, tmask, lo_byte, hi_byte, BITS: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr):
    """Codes ``int32 [BLOCK_T, D]`` of ``D`` consecutive channels from packed rows.

    ``row_ptr [BLOCK_T]`` points at each token's packed row; ``lo_byte`` is the byte of the
    chunk's first channel (2/4 bits; low plane at 3 bits), ``hi_byte`` its high-plane byte.
    """
    if BITS == 4:
        cols = tl.arange(0, D // 2)
        b = tl.load(row_ptr[:, None] + lo_byte + cols[None, :], mask=tmask[:, None], other=0).to(tl.int32)
        c = (b[:, :, None] >> (tl.arange(0, 2) * 4)[None, None, :]) & 15
        codes = tl.reshape(c, (BLOCK_T, D))
    else:
        cols = tl.arange(0, D // 4)
        b = tl.load(row_ptr[:, None] + lo_byte + cols[None, :], mask=tmask[:, None], other=0).to(tl.int32)
        c = (b[:, :, None] >> (tl.arange(0, 4) * 2)[None, None, :]) & 3
        codes = tl.reshape(c, (BLOCK_T, D))
        if BITS == 3:
            hcols = tl.arange(0, D // 8)
            hb = tl.load(row_ptr[:, None] + hi_byte + hcols[None, :], mask=tmask[:, None], other=0).to(tl.int32)
            h = (hb[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
            codes = codes | (tl.reshape(h, (BLOCK_T, D)) << 2)
    return codes


@triton.jit
def _expand_groups(sz_row_ptr, tmask, onehot, NG: tl.constexpr, NG_PAD: tl.constexpr):
    """Per-channel fp32 ``[BLOCK_T, D]`` from per-group fp16 ``[BLOCK_T, NG]`` rows (exact one-hot dot)."""
    g = tl.arange(0, NG_PAD)
    s = tl.load(sz_row_ptr[:, None] + g[None, :], mask=tmask[:, None] & (g[None, :] < NG), other=0.0)
    return tl.dot(s, onehot)


@triton.jit
def _attend(
    k_lo, k_hi, v, p_t, valid, q_lo, q_hi, freq, rope_scaling, qk_scale, m_i, l_i, acc,
    PREC: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
):
    """RoPE the pre-RoPE key halves ``[BLOCK_T, D/2]`` at ``p_t``, score, online-softmax update."""
    ang = p_t.to(tl.float32)[:, None] * freq[None, :]
    if USE_LIBDEVICE:
        cos = libdevice.cos(ang) * rope_scaling
        sin = libdevice.sin(ang) * rope_scaling
    else:
        cos = tl.cos(ang) * rope_scaling
        sin = tl.sin(ang) * rope_scaling
    r_lo = (k_lo * cos - k_hi * sin).to(q_lo.dtype)
    r_hi = (k_hi * cos + k_lo * sin).to(q_lo.dtype)
    s = tl.dot(r_lo, tl.trans(q_lo), input_precision=PREC)
    s = tl.dot(r_hi, tl.trans(q_hi), s, input_precision=PREC)
    s = tl.where(valid[:, None], s * qk_scale, float("-inf"))  # [BLOCK_T, QP], log2 units
    m_new = tl.maximum(m_i, tl.max(s, 0))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[None, :])
    l_i = l_i * alpha + tl.sum(p, 0)
    v = tl.where(valid[:, None], v, 0.0).to(q_lo.dtype)
    acc = tl.dot(tl.trans(p.to(q_lo.dtype)), v, acc * alpha[:, None], input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, pos_ptr,
    rot_ptr, mean_ptr, gid_ptr, freq_ptr, fk_ptr, fv_ptr, fpos_ptr, o_ptr, lse_ptr,
    s_qb, s_qh,
    s_kcb, s_kch, s_kct, s_ksb, s_ksh, s_kst, s_kzb, s_kzh, s_kzt,
    s_vcb, s_vch, s_vct, s_vsb, s_vsh, s_vst, s_vzb, s_vzh, s_vzt,
    s_pb, s_fkb, s_fkh, s_fkt, s_fvb, s_fvh, s_fvt, s_fpb,
    T, F, tokens_per_split, n_splits, n_parts, qk_scale, rope_scaling,
    D: tl.constexpr, G: tl.constexpr, REP: tl.constexpr, QP: tl.constexpr,
    K_BITS: tl.constexpr, K_LO_BITS: tl.constexpr, V_BITS: tl.constexpr, NGK: tl.constexpr, NGK_PAD: tl.constexpr,
    GV: tl.constexpr, NGV: tl.constexpr, NGV_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, HAS_FP: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    split = tl.program_id(2)
    hg = h // G
    j = h % G
    GD: tl.constexpr = G * D
    HALF: tl.constexpr = D // 2

    qi = tl.arange(0, QP)
    qmask = qi < REP
    c = tl.arange(0, HALF)
    dd = tl.arange(0, D)
    q_row = q_ptr + b * s_qb + (h * REP + qi)[:, None] * s_qh
    q_lo = tl.load(q_row + c[None, :], mask=qmask[:, None], other=0.0)
    q_hi = tl.load(q_row + HALF + c[None, :], mask=qmask[:, None], other=0.0)
    dt: tl.constexpr = DOT_DTYPE
    q_lo = q_lo.to(dt)
    q_hi = q_hi.to(dt)
    freq = tl.load(freq_ptr + c)
    mean_lo = tl.load(mean_ptr + h * D + c)
    mean_hi = tl.load(mean_ptr + h * D + HALF + c)
    # one-hot expansion of per-group scale/zero: [NG_PAD, D] fp16, exact in an fp32 dot
    onehot_v = ((dd[None, :] // GV) == tl.arange(0, NGV_PAD)[:, None]).to(tl.float16)
    rr = tl.arange(0, D)
    if G == 1:  # rotation slices are loop-invariant: load them once
        rt_lo0 = tl.load(rot_ptr + c[None, :] * GD + rr[:, None]).to(dt)
        rt_hi0 = tl.load(rot_ptr + (HALF + c)[None, :] * GD + rr[:, None]).to(dt)
        onehot_k0 = (tl.load(gid_ptr + hg * GD + dd)[None, :] == tl.arange(0, NGK_PAD)[:, None]).to(tl.float16)

    m_i = tl.full((QP,), -1.0e30, tl.float32)
    l_i = tl.zeros((QP,), tl.float32)
    acc = tl.zeros((QP, D), tl.float32)

    # quantized tokens of this split (none for the fp-segment program)
    t_start = split * tokens_per_split
    t_stop = tl.minimum(T, t_start + tokens_per_split)
    kc_base = kc_ptr + b * s_kcb + hg * s_kch
    ks_base = ks_ptr + b * s_ksb + hg * s_ksh
    kz_base = kz_ptr + b * s_kzb + hg * s_kzh
    vc_base = vc_ptr + b * s_vcb + h * s_vch
    vs_base = vs_ptr + b * s_vsb + h * s_vsh
    vz_base = vz_ptr + b * s_vzb + h * s_vzh
    for t0 in range(t_start, t_stop, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < t_stop
        tt = t.to(tl.int64)
        p_t = tl.load(pos_ptr + b * s_pb + tt, mask=tmask, other=-1)
        valid = tmask & (p_t >= 0)
        k_lo = tl.zeros((BLOCK_T, HALF), tl.float32)
        k_hi = tl.zeros((BLOCK_T, HALF), tl.float32)
        for i in tl.static_range(G):
            if G == 1:
                rt_lo = rt_lo0
                rt_hi = rt_hi0
                onehot_k = onehot_k0
            else:
                rt_lo = tl.load(rot_ptr + (j * D + c)[None, :] * GD + (i * D + rr)[:, None]).to(dt)
                rt_hi = tl.load(rot_ptr + (j * D + HALF + c)[None, :] * GD + (i * D + rr)[:, None]).to(dt)
                gids = tl.load(gid_ptr + hg * GD + i * D + dd)
                onehot_k = (gids[None, :] == tl.arange(0, NGK_PAD)[:, None]).to(tl.float16)
            codes = _unpack(kc_base + tt * s_kct, tmask, i * D * K_LO_BITS // 8,
                            GD // 4 + i * D // 8, K_BITS, D, BLOCK_T)
            sc = _expand_groups(ks_base + tt * s_kst, tmask, onehot_k, NGK, NGK_PAD)
            zc = _expand_groups(kz_base + tt * s_kzt, tmask, onehot_k, NGK, NGK_PAD)
            y = (codes.to(tl.float32) * sc + zc).to(dt)
            k_lo = tl.dot(y, rt_lo, k_lo, input_precision=PREC)
            k_hi = tl.dot(y, rt_hi, k_hi, input_precision=PREC)
        k_lo = k_lo + mean_lo[None, :]
        k_hi = k_hi + mean_hi[None, :]
        vcodes = _unpack(vc_base + tt * s_vct, tmask, 0, D // 4, V_BITS, D, BLOCK_T)
        vsc = _expand_groups(vs_base + tt * s_vst, tmask, onehot_v, NGV, NGV_PAD)
        vzc = _expand_groups(vz_base + tt * s_vzt, tmask, onehot_v, NGV, NGV_PAD)
        v = vcodes.to(tl.float32) * vsc + vzc
        m_i, l_i, acc = _attend(k_lo, k_hi, v, p_t, valid, q_lo, q_hi, freq, rope_scaling, qk_scale,
                                m_i, l_i, acc, PREC, USE_LIBDEVICE)

    if HAS_FP:  # the last program index attends to the full-precision segment
        f_stop = tl.where(split == n_splits, F, 0)
        fk_base = fk_ptr + b * s_fkb + h * s_fkh
        fv_base = fv_ptr + b * s_fvb + h * s_fvh
        for f0 in range(0, f_stop, BLOCK_T):
            f = f0 + tl.arange(0, BLOCK_T)
            fmask = f < f_stop
            ff = f.to(tl.int64)
            p_t = tl.load(fpos_ptr + b * s_fpb + ff, mask=fmask, other=-1)
            valid = fmask & (p_t >= 0)
            k_row = fk_base + ff[:, None] * s_fkt
            k_lo = tl.load(k_row + c[None, :], mask=fmask[:, None], other=0.0).to(tl.float32)
            k_hi = tl.load(k_row + HALF + c[None, :], mask=fmask[:, None], other=0.0).to(tl.float32)
            v = tl.load(fv_base + ff[:, None] * s_fvt + dd[None, :], mask=fmask[:, None], other=0.0).to(tl.float32)
            m_i, l_i, acc = _attend(k_lo, k_hi, v, p_t, valid, q_lo, q_hi, freq, rope_scaling, qk_scale,
                                    m_i, l_i, acc, PREC, USE_LIBDEVICE)

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    row = (b * (tl.num_programs(1) * REP) + h * REP + qi) * n_parts + split  # [B, n_q, n_parts]
    tl.store(o_ptr + row[:, None] * D + dd[None, :], out, mask=qmask[:, None])
    tl.store(lse_ptr + row, lse, mask=qmask)


@triton.jit
def _merge_kernel(o_ptr, lse_ptr, out_ptr, n_parts, D: tl.constexpr, P_PAD: tl.constexpr):
    """Log-sum-exp merge of ``n_parts`` partial outputs of one (batch, query head)."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, P_PAD)
    smask = s < n_parts
    dd = tl.arange(0, D)
    lse = tl.load(lse_ptr + row * n_parts + s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    o = tl.load(o_ptr + (row * n_parts + s)[:, None] * D + dd[None, :], mask=smask[:, None], other=0.0)
    den = tl.sum(w, 0)
    res = tl.sum(w[:, None] * o, 0) / tl.where(den > 0.0, den, 1.0)  # no valid token at all: zeros
    tl.store(out_ptr + row * D + dd, res.to(out_ptr.dtype.element_ty))


def num_splits_for(batch: int, n_kv: int, T: int, block_t: int, device: torch.device) -> int:
    """Context splits so that ``batch * n_kv * splits`` programs fill about two per SM."""
    n_blocks = triton.cdiv(T, block_t)
    if n_blocks == 0:
        return 0
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    splits = max(1, min(n_blocks, triton.cdiv(2 * sms, batch * n_kv)))
    return triton.cdiv(n_blocks, triton.cdiv(n_blocks, splits))  # no empty splits


def decode_attention(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    pos: torch.Tensor,
    *,
    rotation: torch.Tensor,
    k_mean: torch.Tensor,
    k_gid: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    sm_scale: float,
    k_bits: int,
    v_bits: int,
    k_group_size: int,
    v_group_size: int,
    fp_k: torch.Tensor | None = None,
    fp_v: torch.Tensor | None = None,
    fp_pos: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_t: int = 64,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Attention of one new query token per sequence over the packed cache (module docstring).

    Args:
        q: ``[B, n_q, d]`` post-RoPE queries, fp16/bf16/fp32; ``d`` a power of two >= 32.
        k_codes: uint8 ``[B, n_hg, T, Gd*k_bits/8]``; k_scale, k_zero: fp16 ``[B, n_hg, T, Gd/k_group_size]``.
        v_codes: uint8 ``[B, n_kv, T, d*v_bits/8]``; v_scale, v_zero: fp16 ``[B, n_kv, T, d/v_group_size]``.
        pos: int32 ``[B, T]`` RoPE positions, -1 = empty slot.
        rotation: fp32 ``[Gd, Gd]``; k_mean: fp32 ``[n_kv*d]``; k_gid: int32 ``[n_hg, Gd]``.
        inv_freq: fp32 ``[d/2]``; attention_scaling: cos/sin factor; sm_scale: score factor.
        k_bits, v_bits: 2, 3 or 4; k_group_size, v_group_size: channels per group.
        fp_k, fp_v: ``[B, n_kv, F, d]`` full-precision segment (pre-RoPE keys, stored values);
            fp_pos: int32 ``[B, F]`` (-1 = empty). All three or none.
        num_splits: context splits of the quantized tokens (None: about two programs per SM).
        block_t: tokens per inner step of the kernel (power of two >= 16).
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (see ``_common``).

    Returns:
        ``[B, n_q, d]`` in ``q.dtype`` (rotated value space).
    """
    kw = dict(rotation=rotation, k_mean=k_mean, k_gid=k_gid, inv_freq=inv_freq,
              attention_scaling=attention_scaling, sm_scale=sm_scale, k_bits=k_bits, v_bits=v_bits,
              k_group_size=k_group_size, v_group_size=v_group_size, fp_k=fp_k, fp_v=fp_v, fp_pos=fp_pos)
    if not resolve_backend(backend, q):
        return decode_attention_ref(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos, **kw)
    dm = _dims(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos, rotation, k_mean, k_gid,
               inv_freq, k_bits, v_bits, k_group_size, v_group_size, fp_k, fp_v, fp_pos)
    B, n_q, d, G, Gd, n_kv, rep, T, F = (dm[k] for k in ("B", "n_q", "d", "G", "Gd", "n_kv", "rep", "T", "F"))
    if d & (d - 1) or d < 32:
        raise ValueError(f"the Triton kernel needs a power-of-two head dim >= 32, got {d}")
    if block_t & (block_t - 1) or block_t < 16:
        raise ValueError(f"block_t must be a power of two >= 16, got {block_t}")
    dev = q.device
    if num_splits is None:
        num_splits = num_splits_for(B, n_kv, T, block_t, dev)
    num_splits = min(max(num_splits, 1), triton.cdiv(T, block_t)) if T > 0 else 0
    tokens_per_split = triton.cdiv(triton.cdiv(T, block_t), num_splits) * block_t if num_splits else block_t
    has_fp = fp_k is not None
    n_parts = num_splits + int(has_fp)
    if n_parts == 0:
        raise ValueError("nothing to attend to: no quantized tokens and no fp segment")

    def last_dim_contig(t: torch.Tensor) -> torch.Tensor:
        return t if t.stride(-1) == 1 else t.contiguous()

    qc = last_dim_contig(q)
    k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos = map(
        last_dim_contig, (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos))
    f32 = dict(device=dev, dtype=torch.float32)
    rot = rotation.to(**f32).contiguous()
    mean = k_mean.to(**f32).contiguous()
    gid = k_gid.to(device=dev, dtype=torch.int32).contiguous()
    freq = inv_freq.to(**f32).contiguous()
    if has_fp:
        fk, fv, fpos = map(last_dim_contig, (fp_k, fp_v, fp_pos))
    else:
        fk, fv, fpos = qc.new_empty(1, 1, 1, d), qc.new_empty(1, 1, 1, d), pos.new_empty(1, 1)
    o_part = torch.empty(B, n_q, n_parts, d, **f32)
    lse_part = torch.empty(B, n_q, n_parts, **f32)
    n_gk, n_gv = Gd // k_group_size, d // v_group_size
    _decode_kernel[(B, n_kv, n_parts)](
        qc, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos,
        rot, mean, gid, freq, fk, fv, fpos, o_part, lse_part,
        qc.stride(0), qc.stride(1),
        *k_codes.stride()[:3], *k_scale.stride()[:3], *k_zero.stride()[:3],
        *v_codes.stride()[:3], *v_scale.stride()[:3], *v_zero.stride()[:3],
        pos.stride(0), *fk.stride()[:3], *fv.stride()[:3], fpos.stride(0),
        T, F, tokens_per_split, num_splits, n_parts, sm_scale * _LOG2E, float(attention_scaling),
        D=d, G=G, REP=rep, QP=max(16, next_pow2(rep)),
        K_BITS=k_bits, K_LO_BITS=2 if k_bits == 3 else k_bits, V_BITS=v_bits, NGK=n_gk, NGK_PAD=max(16, next_pow2(n_gk)),
        GV=v_group_size, NGV=n_gv, NGV_PAD=max(16, next_pow2(n_gv)),
        BLOCK_T=block_t, HAS_FP=has_fp, DOT_DTYPE=tl.float16 if q.dtype == torch.float16 else tl.float32,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        USE_LIBDEVICE=not triton_interpreting(),
    )
    out = torch.empty(B, n_q, d, device=dev, dtype=q.dtype)
    _merge_kernel[(B * n_q,)](o_part, lse_part, out, n_parts, D=d, P_PAD=max(2, next_pow2(n_parts)))
    return out

