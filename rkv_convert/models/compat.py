"""The transformers releases rkv is tested with, and the names that moved between them.

rkv reaches into each attention module's forward (pre-RoPE keys need it, see
:mod:`.adapters`), so a transformers release that renames an argument can disengage the rkv
cache without an error. Two defences live here:

- :data:`TESTED_TRANSFORMERS` is the range CI tests at both ends (``pyproject.toml`` pins the
  same range); :func:`check_transformers_version` refuses to calibrate or generate outside it
  unless ``RKV_ALLOW_UNTESTED_TRANSFORMERS=1`` is set;
- :func:`cache_argument` reads the cache argument's name (``past_key_values`` up to 5.23,
  ``cache`` from 5.24) from the installed model code rather than from a version number.
"""

from __future__ import annotations

import inspect
import os
from typing import Callable

import transformers
from packaging.version import Version

__all__ = [
    "ALLOW_UNTESTED_ENV",
    "CacheDisengagedError",
    "TESTED_TRANSFORMERS",
    "UntestedTransformersError",
    "cache_argument",
    "cache_kwargs",
    "check_transformers_version",
    "supported_range_text",
]

TESTED_TRANSFORMERS: tuple[str, str] = ("5.17.0", "5.25.0")
"""Lowest and newest transformers release CI tests (keep in step with ``pyproject.toml``)."""

ALLOW_UNTESTED_ENV = "RKV_ALLOW_UNTESTED_TRANSFORMERS"
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")


class UntestedTransformersError(RuntimeError):
    """The installed transformers release is outside the tested range."""


class CacheDisengagedError(RuntimeError):
    """A forward ran but the rkv cache did not receive its tokens (the model bypassed rkv's attention)."""


def supported_range_text() -> str:
    low, high = TESTED_TRANSFORMERS
    return f"transformers>={low},<={high}"


def check_transformers_version(version: str | None = None) -> None:
    """Raise :class:`UntestedTransformersError` unless ``version`` (default: installed) is in the tested range."""
    installed = version or transformers.__version__
    low, high = (Version(v) for v in TESTED_TRANSFORMERS)
    if low <= Version(installed) <= high:
        return
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        return
    raise UntestedTransformersError(
        f"transformers {installed} is installed; rkv is tested with {supported_range_text()}. "
        f"Install a tested release (pip install '{supported_range_text()}'), or set "
        f"{ALLOW_UNTESTED_ENV}=1 to try this one at your own risk (generation still stops if the rkv cache "
        "does not receive the tokens)."
    )


def cache_argument(forward: Callable) -> str:
    """The name under which ``forward`` (a model's or attention module's) takes the KV cache.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` and kept the old name only as a
    deprecated alias; passing the current name avoids the deprecation path.
    """
    params = inspect.signature(inspect.unwrap(forward)).parameters
    for name in CACHE_ARGUMENT_NAMES:
        if name in params:
            return name
    raise UntestedTransformersError(
        f"{getattr(forward, '__qualname__', forward)} takes none of {', '.join(CACHE_ARGUMENT_NAMES)} "
        f"(transformers {transformers.__version__}; rkv is tested with {supported_range_text()})"
    )


def cache_kwargs(model: object, cache: object) -> dict[str, object]:
    """``{name: cache}`` for calling ``model`` (a transformers model) with a KV cache on any tested release."""
    return {cache_argument(type(model).forward): cache}
