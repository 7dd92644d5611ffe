"""The rkv attention handler: what runs after the per-family q/k/v projections.

Three paths, chosen per call:

- **prefill** (the cache of this layer is empty): stock attention over the prompt in full precision
  (RoPE from the model's ``position_embeddings``, the model's own attention function and mask,
  exactly as the unmodified model), then the prompt's keys (pre-RoPE for the ``prerope`` key
  layout, post-RoPE for ``folded``) and values are written to the cache (sinks, salient tokens
  (``salient.salient_flags``) and the recent window in full precision, the rest quantized and packed);
- **decode** (one new token per sequence): the token is appended to the cache's full-precision
  segment, then the layout's decode kernel reads the packed store and the full-precision segment
  (``decode_attention`` for ``prerope``, ``decode_folded`` for ``folded``; Triton on CUDA, the
  pure-torch reference on CPU), then the window is flushed (for a static cache layer, the fixed-shape
  steps a CUDA graph replays, the caller flushes: ``runtime.decode_graph``);
- **multi-token step after prefill** (chunked prefill, speculative verification): a simple,
  correct path: the packed store is dequantized to post-RoPE keys with the layout's reference
  math (``runtime.ops``), the new tokens are appended in full precision, and attention runs in
  torch, causal by RoPE position. It costs a full dequantization per call: fine for occasional
  chunks, not for per-token decoding.

Padding: the new tokens' validity comes from the attention mask (its diagonal over the new
tokens); padding slots get position -1 in the cache and are never attended.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.decode_attention import decode_attention
from ..kernels.decode_folded import decode_folded
from ..models.adapters import attention_softcap, attention_window, rotated_attention, stock_attention
from .cache import RkvCache, RkvCacheLayer
from .ops import attend_reference, dequantize_folded_keys, dequantize_keys, dequantize_values, rope, rotate_half
from .salient import OBSERVE, salient_flags
from .sinks import flag_sinks

__all__ = ["rkv_attention", "new_token_validity", "stored_tokens"]


def new_token_validity(attention_mask: torch.Tensor | None, batch: int, q_len: int) -> torch.Tensor | None:
    """bool ``[B, T]``: which of the ``T`` newest tokens are real (not padding); ``None``: all are.

    Reads a 2D ``[B, kv]`` padding mask (1 = real) or a 4D ``[B|1, 1, T, kv]`` attention mask
    (bool: True = attend; float: 0 = attend) at each new token's own slot.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"rkv attention needs a tensor attention mask, got {type(attention_mask).__name__}")
    if attention_mask.dim() == 2:
        return attention_mask[:, -q_len:].bool().expand(batch, q_len)
    if attention_mask.dim() != 4:
        raise ValueError(f"unexpected attention mask shape {tuple(attention_mask.shape)}")
    kv = attention_mask.shape[-1]
    rows = torch.arange(q_len, device=attention_mask.device)
    diag = attention_mask[:, 0, rows, kv - q_len + rows]
    valid = diag if diag.dtype == torch.bool else diag == 0
    return valid.expand(batch, q_len)


def _positions(kwargs: dict, layer: RkvCacheLayer, batch: int, q_len: int, device: torch.device) -> torch.Tensor:
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(layer.length, layer.length + q_len, device=device)[None]
    return position_ids.to(device).expand(batch, q_len)


