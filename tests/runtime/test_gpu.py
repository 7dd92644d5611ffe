"""The runtime on CUDA: Triton quantize+pack and decode kernels inside generation (skipped on CPU)."""

import os

import pytest
import torch
from rkv_fixtures import decode_logits, make_checkpoint
from tiny_models import tiny_model

from rkv_convert.models.compat import cache_kwargs
from rkv_convert.runtime.cache import CacheSettings, RkvCache
from rkv_convert.runtime.generate import RkvModel

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("family,head_dim,n_kv", [("llama", 64, 2), ("qwen3", 128, 4)])
def test_triton_runtime_matches_reference_backend(dtype, family, head_dim, n_kv) -> None:
    model = tiny_model(family, head_dim=head_dim, n_kv=n_kv, n_heads=2 * n_kv)
    ckpt = make_checkpoint(model, bits=2, key_group_size=64, value_group_size=32, head_group_size=2)
    model = model.to("cuda", dtype)
    settings = CacheSettings(recent_window=8, flush_block=8, max_sinks=2)
    ids = torch.randint(0, 128, (3, 70), device="cuda")
    ref = decode_logits(model, RkvCache.from_checkpoint(ckpt, model, settings, backend="reference"), ids, 16)
    got = decode_logits(model, RkvCache.from_checkpoint(ckpt, model, settings, backend="triton"), ids, 16)
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


def test_rkv_model_generate_on_cuda_fp16() -> None:
    model = tiny_model("llama")
    ckpt = make_checkpoint(model, bits=4, recent_window=4, flush_block=4)
    model = model.to("cuda", torch.float16)
    ids = torch.randint(0, 128, (2, 40), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    triton_out = RkvModel(model, ckpt, backend="triton").generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    ref_out = RkvModel(model, ckpt, backend="reference").generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    agree = (triton_out[:, 40:] == ref_out[:, 40:]).float().mean().item()
    assert agree >= 0.8, f"Triton and reference generations agree on {agree:.0%} of tokens"


@pytest.mark.skipif(not os.environ.get("RKV_GPU_CHECKPOINT"), reason="set RKV_GPU_CHECKPOINT to an exported checkpoint folder")
@torch.no_grad()
def test_exported_checkpoint_triton_matches_reference_on_cuda() -> None:
    """A real exported checkpoint in fp16 on CUDA: Triton and reference backends, same decode steps."""
    import rkv_convert

    folder = os.environ["RKV_GPU_CHECKPOINT"]
    tri = rkv_convert.load(folder, device="cuda", backend="triton")
    ref = rkv_convert.load(folder, device="cuda", backend="reference")
    text = "The history of the printing press begins in the fifteenth century, when " * 20
    ids = tri.tokenizer(text, return_tensors="pt").input_ids.cuda()
    steps = 48
    logits = {}
    for name, rkv in (("triton", tri), ("reference", ref)):
        cache = rkv.new_cache()
        with rkv.attached() as model:
            out = model(ids, **cache_kwargs(model, cache), use_cache=True)
            seq = [out.logits[:, -1:].float()]
            for j in range(steps):  # teacher-forced on the prompt's own tokens: both backends see the same inputs
                tok = ids[:, j : j + 1]
                seq.append(model(tok, **cache_kwargs(model, cache), use_cache=True).logits.float())
        logits[name] = torch.cat(seq, 1)
        assert cache.layers[0].n_quant > 0
    err = (logits["triton"] - logits["reference"]).abs().max().item()
    scale = logits["reference"].abs().max().item()
    agree = (logits["triton"].argmax(-1) == logits["reference"].argmax(-1)).float().mean().item()
    print(f"\n[exported checkpoint on {torch.cuda.get_device_name()}] max|triton - reference| logits = {err:.4g} "
          f"(max|logit| {scale:.3g}), argmax agreement {agree:.1%} over {steps + 1} steps")
    assert err <= 0.05 * scale and agree >= 0.9
