"""The continuous-batching engine: a request's greedy tokens are the same alone and in a busy batch
(staggered arrivals, different prompt lengths, many window flushes, sinks, rows reused), and the
same as :func:`stream_generate` of that request alone; admission respects the rows and the budget."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "runtime"))  # the tiny-checkpoint fixtures live beside the runtime tests
from rkv_fixtures import make_checkpoint
from tiny_models import tiny_model

from rkv_convert.runtime.cache import CacheSettings
from rkv_convert.runtime.generate import RkvModel, SamplingOptions, stream_generate
from rkv_convert.serve.engine import Engine, EngineConfig
from rkv_convert.serve.requests import GenerationRequest
from rkv_convert.serve.row_graph import RowDecodeGraph, bucket_for, buckets

GREEDY = SamplingOptions(temperature=0.0)
SETTINGS = CacheSettings(recent_window=4, flush_block=4, max_sinks=2)  # a flush every 4 tokens


def _rkv(key_layout: str, family: str = "llama") -> RkvModel:
    model = tiny_model(family)
    ckpt = make_checkpoint(model, bits=2, recent_window=4, flush_block=4, max_sinks=2, key_layout=key_layout,
                           sink_quantile=0.9)  # fmt: skip
    return RkvModel(model, ckpt, settings=SETTINGS, backend="reference")


def _requests(n: int, seed: int = 1) -> list[GenerationRequest]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 40, (1,), generator=gen))
        ids = torch.randint(0, 128, (length,), generator=gen).tolist()
        out.append(GenerationRequest(f"r{i}", tuple(ids), max_tokens=10 + 3 * i, sampling=GREEDY))
    return out


def _engine(rkv: RkvModel, max_batch: int | None = 4, budget: int = 2**30, max_len: int = 128) -> Engine:
    return Engine(rkv, EngineConfig(max_len=max_len, budget_bytes=budget, max_batch=max_batch))


def _collect(engine: Engine, requests, arrivals: dict[int, int] | None = None) -> dict[str, list[int]]:
    """Run ``requests`` (request i submitted before step ``arrivals[i]``, default 0); tokens per id."""
    arrivals = arrivals or {}
    tokens: dict[str, list[int]] = {r.id: [] for r in requests}
    done: set[str] = set()

    def emit(event):
        if event.token is not None:
            tokens[event.request_id].append(event.token)
        if event.finish_reason is not None:
            assert event.finish_reason in ("length", "stop"), event
            done.add(event.request_id)

    step = 0
    pending = list(enumerate(requests))
    while pending or engine.has_work:
        for i, r in [p for p in pending if arrivals.get(p[0], 0) <= step]:
            engine.submit(r, emit)
            pending.remove((i, r))
        engine.step()
        step += 1
    assert done == {r.id for r in requests}
    return tokens


def _alone_stream(rkv: RkvModel, request: GenerationRequest) -> list[int]:
    ids = torch.tensor([request.prompt_ids])
    return [int(t[0]) for t in stream_generate(rkv, ids, max_new_tokens=request.max_tokens, sampling=GREEDY)]


@pytest.mark.parametrize("family,key_layout", [("llama", "folded"), ("llama", "prerope"), ("qwen3", "folded"), ("qwen2", "folded")])
def test_greedy_tokens_alone_equal_tokens_in_a_busy_batch(family: str, key_layout: str) -> None:
    rkv = _rkv(key_layout, family)
    requests = _requests(7)
    alone = {r.id: _collect(_engine(rkv, max_batch=1), [r])[r.id] for r in requests}
    for r in requests[:3]:  # the engine alone is stream_generate alone
        assert alone[r.id] == _alone_stream(rkv, r)
    engine = _engine(rkv, max_batch=4)
    arrivals = {0: 0, 1: 0, 2: 3, 3: 5, 4: 6, 5: 11, 6: 17}  # staggered: rows join mid-flush-cycle
    sinks_seen = []
    original = engine.cache.end_step

    flushing = []

    def end_step():  # record that sinks were taken and that several rows flushed in one step
        sinks_seen.append(int(engine.cache.layers[0].base["n_sinks"].sum()))
        flushing.append(len(engine.cache.state.flushing))
        original()

    engine.cache.end_step = end_step
    batched = _collect(engine, requests, arrivals)
    assert batched == alone
    assert max(sinks_seen) > 0, "no sink was flagged: the test would not cover sink slots"
    assert max(flushing) >= 2 and sum(flushing) >= 10, flushing  # rows flush together and apart
    assert all(len(t) == r.max_tokens for r, t in zip(requests, alone.values()))  # no EOS: every flush cycle runs
    assert max(r.max_tokens + len(r.prompt_ids) for r in requests) > 8 * SETTINGS.flush_block


def test_rows_are_reused_and_the_cache_is_empty_after() -> None:
    rkv = _rkv("folded")
    engine = _engine(rkv, max_batch=2)
    requests = _requests(5, seed=3)
    _collect(engine, requests)
    assert engine.active == 0 and engine.cache.active == 0
    assert engine.stats.requests_done == 5
    base = engine.cache.layers[0].base
    assert bool((base["pos"] == -1).all()) and bool((base["fp_pos"] == -1).all()) and int(base["n_sinks"].sum()) == 0


def test_admission_by_budget_and_rows() -> None:
    rkv = _rkv("folded")
    probe = _engine(rkv, max_batch=None)
    per_row = probe.cache_bytes_for(128) // probe.max_batch
    engine = _engine(rkv, max_batch=None, budget=3 * per_row + 1)
    assert engine.max_batch == 3  # rows from the budget at the longest request
    with pytest.raises(ValueError, match="needs .* MiB of cache"):
        _engine(rkv, max_batch=None, budget=per_row // 2)
    rows8 = _engine(rkv, max_batch=8).cache_bytes_for(64)  # one 128-slot block per row
    crowded = _engine(rkv, max_batch=8, budget=rows8, max_len=256)  # --max-batch 8 holds short requests only
    short = [GenerationRequest(f"s{i}", (5, 6, 7), max_tokens=20, sampling=GREEDY) for i in range(8)]
    for r in short:
        crowded.submit(r, lambda e: None)
    crowded.step()
    assert crowded.active == 8 and crowded.cache_bytes() <= rows8
    with pytest.raises(ValueError, match="cache slots in each of 8 rows"):
        crowded.submit(GenerationRequest("long", (5, 6, 7), max_tokens=200, sampling=GREEDY), lambda e: None)  # two blocks


def test_cancel_frees_the_row() -> None:
    rkv = _rkv("folded")
    engine = _engine(rkv, max_batch=2)
    events = []
    a, b, c = _requests(3, seed=5)
    for r in (a, b, c):
        engine.submit(r, events.append)
    engine.step()
    assert engine.active == 2
    engine.cancel(a.id)
    engine.step()
    assert [e.finish_reason for e in events if e.request_id == a.id][-1] == "cancelled"
    assert {s.request.id for s in engine.rows} == {b.id, c.id}
    engine.run_until_done()
    alone = _collect(_engine(rkv, max_batch=1), [c])[c.id]
    assert [e.token for e in events if e.request_id == c.id and e.token is not None] == alone


def test_prefill_budget_interleaves_admission_with_decoding() -> None:
    rkv = _rkv("folded")
    engine = Engine(rkv, EngineConfig(max_len=128, budget_bytes=2**30, max_batch=4, prefill_tokens_per_step=1))
    requests = _requests(3, seed=7)
    for r in requests:
        engine.submit(r, lambda e: None)
    active = []
    for _ in range(3):
        engine.step()
        active.append(engine.active)
    assert active == [1, 2, 3]  # one prefill per step, each followed by a decode step of the running rows
    assert engine.stats.decode_steps == 3 and engine.stats.decode_tokens == 1 + 2 + 3


def test_seeded_sampling_is_the_same_alone_and_in_a_batch() -> None:
    rkv = _rkv("folded")
    requests = [GenerationRequest(r.id, r.prompt_ids, r.max_tokens, SamplingOptions(temperature=0.9, top_p=0.9, top_k=0, seed=i))
                for i, r in enumerate(_requests(4, seed=11))]  # fmt: skip
    alone = {r.id: _collect(_engine(rkv, max_batch=1), [r])[r.id] for r in requests}
    assert _collect(_engine(rkv, max_batch=4), requests, {0: 0, 1: 1, 2: 1, 3: 4}) == alone
    assert len({tuple(t) for t in alone.values()}) == len(requests)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sliding_window_layers_alone_equal_batch_past_the_window(family: str) -> None:
    model = tiny_model(family, sliding_window=8)  # requests run far past the 8-token window
    ckpt = make_checkpoint(model, bits=2, recent_window=4, flush_block=4, max_sinks=2, key_layout="folded", sink_quantile=0.9)
    rkv = RkvModel(model, ckpt, settings=SETTINGS, backend="reference")
    requests = _requests(4, seed=13)
    alone = {r.id: _collect(_engine(rkv, max_batch=1), [r])[r.id] for r in requests}
    assert _collect(_engine(rkv, max_batch=3), requests, {0: 0, 1: 2, 2: 3, 3: 9}) == alone
    assert alone[requests[0].id] == _alone_stream(rkv, requests[0])


def test_single_cache_is_the_models_own() -> None:
    rkv = _rkv("folded")
    mine, theirs = _engine(rkv).cache.single(16), rkv.new_cache(16)
    for a, b in zip(mine.layers, theirs.layers, strict=True):
        assert type(a) is type(b) and a.settings == b.settings and a.backend == b.backend and a.capacity_hint == b.capacity_hint
        assert a.window == b.window
        assert torch.equal(a.rope[0], b.rope[0]) and a.rope[1] == b.rope[1]
        assert all(torch.equal(getattr(a.codec, f), getattr(b.codec, f)) for f in ("k_mean", "rotation", "k_gid", "head_rotation"))


@pytest.mark.parametrize("key_layout", ["folded", "prerope"])
def test_static_bucketed_steps_equal_plain_steps(key_layout: str) -> None:
    """The CUDA-graph path's steps run eagerly: active rows padded to a bucket, the whole store and
    fp segment read, window slots from the persistent buffer, flushes after the forward."""
    rkv = _rkv(key_layout)
    requests = _requests(7, seed=17)
    arrivals = {0: 0, 1: 0, 2: 3, 3: 5, 4: 6, 5: 11, 6: 17}
    plain = _collect(_engine(rkv, max_batch=10), requests, arrivals)
    engine = _engine(rkv, max_batch=10)
    assert engine.graph is None and engine.decode_path.startswith("eager (")  # CPU: no graphs, and it says why
    engine.graph = RowDecodeGraph(rkv.model, engine.cache, rkv.cache_argument, capture=False)
    bounds = []
    original = engine.cache.begin_step

    def begin_step(bound=None):
        bounds.append((engine.cache.active, bound))
        original(bound)

    engine.cache.begin_step = begin_step
    assert _collect(engine, requests, arrivals) == plain
    assert engine.graph.eager_steps == len(bounds) > 20
    st = engine.stats  # every step eager here, and the stats say so
    assert (st.eager_steps, st.graph_replays, st.graph_captures) == (len(bounds), 0, 0) and st.decode_steps == len(bounds)
    assert all(b == 8 for a, b in bounds if a <= 8) and any(a < 8 for a, _ in bounds)  # padding rows ran
    assert engine.stats.decode_tokens == sum(a for a, _ in bounds)  # padding rows emit nothing
    assert engine.cache.active == 0


def test_padding_steps_before_any_request_leave_no_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``Engine.capture_graphs`` runs on CUDA before serving (padding rows only, every bucket),
    here as static eager steps: decode steps through the packed-cache kernel in every layer (what a graph
    captures; never the prefill path), and the requests afterwards give the tokens of a fresh engine."""
    import rkv_convert.runtime.attention as handler

    kernel_calls = []
    decode_folded = handler.decode_folded
    monkeypatch.setattr(handler, "decode_folded", lambda *a, **k: kernel_calls.append(1) or decode_folded(*a, **k))
    rkv = _rkv("folded")
    requests = _requests(6, seed=5)
    arrivals = {0: 0, 1: 0, 2: 2, 3: 4, 4: 9, 5: 12}
    plain = _collect(_engine(rkv, max_batch=10), requests, arrivals)
    engine = _engine(rkv, max_batch=10)
    assert engine.capture_graphs() == 0  # the eager path holds no graphs
    engine.graph = RowDecodeGraph(rkv.model, engine.cache, rkv.cache_argument, capture=False)
    engine.cache.grow_slots(engine.largest_request_slots())
    kernel_calls.clear()
    for bound in engine.graph.bounds * 2:
        engine._padding_step(bound)
    assert len(kernel_calls) == 2 * len(engine.graph.bounds) * len(engine.cache.layers)
    assert engine.cache.active == 0 and engine.stats.decode_steps == 0
    assert _collect(engine, requests, arrivals) == plain


