"""RotateKV key and value codecs: the reference transform around the quantizer.

Keys (pre-RoPE, ``[..., n_kv*d]``):
    encode: ``y = rotate(k - mean)``, where ``rotate`` multiplies each group of ``G``
    consecutive heads (``G*d`` channels) by the orthonormal ``rotation`` from the right
    (``y_g = x_g @ R``); then quantize ``y`` in groups of ``g`` channels chosen by ``perm``
    (a permutation that never leaves a head group).
    decode: ``k̂ = unrotate(dequantize(q)) + mean`` with ``x_g = y_g @ R.T``.
Values (already rotated by the exported weights, ``[..., n_kv*d]``): quantized per token in
groups of ``g`` consecutive channels; decode is plain dequantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantizer import QuantizedTensor, dequantize, quantize

__all__ = ["KeyCodec", "ValueCodec", "rotate_groups"]


def rotate_groups(x: torch.Tensor, rotation: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Multiply each block of ``rotation.shape[0]`` channels of ``x [..., C]`` by ``R`` (or ``R.T``)."""
    n = rotation.shape[0]
    r = rotation.to(device=x.device, dtype=x.dtype)
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // n, n)
    out = blocks @ (r.T if inverse else r)
    return out.reshape(x.shape)


@dataclass
class KeyCodec:
    """Per-layer key transform and quantizer settings (tensors in fp32 / int64)."""

    mean: torch.Tensor  # [n_kv*d] calibrated per-channel mean of pre-RoPE keys
    rotation: torch.Tensor  # [G*d, G*d] orthonormal
    perm: torch.Tensor  # [n_kv*d] int64, block-diagonal over head groups
    bits: int
    group_size: int
    clip: float

    def encode(self, k: torch.Tensor) -> QuantizedTensor:
        y = rotate_groups(k.float() - self.mean.to(k.device), self.rotation)
        return quantize(y, self.bits, self.group_size, self.clip, self.perm.to(k.device))

    def decode(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        y = dequantize(q, torch.float32)
        return (rotate_groups(y, self.rotation, inverse=True) + self.mean.to(y.device)).to(dtype)

    def roundtrip(self, k: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(k), k.dtype)


@dataclass
class ValueCodec:
    """Values are stored rotated (the rotation lives in ``v_proj``/``o_proj``); per-token groups."""

    bits: int
    group_size: int
    clip: float

    def encode(self, v: torch.Tensor) -> QuantizedTensor:
        return quantize(v, self.bits, self.group_size, self.clip)

    def decode(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(q, dtype)

    def roundtrip(self, v: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(v), v.dtype)
