"""Perplexity of an exported checkpoint under each KV scheme, in three protocols (design notes §4).

- ``oneshot``: every token's key and value is read back quantized (the papers' protocol).
- ``sinks``: the online-detected sink tokens (RotateKV, or a scheme built with sinks) stay in full
  precision, nothing else (``deployed`` with no recent window).
- ``deployed``: what the runtime keeps in full precision stays so: keys/values of the last
  ``recent_window`` tokens before each query, and the online-detected sink tokens.

Windows may be as long as the model's context: attention runs in blocks of query rows and the
vocabulary logits in blocks of positions, so no ``T × T`` or ``T × vocab`` tensor is held.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..export.format import Checkpoint
from ..models.adapters import attach, attention_softcap, attention_window
from ..quant.sinks import detect_sinks
from ..runtime.ops import apply_rope
from .schemes import Scheme

__all__ = ["EvalResult", "token_windows", "perplexity", "PROTOCOLS"]

PROTOCOLS = ("oneshot", "sinks", "deployed")
QUERY_CHUNK = 1024
"""Query rows per attention block in the ``sinks`` and ``deployed`` protocols (memory: one block's scores)."""


def token_windows(tokenizer: object, text: str, length: int, count: int | None) -> torch.Tensor:
    """Tokenize ``text`` once and cut non-overlapping windows: ``int64 [n, length]``."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    available = ids.numel() // length
    if available == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {length}")
    n = available if count is None else min(count, available)
    return ids[: n * length].reshape(n, length)


class _SchemeAttention:
    """Attention handler: full-precision queries against the scheme's read-back keys and values.

    Memory stays linear in the window at every protocol: ``oneshot`` (and full precision) is one
    causal SDPA call, which tiles the queries itself; ``sinks`` and ``deployed`` attend in blocks of
    ``query_chunk`` query rows, each against the keys before its end (:func:`_kept_fp_attention`).
    ``fp_tokens`` sums, over layers and sequences, the tokens held in full precision at the last query.
    """

    def __init__(self, scheme: Scheme, protocol: str, checkpoint: Checkpoint, recent_window: int,
                 query_chunk: int = QUERY_CHUNK) -> None:
        self.scheme, self.protocol, self.checkpoint, self.window = scheme, protocol, checkpoint, recent_window
        self.query_chunk = query_chunk
        self.fp_tokens, self.sequences = 0.0, 0

    def __call__(self, module, query, key, value, position_embeddings, attention_mask, cache, layer_input, **kw):
        layer = module.layer_idx
        cos, sin = position_embeddings
        cos_h, sin_h = cos.unsqueeze(1), sin.unsqueeze(1)
        q = apply_rope(query, cos_h, sin_h).to(query.dtype)
        kq = self.scheme.keys(layer, key, cos, sin)
        vq = self.scheme.values(layer, value)
        b, _, t, _ = q.shape
        self.sequences += b
        shape = _Shape(module.scaling, attention_softcap(module), attention_window(module))
        if self.protocol == "oneshot" or self.scheme.bits >= 16:
            self.fp_tokens += b * t if self.scheme.bits >= 16 else 0
            if shape.softcap is None and (shape.sliding is None or shape.sliding >= t):
                out = F.scaled_dot_product_attention(q, kq, vq, is_causal=True, scale=module.scaling, enable_gqa=True)
            else:
                out = _kept_fp_attention(q, kq, vq, kq, vq, None, 0, shape, self.query_chunk)
            return out.transpose(1, 2).reshape(b, t, -1)
        window = 0 if self.protocol == "sinks" else self.window
        k_fp = apply_rope(key, cos_h, sin_h).to(key.dtype)
        sinks = None
        if self.scheme.uses_sinks:
            info = self.checkpoint.layers[layer]
            sinks = detect_sinks(layer_input, info.sink_channels, info.sink_threshold, self.checkpoint.config.max_sinks)
        self.fp_tokens += b * min(window, t) + (0 if sinks is None else int(sinks[:, : max(t - window, 0)].sum()))
        out = _kept_fp_attention(q, kq, vq, k_fp, value, sinks, window, shape, self.query_chunk)
        return out.transpose(1, 2).reshape(b, t, -1)


@dataclass(frozen=True)
class _Shape:
    """What of a layer's attention the evaluation must reproduce besides the keys: the score scale,
    the soft cap (Gemma 2: ``cap * tanh(s / cap)``) and the sliding window (query ``i`` sees ``j > i - sliding``)."""

    scale: float
    softcap: float | None = None
    sliding: int | None = None


def _attend(q, k, v, mask, shape: _Shape):
    """Masked attention (GQA); SDPA unless a soft cap is applied to the scores."""
    if shape.softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=shape.scale, enable_gqa=True)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    dtype = torch.promote_types(q.dtype, torch.float32)  # half models in fp32, a float64 model stays float64
    scores = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * shape.scale
    scores = shape.softcap * torch.tanh(scores / shape.softcap)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (probs @ v.to(dtype)).to(q.dtype)


def _kept_fp_attention(q, k_q, v_q, k_fp, v_fp, sinks, window, shape: _Shape, query_chunk, q_start: int = 0):
    """Causal attention where query ``i`` reads key/value ``j`` in full precision when
    ``i - j < window`` or ``j`` is a sink, and the quantized read-back otherwise.

    One softmax over two disjoint key sets, concatenated per block of ``query_chunk`` queries
    ``[s, e)``: the *far* keys ``j <= i - window`` (quantized, sinks swapped for their full-precision
    rows) and the *near* keys ``max(0, s - window + 1) <= j < e`` in full precision, each with a
    boolean mask. ``q [B, Hq, Tq, d]`` holds the queries at positions ``q_start .. q_start + Tq - 1``
    (the last ``Tq`` of ``T``: decoding step by step), keys and values ``[B, Hkv, T, d]``, ``sinks``
    bool ``[B, T]`` or ``None``; returns ``[B, Hq, Tq, d]``. The largest tensor is one block's scores.
    ``shape``: the layer's scale, soft cap and sliding window (keys outside it are masked in both sets).
    """
    if sinks is not None:
        keep = sinks[:, None, :, None]
        k_q, v_q = torch.where(keep, k_fp, k_q), torch.where(keep, v_fp, v_q)
    t = q_start + q.shape[2]
    if k_q.shape[2] != t:
        raise ValueError(f"{q.shape[2]} queries from position {q_start} need {t} keys, got {k_q.shape[2]}")
    pos = torch.arange(t, device=q.device)
    outs = []
    for s in range(q_start, t, query_chunk):
        e = min(s + query_chunk, t)
        i = pos[s:e, None]
        keys, values, masks = [k_q[:, :, :e]], [v_q[:, :, :e]], [pos[None, :e] <= i - window]
        if window > 0:
            lo = max(0, s - window + 1)
            near = pos[None, lo:e]
            keys.append(k_fp[:, :, lo:e])
            values.append(v_fp[:, :, lo:e])
            masks.append((near <= i) & (near > i - window))
        mask = torch.cat(masks, 1)
        if shape.sliding is not None:
            seen = torch.cat([pos[None, :e]] + ([pos[None, lo:e]] if window > 0 else []), 1)
            mask = mask & (seen > i - shape.sliding)
        outs.append(_attend(q[:, :, s - q_start : e - q_start], torch.cat(keys, 2), torch.cat(values, 2), mask, shape))
    return torch.cat(outs, 2)


@dataclass
class EvalResult:
    """One scheme × bits × protocol. ``fp_share``: the share of a window's tokens whose key and value
    are held in full precision at its last token (recent window plus sinks outside it, measured, averaged
    over layers and windows); 0 for ``oneshot``, 1 for full precision. ``seconds``, ``cpu_seconds``: wall
    and process CPU time (all threads) of the run."""

    scheme: str
    bits: int
    protocol: str
    key_bits: float
    value_bits: float
    effective_bits: float
    perplexity: float
    windows: int
    window_length: int
    fp_share: float = 0.0
    seconds: float = 0.0
    cpu_seconds: float = 0.0

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
    query_chunk: int = QUERY_CHUNK,
) -> EvalResult:
    """Mean next-token NLL over all windows → perplexity, for ``scheme`` under ``protocol``.

    ``sinks`` is ``deployed`` with no recent window (``recent_window`` is ignored).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    started, cpu_started = time.perf_counter(), time.process_time()
    window = checkpoint.config.recent_window if recent_window is None else recent_window
    handler = _SchemeAttention(scheme, protocol, checkpoint, window, query_chunk)
    device = next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    total, count = 0.0, 0
    with torch.no_grad(), attach(model, handler):
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(device)
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
            total += _nll_sum(head, hidden, ids, query_chunk)
            count += ids[:, 1:].numel()
            if progress:
                progress(min(start + batch_size, windows.shape[0]), windows.shape[0])
    key_bits, value_bits = scheme.bits_per_element()
    effective = (key_bits + value_bits) / 2
    if protocol == "deployed" and scheme.bits < 16:
        effective = _with_fp_tokens(effective, windows.shape[1], window)
    fp_share = handler.fp_tokens / max(handler.sequences * windows.shape[1], 1)
    return EvalResult(scheme.name, scheme.bits, protocol, key_bits, value_bits, effective, math.exp(total / count),
                      windows.shape[0], windows.shape[1], fp_share, time.perf_counter() - started,
                      time.process_time() - cpu_started)


def _nll_sum(head: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor, chunk: int) -> float:
    """Summed next-token NLL, the vocabulary logits formed ``chunk`` positions at a time."""
    total = 0.0
    for s in range(0, ids.shape[1] - 1, chunk):
        e = min(s + chunk, ids.shape[1] - 1)
        logits = head(hidden[:, s:e]).float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, s + 1 : e + 1].reshape(-1),
                                 reduction="sum").item()
    return total


def _with_fp_tokens(bits: float, length: int, window: int) -> float:
    """Average stored bits per element at a window's last token when ``window`` tokens stay fp16
    (sink tokens, at most a handful, are not counted)."""
    fp = min(window, length)
    return (fp * 16 + (length - fp) * bits) / length
