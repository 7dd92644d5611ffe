"""Decoding step by step under an evaluation scheme, in the ``deployed`` protocol.

The passkey task's baselines (``rtn``, ``kivi``, ``rotatekv-eval``) have no packed cache, so each
answer token used to re-run the whole prompt through :class:`~.perplexity._SchemeAttention`: about
eight full forwards of an 8k prompt per trial. :class:`SchemeDecodeAttention` keeps, per layer, what
those re-runs recomputed unchanged (pre-RoPE keys, values, RoPE angles, the online sink flags) and
attends only the new tokens' queries. It gives what the re-run gives: causal attention means no
earlier position changes when tokens are appended, the sink flags of a token depend on its own
hidden state (and on how many sinks came before it), and every key older than the recent window sits
in a quantization group that is already complete (the schemes quantize per token, KIVI's keys in
blocks of 32 tokens: exact for a window of at least 31 tokens, the default being 128). The keys are
quantized again each step, as the re-run did, from the full-precision keys kept here.
"""

from __future__ import annotations

import torch

from ..export.format import Checkpoint
from ..models.adapters import attention_softcap, attention_window
from ..quant.sinks import detect_sinks
from ..runtime.ops import apply_rope
from ..runtime.salient import salient_flags
from .perplexity import _kept_fp_attention, _Shape
from .schemes import Scheme

__all__ = ["SchemeDecodeAttention"]


class _LayerState:
    """One layer's history: pre-RoPE keys and values ``[B, Hkv, T, d]``, RoPE ``cos``/``sin``
    ``[B or 1, T, d]`` and the sink flags ``bool [B, T]`` (``None`` for a scheme without sinks)."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None
        self.sinks: torch.Tensor | None = None

    def append(self, key, value, cos, sin, sinks) -> None:
        join = lambda old, new, dim: new if old is None else torch.cat([old, new], dim)  # noqa: E731
        self.keys, self.values = join(self.keys, key, 2), join(self.values, value, 2)
        self.cos, self.sin = join(self.cos, cos, 1), join(self.sin, sin, 1)
        if sinks is not None:
            self.sinks = join(self.sinks, sinks, 1)


class SchemeDecodeAttention:
    """Attention handler for one sequence batch fed in pieces (prompt, then one token at a time).

    Call the model with the new token ids only and ``position_ids`` continuing from the tokens
    already seen; every query reads keys ``j <= i - window`` through ``scheme`` (sinks in full
    precision for a scheme that keeps them) and the rest in full precision, as the ``deployed``
    protocol of :func:`~.perplexity.perplexity` does. A scheme that keeps sinks also keeps the
    checkpoint's ``salient_tokens`` of the first piece (the prompt) in full precision, picked as the
    runtime's prefill picks them (:func:`~rkv_convert.runtime.salient.salient_flags`).
    """

    def __init__(self, scheme: Scheme, checkpoint: Checkpoint, recent_window: int, query_chunk: int = 1024) -> None:
        self.scheme, self.checkpoint, self.window, self.query_chunk = scheme, checkpoint, recent_window, query_chunk
        self.layers: dict[int, _LayerState] = {}

    def __call__(self, module, query, key, value, position_embeddings, attention_mask, cache, layer_input, **kw):
        layer = module.layer_idx
        state = self.layers.setdefault(layer, _LayerState())
        start = 0 if state.keys is None else state.keys.shape[2]
        cos, sin = position_embeddings
        sinks = None
        if self.scheme.uses_sinks:
            info = self.checkpoint.layers[layer]
            sinks = detect_sinks(layer_input, info.sink_channels, info.sink_threshold, self.checkpoint.config.max_sinks)
            if state.sinks is not None:  # the first max_sinks of the whole sequence, not of this piece
                before = state.sinks.sum(-1, keepdim=True)
                sinks = sinks & (before + sinks.cumsum(-1) <= self.checkpoint.config.max_sinks)
        n_salient = self.checkpoint.config.salient_tokens
        if sinks is not None and n_salient and start == 0 and key.shape[2] > 1:  # the prompt, as the runtime's prefill
            q_post = apply_rope(query, cos.unsqueeze(1), sin.unsqueeze(1))
            k_post = apply_rope(key, cos.unsqueeze(1), sin.unsqueeze(1))
            sinks = sinks | salient_flags(q_post, k_post, None, n_salient, self.window, module.scaling, exclude=sinks)
        state.append(key, value, cos, sin, sinks)
        q = apply_rope(query, cos.unsqueeze(1), sin.unsqueeze(1)).to(query.dtype)
        k_fp = apply_rope(state.keys, state.cos.unsqueeze(1), state.sin.unsqueeze(1)).to(key.dtype)
        kq = self.scheme.keys(layer, state.keys, state.cos, state.sin)
        vq = self.scheme.values(layer, state.values)
        shape = _Shape(module.scaling, attention_softcap(module), attention_window(module))
        out = _kept_fp_attention(q, kq, vq, k_fp, state.values, state.sinks, self.window, shape, self.query_chunk, start)
        b, _, t, _ = q.shape
        return out.transpose(1, 2).reshape(b, t, -1)
