"""Asymmetric group quantization: the one quantize/dequantize used by evaluation and runtime.

A row of ``C`` channels is split into ``C/g`` groups of ``g`` channels. Without a
permutation the groups are consecutive channels; with ``perm`` group ``j`` holds
channels ``perm[j*g:(j+1)*g]`` while codes stay in the input's channel order, so a
permutation never moves data (design notes §2).

Per group: ``hi = clip*max``, ``lo = clip*min``, ``scale = (hi-lo)/(2**bits-1)`` and
``zero = lo``, both stored as fp16; ``code = clamp(round((x - zero) * (1/scale)), 0, 2**bits-1)``
computed from the fp16-rounded scale and zero (one fp32 reciprocal per group, so a kernel
multiplies each channel instead of dividing it, bit for bit the same); ``x̂ = code*scale + zero``.

**8-bit group metadata** (``meta_base`` given; :class:`GroupMeta` ``LOG8``): the scale and zero take one
byte each instead of two (``bits + 16/g`` bits per element instead of ``bits + 32/g``):

- scale code ``e = clamp(round(16*log2(s/base)), 0, 255)`` (uint8) of ``s = max((hi-lo)/L, 2^-14)`` in
  fp32, decoded as ``s' = base * 2^(e/16)`` (steps of 4.4 %). ``base`` is one fp32 per layer and K/V
  (:func:`meta_scale_base`: ``e = 255`` is :data:`META_HEADROOM` times the largest scale seen on
  calibration text, so the codes reach ``2^-15.9`` of that at ``e = 0``);
- zero code ``z = clamp(round(4*(c - L*s'/2)/s'), -128, 127)`` (int8), decoded as ``z' = s' * z / 4``:
  it keeps the grid's centre ``c = (hi+lo)/2`` within ``s'/8`` of where the fp32 range put it (inside the
  range the rounding error does not depend on where the grid lies, so the zero only places its ends);
- codes against the decoded ``(s', z')``: ``clamp(round((x - z') * (1/s')), 0, L)``, so the encoder
  absorbs the metadata's rounding.

**Searched group ranges** (``ranges=GroupRanges.SEARCHED``): the encoder tries, per group, the range
``clip * [min, max]`` and then ``[a * min, b * max]`` for ``a, b`` in :data:`RANGE_FRACTIONS` of the code width, in
that order (:func:`range_candidates`), and keeps the first with the smallest squared error ``Σ (x̂ - x)²`` of the
group as stored (scale and zero rounded to their storage first; the error is taken in the code domain,
``s² Σ (code - (x - z)/s)²``, as the write kernel does). What is stored is unchanged (codes, scale and
zero), so readers need nothing new; only the encoder works harder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch

__all__ = [
    "QuantizedTensor", "GroupMeta", "quantize", "dequantize", "fake_quantize", "bits_per_element", "SCALE_FLOOR",
    "meta_scale_base", "group_scale_zero", "encode_group_meta", "stored_group_meta", "group_codes",
    "GroupRanges", "RANGE_FRACTIONS", "range_candidates",
]  # fmt: skip

SCALE_FLOOR = 2.0**-14  # smallest normal fp16: constant groups still get a finite, exact scale
META_STEPS = 16  # 8-bit scale codes per octave: s' = base * 2**(e/16)
META_HEADROOM = 4.0  # e = 255 is this multiple of the largest scale seen on calibration text


class GroupMeta(str, Enum):
    """How each group's scale and zero are stored: ``fp16`` (2 bytes each) or ``log8`` (1 byte each,
    module docstring)."""

    FP16 = "fp16"
    LOG8 = "log8"

    @property
    def bits(self) -> int:
        """Bits per group for scale and zero together."""
        return 32 if self is GroupMeta.FP16 else 16

    @property
    def dtypes(self) -> tuple[torch.dtype, torch.dtype]:
        """Storage dtypes of the scale and the zero."""
        return (torch.float16, torch.float16) if self is GroupMeta.FP16 else (torch.uint8, torch.int8)


class GroupRanges(str, Enum):
    """How the encoder sets each group's range: ``minmax`` (``clip * [min, max]``) or ``searched`` (the best of
    :func:`range_candidates` by squared error; module docstring)."""

    MINMAX = "minmax"
    SEARCHED = "searched"


RANGE_FRACTIONS: dict[int, tuple[float, float]] = {2: (0.8, 0.6), 3: (1.0, 0.85), 4: (1.0, 0.9)}
"""Per code width, the two fractions of a group's min and max that searched ranges try: 2-bit groups clip harder
than 3-bit ones (2 and 3 bits chosen on development text among four grids, docs/accuracy.md; 4 bits unmeasured,
one step milder than 3 bits)."""


def range_candidates(bits: int, clip: float) -> list[tuple[float, float]]:
    """``(a, b)`` pairs a searched encoder tries, in order: ranges ``[a * min, b * max]``; the first is the
    layer's clip."""
    if bits not in RANGE_FRACTIONS:
        raise ValueError(f"searched group ranges are defined for {sorted(RANGE_FRACTIONS)}-bit codes, got {bits}")
    fractions = RANGE_FRACTIONS[bits]
    return [(clip, clip)] + [(a, b) for a in fractions for b in fractions]


