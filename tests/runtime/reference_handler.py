"""An evaluation-style reference of the rkv runtime, written independently of its storage.

It keeps every token's pre-RoPE key and value in full precision and, at each attention call,
replaces the tokens the runtime would hold quantized by ``KeyCodec``/``ValueCodec`` round trips
(the evaluation codecs; ``FoldedKeyCodec`` for a folded checkpoint, which gives post-RoPE keys),
then attends with the model's RoPE tables (per layer: Gemma 3's sliding layers have their own)
and plain softmax attention (with the layer's soft cap, Gemma 2). Which tokens are
quantized follows the cache's documented rules (sinks: the first ``max_sinks`` flagged real tokens
of each sequence; salient tokens: the prefill's ``salient_tokens`` picked by
``runtime.salient.salient_flags`` among the others; window: flushed in whole blocks of ``flush_block``
once it holds ``recent_window + flush_block`` tokens), simulated here from token counts alone.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from rkv_convert.export.format import Checkpoint
from rkv_convert.models.adapters import attention_window, layer_rope, layer_softcaps, stock_attention
from rkv_convert.evaluate.schemes import key_codecs, value_codecs
from rkv_convert.runtime.attention import new_token_validity
from rkv_convert.runtime.cache import CacheSettings
from rkv_convert.runtime.ops import rope_cos_sin
from rkv_convert.runtime.salient import salient_flags
from rkv_convert.runtime.sinks import flag_sinks


class _Schedule:
    """How many leading slots the runtime holds in its quantized store (counts only)."""

    def __init__(self, settings: CacheSettings) -> None:
        self.s, self.n_quant, self.n_window = settings, 0, 0

    def append(self, t: int) -> None:
        cap = self.s.recent_window + self.s.flush_block
        if self.n_window + t <= cap:
            self.n_window += t
            return
        total = self.n_window + t
        moved = -(-(total - cap) // self.s.flush_block) * self.s.flush_block
        self.n_quant, self.n_window = self.n_quant + moved, total - moved

    def flush(self) -> None:
        if self.n_window >= self.s.recent_window + self.s.flush_block:
            moved = (self.n_window - self.s.recent_window) // self.s.flush_block * self.s.flush_block
            self.n_quant, self.n_window = self.n_quant + moved, self.n_window - moved


class _LayerState:
    def __init__(self, settings: CacheSettings) -> None:
        self.k = self.v = self.pos = self.valid = self.kept = None
        self.schedule = _Schedule(settings)
        self.max_sinks, self.pinned = settings.max_sinks, settings.pinned_slots

    def append(self, k, v, pos, valid, sinks, salient=None) -> None:
        flagged = sinks & valid
        before = torch.zeros(k.shape[0], dtype=torch.long) if self.kept is None else self.kept.sum(1)
        rank = before[:, None] + flagged.long().cumsum(1) - 1
        if salient is None:  # later sinks may take any pinned slot left free
            kept = flagged & (rank < self.pinned)
        else:  # the prefill: its first max_sinks sinks, then its salient tokens
            kept = (flagged & (rank < self.max_sinks)) | salient
        k = torch.where(valid[:, None, :, None], k.float(), 0.0)  # padding may carry anything
        v = torch.where(valid[:, None, :, None], v.float(), 0.0)
        cat = lambda old, new, dim: new if old is None else torch.cat([old, new], dim)  # noqa: E731
        self.k, self.v = cat(self.k, k.float(), 2), cat(self.v, v.float(), 2)
        self.pos, self.valid, self.kept = cat(self.pos, pos, 1), cat(self.valid, valid, 1), cat(self.kept, kept, 1)


class EvalReference:
    """An attention handler (see module docstring); one instance per generation."""

    def __init__(self, model, checkpoint: Checkpoint, settings: CacheSettings) -> None:
        cfg = checkpoint.config
        self.ropes, self.softcaps = layer_rope(model), layer_softcaps(model)
        self.folded = cfg.folded
        self.keys = key_codecs(checkpoint, None)  # the evaluation's codecs: each layer's widths, clips, metadata
        self.values = value_codecs(checkpoint, None)
        self.layers = checkpoint.layers
        self.state = [_LayerState(settings) for _ in checkpoint.layers]
        self.settings = settings

    def _attend(self, module, q_rot, st: _LayerState, n_quant: int, q_pos, causal: bool):
        i = module.layer_idx
        b, n_kv, n, d = st.k.shape
        k, v = st.k.clone(), st.v.clone()
        quant = torch.zeros(b, n, dtype=torch.bool)
        quant[:, :n_quant] = True
        quant &= ~st.kept
        cos, sin = (t.squeeze(1) for t in rope_cos_sin(st.pos.clamp_min(0), *self.ropes[i]))
        if self.folded:  # the folded codec reads post-RoPE keys back
            k_hat = self.keys[i].roundtrip(k, cos, sin)
            k = torch.where(quant[:, None, :, None], k_hat, apply_rotary_pos_emb(k, k, cos, sin)[0])
        else:
            flat = k.transpose(1, 2).reshape(b, n, n_kv * d)
            k_hat = self.keys[i].roundtrip(flat).view(b, n, n_kv, d).transpose(1, 2)
            k = apply_rotary_pos_emb(*(2 * [torch.where(quant[:, None, :, None], k_hat, k)]), cos, sin)[0]
        v_hat = self.values[i].roundtrip(v)
        v = torch.where(quant[:, None, :, None], v_hat, v)
        visible = (st.valid & (st.pos >= 0))[:, None, :]
        if causal:
            visible = visible & (st.pos[:, None, :] <= q_pos[:, :, None])
        window = attention_window(module)  # sliding-window layers: only the last `window` positions
        if window is not None:
            visible = visible & (st.pos[:, None, :] > q_pos[:, :, None] - window)
        rep = q_rot.shape[1] // n_kv
        scores = q_rot.float() @ repeat_kv(k, rep).transpose(-1, -2) * module.scaling
        if self.softcaps[i] is not None:
            scores = self.softcaps[i] * torch.tanh(scores / self.softcaps[i])
        probs = torch.softmax(scores.masked_fill(~visible[:, None], float("-inf")), dim=-1)
        out = probs @ repeat_kv(v, rep)
        return out.transpose(1, 2).reshape(b, q_rot.shape[2], -1)

    def __call__(self, module, q, k, v, pe, mask, cache, layer_input, **kw):
        st = self.state[module.layer_idx]
        b, _, t, _ = k.shape
        pos = kw["position_ids"].expand(b, t)
        valid = new_token_validity(mask, b, t)
        valid = torch.ones(b, t, dtype=torch.bool) if valid is None else valid
        layer = self.layers[module.layer_idx]
        sinks = flag_sinks(layer_input, layer.sink_channels, layer.sink_threshold)
        sinks = torch.zeros(b, t, dtype=torch.bool) if sinks is None else sinks
        if st.k is None:
            out = stock_attention(module, q, k, v, pe, mask, None, layer_input, **kw)
            salient = None
            if self.settings.salient_tokens and t > 1:
                first = sinks & valid & ((sinks & valid).cumsum(1) <= self.settings.max_sinks)
                q_post, k_post = apply_rotary_pos_emb(q, k, *pe)
                salient = salient_flags(q_post, k_post, valid, self.settings.salient_tokens, self.settings.recent_window,
                                        module.scaling, exclude=first)  # fmt: skip
            st.append(k, v, pos, valid, sinks, salient)
            st.schedule.append(t)
            st.schedule.flush()
            return out
        cos, sin = pe
        q_rot = apply_rotary_pos_emb(q, q, cos, sin)[0]
        if t == 1:
            st.append(k, v, pos, valid, sinks)
            st.schedule.append(1)
            out = self._attend(module, q_rot, st, st.schedule.n_quant, pos, causal=False)
            st.schedule.flush()
            return out.to(q.dtype)
        n_quant = st.schedule.n_quant
        st.append(k, v, pos, valid, sinks)
        out = self._attend(module, q_rot, st, n_quant, pos, causal=True)
        st.schedule.append(t)
        st.schedule.flush()
        return out.to(q.dtype)
