"""Generation requests: the one typed structure both front ends build, and the checks that build it.

A batch-job line and an HTTP body are JSON objects with the same fields (OpenAI's names):
``prompt`` (a string, or a list of token ids) or ``messages`` (a list of ``{"role", "content"}``), and optional
``max_tokens``, ``temperature``, ``top_p`` and ``seed``. :func:`parse_request` checks every field
against the model's context and the server's limits and raises :class:`RequestError` (a message
naming the field and the fix) before anything reaches the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..runtime.generate import SamplingOptions

__all__ = ["Limits", "RequestError", "GenerationRequest", "parse_request", "prompt_ids"]


class RequestError(ValueError):
    """A request that cannot run; ``param`` names the offending field (OpenAI's error ``param``)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class Limits:
    """What a request may ask for: the model's context, the most new tokens, the default when unset."""

    context: int
    max_tokens: int = 4096
    default_max_tokens: int = 256


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the engine runs it: token ids in, at most ``max_tokens`` new ids out."""

    id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingOptions
    stop_ids: tuple[int, ...] = ()

    @property
    def total_tokens(self) -> int:
        """Prompt plus the most tokens it may generate: the cache slots it can reach."""
        return len(self.prompt_ids) + self.max_tokens


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not lo <= value <= hi:
        raise RequestError(f"{name} must be a number from {lo} to {hi}, got {value!r}", name)
    return float(value)


def _integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}", name)
    return value


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}] needs a role of system, user or assistant", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: text parts only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise RequestError(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    return out


def prompt_ids(tokenizer, body: dict, chat: bool) -> list[int]:
    """Token ids of ``body``'s prompt: ``messages`` through the chat template when ``chat``, else ``prompt``."""
    if chat:
        messages = _messages(body)
        if getattr(tokenizer, "chat_template", None) is None:
            raise RequestError("this model's tokenizer has no chat template; use /v1/completions with a prompt", "messages")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list):  # token ids, as OpenAI's API allows
        vocab = len(tokenizer)
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt):
            raise RequestError(f"a prompt of token ids must hold integers from 0 to {vocab - 1}", "prompt")
        return list(prompt)
    if not isinstance(prompt, str):
        raise RequestError("prompt must be a string or a list of token ids (one prompt per request)", "prompt")
    return list(tokenizer(prompt).input_ids)


def parse_request(body: object, tokenizer, limits: Limits, request_id: str, chat: bool, stop_ids: tuple[int, ...] = (),
                  defaults: SamplingOptions = SamplingOptions(temperature=1.0, top_p=1.0, top_k=0, seed=None)) -> GenerationRequest:  # fmt: skip
    """A checked :class:`GenerationRequest` from a JSON object (raises :class:`RequestError`).

    ``defaults`` gives the sampling of fields the body leaves out (OpenAI's: temperature 1, top_p 1).
    """
    if not isinstance(body, dict):
        raise RequestError("the request must be a JSON object")
    if _integer(body, "n") not in (None, 1):
        raise RequestError("n must be 1: one completion per request", "n")
    if body.get("best_of") not in (None, 1):
        raise RequestError("best_of must be 1", "best_of")
    for name in ("logprobs", "echo", "tools", "functions", "stop", "suffix", "logit_bias"):
        if body.get(name) not in (None, False, [], {}):
            raise RequestError(f"{name} is not supported by rkv serve; leave it out", name)
    ids = prompt_ids(tokenizer, body, chat)
    if not ids:
        raise RequestError("the prompt is empty after tokenization", "messages" if chat else "prompt")
    room = limits.context - len(ids)
    max_tokens = _integer(body, "max_tokens")
    if max_tokens is None:
        max_tokens = _integer(body, "max_completion_tokens")
    if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens:
        raise RequestError(f"max_tokens must be from 1 to {limits.max_tokens}, got {max_tokens}", "max_tokens")
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = max_tokens if max_tokens is not None else 1
        raise RequestError(
            f"this model's context is {limits.context} tokens; the prompt has {len(ids)} and max_tokens asks for "
            f"{asked} more ({len(ids) + asked}); shorten the prompt or lower max_tokens",
            "max_tokens" if room >= 1 else ("messages" if chat else "prompt"), "context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, room)
    temperature = _number(body, "temperature", defaults.temperature, 0.0, 2.0)
    top_p = _number(body, "top_p", defaults.top_p, 0.0, 1.0)
    if top_p == 0.0:
        raise RequestError("top_p must be above 0", "top_p")
    seed = _integer(body, "seed")
    sampling = SamplingOptions(temperature=temperature, top_p=top_p, top_k=defaults.top_k,
                               seed=defaults.seed if seed is None else seed)  # fmt: skip
    return GenerationRequest(request_id, tuple(ids), max_tokens, sampling, tuple(stop_ids))
