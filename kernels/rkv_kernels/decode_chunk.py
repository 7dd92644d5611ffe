"""Decode attention when each key group is one rotated head chunk: ``decode_attention(kernel="chunk")``.

Same storage layout, arguments and result as :mod:`rkv_convert.kernels.decode_attention` (read
its module docstring first). This kernel covers a Kronecker-factored rotation
``R = kron(A [G, G], B [d, d])`` whose key quantization groups are the ``G`` rotated chunks of
``d`` channels (``k_group_size == d`` and no channel permutation: ``rkv calibrate --permutation
none``), 2- or 4-bit codes and at most four value groups per head.

With one scale ``s_g`` and zero ``z_g`` per token and chunk, the rotated chunk is
``ŷ_g = s_g c_g + z_g 1`` and the head's key ``k_h = Σ_g A[h, g] ŷ_g B^T + μ_h``. RoPE at the
key's position ``R_t`` is linear, so for a query ``q`` of head ``h``

    q · R_t k_h = Σ_g A[h, g] (s_g · q·R_t(c_g B^T) + z_g · q·R_t β) + q·R_t μ_h,    β = 1 B^T.

- ``c_g B^T``: the raw codes meet ``B^T`` in one tensor-core dot (small integers are exact in
  fp16): no per-element dequantization, no per-element scale or zero.
- ``s_g A[h, g]`` and ``z_g A[h, g]`` multiply whole score entries ``[BLOCK_T, QP]``, not key
  elements.
- The zero and mean terms are RoPE'd constant vectors dotted with a query:
  ``q·R_t v = Σ_j cos_j(t) w_j + sin_j(t) w'_j`` with ``w, w'`` computed once per program, so
  per token block they are one dot of the tokens' ``[cos | sin]`` rows.
- Codes are left in place within their byte (:func:`_chunk_parts._field` ``SCALED``): one
  shift per byte instead of per code. Their factor ``2^(bits * (i mod 8/bits))`` is folded into
  the rows of ``B^T`` for keys and divided out of the value accumulator once at the end.

Per key element that leaves the unpack, RoPE and one conversion to the dot dtype. Values: the
value scale goes into the softmax weights and the zero into one running sum per query row,
and the value dot is taken transposed (:func:`_head_values_t`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import device_guard, next_pow2
from .packed_kv import PackedKV
from ._decode_parts import _slot_rope, _softmax_step
from ._chunk_parts import (_as_float, _as_words, _chunk_codes, _dequant_values, _fp_segment, _log2_logits, _store_partial,
                           launch_strides)

__all__ = ["chunk_kernel_supports", "code_column_factors", "keys_grouped_by_chunk", "launch_chunk_kernel"]

_MAX_GROUP_QUERIES = 64  # query heads per head group held in one score tile
_MAX_VALUE_GROUPS = 4  # value groups per head reached by a select chain

def chunk_kernel_supports(*, factored: bool, G: int, rep: int, d: int, k_bits: int, v_bits: int,
                          k_group_size: int, keys_by_chunk: bool, n_gv: int) -> str | None:
    """None if the chunk kernel covers this configuration, else the reason it does not.

    It covers Kronecker-factored rotations of up to four heads per group, at most 64 query heads
    per head group and four value groups per head, at 2 or 4 bits, when the key groups are the
    rotated head chunks.
    """
    if not factored:
        return "the key rotation is not Kronecker-factored (kron(A [G, G], B [d, d]))"
    if G > 4:
        return f"{G} heads per rotation group (the kernel unrolls at most 4)"
    if G * rep > _MAX_GROUP_QUERIES:
        return f"{G * rep} query heads per head group (at most {_MAX_GROUP_QUERIES})"
    if d & (d - 1) or d < 64:
        return f"head dim {d} is not a power of two >= 64"
    if n_gv > _MAX_VALUE_GROUPS:
        return f"{n_gv} value groups per head (at most {_MAX_VALUE_GROUPS})"
    if k_bits not in (2, 4) or v_bits not in (2, 4):
        return f"{k_bits}-bit keys / {v_bits}-bit values (2 or 4 bits only)"
    if k_group_size != d or not keys_by_chunk:
        return ("key groups are not the rotated head chunks (needs key groups of head_dim channels "
                "and no channel permutation: rkv calibrate --permutation none)")
    return None


def keys_grouped_by_chunk(k_gid: torch.Tensor, head_dim: int) -> bool:
    """True if every rotated channel ``c`` of each head group is in key group ``c // head_dim``.

    Reads ``k_gid`` on the host (a device synchronisation when it lives on a GPU).
    """
    gd = k_gid.shape[-1]
    want = torch.arange(gd, device=k_gid.device, dtype=k_gid.dtype) // head_dim
    return bool((k_gid == want).all())


def code_column_factors(bits: int, d: int, device: torch.device) -> torch.Tensor:
    """fp32 ``[d]``: ``2^-(bits * (i mod 8/bits))`` for channel ``i`` (16 or 8 codes per word).

    The factor that turns a code left in place within its byte back into the code.
    """
    per_word, per_byte = 32 // bits, 8 // bits
    i = torch.arange(d, device=device) % per_word % per_byte
    return torch.exp2(-(bits * i).to(torch.float32))


@triton.jit
def _rope_const_weights(q_lo, q_hi, v_lo, v_hi, DT: tl.constexpr):
    """``w, w' [QP, d/2]`` with ``q·R_t v = Σ_j cos_j(t) w_j + sin_j(t) w'_j`` (``v`` broadcast per row or column)."""
    return (q_lo * v_lo + q_hi * v_hi).to(DT), (q_hi * v_lo - q_lo * v_hi).to(DT)


@triton.jit
def _head_values_t(vrow, tmask, valid, ph, vs_row, vz_row, acct, accz,
                   D: tl.constexpr, V_BITS: tl.constexpr, GV: tl.constexpr, NGV: tl.constexpr,
                   BLOCK_T: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """Add one KV head's ``v^T @ ph`` to the transposed accumulator ``acct [D, QP]``.

    Transposed, the dot is ``[D, BLOCK_T] @ [BLOCK_T, QP]``: the large code tile is the first
    operand, which Hopper's tensor cores (wgmma) take from registers (measured 5-8 % faster than
    ``ph^T @ v`` on an H100). One value group: codes left in place within their byte (row ``i`` of
    ``acct`` holds ``2^(V_BITS*(i % (8/V_BITS)))`` times its value), the scale folded into the
    weights and the zero into ``accz``; more groups: dequantized by selects.
    """
    if NGV == 1:
        c = _as_float(_chunk_codes(vrow, tmask, 0, D // 16, D, V_BITS, BLOCK_T, True))
        vs = tl.load(vs_row, mask=valid, other=0.0).to(tl.float32)
        vz = tl.load(vz_row, mask=valid, other=0.0).to(tl.float32)
        accz = accz + tl.sum(ph * vz[:, None], 0)
        acct = tl.dot(tl.trans(c.to(DT)), (ph * vs[:, None]).to(DT), acct, input_precision=PREC)
    else:
        c = _as_float(_chunk_codes(vrow, tmask, 0, D // 16, D, V_BITS, BLOCK_T))
        v = _dequant_values(c, vs_row, vz_row, valid, D, GV, NGV, DT)
        acct = tl.dot(tl.trans(v), ph.to(DT), acct, input_precision=PREC)
    return acct, accz


@triton.jit(do_not_specialize=["T", "F", "n_splits", "n_parts"])  # lengths: one compile for all
def _chunk_kernel(
    q_ptr, kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr, pos_ptr,
    a_ptr, m_ptr, beta_ptr, mean_ptr, vcol_ptr, freq_ptr, fk_ptr, fv_ptr, fpos_ptr, o_ptr, lse_ptr,
    s_qb, s_qh,
    s_kcb, s_kch, s_kct, s_ksb, s_ksh, s_kst, s_kzb, s_kzh, s_kzt,
    s_vcb, s_vch, s_vct, s_vsb, s_vsh, s_vst, s_vzb, s_vzh, s_vzt,
    s_pb, s_fkb, s_fkh, s_fkt, s_fvb, s_fvh, s_fvt, s_fpb,
    T, F, tokens_per_split, n_splits, n_parts, n_q, qk_scale, cap_scale, rope_scaling,
    D: tl.constexpr, G: tl.constexpr, REP: tl.constexpr, QP: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, GV: tl.constexpr, NGV: tl.constexpr,
    BLOCK_T: tl.constexpr, HAS_FP: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Grid ``(B, n_hg, n_parts)``; writes fp32 partial outputs and log2-sum-exp per part.

    Logits: :func:`~._chunk_parts._log2_logits` of the scores (``SOFTCAP``: Gemma 2's soft cap).

    ``m [d, d]`` (dot dtype): ``B^T`` with row ``i`` times ``2^-(K_BITS * (i mod 8/K_BITS))``;
    ``beta fp32 [d]``: ``1 B^T``; ``vcol fp32 [d]``: the value accumulator's column factors.
    """
    b = tl.program_id(0).to(tl.int64)
    hg = tl.program_id(1)
    split = tl.program_id(2)
    HALF: tl.constexpr = D // 2
    PER: tl.constexpr = 32 // K_BITS
    NWC: tl.constexpr = D // PER  # words per chunk

    qi = tl.arange(0, QP)
    qmask = qi < G * REP
    qhead = qi // REP  # head of the group each score column belongs to
    c = tl.arange(0, HALF)
    cc = tl.arange(0, D)
    q_row = q_ptr + b * s_qb + (hg * G * REP + qi)[:, None] * s_qh
    q_lo = tl.load(q_row + c[None, :], mask=qmask[:, None], other=0.0).to(tl.float32)
    q_hi = tl.load(q_row + HALF + c[None, :], mask=qmask[:, None], other=0.0).to(tl.float32)
    freq = tl.load(freq_ptr + c)
    mean_row = mean_ptr + (hg * G + qhead)[:, None] * D
    mu_lo = tl.load(mean_row + c[None, :], mask=qmask[:, None], other=0.0)
    mu_hi = tl.load(mean_row + HALF + c[None, :], mask=qmask[:, None], other=0.0)
    wmc, wms = _rope_const_weights(q_lo, q_hi, mu_lo, mu_hi, DT)
    wbc, wbs = _rope_const_weights(q_lo, q_hi, tl.load(beta_ptr + c)[None, :], tl.load(beta_ptr + HALF + c)[None, :], DT)
    a_row = a_ptr + qhead * G  # A[h, g] of each score column's head h
    a0 = tl.load(a_row, mask=qmask, other=0.0)[None, :]
    a1 = tl.load(a_row + min(1, G - 1), mask=qmask, other=0.0)[None, :]
    a2 = tl.load(a_row + min(2, G - 1), mask=qmask, other=0.0)[None, :]
    a3 = tl.load(a_row + min(3, G - 1), mask=qmask, other=0.0)[None, :]
    qd_lo = q_lo.to(DT)
    qd_hi = q_hi.to(DT)
    m_base = m_ptr + cc[:, None] * D + c[None, :]
    m_lo = tl.load(m_base)
    m_hi = tl.load(m_base + HALF)
    vcol = tl.load(vcol_ptr + cc)

    m_i = tl.full((QP,), -1.0e30, tl.float32)
    l_i = tl.zeros((QP,), tl.float32)
    acct = tl.zeros((D, QP), tl.float32)  # transposed value accumulator (see _head_values_t)
    accz = tl.zeros((QP,), tl.float32)

    t_start = split * tokens_per_split
    t_stop = tl.minimum(T, t_start + tokens_per_split)
    kw_base = kw_ptr + b * s_kcb + hg * s_kch
    ks_base = ks_ptr + b * s_ksb + hg * s_ksh
    kz_base = kz_ptr + b * s_kzb + hg * s_kzh
    for t0 in range(t_start, t_stop, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tt = t.to(tl.int64)
        tmask, valid, cos, sin = _slot_rope(pos_ptr + b * s_pb, t, t_stop, freq, rope_scaling, USE_LIBDEVICE)
        cos_d = cos.to(DT)
        sin_d = sin.to(DT)
        s = tl.dot(sin_d, tl.trans(wms), tl.dot(cos_d, tl.trans(wmc), input_precision=PREC), input_precision=PREC)
        rb = tl.dot(sin_d, tl.trans(wbs), tl.dot(cos_d, tl.trans(wbc), input_precision=PREC), input_precision=PREC)
        krow = kw_base + tt * s_kct
        ks_row = ks_base + tt * s_kst
        kz_row = kz_base + tt * s_kzt
        for g in tl.static_range(G):
            codes = _as_float(_chunk_codes(krow, tmask, g * NWC, 0, D, K_BITS, BLOCK_T, True)).to(DT)
            u_lo = tl.dot(codes, m_lo, input_precision=PREC)
            u_hi = tl.dot(codes, m_hi, input_precision=PREC)
            r_lo = (u_lo * cos - u_hi * sin).to(DT)
            r_hi = (u_hi * cos + u_lo * sin).to(DT)
            sg = tl.dot(r_hi, tl.trans(qd_hi), tl.dot(r_lo, tl.trans(qd_lo), input_precision=PREC), input_precision=PREC)
            scale = tl.load(ks_row + g, mask=valid, other=0.0).to(tl.float32)[:, None]
            zero = tl.load(kz_row + g, mask=valid, other=0.0).to(tl.float32)[:, None]
            if g == 0:
                ag = a0
            elif g == 1:
                ag = a1
            elif g == 2:
                ag = a2
            else:
                ag = a3
            s += (sg * scale + rb * zero) * ag
        s = tl.where(valid[:, None] & qmask[None, :], _log2_logits(s, qk_scale, cap_scale, SOFTCAP), float("-inf"))
        m_i, l_i, alpha, p = _softmax_step(s, m_i, l_i)
        acct = acct * alpha[None, :]
        accz = accz * alpha
        for h in tl.static_range(G):
            kv = hg * G + h
            ph = tl.where(qhead[None, :] == h, p, 0.0)
            acct, accz = _head_values_t(
                vw_ptr + b * s_vcb + kv * s_vch + tt * s_vct, tmask, valid, ph,
                vs_ptr + b * s_vsb + kv * s_vsh + tt * s_vst, vz_ptr + b * s_vzb + kv * s_vzh + tt * s_vzt,
                acct, accz, D, V_BITS, GV, NGV, BLOCK_T, DT, PREC)

    acc = tl.trans(acct) * vcol[None, :]  # true value scale before fp16 values join (no overflow)
    if HAS_FP:  # the last program index attends to the full-precision segment
        m_i, l_i, acc, accz = _fp_segment(
            fk_ptr + b * s_fkb + hg * G * s_fkh, fv_ptr + b * s_fvb + hg * G * s_fvh, fpos_ptr + b * s_fpb,
            s_fkh, s_fkt, s_fvh, s_fvt, tl.where(split == n_splits, F, 0), freq, rope_scaling,
            qd_lo, qd_hi, qhead, qmask, qk_scale, cap_scale, m_i, l_i, acc, accz, 1.0,
            D, G, QP, BLOCK_T, DT, PREC, USE_LIBDEVICE, SOFTCAP)

    _store_partial(o_ptr, lse_ptr, acc + accz[:, None], m_i, l_i, (b * n_q + hg * G * REP + qi) * n_parts + split,
                   qmask, D)


def launch_chunk_kernel(
    q: torch.Tensor,
    kv: PackedKV,
    *,
    a: torch.Tensor,
    m: torch.Tensor,
    beta: torch.Tensor,
    vcol: torch.Tensor,
    mean: torch.Tensor,
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
    qk_scale: float,
    cap_scale: float,
    softcap: bool,
    rope_scaling: float,
    dot_dtype: torch.dtype,
    precision: str,
    use_libdevice: bool,
    block_t: int,
    num_warps: int,
    num_stages: int,
) -> object:
    """Launch :func:`_chunk_kernel` over ``(B, n_hg, n_parts)`` (arguments prepared by ``decode_attention``;
    ``kv`` carries the fp segment, placeholders where the call has none).

    Returns what the launch returns (the compiled kernel on CUDA).

    ``m``: ``B^T`` with rows times :func:`code_column_factors` of ``k_bits`` (dot dtype);
    ``beta``: fp32 ``1 B^T``; ``vcol``: :func:`code_column_factors` of ``v_bits`` when a head has
    one value group, else ones. ``qk_scale``, ``cap_scale``: :func:`~._chunk_parts.logit_scales`;
    ``softcap``: whether the logits are soft-capped.
    """
    kv = kv._replace(k_codes=_as_words(kv.k_codes), v_codes=_as_words(kv.v_codes))
    k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos, fk, fv, fpos = kv
    B, n_q, d, G, n_hg, rep = (dims[k] for k in ("B", "n_q", "d", "G", "n_hg", "rep"))
    T, F = dims["T"], dims["F"]
    n_parts = o_part.shape[2]
    with device_guard(q):  # Triton launches on the current device
        return _chunk_kernel[(B, n_hg, n_parts)](
            q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos,
            a, m, beta, mean, vcol, freq, fk, fv, fpos, o_part, lse_part,
            *launch_strides(q, kv),
            T, F, tokens_per_split, num_splits, n_parts, n_q, qk_scale, cap_scale, rope_scaling,
            D=d, G=G, REP=rep, QP=max(16, next_pow2(G * rep)),
            K_BITS=k_bits, V_BITS=v_bits, GV=v_group_size, NGV=d // v_group_size,
            BLOCK_T=block_t, HAS_FP=has_fp, DT=tl.float16 if dot_dtype == torch.float16 else tl.float32,
            PREC=precision, USE_LIBDEVICE=use_libdevice, SOFTCAP=softcap,
            num_warps=num_warps, num_stages=num_stages,
        )