@dataclass
class QuantizedTensor:
    """Codes ``uint8 [..., C]`` in input channel order; ``scale``/``zero`` ``[..., C/g]``: fp16, or with
    ``meta_base`` the 8-bit codes (``uint8`` scale, ``int8`` zero; :func:`group_scale_zero` decodes them)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    perm: torch.Tensor | None = None
    meta_base: float | None = None


def levels(bits: int) -> int:
    """Largest code at ``bits`` bits (3 at 2 bits, 7 at 3 bits, 15 at 4 bits)."""
    return (1 << bits) - 1


def bits_per_element(bits: int, group_size: int, meta: GroupMeta = GroupMeta.FP16) -> float:
    """Storage cost: the codes plus a scale and zero per group (fp16: 32 bits; log8: 16 bits)."""
    return bits + meta.bits / group_size


def meta_scale_base(group_range: float, bits: int, clip: float) -> float:
    """``base`` of 8-bit scale codes for a layer whose largest group range (max - min, unclipped) on
    calibration text is ``group_range``: ``e = 255`` decodes to ``META_HEADROOM`` times its clipped scale."""
    if not math.isfinite(group_range) or group_range < 0:
        raise ValueError(f"group range must be finite and >= 0, got {group_range}")
    largest = max(clip * group_range / levels(bits), SCALE_FLOOR)
    return META_HEADROOM * largest / 2.0 ** (255 / META_STEPS)


def group_scale_zero(scale: torch.Tensor, zero: torch.Tensor, meta_base: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(scale, zero)`` per group from their stored form (fp16, or 8-bit codes with ``meta_base``)."""
    if meta_base is None:
        return scale.float(), zero.float()
    s = meta_base * torch.exp2(scale.float() * (1.0 / META_STEPS))
    return s, s * zero.float() * 0.25


