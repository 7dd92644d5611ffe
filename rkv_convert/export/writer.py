"""``rkv export``: source weights + calibration artifact → augmented checkpoint folder.

The folder is written to a temporary sibling and renamed at the end, so a failure leaves
nothing behind and a killed run's leftovers go at the next run (:mod:`rkv_convert.outdir`).
It loads with stock transformers and gives the source model's logits (checked before
writing); the rkv runtime reads ``config.json["rkv"]`` and ``rkv.safetensors`` besides.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..calibrate.artifact import CalibrationArtifact, weights_fingerprint
from ..calibrate.run import model_shape
from ..models.adapters import text_config
from ..models.loading import LoadedModel
from ..outdir import atomic_dir, check_output_dir
from ..quant.codec import folded_head_rotations
from ..quant.quantizer import GroupMeta, GroupRanges, meta_scale_base
from .first_key import fit_first_key
from .format import RKV_TENSORS_FILE, SUPPORTED_BITS, Checkpoint, CheckpointError, LayerTensors, RkvConfig, tensor_name
from .fuse import fuse_calibration, unfuse_calibration

__all__ = ["checkpoint_from_artifact", "export_checkpoint", "layer_widths", "LOGIT_TOLERANCE"]

LOGIT_TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 2.5e-1}


def _check_compatible(artifact: CalibrationArtifact, loaded: LoadedModel, bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise CheckpointError(f"--bits must be one of {SUPPORTED_BITS}, got {bits}")
    shape = model_shape(loaded.model.config)
    if artifact.meta["model"] != shape:
        raise CheckpointError(
            f"the calibration artifact was made for a model shaped {artifact.meta['model']}, "
            f"but this model is {shape}; calibrate this model first"
        )
    fingerprint = weights_fingerprint(loaded.model)
    if artifact.meta["source_fingerprint"] != fingerprint:
        raise CheckpointError(
            "the calibration artifact comes from different weights (fingerprint mismatch); "
            "run `rkv calibrate` on this exact model"
        )


def _probe_logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vocab = text_config(model.config).vocab_size  # a multimodal config (gemma3) keeps it in its text part
    ids = torch.randint(0, vocab, (2, 24), generator=g)
    with torch.no_grad():
        return model(ids.to(next(model.parameters()).device), use_cache=False).logits.float().cpu()


def layer_widths(bits: int, num_layers: int, widths: list[int] | None, name: str) -> list[int]:
    """Per-layer widths: ``widths`` as given (one per layer), or every layer at ``bits``."""
    if widths is None:
        return [bits] * num_layers
    widths = [int(b) for b in widths]
    if len(widths) != num_layers or any(b not in SUPPORTED_BITS for b in widths):
        raise CheckpointError(f"{name} must give one of {SUPPORTED_BITS} for each of the {num_layers} layers, got {widths}")
    return widths


def _group_ranges(artifact: CalibrationArtifact, layer: int, meta: GroupMeta) -> dict[str, float]:
    """The layer's group ranges that 8-bit metadata needs (none for fp16 metadata)."""
    if meta is GroupMeta.FP16:
        return {}
    names = ("key_group_range", "value_group_range")
    if any(name not in artifact.layers[layer] for name in names):
        raise CheckpointError(f"{meta.value} group metadata needs each layer's group ranges, which this calibration "
                              "artifact lacks (made by an older rkv); re-run `rkv calibrate`")  # fmt: skip
    return {name: float(artifact.layers[layer][name]) for name in names}


