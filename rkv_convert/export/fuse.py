"""Fuse the calibration's weight-space transforms into the model: the value rotation and the key scale.

Value rotation: with values as row vectors ``v_rot = v @ R_h`` (``R_h``: the layer's rotation of KV head ``h``,
``H_d`` or learned, :mod:`rkv_convert.calibrate.rotation`), head ``h``'s value rows ``W_h`` become ``R_h^T W_h``
(bias too), and the ``o_proj`` input columns ``O_j`` of each query head ``j`` reading KV head ``h`` become
``O_j R_h``. Attention is linear in V, so logits are unchanged up to rounding (design notes §1). Key scale
(:mod:`rkv_convert.calibrate.key_scale`): keys times ``d``, queries times ``1/d``, equal within RoPE pairs,
so every ``q·k`` is unchanged. Where the rows sit (``v_proj``, a fused ``qkv_proj``, q/k norms) is the family
adapter's knowledge (:class:`~rkv_convert.models.adapters.FamilyAdapter`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..calibrate.artifact import CalibrationArtifact
from ..models.adapters import adapter_for, attention_modules, handler_channel_order

__all__ = ["fuse_calibration", "fuse_key_scale", "fuse_value_rotation", "unfuse_calibration"]


@torch.no_grad()
def fuse_value_rotation(model: nn.Module, rotations: torch.Tensor | Sequence[torch.Tensor]) -> None:
    """Rotate every layer's values in place (fp32 arithmetic, stored in each weight's dtype): ``rotations`` is one
    ``[d, d]`` for every layer and KV head, or per layer ``[n_kv, d, d]`` (``CalibrationArtifact.value_rotations``)."""
    family = adapter_for(model.config)
    modules = attention_modules(model)
    if not isinstance(rotations, torch.Tensor) and len(rotations) != len(modules):
        raise ValueError(f"got {len(rotations)} value rotations for {len(modules)} attention layers")
    for i, attn in enumerate(modules):
        proj, rows = family.value_rows(attn)
        w = proj.weight[rows]
        r = rotations if isinstance(rotations, torch.Tensor) else rotations[i]
        d = r.shape[-1]
        if attn.head_dim != d:
            raise ValueError(f"value rotation of order {d} does not match head_dim {attn.head_dim}")
        n_kv = w.shape[0] // d
        r = r.to(device=proj.weight.device, dtype=torch.float32).expand(n_kv, d, d)
        v = w.float().reshape(n_kv, d, w.shape[1])
        proj.weight[rows] = torch.einsum("hde,hdi->hei", r, v).reshape(w.shape).to(w.dtype)
        if proj.bias is not None:
            b = proj.bias[rows].float().reshape(n_kv, d)
            proj.bias[rows] = torch.einsum("hd,hde->he", b, r).reshape(-1).to(proj.bias.dtype)
        o = attn.o_proj.weight
        per_kv = o.float().reshape(o.shape[0], n_kv, -1, d)  # query head j reads KV head j // (n_q / n_kv)
        o.copy_(torch.einsum("ohjd,hde->ohje", per_kv, r).reshape(o.shape))


@torch.no_grad()
def fuse_key_scale(model: nn.Module, scales: list[torch.Tensor]) -> None:
    """Multiply each layer's keys by its scale ``[n_kv, d]`` (in the channel order attention handlers see) and
    its queries by the inverse, in the weights (fp32 arithmetic, stored in each weight's dtype)."""
    family = adapter_for(model.config)
    modules = attention_modules(model)
    if len(scales) != len(modules):
        raise ValueError(f"got {len(scales)} key scales for {len(modules)} attention layers")
    for attn, order, scale in zip(modules, handler_channel_order(model), scales):
        scale = scale.float().reshape(-1, attn.head_dim)
        if order is not None:  # handler channel t is projection channel order[t]
            scale = scale[:, torch.argsort(order)]
        family.scale_qk(attn, scale)


def fuse_calibration(model: nn.Module, artifact: CalibrationArtifact) -> None:
    """Everything ``artifact`` puts in the weights: its value rotations and, where calibrated, its key scale."""
    fuse_value_rotation(model, artifact.value_rotations)
    if artifact.key_scales is not None:
        fuse_key_scale(model, artifact.key_scales)


def unfuse_calibration(model: nn.Module, artifact: CalibrationArtifact) -> None:
    """Undo :func:`fuse_calibration` (up to rounding in the weights' dtype): for an export that refuses to write."""
    if artifact.key_scales is not None:
        fuse_key_scale(model, [1.0 / s for s in artifact.key_scales])
    fuse_value_rotation(model, [r.transpose(-1, -2) for r in artifact.value_rotations])  # orthonormal
