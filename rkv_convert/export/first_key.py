"""The first-key fit: each KV head's key rotation followed by a reflection that stores the first token's key exactly.

From the fourth layer of SmolLM2 on, the key of a sequence's first token (the attention sink every query reads) is
the same vector whatever the token (cosine >= 0.995 across windows, docs/accuracy.md). Its centred key is large
(3-4x a typical key's norm), so the 2-bit store's error on it shifts every query's attention: keeping it exact takes
one-shot perplexity (every key quantized, sinks included) down by about 8 %. In the folded layout any orthogonal
``R_h`` is free at decode, so the export turns ``R_h`` into ``R_h · F_h``, with ``F_h`` the Householder reflection
that maps ``y0 = x0 R_h`` (``x0``: the calibrated mean centred first key) onto a vector of equal norm that the
layer's quantizer (its key width, clip, group metadata and ranges) stores almost exactly: ``y0``'s own quantized
grid, with its largest and smallest entries kept where they are so that the grid the quantizer draws is the same.
Every other key turns by ``F_h`` too, a reflection about one hyperplane: on development text the sinks-protocol
perplexity moves by 0.1 %.
"""

from __future__ import annotations

import torch

from ..quant.quantizer import GroupRanges, fake_quantize

__all__ = ["reflection", "stored_exactly", "fit_first_key"]

TARGET_ITERATIONS = 20


def reflection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 ``[d, d]`` Householder reflection ``I - 2 u uᵀ`` with ``a F = b`` (``|a| = |b|``), identity when ``a = b``."""
    u = (a - b).float()
    eye = torch.eye(a.numel(), dtype=torch.float32, device=a.device)
    norm = u.norm()
    if norm <= 1e-7 * a.float().norm().clamp_min(1e-30):
        return eye
    u = u / norm
    return eye - 2.0 * torch.outer(u, u)


def _roundtrip(y: torch.Tensor, bits: int, group_size: int, clip: float, meta_base: float | None,
               ranges: GroupRanges) -> torch.Tensor:  # fmt: skip
    return fake_quantize(y[None], bits, group_size, clip, meta_base=meta_base, ranges=ranges)[0]


def stored_exactly(y0: torch.Tensor, bits: int, group_size: int, clip: float, meta_base: float | None = None,
                   ranges: GroupRanges = GroupRanges.MINMAX) -> torch.Tensor:  # fmt: skip
    """fp32 ``[d]`` of ``y0``'s norm that the quantizer stores with the least error found: starting from ``y0``, each
    step takes the stored vector, puts back every group's largest and smallest entries (the quantizer clips those, and
    they set its grid) and rescales to ``|y0|``; the best of ``y0`` and the steps by relative error."""
    y0, ranges = y0.float(), GroupRanges(ranges)
    best, best_err, t = y0, float("inf"), y0
    for step in range(TARGET_ITERATIONS + 1):
        stored = _roundtrip(t, bits, group_size, clip, meta_base, ranges)
        err = float((stored - t).norm() / t.norm().clamp_min(1e-30))
        if err < best_err:
            best, best_err = t, err
        if step == TARGET_ITERATIONS:
            break
        stored, groups = stored.reshape(-1, group_size), t.reshape(-1, group_size)
        rows = torch.arange(groups.shape[0], device=t.device)
        for ends in (groups.argmax(-1), groups.argmin(-1)):
            stored[rows, ends] = groups[rows, ends]
        t = stored.reshape(-1)
        t = t * (y0.norm() / t.norm().clamp_min(1e-30))
    return best


def fit_first_key(rotations: torch.Tensor, first_key: torch.Tensor, bits: int, group_size: int, clip: float,
                  meta_base: float | None = None, ranges: GroupRanges = GroupRanges.MINMAX) -> torch.Tensor:  # fmt: skip
    """fp32 ``[n_kv, d, d]``: each head's ``R_h [d, d]`` (``rotations``) times the reflection that maps the calibrated
    first key ``first_key[h] [d]`` (centred, in the frame ``R_h`` turns) onto :func:`stored_exactly` of it."""
    out = []
    for r, x0 in zip(rotations.float(), first_key.float()):
        y0 = x0 @ r
        out.append(r @ reflection(y0, stored_exactly(y0, bits, group_size, clip, meta_base, ranges)))
    return torch.stack(out).contiguous()
