"""Online attention-sink detection from calibrated massive-activation channels.

A token is a sink for a layer when ``max |h[sink_channels]| > sink_threshold``, where ``h`` is the
decoder layer's residual-stream input (``LayerTensors`` docstring). Detection costs one gather and
one max per token; an empty channel list or an infinite threshold disables it for the layer.
"""

from __future__ import annotations

import math

import torch

__all__ = ["flag_sinks"]


def flag_sinks(layer_input: torch.Tensor | None, channels: torch.Tensor, threshold: float) -> torch.Tensor | None:
    """``bool [B, T]``: which tokens of ``layer_input [B, T, hidden]`` are sinks (``None``: none can be)."""
    if layer_input is None or channels.numel() == 0 or math.isinf(threshold) or math.isnan(threshold):
        return None
    picked = layer_input.index_select(-1, channels.to(layer_input.device))
    return picked.abs().amax(-1).float() > threshold
