"""Generation stops, before any text, when the rkv cache does not receive the tokens.

A disengaged cache is simulated the way transformers 5.24 disengaged it: the attention layers
run, but the handler is handed no cache (the cache argument arrived under a name it did not read).
"""

from __future__ import annotations

import pytest
import torch
from rkv_fixtures import char_tokenizer, make_checkpoint, write_folder
from tiny_models import tiny_model

import rkv_convert
from rkv_convert.models.compat import CacheDisengagedError
from rkv_convert.runtime import generate as generate_module
from rkv_convert.runtime.attention import rkv_attention
from rkv_convert.runtime.generate import SamplingOptions, stream_generate


def _cache_dropped(module, query, key, value, position_embeddings, attention_mask, cache, layer_input, **kwargs):
    return rkv_attention(module, query, key, value, position_embeddings, attention_mask, None, layer_input, **kwargs)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    model = tiny_model("llama")
    ckpt = make_checkpoint(model, bits=2, recent_window=4, flush_block=4, max_sinks=2)
    return write_folder(ckpt, model, char_tokenizer(), tmp_path_factory.mktemp("rkv") / "tiny-rkv")


@pytest.fixture
def rkv(folder):
    return rkv_convert.load(folder, device="cpu", backend="reference")


@pytest.fixture
def disengaged(monkeypatch):
    monkeypatch.setattr(generate_module, "rkv_attention", _cache_dropped)


def test_engaged_generation_passes_the_guard(rkv) -> None:
    ids = torch.randint(3, 98, (1, 12))
    tokens = list(stream_generate(rkv, ids, max_new_tokens=12, sampling=SamplingOptions(temperature=0)))
    assert len(tokens) == 12 and rkv.last_cache.lengths() == [12 + 11] * 2


def test_stream_generate_yields_nothing_from_a_disengaged_cache(rkv, disengaged) -> None:
    ids = torch.randint(3, 98, (1, 12))
    stream = stream_generate(rkv, ids, max_new_tokens=8, sampling=SamplingOptions(temperature=0))
    with pytest.raises(CacheDisengagedError, match=r"at prefill.*transformers \d.*tested with transformers>="):
        next(stream)


def test_generate_and_forward_refuse_a_disengaged_cache(rkv, disengaged) -> None:
    ids = torch.randint(3, 98, (1, 12))
    with pytest.raises(CacheDisengagedError, match="during generate"):
        rkv.generate(ids, max_new_tokens=4, do_sample=False)
    with pytest.raises(CacheDisengagedError, match="in this forward"):
        rkv(ids)


def test_a_cache_lost_mid_generation_stops_at_that_step(rkv, monkeypatch) -> None:
    """Engaged at prefill, disengaged from the first decode step: no token after the prefill one."""
    calls = {"n": 0}
    layers = rkv.model.config.num_hidden_layers

    def flaky(module, query, key, value, position_embeddings, attention_mask, cache, layer_input, **kwargs):
        calls["n"] += 1
        keep = calls["n"] <= layers  # the prefill forward
        return rkv_attention(module, query, key, value, position_embeddings, attention_mask,
                             cache if keep else None, layer_input, **kwargs)  # fmt: skip

    monkeypatch.setattr(generate_module, "rkv_attention", flaky)
    stream = stream_generate(rkv, torch.randint(3, 98, (1, 12)), max_new_tokens=8, sampling=SamplingOptions(temperature=0))
    first = next(stream)
    assert first.shape == (1,)
    with pytest.raises(CacheDisengagedError, match="at decode step 1"):
        next(stream)
