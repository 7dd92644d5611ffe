"""Perplexity of an exported checkpoint under each KV scheme, in two protocols (design notes §4).

- ``oneshot``: every token's key and value is read back quantized (the papers' protocol).
- ``deployed``: what the runtime keeps in full precision stays so: keys/values of the last
  ``recent_window`` tokens before each query, and (RotateKV) the online-detected sink tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from ..export.format import Checkpoint
from ..models.adapters import attach
from ..quant.sinks import detect_sinks
from .schemes import Scheme

__all__ = ["EvalResult", "token_windows", "perplexity", "PROTOCOLS"]

PROTOCOLS = ("oneshot", "deployed")


def token_windows(tokenizer: object, text: str, length: int, count: int | None) -> torch.Tensor:
    """Tokenize ``text`` once and cut non-overlapping windows: ``int64 [n, length]``."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    available = ids.numel() // length
    if available == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {length}")
    n = available if count is None else min(count, available)
    return ids[: n * length].reshape(n, length)


class _SchemeAttention:
    """Attention handler: full-precision queries against the scheme's read-back keys and values."""

    def __init__(self, scheme: Scheme, protocol: str, checkpoint: Checkpoint, recent_window: int) -> None:
        self.scheme, self.protocol, self.checkpoint, self.window = scheme, protocol, checkpoint, recent_window

    def __call__(self, module, query, key, value, position_embeddings, attention_mask, cache, layer_input, **kw):
        layer = module.layer_idx
        cos, sin = position_embeddings
        q = apply_rotary_pos_emb(query, query, cos, sin)[0]
        kq = self.scheme.keys(layer, key, cos, sin)
        vq = self.scheme.values(layer, value)
        rep = module.num_key_value_groups
        if self.protocol == "oneshot" or (self.scheme.bits >= 16):
            out = F.scaled_dot_product_attention(q, repeat_kv(kq, rep), repeat_kv(vq, rep), is_causal=True, scale=module.scaling)
            return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
        k_fp = apply_rotary_pos_emb(key, key, cos, sin)[1]
        t = q.shape[2]
        pos = torch.arange(t, device=q.device)
        keep_fp = (pos[:, None] - pos[None, :]) < self.window  # [T(query), T(key)]
        keep_fp = keep_fp.unsqueeze(0).expand(q.shape[0], t, t)
        if self.scheme.uses_sinks:
            info = self.checkpoint.layers[layer]
            sinks = detect_sinks(layer_input, info.sink_channels, info.sink_threshold, self.checkpoint.config.max_sinks)
            keep_fp = keep_fp | sinks[:, None, :]
        keep_fp = keep_fp.unsqueeze(1)  # broadcast over heads
        s_fp = q.float() @ repeat_kv(k_fp, rep).float().transpose(-1, -2)
        s_q = q.float() @ repeat_kv(kq, rep).float().transpose(-1, -2)
        scores = torch.where(keep_fp, s_fp, s_q) * module.scaling
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out = (probs * keep_fp) @ repeat_kv(value, rep).float() + (probs * ~keep_fp) @ repeat_kv(vq, rep).float()
        return out.to(q.dtype).transpose(1, 2).reshape(q.shape[0], t, -1)


@dataclass
class EvalResult:
    scheme: str
    bits: int
    protocol: str
    key_bits: float
    value_bits: float
    effective_bits: float
    perplexity: float
    windows: int
    window_length: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    scheme: Scheme,
    protocol: str,
    checkpoint: Checkpoint,
    recent_window: int | None = None,
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Mean next-token NLL over all windows → perplexity, for ``scheme`` under ``protocol``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    window = checkpoint.config.recent_window if recent_window is None else recent_window
    handler = _SchemeAttention(scheme, protocol, checkpoint, window)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad(), attach(model, handler):
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(device)
            logits = model(ids, use_cache=False).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            count += ids[:, 1:].numel()
            if progress:
                progress(min(start + batch_size, windows.shape[0]), windows.shape[0])
    key_bits, value_bits = scheme.bits_per_element()
    effective = (key_bits + value_bits) / 2
    if protocol == "deployed" and scheme.bits < 16:
        effective = _with_fp_tokens(effective, windows.shape[1], window)
    return EvalResult(scheme.name, scheme.bits, protocol, key_bits, value_bits, effective, math.exp(total / count),
                      windows.shape[0], windows.shape[1])


def _with_fp_tokens(bits: float, length: int, window: int) -> float:
    """Average stored bits per element at a window's last token when ``window`` tokens stay fp16
    (sink tokens, at most a handful, are not counted)."""
    fp = min(window, length)
    return (fp * 16 + (length - fp) * bits) / length
