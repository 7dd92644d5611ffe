"""The runtime on the real SmolLM2-135M-Instruct: calibrate, export, load, generate (slow)."""

import pytest
import torch
from reference_handler import EvalReference
from smollm2_checkpoint import export_smollm2

from rkv_convert.models.compat import cache_kwargs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_smollm2(tmp_path_factory.mktemp("smollm2") / "rkv-2bit")


@torch.no_grad()
def test_smollm2_decode_matches_reference_and_tracks_full_precision(exported) -> None:
    import rkv_convert
    from rkv_convert.models.adapters import attach
    from rkv_convert.runtime.attention import rkv_attention

    rkv = rkv_convert.load(exported, device="cpu", backend="reference")
    tok = rkv.tokenizer
    text = "The quick brown fox jumps over the lazy dog. " * 3 + "Python is a programming language that lets you"
    ids = tok(text, return_tensors="pt").input_ids
    model = rkv.model
    fp_logits = model(ids).logits  # exported weights, no cache: the full-precision model
    split = ids.shape[1] - 24
    cache = rkv.new_cache()
    with attach(model, rkv_attention):
        steps = [model(ids[:, :split], **cache_kwargs(model, cache), use_cache=True).logits]
        for j in range(split, ids.shape[1]):
            steps.append(model(ids[:, j : j + 1], **cache_kwargs(model, cache), use_cache=True).logits)
    got = torch.cat(steps, 1)
    torch.testing.assert_close(got[:, :split], fp_logits[:, :split], rtol=0, atol=1e-3)  # prefill is exact
    ref_handler = EvalReference(model, rkv.checkpoint, rkv.settings)
    with attach(model, ref_handler):
        ref = [model(ids[:, :split], position_ids=torch.arange(split)[None], use_cache=False).logits]
        for j in range(split, ids.shape[1]):
            ref.append(model(ids[:, j : j + 1], position_ids=torch.tensor([[j]]), use_cache=False).logits)
    ref = torch.cat(ref, 1)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=2e-3)
    assert cache.layers[0].n_quant > 0 and sum(int(layer.n_sinks.sum()) for layer in cache.layers) > 0
    decode = slice(split, None)
    agree = (got[:, decode].argmax(-1) == fp_logits[:, decode].argmax(-1)).float().mean().item()
    assert agree >= 0.7, f"2-bit decode picks the full-precision token {agree:.0%} of the time"


@torch.no_grad()
def test_smollm2_chat_generation(exported) -> None:
    import rkv_convert
    from rkv_convert.runtime.cli import build_prompt
    from rkv_convert.runtime.generate import GenerationStats, SamplingOptions, stream_generate

    rkv = rkv_convert.load(exported, device="cpu", backend="reference")  # auto = Triton interpreter under the test conftest
    ids = build_prompt(rkv.tokenizer, "What is the capital of France?", chat=True)
    stats = GenerationStats()
    tokens = [int(t[0]) for t in stream_generate(rkv, ids, max_new_tokens=24, sampling=SamplingOptions(temperature=0), stats=stats)]
    text = rkv.tokenizer.decode(tokens, skip_special_tokens=True)
    assert "Paris" in text, text
    assert stats.kv_bytes < 2 * stats.fp16_equivalent_bytes  # below the fp32 cache this fp32 model would use
