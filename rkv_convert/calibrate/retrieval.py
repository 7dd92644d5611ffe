"""Retrieval heads: how strongly each KV head's queries copy from earlier context (induction scores).

A head that retrieves (the pass key of `rkv eval --task passkey`, a name seen pages ago) attends from a
token to the token that *followed* that token's previous occurrence: an induction head. On a random
token sequence repeated twice, such a head puts most of its attention on exactly that target, while
other heads spread theirs. The score of a query head is its mean attention probability on the target
over the second copy; a KV head takes the largest score among its query heads, because one retrieving
query head is enough to need that head's keys precise. No text is read: the tokens are seeded random
ids, so the score cannot see calibration or evaluation text.

``rkv export --key-bits retrieval`` spends its added key bits first on the layers that hold retrieval heads
(``calibrate.allocate.key_bits_for_retrieval``).
"""

from __future__ import annotations

import torch
from torch import nn

from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..models.adapters import attach, attention_softcap, attention_window, context_length, stock_attention

__all__ = ["induction_scores", "INDUCTION_LENGTH"]

INDUCTION_LENGTH = 256  # tokens per copy: the sequence is 2 x this, or the model's context when shorter


class _InductionTap:
    """Attention handler that scores each layer's heads on the repeated sequence, then attends as usual."""

    def __init__(self, copy_len: int, n_kv: int, scores: dict[int, torch.Tensor]) -> None:
        self.n = copy_len
        self.n_kv = n_kv
        self.scores = scores

    def __call__(self, module, query, key, value, position_embeddings, attention_mask, cache, layer_input, **kw):
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(query, key, cos, sin)
        b, n_q, t, d = q.shape
        rows = torch.arange(self.n + 1, t, device=q.device)  # second copy, after its first token
        k = k.repeat_interleave(n_q // k.shape[1], dim=1).float()
        logits = (q[:, :, rows].float() @ k.transpose(-1, -2)) * module.scaling  # [B, n_q, rows, T]
        softcap = attention_softcap(module)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        back = rows[:, None] - torch.arange(t, device=q.device)[None, :]  # query row - key position
        window = attention_window(module)
        hidden = (back < 0) if window is None else (back < 0) | (back >= window)  # the family's own mask
        probs = logits.masked_fill(hidden, float("-inf")).softmax(-1)
        target = rows - self.n + 1  # the token after the previous occurrence of the query's token
        on_target = probs.gather(-1, target.view(1, 1, -1, 1).expand(b, n_q, -1, 1)).squeeze(-1)
        score = on_target.mean((0, 2)).reshape(self.n_kv, -1).amax(-1)  # [n_kv]
        self.scores[module.layer_idx] = score.cpu()
        return stock_attention(module, query, key, value, position_embeddings, attention_mask, cache, **kw)


def induction_scores(model: nn.Module, n_kv: int, seed: int = 0, copies: int = 4,
                     copy_len: int = INDUCTION_LENGTH) -> list[torch.Tensor]:  # fmt: skip
    """Per layer, fp32 ``[n_kv]``: each KV head's largest query-head induction score (module docstring) on
    ``copies`` seeded random sequences of ``copy_len`` tokens, each repeated once.

    Both copies stay within the model's context (``context_length``: a longrope model's short-factor
    limit included), so ``copy_len`` shrinks to half of it where that is shorter.
    """
    limit = context_length(model.config)
    if limit is not None:
        copy_len = min(copy_len, limit // 2)
    if copy_len < 2:
        raise ValueError(f"induction scores need at least 4 tokens of context; this model allows {limit}")
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(0, vocab, (copies, copy_len), generator=gen)
    ids = torch.cat([first, first], 1).to(next(model.parameters()).device)
    scores: dict[int, torch.Tensor] = {}
    with torch.no_grad(), attach(model, _InductionTap(copy_len, n_kv, scores)):
        model(ids, use_cache=False)
    return [scores[i] for i in sorted(scores)]

