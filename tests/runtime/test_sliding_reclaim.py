"""Sliding-window layers reclaim the store slots of tokens that left their window.

Against a run that keeps every slot: the live store entries are byte-identical (moved, never
re-quantized), the greedy tokens are the same and the logits agree to fp32 summation order (the
attention sums over a shorter row, so the last bits may differ: measured max 7e-7 on logits of
order 0.3, Gemma 3 folded, reference backend). A sliding layer's store stays bounded while a
global layer's grows with the sequence.

The logits are compared on a one-layer model, where both runs cache the same keys and values (from
the token embeddings). In a deeper model a layer's inputs carry the summation-order difference of the
layers below it, which can move one of its new codes or scales across a rounding boundary, and the logits
with it: on an AVX-512 CPU one value scale of Mistral's second layer and one key code of Gemma 2's
moved, and the logits by 4e-5 and 2e-4 (the same code had passed on another CPU). So the two-layer
model checks the greedy tokens, the bounds and the bytes: its first layer byte for byte, deeper layers
all but such flips (each moved entry at its new place)."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from rkv_fixtures import make_checkpoint
from test_attention import _prompt, _run
from tiny_models import tiny_model

from rkv_convert.runtime.attention import rkv_attention
from rkv_convert.runtime.cache import _MIN_CAPACITY, CacheSettings, RkvCache, RkvCacheLayer, store_capacity

SETTINGS = CacheSettings(recent_window=4, flush_block=4, max_sinks=2)


def _decode(model, ckpt, backend: str, reclaim: bool, steps: int) -> tuple[torch.Tensor, RkvCache]:
    """Prefill a padded batch of 2 (21 tokens), then ``steps`` greedy steps: all logits and the cache.

    ``reclaim=False``: the baseline that keeps every slot (no reclaiming, the whole reservation up front)."""
    cache = RkvCache.from_checkpoint(ckpt, model, SETTINGS, backend=backend).reserve(21 + steps + 1)
    torch.manual_seed(1)
    ids, mask = _prompt(pad=3)
    with contextlib.ExitStack() as keep:
        if not reclaim:
            keep.enter_context(mock.patch.object(RkvCacheLayer, "_reclaim_hidden", lambda self: None))
            keep.enter_context(mock.patch.object(RkvCacheLayer, "store_hint", lambda self: self.capacity_hint))
        logits = _run(model, rkv_attention, ids, mask, steps=steps, cache=cache)
    return logits, cache


def _check(family: str, layout: str, backend: str, window: int, steps: int) -> None:
    one = tiny_model(family, sliding_window=window, layers=1)  # layer 0 slides in every family tested
    one_ckpt = make_checkpoint(one, bits=2, key_group_size=32, value_group_size=16, sink_quantile=0.9, key_layout=layout)
    kept, _ = _decode(one, one_ckpt, backend, reclaim=False, steps=steps)
    got, cache = _decode(one, one_ckpt, backend, reclaim=True, steps=steps)
    assert cache.layers[0].window == window and cache.layers[0].reclaimed > 0
    torch.testing.assert_close(got, kept, rtol=1e-5, atol=1e-5, msg=lambda m: f"{family} {layout} {backend}: {m}")

    model = tiny_model(family, sliding_window=window, layers=2)
    ckpt = make_checkpoint(model, bits=2, key_group_size=32, value_group_size=16, sink_quantile=0.9, key_layout=layout)
    kept, cache_kept = _decode(model, ckpt, backend, reclaim=False, steps=steps)
    got, cache = _decode(model, ckpt, backend, reclaim=True, steps=steps)
    assert torch.equal(got.argmax(-1), kept.argmax(-1)), f"{family} {layout} {backend}: other greedy tokens"

    sliding = [i for i, layer in enumerate(cache.layers) if layer.window is not None]
    full = [i for i, layer in enumerate(cache.layers) if layer.window is None]
    assert sliding, "the tiny model must have a sliding layer"
    tokens = 21 + steps
    bound = 2 * (window + SETTINGS.recent_window + SETTINGS.flush_block) + SETTINGS.flush_block
    for i in sliding:
        layer, other = cache.layers[i], cache_kept.layers[i]
        assert layer.reclaimed > 0 and other.reclaimed == 0
        assert layer.n_quant <= bound < other.n_quant, (layer.n_quant, other.n_quant)
        assert layer.pos.shape[1] <= store_capacity(max(_MIN_CAPACITY, bound)), layer.pos.shape  # allocated store slots
        assert layer.bytes_used() < other.bytes_used()
        r, n = layer.reclaimed, layer.n_quant  # the live entries where the kept run has them
        for name in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"):
            moved, held = getattr(layer, name)[:, :, :n], getattr(other, name)[:, :, r : r + n]
            if i == 0:  # inputs are the embeddings in both runs: byte for byte
                assert torch.equal(moved, held), name
            else:  # at most rounding-boundary flips from the layers below (module docstring)
                assert (moved != held).sum() <= max(2, moved.numel() // 100), (name, int((moved != held).sum()))
        assert torch.equal(layer.pos[:, :n], other.pos[:, r : r + n])
        assert bool((other.pos[:, :r] < 0).all())  # only hidden slots were dropped
        # every position the window still needs is held, none before it
        live = layer.pos[:, : layer.n_quant]
        assert int(live.max()) >= tokens - window - SETTINGS.recent_window - SETTINGS.flush_block
    for i in full:
        layer, other = cache.layers[i], cache_kept.layers[i]
        assert layer.reclaimed == 0 and layer.n_quant == other.n_quant > bound
        assert layer.bytes_used() == other.bytes_used()
    assert cache.bytes_used() < cache_kept.bytes_used()
    if max(cache_kept.layers[i].pos.shape[1] for i in sliding) > store_capacity(_MIN_CAPACITY):  # past the minimum allocation
        assert cache.bytes_allocated() < cache_kept.bytes_allocated()


@pytest.mark.parametrize("family,layout", [("gemma3", "folded"), ("gemma3", "prerope"), ("mistral", "folded"),
                                           ("mistral", "prerope"), ("gemma2", "folded")])  # fmt: skip
def test_reclaiming_is_bit_identical_and_bounds_the_store_reference(family: str, layout: str) -> None:
    _check(family, layout, "reference", window=10, steps=90)


@pytest.mark.parametrize("family,layout", [("gemma3", "folded"), ("mistral", "prerope")])
def test_reclaiming_is_bit_identical_triton_interpreter(family: str, layout: str) -> None:
    _check(family, layout, "auto", window=6, steps=32)


def test_sliding_store_stays_bounded_over_a_long_decode() -> None:
    """Slots held by a sliding layer stay O(window + flush_block) at 4x and 8x the window."""
    model = tiny_model("gemma3", sliding_window=8, layers=2)
    ckpt = make_checkpoint(model, bits=2, key_group_size=32, value_group_size=16, key_layout="folded")
    sizes = []
    for steps in (40, 120):
        _, cache = _decode(model, ckpt, "reference", reclaim=True, steps=steps)
        sizes.append([layer.n_quant for layer in cache.layers])
    sliding = 0  # gemma3 tiny: layer 0 sliding, layer 1 global
    assert cache.layers[sliding].window == 8 and cache.layers[1].window is None
    assert sizes[1][sliding] <= 2 * (8 + 8) + 4 and sizes[1][1] > sizes[0][1] + 70


def test_a_store_grown_by_a_long_prompt_shrinks_back() -> None:
    """A 300-token prompt fills a sliding layer's store (a prefill hides nothing); the first reclaim
    gives the memory back, down to the capped allocation."""
    from rkv_convert.models.adapters import attach
    from rkv_convert.models.compat import cache_kwargs

    model = tiny_model("mistral", sliding_window=16, layers=1)
    ckpt = make_checkpoint(model, bits=2, key_group_size=32, value_group_size=16, key_layout="folded")
    cache = RkvCache.from_checkpoint(ckpt, model, SETTINGS, backend="reference").reserve(340)
    layer = cache.layers[0]
    with torch.no_grad(), attach(model, rkv_attention):
        out = model(torch.randint(0, 128, (1, 300)), use_cache=True, **cache_kwargs(model, cache))
        after_prefill = layer.pos.shape[1]
        for _ in range(12):
            out = model(out.logits[:, -1:].argmax(-1), use_cache=True, **cache_kwargs(model, cache))
    assert after_prefill >= 290 and layer.pos.shape[1] == store_capacity(max(_MIN_CAPACITY, layer.store_hint())) < after_prefill
    assert layer.reclaimed > 250 and layer.n_quant < 2 * 16


def test_row_views_prefill_a_long_prompt_then_reclaim() -> None:
    """An allocated cache prefilled through rows() views (rkv run --prefill-batch) holds a prompt far
    longer than a sliding layer's capped store; decode then reclaims as usual and matches a
    whole-batch prefill."""
    from rkv_convert.models.adapters import attach
    from rkv_convert.models.compat import cache_kwargs

    model = tiny_model("mistral", sliding_window=16, layers=1)
    ckpt = make_checkpoint(model, bits=2, key_group_size=32, value_group_size=16, key_layout="folded")
    ids = torch.randint(0, 128, (2, 300))

    @torch.no_grad()
    def run(sliced: bool) -> tuple[torch.Tensor, RkvCache]:
        cache = RkvCache.from_checkpoint(ckpt, model, SETTINGS, backend="reference").reserve(320)
        with attach(model, rkv_attention):
            if sliced:
                cache.allocate(2, torch.float32)
                parts = [cache.rows(0, 1), cache.rows(1, 1)]
                logits = [model(ids[i : i + 1], use_cache=True, **cache_kwargs(model, p)).logits for i, p in enumerate(parts)]
                for i, part in enumerate(parts):
                    cache.take_counts(part, i)
                out = torch.cat(logits)
            else:
                out = model(ids, use_cache=True, **cache_kwargs(model, cache)).logits
            steps = [out[:, -1:]]
            for _ in range(12):
                out = model(steps[-1].argmax(-1), use_cache=True, **cache_kwargs(model, cache)).logits
                steps.append(out)
        return torch.cat(steps, 1), cache

    sliced, cache = run(True)
    whole, _ = run(False)
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-5)
    assert cache.layers[0].reclaimed > 250
