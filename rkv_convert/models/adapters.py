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
import functools
import inspect
import sys
import types
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Protocol, Sequence

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
    "RopeLimit",
    "RopeLimitError",
    "SUPPORTED_FAMILIES",
    "UnsupportedModelError",
    "adapter_for",
    "attach",
    "attention_modules",
    "attention_softcap",
    "attention_window",
    "check_contract",
    "config_softcap",
    "context_length",
    "decoder",
    "decoder_layers",
    "handler_channel_order",
    "head_dim",
    "layer_rope",
    "layer_softcaps",
    "rope_limit",
    "text_config",
    "rotated_attention",
    "stock_attention",
    "stock_rope",
]


class UnsupportedModelError(ValueError):
    """The model's architecture has no rkv adapter."""


class ContractError(RuntimeError):
    """The installed transformers' attention module no longer matches what an adapter relies on."""


class RopeLimitError(ValueError):
    """A forward reached a position past the length up to which the model's RoPE stays fixed (longrope)."""


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


def _project_qk_norm(module: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Qwen3 and Gemma 3: RMSNorm over each head's channels of q and k, before RoPE."""
    d = module.head_dim
    shape = (*hidden_states.shape[:-1], -1, d)
    q = module.q_norm(module.q_proj(hidden_states).view(shape)).transpose(1, 2)
    k = module.k_norm(module.k_proj(hidden_states).view(shape)).transpose(1, 2)
    v = _split_heads(module.v_proj(hidden_states), d)
    return q, k, v


def _fused_qkv_sizes(module: nn.Module) -> tuple[int, int]:
    """Output rows of the query part and of the key part of a fused ``qkv_proj``."""
    d, config = module.head_dim, module.config
    return config.num_attention_heads * d, config.num_key_value_heads * d


def _project_fused_qkv(module: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Phi-3: one ``qkv_proj`` whose output rows are all queries, then all keys, then all values."""
    n_q, n_k = _fused_qkv_sizes(module)
    qkv = module.qkv_proj(hidden_states)
    d = module.head_dim
    return _split_heads(qkv[..., :n_q], d), _split_heads(qkv[..., n_q : n_q + n_k], d), _split_heads(qkv[..., n_q + n_k :], d)


def _value_rows_separate(module: nn.Module) -> tuple[nn.Linear, slice]:
    return module.v_proj, slice(0, module.v_proj.out_features)


def _value_rows_fused(module: nn.Module) -> tuple[nn.Linear, slice]:
    n_q, n_k = _fused_qkv_sizes(module)
    return module.qkv_proj, slice(n_q + n_k, module.qkv_proj.out_features)


def _scale_rows(proj: nn.Linear, rows: slice, factor: torch.Tensor) -> None:
    """Multiply output rows ``rows`` of ``proj`` (and its bias) by ``factor`` (one per row), in fp32."""
    f = factor.to(device=proj.weight.device, dtype=torch.float32)
    proj.weight[rows] = (proj.weight[rows].float() * f[:, None]).to(proj.weight.dtype)
    if proj.bias is not None:
        proj.bias[rows] = (proj.bias[rows].float() * f).to(proj.bias.dtype)


def _qk_factors(module: nn.Module, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row: the queries' ``1/scale`` of their KV head (``[n_q*d]``) and the keys' ``scale`` (``[n_kv*d]``)."""
    return (1.0 / scale).repeat_interleave(module.num_key_value_groups, dim=0).reshape(-1), scale.reshape(-1)


@torch.no_grad()
def _scale_qk_separate(module: nn.Module, scale: torch.Tensor) -> None:
    q, k = _qk_factors(module, scale)
    _scale_rows(module.q_proj, slice(0, module.q_proj.out_features), q)
    _scale_rows(module.k_proj, slice(0, module.k_proj.out_features), k)


@torch.no_grad()
def _scale_qk_fused(module: nn.Module, scale: torch.Tensor) -> None:
    n_q, n_k = _fused_qkv_sizes(module)
    q, k = _qk_factors(module, scale)
    _scale_rows(module.qkv_proj, slice(0, n_q), q)
    _scale_rows(module.qkv_proj, slice(n_q, n_q + n_k), k)


def _scale_norm_output(norm: nn.Module, factor: torch.Tensor, offset: float) -> None:
    w = norm.weight
    w.copy_(((w.float() + offset) * factor.to(w.device) - offset).to(w.dtype))


@torch.no_grad()
def _scale_qk_norm(module: nn.Module, scale: torch.Tensor, offset: float = 0.0) -> None:
    """Qwen3 (``weight * x̂``, ``offset`` 0) and Gemma 3 (``(1 + weight) * x̂``, ``offset`` 1): the q/k norms'
    weights, shared by all heads, take a scale that is equal for every head."""
    if not torch.equal(scale, scale[:1].expand_as(scale)):
        raise ValueError(f"{type(module).__name__} normalises every head with one q/k norm weight: the key scale "
                         "must be the same for all heads (key_scale(..., shared=True))")  # fmt: skip
    _scale_norm_output(module.q_norm, 1.0 / scale[0], offset)
    _scale_norm_output(module.k_norm, scale[0], offset)


def _window_of_module(module: nn.Module) -> int | None:
    return getattr(module, "sliding_window", None)


def _window_of_config(module: nn.Module) -> int | None:
    return getattr(module.config, "sliding_window", None)


def _static_inv_freq(rotary: nn.Module, prefix: str, rope_type: str) -> torch.Tensor:
    """The frequencies rkv caches with: longrope's short-factor table (``original_inv_freq``; the live
    ``inv_freq`` holds the long factors after any forward past ``original_max_position_embeddings``)."""
    return getattr(rotary, f"{prefix}original_inv_freq" if rope_type == "longrope" else f"{prefix}inv_freq")


def _rope_single(rotary: nn.Module, module: nn.Module) -> tuple[torch.Tensor, float, str]:
    rope_type = getattr(rotary, "rope_type", "default")
    return _static_inv_freq(rotary, "", rope_type), float(getattr(rotary, "attention_scaling", 1.0)), rope_type


def _rope_per_layer_type(rotary: nn.Module, module: nn.Module) -> tuple[torch.Tensor, float, str]:
    """Gemma 3: one table per layer type (sliding layers have their own base), ``{type}_inv_freq``."""
    kind = module.layer_type
    rope_type = rotary.rope_type[kind]
    return _static_inv_freq(rotary, f"{kind}_", rope_type), float(getattr(rotary, f"{kind}_attention_scaling")), rope_type


_LLAMA_ATTRIBUTES = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx", "config", "num_key_value_groups")
_QK_NORM_ATTRIBUTES = _LLAMA_ATTRIBUTES + ("q_norm", "k_norm")
_FUSED_ATTRIBUTES = ("qkv_proj", "o_proj", "head_dim", "scaling", "layer_idx", "config", "num_key_value_groups")
_FORWARD_PARAMS = ("hidden_states", "position_embeddings", "attention_mask")


@dataclass(frozen=True)
class FamilyAdapter:
    """Everything rkv knows about one model family's attention: the single place to change for a new one.

    - ``project``: pre-RoPE ``q, k, v [B, heads, T, d]`` exactly as the family's forward computes them
      (q/k norms included);
    - ``value_rows``: the linear layer holding the value projection and which of its output rows
      are the values (the value rotation is fused there, :mod:`rkv_convert.export.fuse`);
    - ``scale_qk``: multiply the module's keys by a per-channel scale ``[n_kv, d]`` (fp32, in the channel
      order ``project`` gives) and its queries by the inverse, in the weights
      (:func:`rkv_convert.export.fuse.fuse_key_scale`); ``shared_qk_scale``: whether that scale must be the
      same for every head (a q/k norm weight shared by all heads);
    - ``sliding_window``: the module's sliding window (``None``: global attention);
    - ``softcap_attribute``: the name, on the attention module and on the (text) config alike, of the
      attention-logit soft cap (Gemma 2; ``None`` or a ``None`` value: no cap; else scores become
      ``cap * tanh(scores / cap)``);
    - ``rope``: ``(inv_freq, attention_scaling, rope_type)`` of one attention layer, from the decoder's
      rotary embedding module;
    - ``forward_params``, ``attributes``: named parameters of the module's own ``forward`` the adapted
      forward takes over (besides the cache, under either of its names), and the module attributes
      the adapter and the handlers read; :func:`check_contract` checks both.

    The attention scale is always the module's own ``scaling`` (``query_pre_attn_scalar`` for Gemma).
    """

    name: str
    model_types: tuple[str, ...]
    project: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, ...]] = _project_llama
    value_rows: Callable[[nn.Module], tuple[nn.Linear, slice]] = _value_rows_separate
    scale_qk: Callable[[nn.Module, torch.Tensor], None] = _scale_qk_separate
    shared_qk_scale: bool = False
    sliding_window: Callable[[nn.Module], int | None] = _window_of_module
    softcap_attribute: str | None = None
    rope: Callable[[nn.Module, nn.Module], tuple[torch.Tensor, float, str]] = _rope_single
    forward_params: tuple[str, ...] = _FORWARD_PARAMS
    attributes: tuple[str, ...] = _LLAMA_ATTRIBUTES


