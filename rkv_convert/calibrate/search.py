"""Decisions made from calibration statistics: permutation, clip ratios, sink channels, head groups."""

from __future__ import annotations

import torch

from ..quant.hadamard import has_hadamard
from ..quant.quantizer import fake_quantize

__all__ = [
    "CLIP_GRID",
    "QUANT_BITS",
    "default_head_group_size",
    "channel_permutation",
    "permutation_for",
    "search_clip",
    "clip_error",
    "rope_pair_weights",
    "PERM_STATISTICS",
    "CLIP_OBJECTIVES",
    "select_sink_channels",
    "outlier_ratio",
]

QUANT_BITS = (2, 3, 4)
CLIP_GRID = tuple(round(1.0 - 0.025 * i, 3) for i in range(17))  # 1.0 down to 0.6
PERM_STATISTICS = ("mean_abs", "max_abs", "rms", "none")
CLIP_OBJECTIVES = ("mse", "qk")


def default_head_group_size(num_kv_heads: int, head_dim: int, max_channels: int = 512) -> int:
    """Largest divisor ``G`` of the KV heads with a known Hadamard of order ``G*d`` ≤ ``max_channels``."""
    for g in range(num_kv_heads, 0, -1):
        if num_kv_heads % g == 0 and g * head_dim <= max_channels and has_hadamard(g * head_dim):
            return g
    return 1


def channel_permutation(abs_mean: torch.Tensor, head_group_channels: int) -> torch.Tensor:
    """Within each head group, channels sorted by descending mean |x| (global indices, int64).

    Consecutive chunks of the result become quantization groups, so channels of similar
    magnitude share a scale; the permutation never crosses a head group.
    """
    blocks = abs_mean.reshape(-1, head_group_channels)
    order = torch.argsort(blocks, dim=1, descending=True, stable=True)
    offsets = torch.arange(blocks.shape[0]).unsqueeze(1) * head_group_channels
    return (order + offsets).reshape(-1)


def permutation_for(statistic: str, stats: dict[str, torch.Tensor], head_group_channels: int) -> torch.Tensor:
    """The key permutation sorted by one of :data:`PERM_STATISTICS` of the rotated keys.

    ``stats`` holds ``abs_after`` (mean |x| over all calibration tokens) and ``key_rows``
    (a row sample, for ``max_abs`` and ``rms``); ``none`` is the identity.
    """
    if statistic == "mean_abs":
        return channel_permutation(stats["abs_after"], head_group_channels)
    if statistic == "max_abs":
        return channel_permutation(stats["key_rows"].abs().amax(0), head_group_channels)
    if statistic == "rms":
        return channel_permutation(stats["key_rows"].pow(2).mean(0).sqrt(), head_group_channels)
    if statistic == "none":
        return torch.arange(stats["abs_after"].numel())
    raise ValueError(f"permutation statistic must be one of {PERM_STATISTICS}, got {statistic!r}")


def rope_pair_weights(query_sq: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per key channel, the mean squared query that multiplies it once RoPE has turned both.

    ``query_sq`` ``[n_kv*d]`` is E[q_c^2] summed over the query heads sharing each KV head.
    RoPE turns channel pairs ``(i, i + d/2)`` together, so over many relative positions a key
    error in either channel of a pair meets the pair's whole query energy: both get
    ``E[q_i^2] + E[q_{i+d/2}^2]`` (cross-pair terms average out).
    """
    w = query_sq.reshape(-1, 2, head_dim // 2)
    return w.sum(1, keepdim=True).expand_as(w).reshape(-1).clone()


def clip_error(
    rows: torch.Tensor,
    bits: int,
    group_size: int,
    clip: float,
    perm: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    rotation: torch.Tensor | None = None,
) -> float:
    """Mean squared reconstruction error of ``rows`` at ``clip``.

    With ``weight`` (``[C]``, per channel of the *unrotated* space) the error is first taken
    back through ``rotation`` (``x = y @ R.T`` per head group) and weighted per channel: for
    keys with :func:`rope_pair_weights` this is the expected squared attention-logit error.
    """
    diff = fake_quantize(rows, bits, group_size, clip, perm) - rows
    if weight is None:
        return diff.pow(2).mean().item()
    n = rotation.shape[0]
    back = (diff.reshape(diff.shape[0], -1, n) @ rotation.T).reshape(diff.shape)
    return (back.pow(2) * weight).mean().item()


def search_clip(
    rows: torch.Tensor,
    bits: int,
    group_size: int,
    perm: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    rotation: torch.Tensor | None = None,
) -> tuple[float, float]:
    """The clip ratio in :data:`CLIP_GRID` with the lowest (weighted) reconstruction error."""
    best = (float("inf"), 1.0)
    for clip in CLIP_GRID:
        err = clip_error(rows, bits, group_size, clip, perm, weight, rotation)
        if err < best[0]:
            best = (err, clip)
    return best[1], best[0]


SINK_MAX_FRACTION = 0.02
"""Share of calibration tokens flagged when a layer's ratio threshold flags most of them (see below)."""


def select_sink_channels(
    token_max: torch.Tensor, token_argmax: torch.Tensor, median: float, ratio: float, max_channels: int,
    max_fraction: float = SINK_MAX_FRACTION,
) -> tuple[torch.Tensor, float, int]:
    """Channels whose massive activations (> ``ratio`` × median |h|) mark sink tokens.

    Some models (Gemma 3) carry a few channels above ``ratio`` × median in every token. When more
    than half the tokens pass, the ratio describes the layer, not a few tokens: the threshold then
    rises to the ``1 - max_fraction`` quantile of the per-token maxima, so only the most massive
    tokens are flagged. Returns (channels int64, online threshold, number of
    calibration tokens flagged). A layer with no massive activation gets no channels and an
    infinite threshold.
    """
    threshold = ratio * median
    massive = token_max > threshold
    if float(massive.float().mean()) > 0.5:
        threshold = max(threshold, float(torch.quantile(token_max.float(), 1.0 - max_fraction)))
        massive = token_max > threshold
    if not bool(massive.any()):
        return torch.zeros(0, dtype=torch.long), float("inf"), 0
    channels, counts = torch.unique(token_argmax[massive], return_counts=True)
    keep = channels[torch.argsort(counts, descending=True, stable=True)[:max_channels]]
    return torch.sort(keep).values, threshold, int(massive.sum())


def outlier_ratio(abs_mean: torch.Tensor) -> float:
    """Largest channel magnitude over the median one: 1 means perfectly flat channels."""
    return float(abs_mean.max() / abs_mean.median().clamp_min(1e-12))
