"""Salient prompt tokens: the ones the prompt's last tokens attend to most, kept in full precision.

At the end of a prefill the last ``observe`` prompt tokens (the question, in a prompt that holds one) have
just attended to the whole prompt. The tokens they attend to most are the ones a 2-bit store must not blur:
the pass-key experiment (``docs/accuracy.md``) finds the lost accuracy in the needle's own ~20 tokens, not in
the thousands around it. Selection follows SnapKV (Li et al., 2024): softmax attention of the observation
queries over the prompt's keys, averaged over heads and queries, max-pooled over ``pool`` neighbouring
tokens (a selected token brings its phrase), the top ``n`` per sequence and layer. The recent window's
tokens are skipped: they are in full precision already.
"""

from __future__ import annotations

import torch

__all__ = ["OBSERVE", "POOL", "CHUNK_BYTES", "salient_flags"]

OBSERVE = 32  # observation queries: the prompt's last tokens
POOL = 7  # neighbouring tokens a score spreads to
CHUNK_BYTES = 2**28  # fp32 attention probabilities held at once (KV heads are taken in chunks under it)


def salient_flags(query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor | None, n: int, skip_last: int,
                  scaling: float, exclude: torch.Tensor | None = None, observe: int = OBSERVE,
                  pool: int = POOL) -> torch.Tensor:  # fmt: skip
    """bool ``[B, T]``: the ``n`` tokens of each sequence that its last ``observe`` queries attend to most.

    Args:
        query: post-RoPE queries ``[B, n_q, T_q, d]`` of the prompt's last ``T_q`` tokens (the whole prompt, or
            just its last ``observe``; grouped heads: ``n_q`` a multiple of ``n_kv``).
        key: post-RoPE keys ``[B, n_kv, T, d]`` of the whole prompt.
        valid: bool ``[B, T]`` real tokens (padding is never attended or picked), or None.
        n: tokens to pick per sequence.
        skip_last: the last ``skip_last`` tokens are never picked (the recent window).
        scaling: the layer's softmax scale.
        exclude: bool ``[B, T]`` tokens never picked (already kept: the sinks), or None.
    """
    b, n_q, t_q, d = query.shape
    n_kv, t = key.shape[1], key.shape[2]
    o, rep = min(observe, t_q, t), n_q // n_kv
    keys_at = torch.arange(t, device=key.device)
    blocked = keys_at[None, :] > keys_at[t - o :, None]  # [o, T]: causal
    blocked = blocked[None, None, None] | (torch.zeros(b, 1, 1, 1, t, dtype=torch.bool, device=key.device)
                                           if valid is None else ~valid[:, None, None, None, :].to(key.device))  # fmt: skip
    q = query[:, :, t_q - o :].reshape(b, n_kv, rep, o, d)  # query heads grouped by the KV head they read
    score = torch.zeros(b, t, device=key.device)
    step = max(1, CHUNK_BYTES // (4 * b * rep * o * t))
    for h in range(0, n_kv, step):  # [B, heads, rep, o, T] probabilities, a chunk of KV heads at a time
        logits = (q[:, h : h + step].float() @ key[:, h : h + step, None].float().transpose(-1, -2)) * scaling
        score += torch.softmax(logits.masked_fill(blocked, float("-inf")), -1).nan_to_num(0.0).sum((1, 2, 3))
    score = torch.nn.functional.max_pool1d(score[:, None], pool, 1, pool // 2)[:, 0]
    score[:, max(0, t - skip_last) :] = -1.0
    for mask in (None if valid is None else ~valid, exclude):
        if mask is not None:
            score = score.masked_fill(mask.to(score.device), -1.0)
    top = score.topk(min(n, t), -1)
    return torch.zeros(b, t, dtype=torch.bool, device=key.device).scatter_(1, top.indices, top.values >= 0)
