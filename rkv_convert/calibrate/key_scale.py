"""A per-channel key scale, folded into the query and key weights, that trades key range for query weight.

After a rotation a 2-bit group's error spreads evenly over its channels, with a size set by the group's
range, which grows with ``Σ_c d_c² s_c`` (``s_c``: the variance of centred key channel ``c``). Multiplying
key channel ``c`` by ``d_c`` and the queries by ``1/d_c`` leaves every ``q·k`` unchanged; taken back to the
key, channel ``c`` then carries ``1/d_c`` of the group's error, which meets the query energy ``w_c``. The
expected logit error is about ``(Σ d_c² s_c)(Σ w_c / d_c²)``, least at ``d_c² ∝ sqrt(w_c / s_c)``
(Cauchy-Schwarz): channels the queries barely read are shrunk, so they stop widening the range of those
the queries do read. ``exponent`` scales the log of that optimum (0: no scale, 1: the optimum).

The scale is equal within each RoPE pair ``(i, i + d/2)``, so it commutes with RoPE and folds into the
projections (:func:`rkv_convert.export.fuse.fuse_key_scale`): the model's full-precision logits are unchanged
up to rounding, and the cache, kernels and runtime see an ordinary model. docs/accuracy.md has the figures.
"""

from __future__ import annotations

import torch

from .search import rope_pair_weights

__all__ = ["DEFAULT_KEY_SCALE", "key_scale"]

DEFAULT_KEY_SCALE = 1.0  # the exponent `rkv calibrate` uses unless told (docs/accuracy.md: how it was chosen)


def key_scale(query_energy: torch.Tensor, key_variance: torch.Tensor, head_dim: int, exponent: float,
              shared: bool = False) -> torch.Tensor:  # fmt: skip
    """fp32 ``[n_kv, d]``: ``(w / s)^(exponent / 4)`` per channel, equal within RoPE pairs, geometric mean 1 per head.

    ``query_energy`` ``[n_kv*d]``: E[q_c²] summed over the query heads of each KV head; ``key_variance``
    ``[n_kv*d]``: the variance of the centred keys. ``shared``: one scale for every head (from the heads'
    summed statistics), for families whose q/k norm weight is shared by all heads.
    """
    d = head_dim
    w = rope_pair_weights(query_energy.double().reshape(-1), d).reshape(-1, d)
    s = rope_pair_weights(key_variance.double().reshape(-1), d).reshape(-1, d)
    if shared:
        w, s = w.sum(0, keepdim=True).expand_as(w), s.sum(0, keepdim=True).expand_as(s)
    log = 0.25 * exponent * (w.clamp_min(1e-30).log() - s.clamp_min(1e-30).log())
    return (log - log.mean(-1, keepdim=True)).exp().float()