def stored_tokens(layer: RkvCacheLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every token the layer holds, dequantized: post-RoPE keys, values ``fp32 [B, n_kv, N, d]``, pos ``[B, N]``.

    Keys come back post-RoPE for either key layout (RoPE at each slot's position; empty slots,
    position -1, at 0): ``prerope`` dequantizes pre-RoPE keys and RoPEs them, ``folded``
    unfolds ``y @ R_h^T + RoPE_n(mu)``; the folded full-precision segment is post-RoPE already.
    """
    c = layer.codec
    inv_freq, scaling = layer.rope_or_raise()
    q, fp = layer.quantized(), layer.full_precision()
    pos = torch.cat([q["pos"], fp["fp_pos"]], dim=1)
    if c.folded:
        keys = dequantize_folded_keys(q["k_codes"], q["k_scale"], q["k_zero"], q["pos"], c.head_rotation, c.head_mean,
                                      inv_freq, scaling, c.key_bits, c.key_meta_base)  # fmt: skip
        keys = torch.cat([keys, fp["fp_k"].float()], dim=2)
    else:
        keys = dequantize_keys(q["k_codes"], q["k_scale"], q["k_zero"], c.k_gid, c.k_mean, c.rotation, c.key_bits, c.head_dim)
        keys = rope(torch.cat([keys, fp["fp_k"].float()], dim=2), pos.clamp_min(0), inv_freq, scaling)
    values = dequantize_values(q["v_codes"], q["v_scale"], q["v_zero"], c.value_bits, c.head_dim, c.value_meta_base)
    values = torch.cat([values, fp["fp_v"].float()], dim=2)
    return keys, values, pos


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [B, H, T, d]`` RoPE'd with the model's ``cos, sin [B, T, d]``: the math of transformers'
    ``apply_rotary_pos_emb`` op for op (bitwise the same), for one tensor where that function
    always rotates two."""
    return (x * cos.unsqueeze(1)) + (rotate_half(x) * sin.unsqueeze(1))


def _rope_query_key(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary_pos_emb(query, key, cos, sin)`` as one :func:`_rope` over both, heads concatenated.

    The same elementwise ops on the same values, so bitwise the same result, in six torch ops
    instead of ten: every decode step of every layer runs it, and at small batches each op's
    launch costs more host time than its GPU work. The query part is a view (not contiguous
    for a batch above one).
    """
    if query.dtype != key.dtype:  # a concatenation would promote one of them
        return _rope(query, cos, sin), _rope(key, cos, sin)
    both = _rope(torch.cat([query, key], dim=1), cos, sin)
    return both[:, : query.shape[1]], both[:, query.shape[1] :]


def _hide_outside_window(window: int | None, layer: RkvCacheLayer, pos: torch.Tensor) -> None:
    """A sliding-window layer (``window`` tokens, the query's own included) never again attends to
    positions before ``first new position - window + 1``: they are hidden before the step."""
    if window is not None and layer.length > 0:
        layer.hide_before(pos[:, 0] - window + 1)


def _flush_unless_static(layer: RkvCacheLayer) -> None:
    """A decode step's window flush; a static layer's caller flushes between steps (a captured
    graph cannot hold a step whose work depends on a host counter)."""
    if not layer.static:
        layer.flush()


def _with_salient(module: nn.Module, layer: RkvCacheLayer, q_post: torch.Tensor, k_post: torch.Tensor,
                  valid: torch.Tensor | None, sinks: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """A prefill's pinned-slot flags: its first ``max_sinks`` sinks and its ``salient_tokens`` salient tokens
    (``q_post``, ``k_post``: the prompt's post-RoPE queries and keys)."""
    s = layer.settings
    q_obs = q_post[:, :, -min(OBSERVE, q_post.shape[2]) :]
    if sinks is not None:  # the prefill's own sinks first; later ones may take slots the salient tokens left
        sinks = sinks.to(k_post.device) & (sinks.to(k_post.device).cumsum(1) <= s.max_sinks)
    salient = salient_flags(q_obs, k_post, valid, s.salient_tokens, s.recent_window, module.scaling, exclude=sinks)
    return salient if sinks is None else sinks | salient


def rkv_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    cache: object | None,
    layer_input: torch.Tensor | None = None,
    **kwargs: object,
) -> torch.Tensor:
    """An :class:`~rkv_convert.models.adapters.AttentionHandler` writing to and reading an :class:`RkvCache`."""
    if cache is None:  # a forward without cache: nothing to store, plain attention
        return stock_attention(module, query, key, value, position_embeddings, attention_mask, None, layer_input, **kwargs)
    if not isinstance(cache, RkvCache):
        raise TypeError(f"the rkv attention handler needs an RkvCache as the model's cache, got {type(cache).__name__}")
    layer: RkvCacheLayer = cache.layers[module.layer_idx]
    b, _, t, d = key.shape
    pos = _positions(kwargs, layer, b, t, key.device)
    window = attention_window(module)
    _hide_outside_window(window, layer, pos)
    valid = new_token_validity(attention_mask, b, t)
    codec = layer.codec
    folded = codec.folded
    # sink candidates (none when the layer keeps no sink slots: the append would ignore them)
    sinks = flag_sinks(layer_input, codec.sink_channels, codec.sink_threshold) if layer.settings.max_sinks else None

    cos, sin = position_embeddings
    if layer.length == 0:  # prefill: exactly the model's own attention (its RoPE, bitwise; its attention function), then store
        q_post, k_post = _rope(query, cos, sin), _rope(key, cos, sin)
        out = rotated_attention(module, q_post, k_post, value, attention_mask, **kwargs)
        if layer.settings.salient_tokens and t > 1:
            sinks = _with_salient(module, layer, q_post, k_post, valid, sinks)
        layer.append(k_post if folded else key, value, pos, valid, sinks)  # the fp segment's key: the layout's
        layer.flush()
        return out

    if folded or t > 1:  # the query and the post-RoPE key
        q_rot, k_post = _rope_query_key(query, key, cos, sin)
    else:  # pre-RoPE decode: the query alone
        q_rot, k_post = _rope(query, cos, sin), None
    k_store = k_post if folded else key  # what the full-precision segment holds (the layout's key)
    if t == 1 and folded:  # decode, folded keys: the query takes every key transform
        layer.append(k_store, value, pos, valid, sinks)
        params = codec.folded_params(*layer.rope_or_raise(), module.scaling, attention_softcap(module))
        out = decode_folded(q_rot[:, :, 0], layer.packed_kv(), params, backend=layer.backend)
        _flush_unless_static(layer)
        return out.to(query.dtype).reshape(b, 1, -1)
    if t == 1:  # decode, pre-RoPE keys: the kernel dequantizes, unrotates and RoPEs each cached key
        inv_freq, rope_scaling = layer.rope_or_raise()
        layer.append(k_store, value, pos, valid, sinks)
        out = decode_attention(
            q_rot[:, :, 0], layer.packed_kv(),
            rotation=codec.prepared_rotation(query.dtype), k_mean=codec.k_mean, k_gid=codec.k_gid,
            inv_freq=inv_freq, attention_scaling=rope_scaling, sm_scale=module.scaling,
            k_bits=codec.key_bits, v_bits=codec.value_bits,
            k_group_size=codec.key_group_size, v_group_size=codec.value_group_size,
            softcap=attention_softcap(module), backend=layer.backend,
        )  # fmt: skip
        _flush_unless_static(layer)
        return out.to(query.dtype).reshape(b, 1, -1)

    # multi-token step after prefill: attend over (dequantized cache + new tokens), then store
    keys, values, k_pos = stored_tokens(layer)  # post-RoPE keys, either layout
    new_pos = pos if valid is None else torch.where(valid, pos, torch.full_like(pos, -1))
    keys = torch.cat([keys, k_post.float()], dim=2)
    values = torch.cat([values, value.float()], dim=2)
    k_pos = torch.cat([k_pos, new_pos.to(k_pos.dtype)], dim=1)
    out = attend_reference(q_rot, keys, values, k_pos, module.scaling, q_pos=pos, softcap=attention_softcap(module),
                           window=window)
    layer.append(k_store, value, pos, valid, sinks)
    layer.flush()
    return out.to(query.dtype).transpose(1, 2).reshape(b, t, -1)