def test_largest_request_slots_follows_the_budget() -> None:
    rkv = _rkv("folded")
    roomy = _engine(rkv, max_batch=4, max_len=300)
    assert roomy.largest_request_slots() == 300
    tight = _engine(rkv, max_batch=4, max_len=300, budget=roomy.cache_bytes_for(200))
    slots = tight.largest_request_slots()
    assert 0 < slots < 300 and tight.cache_bytes_for(slots) <= tight.config.budget_bytes
    assert tight.cache_bytes_for(slots + 128) > tight.config.budget_bytes  # no whole block more would fit


def test_static_step_bound_is_checked() -> None:
    rkv = _rkv("folded")
    engine = _engine(rkv, max_batch=4)
    engine.submit(_requests(1)[0], lambda e: None)
    engine.step()
    with pytest.raises(ValueError, match="bound of 1 to 4 rows, got 5"):
        engine.cache.begin_step(bound=5)


def test_buckets() -> None:
    assert buckets(256)[:9] == [8, 16, 24, 32, 40, 48, 56, 64, 80] and buckets(256)[-2:] == [240, 256]
    assert buckets(5) == [5] and buckets(70) == [8, 16, 24, 32, 40, 48, 56, 64, 70]
    assert bucket_for(1, buckets(256)) == 8 and bucket_for(65, buckets(256)) == 80 and bucket_for(256, buckets(256)) == 256
    with pytest.raises(ValueError, match="exceed the largest bucket"):
        bucket_for(6, buckets(5))


