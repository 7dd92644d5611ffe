"""The server's incremental detokenizer: the pieces it releases token by token join to the full decode."""

import torch
from tiny_models import tiny_tokenizer

from rkv_convert.serve.app import _Detokenizer


def test_pieces_join_to_the_full_decode() -> None:
    tokenizer = tiny_tokenizer()
    gen = torch.Generator().manual_seed(0)
    texts = ["def f(x):\n    return x + 1  # done", "The quick brown fox jumps over the lazy dog."]
    sequences = [tokenizer(t).input_ids for t in texts]
    sequences += [torch.randint(0, len(tokenizer), (60,), generator=gen).tolist() for _ in range(5)]
    for ids in sequences:
        detok = _Detokenizer(tokenizer)
        pieces = [detok.add(t, last=i == len(ids) - 1) for i, t in enumerate(ids)]
        full = tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(pieces) == detok.sent == full
        assert sum(1 for p in pieces if p) > len(ids) // 2  # released as it goes, not at the end
