"""The packed-cache operations the runtime calls, in one place.

Three ops touch packed storage: quantize+pack keys, quantize+pack values, and decode attention.
Triton kernels for them live in ``rkv_convert.kernels`` (each with a pure-torch ``*_ref``); this
module binds the runtime to them and adds the reference dequantizers the multi-token path uses.

One reference per piece of math: RoPE (:func:`rope_cos_sin`, :func:`apply_rope`, :func:`rope`),
the folded key transform (:func:`fold_keys`, :func:`unfold_keys`) and one dequantizer per key
layout (:func:`dequantize_keys` for ``prerope``, :func:`dequantize_folded_keys` for ``folded``)
plus :func:`dequantize_values`. The CPU runtime, ``rkv eval`` (``quant.codec``) and the kernels'
tests call these.
"""

from __future__ import annotations

import torch

from ..quant.packing import unpack_codes
from ..quant.quantizer import group_scale_zero

__all__ = [
    "rope",
    "rope_cos_sin",
    "apply_rope",
    "rotate_half",
    "fold_keys",
    "unfold_keys",
    "dequantize_keys",
    "dequantize_folded_keys",
    "dequantize_values",
    "attend_reference",
]


_HALVES_FROM = 1 << 21  # elements: below, one concatenation is one launch fewer (decode steps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``rotate_half`` (``cat(-x2, x1)`` on the last dim), bitwise. From ``_HALVES_FROM``
    elements on (a prefill's queries and keys) it writes the two halves of one tensor with ``x``'s strides
    instead: concatenating strided halves runs CUDA's general batched copy, which in a profiled 4k-token
    prefill took about 91 us per call against 21 us for the negation."""
    half = x.shape[-1] // 2
    if x.numel() < _HALVES_FROM:
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    out = torch.empty_like(x)
    out[..., :half] = x[..., half:]
    out[..., :half].neg_()  # in place on the view: differentiable, where neg(out=) is not
    out[..., half:] = x[..., :half]
    return out


def rope_cos_sin(pos: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos, sin [B, 1, T, d]`` at integer positions ``pos [B, T]`` (times ``attention_scaling``),
    as transformers' rotary embeddings compute them (rotate-half layout: angle ``i mod d/2``)."""
    freqs = pos.to(torch.float32)[:, None, :, None] * inv_freq.to(pos.device, torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` in fp32; ``cos, sin`` broadcast against ``x [B, H, T, d]``."""
    xf = x.float()
    return xf * cos.float() + rotate_half(xf) * sin.float()


def rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float) -> torch.Tensor:
    """RoPE of ``x [B, H, T, d]`` at integer positions ``pos [B, T]`` in fp32 (HF's rotate-half layout)."""
    return apply_rope(x, *rope_cos_sin(pos.to(x.device), inv_freq, attention_scaling))


def fold_keys(k_post: torch.Tensor, mean_rope: torch.Tensor, rotation: torch.Tensor,
              operands: torch.dtype = torch.float32) -> torch.Tensor:
    """Folded keys ``y = (k_post - RoPE_n(mu)) @ R_h``, fp32 ``[B, n_kv, T, d]``.

    ``k_post [B, n_kv, T, d]`` post-RoPE keys (any float dtype), ``mean_rope`` the head means
    RoPE'd at each key's position (broadcastable, e.g. ``rope(mean[None, :, None], pos, ...)``),
    ``rotation fp32 [n_kv, d, d]`` one orthonormal ``R_h`` per KV head. ``operands=torch.float16``
    rounds the centred keys and ``R_h`` to fp16 before the product (sums in fp32): the cache-write
    kernel's math for fp16/bf16 keys (``kernels.encode_folded``).
    """
    x = k_post.float() - mean_rope
    r = rotation.to(k_post.device, torch.float32)
    if operands != torch.float32:
        x, r = x.to(operands).float(), r.to(operands).float()
    return x @ r[None]


def unfold_keys(y: torch.Tensor, mean_rope: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Post-RoPE keys ``y @ R_h^T + RoPE_n(mu)`` (the inverse of :func:`fold_keys`), fp32."""
    return y.float() @ rotation.to(y.device, torch.float32).transpose(-1, -2)[None] + mean_rope


def mean_at(mean: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float) -> torch.Tensor:
    """``RoPE_n(mu_h)`` fp32 ``[B, n_kv, T, d]`` for head means ``mean [n_kv, d]`` at ``pos [B, T]`` (-1 read as 0)."""
    b, t = pos.shape
    mu = mean.to(pos.device, torch.float32)[None, :, None, :].expand(b, -1, t, -1)
    return rope(mu, pos.clamp_min(0), inv_freq, attention_scaling)


def dequantize_keys(
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    k_gid: torch.Tensor,
    k_mean: torch.Tensor,
    rotation: torch.Tensor,
    bits: int,
    head_dim: int,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Pre-RoPE keys ``fp32 [B, n_kv, T, d]`` from the packed store (reference math of the codec).

    ``compute_dtype`` rounds the unrotation's operands (kernel tests: the error a kernel computing
    in that precision may have); the default is exact fp32.
    """
    n_hg, gd = k_gid.shape
    codes = unpack_codes(k_codes, bits, gd).float()  # [B, n_hg, T, Gd], rotated channel order
    gid = k_gid.long().to(codes.device)[None, :, None, :].expand_as(codes)
    scale = k_scale.float().gather(-1, gid)
    zero = k_zero.float().gather(-1, gid)
    y = codes * scale + zero
    r_t = rotation.to(y.device, torch.float32).T
    x = (y.to(compute_dtype) @ r_t.to(compute_dtype)).float() + k_mean.to(y.device, torch.float32).view(n_hg, 1, gd)
    b, _, t, _ = x.shape
    g = gd // head_dim
    return x.view(b, n_hg, t, g, head_dim).transpose(2, 3).reshape(b, n_hg * g, t, head_dim)


def dequantize_folded_keys(
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    pos: torch.Tensor,
    rotation: torch.Tensor,
    mean: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    bits: int,
    meta_base: float | None = None,
) -> torch.Tensor:
    """Post-RoPE keys ``fp32 [B, n_kv, T, d]`` from a folded store (``KeyLayout.FOLDED``).

    ``k_codes uint8 [B, n_kv, T, d*b/8]``, ``k_scale/k_zero [B, n_kv, T, d/g_k]`` (groups of consecutive
    channels of ``y``; fp16, or 8-bit codes with ``meta_base``), ``pos int32 [B, T]`` (-1: empty, read at 0),
    ``rotation fp32 [n_kv, d, d]``, ``mean fp32 [n_kv, d]``.
    """
    d = rotation.shape[-1]
    y = dequantize_values(k_codes, k_scale, k_zero, bits, d, meta_base)
    return unfold_keys(y, mean_at(mean, pos, inv_freq, attention_scaling), rotation)


def dequantize_values(v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, bits: int, head_dim: int,
                      meta_base: float | None = None) -> torch.Tensor:  # fmt: skip
    """Rotated values ``fp32 [B, n_kv, T, d]`` from the packed store (groups of consecutive channels);
    ``meta_base``: scales and zeros stored as 8-bit codes (``quant.quantizer.group_scale_zero``)."""
    if v_codes.numel() == 0:  # unpack cannot view an empty tensor with -1
        return torch.zeros(*v_codes.shape[:-1], head_dim, device=v_codes.device)
    codes = unpack_codes(v_codes, bits, head_dim).float()
    group = head_dim // v_scale.shape[-1]
    grouped = codes.view(*codes.shape[:-1], -1, group)
    scale, zero = group_scale_zero(v_scale, v_zero, meta_base)
    out = grouped * scale.unsqueeze(-1) + zero.unsqueeze(-1)
    return out.view(codes.shape)


def attend_reference(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    k_pos: torch.Tensor,
    scaling: float,
    q_pos: torch.Tensor | None = None,
    softcap: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Full-precision attention of post-RoPE ``q [B, n_q, Tq, d]`` over post-RoPE ``keys [B, n_kv, N, d]``.

    ``k_pos [B, N]``: each key's position (-1: empty, never attended); with ``q_pos [B, Tq]`` a key
    is seen only by queries at a position >= its own (causal by position). A query that sees no
    key gets zeros. ``softcap`` (Gemma 2): scores become ``softcap * tanh(scores / softcap)``; ``window`` (sliding-window
    layers, needs ``q_pos``): a query sees only keys less than ``window`` positions behind it. Returns fp32 ``[B, n_q, Tq, d]``.
    """
    b, n_q, tq, d = q.shape
    n_kv = keys.shape[1]
    k = keys.float()
    qf = q.float().view(b, n_kv, n_q // n_kv, tq, d)
    scores = torch.einsum("bhrqd,bhnd->bhrqn", qf, k) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    visible = (k_pos >= 0)[:, None, :].expand(b, tq, -1)
    if q_pos is not None:
        visible = visible & (k_pos[:, None, :] <= q_pos[:, :, None])
        if window is not None:
            visible = visible & (k_pos[:, None, :] > q_pos[:, :, None] - window)
    visible = visible[:, None, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhrqn,bhnd->bhrqd", probs, values.float())
    return out.reshape(b, n_q, tq, d)