def encode_group_meta(hi: torch.Tensor, lo: torch.Tensor, bits: int, meta_base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes ``(e uint8, z int8)`` of groups with clipped range ``[lo, hi]`` (fp32; module docstring)."""
    L = levels(bits)
    s = ((hi - lo) / L).clamp_min(SCALE_FLOOR)
    e = (META_STEPS * torch.log2(s / meta_base)).round().clamp_(0, 255)
    s8 = meta_base * torch.exp2(e * (1.0 / META_STEPS))
    z = (4 * ((hi + lo) * 0.5 - (L * 0.5) * s8) / s8).round().clamp_(-128, 127)
    return e.to(torch.uint8), z.to(torch.int8)


def stored_group_meta(hi: torch.Tensor, lo: torch.Tensor, bits: int, meta_base: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored ``(scale, zero)`` of groups with clipped range ``[lo, hi]`` (fp32): fp16, or with ``meta_base``
    the 8-bit codes of :func:`encode_group_meta`."""
    if meta_base is None:
        return ((hi - lo) / levels(bits)).clamp_min(SCALE_FLOOR).to(torch.float16), lo.to(torch.float16)
    return encode_group_meta(hi, lo, bits, meta_base)


def _code_domain(grouped: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(x - zero) * (1/scale)`` of ``grouped [..., G, g]`` with each group's decoded fp32 ``scale, zero [..., G]``."""
    return (grouped - zero.unsqueeze(-1)) * (1.0 / scale).unsqueeze(-1)


def group_codes(grouped: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 codes ``clamp(round((x - zero) * (1/scale)), 0, 2**bits-1)`` of ``grouped [..., G, g]`` against
    each group's decoded fp32 ``scale, zero [..., G]``."""
    return _code_domain(grouped, scale, zero).round().clamp_(0, levels(bits))


def _group_error(grouped: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Squared error ``[..., G]`` of each group of ``grouped [..., G, g]`` stored with decoded ``scale, zero``, in
    the code domain: ``scale² Σ (code - t)²`` with ``t = (x - zero) / scale`` (what the write kernel computes)."""
    t = _code_domain(grouped, scale, zero)
    return (t.round().clamp_(0, levels(bits)) - t).square().sum(-1) * scale.square()


def _group_meta(grouped: torch.Tensor, bits: int, clip: float, meta_base: float | None,
                ranges: GroupRanges) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored ``(scale, zero)`` of each group of ``grouped [..., G, g]`` (fp32) by ``ranges``; searched: the first
    candidate with the least error."""
    mx, mn = grouped.amax(-1), grouped.amin(-1)
    if ranges is GroupRanges.MINMAX:
        return stored_group_meta(mx * clip, mn * clip, bits, meta_base)
    metas = [stored_group_meta(mx * b, mn * a, bits, meta_base) for a, b in range_candidates(bits, clip)]
    errors = torch.stack([_group_error(grouped, *group_scale_zero(s, z, meta_base), bits) for s, z in metas])
    pick = errors.argmin(0, keepdim=True)  # the first of equal minima, as the kernel's strict "<" keeps
    return tuple(torch.stack(column).gather(0, pick)[0] for column in zip(*metas))


def _check(x: torch.Tensor, bits: int, group_size: int, clip: float) -> None:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
    if group_size <= 0 or x.shape[-1] % group_size:
        raise ValueError(f"group size {group_size} must divide the {x.shape[-1]} channels")
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"clip ratio must lie in (0, 1], got {clip}")


def quantize(
    x: torch.Tensor, bits: int, group_size: int, clip: float = 1.0, perm: torch.Tensor | None = None,
    meta_base: float | None = None, ranges: GroupRanges = GroupRanges.MINMAX,
) -> QuantizedTensor:
    """Quantize ``x [..., C]`` per row in groups of ``group_size`` channels (see module docstring);
    ``meta_base``: store scale and zero as 8-bit codes with this base instead of fp16; ``ranges``: how each
    group's range is set."""
    _check(x, bits, group_size, clip)
    if meta_base is not None and not (math.isfinite(meta_base) and meta_base > 0):
        raise ValueError(f"meta_base must be a positive finite number, got {meta_base}")
    xf = x.float()
    if perm is not None:
        xf = xf.index_select(-1, perm)
    grouped = xf.reshape(*xf.shape[:-1], -1, group_size)
    scale, zero = _group_meta(grouped, bits, clip, meta_base, GroupRanges(ranges))
    s, z = group_scale_zero(scale, zero, meta_base)
    codes = group_codes(grouped, s, z, bits).to(torch.uint8).reshape(xf.shape)
    if perm is not None:
        codes = codes.index_select(-1, torch.argsort(perm))
    return QuantizedTensor(codes, scale, zero, bits, group_size, perm, meta_base)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes*scale + zero`` with each channel taking its own group's scale and zero."""
    codes = q.codes
    if q.perm is not None:
        codes = codes.index_select(-1, q.perm)
    grouped = codes.float().reshape(*codes.shape[:-1], -1, q.group_size)
    s, z = group_scale_zero(q.scale, q.zero, q.meta_base)
    x = grouped * s.unsqueeze(-1) + z.unsqueeze(-1)
    x = x.reshape(codes.shape)
    if q.perm is not None:
        x = x.index_select(-1, torch.argsort(q.perm))
    return x.to(dtype)


def fake_quantize(
    x: torch.Tensor, bits: int, group_size: int, clip: float = 1.0, perm: torch.Tensor | None = None,
    meta_base: float | None = None, ranges: GroupRanges = GroupRanges.MINMAX,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype: what a reader of the cache gets back."""
    return dequantize(quantize(x, bits, group_size, clip, perm, meta_base, ranges), x.dtype)
