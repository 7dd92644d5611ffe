"""Fuse the calibration's weight-space transforms into the model: the value rotation and the key scale.

Value rotation: with values as row vectors ``v_rot = v @ H``, head ``h``'s value rows ``W_h`` become
``H^T W_h`` (bias too), and each query head's ``o_proj`` input columns ``O_j`` become ``O_j H``. Attention
is linear in V, so logits are unchanged up to rounding (design notes §1). Key scale
(:mod:`rkv_convert.calibrate.key_scale`): keys times ``d``, queries times ``1/d``, equal within RoPE pairs,
so every ``q·k`` is unchanged. Where the rows sit (``v_proj``, a fused ``qkv_proj``, q/k norms) is the family
adapter's knowledge (:class:`~rkv_convert.models.adapters.FamilyAdapter`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibrate.artifact import CalibrationArtifact
from ..models.adapters import adapter_for, attention_modules, handler_channel_order

__all__ = ["fuse_calibration", "fuse_key_scale", "fuse_value_rotation", "unfuse_calibration"]


@torch.no_grad()
def fuse_value_rotation(model: nn.Module, rotation: torch.Tensor) -> None:
    """Rotate every layer's values in place (computed in fp32, stored in each weight's dtype)."""
    d = rotation.shape[0]
    family = adapter_for(model.config)
    for attn in attention_modules(model):
        if attn.head_dim != d:
            raise ValueError(f"value rotation of order {d} does not match head_dim {attn.head_dim}")
        proj, rows = family.value_rows(attn)
        h = rotation.to(device=proj.weight.device, dtype=torch.float32)
        w = proj.weight[rows]
        v = w.float().reshape(-1, d, w.shape[1])
        proj.weight[rows] = (h.T @ v).reshape(w.shape).to(w.dtype)
        if proj.bias is not None:
            b = proj.bias[rows].float().reshape(-1, d)
            proj.bias[rows] = (b @ h).reshape(-1).to(proj.bias.dtype)
        o = attn.o_proj.weight.float().reshape(attn.o_proj.weight.shape[0], -1, d)
        attn.o_proj.weight.copy_((o @ h).reshape(attn.o_proj.weight.shape))


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
    """Everything ``artifact`` puts in the weights: its value rotation and, where calibrated, its key scale."""
    fuse_value_rotation(model, artifact.value_rotation)
    if artifact.key_scales is not None:
        fuse_key_scale(model, artifact.key_scales)


def unfuse_calibration(model: nn.Module, artifact: CalibrationArtifact) -> None:
    """Undo :func:`fuse_calibration` (up to rounding in the weights' dtype): for an export that refuses to write."""
    if artifact.key_scales is not None:
        fuse_key_scale(model, [1.0 / s for s in artifact.key_scales])
    fuse_value_rotation(model, artifact.value_rotation.T.contiguous())  # H is orthonormal
