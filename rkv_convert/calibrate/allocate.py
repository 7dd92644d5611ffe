"""Per-layer key and value widths under an average bit budget, from measured sensitivity (KVTuner-style).

Sensitivity is measured on development text (never the evaluation text): start from every layer's
keys and values at ``low`` bits, raise one (layer, keys-or-values) pair at a time to ``high``
bits and record how much the mean next-token NLL falls. The allocation then raises pairs in order
of gain per stored bit until the average stored bits per element would pass the budget (gains
are taken as additive, the usual first-order assumption; the result is scored again, as a whole,
wherever it is reported).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..export.format import Checkpoint
from ..quant.quantizer import bits_per_element

__all__ = ["Sensitivity", "measure_sensitivity", "allocate_bits", "Allocation", "key_bits_by_error", "key_bits_for_retrieval",
           "RETRIEVAL_THRESHOLD"]

Log = Callable[[str], None]


@dataclass
class Sensitivity:
    """Mean NLL per token on development text: all at ``low`` bits (``base_nll``), and with one pair raised."""

    low: int
    high: int
    base_nll: float
    key_gain: list[float]  # per layer: base_nll - NLL with that layer's keys at `high`
    value_gain: list[float]  # per layer: the same for values
    protocol: str = "sinks"
    tokens: int = 0


@dataclass
class Allocation:
    """Per-layer widths and what they cost (stored bits per element, averaged over layers and K/V)."""

    key_bits: list[int]
    value_bits: list[int]
    bits_per_element: float
    raised: list[str] = field(default_factory=list)  # "k12", "v3", ... in the order chosen


def measure_sensitivity(
    model: torch.nn.Module,
    dev_windows: torch.Tensor,
    checkpoint_at: Callable[[list[int], list[int]], Checkpoint],
    num_layers: int,
    low: int = 2,
    high: int = 3,
    protocol: str = "sinks",
    batch_size: int = 4,
    log: Log | None = None,
) -> Sensitivity:
    """``2 * num_layers + 1`` perplexity runs on ``dev_windows`` (``int64 [n, T]``) with the RotateKV scheme.

    ``checkpoint_at(key_bits, value_bits)`` gives the checkpoint at those per-layer widths (clips at
    each width); ``model`` has the value rotation fused.
    """
    from ..evaluate.perplexity import perplexity
    from ..evaluate.schemes import build_scheme

    def nll(key_bits: list[int], value_bits: list[int]) -> float:
        ck = checkpoint_at(key_bits, value_bits)
        result = perplexity(model, dev_windows, build_scheme("rotatekv", None, ck), protocol, ck, batch_size=batch_size)
        return math.log(result.perplexity)

    base = [low] * num_layers
    base_nll = nll(base, base)
    gains = {"k": [], "v": []}
    for kind in ("k", "v"):
        for layer in range(num_layers):
            raised = [high if i == layer else low for i in range(num_layers)]
            value = nll(raised, base) if kind == "k" else nll(base, raised)
            gains[kind].append(base_nll - value)
            if log:
                log(f"[sensitivity] {kind}{layer} at {high} bits: NLL gain {base_nll - value:+.5f}")
    return Sensitivity(low, high, base_nll, gains["k"], gains["v"], protocol, int(dev_windows.numel()))


def allocate_bits(sensitivity: Sensitivity, budget: float, key_group_size: int, value_group_size: int) -> Allocation:
    """Raise (layer, K/V) pairs from ``low`` to ``high`` bits by gain per stored bit while the average
    stored bits per element (keys and values alike, ``b + 32/g``) stays within ``budget``."""
    s = sensitivity
    n = len(s.key_gain)
    key_bits, value_bits = [s.low] * n, [s.low] * n

    def cost() -> float:
        k = sum(bits_per_element(b, key_group_size) for b in key_bits)
        v = sum(bits_per_element(b, value_group_size) for b in value_bits)
        return (k + v) / (2 * n)

    if cost() > budget + 1e-9:
        raise ValueError(f"budget {budget} bits per element is below every layer at {s.low} bits ({cost():.3f})")
    step = (s.high - s.low) / (2 * n)  # average bits per element one raised pair adds (same for K and V)
    pairs = [("k", i, g) for i, g in enumerate(s.key_gain)] + [("v", i, g) for i, g in enumerate(s.value_gain)]
    raised = []
    for kind, i, gain in sorted(pairs, key=lambda p: -p[2]):
        if gain <= 0 or cost() + step > budget + 1e-9:
            continue
        (key_bits if kind == "k" else value_bits)[i] = s.high
        raised.append(f"{kind}{i}")
    return Allocation(key_bits, value_bits, cost(), raised)


def key_bits_by_error(key_errors: list[list[float]], bits: int, raised: int) -> list[int]:
    """Per-layer key widths: every layer at ``bits``, and the ``raised`` layers whose calibrated key error falls
    most from ``bits`` to ``bits + 1`` at ``bits + 1`` (``key_errors[i]``: the calibrator's query-weighted key
    error at 2, 3 and 4 bits, ``key_error_by_bits``; ties keep the lower layer first).

    Why this rule: it needs no pass beyond calibration, and on SmolLM2 its choice scored like a dev-text NLL
    sweep's (WikiText 1k, 8-bit metadata at 2.5 bits: one-shot 1.458x vs 1.421x, deployed 1.035x vs 1.036x),
    while the sweep itself did not reproduce on other windows (``docs/accuracy.md``)."""
    if bits not in (2, 3):
        raise ValueError(f"raising key layers needs --bits 2 or 3 (one more bit must exist), got {bits}")
    if not 0 <= raised <= len(key_errors):
        raise ValueError(f"cannot raise {raised} of {len(key_errors)} layers")
    index = bits - 2
    gain = [float(e[index]) - float(e[index + 1]) for e in key_errors]
    top = sorted(range(len(gain)), key=lambda i: (-gain[i], i))[:raised]
    return [bits + 1 if i in top else bits for i in range(len(gain))]


RETRIEVAL_THRESHOLD = 0.1  # induction score above which a layer holds a retrieval head (uniform attention: ~1/T)


def key_bits_for_retrieval(key_errors: list[list[float]], induction: list[list[float]], bits: int, steps: int,
                           threshold: float = RETRIEVAL_THRESHOLD) -> list[int]:  # fmt: skip
    """Per-layer key widths that spend ``steps`` one-bit raises (the budget of ``--key-bits auto``: half the
    layers) first on retrieval heads, then like :func:`key_bits_by_error`.

    Layers whose strongest KV head scores at least ``threshold`` (``induction[i]``: per KV head,
    ``calibrate.retrieval``) take keys at ``bits + 2`` bits (4 at most), strongest first, while two steps are
    left; the remaining steps raise other layers by one bit where the calibrated key error falls most."""
    if bits not in (2, 3):
        raise ValueError(f"raising key layers needs --bits 2 or 3 (one more bit must exist), got {bits}")
    n = len(key_errors)
    if len(induction) != n or not 0 <= steps <= n:
        raise ValueError(f"need one induction score list per layer ({len(induction)} for {n}) and 0 <= steps <= {n}")
    widths = [bits] * n
    top = max(min(bits + 2, 4), bits + 1)
    strength = [max(float(x) for x in scores) for scores in induction]
    for i in sorted(range(n), key=lambda i: (-strength[i], i)):
        cost = top - bits
        if strength[i] < threshold or steps < cost:
            break
        widths[i], steps = top, steps - cost
    rest = [i for i in range(n) if widths[i] == bits]
    raised = key_bits_by_error([key_errors[i] for i in rest], bits, min(steps, len(rest)))
    for i, width in zip(rest, raised):
        widths[i] = width
    return widths
