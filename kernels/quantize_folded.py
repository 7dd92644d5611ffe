"""Encode keys into the query-folded layout: centre, RoPE, rotate per KV head, group-quantize, pack.

Per token at position ``n`` of KV head ``h`` (see :mod:`rkv_convert.kernels.decode_folded`):
``y = RoPE_n(k - mu_h) @ R_h`` (``runtime.ops.rope``: rotate-half, cos/sin times
``attention_scaling``), then :func:`rkv_convert.quant.quantizer.quantize` over groups of ``g_k``
consecutive channels of ``y`` (``hi = clip*max``, ``lo = clip*min``, fp16 scale and zero, codes
from the rounded scale/zero) and :func:`rkv_convert.quant.packing.pack_codes`.

Shapes: ``k [B, n_kv, T, d]`` pre-RoPE keys (model dtype), ``pos int32 [B, T]`` (``-1``: an
empty slot, encoded at position 0), ``mean fp32 [n_kv, d]``, ``rotation fp32 [n_kv, d, d]``,
``inv_freq fp32 [d/2]``. Outputs ``k_codes uint8 [B, n_kv, T, d*bits/8]``, ``k_scale, k_zero
fp16 [B, n_kv, T, d/g_k]``: the ``FoldedKV`` key tensors.

Dispatch (see :mod:`rkv_convert.kernels._common`): ``backend="auto"`` runs the kernel on CUDA
tensors or under ``TRITON_INTERPRET=1``, else :func:`quantize_folded_ref`.
"""

from __future__ import annotations

import torch

from rkv_convert.quant.packing import pack_codes, packed_width
from rkv_convert.quant.quantizer import quantize
from rkv_convert.runtime.ops import rope

__all__ = ["quantize_folded_ref"]


def _check(k: torch.Tensor, pos: torch.Tensor, mean: torch.Tensor, rotation: torch.Tensor, inv_freq: torch.Tensor,
           bits: int, g_k: int, clip: float) -> None:
    if k.dim() != 4:
        raise ValueError(f"k must be [B, n_kv, T, d], got {tuple(k.shape)}")
    B, n_kv, T, d = k.shape
    if tuple(pos.shape) != (B, T):
        raise ValueError(f"pos must be [{B}, {T}], got {tuple(pos.shape)}")
    if tuple(mean.shape) != (n_kv, d) or tuple(rotation.shape) != (n_kv, d, d) or tuple(inv_freq.shape) != (d // 2,):
        raise ValueError(f"mean [n_kv, d], rotation [n_kv, d, d], inv_freq [d/2] expected for k {tuple(k.shape)}")
    if bits not in (2, 3, 4):
        raise ValueError(f"bits must be 2, 3 or 4, got {bits}")
    packed_width(d, bits)
    if g_k <= 0 or d % g_k:
        raise ValueError(f"group size {g_k} must divide the head dim {d}")
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"clip ratio must lie in (0, 1], got {clip}")


def fold_keys_ref(k: torch.Tensor, pos: torch.Tensor, mean: torch.Tensor, rotation: torch.Tensor,
                  inv_freq: torch.Tensor, attention_scaling: float) -> torch.Tensor:
    """``y = RoPE_pos(k - mu) @ R`` in fp32 ``[B, n_kv, T, d]`` (unquantized folded keys)."""
    x = k.float() - mean.to(k.device, torch.float32)[None, :, None, :]
    x = rope(x, pos.clamp_min(0), inv_freq, attention_scaling)
    return x @ rotation.to(k.device, torch.float32)[None]


def quantize_folded_ref(
    k: torch.Tensor,
    pos: torch.Tensor,
    mean: torch.Tensor,
    rotation: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    bits: int,
    g_k: int,
    clip: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-torch reference of the folded key encoder (module docstring): ``(k_codes, k_scale, k_zero)``."""
    _check(k, pos, mean, rotation, inv_freq, bits, g_k, clip)
    if k.numel() == 0:  # quantize() cannot reshape an empty tensor with -1
        lead, d = k.shape[:-1], k.shape[-1]
        return (k.new_empty(*lead, d * bits // 8, dtype=torch.uint8), k.new_empty(*lead, d // g_k, dtype=torch.float16),
                k.new_empty(*lead, d // g_k, dtype=torch.float16))
    qt = quantize(fold_keys_ref(k, pos, mean, rotation, inv_freq, attention_scaling), bits, g_k, clip)
    return pack_codes(qt.codes, bits), qt.scale, qt.zero
