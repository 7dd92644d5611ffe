"""Per-family attention adapters: expose pre-RoPE queries, keys and values to a handler.

Why the attention forward is replaced, not extended: transformers applies RoPE before the
cache sees a key (design notes §3), and neither ``Cache.update`` nor an ``AttentionInterface``
function ever receives a pre-RoPE key. RotateKV stores keys before RoPE, so each supported
family gets a small ``project`` function that computes q, k, v exactly as its own attention
does up to RoPE. A handler (stock attention, an evaluation quantizer, a calibration observer
or the packed runtime) takes it from there, and reaches transformers only through its public
extension points: the attention function comes from ``ALL_ATTENTION_FUNCTIONS`` and the rkv
cache is a ``Cache`` of ``CacheLayerMixin`` layers. Adapters are bound per module instance
inside :func:`attach` and removed on exit: nothing is patched globally.

Each family states the forward parameters and module attributes it relies on
(:attr:`FamilyAdapter.forward_params`, :attr:`FamilyAdapter.attributes`); :func:`attach`
checks them against the installed transformers (:func:`check_contract`) before it binds
anything, so a renamed argument fails loudly instead of disengaging the rkv cache.
"""

from __future__ import annotations

import contextlib
import inspect
import types
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import torch
import transformers
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from .compat import CACHE_ARGUMENT_NAMES, supported_range_text

__all__ = [
    "AttentionHandler",
    "ContractError",
    "FamilyAdapter",
    "SUPPORTED_FAMILIES",
    "UnsupportedModelError",
    "adapter_for",
    "attach",
    "attention_modules",
    "check_contract",
    "stock_attention",
]


class UnsupportedModelError(ValueError):
    """The model's architecture has no rkv adapter."""


class ContractError(RuntimeError):
    """The installed transformers' attention module no longer matches what an adapter relies on."""


class AttentionHandler(Protocol):
    """Everything after the projections: RoPE, cache, attention. Returns ``[B, T, n_q*d]``.

    ``query``, ``key``, ``value`` are ``[B, heads, T, d]`` before RoPE (after q/k norms where
    the family has them); ``layer_input`` is the decoder layer's residual-stream input
    ``[B, T, hidden]`` (where massive activations live).
    """

    def __call__(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: object | None,
        layer_input: torch.Tensor | None,
        **kwargs: object,
    ) -> torch.Tensor: ...


def _split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.view(*x.shape[:-1], -1, head_dim).transpose(1, 2)


def _project_llama(module: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    d = module.head_dim
    q = _split_heads(module.q_proj(hidden_states), d)
    k = _split_heads(module.k_proj(hidden_states), d)
    v = _split_heads(module.v_proj(hidden_states), d)
    return q, k, v


def _project_qwen3(module: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    d = module.head_dim
    shape = (*hidden_states.shape[:-1], -1, d)
    q = module.q_norm(module.q_proj(hidden_states).view(shape)).transpose(1, 2)
    k = module.k_norm(module.k_proj(hidden_states).view(shape)).transpose(1, 2)
    v = _split_heads(module.v_proj(hidden_states), d)
    return q, k, v


_LLAMA_ATTRIBUTES = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx", "config", "num_key_value_groups")
_FORWARD_PARAMS = ("hidden_states", "position_embeddings", "attention_mask")


@dataclass(frozen=True)
class FamilyAdapter:
    """How one model family computes pre-RoPE q, k, v, and what of its attention module that needs.

    ``forward_params``: named parameters of the module's own ``forward`` that the adapted forward
    takes over (besides the cache, under either of its names); ``attributes``: what ``project``
    and the handlers read from the module.
    """

    name: str
    model_types: tuple[str, ...]
    project: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, ...]]
    has_qk_norm: bool = False
    forward_params: tuple[str, ...] = _FORWARD_PARAMS
    attributes: tuple[str, ...] = _LLAMA_ATTRIBUTES


SUPPORTED_FAMILIES: tuple[FamilyAdapter, ...] = (
    FamilyAdapter("llama", ("llama", "mistral", "qwen2"), _project_llama),
    FamilyAdapter("qwen3", ("qwen3",), _project_qwen3, has_qk_norm=True, attributes=_LLAMA_ATTRIBUTES + ("q_norm", "k_norm")),
)


