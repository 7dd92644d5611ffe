"""Building blocks of the chunk decode kernel (:mod:`rkv_convert.kernels.decode_chunk`).

- Codes are read as int32 words and split into channel order in registers
  (:func:`_words_to_codes`); :func:`_as_float` turns them into floats by the exponent trick
  (``bits(2^23 + c) - 2^23``), not a conversion instruction.
- :func:`_fp_segment`: the online-softmax step over the full-precision segment (pre-RoPE keys
  RoPE'd in the kernel); :func:`_store_partial`: one program's partial output.
- :func:`_log2_logits`: base-2 logits of raw scores, soft-capped or not (both pre-RoPE kernels).
- :func:`launch_strides`: the stride arguments of the pre-RoPE decode kernels, in their order.

(The head-group kernel these were first written for was retired: no default path ran it;
its H100 figures stay in docs/benchmarks.md.)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._decode_parts import _group_rows, _select_groups, _slot_rope, _softmax_step
from .packed_kv import PackedKV

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
def _log2_logits(s, qk_scale, cap_scale, SOFTCAP: tl.constexpr):
    """Base-2 logits of raw scores ``q·k``: ``s * qk_scale`` (``qk_scale = sm_scale * log2 e``), or with a
    soft cap (Gemma 2) ``cap_scale * tanh(s * qk_scale)`` (``qk_scale = sm_scale / cap``,
    ``cap_scale = cap * log2 e``): ``cap * tanh(sm_scale * s / cap)`` in base 2. :func:`logit_scales` gives both."""
    if SOFTCAP:
        out = cap_scale * (1.0 - 2.0 / (tl.exp(2.0 * s * qk_scale) + 1.0))  # tanh, saturating at +-1
    else:
        out = s * qk_scale
    return out


def logit_scales(sm_scale: float, softcap: float | None) -> tuple[float, float]:
    """``(qk_scale, cap_scale)`` of :func:`_log2_logits` for a score factor and an optional soft cap."""
    log2e = 1.0 / math.log(2.0)
    if softcap is None:
        return sm_scale * log2e, 1.0
    if not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")
    return sm_scale / softcap, softcap * log2e


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
def _fp_segment(fk_base, fv_base, fpos_row, s_fkh, s_fkt, s_fvh, s_fvt, f_stop, freq, rope_scaling,
                q_lo, q_hi, qhead, qmask, qk_scale, cap_scale, m_i, l_i, acc, accz, vcol,
                D: tl.constexpr, G: tl.constexpr, QP: tl.constexpr, BLOCK_T: tl.constexpr,
                DT: tl.constexpr, PREC: tl.constexpr, USE_LIBDEVICE: tl.constexpr, SOFTCAP: tl.constexpr):
    """Online-softmax step over the full-precision segment (sinks + window, slots ``< f_stop``) of
    the ``G`` KV heads at ``fk_base``/``fv_base``: pre-RoPE original keys, RoPE'd here.

    ``vcol`` (``[D]`` or a scalar) scales the value columns, as the caller's accumulator holds them;
    logits as :func:`_log2_logits`.
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
        s = tl.where(valid[:, None] & qmask[None, :], _log2_logits(s, qk_scale, cap_scale, SOFTCAP), float("-inf"))
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


def launch_strides(q: torch.Tensor, kv: PackedKV) -> tuple[int, ...]:
    """The stride arguments of the pre-RoPE decode kernels, in their order: queries (batch, head),
    the seven store tensors (three leading dims each; ``pos`` one) and the fp segment (three, three,
    one; ``kv`` must carry it, placeholders where the call has none)."""
    k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos, fk, fv, fpos = kv
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