def _key_head_rotation(artifact: CalibrationArtifact, layer: int, config: RkvConfig,
                       ranges: dict[str, float]) -> torch.Tensor | None:  # fmt: skip
    """The layer's ``key_head_rotation`` as written: the learned ``R_h`` (or, without one, ``key_rotation[:, perm_h]``)
    followed by the first-key fit (:mod:`.first_key`) where the artifact calibrated the first key; ``None``: neither."""
    tensors = artifact.layers[layer]
    learned = tensors["key_head_rotation"].float() if "key_head_rotation" in tensors else None
    if "key_first_token" not in tensors:
        return learned
    if learned is None:
        learned = folded_head_rotations(artifact.key_rotation, tensors["key_perm"], config.head_dim)
    bits = config.layer_bits(layer)[0]
    clip = artifact.clip_for(layer, bits, "key")
    base = meta_scale_base(ranges["key_group_range"], bits, clip) if config.meta is GroupMeta.LOG8 else None
    return fit_first_key(learned, tensors["key_first_token"], bits, config.key_group_size, clip, base, config.ranges)


def _config_for(artifact: CalibrationArtifact, bits: int, recent_window: int, flush_block: int, max_sinks: int,
                key_bits: list[int] | None = None, value_bits: list[int] | None = None,
                group_meta: GroupMeta = GroupMeta.FP16, salient_tokens: int = 0,
                group_ranges: GroupRanges = GroupRanges.MINMAX) -> RkvConfig:  # fmt: skip
    """The ``config.json["rkv"]`` section that exporting ``artifact`` at ``bits`` (per-layer widths: ``key_bits``,
    ``value_bits``; group scales and zeros as ``group_meta``; ``salient_tokens`` kept per sequence; each group's
    range set by ``group_ranges``) writes."""
    if bits not in SUPPORTED_BITS:
        raise CheckpointError(f"--bits must be one of {SUPPORTED_BITS}, got {bits}")
    opts = artifact.meta["options"]
    shape = artifact.meta["model"]
    n = shape["num_hidden_layers"]
    return RkvConfig(
        bits=bits,
        key_group_size=opts["key_group_size"],
        value_group_size=opts["value_group_size"],
        head_group_size=opts["head_group_size"],
        num_layers=shape["num_hidden_layers"],
        num_key_value_heads=shape["num_key_value_heads"],
        head_dim=shape["head_dim"],
        source_fingerprint=artifact.meta["source_fingerprint"],
        recent_window=recent_window,
        flush_block=flush_block,
        max_sinks=max_sinks,
        calibration={**{k: opts[k] for k in ("source", "num_samples", "seqlen", "seed", "sink_ratio")},
                     "key_scale": opts.get("key_scale", 0.0)},  # fused into the weights: provenance only
        key_layout=artifact.key_layout,
        key_bits=layer_widths(bits, n, key_bits, "key bits"),
        value_bits=layer_widths(bits, n, value_bits, "value bits"),
        group_meta=GroupMeta(group_meta).value,
        salient_tokens=salient_tokens,
        group_ranges=GroupRanges(group_ranges).value,
    )


def checkpoint_from_artifact(
    artifact: CalibrationArtifact, bits: int = 2, recent_window: int = 128, flush_block: int = 64, max_sinks: int = 8,
    key_bits: list[int] | None = None, value_bits: list[int] | None = None, group_meta: GroupMeta = GroupMeta.FP16,
    salient_tokens: int = 0, group_ranges: GroupRanges = GroupRanges.MINMAX,
) -> Checkpoint:
    """The in-memory checkpoint that exporting ``artifact`` at ``bits`` describes (nothing fused or written).

    For benchmarks and tools that keep the model in memory: fuse the artifact's value rotation and key scale
    into the model with :func:`~rkv_convert.export.fuse.fuse_calibration` before running it.
    """
    config = _config_for(artifact, bits, recent_window, flush_block, max_sinks, key_bits, value_bits, group_meta,
                         salient_tokens, group_ranges)  # fmt: skip
    ranges = [_group_ranges(artifact, i, config.meta) for i in range(artifact.num_layers)]
    layers = [
        LayerTensors(
            key_mean=layer["key_mean"].float(),
            key_perm=layer["key_perm"].long(),
            key_clip=artifact.clip_for(i, config.layer_bits(i)[0], "key"),
            value_clip=artifact.clip_for(i, config.layer_bits(i)[1], "value"),
            sink_channels=layer["sink_channels"].long(),
            sink_threshold=float(layer["sink_threshold"]),
            key_head_rotation=_key_head_rotation(artifact, i, config, ranges[i]),
            **ranges[i],
            value_head_rotation=layer["value_head_rotation"].float() if "value_head_rotation" in layer else None,
        )
        for i, layer in enumerate(artifact.layers)
    ]
    return Checkpoint(config, artifact.key_rotation.float(), artifact.value_rotation.float(), layers)


