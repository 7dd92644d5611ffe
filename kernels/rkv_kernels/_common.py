"""Shared helpers of the Triton kernels: backend dispatch and small math constants.

Dispatch rule of every public op in this package (explicit, never a silent fallback):

- ``backend="auto"`` (default): the Triton kernel when the input tensor lives on a CUDA
  device, or when Triton's interpreter is enabled (``TRITON_INTERPRET=1`` in the
  environment *before* ``triton`` is first imported; the test suite's ``conftest.py``
  does this on machines without CUDA). Otherwise the pure-torch ``*_ref`` function:
  CPU users get the reference path by design.
- ``backend="triton"``: always the kernel (a CPU tensor then needs the interpreter, else
  a ``RuntimeError`` says so).
- ``backend="reference"``: always the pure-torch reference.
"""

from __future__ import annotations

import contextlib
import os
from typing import Literal

import torch

__all__ = ["Backend", "triton_interpreting", "use_triton", "resolve_backend", "next_pow2", "cdiv", "split_slots",
           "device_guard"]

Backend = Literal["auto", "triton", "reference"]


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """The ``auto`` rule: Triton for CUDA tensors, or for CPU tensors under the interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and triton_interpreting())


def resolve_backend(backend: Backend, t: torch.Tensor) -> bool:
    """Return True to launch the Triton kernel for ``t`` (see module docstring)."""
    if backend == "reference":
        return False
    if backend == "auto":
        return use_triton(t)
    if backend == "triton":
        if not use_triton(t):
            raise RuntimeError(
                f"backend='triton' needs a CUDA tensor or TRITON_INTERPRET=1 set before triton is "
                f"imported; got a {t.device.type} tensor without the interpreter"
            )
        return True
    raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host-side ints (``triton.cdiv`` is a constexpr function: several
    microseconds per call from Python, and a decode launch path makes several such calls)."""
    return -(-a // b)


def split_slots(T: int, block: int, num_splits: int) -> tuple[int, int]:
    """``(splits, slots per split)`` of ``T`` slots read in blocks of ``block``: ``num_splits`` clamped
    to ``[1, blocks]`` (0 when there are no slots), each split a whole number of blocks."""
    n_blocks = cdiv(T, block)
    splits = min(max(num_splits, 1), n_blocks) if T > 0 else 0
    return splits, (cdiv(n_blocks, splits) * block if splits else block)


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s CUDA device current for a kernel launch (a no-op on the CPU).

    Triton launches on the current device and its stream: a layer placed on ``cuda:1`` by
    ``device_map="auto"`` would otherwise run its kernels on ``cuda:0``'s stream, unordered
    with the work that produced its inputs.
    """
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
