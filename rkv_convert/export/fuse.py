"""Fuse the value rotation into the weights: ``v_proj`` rows by ``H^T``, ``o_proj`` columns by ``H``.

With values as row vectors ``v_rot = v @ H``: head ``h``'s ``v_proj`` rows ``W_h`` become
``H^T W_h`` (bias too), and each query head's ``o_proj`` input columns ``O_j`` become ``O_j H``.
Attention is linear in V, so logits are unchanged up to rounding (design notes §1).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.adapters import attention_modules

__all__ = ["fuse_value_rotation"]


@torch.no_grad()
def fuse_value_rotation(model: nn.Module, rotation: torch.Tensor) -> None:
    """Rotate every layer's values in place (computed in fp32, stored in each weight's dtype)."""
    d = rotation.shape[0]
    for attn in attention_modules(model):
        if attn.head_dim != d:
            raise ValueError(f"value rotation of order {d} does not match head_dim {attn.head_dim}")
        h = rotation.to(device=attn.v_proj.weight.device, dtype=torch.float32)
        v = attn.v_proj.weight.float().reshape(-1, d, attn.v_proj.weight.shape[1])
        attn.v_proj.weight.copy_((h.T @ v).reshape(attn.v_proj.weight.shape))
        if attn.v_proj.bias is not None:
            b = attn.v_proj.bias.float().reshape(-1, d)
            attn.v_proj.bias.copy_((b @ h).reshape(-1))
        o = attn.o_proj.weight.float().reshape(attn.o_proj.weight.shape[0], -1, d)
        attn.o_proj.weight.copy_((o @ h).reshape(attn.o_proj.weight.shape))
