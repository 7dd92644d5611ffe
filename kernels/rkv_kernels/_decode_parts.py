"""Triton building blocks shared by the decode-attention kernels: unpacking code planes (and the plane order of
channels, for the host-side operands laid out to match), per-group scale selection, fast cos/sin for RoPE and
the online-softmax step."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# Packed channels are processed in 4 "planes": plane j holds channels 4i + j (i < d/4) of a
# d-channel chunk. A plane is what one shift of a packed byte tile yields, so unpacking needs
# no reshape or layout shuffle; the rotation rows, group ids and value accumulators are taken
# in the same plane order instead.
_NPLANES = 4


@functools.lru_cache(maxsize=64)
def _plane_order(gd: int, d: int, device: torch.device) -> torch.Tensor:
    """Input channel of each plane-ordered row: ``g*d + j*d/4 + i`` -> ``g*d + 4i + j``."""
    g, j, i = torch.meshgrid(torch.arange(gd // d), torch.arange(_NPLANES), torch.arange(d // _NPLANES), indexing="ij")
    return (g * d + _NPLANES * i + j).reshape(-1).to(device)


@triton.jit
def _plane_codes(row, tmask, ii, j: tl.constexpr, lo0, hi0, blo, bhi, BITS: tl.constexpr):
    """Codes ``int32 [BLOCK_T, d/4]`` of channels ``4*ii + j`` of a chunk.

    ``blo``/``bhi``: byte tiles preloaded for 2/3 bits (``[BLOCK_T, d/4]``: byte ``ii`` of the
    chunk's low plane; byte ``ii//2`` of its high plane). 4 bits loads its own bytes here.
    """
    if BITS == 4:  # channel 4i+j: byte 2i + j//2, nibble j%2
        b4 = tl.load(row[:, None] + lo0 + 2 * ii[None, :] + j // 2, mask=tmask[:, None], other=0).to(tl.int32)
        codes = (b4 >> (4 * (j % 2))) & 15
    else:  # channel 4i+j: bits 2j of byte i; at 3 bits, bit 4*(i%2)+j of high byte i//2
        codes = (blo >> (2 * j)) & 3
        if BITS == 3:
            codes = codes | (((bhi >> (4 * (ii[None, :] % 2) + j)) & 1) << 2)
    return codes


@triton.jit
def _byte_tiles(row, tmask, ii, lo0, hi0, BITS: tl.constexpr):
    """The byte tiles shared by the four planes of a chunk (2 and 3 bits)."""
    if BITS == 4:
        blo = tmask  # unused
        bhi = tmask
    else:
        blo = tl.load(row[:, None] + lo0 + ii[None, :], mask=tmask[:, None], other=0).to(tl.int32)
        if BITS == 3:
            bhi = tl.load(row[:, None] + hi0 + ii[None, :] // 2, mask=tmask[:, None], other=0).to(tl.int32)
        else:
            bhi = blo
    return blo, bhi


@triton.jit
def _group_rows(sz_row, tmask, NG: tl.constexpr):
    """The first four per-group fp16 values of each token row ``[BLOCK_T]`` (columns past ``NG`` repeat the last)."""
    s0 = tl.load(sz_row, mask=tmask, other=0.0).to(tl.float32)
    s1 = tl.load(sz_row + min(1, NG - 1), mask=tmask, other=0.0).to(tl.float32)
    s2 = tl.load(sz_row + min(2, NG - 1), mask=tmask, other=0.0).to(tl.float32)
    s3 = tl.load(sz_row + min(3, NG - 1), mask=tmask, other=0.0).to(tl.float32)
    return s0, s1, s2, s3


@triton.jit
def _select_groups(gid, s0, s1, s2, s3, NG: tl.constexpr):
    """Per-channel ``[BLOCK_T, PW]`` values ``s_{gid[c]}`` for up to four groups: a chain of selects (exact)."""
    out = tl.where(gid[None, :] == 0, s0[:, None], s1[:, None])
    if NG > 2:
        out = tl.where(gid[None, :] == 2, s2[:, None], out)
    if NG > 3:
        out = tl.where(gid[None, :] == 3, s3[:, None], out)
    return out


@triton.jit
def _cos_sin(ang, USE_LIBDEVICE: tl.constexpr):
    """cos/sin of fp32 angles: Cody-Waite reduction to [-pi, pi], then the fast hardware unit."""
    kq = (ang * 0.15915493667125702 + 12582912.0) - 12582912.0  # round(ang / 2pi), |ang| < 2**22
    r = ang - kq * 6.28125  # 2pi = 6.28125 + C2 + C3 (fp32 parts); kq * 6.28125 is exact
    r = r - kq * 0.0019353071693331003
    r = r - kq * 1.0253131677018246e-11
    if USE_LIBDEVICE:
        c = libdevice.fast_cosf(r)
        s = libdevice.fast_sinf(r)
    else:
        c = tl.cos(r)
        s = tl.sin(r)
    return c, s


@triton.jit
def _slot_rope(pos_row, t, stop, freq, rope_scaling, USE_LIBDEVICE: tl.constexpr):
    """For slots ``t [BLOCK_T]`` (< ``stop``): in-range mask, validity (position >= 0) and the
    scaled RoPE ``cos, sin [BLOCK_T, d/2]`` at each slot's position."""
    tmask = t < stop
    p_t = tl.load(pos_row + t.to(tl.int64), mask=tmask, other=-1)
    valid = tmask & (p_t >= 0)
    cos, sin = _cos_sin(p_t.to(tl.float32)[:, None] * freq[None, :], USE_LIBDEVICE)
    return tmask, valid, cos * rope_scaling, sin * rope_scaling


@triton.jit
def _softmax_step(s, m_i, l_i):
    m_new = tl.maximum(m_i, tl.max(s, 0))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[None, :])
    return m_new, l_i * alpha + tl.sum(p, 0), alpha, p