def export_checkpoint(
    loaded: LoadedModel,
    artifact: CalibrationArtifact,
    out_dir: str | Path,
    bits: int = 2,
    recent_window: int = 128,
    flush_block: int = 64,
    max_sinks: int = 8,
    overwrite: bool = False,
    key_bits: list[int] | None = None,
    value_bits: list[int] | None = None,
    group_meta: GroupMeta = GroupMeta.FP16,
    salient_tokens: int = 0,
    group_ranges: GroupRanges = GroupRanges.MINMAX,
) -> Path:
    """Fuse, verify and write the augmented checkpoint; returns the folder. ``key_bits``/``value_bits``:
    one width per layer (default: every layer at ``bits``); ``group_meta``: how the cache stores group
    scales and zeros (8-bit needs the folded key layout); ``salient_tokens``: prompt tokens per sequence and layer
    the runtime keeps in full precision (``runtime.salient``); ``group_ranges``: how the cache writes set each
    group's range (searched needs the folded key layout)."""
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    _check_compatible(artifact, loaded, bits)
    config = _config_for(artifact, bits, recent_window, flush_block, max_sinks, key_bits, value_bits, group_meta,
                         salient_tokens, group_ranges)  # fmt: skip
    ranges = [_group_ranges(artifact, i, config.meta) for i in range(len(artifact.layers))]
    model = loaded.model
    before = _probe_logits(model)
    fuse_calibration(model, artifact)
    after = _probe_logits(model)
    dtype = next(model.parameters()).dtype
    err = (after - before).abs().max().item()
    if err > LOGIT_TOLERANCE.get(dtype, 1e-3) * max(1.0, before.abs().max().item() / 10):
        unfuse_calibration(model, artifact)
        raise CheckpointError(f"fusing the value rotations and key scale changed logits by {err:.3g} in {dtype}; "
                              "refusing to export")

    tensors = {"key_rotation": artifact.key_rotation, "value_rotation": artifact.value_rotation}
    for i, layer in enumerate(artifact.layers):
        tensors[tensor_name(i, "key_mean")] = layer["key_mean"]
        tensors[tensor_name(i, "key_perm")] = layer["key_perm"]
        tensors[tensor_name(i, "key_clip")] = torch.tensor(artifact.clip_for(i, config.layer_bits(i)[0], "key"))
        tensors[tensor_name(i, "value_clip")] = torch.tensor(artifact.clip_for(i, config.layer_bits(i)[1], "value"))
        tensors[tensor_name(i, "sink_channels")] = layer["sink_channels"]
        tensors[tensor_name(i, "sink_threshold")] = layer["sink_threshold"]
        tensors[tensor_name(i, "key_clip_by_bits")] = layer["key_clip_by_bits"]
        tensors[tensor_name(i, "value_clip_by_bits")] = layer["value_clip_by_bits"]
        key_heads = _key_head_rotation(artifact, i, config, ranges[i])
        if key_heads is not None:  # learned per-head key rotations, the first-key fit
            tensors[tensor_name(i, "key_head_rotation")] = key_heads
        if "value_head_rotation" in layer:
            tensors[tensor_name(i, "value_head_rotation")] = layer["value_head_rotation"]
        for name, value in ranges[i].items():  # 8-bit group metadata
            tensors[tensor_name(i, name)] = torch.tensor(value, dtype=torch.float32)

    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / RKV_TENSORS_FILE), metadata={"format": "rkv"})
        config_path = tmp / "config.json"
        full = json.loads(config_path.read_text())
        full["rkv"] = config.to_dict()
        config_path.write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return out
