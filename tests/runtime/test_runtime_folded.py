"""The folded (query-folded, post-RoPE) key layout in the runtime: stock prefill, decode against the
evaluation codec, the multi-token path, and the Triton kernel (interpreter on CPU) inside generation."""

import pytest
import torch
from reference_handler import EvalReference
from rkv_fixtures import decode_logits, make_checkpoint
from test_attention import (
    _prompt,
    _run,
    check_decode_against_reference,
    check_multi_token_step_against_reference,
    check_prefill_is_the_stock_model,
)
from tiny_models import FAMILIES, tiny_model

from rkv_convert.quant.codec import FoldedKeyCodec
from rkv_convert.runtime.attention import rkv_attention, stored_tokens
from rkv_convert.runtime.cache import CacheSettings, RkvCache
from rkv_convert.runtime.ops import rope


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_prefill_is_the_stock_model(family: str) -> None:
    model = tiny_model(family)
    layer = check_prefill_is_the_stock_model(model, key_layout="folded").layers[0]
    assert layer.codec.folded and layer.k_codes.shape[1] == model.config.num_key_value_heads


@pytest.mark.parametrize(
    "family,head_dim,n_kv,bits,pad,settings",
    [
        ("llama", 64, 2, 2, 0, CacheSettings(recent_window=4, flush_block=4, max_sinks=2)),
        ("qwen3", 128, 2, 2, 6, CacheSettings(recent_window=3, flush_block=2, max_sinks=1)),
        ("qwen2", 64, 1, 3, 3, CacheSettings(recent_window=0, flush_block=1, max_sinks=0)),
        ("mistral", 128, 4, 4, 0, CacheSettings(recent_window=8, flush_block=8, max_sinks=4)),
    ],
)
def test_folded_decode_matches_evaluation_reference(family, head_dim, n_kv, bits, pad, settings) -> None:
    check_decode_against_reference(tiny_model(family, head_dim=head_dim, n_kv=n_kv), bits, pad, settings, key_layout="folded")


