"""``rkv_convert.load``, ``RkvModel.generate``, the streaming loop and ``rkv run``."""

import pytest
import torch
import typer
from rkv_fixtures import char_tokenizer, make_checkpoint, write_folder
from tiny_models import tiny_model
from typer.testing import CliRunner

import rkv_convert
from rkv_convert.export.format import CheckpointError
from rkv_convert.runtime.cli import run_command
from rkv_convert.runtime.generate import GenerationStats, SamplingOptions, sample_next, stream_generate


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_model("qwen2")
    ckpt = make_checkpoint(model, bits=2, recent_window=4, flush_block=4, max_sinks=2)
    return write_folder(ckpt, model, char_tokenizer(), tmp_path_factory.mktemp("rkv") / "tiny-rkv")


def test_load_generate_and_stream_agree(folder) -> None:
    rkv = rkv_convert.load(folder, device="cpu", backend="reference")
    assert rkv.tokenizer is not None and rkv.dtype == torch.float32
    ids = torch.randint(3, 98, (2, 30))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    out = rkv.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    hf_cache = rkv.last_cache
    stats = GenerationStats()
    streamed = list(stream_generate(rkv, ids, mask, max_new_tokens=10, sampling=SamplingOptions(temperature=0), stats=stats))
    assert torch.equal(torch.stack(streamed, 1), out[:, 30:])
    assert stats.new_tokens == 10 and stats.prompt_tokens == 30 and stats.batch == 2
    assert stats.kv_bytes == rkv.last_cache.bytes_used() == hf_cache.bytes_used()
    assert stats.fp16_equivalent_bytes == 2 * 2 * 39 * 2 * 2 * 64 * 2  # layers, B, slots, K+V, n_kv, d, bytes
    assert stats.decode_tokens_per_second > 0 and stats.prefill_tokens_per_second > 0
    assert 0 < stats.first_decode_seconds < stats.decode_seconds and stats.steady_decode_tokens_per_second > 0


def test_micro_batched_prefill_builds_the_same_cache(folder) -> None:
    rkv = rkv_convert.load(folder, device="cpu", backend="reference")
    ids = torch.randint(3, 98, (5, 26))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    greedy = SamplingOptions(temperature=0)
    whole = torch.stack(list(stream_generate(rkv, ids, mask, max_new_tokens=8, sampling=greedy)), 1)
    one = rkv.last_cache
    sliced = torch.stack(list(stream_generate(rkv, ids, mask, max_new_tokens=8, sampling=greedy, prefill_batch=2)), 1)
    two = rkv.last_cache
    assert torch.equal(whole, sliced)
    for a, b in zip(one.layers, two.layers):
        assert (a.length, a.n_quant, a.n_window) == (b.length, b.n_quant, b.n_window) and a.n_quant > 0
        for name, t in a.quantized().items():
            assert torch.equal(t, b.quantized()[name]), name
        for name, t in a.full_precision().items():
            torch.testing.assert_close(t, b.full_precision()[name], rtol=1e-5, atol=1e-5, msg=name)
        assert torch.equal(a.n_sinks, b.n_sinks)


def test_row_views_share_storage_and_refuse_misuse() -> None:
    """rows(): views of an allocated empty cache (what the micro-batched prefill writes through)."""
    from rkv_convert.runtime.cache import RkvCache
    model = tiny_model("llama")
    ckpt = make_checkpoint(model, bits=2, recent_window=4, flush_block=4, max_sinks=2)
    cache = RkvCache.from_checkpoint(ckpt, model).reserve(40)
    with pytest.raises(ValueError, match="allocated"):
        cache.rows(0, 1)
    cache.allocate(5, torch.float32)
    view = cache.rows(2, 3)
    for full, part in zip(cache.layers, view.layers):
        assert part.batch == 3 and part.k_codes.data_ptr() == full.k_codes[2].data_ptr()
        assert part.fp_k.data_ptr() == full.fp_k[2].data_ptr() and part.n_sinks.data_ptr() == full.n_sinks[2:].data_ptr()
    with pytest.raises(ValueError, match="do not fit"):
        cache.rows(4, 2)
    with pytest.raises(RuntimeError, match="cannot grow"):
        view.layers[0]._reserve(view.layers[0].pos.shape[1] + 1)
    cache.layers[0].length = 3
    with pytest.raises(ValueError, match="already holds tokens"):
        cache.layers[0].rows(0, 1)


