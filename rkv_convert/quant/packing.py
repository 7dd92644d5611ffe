"""Bit packing of quantization codes: the storage layouts of the packed KV cache.

Codes are packed along the last (channel) axis into ``uint8`` bytes. Everything is
bit-exact and shared by the runtime, the evaluation path and the Triton kernels.
"""

from __future__ import annotations

from enum import Enum

import torch

__all__ = ["PackLayout", "layout_for_bits", "pack_codes", "unpack_codes", "packed_width"]


class PackLayout(str, Enum):
    """How ``b``-bit codes of one token's channels sit in bytes (LSB first everywhere).

    - ``U2_LSB4``: 2 bits, four codes per byte. Channel ``4i + j`` occupies bits
      ``[2j, 2j+1]`` of byte ``i``. A row of ``C`` channels takes ``C/4`` bytes.
    - ``U3_PLANES``: 3 bits as two planes in one row: first the low two bits laid out as
      ``U2_LSB4`` (``C/4`` bytes), then the high bit with channel ``8i + j`` at bit ``j``
      of byte ``C/4 + i`` (``C/8`` bytes). ``3C/8`` bytes in all, no padding.
    - ``U4_LSB2``: 4 bits, two codes per byte. Channel ``2i + j`` occupies bits
      ``[4j, 4j+3]`` of byte ``i``. ``C/2`` bytes.
    """

    U2_LSB4 = "u2-lsb4"
    U3_PLANES = "u3-planes"
    U4_LSB2 = "u4-lsb2"


_LAYOUTS = {2: PackLayout.U2_LSB4, 3: PackLayout.U3_PLANES, 4: PackLayout.U4_LSB2}
_CHANNEL_MULTIPLE = {2: 4, 3: 8, 4: 2}


def layout_for_bits(bits: int) -> PackLayout:
    if bits not in _LAYOUTS:
        raise ValueError(f"bits must be one of {sorted(_LAYOUTS)}, got {bits}")
    return _LAYOUTS[bits]


def packed_width(channels: int, bits: int) -> int:
    """Bytes per row of ``channels`` codes at ``bits`` bits."""
    layout_for_bits(bits)
    if channels % _CHANNEL_MULTIPLE[bits]:
        raise ValueError(f"{bits}-bit packing needs a multiple of {_CHANNEL_MULTIPLE[bits]} channels, got {channels}")
    return channels * bits // 8


def _pack_fields(codes: torch.Tensor, width: int) -> torch.Tensor:
    per_byte = 8 // width
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * width
    return (c << shifts).sum(-1).to(torch.uint8)


def _unpack_fields(packed: torch.Tensor, width: int) -> torch.Tensor:
    per_byte = 8 // width
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * width
    fields = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << width) - 1)
    return fields.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte).to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``uint8`` codes ``[..., C]`` (values below ``2**bits``) into ``uint8`` ``[..., C*bits/8]``."""
    packed_width(codes.shape[-1], bits)
    if bits == 2:
        return _pack_fields(codes, 2)
    if bits == 4:
        return _pack_fields(codes, 4)
    low = _pack_fields(codes & 3, 2)
    high = _pack_fields(codes >> 2, 1)
    return torch.cat([low, high], dim=-1)


def unpack_codes(packed: torch.Tensor, bits: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``uint8`` ``[..., C*bits/8]`` → codes ``uint8`` ``[..., C]``."""
    if packed.shape[-1] != packed_width(channels, bits):
        raise ValueError(f"packed row has {packed.shape[-1]} bytes, expected {packed_width(channels, bits)}")
    if bits == 2:
        return _unpack_fields(packed, 2)
    if bits == 4:
        return _unpack_fields(packed, 4)
    low = _unpack_fields(packed[..., : channels // 4], 2)
    high = _unpack_fields(packed[..., channels // 4 :], 1)
    return low | (high << 2)
