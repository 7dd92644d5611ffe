"""What the ``rkv`` commands check before any model loads, the errors they report in one line,
and the consoles they print through."""

from __future__ import annotations

from typing import NoReturn

import torch
import typer
from rich.console import Console

from .calibrate.observers import CalibrationError
from .export.format import SUPPORTED_BITS
from .models.adapters import ContractError, context_length, rope_limit
from .models.compat import CacheDisengagedError, UntestedTransformersError

__all__ = [
    "InputError",
    "LIBRARY_ERRORS",
    "check_bits",
    "check_device",
    "check_length",
    "check_prompt_fits",
    "context_length",
    "context_text",
    "fail",
    "make_console",
    "parse_bits",
]

PIPED_WIDTH = 400
"""Console width when output is not a terminal: tables print whole instead of being cut at 80 columns."""


class InputError(ValueError):
    """A command-line value that cannot work; the message names the option and the fix."""


LIBRARY_ERRORS = (UntestedTransformersError, CacheDisengagedError, ContractError, CalibrationError)
"""The ``RuntimeError`` types rkv raises deliberately (an untested transformers release, a disengaged
rkv cache, an attention module that broke its family's contract, calibration data that gives no
statistic): the commands print them in one line. Other ``RuntimeError``s are bugs and keep their traceback."""


def make_console(stderr: bool = False) -> Console:
    """A rich console; wide when not a terminal, so piped tables keep every column whole."""
    console = Console(stderr=stderr)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, width=PIPED_WIDTH)


def fail(console: Console, message: object, code: int = 2) -> NoReturn:
    """Print one red ``error:`` line (never wrapped) and exit with ``code``."""
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code=code)


def check_device(device: str | None, option: str = "--device") -> None:
    """Refuse a device torch cannot parse, or a CUDA device on a machine without one."""
    if device is None or device == "auto":
        return
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise InputError(f"{option} {device}: not a device ({err}); use cpu, cuda or cuda:N") from err
    if parsed.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise InputError(f"{option} {device}: no CUDA device (torch {torch.__version__} sees none); use {option} cpu")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise InputError(f"{option} {device}: only {torch.cuda.device_count()} CUDA device(s) here; use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")


def check_bits(bits: int) -> None:
    """Refuse a bit width the packed cache has no layout for."""
    if bits not in SUPPORTED_BITS:
        raise InputError(f"--bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits}")


def parse_bits(text: str) -> list[int]:
    """A comma list of supported bit widths, e.g. ``"2,3,4"``."""
    valid = ", ".join(map(str, SUPPORTED_BITS))
    items = [b.strip() for b in text.split(",") if b.strip()]
    if not items or not all(b.isdigit() and int(b) in SUPPORTED_BITS for b in items):
        raise InputError(f"--bits takes a comma list of {valid}; got {text!r}")
    return [int(b) for b in items]


def context_text(config: object) -> str:
    """``context_length`` for a message: the number, where it comes from and, when not the model's own context, why."""
    limit = context_length(config)
    rope = rope_limit(config)
    if rope is not None and rope.tokens == limit:
        return f"rkv's limit of {limit} tokens for this model (original_max_position_embeddings: {rope.why})"
    return f"the model's context of {limit} tokens (max_position_embeddings)"


def check_length(option: str, tokens: int, config: object) -> None:
    """Refuse a window longer than :func:`context_length` (``option`` names the flag that set it)."""
    limit = context_length(config)
    if limit is not None and tokens > limit:
        raise InputError(f"{option} {tokens} is longer than {context_text(config)}; use {option} {limit} or less")


def check_prompt_fits(prompt_tokens: int, max_new_tokens: int, config: object) -> None:
    """Refuse an empty prompt, or one that with the new tokens runs past the model's context."""
    if prompt_tokens == 0:
        raise InputError("the prompt is empty after tokenization; pass some text with --prompt")
    limit = context_length(config)
    total = prompt_tokens + max_new_tokens
    if limit is not None and total > limit:
        raise InputError(
            f"the prompt has {prompt_tokens} tokens; with --max-new-tokens {max_new_tokens} that is {total}, beyond "
            f"{context_text(config)}; shorten the prompt or lower --max-new-tokens"
        )