def test_engine_refuses_required_cuda_graph_on_cpu() -> None:
    rkv = _rkv("folded")
    with pytest.raises(ValueError, match="cannot capture the engine's decode step in a CUDA graph: CUDA graphs need"):
        Engine(rkv, EngineConfig(max_len=64, budget_bytes=2**30, max_batch=2, cuda_graph=True))
    assert Engine(rkv, EngineConfig(max_len=64, budget_bytes=2**30, max_batch=2, cuda_graph=False)).decode_path == \
        "eager (CUDA graphs off)"


def test_salient_tokens_alone_equal_tokens_in_a_busy_batch() -> None:
    """A checkpoint's salient tokens are picked from each request's own prompt, so a request answers the same
    alone and among others; the row cache holds them in its pinned slots."""
    model = tiny_model("llama")
    ckpt = make_checkpoint(model, bits=2, recent_window=4, flush_block=4, max_sinks=2, key_layout="folded",
                           sink_quantile=0.9)  # fmt: skip
    settings = CacheSettings(recent_window=4, flush_block=4, max_sinks=2, salient_tokens=3)
    rkv = RkvModel(model, ckpt, settings=settings, backend="reference")
    requests = [r for r in _requests(6, seed=3) if len(r.prompt_ids) > 12]
    alone = {r.id: _collect(_engine(rkv, max_batch=1), [r])[r.id] for r in requests}
    assert alone[requests[0].id] == _alone_stream(rkv, requests[0])
    plain = RkvModel(model, ckpt, settings=SETTINGS, backend="reference")
    assert any(alone[r.id] != _alone_stream(plain, r) for r in requests)  # the salient tokens change the answers
    engine = _engine(rkv, max_batch=4)
    pinned = []
    original = engine.cache.end_step

    def end_step():
        pinned.append(int(engine.cache.layers[0].base["n_sinks"].max()))
        original()

    engine.cache.end_step = end_step
    assert _collect(engine, requests, {i: 2 * i for i in range(len(requests))}) == alone
    assert max(pinned) >= settings.salient_tokens
