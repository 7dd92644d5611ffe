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
(SpinQuant/DuQuant-style). The result is kept only if the real quantizer's error falls (:func:`weighted_error`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.quantizer import fake_quantize, levels

__all__ = ["cayley", "output_metric", "weighted_error", "LearnedRotation", "learn_rotation"]


def cayley(skew_source: torch.Tensor) -> torch.Tensor:
    """Orthogonal ``(I - S)^{-1}(I + S)`` with ``S = A - Aᵀ`` from any square ``A``."""
    s = skew_source - skew_source.T
    eye = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
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
    """Mean weighted square of ``error [N, d]``: per channel (``weight [d]``) or through a root (``weight [d, d]``)."""
    if weight.dim() == 1:
        return (error.pow(2) * weight).mean()
    return (error @ weight).pow(2).mean()


def weighted_error(x: torch.Tensor, rotation: torch.Tensor, weight: torch.Tensor, bits: int, group_size: int,
                   clip: float) -> float:  # fmt: skip
    """The real quantizer's weighted error of rows ``x [N, d]``: ``mean Σ_c w_c ((Q(xR) - xR) Rᵀ)_c²`` for a
    per-channel ``weight [d]``, ``mean |(Q(xR) - xR) Rᵀ M|² / d`` for a root ``weight = M [d, d]``."""
    y = x @ rotation
    back = (fake_quantize(y, bits, group_size, clip) - y) @ rotation.T
    return float(_weighted(back, weight))


def _surrogate(y: torch.Tensor, bits: int, group_size: int, clip: float) -> torch.Tensor:
    """The quantizer of :mod:`rkv_convert.quant.quantizer` in fp32 with straight-through rounding."""
    g = y.reshape(*y.shape[:-1], -1, group_size)
    hi, lo = g.amax(-1, keepdim=True) * clip, g.amin(-1, keepdim=True) * clip
    scale = ((hi - lo) / levels(bits)).clamp_min(2.0**-14)
    u = (g - lo) / scale
    code = (u + (u.round() - u).detach()).clamp(0, levels(bits))
    return (code * scale + lo).reshape(y.shape)


@dataclass
class LearnedRotation:
    rotation: torch.Tensor  # fp32 [d, d], orthonormal
    error_before: float  # weighted_error of the initial rotation
    error_after: float  # weighted_error of `rotation` (<= error_before: the initial one is kept otherwise)


def learn_rotation(x: torch.Tensor, weight: torch.Tensor, init: torch.Tensor, bits: int, group_size: int, clip: float,
                   steps: int = 150, lr: float = 2e-3) -> LearnedRotation:  # fmt: skip
    """Optimise ``R = init · cayley(A)`` on rows ``x [N, d]`` (fp32) with Adam for the weighted error of
    :func:`weighted_error` (``weight``: per channel ``[d]`` or a root ``[d, d]``); see module docstring."""
    x, weight, init = x.float(), weight.float(), init.float()
    before = weighted_error(x, init, weight, bits, group_size, clip)
    a = torch.zeros_like(init, requires_grad=True)
    opt = torch.optim.Adam([a], lr=lr)
    best, best_err = init, before
    for step in range(steps):
        r = init @ cayley(a)
        y = x @ r
        loss = _weighted((_surrogate(y, bits, group_size, clip) - y) @ r.T, weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 24 or step == steps - 1:
            with torch.no_grad():
                cand = init @ cayley(a)
                err = weighted_error(x, cand, weight, bits, group_size, clip)
            if err < best_err:
                best, best_err = cand.detach().clone(), err
    return LearnedRotation(best, before, best_err)
