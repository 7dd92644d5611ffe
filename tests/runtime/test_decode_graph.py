"""Static decode steps (``runtime.decode_graph``): the cache bookkeeping a captured CUDA graph relies on.

On CPU nothing is captured: :class:`DecodeGraph` with ``capture=False`` runs every step eagerly in
static mode (whole store and segment read, window slot chosen on the device, flushes between
steps), which must give the plain path's tokens and logits. The replay itself is tested on a GPU
(``test_decode_graph_gpu.py``).
"""

import functools

import pytest
import torch
from rkv_fixtures import make_checkpoint
from tiny_models import tiny_model

import rkv_convert.runtime.generate as generate_module
from rkv_convert.models.compat import cache_kwargs
from rkv_convert.runtime.cache import CacheSettings, RkvCache
from rkv_convert.runtime.decode_graph import DecodeGraph, decode_graph_supports
from rkv_convert.runtime.generate import RkvModel, SamplingOptions, stream_generate


def _rkv(layout: str, dtype: torch.dtype = torch.float32) -> RkvModel:
    torch.manual_seed(0)
    model = tiny_model("llama", head_dim=64, n_kv=2, n_heads=4)
    ckpt = make_checkpoint(model, bits=2, recent_window=6, flush_block=4, max_sinks=2, key_layout=layout)
    return RkvModel(model.to(dtype), ckpt, backend="reference")


def _static_logits(rkv: RkvModel, ids: torch.Tensor, feed: torch.Tensor, reserve: int,
                   views: list[int] | None = None) -> tuple[torch.Tensor, RkvCache]:  # fmt: skip
    """Prefill ``ids``, then one static step per column of ``feed``: fp32 logits ``[B, steps + 1, V]``
    (``views`` collects the store slots each step's kernels read)."""
    cache = rkv.new_cache(reserve_tokens=reserve)
    with rkv.attached() as model:
        out = model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
        logits = [out.logits[:, -1]]
        runner = DecodeGraph(model, cache, rkv.cache_argument, capture=False, lookahead=1)
        pos = torch.full((ids.shape[0], 1), ids.shape[1])
        for j in range(feed.shape[1]):
            logits.append(runner.step(feed[:, j : j + 1], pos + j).clone())
            if views is not None:
                views.append(cache.layers[0].static_slots)  # what this step's kernels read
        runner.close()
    return torch.stack(logits, 1).float(), cache


def _plain_logits(rkv: RkvModel, ids: torch.Tensor, feed: torch.Tensor) -> tuple[torch.Tensor, RkvCache]:
    cache = rkv.new_cache(reserve_tokens=ids.shape[1] + feed.shape[1])
    with rkv.attached() as model:
        out = model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
        logits = [out.logits[:, -1]]
        for j in range(feed.shape[1]):
            logits.append(model(input_ids=feed[:, j : j + 1], use_cache=True, **cache_kwargs(model, cache)).logits[:, -1])
    return torch.stack(logits, 1).float(), cache


@pytest.mark.parametrize("layout", ["folded", "prerope"])
def test_static_steps_match_plain_steps(layout) -> None:
    rkv = _rkv(layout)
    ids = torch.randint(3, 120, (2, 21))
    feed = torch.randint(3, 120, (2, 23))  # 23 steps: five flushes of 4 tokens into the store
    got, static = _static_logits(rkv, ids, feed, reserve=ids.shape[1] + feed.shape[1])
    want, plain = _plain_logits(rkv, ids, feed)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(static.layers, plain.layers):
        assert (a.length, a.n_quant, a.n_window) == (b.length, b.n_quant, b.n_window)
        assert a.n_quant >= 24 and not a.static and a.window_slot is None
        for name, t in b.quantized().items():
            assert torch.equal(a.quantized()[name], t), name
        assert torch.equal(a.n_sinks, b.n_sinks)


def test_static_store_view_grows_in_whole_blocks_as_the_store_fills() -> None:
    """The kernels read the used store slots rounded up to whole blocks, not the whole reservation;
    the view moves on a block once the flushed slots outgrow it."""
    rkv = _rkv("folded")
    ids = torch.randint(3, 120, (1, 110))
    feed = torch.randint(3, 120, (1, 40))
    views: list[int] = []
    got, cache = _static_logits(rkv, ids, feed, reserve=1000, views=views)
    want, _ = _plain_logits(rkv, ids, feed)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert cache.layers[0].pos.shape[1] == 1024 and views[0] == 128 and views[-1] == 256
    assert views == sorted(views) and set(views) == {128, 256}
    layer = cache.layers[0]
    with pytest.raises(ValueError, match="whole 128-slot blocks"):
        layer.set_static(True, 100)


def _static_layer():
    """Layer 0 of an allocated, empty batch-1 cache (window 6, flush block 4), in static mode."""
    cache = _rkv("folded").new_cache(reserve_tokens=40)
    cache.allocate(1, torch.float32)
    layer = cache.layers[0]
    layer.set_static(True)
    return layer


