"""``rkv_convert.load``: open an exported rkv checkpoint folder for generation."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..export.format import CheckpointError, read_checkpoint
from ..models.loading import BUILTIN_MODELS
from .cache import CacheSettings
from .generate import RkvModel

__all__ = ["load", "resolve_device", "resolve_dtype"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/``"auto"``: float16 on CUDA, float32 on CPU; else a dtype or one of its names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))} or auto")
    return _DTYPES[dtype]


def load(
    path: str | Path,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    backend: str = "auto",
    recent_window: int | None = None,
    flush_block: int | None = None,
    max_sinks: int | None = None,
    device_map: str | dict | None = None,
    salient_tokens: int | None = None,
) -> RkvModel:
    """Load an rkv checkpoint folder (written by ``rkv export``) as an :class:`RkvModel`.

    ``recent_window``, ``flush_block``, ``max_sinks`` and ``salient_tokens`` override the checkpoint's cache settings.
    ``backend`` picks the packed-cache ops: ``"auto"`` (Triton on CUDA, reference on CPU),
    ``"triton"`` or ``"reference"``. ``device_map`` (e.g. ``"auto"``, needs accelerate) places the
    model with transformers across devices instead of moving it to ``device``; each layer's cache
    then lives on that layer's device.
    """
    if str(path) in BUILTIN_MODELS:
        raise CheckpointError(
            f"{path} is a source model, not an rkv checkpoint: run `rkv calibrate {path}` and then "
            f"`rkv export` to write an rkv checkpoint folder, and load that folder"
        )
    checkpoint = read_checkpoint(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if device_map is not None:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dt, device_map=device_map).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dt).to(dev).eval()
    tokenizer = None
    folder = Path(path)
    if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    settings = CacheSettings.from_config(
        checkpoint.config, recent_window=recent_window, flush_block=flush_block, max_sinks=max_sinks,
        salient_tokens=salient_tokens,
    )
    return RkvModel(model, checkpoint, tokenizer, settings, backend)
