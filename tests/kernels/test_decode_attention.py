"""decode_attention: Triton kernel (interpreter on CPU) against the pure-torch reference.

Tolerances follow the dtype: fp32 tight; fp16/bf16 queries: the kernel's error against the
fp32 reference is at most 2x the error of the reference computed with the same low-precision
matmul operands, plus a small atol.
"""

from __future__ import annotations

import os

import pytest
import torch
from _cache_factory import Case, make_case, on_device
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from rkv_convert.kernels.decode_attention import decode_attention, decode_attention_ref
from rkv_convert.kernels.quantize_pack import perm_from_group_ids
from rkv_convert.quant.codec import rotate_groups
from rkv_convert.quant.packing import unpack_codes
from rkv_convert.quant.quantizer import QuantizedTensor, dequantize

ATOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

CASES = {
    # id: make_case kwargs (+ optional num_splits)
    "mha-d64-b2-nofp": dict(B=2, n_kv=2, rep=1, d=64, G=1, T=40, F=0, k_bits=2, v_bits=2, g_k=64, g_v=32),
    "gqa3-h192-b3-fp": dict(B=2, n_kv=3, rep=3, d=64, G=3, T=37, F=5, k_bits=3, v_bits=3, g_k=64, g_v=32),
    "gqa4-d128-b4v3-fp": dict(B=2, n_kv=2, rep=4, d=128, G=1, T=100, F=3, k_bits=4, v_bits=3, g_k=32, g_v=64),
    "g2-d64-b3v4-g128-nanholes": dict(B=2, n_kv=4, rep=1, d=64, G=2, T=70, F=2, k_bits=3, v_bits=4, g_k=128,
                                      g_v=64, nan_holes=True),
    "g2-d128-b2-g128": dict(B=1, n_kv=2, rep=2, d=128, G=2, T=20, F=4, k_bits=2, v_bits=2, g_k=128, g_v=64),
    "long-splits": dict(B=1, n_kv=1, rep=4, d=64, G=1, T=333, F=3, k_bits=2, v_bits=2, g_k=32, g_v=32, num_splits=5),
    "auto-splits": dict(B=2, n_kv=1, rep=1, d=64, G=1, T=200, F=1, k_bits=2, v_bits=2, g_k=64, g_v=64),
    "fp-only": dict(B=2, n_kv=2, rep=2, d=64, G=1, T=0, F=6, k_bits=2, v_bits=2, g_k=64, g_v=32),
    "tiny-T": dict(B=2, n_kv=2, rep=3, d=64, G=2, T=3, F=2, k_bits=2, v_bits=2, g_k=32, g_v=32),
}


def _run(c: Case, *cache: torch.Tensor, **extra) -> torch.Tensor:
    """The Triton kernel on the test device (CUDA, else the CPU interpreter), result on CPU."""
    cache = cache or c.cache
    return decode_attention(on_device(c.q), *on_device(cache), backend="triton", **on_device({**c.kw, **extra})).cpu()


def _f32(c: Case) -> dict:
    return {k: (v.float() if k in ("fp_k", "fp_v") else v) for k, v in c.kw.items()}


def _check(c: Case, out: torch.Tensor, num_splits: int | None = None) -> float:
    dtype = c.q.dtype
    assert out.dtype == dtype and out.shape == c.q.shape
    # references on the test device too (fp16 matmuls are slow on CPU); CUDA fp32 matmuls are full fp32
    ref = decode_attention_ref(on_device(c.q.float()), *on_device(c.cache), **on_device(_f32(c))).cpu()
    err = (out.float() - ref).abs().max().item()
    low_err = 0.0
    if dtype != torch.float32:
        low = decode_attention_ref(on_device(c.q), *on_device(c.cache), compute_dtype=dtype, **on_device(c.kw)).cpu()
        low_err = (low.float() - ref).abs().max().item()
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    print(f"\n[{test}] max|kernel-ref32|={err:.3e} max|ref_lowp-ref32|={low_err:.3e} max|ref32|={ref.abs().max():.2f}")
    assert err <= 2 * low_err + ATOL[dtype], (err, low_err)
    return err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name: str, dtype: torch.dtype) -> None:
    cfg = dict(CASES[name])
    num_splits = cfg.pop("num_splits", None)
    c = make_case(dtype=dtype, **cfg)
    out = _run(c, num_splits=num_splits)
    _check(c, out)


def test_split_count_does_not_matter() -> None:
    c = make_case(B=1, n_kv=2, rep=2, d=64, T=150, F=2)
    outs = [_run(c, num_splits=s) for s in (1, 2, 3)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=2e-6, rtol=1e-5)


def test_hoisted_rotation_off() -> None:
    c = make_case(B=2, n_kv=2, rep=2, d=64, G=1, T=70, F=2, g_k=32)
    _check(c, _run(c, hoist_rotation=False))


def test_block_t_32() -> None:
    c = make_case(B=1, n_kv=3, rep=1, d=64, G=3, T=50, F=2, k_bits=3, g_k=64)
    _check(c, _run(c, block_t=32))


