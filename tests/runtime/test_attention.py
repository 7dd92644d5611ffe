"""The rkv handler against stock attention (prefill) and the evaluation-style reference (decode)."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from reference_handler import EvalReference
from rkv_fixtures import make_checkpoint
from tiny_models import FAMILIES, tiny_model

from rkv_convert.models.compat import cache_kwargs
from rkv_convert.models.adapters import attach
from rkv_convert.runtime.attention import _rope, _rope_query_key, new_token_validity, rkv_attention
from rkv_convert.runtime.cache import CacheSettings, RkvCache


def _prompt(b: int = 2, t: int = 21, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 128, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, :pad] = 0
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def _run(model, handler, ids, mask, steps: int, cache=None, chunk: torch.Tensor | None = None):
    """Prefill, an optional multi-token chunk, then ``steps`` greedy decode steps; returns all logits."""
    logits = []
    with attach(model, handler):
        out = model(ids, attention_mask=mask, position_ids=_positions(mask), **cache_kwargs(model, cache), use_cache=cache is not None)
        logits.append(out.logits[:, -1:])
        next_pos = mask.sum(-1)
        full_mask = mask
        feed = [chunk] if chunk is not None else []
        for _ in range(steps):
            feed.append(out.logits[:, -1].argmax(-1, keepdim=True))
            new = feed.pop(0)
            t = new.shape[1]
            full_mask = torch.cat([full_mask, torch.ones_like(new)], 1)
            pos = next_pos[:, None] + torch.arange(t)
            kw = dict(attention_mask=full_mask, **cache_kwargs(model, cache), use_cache=True) if cache is not None else {}
            out = model(new, position_ids=pos, **kw)
            logits.append(out.logits)
            next_pos = next_pos + t
    return torch.cat(logits, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_is_the_stock_model(family: str) -> None:
    check_prefill_is_the_stock_model(tiny_model(family))


def check_prefill_is_the_stock_model(model, key_layout: str = "prerope") -> RkvCache:
    """A prefill through the packed cache gives the unmodified model's logits; returns the filled cache."""
    ckpt = make_checkpoint(model, bits=2, key_layout=key_layout)
    ids, mask = _prompt(pad=5)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        cache = RkvCache.from_checkpoint(ckpt, model, backend="reference")
        with attach(model, rkv_attention):
            got = model(ids, attention_mask=mask, **cache_kwargs(model, cache), use_cache=True).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-5)
    assert cache.get_seq_length() == ids.shape[1]
    return cache


@pytest.mark.parametrize(
    "family,bits,pad,settings",
    [
        ("llama", 2, 0, CacheSettings(recent_window=4, flush_block=4, max_sinks=2)),
        ("qwen3", 2, 6, CacheSettings(recent_window=3, flush_block=2, max_sinks=1)),
        ("qwen2", 3, 3, CacheSettings(recent_window=0, flush_block=1, max_sinks=0)),
        ("mistral", 4, 0, CacheSettings(recent_window=8, flush_block=8, max_sinks=4)),
    ],
)
def test_decode_matches_evaluation_reference(family: str, bits: int, pad: int, settings: CacheSettings) -> None:
    check_decode_against_reference(tiny_model(family), bits, pad, settings)


def check_decode_against_reference(model, bits: int, pad: int, settings: CacheSettings, key_layout: str = "prerope") -> None:
    """12 decode steps through the packed cache (reference backend) equal the evaluation reference's."""
    ckpt = make_checkpoint(model, bits=bits, key_group_size=32, value_group_size=16, sink_quantile=0.9, key_layout=key_layout)
    ids, mask = _prompt(pad=pad)
    cache = RkvCache.from_checkpoint(ckpt, model, settings, backend="reference")
    got = _run(model, rkv_attention, ids, mask, steps=12, cache=cache)
    want = _run(model, EvalReference(model, ckpt, settings), ids, mask, steps=12)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    layer = cache.layers[0]
    assert layer.n_quant > 0  # the comparison covered quantized tokens
    if settings.max_sinks:
        assert int(layer.n_sinks.sum()) > 0  # ... and sinks


