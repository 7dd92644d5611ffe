"""Salient prompt tokens (``runtime.salient``): which tokens are picked, and that the packed cache keeps them in
full precision and decodes as the independent reference does."""

import pytest
import torch
from reference_handler import EvalReference
from rkv_fixtures import make_checkpoint
from test_attention import _prompt, _run
from tiny_models import tiny_model

from rkv_convert.runtime.attention import rkv_attention
from rkv_convert.runtime.cache import CacheSettings, RkvCache
from rkv_convert.runtime.salient import salient_flags


def _keys_queries(b: int = 2, n_q: int = 4, n_kv: int = 2, t: int = 40, d: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, n_q, t, d, generator=gen), torch.randn(b, n_kv, t, d, generator=gen) * 0.1


def test_picks_the_tokens_the_last_queries_attend_to() -> None:
    q, k = _keys_queries()
    k[0, :, 9] = q[0, :, -4:].reshape(2, 2, 4, 16).mean((1, 2)) * 3  # token 9 lines up with the last queries
    k[1, :, 20] = q[1, :, -4:].reshape(2, 2, 4, 16).mean((1, 2)) * 3
    flags = salient_flags(q, k, None, n=1, skip_last=8, scaling=0.25, observe=4, pool=1)
    assert flags.shape == (2, 40) and flags.sum(1).tolist() == [1, 1]
    assert bool(flags[0, 9]) and bool(flags[1, 20])


def test_pooling_brings_the_neighbours_and_exclusions_hold() -> None:
    q, k = _keys_queries()
    k[:, :, 9] = q[:, :, -4:].reshape(2, 2, 2, 4, 16).mean((2, 3)) * 3
    pooled = salient_flags(q, k, None, n=5, skip_last=8, scaling=0.25, observe=4, pool=5)
    assert pooled[:, 7:12].all()  # the peak's pooled score reaches two tokens either side
    exclude = torch.zeros(2, 40, dtype=torch.bool)
    exclude[:, 9] = True
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[:, :3] = False  # left padding
    flags = salient_flags(q, k, valid, n=6, skip_last=8, scaling=0.25, exclude=exclude, observe=4, pool=1)
    assert not flags[:, 9].any() and not flags[:, :3].any() and not flags[:, 32:].any()
    assert flags.sum(1).tolist() == [6, 6]
    few = salient_flags(q[:, :, :5], k[:, :, :5], None, n=10, skip_last=3, scaling=0.25)
    assert few.sum(1).tolist() == [2, 2]  # only the tokens outside the window can be picked


def test_the_picks_do_not_depend_on_the_head_chunks_or_on_the_earlier_queries(monkeypatch) -> None:
    """KV heads are scored a chunk at a time under ``CHUNK_BYTES``; only the last ``observe`` queries count."""
    import rkv_convert.runtime.salient as salient

    q, k = _keys_queries(b=2, n_q=8, n_kv=4, t=48, d=16, seed=3)
    valid = torch.ones(2, 48, dtype=torch.bool)
    valid[1, :5] = False
    whole = salient_flags(q, k, valid, n=6, skip_last=8, scaling=0.25, observe=4)
    assert whole.sum(1).tolist() == [6, 6]
    assert torch.equal(whole, salient_flags(q[:, :, -4:], k, valid, n=6, skip_last=8, scaling=0.25, observe=4))
    monkeypatch.setattr(salient, "CHUNK_BYTES", 4 * 2 * 2 * 4 * 48)  # one KV head per chunk
    assert torch.equal(whole, salient_flags(q, k, valid, n=6, skip_last=8, scaling=0.25, observe=4))


@pytest.mark.parametrize("key_layout", ["prerope", "folded"])
def test_the_cache_keeps_salient_tokens_and_decodes_as_the_reference(key_layout: str) -> None:
    model = tiny_model("llama", head_dim=64, n_kv=2)
    ckpt = make_checkpoint(model, bits=2, key_group_size=32, value_group_size=16, key_layout=key_layout)
    settings = CacheSettings(recent_window=4, flush_block=4, max_sinks=2, salient_tokens=3)
    ids, mask = _prompt(pad=3)
    cache = RkvCache.from_checkpoint(ckpt, model, settings, backend="reference")
    got = _run(model, rkv_attention, ids, mask, steps=6, cache=cache)
    want = _run(model, EvalReference(model, ckpt, settings), ids, mask, steps=6)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    plain = _run(model, EvalReference(model, ckpt, CacheSettings(recent_window=4, flush_block=4, max_sinks=2)), ids,
                 mask, steps=6)  # fmt: skip
    assert not torch.allclose(got, plain, rtol=1e-4, atol=1e-4)  # the salient tokens change what decode reads
    layer = cache.layers[0]
    pinned = layer.fp_pos[:, : settings.pinned_slots]
    assert ((pinned >= 0).sum(1) >= settings.salient_tokens).all()  # every sequence filled its salient slots
    stored = layer.pos[:, : layer.n_quant]
    for row in range(pinned.shape[0]):  # a pinned token is not also in the store
        kept = set(pinned[row][pinned[row] >= 0].tolist())
        assert kept.isdisjoint(stored[row][stored[row] >= 0].tolist())