def test_static_layer_writes_the_device_chosen_slot() -> None:
    layer = _static_layer()
    assert int(layer.window_slot) == layer.window_start
    full = layer.full_precision()["fp_pos"].shape[1]
    assert full == layer.fp_pos.shape[1] and layer.quantized()["pos"].shape[1] == layer.pos.shape[1]
    key = torch.randn(1, 2, 1, 64)
    layer.append(key, torch.randn(1, 2, 1, 64), torch.tensor([[7]]))
    assert torch.equal(layer.fp_k[:, :, layer.window_start], key[:, :, 0])
    assert int(layer.fp_pos[0, layer.window_start]) == 7 and int(layer.window_slot) == layer.window_start + 1
    assert (layer.length, layer.n_window) == (1, 1)
    with pytest.raises(ValueError, match="one token per step"):
        layer.append(torch.randn(1, 2, 2, 64), torch.randn(1, 2, 2, 64), torch.tensor([[8, 9]]))


def test_static_window_refuses_a_missed_flush() -> None:
    layer = _static_layer()
    for i in range(10):  # recent_window 6 + flush_block 4
        layer.append(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64), torch.tensor([[i]]))
    assert layer.needs_flush()
    with pytest.raises(RuntimeError, match="flush"):
        layer.append(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64), torch.tensor([[10]]))
    assert layer.flush() == 4 and int(layer.window_slot) == layer.window_start + 6


def test_cpu_cache_is_refused_for_capture_with_the_reason() -> None:
    rkv = _rkv("folded")
    ids = torch.randint(3, 120, (1, 12))
    with pytest.raises(ValueError, match="CUDA graph.*one CUDA device"):
        list(stream_generate(rkv, ids, max_new_tokens=3, sampling=SamplingOptions(temperature=0), cuda_graph=True))
    stats = generate_module.GenerationStats()
    list(stream_generate(rkv, ids, max_new_tokens=3, sampling=SamplingOptions(temperature=0), stats=stats))
    assert stats.decode_path.startswith("eager (CUDA graphs need")
    cache = rkv.new_cache()
    assert "not allocated" in decode_graph_supports(cache, rkv.model)


def test_generate_and_stream_route_decode_steps_through_the_runner(monkeypatch) -> None:
    """With capture allowed (here: the static eager runner standing in for the graph), ``generate``
    and ``stream_generate`` give the tokens of the plain path and say which path ran."""
    rkv = _rkv("folded")
    ids = torch.randint(3, 120, (2, 15))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    greedy = SamplingOptions(temperature=0)
    want_stream = torch.stack(list(stream_generate(rkv, ids, mask, max_new_tokens=19, sampling=greedy)), 1)
    want_gen = rkv.generate(ids, attention_mask=mask, max_new_tokens=19, do_sample=False, pad_token_id=0)
    assert rkv.last_decode_path.startswith("eager (")
    steps = []

    class Recording(DecodeGraph):
        def step(self, input_ids, position_ids):
            steps.append(position_ids.clone())
            return super().step(input_ids, position_ids)

    monkeypatch.setattr(generate_module, "decode_graph_supports", lambda cache, model: None)
    monkeypatch.setattr(generate_module, "DecodeGraph", functools.partial(Recording, capture=False))
    stats = generate_module.GenerationStats()
    got_stream = torch.stack(list(stream_generate(rkv, ids, mask, max_new_tokens=19, sampling=greedy, stats=stats)), 1)
    assert stats.decode_path == "CUDA graph" and len(steps) == 18
    assert torch.equal(steps[0], torch.tensor([[15], [11]]))  # each row's own next position (left padding)
    got_gen = rkv.generate(ids, attention_mask=mask, max_new_tokens=19, do_sample=False, pad_token_id=0)
    assert rkv.last_decode_path == "CUDA graph" and len(steps) == 36
    assert torch.equal(got_stream, want_stream)
    assert torch.equal(got_gen, want_gen)
    assert all(not layer.static for layer in rkv.last_cache.layers)


def test_generate_calls_a_graph_cannot_serve_decode_eagerly_and_say_why(monkeypatch) -> None:
    rkv = _rkv("folded")
    ids = torch.randint(3, 120, (1, 15))
    monkeypatch.setattr(generate_module, "decode_graph_supports", lambda cache, model: None)
    monkeypatch.setattr(generate_module, "DecodeGraph", functools.partial(DecodeGraph, capture=False))
    out = rkv.generate(ids, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert rkv.last_decode_path == "eager (a replayed step returns logits only (output_scores asked))"
    assert len(out.scores) == 6
    rkv.generate(ids, max_new_tokens=6, do_sample=False, num_beams=2)
    assert rkv.last_decode_path == "eager (beam search reorders the cache every step)"
    rkv.cuda_graph = True
    with pytest.raises(ValueError, match="beam search"):
        rkv.generate(ids, max_new_tokens=6, do_sample=False, num_beams=2)


def test_stream_stats_hold_cache_sizes_after_an_early_close() -> None:
    rkv = _rkv("folded")
    stats = generate_module.GenerationStats()
    gen = stream_generate(rkv, torch.randint(3, 120, (2, 20)), max_new_tokens=30, sampling=SamplingOptions(0.0), stats=stats)
    for i, _ in enumerate(gen):
        if i == 14:
            break
    assert stats.kv_bytes == 0  # measured when the loop ends, not every step
    gen.close()
    assert stats.new_tokens == 15 and stats.kv_bytes == rkv.last_cache.bytes_used() > 0
    assert stats.fp16_equivalent_bytes == rkv.last_cache.fp16_equivalent_bytes() and len(stats.sinks_per_layer) == 2