def check_multi_token_step_against_reference(model, key_layout: str = "prerope"):
    """A 5-token chunk after prefill, then 4 decode steps, equal the evaluation reference's; returns (ckpt, ids, mask, chunk)."""
    ckpt = make_checkpoint(model, bits=2, key_group_size=32, value_group_size=16, key_layout=key_layout)
    settings = CacheSettings(recent_window=8, flush_block=4, max_sinks=2)
    ids, mask = _prompt(pad=4)
    chunk = torch.randint(0, 128, (2, 5))
    cache = RkvCache.from_checkpoint(ckpt, model, settings, backend="reference")
    got = _run(model, rkv_attention, ids, mask, steps=4, cache=cache, chunk=chunk)
    want = _run(model, EvalReference(model, ckpt, settings), ids, mask, steps=4, chunk=chunk)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    return ckpt, ids, mask, chunk


def test_multi_token_step_after_prefill_matches_reference_and_decode() -> None:
    model = tiny_model("llama")
    ckpt, ids, mask, chunk = check_multi_token_step_against_reference(model)
    # fed one at a time instead, the chunk gives the same logits while no flush happens in between
    # (21 prompt tokens, window 4 + block 8: 16 quantized, 5 in the window, 10 after the chunk)
    settings = CacheSettings(recent_window=4, flush_block=8, max_sinks=2)
    chunked = _run(model, rkv_attention, ids, mask, steps=1, cache=RkvCache.from_checkpoint(ckpt, model, settings, backend="reference"), chunk=chunk)
    cache2 = RkvCache.from_checkpoint(ckpt, model, settings, backend="reference")
    with torch.no_grad(), attach(model, rkv_attention):
        model(ids, attention_mask=mask, position_ids=_positions(mask), **cache_kwargs(model, cache2), use_cache=True)
        full_mask, step_logits = mask, []
        for j in range(5):
            full_mask = torch.cat([full_mask, torch.ones(2, 1, dtype=torch.long)], 1)
            pos = mask.sum(-1, keepdim=True) + j
            out = model(chunk[:, j : j + 1], attention_mask=full_mask, position_ids=pos, **cache_kwargs(model, cache2), use_cache=True)
            step_logits.append(out.logits)
    assert cache2.layers[0].n_quant == 16
    torch.testing.assert_close(torch.cat(step_logits, 1), chunked[:, 1:6], rtol=1e-4, atol=1e-4)


def test_four_bit_greedy_tracks_full_precision() -> None:
    """4-bit greedy tokens equal full precision's up to the first near-tie of full precision.

    A tiny random model has flat logits (std ~0.3), so greedy paths may part at a near-tie; the
    test asserts they part nowhere else, and that the teacher-forced 4-bit logits stay close.
    """
    model = tiny_model("llama", layers=3)
    ids, mask = _prompt(t=24)
    with torch.no_grad():
        fp_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)[:, 24:]
        fp_logits = model(torch.cat([ids, fp_tokens], 1)).logits[:, 23:-1]
    ckpt = make_checkpoint(model, bits=4, key_group_size=32, value_group_size=32)
    settings = CacheSettings(recent_window=4, flush_block=4, max_sinks=1)
    cache = RkvCache.from_checkpoint(ckpt, model, settings, backend="reference")
    with torch.no_grad(), attach(model, rkv_attention):
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, **cache_kwargs(model, cache))[:, 24:]
    top2 = fp_logits.topk(2, -1).values
    margin = top2[..., 0] - top2[..., 1]
    for b in range(2):
        differs = (tokens[b] != fp_tokens[b]).nonzero()
        if differs.numel():
            first = int(differs[0])
            assert first >= 2 and margin[b, first] < 0.05, f"row {b} departs at step {first}, fp margin {margin[b, first]:.3f}"
    # teacher-forced on the fp tokens: 4-bit logits within 25 dB SQNR, same argmax wherever fp is clear
    cache = RkvCache.from_checkpoint(ckpt, model, settings, backend="reference")
    with torch.no_grad(), attach(model, rkv_attention):
        steps = [model(ids, attention_mask=mask, **cache_kwargs(model, cache)).logits[:, -1:]]
        for j in range(23):
            m = torch.ones(2, 25 + j, dtype=torch.long)
            steps.append(model(fp_tokens[:, j : j + 1], attention_mask=m, **cache_kwargs(model, cache)).logits)
    q_logits = torch.cat(steps, 1)
    sqnr = 20 * torch.log10(fp_logits.norm() / (fp_logits - q_logits).norm())
    assert sqnr > 25, f"4-bit decode logits SQNR {sqnr:.1f} dB"
    clear = margin > 0.05
    assert clear.float().mean() > 0.5
    assert torch.equal(q_logits.argmax(-1)[clear], fp_logits.argmax(-1)[clear])


