"""``rkv calibrate``: three streaming passes over calibration text build the RotateKV artifact.

1. residual-stream magnitudes → sink channels and their online threshold, per layer;
2. per-channel mean of the pre-RoPE keys over non-sink tokens (key centring);
3. centred keys rotated by the grouped-head Hadamard → channel magnitudes (permutation)
   and row samples of keys and rotated values → clip ratios searched per layer and bit width.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from ..models.adapters import adapter_for, attach, stock_attention
from ..quant.codec import rotate_groups
from ..quant.hadamard import hadamard_matrix
from . import search
from .artifact import ARTIFACT_VERSION, CalibrationArtifact, weights_fingerprint
from .observers import ActivationObserver, KeyMeanObserver, RotatedKeyObserver, flatten_heads

__all__ = ["CalibrationOptions", "calibrate", "model_shape"]

Progress = Callable[[str, int, int], None]


@dataclass
class CalibrationOptions:
    """Calibration settings (recorded in the artifact)."""

    source: str = "pydoc"
    num_samples: int = 32
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 4
    head_group_size: int | None = None  # None: search.default_head_group_size
    key_group_size: int = 64
    value_group_size: int = 64
    sink_ratio: float = 64.0
    max_sink_channels: int = 8
    clip_samples: int = 4096


def model_shape(config: object) -> dict:
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": d,
        "hidden_size": config.hidden_size,
    }


class _Tap:
    """Attention handler that hands each layer's pre-RoPE keys, values and residual input to a callback."""

    def __init__(self, callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]) -> None:
        self.callback = callback

    def __call__(self, module, query, key, value, position_embeddings, attention_mask, past_key_values, layer_input, **kw):
        self.callback(module.layer_idx, key, value, layer_input)
        return stock_attention(module, query, key, value, position_embeddings, attention_mask, past_key_values, **kw)


def _run_pass(model: nn.Module, batches: torch.Tensor, batch_size: int, callback, label: str, progress: Progress | None):
    device = next(model.parameters()).device
    steps = range(0, batches.shape[0], batch_size)
    with torch.no_grad(), attach(model, _Tap(callback)):
        for i, start in enumerate(steps):
            model(batches[start : start + batch_size].to(device), use_cache=False)
            if progress:
                progress(label, i + 1, len(steps))


def _validate(options: CalibrationOptions, shape: dict) -> int:
    n_kv, d = shape["num_key_value_heads"], shape["head_dim"]
    g = options.head_group_size or search.default_head_group_size(n_kv, d)
    if n_kv % g:
        raise ValueError(f"head-group size {g} does not divide the {n_kv} KV heads; use a divisor of {n_kv}")
    if (g * d) % options.key_group_size:
        raise ValueError(f"key group size {options.key_group_size} must divide the {g * d} channels of a head group")
    if d % options.value_group_size:
        raise ValueError(f"value group size {options.value_group_size} must divide head_dim {d}")
    return g


def calibrate(
    model: nn.Module, batches: torch.Tensor, options: CalibrationOptions, progress: Progress | None = None
) -> CalibrationArtifact:
    """Run the three passes over ``batches`` (``int64 [n, seqlen]``) and return the artifact."""
    adapter_for(model.config)
    shape = model_shape(model.config)
    g = _validate(options, shape)
    n_layers, d = shape["num_hidden_layers"], shape["head_dim"]
    key_rotation = hadamard_matrix(g * d)
    value_rotation = hadamard_matrix(d)

    acts = [ActivationObserver() for _ in range(n_layers)]
    _run_pass(model, batches, options.batch_size, lambda i, k, v, h: acts[i].update(h), "sinks", progress)
    sinks = []
    for obs in acts:
        token_max, token_argmax, median = obs.result()
        sinks.append(search.select_sink_channels(token_max, token_argmax, median, options.sink_ratio, options.max_sink_channels))

    def keep_mask(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        channels, threshold, _ = sinks[layer]
        flat = hidden.reshape(-1, hidden.shape[-1])
        if channels.numel() == 0:
            return torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
        return flat[:, channels.to(flat.device)].abs().amax(-1) <= threshold

    means = [KeyMeanObserver() for _ in range(n_layers)]
    _run_pass(
        model, batches, options.batch_size,
        lambda i, k, v, h: means[i].update(flatten_heads(k), keep_mask(i, h)), "key means", progress,
    )
    key_means = [m.result() for m in means]

    n_batches = -(-batches.shape[0] // options.batch_size)
    rows_per_batch = -(-options.clip_samples // n_batches)
    rotated = [RotatedKeyObserver(options.clip_samples, options.seed + i) for i in range(n_layers)]

    def observe_rotated(i: int, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor) -> None:
        centred = flatten_heads(k) - key_means[i].to(k.device)
        rot = rotate_groups(centred, key_rotation.to(k.device))
        values = rotate_groups(flatten_heads(v), value_rotation.to(v.device))
        rotated[i].update(centred, rot, values, keep_mask(i, h), rows_per_batch)

    _run_pass(model, batches, options.batch_size, observe_rotated, "rotated keys", progress)

    layers = []
    for i in range(n_layers):
        stats = rotated[i].result()
        perm = search.channel_permutation(stats["abs_after"], g * d)
        key_clips = [search.search_clip(stats["key_rows"], b, options.key_group_size, perm)[0] for b in search.QUANT_BITS]
        value_clips = [search.search_clip(stats["value_rows"], b, options.value_group_size, None)[0] for b in search.QUANT_BITS]
        channels, threshold, flagged = sinks[i]
        layers.append(
            {
                "key_mean": key_means[i],
                "key_perm": perm,
                "key_abs_mean_before": stats["abs_before"],
                "key_abs_mean_after": stats["abs_after"],
                "key_clip_by_bits": torch.tensor(key_clips, dtype=torch.float32),
                "value_clip_by_bits": torch.tensor(value_clips, dtype=torch.float32),
                "sink_channels": channels,
                "sink_threshold": torch.tensor(threshold, dtype=torch.float32),
                "sink_tokens_flagged": flagged,
            }
        )
        if progress:
            progress("settings", i + 1, n_layers)
    meta = {
        "artifact_version": ARTIFACT_VERSION,
        "model": shape,
        "source_fingerprint": weights_fingerprint(model),
        "options": {**asdict(options), "head_group_size": g, "bits_searched": list(search.QUANT_BITS)},
        "sink_tokens_flagged": [layer.pop("sink_tokens_flagged") for layer in layers],
        "calibration_tokens": int(batches.numel()),
    }
    return CalibrationArtifact(meta, key_rotation, value_rotation, layers)
