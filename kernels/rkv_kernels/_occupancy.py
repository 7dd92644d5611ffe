"""How many programs of a compiled kernel fit on one SM, and split counts that fill whole waves.

A decode kernel's grid is ``B x head units x splits``. When the programs do not fill a whole
number of waves of resident programs, the last wave runs mostly empty (320 programs at two per
SM on 132 SMs take two full waves of time, 256 take one). The residency comes from the compiled
kernel (registers, warps, shared memory), recorded after its first launch.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["record_residency", "resident_per_sm", "sm_count", "wave_splits"]

_RESIDENT: dict[tuple, int] = {}


def resident_per_sm(key: tuple) -> int | None:
    """Programs per SM recorded for the launch configuration ``key`` (None before its first launch)."""
    return _RESIDENT.get(key)


def record_residency(key: tuple, compiled: object, device: torch.device) -> None:
    """Record how many programs of ``compiled`` (what a CUDA launch returns) fit on one SM of ``device``."""
    if key in _RESIDENT or device.type != "cuda" or getattr(compiled, "n_regs", None) is None:
        return
    props = torch.cuda.get_device_properties(device)
    warps = compiled.metadata.num_warps
    lanes = getattr(compiled.metadata, "warp_size", 32)
    regs_per_warp = -(-compiled.n_regs * lanes // 256) * 256  # allocated per warp in units of 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // max(regs_per_warp * warps, 1)
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (lanes * warps)
    smem = compiled.metadata.shared
    if smem:  # each resident block also reserves 1 KB of shared memory (sm_80 and later)
        by_smem = getattr(props, "shared_memory_per_multiprocessor", 233472) // (smem + 1024)
    else:
        by_smem = by_threads
    _RESIDENT[key] = max(1, min(by_regs, by_threads, by_smem))


@functools.lru_cache(maxsize=4096)
def wave_splits(programs: int, n_blocks: int, slots: int) -> int:
    """Splits ``s`` of each program's ``n_blocks`` token blocks minimising the run time in block
    steps, ``ceil(programs * s / slots) * ceil(n_blocks / s)`` (``slots``: resident programs on the
    whole device). Among equals: the most splits while the grid stays within two waves (spare
    programs even out the tail; measured on an H100), else the fewest (merge work).
    Cached: it runs on every decode call."""
    best_cost, best = math.inf, 1
    for s in range(1, max(n_blocks, 1) + 1):
        cost = math.ceil(programs * s / slots) * math.ceil(n_blocks / s)
        if cost < best_cost or (cost == best_cost and programs * s <= 2 * slots):
            best_cost, best = cost, s
        if programs * s >= 8 * slots:  # more splits only add merge work
            break
    return best


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (cached: queried on every decode call); 4 on other devices
    (the interpreter's tensors), so that launch rules still see several programs per grid there."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
