"""RotateKV key and value codecs: the reference transform around the quantizer.

Keys (pre-RoPE, ``[..., n_kv*d]``):
    encode: ``y = rotate(k - mean)``, where ``rotate`` multiplies each group of ``G``
    consecutive heads (``G*d`` channels) by the orthonormal ``rotation`` from the right
    (``y_g = x_g @ R``); then quantize ``y`` in groups of ``g`` channels chosen by ``perm``
    (a permutation that never leaves a head group).
    decode: ``k̂ = unrotate(dequantize(q)) + mean`` with ``x_g = y_g @ R.T``.
Folded keys (``KeyLayout.FOLDED``, ``[B, n_kv, T, d]`` pre-RoPE in, post-RoPE out):
    encode: ``y = (RoPE_n(k) - RoPE_n(mean)) @ R_h`` per KV head, ``R_h = rotation[:, perm_h]``,
    quantized in groups of ``g`` consecutive channels of ``y`` (the permutation lives in ``R_h``).
    decode: ``RoPE_n(k̂) = dequantize(q) @ R_h.T + RoPE_n(mean)``. The transform is
    ``runtime.ops.fold_keys``/``unfold_keys``, shared with the runtime.
Values (already rotated by the exported weights, ``[..., n_kv*d]``): quantized per token in
groups of ``g`` consecutive channels; decode is plain dequantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..runtime.ops import apply_rope, fold_keys, unfold_keys
from .quantizer import GroupRanges, QuantizedTensor, dequantize, quantize

__all__ = ["KeyCodec", "FoldedKeyCodec", "ValueCodec", "rotate_groups", "folded_head_rotations"]


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


def folded_head_rotations(rotation: torch.Tensor, perm: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``R_h = rotation[:, perm_h]`` fp32 ``[n_kv, d, d]`` from ``rotation [d, d]`` and the
    block-diagonal ``perm [n_kv*d]`` (``perm_h`` = head ``h``'s block, made local)."""
    d = head_dim
    if tuple(rotation.shape) != (d, d) or perm.numel() % d:
        raise ValueError(f"folded keys need a [{d}, {d}] rotation and a per-head permutation, got "
                         f"{tuple(rotation.shape)} and {perm.numel()} channels")
    local = perm.long().reshape(-1, d) - torch.arange(perm.numel() // d, device=perm.device)[:, None] * d
    if local.min() < 0 or local.max() >= d:
        raise ValueError("the key permutation moves channels across heads; the folded layout needs one per head")
    r = rotation.float().to(perm.device)
    return torch.stack([r[:, p] for p in local]).contiguous()


@dataclass
class FoldedKeyCodec:
    """Per-layer folded key transform and quantizer settings (see module docstring)."""

    mean: torch.Tensor  # [n_kv*d] calibrated per-channel mean of pre-RoPE keys
    rotation: torch.Tensor  # [d, d] orthonormal (the checkpoint's key_rotation)
    perm: torch.Tensor  # [n_kv*d] int64, block-diagonal over heads
    bits: int
    group_size: int
    clip: float
    head_rotation: torch.Tensor | None = None  # [n_kv, d, d] learned R_h; None: rotation[:, perm_h]
    meta_base: float | None = None  # 8-bit group metadata (quantizer.GroupMeta.LOG8) with this base; None: fp16
    ranges: GroupRanges = GroupRanges.MINMAX  # how the encoder sets each group's range

    def __post_init__(self) -> None:
        d = self.rotation.shape[0]
        learned = self.head_rotation
        self.head_rotations = folded_head_rotations(self.rotation, self.perm, d) if learned is None else learned.float()
        self.head_means = self.mean.float().reshape(-1, d)  # [n_kv, d]

    def _mean_rope(self, cos: torch.Tensor, sin: torch.Tensor, device: torch.device) -> torch.Tensor:
        return apply_rope(self.head_means.to(device)[None, :, None, :], cos.unsqueeze(1), sin.unsqueeze(1))

    def fold(self, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE ``k [B, n_kv, T, d]``, the model's ``cos, sin [B, T, d]`` → the folded keys ``y`` fp32
        that the quantizer sees."""
        k_post = apply_rope(k, cos.unsqueeze(1), sin.unsqueeze(1))
        return fold_keys(k_post, self._mean_rope(cos, sin, k.device), self.head_rotations)

    def unfold(self, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Post-RoPE keys ``[B, n_kv, T, d]`` from folded keys ``y`` at the same positions (the inverse of :meth:`fold`)."""
        return unfold_keys(y, self._mean_rope(cos, sin, y.device), self.head_rotations).to(dtype)

    def encode(self, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> QuantizedTensor:
        """Pre-RoPE ``k [B, n_kv, T, d]``, the model's ``cos, sin [B, T, d]`` → quantized ``y``."""
        return quantize(self.fold(k, cos, sin), self.bits, self.group_size, self.clip, meta_base=self.meta_base,
                        ranges=self.ranges)

    def decode(self, q: QuantizedTensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Post-RoPE keys ``[B, n_kv, T, d]`` from :meth:`encode`'s output at the same positions."""
        return self.unfold(dequantize(q, torch.float32), cos, sin, dtype)

    def roundtrip(self, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """What a reader of the folded cache gets back: post-RoPE keys in ``k``'s dtype."""
        return self.decode(self.encode(k, cos, sin), cos, sin, k.dtype)


@dataclass
class ValueCodec:
    """Values are stored rotated (the rotation lives in ``v_proj``/``o_proj``); per-token groups."""

    bits: int
    group_size: int
    clip: float
    meta_base: float | None = None  # 8-bit group metadata with this base; None: fp16
    ranges: GroupRanges = GroupRanges.MINMAX  # how the encoder sets each group's range

    def encode(self, v: torch.Tensor) -> QuantizedTensor:
        return quantize(v, self.bits, self.group_size, self.clip, meta_base=self.meta_base, ranges=self.ranges)

    def decode(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(q, dtype)

    def roundtrip(self, v: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(v), v.dtype)
