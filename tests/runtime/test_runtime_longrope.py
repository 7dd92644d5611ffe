"""Longrope models (Phi-3-*-128k, Phi-4-mini) through the packed cache, both key layouts: decode
matches the evaluation reference, a cache holding every token in full precision matches transformers'
own forward up to the last position within ``original_max_position_embeddings``, and a step past it
is refused before any layer writes to the cache."""

from __future__ import annotations

import pytest
import torch
from rkv_fixtures import decode_logits, make_checkpoint
from test_attention import check_decode_against_reference
from tiny_models import LONGROPE, LONGROPE_LIMIT, tiny_model

from rkv_convert.models.adapters import RopeLimitError, attach
from rkv_convert.models.compat import cache_kwargs
from rkv_convert.runtime.attention import rkv_attention
from rkv_convert.runtime.cache import CacheSettings, RkvCache

LAYOUTS = ("folded", "prerope")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", LONGROPE)
def test_decode_matches_evaluation_reference(family: str, layout: str) -> None:
    check_decode_against_reference(tiny_model(family), 2, 3, CacheSettings(recent_window=4, flush_block=4, max_sinks=2),
                                   key_layout=layout)  # fmt: skip


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", LONGROPE)
def test_full_precision_cache_matches_transformers_up_to_the_limit(family: str, layout: str) -> None:
    """Nothing quantized: prefill and decode to position ``LONGROPE_LIMIT - 1`` give transformers' logits
    (its short factors and attention factor), so rkv's RoPE table and the partial-RoPE scaling are the model's."""
    model = tiny_model(family)
    ckpt = make_checkpoint(model, bits=2, key_group_size=32, value_group_size=16, key_layout=layout)
    steps = 12
    ids = torch.randint(0, 128, (2, LONGROPE_LIMIT - steps))
    feed = torch.randint(0, 128, (2, steps))
    cache = RkvCache.from_checkpoint(ckpt, model, CacheSettings(recent_window=LONGROPE_LIMIT, flush_block=8, max_sinks=0),
                                     backend="reference")  # fmt: skip
    got = decode_logits(model, cache, ids, steps, feed)
    assert cache.layers[0].n_quant == 0 and cache.get_seq_length() == LONGROPE_LIMIT
    with torch.no_grad():
        want = model(torch.cat([ids, feed], 1)).logits[:, ids.shape[1] - 1 :]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_step_past_the_limit_is_refused_before_the_cache_changes(layout: str) -> None:
    model = tiny_model("phi4mini")
    ckpt = make_checkpoint(model, bits=2, key_group_size=32, value_group_size=16, key_layout=layout)
    cache = RkvCache.from_checkpoint(ckpt, model, CacheSettings(recent_window=4, flush_block=4, max_sinks=2), backend="reference")
    ids = torch.randint(0, 128, (1, LONGROPE_LIMIT))
    decode_logits(model, cache, ids, 0)
    with pytest.raises(RopeLimitError, match=rf"position {LONGROPE_LIMIT} is past rkv's limit of {LONGROPE_LIMIT} tokens"):
        _one_step(model, cache)
    assert cache.lengths() == [LONGROPE_LIMIT] * len(cache.layers)


def _one_step(model, cache) -> None:
    """One decode step (position ``cache.get_seq_length()``) through the packed cache."""
    with torch.no_grad(), attach(model, rkv_attention):
        model(torch.zeros(1, 1, dtype=torch.long), **cache_kwargs(model, cache), use_cache=True)