def test_reserved_store_does_not_grow() -> None:
    from rkv_convert.runtime.cache import RkvCache
    model = tiny_model("llama")
    ckpt = make_checkpoint(model, bits=2, recent_window=4, flush_block=4, max_sinks=2)
    cache = RkvCache.from_checkpoint(ckpt, model).reserve(300)
    cache.allocate(2, torch.float32)
    # the reservation up front, rounded up to whole 128-slot blocks (the folded kernel reads them unmasked)
    assert all(layer.k_codes.shape[2] == 384 and layer.pos.shape[1] == 384 for layer in cache.layers)


def test_stream_stops_at_eos_and_sampling_is_seeded(folder) -> None:
    rkv = rkv_convert.load(folder, device="cpu", backend="reference")
    ids = torch.randint(3, 98, (1, 12))
    greedy = list(stream_generate(rkv, ids, max_new_tokens=6, sampling=SamplingOptions(temperature=0)))
    eos = int(greedy[2][0])
    stopped = list(stream_generate(rkv, ids, max_new_tokens=6, sampling=SamplingOptions(temperature=0), eos_token_ids=[eos]))
    assert len(stopped) == 1 + [int(t[0]) for t in greedy].index(eos)
    opts = SamplingOptions(temperature=1.0, top_p=0.9, top_k=20, seed=3)
    first = [int(t[0]) for t in stream_generate(rkv, ids, max_new_tokens=8, sampling=opts)]
    again = [int(t[0]) for t in stream_generate(rkv, ids, max_new_tokens=8, sampling=opts)]
    assert first == again


def test_sample_next_respects_top_k_and_top_p() -> None:
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    picks = sample_next(logits, SamplingOptions(temperature=1.0, top_p=1.0, top_k=2), g)
    assert set(picks.tolist()) == {0, 1}
    picks = sample_next(logits, SamplingOptions(temperature=1.0, top_p=0.5, top_k=0), g)
    assert set(picks.tolist()) == {0}
    assert sample_next(logits[:1], SamplingOptions(temperature=0.0)).tolist() == [0]


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("run")(run_command)
    app.command("noop")(lambda: None)  # two commands: typer keeps `run` as a sub-command
    return app


def test_rkv_run_streams_and_summarises(folder) -> None:
    result = CliRunner().invoke(_app(), ["run", str(folder), "-p", "hello", "-n", "12", "--greedy", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for needle in ("prefill", "decode", "tok/s", "KV cache used", "fp16 cache", "bits / element"):
        assert needle in result.output
    no_chat = CliRunner().invoke(_app(), ["run", str(folder), "-p", "hello", "-n", "4", "--no-chat", "--device", "cpu"])
    assert no_chat.exit_code == 0, no_chat.output


def test_builtin_name_and_bad_folder_explain_what_to_do(tmp_path) -> None:
    result = CliRunner().invoke(_app(), ["run", "smollm2-135m"])
    assert result.exit_code == 2 and "rkv calibrate" in result.output and "rkv export" in result.output
    result = CliRunner().invoke(_app(), ["run", str(tmp_path)])
    assert result.exit_code == 1 and "rkv export" in result.output
    with pytest.raises(CheckpointError, match="rkv calibrate"):
        rkv_convert.load("smollm2-135m")


def test_device_map_load_generates_like_a_plain_load(folder) -> None:
    """``device_map`` goes through transformers/accelerate placement; each cache layer follows its layer."""
    plain = rkv_convert.load(folder, device="cpu", backend="reference")
    mapped = rkv_convert.load(folder, device_map={"": "cpu"}, backend="reference")
    ids = torch.randint(3, 98, (2, 30))
    greedy = SamplingOptions(temperature=0)
    a = torch.stack(list(stream_generate(plain, ids, max_new_tokens=6, sampling=greedy)), 1)
    b = torch.stack(list(stream_generate(mapped, ids, max_new_tokens=6, sampling=greedy)), 1)
    assert torch.equal(a, b)
    layers = mapped.model.model.layers
    for layer, cache_layer in zip(layers, mapped.last_cache.layers, strict=True):
        assert cache_layer.codec.k_mean.device == next(layer.parameters()).device
        assert cache_layer.k_codes.device == next(layer.parameters()).device
