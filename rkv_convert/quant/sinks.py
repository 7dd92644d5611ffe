"""Online attention-sink detection from calibrated massive-activation channels."""

from __future__ import annotations

import torch

__all__ = ["detect_sinks"]


def detect_sinks(layer_input: torch.Tensor, channels: torch.Tensor, threshold: float, max_sinks: int) -> torch.Tensor:
    """Boolean ``[B, T]``: tokens whose ``max |h[channels]|`` exceeds ``threshold``, the first
    ``max_sinks`` of each sequence (later ones are quantized like any token)."""
    b, t = layer_input.shape[:2]
    if channels.numel() == 0 or max_sinks == 0:
        return torch.zeros(b, t, dtype=torch.bool, device=layer_input.device)
    score = layer_input[..., channels.to(layer_input.device)].abs().amax(-1)
    flagged = score > threshold
    return flagged & (flagged.cumsum(-1) <= max_sinks)