SUPPORTED_FAMILIES: tuple[FamilyAdapter, ...] = (
    FamilyAdapter("llama", ("llama", "qwen2", "qwen2_moe")),
    FamilyAdapter("mistral", ("mistral", "mixtral"), sliding_window=_window_of_config),
    FamilyAdapter("qwen3", ("qwen3", "qwen3_moe"), _project_qk_norm, scale_qk=_scale_qk_norm, shared_qk_scale=True,
                  attributes=_QK_NORM_ATTRIBUTES),
    FamilyAdapter("phi3", ("phi3",), _project_fused_qkv, _value_rows_fused, _scale_qk_fused, False, _window_of_config,
                  attributes=_FUSED_ATTRIBUTES),
    FamilyAdapter("gemma2", ("gemma2",), softcap_attribute="attn_logit_softcapping",
                  attributes=_LLAMA_ATTRIBUTES + ("sliding_window", "attn_logit_softcapping")),
    FamilyAdapter("gemma3", ("gemma3_text", "gemma3"), _project_qk_norm, scale_qk=functools.partial(_scale_qk_norm, offset=1.0),
                  shared_qk_scale=True, rope=_rope_per_layer_type,
                  attributes=_QK_NORM_ATTRIBUTES + ("sliding_window", "layer_type")),
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
    """The adapter for ``config.model_type``, or an error naming the supported ones.

    Reads the config alone, so an unsupported model is refused before any weights load.
    """
    model_type = getattr(config, "model_type", None)
    for family in SUPPORTED_FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported by rkv; supported: {', '.join(supported_model_types())}"
    )


