"""Every supported family end to end on tiny random models: decode through the packed cache against
the evaluation reference (both key layouts, MHA and GQA, each head_dim the family uses), the Triton
kernels in the interpreter against the CPU reference, and the family-specific pieces (partial RoPE,
per-layer RoPE tables, soft cap) against transformers' own code."""

from __future__ import annotations

import pytest
import torch
from reference_handler import EvalReference
from rkv_fixtures import decode_logits, make_checkpoint
from test_attention import _prompt, _run, check_multi_token_step_against_reference
from tiny_models import tiny_gemma3_multimodal, tiny_model

from rkv_convert.runtime.attention import rkv_attention
from rkv_convert.runtime.cache import CacheSettings, RkvCache

NEW = ("mixtral", "qwen2_moe", "qwen3_moe", "phi3", "phi4mini", "gemma2", "gemma3")
# (head_dim, n_heads, n_kv): MHA and GQA at the usual 64/128, and Gemma's 256 with one KV head
SHAPES = {f: [(64, 4, 4), (128, 4, 2)] for f in NEW}
SHAPES["gemma2"] = [(64, 4, 4), (256, 4, 2)]
SHAPES["gemma3"] = [(64, 4, 4), (256, 4, 1)]
SETTINGS = CacheSettings(recent_window=4, flush_block=4, max_sinks=2)
CASES = [(f, *shape) for f in NEW for shape in SHAPES[f]]
LAYOUTS = ("folded", "prerope")


def _decode_matches_reference(model, label: str, layout: str) -> tuple[object, RkvCache, tuple[torch.Tensor, torch.Tensor]]:
    """Prefill and 8 decode steps through the packed cache equal the evaluation reference; returns the
    checkpoint, the cache and the prompt (ids, mask)."""
    ckpt = make_checkpoint(model, bits=2, key_group_size=32, value_group_size=16, sink_quantile=0.9, key_layout=layout)
    ids, mask = _prompt(pad=3)
    cache = RkvCache.from_checkpoint(ckpt, model, SETTINGS, backend="reference")
    got = _run(model, rkv_attention, ids, mask, steps=8, cache=cache)
    want = _run(model, EvalReference(model, ckpt, SETTINGS), ids, mask, steps=8)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{label}: {m}")
    return ckpt, cache, (ids, mask)


@pytest.mark.parametrize("family,head_dim,n_heads,n_kv", CASES)
def test_decode_matches_evaluation_reference(family: str, head_dim: int, n_heads: int, n_kv: int) -> None:
    for layout in LAYOUTS:  # a fresh model per layout: make_checkpoint fuses the value rotation in place
        model = tiny_model(family, head_dim=head_dim, n_heads=n_heads, n_kv=n_kv)
        _, cache, _ = _decode_matches_reference(model, f"{family} {layout}", layout)
        assert cache.layers[-1].n_quant > 0


@pytest.mark.parametrize("family", NEW)
def test_multi_token_step_matches_reference(family: str) -> None:
    check_multi_token_step_against_reference(tiny_model(family), key_layout="folded")


@pytest.mark.parametrize("family", NEW)
def test_triton_interpreter_matches_reference_backend(family: str) -> None:
    """backend='auto' (Triton; the interpreter on CPU) gives the reference backend's logits."""
    head_dim, n_heads, n_kv = SHAPES[family][-1]
    layers = 2 if family.startswith("gemma") else 1  # Gemma: one sliding and one global layer
    for layout in LAYOUTS:
        model = tiny_model(family, layers=layers, head_dim=head_dim, n_heads=n_heads, n_kv=n_kv)
        ckpt = make_checkpoint(model, bits=2, key_group_size=32, value_group_size=32, key_layout=layout)
        ids, mask = _prompt(t=10, pad=2)
        ref = _run(model, rkv_attention, ids, mask, steps=2, cache=RkvCache.from_checkpoint(ckpt, model, SETTINGS, backend="reference"))
        got = _run(model, rkv_attention, ids, mask, steps=2, cache=RkvCache.from_checkpoint(ckpt, model, SETTINGS, backend="auto"))
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3, msg=lambda m: f"{family} {layout}: {m}")


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "mistral", "phi3"])
def test_sliding_window_layers_attend_to_their_window_only(family: str) -> None:
    """A window of 6 tokens, a 21-token prompt and 8 decode steps, then a 5-token chunk: tokens that
    left a sliding layer's window are never attended again (decode, multi-token step, both layouts)."""
    for layout in LAYOUTS:
        model = tiny_model(family, sliding_window=6)
        ckpt, _, (ids, mask) = _decode_matches_reference(model, f"{family} {layout}", layout)
        chunk = torch.randint(0, 128, (2, 5))
        cache = RkvCache.from_checkpoint(ckpt, model, SETTINGS, backend="reference")
        got = _run(model, rkv_attention, ids, mask, steps=3, cache=cache, chunk=chunk)
        want = _run(model, EvalReference(model, ckpt, SETTINGS), ids, mask, steps=3, chunk=chunk)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{family} {layout} chunk: {m}")


