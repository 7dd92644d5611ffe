"""Asymmetric group quantization: the one quantize/dequantize used by evaluation and runtime.

A row of ``C`` channels is split into ``C/g`` groups of ``g`` channels. Without a
permutation the groups are consecutive channels; with ``perm`` group ``j`` holds
channels ``perm[j*g:(j+1)*g]`` while codes stay in the input's channel order, so a
permutation never moves data (design notes §2).

Per group: ``hi = clip*max``, ``lo = clip*min``, ``scale = (hi-lo)/(2**bits-1)`` and
``zero = lo``, both stored as fp16; ``code = clamp(round((x - zero) * (1/scale)), 0, 2**bits-1)``
computed from the fp16-rounded scale and zero (one fp32 reciprocal per group, so a kernel
multiplies each channel instead of dividing it, bit for bit the same); ``x̂ = code*scale + zero``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["QuantizedTensor", "quantize", "dequantize", "fake_quantize", "bits_per_element", "SCALE_FLOOR"]

SCALE_FLOOR = 2.0**-14  # smallest normal fp16: constant groups still get a finite, exact scale


@dataclass
class QuantizedTensor:
    """Codes ``uint8 [..., C]`` in input channel order; ``scale``/``zero`` fp16 ``[..., C/g]``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    perm: torch.Tensor | None = None


def levels(bits: int) -> int:
    """Largest code at ``bits`` bits (3 at 2 bits, 7 at 3 bits, 15 at 4 bits)."""
    return (1 << bits) - 1


def bits_per_element(bits: int, group_size: int) -> float:
    """Storage cost: the codes plus an fp16 scale and zero per group."""
    return bits + 32.0 / group_size


def _check(x: torch.Tensor, bits: int, group_size: int, clip: float) -> None:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
    if group_size <= 0 or x.shape[-1] % group_size:
        raise ValueError(f"group size {group_size} must divide the {x.shape[-1]} channels")
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"clip ratio must lie in (0, 1], got {clip}")


def quantize(
    x: torch.Tensor, bits: int, group_size: int, clip: float = 1.0, perm: torch.Tensor | None = None
) -> QuantizedTensor:
    """Quantize ``x [..., C]`` per row in groups of ``group_size`` channels (see module docstring)."""
    _check(x, bits, group_size, clip)
    xf = x.float()
    if perm is not None:
        xf = xf.index_select(-1, perm)
    grouped = xf.reshape(*xf.shape[:-1], -1, group_size)
    hi = grouped.amax(-1) * clip
    lo = grouped.amin(-1) * clip
    scale = ((hi - lo) / levels(bits)).clamp_min(SCALE_FLOOR).to(torch.float16)
    zero = lo.to(torch.float16)
    codes = ((grouped - zero.float().unsqueeze(-1)) * (1.0 / scale.float()).unsqueeze(-1)).round()
    codes = codes.clamp_(0, levels(bits)).to(torch.uint8).reshape(xf.shape)
    if perm is not None:
        codes = codes.index_select(-1, torch.argsort(perm))
    return QuantizedTensor(codes, scale, zero, bits, group_size, perm)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes*scale + zero`` with each channel taking its own group's scale and zero."""
    codes = q.codes
    if q.perm is not None:
        codes = codes.index_select(-1, q.perm)
    grouped = codes.float().reshape(*codes.shape[:-1], -1, q.group_size)
    x = grouped * q.scale.float().unsqueeze(-1) + q.zero.float().unsqueeze(-1)
    x = x.reshape(codes.shape)
    if q.perm is not None:
        x = x.index_select(-1, torch.argsort(q.perm))
    return x.to(dtype)


def fake_quantize(
    x: torch.Tensor, bits: int, group_size: int, clip: float = 1.0, perm: torch.Tensor | None = None
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype: what a reader of the cache gets back."""
    return dequantize(quantize(x, bits, group_size, clip, perm), x.dtype)