@pytest.mark.parametrize("key_group,value_group,permute", [(32, 16, True), (64, 64, False), (64, 16, False)])
def test_triton_kernel_path_matches_reference_backend(key_group: int, value_group: int, permute: bool) -> None:
    """backend='auto': the Triton kernels (CUDA, or the interpreter on CPU) inside the runtime: the head
    kernel for a calibrated permutation, the chunk kernel for key groups = rotated head chunks (2 x 64 = H2 ⊗ H64)."""
    model = tiny_model("llama", layers=1)
    ckpt = make_checkpoint(model, bits=2, key_group_size=key_group, value_group_size=value_group, permute=permute)
    settings = CacheSettings(recent_window=4, flush_block=4, max_sinks=2)
    ids, mask = _prompt(t=14, pad=3)
    ref = _run(model, rkv_attention, ids, mask, steps=3, cache=RkvCache.from_checkpoint(ckpt, model, settings, backend="reference"))
    cache = RkvCache.from_checkpoint(ckpt, model, settings, backend="auto")
    assert cache.layers[0].codec.prepared_rotation(torch.float32).keys_by_chunk is (not permute)
    got = _run(model, rkv_attention, ids, mask, steps=3, cache=cache)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)


def test_handler_refuses_a_foreign_cache_and_reads_masks() -> None:
    from transformers import DynamicCache

    model = tiny_model("llama")
    ids, _ = _prompt()
    with torch.no_grad(), attach(model, rkv_attention), pytest.raises(TypeError, match="RkvCache"):
        model(ids, **cache_kwargs(model, DynamicCache()), use_cache=True)
    bool_mask = torch.tensor([[[[True, False, False], [True, True, False], [True, True, True]]]])
    assert new_token_validity(bool_mask[:, :, 1:], 1, 2).tolist() == [[True, True]]
    float_mask = torch.zeros(2, 1, 1, 4)
    float_mask[1, 0, 0, 3] = torch.finfo(torch.float32).min
    assert new_token_validity(float_mask, 2, 1).tolist() == [[True], [False]]
    assert new_token_validity(torch.tensor([[0, 1, 1]]), 1, 2).tolist() == [[True, True]]
    assert new_token_validity(None, 2, 3) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("projected", [False, True])
def test_rope_helpers_are_bitwise_transformers_rope(dtype: torch.dtype, batch: int, projected: bool) -> None:
    """The handler's RoPE (one tensor, or query and key concatenated) is transformers' own, bit for bit,
    also on the strided ``[B, T, heads, d]``-ordered tensors the projections make (``projected``)."""
    t = 17 if projected else 2
    if projected:
        q = torch.randn(batch, t, 9, 64).to(dtype).transpose(1, 2)
        k = torch.randn(batch, t, 3, 64).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(batch, 9, t, 64).to(dtype)
        k = torch.randn(batch, 3, t, 64).to(dtype)
    angles = torch.rand(batch, t, 32) * 100
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    q_rot, k_rot = _rope_query_key(q, k, cos, sin)
    assert torch.equal(q_rot, q_ref) and torch.equal(k_rot, k_ref)
    assert torch.equal(_rope(q, cos, sin), q_ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rotate_half_of_a_prefill_sized_tensor_is_bitwise_transformers(dtype: torch.dtype) -> None:
    """Above ``_HALVES_FROM`` elements the halves are written into one tensor: the same values and
    gradients as transformers' concatenation."""
    from transformers.models.llama.modeling_llama import rotate_half as hf_rotate_half

    from rkv_convert.runtime.ops import _HALVES_FROM, rotate_half

    x = torch.randn(1, _HALVES_FROM // (4 * 64) + 1, 4, 64, dtype=dtype, requires_grad=True)
    xt = x.transpose(1, 2)  # [B, heads, T, d] as the projections make it
    got, want = rotate_half(xt), hf_rotate_half(xt)
    assert xt.numel() >= _HALVES_FROM and torch.equal(got, want)
    weights = torch.randn_like(want)
    (g_got,) = torch.autograd.grad((got * weights).sum(), x)
    (g_want,) = torch.autograd.grad((want * weights).sum(), x)
    assert torch.equal(g_got, g_want)