def test_sliding_window_changes_the_decode() -> None:
    """The window must matter for the test above to mean anything: 6 against 256 gives other logits."""
    ids, mask = _prompt(pad=3)
    logits = []
    for window in (6, 256):
        model = tiny_model("gemma3", sliding_window=window)
        ckpt = make_checkpoint(model, bits=2, key_group_size=32, value_group_size=16, key_layout="folded")
        cache = RkvCache.from_checkpoint(ckpt, model, SETTINGS, backend="reference")
        logits.append(_run(model, rkv_attention, ids, mask, steps=4, cache=cache))
    assert (logits[0] - logits[1]).abs().max() > 1e-3


def test_the_text_part_of_a_multimodal_gemma3() -> None:
    """Gemma3ForConditionalGeneration (model type gemma3): layers, RoPE and head_dim come from its
    language model; prefill is the stock model and decode equals the evaluation reference."""
    for layout in ("folded", "prerope"):
        model = tiny_gemma3_multimodal()
        assert type(model).__name__ == "Gemma3ForConditionalGeneration"
        ckpt = make_checkpoint(model, bits=2, key_group_size=32, value_group_size=16, sink_quantile=0.9, key_layout=layout)
        ids, mask = _prompt(pad=3)
        ids = ids.clamp_max(100)  # no image tokens
        with torch.no_grad():
            stock = model(ids, attention_mask=mask).logits[:, -1:]
        got = _run(model, rkv_attention, ids, mask, steps=6, cache=RkvCache.from_checkpoint(ckpt, model, SETTINGS, backend="reference"))
        want = _run(model, EvalReference(model, ckpt, SETTINGS), ids, mask, steps=6)
        torch.testing.assert_close(got[:, :1], stock, rtol=0, atol=1e-5)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{layout}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("family", NEW)
def test_triton_on_cuda_matches_reference_backend(family: str, dtype: torch.dtype, layout: str) -> None:
    """The compiled Triton decode kernels on CUDA for every new family (soft cap, head_dim 256, partial
    RoPE, per-layer RoPE, a sliding window of 24 crossed by a 70-token prompt), teacher-forced; one case
    per key layout."""
    head_dim, n_heads, n_kv = SHAPES[family][-1]
    settings = CacheSettings(recent_window=8, flush_block=8, max_sinks=2)
    ids = torch.randint(0, 128, (3, 70), device="cuda")
    model = tiny_model(family, head_dim=head_dim, n_heads=n_heads, n_kv=n_kv, sliding_window=24)
    ckpt = make_checkpoint(model, bits=2, key_group_size=32, value_group_size=32, key_layout=layout)
    model = model.to("cuda", dtype)

    def logits(backend: str, feed: torch.Tensor | None = None) -> torch.Tensor:
        return decode_logits(model, RkvCache.from_checkpoint(ckpt, model, settings, backend=backend), ids, 12, feed)

    ref = logits("reference")
    if layout == "prerope" and head_dim >= 256 and dtype != torch.float16:
        with pytest.raises(ValueError, match="shared memory"):  # head_kernel_supports: refused, not run
            logits("triton", feed=ref[:, :-1].argmax(-1))
        return
    got = logits("triton", feed=ref[:, :-1].argmax(-1))
    tol = 2e-3 if dtype == torch.float32 else 3e-2  # as test_runtime_folded.py's CUDA test
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol, msg=lambda m: f"{family} {layout} {dtype}: {m}")
