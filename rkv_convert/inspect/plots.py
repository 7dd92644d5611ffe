"""PNG figures for ``rkv inspect`` (matplotlib, the optional ``plots`` extra), one function per figure."""

from __future__ import annotations

from pathlib import Path

import torch

from .stats import InspectStats

__all__ = ["write_plots", "require_matplotlib"]


def require_matplotlib():
    try:
        import matplotlib
    except ImportError as err:
        raise RuntimeError("rkv inspect draws with matplotlib: pip install 'rkv[plots]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def key_heatmaps(plt, s: InspectStats, out: Path) -> Path:
    panels = (("pre-RoPE keys", s.key_abs_before), ("centred + rotated", s.key_abs_rotated),
              ("rotated, calibrated order", s.key_abs_reordered))
    fig, axes = plt.subplots(1, 3, figsize=(15, 5), sharey=True)
    for ax, (title, data) in zip(axes, panels):
        rel = data / data.mean(1, keepdim=True)  # per layer, relative to its mean channel
        im = ax.imshow(rel.log10().numpy(), aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_title(f"{title}: log10(mean|k| / layer mean)")
        ax.set_xlabel("key channel")
        fig.colorbar(im, ax=ax)
    for x in range(s.key_group_size, s.key_abs_reordered.shape[1], s.key_group_size):
        axes[2].axvline(x - 0.5, color="cyan", lw=0.6)
    axes[0].set_ylabel("layer")
    return _save(fig, out / "key_channels_heatmap.png")


def key_profiles(plt, s: InspectStats, out: Path) -> Path:
    layers = sorted({0, s.key_abs_before.shape[0] // 2, s.key_abs_before.shape[0] - 1})
    fig, axes = plt.subplots(len(layers), 1, figsize=(12, 3.2 * len(layers)), squeeze=False)
    for ax, layer in zip(axes[:, 0], layers):
        ax.plot(s.key_abs_before[layer].numpy(), lw=0.8, label="pre-RoPE keys")
        ax.plot(s.key_abs_rotated[layer].numpy(), lw=0.8, label="centred + rotated")
        ax.plot(s.key_abs_reordered[layer].numpy(), lw=1.2, label="rotated, calibrated order")
        for x in range(s.key_group_size, s.key_abs_reordered.shape[1], s.key_group_size):
            ax.axvline(x - 0.5, color="grey", lw=0.5, ls=":")
        ax.set_yscale("log")
        ax.set_title(f"layer {layer}: mean |k| per channel (dotted: quantization groups)")
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("channel")
    return _save(fig, out / "key_channel_profiles.png")


def massive_activations(plt, s: InspectStats, out: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    im = axes[0].imshow(s.hidden_map.clamp_min(1e-3).log10().numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    axes[0].set_title(f"layer {s.hidden_map_layer} input: log10 |h| (first window)")
    axes[0].set_xlabel("hidden channel")
    axes[0].set_ylabel("token")
    fig.colorbar(im, ax=axes[0])
    im = axes[1].imshow(s.hidden_token_max.log10().numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    axes[1].set_title("max |h| per token and layer (log10)")
    axes[1].set_xlabel("token")
    axes[1].set_ylabel("layer")
    fig.colorbar(im, ax=axes[1])
    axes[2].semilogy(s.hidden_ratio.numpy(), marker="o")
    axes[2].set_title("largest |h| / median |h| per layer")
    axes[2].set_xlabel("layer")
    return _save(fig, out / "massive_activations.png")


def sink_attention(plt, s: InspectStats, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(s.first_token_attention.numpy(), marker="o", label="token 0")
    ax.plot(s.sink_attention.numpy(), marker="s", label="detected sink tokens")
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean attention mass per query")
    ax2 = ax.twinx()
    ax2.bar(range(len(s.sinks_flagged)), s.sinks_flagged.numpy(), alpha=0.2, color="grey")
    ax2.set_ylabel("sinks detected per window")
    ax.set_title("attention paid to sink tokens")
    ax.legend(loc="upper left")
    return _save(fig, out / "sink_attention.png")


def quant_error(plt, s: InspectStats, out: Path, label: str) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for ax, which in zip(axes, ("key", "value")):
        for name, per in s.quant_error.items():
            ax.semilogy(per[which].numpy(), marker=".", label=name)
        ax.set_title(f"{which}s: relative squared error ‖x̂−x‖²/‖x‖² per layer ({label})")
        ax.set_xlabel("layer")
        ax.legend(fontsize=8)
    return _save(fig, out / "quant_error.png")


def write_plots(stats: InspectStats, out: str | Path, label: str = "") -> list[Path]:
    """Write every figure into ``out`` (created if needed) and return the paths."""
    plt = require_matplotlib()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for fn in (key_heatmaps, key_profiles, massive_activations, sink_attention):
        paths.append(fn(plt, stats, folder))
        plt.close("all")
    paths.append(quant_error(plt, stats, folder, label))
    plt.close("all")
    return paths


def summary(stats: InspectStats) -> dict:
    """Per-layer numbers behind the figures (JSON-friendly)."""
    def ratio(x: torch.Tensor) -> list[float]:
        return (x.amax(1) / x.median(1).values.clamp_min(1e-12)).tolist()

    return {
        "key_outlier_ratio_before": ratio(stats.key_abs_before),
        "key_outlier_ratio_rotated": ratio(stats.key_abs_rotated),
        "hidden_max_over_median": stats.hidden_ratio.tolist(),
        "attention_to_token0": stats.first_token_attention.tolist(),
        "attention_to_sinks": stats.sink_attention.tolist(),
        "sinks_per_window": stats.sinks_flagged.tolist(),
        "relative_error": {n: {w: v.tolist() for w, v in per.items()} for n, per in stats.quant_error.items()},
    }
