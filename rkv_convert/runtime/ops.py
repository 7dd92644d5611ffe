"""The packed-cache operations the runtime calls, in one place.

Three ops touch packed storage: quantize+pack keys, quantize+pack values, and decode attention.
Triton kernels for them live in ``rkv_convert.kernels`` (each with a pure-torch ``*_ref``); this
module binds the runtime to them and adds the reference dequantizers the multi-token path uses.
"""

from __future__ import annotations

import torch

from ..quant.packing import unpack_codes

__all__ = [
    "rope",
    "rotate_half",
    "dequantize_keys",
    "dequantize_values",
]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float) -> torch.Tensor:
    """RoPE of ``x [B, H, T, d]`` at integer positions ``pos [B, T]`` in fp32 (HF's rotate-half layout)."""
    freqs = pos.to(torch.float32)[:, None, :, None] * inv_freq.to(x.device, torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos() * attention_scaling, emb.sin() * attention_scaling
    xf = x.float()
    return xf * cos + rotate_half(xf) * sin


def dequantize_keys(
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    k_gid: torch.Tensor,
    k_mean: torch.Tensor,
    rotation: torch.Tensor,
    bits: int,
    head_dim: int,
) -> torch.Tensor:
    """Pre-RoPE keys ``fp32 [B, n_kv, T, d]`` from the packed store (reference math of the codec)."""
    n_hg, gd = k_gid.shape
    codes = unpack_codes(k_codes, bits, gd).float()  # [B, n_hg, T, Gd], rotated channel order
    gid = k_gid.long().to(codes.device)[None, :, None, :].expand_as(codes)
    scale = k_scale.float().gather(-1, gid)
    zero = k_zero.float().gather(-1, gid)
    y = codes * scale + zero
    x = y @ rotation.to(y.device, torch.float32).T + k_mean.to(y.device, torch.float32).view(n_hg, 1, gd)
    b, _, t, _ = x.shape
    g = gd // head_dim
    return x.view(b, n_hg, t, g, head_dim).transpose(2, 3).reshape(b, n_hg * g, t, head_dim)


def dequantize_values(v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """Rotated values ``fp32 [B, n_kv, T, d]`` from the packed store."""
    codes = unpack_codes(v_codes, bits, head_dim).float()
    group = head_dim // v_scale.shape[-1]
    grouped = codes.view(*codes.shape[:-1], -1, group)
    out = grouped * v_scale.float().unsqueeze(-1) + v_zero.float().unsqueeze(-1)
    return out.view(codes.shape)


def attend_reference(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    k_pos: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    scaling: float,
    q_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full-precision attention of post-RoPE ``q [B, n_q, Tq, d]`` over pre-RoPE ``keys [B, n_kv, N, d]``.

    Keys are RoPE'd at ``k_pos [B, N]`` (-1: empty, never attended); with ``q_pos [B, Tq]`` a key is
    seen only by queries at a position >= its own (causal by position). A query that sees no key
    gets zeros. Returns fp32 ``[B, n_q, Tq, d]``.
    """
    b, n_q, tq, d = q.shape
    n_kv = keys.shape[1]
    k = rope(keys, k_pos.clamp_min(0), inv_freq, attention_scaling)
    qf = q.float().view(b, n_kv, n_q // n_kv, tq, d)
    scores = torch.einsum("bhrqd,bhnd->bhrqn", qf, k) * scaling
    visible = (k_pos >= 0)[:, None, :].expand(b, tq, -1)
    if q_pos is not None:
        visible = visible & (k_pos[:, None, :] <= q_pos[:, :, None])
    visible = visible[:, None, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhrqn,bhnd->bhrqd", probs, values.float())
    return out.reshape(b, n_q, tq, d)

