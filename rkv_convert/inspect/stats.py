"""Statistics behind ``rkv inspect``, gathered in one forward pass over a few windows of text.

Per layer of an exported checkpoint: mean |k| per key channel before the key transform,
after centring + rotation, and in the calibrated (permuted) order; the residual-stream
magnitudes (massive activations); the attention mass that queries give to sink tokens; and
the relative quantization error of keys and values under each KV scheme.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from ..export.format import Checkpoint
from ..models.adapters import attach, stock_attention
from ..quant.codec import rotate_groups
from ..quant.sinks import detect_sinks
from ..evaluate.schemes import Scheme, _heads_to_rows

__all__ = ["InspectStats", "collect_stats"]


@dataclass
class InspectStats:
    """Everything the plots need, as CPU tensors (``L`` layers, ``C = n_kv*d`` key channels)."""

    key_abs_before: torch.Tensor  # [L, C] mean |k| of pre-RoPE keys
    key_abs_rotated: torch.Tensor  # [L, C] mean |R(k - mean)|, rotated channel order
    key_abs_reordered: torch.Tensor  # [L, C] the same in permuted order (quantization groups consecutive)
    key_group_size: int
    hidden_token_max: torch.Tensor  # [L, T] max |h| per token of the first window
    hidden_ratio: torch.Tensor  # [L] largest |h| over the median |h|, all windows
    hidden_map: torch.Tensor  # [T, hidden] |h| of the first window at layer ``hidden_map_layer``
    hidden_map_layer: int
    sink_attention: torch.Tensor  # [L] mean attention mass on detected sink tokens
    first_token_attention: torch.Tensor  # [L] mean attention mass on token 0
    sinks_flagged: torch.Tensor  # [L] mean detected sinks per window
    quant_error: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # scheme → {"key","value"}: [L]


class _Recorder:
    def __init__(self, checkpoint: Checkpoint, schemes: dict[str, Scheme], map_layer: int) -> None:
        self.ck, self.schemes, self.map_layer = checkpoint, schemes, map_layer
        n = checkpoint.config.num_layers
        self.sums: dict[str, list] = {k: [0.0] * n for k in ("before", "rotated", "sink_att", "first_att", "sinks")}
        self.tokens = [0] * n
        self.windows = [0] * n
        self.err = {name: {"key": [[0.0, 0.0] for _ in range(n)], "value": [[0.0, 0.0] for _ in range(n)]} for name in schemes}
        self.token_max: list[torch.Tensor | None] = [None] * n
        self.ratio = [0.0] * n
        self.hidden_map: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, module, query, key, value, position_embeddings, attention_mask, cache, layer_input, **kw):
        i, info, cfg = module.layer_idx, self.ck.layers[module.layer_idx], self.ck.config
        rows = _heads_to_rows(key).reshape(-1, key.shape[1] * key.shape[3]).float()
        rotated = rotate_groups(rows - info.key_mean.to(rows.device), self.ck.key_rotation.to(rows.device))
        self.sums["before"][i] = self.sums["before"][i] + rows.abs().sum(0).cpu()
        self.sums["rotated"][i] = self.sums["rotated"][i] + rotated.abs().sum(0).cpu()
        self.tokens[i] += rows.shape[0]

        h = layer_input.float().abs()
        if self.token_max[i] is None:
            self.token_max[i] = h[0].amax(-1).cpu()
            self.ratio[i] = float(h.amax() / h.flatten()[::97].median().clamp_min(1e-12))
            if i == self.map_layer:
                self.hidden_map = h[0].cpu()

        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(query, key, cos, sin)
        scores = (q.float() @ repeat_kv(k, module.num_key_value_groups).float().transpose(-1, -2)) * module.scaling
        t = q.shape[2]
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # [B, H, T, T]
        sinks = detect_sinks(layer_input, info.sink_channels, info.sink_threshold, cfg.max_sinks)  # [B, T]
        mass = (probs * sinks[:, None, None, :]).sum(-1)  # [B, H, T]
        self.sums["sink_att"][i] += float(mass[..., 1:].mean()) * q.shape[0]
        self.sums["first_att"][i] += float(probs[..., 1:, 0].mean()) * q.shape[0]
        self.sums["sinks"][i] += float(sinks.sum())
        self.windows[i] += q.shape[0]

        for name, scheme in self.schemes.items():
            kq = scheme.keys(i, key, cos, sin)
            vq = scheme.values(i, value)
            for which, ref, got in (("key", k, kq), ("value", value, vq)):
                acc = self.err[name][which][i]
                acc[0] += float((got.float() - ref.float()).pow(2).sum())
                acc[1] += float(ref.float().pow(2).sum())
        return stock_attention(module, query, key, value, position_embeddings, attention_mask, cache, **kw)

    def result(self) -> InspectStats:
        before = torch.stack([s / n for s, n in zip(self.sums["before"], self.tokens)])
        rotated = torch.stack([s / n for s, n in zip(self.sums["rotated"], self.tokens)])
        reordered = torch.stack([r[layer.key_perm] for r, layer in zip(rotated, self.ck.layers)])
        w = torch.tensor(self.windows, dtype=torch.float32)
        return InspectStats(
            key_abs_before=before, key_abs_rotated=rotated, key_abs_reordered=reordered,
            key_group_size=self.ck.config.key_group_size,
            hidden_token_max=torch.stack(self.token_max), hidden_ratio=torch.tensor(self.ratio),
            hidden_map=self.hidden_map, hidden_map_layer=self.map_layer,
            sink_attention=torch.tensor(self.sums["sink_att"]) / w, first_token_attention=torch.tensor(self.sums["first_att"]) / w,
            sinks_flagged=torch.tensor(self.sums["sinks"]) / w,
            quant_error={name: {which: torch.tensor([a / max(b, 1e-30) for a, b in acc]) for which, acc in per.items()}
                         for name, per in self.err.items()},
        )


def collect_stats(model: torch.nn.Module, checkpoint: Checkpoint, windows: torch.Tensor, schemes: dict[str, Scheme],
                  map_layer: int | None = None) -> InspectStats:
    """One pass over ``windows`` (``int64 [n, T]``, one window at a time) of an exported model."""
    n = checkpoint.config.num_layers
    recorder = _Recorder(checkpoint, schemes, n // 2 if map_layer is None else map_layer)
    device = next(model.parameters()).device
    with torch.no_grad(), attach(model, recorder):
        for row in windows:
            model(row[None].to(device), use_cache=False)
    return recorder.result()
