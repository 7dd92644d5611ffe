"""Generation with the packed rkv cache: a model wrapper for ``generate`` and a streaming loop.

:class:`RkvModel` keeps the HF model (value rotation already fused by export) and the checkpoint;
every forward it runs goes through the rkv attention handler, attached for the duration of the
call only. ``RkvModel.generate`` is transformers' ``generate`` with a fresh :class:`RkvCache`
as the model's cache; :func:`stream_generate` is a plain token loop (prefill once, then one token
per step) that yields tokens as they come and times prefill and decode separately.

Every path checks that the cache really received the tokens (:func:`ensure_cache_engaged`):
after prefill and after every step of :func:`stream_generate` (so before any token is yielded,
and at each window flush), and after each ``RkvModel`` call. A transformers release that routes
the cache around rkv's attention then stops generation with :class:`CacheDisengagedError`
instead of producing text from an attention that saw no cache.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

import transformers
import transformers.modeling_outputs

from ..export.format import Checkpoint
from ..models.adapters import adapter_for, attach, head_dim, text_config
from ..models.compat import CacheDisengagedError, cache_argument, check_transformers_version, supported_range_text
from .attention import rkv_attention
from .cache import CacheSettings, RkvCache
from .decode_graph import DecodeGraph, decode_graph_supports

__all__ = ["RkvModel", "SamplingOptions", "GenerationStats", "ensure_cache_engaged", "stream_generate", "sample_next"]

_OUTPUT_FLAGS = ("output_attentions", "output_hidden_states", "output_scores", "output_logits")


def _graph_blocker(kwargs: dict, generation_config: object) -> str | None:
    """Why a ``generate`` call with ``kwargs`` cannot replay its decode steps from a graph (``None``: it can)."""
    flags = [k for k in _OUTPUT_FLAGS if kwargs.get(k, getattr(generation_config, k, False))]
    if flags:
        return f"a replayed step returns logits only ({', '.join(flags)} asked)"
    if (kwargs.get("num_beams") or getattr(generation_config, "num_beams", 1) or 1) > 1:
        return "beam search reorders the cache every step"
    return None


def decode_runner(model: nn.Module, cache: RkvCache, cache_argument: str, cuda_graph: bool | None,
                  forward: Callable[..., object] | None = None, blocker: str | None = None,
                  ) -> tuple[DecodeGraph | None, str]:  # fmt: skip
    """The decode-step runner for a prefilled ``cache`` and the path it takes, in words (``forward``: see :class:`DecodeGraph`).

    ``cuda_graph``: ``None`` captures where :func:`decode_graph_supports` allows it (and the
    caller's ``blocker`` names no reason against it) and says why not otherwise; ``True``
    requires it (``ValueError`` with the reason); ``False`` runs eagerly.
    """
    if cuda_graph is False and not blocker:
        return None, "eager (CUDA graphs off)"
    reason = blocker or decode_graph_supports(cache, model)
    if reason is None:
        return DecodeGraph(model, cache, cache_argument, forward=forward), "CUDA graph"
    if cuda_graph:
        raise ValueError(f"cannot capture the decode step in a CUDA graph: {reason}")
    return None, f"eager ({reason})"


def ensure_cache_engaged(cache: RkvCache, expected_tokens: int, when: str) -> None:
    """Raise :class:`CacheDisengagedError` unless every layer of ``cache`` holds ``expected_tokens`` slots."""
    lengths = cache.lengths()
    if all(n == expected_tokens for n in lengths):
        return
    raise CacheDisengagedError(
        f"the rkv cache did not receive the tokens {when}: expected {expected_tokens} per layer, layers hold "
        f"{sorted(set(lengths))}. The model's attention bypassed rkv (transformers {transformers.__version__} "
        f"is installed; rkv is tested with {supported_range_text()}). No output was produced."
    )


class RkvModel:
    """An exported model running with the rkv cache (see module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        checkpoint: Checkpoint,
        tokenizer: object | None = None,
        settings: CacheSettings | None = None,
        backend: str = "auto",
        cuda_graph: bool | None = None,
    ) -> None:
        check_transformers_version()
        adapter_for(model.config)
        cfg, rkv = text_config(model.config), checkpoint.config
        d = head_dim(model.config)
        if (cfg.num_hidden_layers, cfg.num_key_value_heads, d) != (rkv.num_layers, rkv.num_key_value_heads, rkv.head_dim):
            raise ValueError(
                f"checkpoint is for {rkv.num_layers} layers x {rkv.num_key_value_heads} KV heads of {rkv.head_dim}, "
                f"the model has {cfg.num_hidden_layers} x {cfg.num_key_value_heads} of {d}"
            )
        self.model = model
        self.checkpoint = checkpoint
        self.tokenizer = tokenizer
        self.settings = settings or CacheSettings.from_config(rkv)
        self.backend = backend
        self.cuda_graph = cuda_graph  # decode steps of generate(): see decode_runner
        self.last_decode_path = ""  # how the last generate() ran its decode steps, in words
        self.last_cache: RkvCache | None = None
        self.cache_argument = cache_argument(type(model).forward)  # "cache" from transformers 5.24 on

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def config(self):
        return self.model.config

    def new_cache(self, reserve_tokens: int = 0) -> RkvCache:
        """An empty cache; ``reserve_tokens`` sizes its store up front (prompt + new tokens, when known)."""
        return RkvCache.from_checkpoint(self.checkpoint, self.model, self.settings, self.backend).reserve(reserve_tokens)

    @contextlib.contextmanager
    def attached(self) -> Iterator[nn.Module]:
        """The HF model with the rkv handler attached (pass ``self.new_cache()`` as ``self.cache_argument``)."""
        with attach(self.model, rkv_attention):
            yield self.model

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, cache: RkvCache | None = None, **kwargs: object):
        """One forward through the rkv handler; without ``cache`` a fresh one is made."""
        cache = cache if cache is not None else self.new_cache()
        before = max(cache.lengths(), default=0)
        with self.attached():
            out = self.model(input_ids=input_ids, use_cache=True, **{self.cache_argument: cache}, **kwargs)
        ensure_cache_engaged(cache, before + input_ids.shape[1], "in this forward")
        self.last_cache = cache
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, cache: RkvCache | None = None, **kwargs: object):
        """transformers' ``generate`` with the rkv cache (``cache_implementation`` cannot be combined).

        Decode steps replay a captured CUDA graph where they can (``cuda_graph`` of the constructor,
        :func:`decode_runner`); ``last_decode_path`` says which path ran and, if eager, why. Without
        ``cache``, the cache is sized for prompt + ``max_new_tokens``. Returns nothing unless the
        cache received every token fed to the model: the prompt and each generated token but the last.
        """
        if "cache_implementation" in kwargs:
            raise ValueError("RkvModel.generate always uses the rkv cache; drop cache_implementation")
        gen = kwargs.get("generation_config") or self.model.generation_config
        if cache is None:  # sized for the whole job when its length is known: no store growth on the way
            new = kwargs.get("max_new_tokens", getattr(gen, "max_new_tokens", None))
            cache = self.new_cache(reserve_tokens=input_ids.shape[1] + new if new else 0)
        blocker = _graph_blocker(kwargs, gen)
        if blocker and self.cuda_graph:
            raise ValueError(f"cannot capture the decode step in a CUDA graph: {blocker}; pass cuda_graph=False")
        with self.attached(), _graph_steps(self, cache, self.cuda_graph, blocker):
            out = self.model.generate(input_ids, **{self.cache_argument: cache}, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        ensure_cache_engaged(cache, sequences.shape[1] - 1, "during generate")
        self.last_cache = cache
        return out


@contextlib.contextmanager
def _graph_steps(rkv: RkvModel, cache: RkvCache, cuda_graph: bool | None, blocker: str | None) -> Iterator[None]:
    """While open, the decode calls ``generate`` makes to ``rkv.model`` (one token per sequence,
    after prefill) go through :func:`decode_runner`'s runner (none while ``blocker`` names a reason);
    prefill runs the model's own forward."""
    model, original = rkv.model, rkv.model.forward
    state: dict[str, DecodeGraph | None] = {}
    rkv.last_decode_path = "no decode step"

    def forward(*args: object, **kwargs: object) -> object:
        ids = kwargs.get("input_ids", args[0] if args else None)
        decode = isinstance(ids, torch.Tensor) and ids.shape[1] == 1 and cache.get_seq_length() > 0
        if not decode or kwargs.get("inputs_embeds") is not None:
            return original(*args, **kwargs)
        if "runner" not in state:
            state["runner"], rkv.last_decode_path = decode_runner(model, cache, rkv.cache_argument, cuda_graph,
                                                                  original, blocker)  # fmt: skip
        runner = state["runner"]
        if runner is None:
            return original(*args, **kwargs)
        positions = kwargs.get("position_ids")
        if positions is None:  # what the model itself would use: the cache length, every row
            positions = torch.full_like(ids, cache.get_seq_length())
        logits = runner.step(ids, positions.to(ids.device))
        return transformers.modeling_outputs.CausalLMOutputWithPast(logits=logits[:, None].clone(), past_key_values=cache)

    own = model.__dict__.get("forward")  # an instance forward (accelerate's hooks) is put back as it was
    model.forward = functools.wraps(original)(forward)
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own
        if state.get("runner") is not None:
            state["runner"].close()


@dataclass(frozen=True)
class SamplingOptions:
    """Greedy when ``temperature == 0``; else temperature, then top-k, then top-p (nucleus)."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    seed: int | None = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def sample_next(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ``int64 [B]`` from ``logits [B, vocab]``."""
    if options.greedy:
        return logits.argmax(-1)
    scores = logits.float() / options.temperature
    if 0 < options.top_k < scores.shape[-1]:
        kth = torch.topk(scores, options.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if 0.0 < options.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_scores.softmax(-1) > options.top_p  # keep the token crossing top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class GenerationStats:
    """Timings and cache size of one :func:`stream_generate` run."""

    batch: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    first_decode_seconds: float = 0.0  # the first decode step alone (on CUDA it compiles the kernels)
    kv_bytes: int = 0
    kv_bytes_allocated: int = 0
    fp16_equivalent_bytes: int = 0
    bits_per_element: float = 0.0
    sinks_per_layer: list[float] = field(default_factory=list)
    decode_path: str = ""  # "CUDA graph" or "eager (why)": decode_runner

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.batch * self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Generated tokens (after the first, which prefill produces) per second of decode steps."""
        steps = max(self.new_tokens - 1, 0)
        return self.batch * steps / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def steady_decode_tokens_per_second(self) -> float:
        """Like :attr:`decode_tokens_per_second`, without the first decode step (one-time kernel compilation)."""
        steps = max(self.new_tokens - 2, 0)
        rest = self.decode_seconds - self.first_decode_seconds
        return self.batch * steps / rest if steps and rest > 0 else self.decode_tokens_per_second

    @property
    def compression(self) -> float:
        return self.fp16_equivalent_bytes / self.kv_bytes if self.kv_bytes else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def stream_generate(
    rkv_model: RkvModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    sampling: SamplingOptions = SamplingOptions(),
    eos_token_ids: list[int] | tuple[int, ...] = (),
    stats: GenerationStats | None = None,
    prefill_batch: int | None = None,
    cuda_graph: bool | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token ``int64 [B]`` of every sequence, step by step, until all hit EOS.

    Left-padded batches: pass the 2D ``attention_mask`` (1 = real token). Finished sequences keep
    receiving their EOS token (not yielded differently: callers stop reading them). ``stats``,
    when given: token counts and timings as the loop runs, cache sizes once it ends (exhausted or
    closed early; measuring them every step cost host time).
    The cache is sized once for prompt + ``max_new_tokens``. ``prefill_batch`` prefills at most
    that many sequences per forward (bounds the prefill's activation memory for large batches;
    the result is the same as one forward). ``cuda_graph``: how decode steps run
    (:func:`decode_runner`; ``stats.decode_path`` says which path ran).
    """
    stats = stats if stats is not None else GenerationStats()
    device = rkv_model.device
    ids = input_ids.to(device)
    b, t = ids.shape
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device)
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    next_pos = mask.long().sum(-1)  # position of each sequence's next token
    generator = None
    if not sampling.greedy and sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    eos = torch.tensor(list(eos_token_ids) or [-1], device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    cache = rkv_model.new_cache(reserve_tokens=t + max_new_tokens)
    rkv_model.last_cache = cache
    stats.batch, stats.prompt_tokens, stats.new_tokens, stats.decode_seconds = b, t, 0, 0.0

    with rkv_model.attached() as model:
        _sync(device)
        start = time.perf_counter()
        logits = _prefill(rkv_model, model, cache, ids, mask, positions, prefill_batch)
        ensure_cache_engaged(cache, t, "at prefill")
        token = sample_next(logits.to(device), sampling, generator)
        _sync(device)
        stats.prefill_seconds = time.perf_counter() - start
        runner, stats.decode_path = decode_runner(model, cache, rkv_model.cache_argument, cuda_graph)
        try:
            for step in range(max_new_tokens):
                token = torch.where(finished, eos[0].clamp_min(0), token)
                stats.new_tokens = step + 1
                yield token
                finished |= torch.isin(token, eos)
                if step + 1 == max_new_tokens or bool(finished.all()):
                    break
                start = time.perf_counter()
                if runner is not None:  # decode tokens are never padding: no mask
                    logits = runner.step(token[:, None], next_pos[:, None])
                else:
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                    logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                                   use_cache=True, **{rkv_model.cache_argument: cache}).logits[:, -1]  # fmt: skip
                ensure_cache_engaged(cache, t + step + 1, f"at decode step {step + 1}")
                next_pos = next_pos + 1
                token = sample_next(logits.to(device), sampling, generator)  # lm_head may sit on another GPU
                _sync(device)
                elapsed = time.perf_counter() - start
                stats.decode_seconds += elapsed
                if step == 0:
                    stats.first_decode_seconds = elapsed
        finally:  # also when the caller stops early (the generator is closed at a yield)
            if runner is not None:
                runner.close()
            _fill_cache_stats(stats, cache)
            stats.sinks_per_layer = [float(layer.sink_counts().float().mean()) for layer in cache.layers
                                     if layer.is_initialized]  # fmt: skip


def _prefill(
    rkv_model: RkvModel, model: nn.Module, cache: RkvCache, ids: torch.Tensor, mask: torch.Tensor,
    positions: torch.Tensor, chunk: int | None,
) -> torch.Tensor:
    """Last-position logits ``[B, vocab]`` of the prompt, writing ``cache`` (in slices of ``chunk`` sequences)."""
    b = ids.shape[0]
    if chunk is None or chunk >= b:
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                    **{rkv_model.cache_argument: cache})  # fmt: skip
        return out.logits[:, -1]
    if chunk <= 0:
        raise ValueError(f"prefill_batch must be positive, got {chunk}")
    cache.allocate(b, rkv_model.dtype)  # its store sized by new_cache(reserve_tokens=...)
    starts = range(0, b, chunk)
    parts = [cache.rows(s, min(chunk, b - s)) for s in starts]  # views: slices write straight into the cache
    logits = []
    for s, part in zip(starts, parts):
        rows = slice(s, s + part.layers[0].batch)
        out = model(input_ids=ids[rows], attention_mask=mask[rows], position_ids=positions[rows], use_cache=True,
                    logits_to_keep=1, **{rkv_model.cache_argument: part})  # fmt: skip
        logits.append(out.logits[:, -1])
        del out
    for s, part in zip(starts, parts):
        cache.take_counts(part, s)
    return torch.cat(logits)


def _fill_cache_stats(stats: GenerationStats, cache: RkvCache) -> None:
    stats.kv_bytes = cache.bytes_used()
    stats.kv_bytes_allocated = cache.bytes_allocated()
    stats.fp16_equivalent_bytes = cache.fp16_equivalent_bytes()
    stats.bits_per_element = cache.bits_per_element()
