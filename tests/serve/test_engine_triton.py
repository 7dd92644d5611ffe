"""The engine on the Triton kernel path (Triton's interpreter on CPU, compiled on CUDA): the row
cache's views (active rows, the longest row's slots, per-row flushes) go through the real decode and
write kernels, and a request's greedy tokens are still the same alone and in a busy batch."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "runtime"))  # the tiny-checkpoint fixtures live beside the runtime tests
from rkv_fixtures import make_checkpoint  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

from rkv_convert.runtime.cache import CacheSettings  # noqa: E402
from rkv_convert.runtime.generate import RkvModel, SamplingOptions  # noqa: E402
from rkv_convert.serve.engine import Engine, EngineConfig  # noqa: E402
from rkv_convert.serve.requests import GenerationRequest  # noqa: E402

GREEDY = SamplingOptions(temperature=0.0)


def _tokens(engine: Engine, requests, arrivals: dict[int, int]) -> dict[str, list[int]]:
    out = {r.id: [] for r in requests}
    step, pending = 0, list(enumerate(requests))
    while pending or engine.has_work:
        for i, r in [p for p in pending if arrivals.get(p[0], 0) <= step]:
            engine.submit(r, lambda e: e.token is not None and out[e.request_id].append(e.token))
            pending.remove((i, r))
        engine.step()
        step += 1
    return out


@pytest.mark.parametrize("key_layout", [
    "folded",  # Triton's interpreter on CPU
    pytest.param("folded", marks=pytest.mark.gpu, id="folded-compiled"),  # the default layout in `pytest -m gpu`
    pytest.param("prerope", marks=pytest.mark.gpu),  # interpreter: minutes
])  # fmt: skip
def test_triton_path_alone_equals_batch(key_layout: str) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = tiny_model("llama").to(device)
    ckpt = make_checkpoint(model, bits=2, recent_window=4, flush_block=4, max_sinks=2, key_layout=key_layout,
                           sink_quantile=0.9)  # fmt: skip
    rkv = RkvModel(model, ckpt, settings=CacheSettings(recent_window=4, flush_block=4, max_sinks=2), backend="auto")
    gen = torch.Generator().manual_seed(2)
    requests = [GenerationRequest(f"r{i}", tuple(torch.randint(0, 128, (n,), generator=gen).tolist()), max_tokens=m,
                                  sampling=GREEDY) for i, (n, m) in enumerate([(5, 10), (13, 8), (7, 9)])]  # fmt: skip
    config = dict(max_len=64, budget_bytes=2**30)
    alone = {r.id: _tokens(Engine(rkv, EngineConfig(**config, max_batch=1)), [r], {})[r.id] for r in requests}
    batched = _tokens(Engine(rkv, EngineConfig(**config, max_batch=3)), requests, {0: 0, 1: 2, 2: 5})
    assert batched == alone
    assert all(len(t) == r.max_tokens for r, t in zip(requests, alone.values()))


@pytest.mark.gpu
@pytest.mark.parametrize("key_layout", ["folded", "prerope"])
def test_graph_steps_equal_eager_steps_on_cuda(key_layout: str) -> None:
    """Replayed bucket graphs give the tokens of the same static steps run eagerly, across
    admissions, releases, flushes and a store growth (graphs dropped and recaptured)."""
    from rkv_convert.serve.row_graph import RowDecodeGraph

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_model("llama").to("cuda")
    ckpt = make_checkpoint(model, bits=2, recent_window=4, flush_block=4, max_sinks=2, key_layout=key_layout,
                           sink_quantile=0.9)  # fmt: skip
    rkv = RkvModel(model, ckpt, settings=CacheSettings(recent_window=4, flush_block=4, max_sinks=2), backend="auto")
    gen = torch.Generator().manual_seed(4)
    shapes = [(5, 10), (13, 30), (7, 9), (21, 12), (9, 40), (3, 150), (11, 20), (6, 25), (17, 18), (4, 33)]
    requests = [GenerationRequest(f"r{i}", tuple(torch.randint(0, 128, (n,), generator=gen).tolist()), max_tokens=m,
                                  sampling=GREEDY) for i, (n, m) in enumerate(shapes)]  # fmt: skip
    arrivals = {i: 3 * i for i in range(len(requests))}
    config = dict(max_len=256, budget_bytes=2**30, max_batch=12)
    eager = Engine(rkv, EngineConfig(**config, cuda_graph=False))
    eager.graph = RowDecodeGraph(rkv.model, eager.cache, rkv.cache_argument, capture=False)
    graphed = Engine(rkv, EngineConfig(**config))
    assert graphed.decode_path == "CUDA graph"
    runner = graphed.graph
    versions = []  # the store's version at each capture
    capture = runner._capture
    runner._capture = lambda bound, ids: (versions.append(graphed.cache.state.version), capture(bound, ids))
    expected = _tokens(eager, requests, arrivals)
    assert _tokens(graphed, requests, arrivals) == expected
    assert runner.replays > 100 and runner.captures == len(versions) >= 2, (runner.replays, versions)
    assert versions[0] == 0 and versions[-1] >= 1  # captured, then the store grew: recaptured into a new pool
    st = graphed.stats  # the engine's counters agree with the runner's
    assert (st.graph_replays, st.graph_captures) == (runner.replays - runner.captures, runner.captures)  # a capture replays too
    assert st.eager_steps == runner.eager_steps
    assert st.graph_replays + st.graph_captures + st.eager_steps == st.decode_steps and st.graph_replay_seconds > 0
    assert all(len(t) == r.max_tokens for r, t in zip(requests, expected.values()))


@pytest.mark.gpu
def test_graphs_captured_before_serving_replay_every_step() -> None:
    """``Engine.capture_graphs`` before the first request: the job then replays every step (no capture,
    no eager step, no store growth) and gives the tokens of eager steps; the flushes between replays
    never synchronize with the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_model("llama").to("cuda")
    ckpt = make_checkpoint(model, bits=2, recent_window=4, flush_block=4, max_sinks=2, sink_quantile=0.9)
    rkv = RkvModel(model, ckpt, settings=CacheSettings(recent_window=4, flush_block=4, max_sinks=2), backend="auto")
    gen = torch.Generator().manual_seed(6)
    shapes = [(5, 10), (13, 30), (7, 9), (21, 12), (9, 40), (3, 50), (11, 20)]
    requests = [GenerationRequest(f"r{i}", tuple(torch.randint(0, 128, (n,), generator=gen).tolist()), max_tokens=m,
                                  sampling=GREEDY) for i, (n, m) in enumerate(shapes)]  # fmt: skip
    arrivals = {i: 2 * i for i in range(len(requests))}
    config = dict(max_len=128, budget_bytes=2**30, max_batch=12)
    from rkv_convert.serve.row_graph import RowDecodeGraph

    eager = Engine(rkv, EngineConfig(**config, cuda_graph=False))  # the same static steps, run eagerly, same store size
    eager.graph = RowDecodeGraph(rkv.model, eager.cache, rkv.cache_argument, capture=False)
    eager.cache.grow_slots(eager.largest_request_slots())
    expected = _tokens(eager, requests, arrivals)
    graphed = Engine(rkv, EngineConfig(**config))
    assert graphed.capture_graphs() == len(graphed.graph.bounds) == 2  # buckets 8 and 12
    version = graphed.cache.state.version
    flushed, flush = [], graphed.cache.flush

    def flush_without_sync() -> None:  # a sync would hold the host until the replayed step ends (19 ms a step at 126 rows)
        flushed.append(len(graphed.cache.state.flushing))
        torch.cuda.set_sync_debug_mode("error")
        try:
            flush()
        finally:
            torch.cuda.set_sync_debug_mode(0)

    graphed.cache.flush = flush_without_sync
    assert _tokens(graphed, requests, arrivals) == expected
    st = graphed.stats
    assert st.graph_replays == st.decode_steps > 50 and st.graph_captures == st.eager_steps == 0
    assert graphed.cache.state.version == version  # the store never grew
    assert sum(n > 0 for n in flushed) > 10  # steps whose flush quantized rows, none of them synchronizing
