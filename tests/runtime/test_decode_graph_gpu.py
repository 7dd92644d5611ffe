"""Decode steps replayed from a captured CUDA graph against the same static steps run eagerly (GPU only)."""

import pytest
import torch
from rkv_fixtures import make_checkpoint
from tiny_models import tiny_model

from rkv_convert.models.compat import cache_kwargs
from rkv_convert.runtime.decode_graph import DecodeGraph
from rkv_convert.runtime.generate import RkvModel, SamplingOptions, GenerationStats, stream_generate

pytestmark = pytest.mark.gpu


def _rkv(layout: str) -> RkvModel:
    torch.manual_seed(0)
    model = tiny_model("llama", head_dim=64, n_kv=2, n_heads=4)
    ckpt = make_checkpoint(model, bits=2, recent_window=6, flush_block=4, max_sinks=2, key_layout=layout)
    return RkvModel(model.to("cuda", torch.float16), ckpt, backend="triton")


def _steps(rkv: RkvModel, ids: torch.Tensor, feed: torch.Tensor, capture: bool, reserve: int) -> tuple[torch.Tensor, DecodeGraph]:
    cache = rkv.new_cache(reserve_tokens=reserve)
    with rkv.attached() as model:
        out = model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
        logits = [out.logits[:, -1]]
        runner = DecodeGraph(model, cache, rkv.cache_argument, capture=capture)
        pos = torch.full((ids.shape[0], 1), ids.shape[1], device="cuda")
        for j in range(feed.shape[1]):
            logits.append(runner.step(feed[:, j : j + 1], pos + j).clone())
        runner.close()
    return torch.stack(logits, 1).float(), runner


@pytest.mark.parametrize("layout", ["folded", "prerope"])
def test_replayed_steps_equal_eager_static_steps(layout) -> None:
    rkv = _rkv(layout)
    ids = torch.randint(3, 120, (2, 150), device="cuda")
    feed = torch.randint(3, 120, (2, 140), device="cuda")  # the store grows past 128 + 128 reserved slots
    got, graph = _steps(rkv, ids, feed, capture=True, reserve=200)
    want, _ = _steps(rkv, ids, feed, capture=False, reserve=200)
    assert graph.replays >= 120 and graph.captures >= 2  # recaptured after the store grew
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("batch", [1, 3])
def test_stream_generate_says_it_replays_a_graph(batch) -> None:
    rkv = _rkv("folded")
    ids = torch.randint(3, 120, (batch, 12), device="cuda")
    mask = torch.ones_like(ids)
    mask[1:, :5] = 0  # left padding in every row but the first
    stats = GenerationStats()
    greedy = SamplingOptions(temperature=0)
    graphed = torch.stack(list(stream_generate(rkv, ids, mask, max_new_tokens=40, sampling=greedy, stats=stats,
                                               cuda_graph=True)), 1)  # fmt: skip
    assert stats.decode_path == "CUDA graph"
    eager = torch.stack(list(stream_generate(rkv, ids, mask, max_new_tokens=40, sampling=greedy, cuda_graph=False)), 1)
    assert (graphed == eager).float().mean() >= 0.9  # fp16 near-ties may part the two paths late
    out = rkv.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert rkv.last_decode_path == "CUDA graph" and out.shape[1] == 52
