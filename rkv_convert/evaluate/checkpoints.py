"""An exported checkpoint at another bit width, from its per-bit clip tables (no re-export).

``rkv export`` writes each layer's clip ratios for every searched bit width
(``layers.{i}.key_clip_by_bits``, ``value_clip_by_bits``), so evaluation can score or run the
checkpoint at 2, 3 and 4 bits exactly as ``rkv export --bits B`` would have written it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..export.format import RKV_TENSORS_FILE, SUPPORTED_BITS, Checkpoint, CheckpointError, tensor_name

__all__ = ["ClipTables", "clip_tables", "checkpoint_at_bits"]

ClipTables = dict[str, list[torch.Tensor]]
"""``{"key": [...], "value": [...]}``: per layer fp32 ``[len(SUPPORTED_BITS)]`` clip ratios (2, 3, 4 bits)."""


def clip_tables(folder: str | Path, num_layers: int) -> ClipTables:
    """The per-bit clip tables of an exported folder; refuses a folder written without them."""
    path = Path(folder) / RKV_TENSORS_FILE
    tensors = load_file(str(path))
    try:
        return {w: [tensors[tensor_name(i, f"{w}_clip_by_bits")] for i in range(num_layers)] for w in ("key", "value")}
    except KeyError as err:
        raise CheckpointError(f"{folder} lacks per-bit clip tables ({err}); re-export it") from err


def checkpoint_at_bits(checkpoint: Checkpoint, clips: ClipTables, bits: int) -> Checkpoint:
    """``checkpoint`` with every layer's keys and values at ``bits`` and that width's clips."""
    if bits not in SUPPORTED_BITS:
        raise CheckpointError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    index = SUPPORTED_BITS.index(bits)
    config = dataclasses.replace(checkpoint.config, bits=bits, layout="", key_bits=[], value_bits=[])
    layers = [
        dataclasses.replace(layer, key_clip=float(clips["key"][i][index]), value_clip=float(clips["value"][i][index]))
        for i, layer in enumerate(checkpoint.layers)
    ]
    return Checkpoint(config, checkpoint.key_rotation, checkpoint.value_rotation, layers)