def text_config(config: object) -> object:
    """The language model's config (the text part of a multimodal config such as ``gemma3``)."""
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def head_dim(config: object) -> int:
    """Channels per attention head: the one place rkv derives it (``head_dim``, else hidden / heads)."""
    cfg = text_config(config)
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (it holds ``.layers`` and ``.rotary_emb``), also inside a multimodal model."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    if getattr(inner, "layers", None) is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no decoder layers (get_decoder().layers)")
    return inner


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Every decoder layer, in order."""
    return list(decoder(model).layers)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    return [layer.self_attn for layer in decoder_layers(model)]


def layer_rope(model: nn.Module) -> list[tuple[torch.Tensor, float]]:
    """Each attention layer's RoPE as ``(inv_freq fp32 [d/2], attention_scaling)``, in layer order.

    Refuses ``dynamic`` RoPE, whose frequencies change with the sequence length (the cache stores
    keys rotated at fixed frequencies). ``longrope`` comes back with its short factors: what
    transformers uses while a sequence stays within :func:`rope_limit`, which rkv enforces.
    Partial RoPE (``partial_rotary_factor`` < 1) comes back padded with zero frequencies: see
    :func:`_full_width_rope`.
    """
    family = adapter_for(model.config)
    rotary = getattr(decoder(model), "rotary_emb", None)
    if rotary is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no rotary embedding at get_decoder().rotary_emb")
    tables = []
    for module in attention_modules(model):
        inv_freq, scaling, rope_type = family.rope(rotary, module)
        if "dynamic" in rope_type:
            raise ValueError(f"rope type {rope_type!r} changes its frequencies with the length; rkv supports static RoPE "
                             "(and longrope within original_max_position_embeddings) only")
        pad = module.head_dim // 2 - inv_freq.shape[0]
        tables.append((torch.cat([inv_freq.float(), inv_freq.new_zeros(pad, dtype=torch.float32)]), scaling))
    return tables


class RopeLimit(NamedTuple):
    """The longest sequence, in tokens, whose RoPE stays fixed, and why (for one-line refusals)."""

    tokens: int
    why: str


_LONGROPE_WHY = (
    "longrope keeps its short RoPE factors up to original_max_position_embeddings and past it switches every position "
    "to its long factors, which keys already in the rkv cache (rotated with the short ones) cannot follow"
)


def _rope_parameter_sets(cfg: object) -> list[dict]:
    """The config's RoPE parameter dicts: one, or one per layer type (Gemma 3)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    if "rope_type" in params:
        return [params]
    return [p for p in params.values() if isinstance(p, dict)]