@pytest.mark.parametrize("ranges", ["minmax", "searched"])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_log8_group_metadata_decode_matches_evaluation_reference(backend: str, ranges: str) -> None:
    """8-bit group metadata and mixed key widths, with min-max or searched group ranges: the packed cache
    (reference ops, or the Triton kernels: CUDA or the interpreter) decodes as the evaluation codecs do, and its
    scale and zero codes are what they store."""
    model = tiny_model("llama", head_dim=64, n_kv=2)
    ckpt = make_checkpoint(model, bits=2, key_group_size=32, value_group_size=16, sink_quantile=0.9,
                           key_layout="folded", group_meta="log8")  # fmt: skip
    ckpt.config.group_ranges = ranges
    ckpt.config.key_bits = [3] + [2] * (ckpt.config.num_layers - 1)
    ckpt.config.value_bits = [2] * ckpt.config.num_layers
    settings = CacheSettings(recent_window=4, flush_block=4, max_sinks=2)
    ids, mask = _prompt(pad=3)
    cache = RkvCache.from_checkpoint(ckpt, model, settings, backend=backend)
    got = _run(model, rkv_attention, ids, mask, steps=8, cache=cache)
    want = _run(model, EvalReference(model, ckpt, settings), ids, mask, steps=8)
    tol = 1e-4 if backend == "reference" else 1e-3
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    layer = cache.layers[0]
    assert layer.n_quant > 0 and layer.codec.key_bits == 3 and layer.codec.ranges.value == ranges
    assert layer.k_scale.dtype == torch.uint8 and layer.k_zero.dtype == torch.int8 and layer.v_zero.dtype == torch.int8
    used = layer.k_scale[:, :, : layer.n_quant].transpose(1, 2)[layer.pos[:, : layer.n_quant] >= 0]
    assert 0 < used.min() and used.max() < 255  # the calibrated base keeps the scale codes inside their range
    # bytes per slot: 2 B of metadata per group instead of 4
    quant, _ = layer._slot_bytes()
    d, n_kv = 64, 2
    assert quant == n_kv * (d * 3 // 8 + 2 * (d // 32)) + n_kv * (d * 2 // 8 + 2 * (d // 16)) + 4


def test_folded_multi_token_step_matches_reference() -> None:
    check_multi_token_step_against_reference(tiny_model("llama"), key_layout="folded")


def test_folded_store_decodes_to_the_evaluation_codec() -> None:
    """stored_tokens (runtime.ops.dequantize_folded_keys) = FoldedKeyCodec round trip, post-RoPE."""
    model = tiny_model("qwen2", layers=1)
    ckpt = make_checkpoint(model, bits=2, key_group_size=32, value_group_size=16, max_sinks=0, key_layout="folded")
    cache = RkvCache.from_checkpoint(ckpt, model, CacheSettings(recent_window=4, flush_block=4, max_sinks=0),
                                     backend="reference")  # fmt: skip
    k_pre = torch.randn(2, 2, 20, 64) * 2 + 0.5
    v = torch.randn(2, 2, 20, 64)
    pos = torch.arange(3, 23)[None].expand(2, 20)
    layer = cache.layers[0]
    inv_freq, scaling = layer.rope
    k_post = rope(k_pre, pos, inv_freq, scaling)
    layer.append(k_post, v, pos)
    layer.flush()
    assert layer.n_quant == 16
    keys, _, got_pos = stored_tokens(layer)
    rotary = model.model.rotary_emb
    cos, sin = rotary(k_pre, pos)
    layer_t = ckpt.layers[0]
    codec = FoldedKeyCodec(layer_t.key_mean, ckpt.key_rotation, layer_t.key_perm, 2, 32, layer_t.key_clip)
    want = codec.roundtrip(k_pre, cos, sin)
    torch.testing.assert_close(keys[:, :, :16], want[:, :, :16], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys[:, :, -4:], k_post[:, :, 16:], rtol=0, atol=0)  # the window: post-RoPE as given
    # codes and scales bit-exact against the codec's quantizer
    q = codec.encode(k_pre[:, :, :16], cos[:, :16], sin[:, :16])
    assert torch.equal(layer.k_scale[:, :, :16], q.scale) and torch.equal(layer.k_zero[:, :, :16], q.zero)


@pytest.mark.parametrize("head_dim,n_kv", [(64, 2), (128, 1)])
def test_folded_triton_kernel_path_matches_reference_backend(head_dim: int, n_kv: int) -> None:
    """backend='auto': decode_folded's Triton kernel (CUDA, or the interpreter on CPU) inside generation."""
    model = tiny_model("llama", layers=1, head_dim=head_dim, n_kv=n_kv)
    ckpt = make_checkpoint(model, bits=2, key_group_size=32, value_group_size=32, key_layout="folded")
    settings = CacheSettings(recent_window=4, flush_block=4, max_sinks=2)
    ids, mask = _prompt(t=14, pad=3)
    ref = _run(model, rkv_attention, ids, mask, steps=3, cache=RkvCache.from_checkpoint(ckpt, model, settings, backend="reference"))
    got = _run(model, rkv_attention, ids, mask, steps=3, cache=RkvCache.from_checkpoint(ckpt, model, settings, backend="auto"))
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    want = _run(model, EvalReference(model, ckpt, settings), ids, mask, steps=3)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("family,head_dim,n_kv", [("llama", 64, 2), ("qwen3", 128, 4)])
def test_folded_triton_runtime_matches_reference_backend_on_cuda(dtype, family, head_dim, n_kv) -> None:
    model = tiny_model(family, head_dim=head_dim, n_kv=n_kv, n_heads=2 * n_kv)
    ckpt = make_checkpoint(model, bits=2, key_group_size=32, value_group_size=32, key_layout="folded")
    model = model.to("cuda", dtype)
    settings = CacheSettings(recent_window=8, flush_block=8, max_sinks=2)
    ids = torch.randint(0, 128, (3, 70), device="cuda")

    def logits(backend: str, feed: torch.Tensor | None = None) -> torch.Tensor:
        return decode_logits(model, RkvCache.from_checkpoint(ckpt, model, settings, backend=backend), ids, 16, feed)

    ref = logits("reference")
    got = logits("triton", feed=ref[:, :-1].argmax(-1))
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