def check_contract(family: FamilyAdapter, module: nn.Module) -> None:
    """Raise :class:`ContractError` unless ``module`` (an attention layer of ``family``) has what the adapter uses.

    Checks the named parameters of the class's ``forward`` (the cache under one of its known
    names) and the module attributes; the message names the family, what is missing and the
    installed transformers version.
    """
    forward = type(module).forward
    params = inspect.signature(inspect.unwrap(forward)).parameters
    where = f"{type(module).__name__}.forward ({family.name} family, transformers {transformers.__version__})"
    hint = f"rkv is tested with {supported_range_text()}"
    missing = [p for p in family.forward_params if p not in params]
    if missing:
        raise ContractError(f"{where} has no argument {', '.join(map(repr, missing))}; {hint}")
    if not any(name in params for name in CACHE_ARGUMENT_NAMES):
        raise ContractError(f"{where} takes the KV cache under none of {', '.join(CACHE_ARGUMENT_NAMES)}; {hint}")
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        raise ContractError(f"{where} no longer takes **kwargs (position_ids and attention options arrive there); {hint}")
    absent = [a for a in family.attributes if not hasattr(module, a)]
    if absent:
        raise ContractError(
            f"{type(module).__name__} ({family.name} family, transformers {transformers.__version__}) has no attribute "
            f"{', '.join(map(repr, absent))}; {hint}"
        )


def supported_model_types() -> list[str]:
    return sorted(t for f in SUPPORTED_FAMILIES for t in f.model_types)


def adapter_for(config: object) -> FamilyAdapter:
    """The adapter for ``config.model_type``, or an error naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    for family in SUPPORTED_FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported by rkv; supported: {', '.join(supported_model_types())}"
    )


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    decoder = getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no decoder layers at .model.layers")
    return [layer.self_attn for layer in layers]


def stock_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    cache: object | None,
    layer_input: torch.Tensor | None = None,
    **kwargs: object,
) -> torch.Tensor:
    """What the family's own forward does after the projections (RoPE, cache update, attention)."""
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, module.layer_idx)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_attention_forward)
    out, _ = interface(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0,
        scaling=module.scaling,
        sliding_window=getattr(module, "sliding_window", None),
        **kwargs,
    )
    return out.reshape(*out.shape[:2], -1)


def _pop_cache(kwargs: dict) -> object | None:
    """The KV cache, under whichever name the installed transformers passed it (``cache`` from 5.24)."""
    given = [name for name in CACHE_ARGUMENT_NAMES if kwargs.get(name) is not None]
    if len(given) > 1:
        raise TypeError(f"the attention layer got a KV cache under both {' and '.join(given)}")
    found = [kwargs.pop(name, None) for name in CACHE_ARGUMENT_NAMES]
    return next((c for c in found if c is not None), None)


def _adapted_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    cache = _pop_cache(kwargs)
    if position_embeddings is None:
        raise ContractError(
            f"{type(self).__name__} was called without position_embeddings (transformers {transformers.__version__}); "
            f"rkv is tested with {supported_range_text()}"
        )
    q, k, v = self._rkv_family.project(self, hidden_states)
    layer_input = self.__dict__.pop("_rkv_layer_input", None)
    if layer_input is not None and layer_input.device != hidden_states.device:
        # stashed before accelerate's hook moved the layer's inputs (device_map over several GPUs)
        layer_input = layer_input.to(hidden_states.device)
    out = self._rkv_handler(self, q, k, v, position_embeddings, attention_mask, cache, layer_input, **kwargs)
    return self.o_proj(out.contiguous()), None


def _stash_layer_input(attn: nn.Module) -> Callable:
    def hook(_layer: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        attn.__dict__["_rkv_layer_input"] = hidden

    return hook


@contextlib.contextmanager
def attach(model: nn.Module, handler: AttentionHandler | Sequence[AttentionHandler]) -> Iterator[None]:
    """Route every attention layer of ``model`` through ``handler`` for the duration of the block.

    ``handler`` is one handler for all layers, or a sequence with one handler per layer.
    """
    family = adapter_for(model.config)
    modules = attention_modules(model)
    handlers = list(handler) if isinstance(handler, (list, tuple)) else [handler] * len(modules)
    if len(handlers) != len(modules):
        raise ValueError(f"got {len(handlers)} handlers for {len(modules)} attention layers")
    for attn in modules:
        check_contract(family, attn)
    decoder_layers = getattr(model, "model", model).layers
    hooks = []
    try:
        for layer, attn, layer_handler in zip(decoder_layers, modules, handlers):
            attn.__dict__["_rkv_family"] = family
            attn.__dict__["_rkv_handler"] = layer_handler
            attn.__dict__["forward"] = types.MethodType(_adapted_forward, attn)
            hooks.append(layer.register_forward_pre_hook(_stash_layer_input(attn), with_kwargs=True))
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for attn in modules:
            for name in ("forward", "_rkv_family", "_rkv_handler", "_rkv_layer_input"):
                attn.__dict__.pop(name, None)