def rope_limit(config: object) -> RopeLimit | None:
    """The most tokens one sequence may reach in rkv for a model whose RoPE changes with the length; ``None``: no such limit.

    ``longrope`` (Phi-3-*-128k, Phi-4-mini): ``original_max_position_embeddings``. transformers
    switches the whole forward to the long factors once a sequence is longer; the rkv cache keeps
    keys rotated with the short factors (the folded layout's mean term uses one table per layer),
    so sequences stay within it. Read from the config alone (checks run before weights load).
    """
    cfg = text_config(config)
    limits = [
        int(p.get("original_max_position_embeddings") or getattr(cfg, "original_max_position_embeddings", None)
            or cfg.max_position_embeddings)  # transformers' own default when neither is given
        for p in _rope_parameter_sets(cfg)
        if p.get("rope_type") == "longrope"
    ]
    return RopeLimit(min(limits), _LONGROPE_WHY) if limits else None


def context_length(config: object) -> int | None:
    """The most tokens one sequence may reach in rkv, or ``None`` when the model does not say: the model's
    context (``max_position_embeddings``), or less for a longrope model (:func:`rope_limit`).

    The one place every command (calibrate, eval, run, batch jobs, serve) and calibration pass takes this limit from.
    """
    limit = getattr(text_config(config), "max_position_embeddings", None)
    rope = rope_limit(config)
    limits = [int(n) for n in (limit, rope.tokens if rope else None) if n]
    return min(limits) if limits else None


def _refuse_past(limit: RopeLimit) -> Callable:
    """A forward pre-hook for the rotary embedding: refuse positions at or past ``limit.tokens``.

    The rotary embedding sees every forward's position ids once (one host read of their maximum
    per forward, for longrope models only), so no attached forward ever runs on switched factors.
    """

    def hook(_rotary: nn.Module, args: tuple, kwargs: dict) -> None:
        position_ids = args[1] if len(args) > 1 else kwargs.get("position_ids")
        if position_ids is None or position_ids.numel() == 0:
            return
        last = int(position_ids.max())
        if last >= limit.tokens:
            raise RopeLimitError(
                f"position {last} is past rkv's limit of {limit.tokens} tokens per sequence for this model "
                f"(original_max_position_embeddings): {limit.why}"
            )

    return hook


def _softcap(family: FamilyAdapter, holder: object) -> float | None:
    cap = getattr(holder, family.softcap_attribute) if family.softcap_attribute else None
    return None if cap is None else float(cap)


def layer_softcaps(model: nn.Module) -> list[float | None]:
    """Each attention layer's attention-logit soft cap (``None``: none), in layer order."""
    family = adapter_for(model.config)
    return [_softcap(family, module) for module in attention_modules(model)]


def attention_softcap(module: nn.Module) -> float | None:
    """The attention-logit soft cap of ``module`` (an attached attention layer), ``None`` if it has none."""
    return _softcap(module.__dict__["_rkv_family"], module)


def config_softcap(config: object) -> float | None:
    """The attention-logit soft cap a model of ``config`` applies (``None``: none), from the config alone."""
    return _softcap(adapter_for(config), text_config(config))


def attention_window(module: nn.Module) -> int | None:
    """The sliding window of ``module`` (an attached attention layer), ``None`` for global attention."""
    return module.__dict__["_rkv_family"].sliding_window(module)


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
    query, key = stock_rope(query, key, position_embeddings)
    if cache is not None:
        key, value = cache.update(key, value, module.layer_idx)
    return rotated_attention(module, query, key, value, attention_mask, **kwargs)


def stock_rope(query: torch.Tensor, key: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The family forward's RoPE of ``query`` and ``key`` (the handler's ``position_embeddings``)."""
    cos, sin = position_embeddings
    return apply_rotary_pos_emb(query, key, cos, sin)


def rotated_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs: object) -> torch.Tensor:  # fmt: skip
    """The family's attention function over post-RoPE ``query`` and ``key``: :func:`stock_attention` after its RoPE."""
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, _eager_attention(module))
    softcap = attention_softcap(module)
    if softcap is not None:
        kwargs["softcap"] = softcap
    out, _ = interface(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0,
        scaling=module.scaling,
        sliding_window=attention_window(module),
        **kwargs,
    )
    return out.reshape(*out.shape[:2], -1)


def _eager_attention(module: nn.Module) -> Callable:
    """The family's own eager attention (Gemma 2's applies the soft cap), else Llama's."""
    own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return own if callable(own) else eager_attention_forward


def _full_width_order(d: int, r: int) -> torch.Tensor:
    """The channels of a head, in the order :func:`_full_width_rope` hands them on (``r``: the rotated ones)."""
    half, rest = r // 2, (d - r) // 2
    idx = torch.arange(d)
    return torch.cat([idx[:half], idx[r : r + rest], idx[half:r], idx[r + rest :]])