def test_strided_cache_views() -> None:
    """Cache tensors that are slices of preallocated buffers (token axis not the full extent)."""
    c = make_case(B=2, n_kv=2, rep=2, d=64, T=45, F=3)
    big = [torch.cat([t, t[:, :, :7]], 2) if t.dim() == 4 else torch.cat([t, t[:, :7]], 1) for t in c.cache]
    big = on_device(big)  # slice on the device: .to() would make the views contiguous
    views = [t[:, :, :45] if t.dim() == 4 else t[:, :45] for t in big]
    assert not views[0].is_contiguous()
    out = _run(c, *views)
    _check(c, out)


def test_reference_matches_codec_and_hf_attention() -> None:
    """The reference equals: project dequantizer + codec unrotation + HF RoPE/repeat_kv + SDPA."""
    B, n_kv, rep, d, G, T, F, g_k, g_v = 2, 3, 2, 64, 3, 21, 3, 64, 32
    c = make_case(B=B, n_kv=n_kv, rep=rep, d=d, G=G, T=T, F=F, g_k=g_k, g_v=g_v, k_bits=3, v_bits=2)
    kc, ks, kz, vc, vs, vz, pos = c.cache
    kw = c.kw
    Gd = G * d
    perm = perm_from_group_ids(kw["k_gid"][0], g_k)  # one head group here
    q_k = QuantizedTensor(unpack_codes(kc, 3, Gd), ks, kz, 3, g_k, perm)
    y = dequantize(q_k)  # [B, 1, T, Gd]
    k = (rotate_groups(y, kw["rotation"], inverse=True) + kw["k_mean"]).reshape(B, T, n_kv, d).transpose(1, 2)
    k = k.reshape(B, n_kv, T, d)
    v = dequantize(QuantizedTensor(unpack_codes(vc, 2, d), vs, vz, 2, g_v))
    k = torch.cat([k, kw["fp_k"]], 2)
    v = torch.cat([v, kw["fp_v"]], 2)
    p_all = torch.cat([pos, kw["fp_pos"]], 1)
    ang = p_all.float()[..., None] * kw["inv_freq"]
    emb = torch.cat([ang, ang], -1)
    k = apply_rotary_pos_emb(k, k, emb.cos(), emb.sin(), unsqueeze_dim=1)[0]
    mask = (p_all >= 0)[:, None, None, :]
    want = torch.nn.functional.scaled_dot_product_attention(
        c.q[:, :, None], repeat_kv(k, rep), repeat_kv(v, rep), attn_mask=mask, scale=kw["sm_scale"]
    )[:, :, 0]
    got = decode_attention_ref(c.q, *c.cache, **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dispatch_and_shape_checks() -> None:
    c = make_case(B=1, n_kv=2, rep=1, d=64, T=10)
    ref = decode_attention(c.q, *c.cache, backend="reference", **c.kw)
    torch.testing.assert_close(ref, decode_attention_ref(c.q, *c.cache, **c.kw), atol=0, rtol=0)
    auto = decode_attention(on_device(c.q), *on_device(c.cache), **on_device(c.kw)).cpu()  # the kernel
    torch.testing.assert_close(auto, ref, atol=2e-5, rtol=1e-5)
    bad = list(c.cache)
    bad[4] = bad[4][..., :1]  # v_scale with one group instead of two
    with pytest.raises(ValueError):
        decode_attention(c.q, *bad, **c.kw)
    with pytest.raises(ValueError):
        decode_attention(c.q, *c.cache, **{**c.kw, "k_group_size": 48})


def test_no_valid_token_gives_zeros() -> None:
    c = make_case(B=2, n_kv=1, rep=1, d=64, T=20)
    c.cache[-1][1] = -1  # second sequence: every slot empty
    out = _run(c)
    ref = decode_attention_ref(c.q, *c.cache, **c.kw)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


GPU_CASES = {
    "llama-like-gqa4-d128-4k": dict(B=4, n_kv=8, rep=4, d=128, G=1, T=4096, F=8, k_bits=2, v_bits=2, g_k=128, g_v=128),
    "paper-G4-d128-2k": dict(B=2, n_kv=8, rep=1, d=128, G=4, T=2048, F=8, k_bits=2, v_bits=2, g_k=128, g_v=64),
    "smollm2-G3-d64-3k": dict(B=3, n_kv=3, rep=3, d=64, G=3, T=3000, F=5, k_bits=3, v_bits=3, g_k=64, g_v=32),
}


GPU_PARAMS = [(name, torch.float16) for name in GPU_CASES] + [
    ("llama-like-gqa4-d128-4k", torch.bfloat16),
    ("llama-like-gqa4-d128-4k", torch.float32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name,dtype", GPU_PARAMS)
def test_gpu_large(name: str, dtype: torch.dtype) -> None:
    c = make_case(dtype=dtype, **GPU_CASES[name])
    _check(c, _run(c))
