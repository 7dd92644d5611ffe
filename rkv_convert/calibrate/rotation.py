"""Learned rotations: a Cayley-parametrised orthogonal matrix per KV head, for folded keys and for values.

Keys: in the folded layout the cache stores ``y = x R_h`` (``x``: a centred post-RoPE key) and decode scores
``(q R_h)·deq(y)``, so *any* orthogonal ``R_h`` is free at decode. Starting from the Hadamard
(``R_h = H_d[:, perm_h]``), this optimises ``R = R_0 (I - S)^{-1}(I + S)`` (``S`` skew-symmetric, so
``R`` stays orthogonal) for the expected attention-logit error of the real quantizer,
``E Σ_c w_c ((Q(xR) - xR) Rᵀ)_c²`` with ``w`` the per-channel query energy of
:func:`~.search.rope_pair_weights` (the clip search's q·k objective).

Values: the export fuses each layer's value rotation into ``v_proj`` rows and ``o_proj`` columns, so any
orthogonal ``R_h`` per layer and KV head is free at decode and at cache writes, in either key layout. The
objective is the error the quantized values leave after ``o_proj``, ``E |(Q(xR) - xR) Rᵀ M|²`` with
``M Mᵀ = Σ_j O_jᵀ O_j`` over the query heads ``j`` that read the KV head (:func:`output_metric`).

Rounding passes its gradient straight through (STE); the group range (scale and zero) keeps its true
gradient, so the optimiser learns to shrink each group's range relative to its content
(SpinQuant/DuQuant-style). A head keeps the result only if the real quantizer's error falls (:func:`weighted_errors`).
All KV heads of a layer are learned together (:func:`learn_rotations`), on the device the model calibrates on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.quantizer import fake_quantize, levels

__all__ = ["cayley", "output_metric", "weighted_error", "weighted_errors", "LearnedRotations", "learn_rotations"]


def cayley(skew_source: torch.Tensor) -> torch.Tensor:
    """Orthogonal ``(I - S)^{-1}(I + S)`` with ``S = A - Aᵀ`` from any square ``A`` (or a batch ``[..., d, d]``)."""
    s = skew_source - skew_source.transpose(-1, -2)
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
    return torch.linalg.solve(eye - s, eye + s)


def output_metric(o_proj: torch.Tensor, n_kv: int, d: int) -> torch.Tensor:
    """fp32 ``[n_kv, d, d]``: per KV head a root ``M`` (``M Mᵀ = G``) of ``G = Σ_j O_jᵀ O_j``, the Gram matrix of
    the ``o_proj`` input columns ``O_j [out, d]`` of the query heads ``j`` reading it (``repeat_kv`` order),
    scaled to a mean diagonal of 1: ``|e M|²`` is the squared output error a value error ``e`` causes."""
    o = o_proj.detach().double()
    n_q = o.shape[1] // d
    heads = o.reshape(o.shape[0], n_q, d)
    gram = torch.einsum("ojd,oje->jde", heads, heads).reshape(n_kv, n_q // n_kv, d, d).sum(1)
    gram = gram / gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[:, None, None]
    eye = torch.eye(d, dtype=torch.float64)
    return torch.linalg.cholesky(gram + 1e-6 * eye).float()


def _weighted(error: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 ``[H]``: per head the mean weighted square of ``error [H, N, d]``, per channel (``weight [H, d]``) or
    through a root (``weight [H, d, d]``)."""
    if weight.dim() == 2:
        return (error.pow(2) * weight[:, None]).mean((1, 2))
    return (error @ weight).pow(2).mean((1, 2))


def weighted_errors(x: torch.Tensor, rotation: torch.Tensor, weight: torch.Tensor, bits: int, group_size: int,
                    clip: float) -> torch.Tensor:  # fmt: skip
    """fp32 ``[H]``: per head the real quantizer's weighted error of rows ``x [N, H, d]`` turned by ``rotation [H, d,
    d]``: ``mean Σ_c w_c ((Q(xR) - xR) Rᵀ)_c²`` for per-channel ``weight [H, d]``, ``mean |(Q(xR) - xR) Rᵀ M|² / d``
    for roots ``weight = M [H, d, d]``."""
    return _errors(x.transpose(0, 1), rotation, weight, bits, group_size, clip)


def _errors(xh: torch.Tensor, rotation: torch.Tensor, weight: torch.Tensor, bits: int, group_size: int,
            clip: float) -> torch.Tensor:  # fmt: skip
    """:func:`weighted_errors` of head-major rows ``xh [H, N, d]``."""
    y = xh @ rotation
    return _weighted((fake_quantize(y, bits, group_size, clip) - y) @ rotation.transpose(-1, -2), weight)


def weighted_error(x: torch.Tensor, rotation: torch.Tensor, weight: torch.Tensor, bits: int, group_size: int,
                   clip: float) -> float:  # fmt: skip
    """:func:`weighted_errors` of one head: rows ``x [N, d]``, ``rotation [d, d]``, ``weight [d]`` or ``[d, d]``."""
    return float(weighted_errors(x[:, None], rotation[None], weight[None], bits, group_size, clip)[0])


def _surrogate(y: torch.Tensor, bits: int, group_size: int, clip: float) -> torch.Tensor:
    """The quantizer of :mod:`rkv_convert.quant.quantizer` in fp32 with straight-through rounding."""
    g = y.reshape(*y.shape[:-1], -1, group_size)
    hi, lo = g.amax(-1, keepdim=True) * clip, g.amin(-1, keepdim=True) * clip
    scale = ((hi - lo) / levels(bits)).clamp_min(2.0**-14)
    u = (g - lo) / scale
    code = (u + (u.round() - u).detach()).clamp(0, levels(bits))
    return (code * scale + lo).reshape(y.shape)


@dataclass
class LearnedRotations:
    rotation: torch.Tensor  # fp32 [H, d, d], orthonormal, one per head
    error_before: torch.Tensor  # fp32 [H]: weighted_errors of the initial rotations
    error_after: torch.Tensor  # fp32 [H]: of `rotation` (<= error_before: a head keeps its initial one otherwise)


def learn_rotations(x: torch.Tensor, weight: torch.Tensor, init: torch.Tensor, bits: int, group_size: int, clip: float,
                    steps: int = 150, lr: float = 2e-3) -> LearnedRotations:  # fmt: skip
    """Optimise ``R_h = init_h · cayley(A_h)`` for every head at once on rows ``x [N, H, d]`` (fp32, on ``x``'s
    device) with Adam for the weighted error of :func:`weighted_errors` (``weight [H, d]`` or roots ``[H, d, d]``);
    see module docstring. The loss is the sum of the heads' losses, so each head follows the gradient of its own
    error, as if learned alone; batching only saves the per-step overhead of ``H`` separate loops."""
    xh = x.float().transpose(0, 1).contiguous()  # [H, N, d]: one batched matmul per product
    weight, init = weight.float().to(x.device), init.float().to(x.device)
    before = _errors(xh, init, weight, bits, group_size, clip)
    a = torch.zeros_like(init, requires_grad=True)
    opt = torch.optim.Adam([a], lr=lr)
    best, best_err = init.clone(), before.clone()
    for step in range(steps):
        r = init @ cayley(a)
        y = xh @ r
        loss = _weighted((_surrogate(y, bits, group_size, clip) - y) @ r.transpose(-1, -2), weight).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 24 or step == steps - 1:
            with torch.no_grad():
                cand = init @ cayley(a)
                err = _errors(xh, cand, weight, bits, group_size, clip)
                better = err < best_err
                best[better], best_err[better] = cand[better], err[better]
    return LearnedRotations(best, before, best_err)