def handler_channel_order(model: nn.Module) -> list[torch.Tensor | None]:
    """Per attention layer: which projection channel each channel that handlers see is (``None``: the same
    order). Partial RoPE reorders them (:func:`_full_width_rope`); a per-channel transform learned on what
    handlers see goes back to the weights through this."""
    family = adapter_for(model.config)
    rotary = getattr(decoder(model), "rotary_emb", None)
    orders = []
    for module in attention_modules(model):
        r = 2 * family.rope(rotary, module)[0].shape[0] if rotary is not None else module.head_dim
        orders.append(None if r >= module.head_dim else _full_width_order(module.head_dim, r))
    return orders


def _full_width_rope(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial RoPE (the first ``r < d`` channels rotated, rotate-half pairs ``(i, i + r/2)``) as full-width RoPE.

    The same channel permutation of q and k leaves every ``q·k`` unchanged. This one moves the
    pairs to ``(i, i + d/2)`` and the unrotated channels into pairs of zero frequency, so every
    rkv path (cache, kernels, evaluation) sees ordinary rotate-half RoPE over ``d`` channels;
    :func:`layer_rope` pads the frequencies to match. Those paths multiply every cos/sin by the
    RoPE's ``scaling`` (longrope's attention factor), which transformers applies to the rotated
    channels only: the unrotated ones get cos ``scaling`` (sin 0) and are divided by ``scaling``
    here, so they come out of RoPE unchanged, as in transformers.
    """
    d, r = query.shape[-1], cos.shape[-1]
    half, rest = r // 2, (d - r) // 2
    perm = _full_width_order(d, r).to(query.device)
    ones = cos.new_full((*cos.shape[:-1], rest), scaling)
    cos_full = torch.cat([cos[..., :half], ones, cos[..., :half], ones], dim=-1)
    sin_full = torch.cat([sin[..., :half], ones * 0, sin[..., :half], ones * 0], dim=-1)
    query, key = query[..., perm], key[..., perm]
    if scaling != 1.0:  # in fp32: no rounded 1/scaling in a low-precision model
        unrotated = torch.ones(d, dtype=torch.float32, device=query.device)
        unrotated[half : half + rest] = unrotated[d - rest :] = 1.0 / scaling
        query, key = (query.float() * unrotated).to(query.dtype), (key.float() * unrotated).to(key.dtype)
    return query, key, cos_full, sin_full


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
    if position_embeddings[0].shape[-1] < q.shape[-1]:  # partial RoPE (Phi-4-mini)
        q, k, *cos_sin = _full_width_rope(q, k, *position_embeddings, self.__dict__.get("_rkv_rope_scaling", 1.0))
        position_embeddings = tuple(cos_sin)
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
    rotary = getattr(decoder(model), "rotary_emb", None)
    limit = rope_limit(model.config)
    # SDPA cannot cap scores (transformers 5.17 loads Gemma 2 with SDPA and drops the cap silently):
    # a soft-capped model runs eager attention (masks and scores) while attached
    eager_for_softcap = config_softcap(model.config) is not None and model.config._attn_implementation == "sdpa"
    configs = {id(c): c for c in (model.config, text_config(model.config))}.values()
    if eager_for_softcap:
        model.set_attn_implementation("eager")
    hooks = []
    try:
        for layer, attn, layer_handler in zip(decoder_layers(model), modules, handlers):
            attn.__dict__["_rkv_family"] = family
            attn.__dict__["_rkv_handler"] = layer_handler
            attn.__dict__["forward"] = types.MethodType(_adapted_forward, attn)
            if rotary is not None:  # the scaling partial RoPE's unrotated channels must not get
                attn.__dict__["_rkv_rope_scaling"] = family.rope(rotary, attn)[1]
            hooks.append(layer.register_forward_pre_hook(_stash_layer_input(attn), with_kwargs=True))
        if limit is not None:
            if rotary is None:
                raise UnsupportedModelError(f"{type(model).__name__} has no rotary embedding at get_decoder().rotary_emb")
            hooks.append(rotary.register_forward_pre_hook(_refuse_past(limit), with_kwargs=True))
        yield
    finally:
        if eager_for_softcap:  # as it was (5.24 refuses SDPA for Gemma 2 through set_attn_implementation)
            for config in configs:
                config._attn_implementation = "sdpa"
        for hook in hooks:
            hook.remove()
        for attn in modules:
            for name in ("forward", "_rkv_family", "_rkv_handler", "_rkv_layer_input", "_rkv_rope_scaling"):
                attn.__dict__.pop(name, None)
