"""Fuse the value rotation into the weights: the value rows by ``H^T``, ``o_proj`` columns by ``H``.

With values as row vectors ``v_rot = v @ H``: head ``h``'s value rows ``W_h`` become ``H^T W_h``
(bias too), and each query head's ``o_proj`` input columns ``O_j`` become ``O_j H``. Attention is
linear in V, so logits are unchanged up to rounding (design notes §1). Where the value rows sit
(``v_proj``, or the last rows of a fused ``qkv_proj``) is the family adapter's knowledge
(:attr:`~rkv_convert.models.adapters.FamilyAdapter.value_rows`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.adapters import adapter_for, attention_modules

__all__ = ["fuse_value_rotation"]


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
