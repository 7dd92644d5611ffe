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
from rkv_convert.kernels.packed_kv import PackedKV
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from rkv_convert.kernels.decode_attention import (
    PreparedRotation,
    _plane_order,
    decode_attention,
    decode_attention_ref,
    head_kernel_supports,
    num_splits_for,
    prepare_rotation,
)
from rkv_convert.kernels._occupancy import wave_splits
from rkv_convert.kernels.decode_chunk import code_column_factors, keys_grouped_by_chunk
from rkv_convert.kernels.quantize_pack import perm_from_group_ids
from rkv_convert.quant.codec import rotate_groups
from rkv_convert.quant.hadamard import hadamard_matrix
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


_FP = ("fp_k", "fp_v", "fp_pos")


def _args(cache: tuple | list, kw: dict) -> tuple[PackedKV, dict]:
    """The kernels' arguments from a case's seven store tensors and keyword table (its ``fp_*`` entries are the segment)."""
    return PackedKV(*cache, *(kw.get(k) for k in _FP)), {k: v for k, v in kw.items() if k not in _FP}


def _call(fn, q: torch.Tensor, cache: tuple | list, kw: dict, **extra) -> torch.Tensor:
    kv, opts = _args(cache, kw)
    return fn(q, kv, **opts, **extra)


def _run(c: Case, *cache: torch.Tensor, **extra) -> torch.Tensor:
    """The Triton kernel on the test device (CUDA, else the CPU interpreter), result on CPU."""
    cache = cache or c.cache
    return _call(decode_attention, on_device(c.q), on_device(cache), on_device({**c.kw, **extra}), backend="triton").cpu()


def _f32(c: Case) -> dict:
    return {k: (v.float() if k in ("fp_k", "fp_v") else v) for k, v in c.kw.items()}


def _check(c: Case, out: torch.Tensor, num_splits: int | None = None) -> float:
    dtype = c.q.dtype
    assert out.dtype == dtype and out.shape == c.q.shape
    # references on the test device too (fp16 matmuls are slow on CPU); CUDA fp32 matmuls are full fp32
    ref = _call(decode_attention_ref, on_device(c.q.float()), on_device(c.cache), on_device(_f32(c))).cpu()
    err = (out.float() - ref).abs().max().item()
    low_err = 0.0
    if dtype != torch.float32:
        low = _call(decode_attention_ref, on_device(c.q), on_device(c.cache), on_device(c.kw), compute_dtype=dtype).cpu()
        low_err = (low.float() - ref).abs().max().item()
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    print(f"\n[{test}] max|kernel-ref32|={err:.3e} max|ref_lowp-ref32|={low_err:.3e} max|ref32|={ref.abs().max():.2f}")
    assert err <= 2 * low_err + ATOL[dtype], (err, low_err)
    return err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name: str, dtype: torch.dtype) -> None:
    c, num_splits = _named_case(CASES[name], dtype)
    _check(c, _run(c, num_splits=num_splits, kernel="head"))


def _named_case(cfg: dict, dtype: torch.dtype) -> tuple[Case, int | None]:
    """A case from a table entry (``num_splits``, when present, is a launch option, not a cache field)."""
    cfg = dict(cfg)
    num_splits = cfg.pop("num_splits", None)
    return make_case(dtype=dtype, **cfg), num_splits


@pytest.mark.parametrize("kernel", ["head", "chunk"])  # G = 1 with one key group per head: both apply
def test_split_count_does_not_matter(kernel: str) -> None:
    c = make_case(B=1, n_kv=2, rep=2, d=64, T=150, F=2)
    outs = [_run(c, num_splits=s, kernel=kernel) for s in (1, 2, 3)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("programs,n_blocks,slots", [(64, 256, 264), (256, 64, 264), (8, 256, 264), (1184, 66, 264),
                                                     (320, 40, 132), (5, 3, 264)])
def test_wave_splits_minimise_block_steps(programs: int, n_blocks: int, slots: int) -> None:
    """The split count whose grid takes the fewest block steps (waves x blocks per program), searched up to about
    eight waves; among ties the most splits within two waves, else the fewest."""
    def steps(s: int) -> int:
        return -(-programs * s // slots) * -(-n_blocks // s)
    best = wave_splits(programs, n_blocks, slots)
    s_max = next((s for s in range(1, n_blocks + 1) if programs * s >= 8 * slots), n_blocks)
    assert 1 <= best <= s_max
    ties = [s for s in range(1, s_max + 1) if steps(s) == steps(best)]
    assert all(steps(best) <= steps(s) for s in range(1, s_max + 1))
    within_two = [s for s in ties if programs * s <= 2 * slots]
    assert best == (max(within_two) if within_two else min(ties))
    even = -(-n_blocks // -(-n_blocks // best))  # the same blocks per split, no empty split
    assert num_splits_for(programs, 1, n_blocks * 16, 16, torch.device("cpu"), resident_per_sm=slots // 4) == even


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kernel", ["head", "chunk"])
def test_softcap_matches_reference(kernel: str, dtype: torch.dtype) -> None:
    """Gemma 2's soft-capped logits (``cap * tanh(sm_scale * q·k / cap)``): both kernels against the reference,
    with a cap small enough to bind (scores several times the cap), across two splits and the fp segment."""
    c = make_case(dtype=dtype, B=2, n_kv=2, rep=2, d=64, T=50, F=3, g_k=64, g_v=32, permute=kernel == "head")
    capped = Case(c.q, c.cache, {**c.kw, "softcap": 2.0})
    plain = _call(decode_attention_ref, c.q.float(), c.cache, _f32(c))
    assert (plain - _call(decode_attention_ref, c.q.float(), c.cache, _f32(capped))).abs().max() > 0.05  # the cap bites
    _check(capped, _run(capped, kernel=kernel, num_splits=2, block_t=16))


def test_softcap_must_be_positive() -> None:
    c = make_case(B=1, n_kv=1, rep=1, d=64, T=8)
    for backend in ("reference", "triton"):
        with pytest.raises(ValueError, match="softcap must be positive"):
            _call(decode_attention, on_device(c.q), on_device(c.cache), on_device({**c.kw, "softcap": 0.0}), backend=backend)


def test_head_kernel_refuses_fp32_tiles_beyond_shared_memory() -> None:
    """Head dim 256 with fp32 dot operands overflows a GPU's shared memory (measured on an H200): refused with
    the reason on CUDA, whatever the query dtype that leads there; fp16 operands and the interpreter run."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert "shared memory" in head_kernel_supports(d=256, dot_dtype=torch.float32, device=cuda)
    assert head_kernel_supports(d=256, dot_dtype=torch.float16, device=cuda) is None
    assert head_kernel_supports(d=128, dot_dtype=torch.float32, device=cuda) is None
    assert head_kernel_supports(d=256, dot_dtype=torch.float32, device=cpu) is None


def test_dense_rotation_path() -> None:
    """``factored=False``: the dense inverse rotation, even where a factorisation exists."""
    c = make_case(B=2, n_kv=2, rep=2, d=64, G=1, T=70, F=2, g_k=32)
    _check(c, _run(c, factored=False, kernel="head"))


def test_block_t_32() -> None:
    c = make_case(B=1, n_kv=3, rep=1, d=64, G=3, T=50, F=2, k_bits=3, g_k=64)
    _check(c, _run(c, block_t=32))


@pytest.mark.parametrize("kernel", ["head", "chunk"])
def test_strided_cache_views(kernel: str) -> None:
    """Cache tensors that are slices of preallocated buffers (token axis not the full extent)."""
    c = make_case(B=2, n_kv=2, rep=2, d=64, T=45, F=3)
    big = [torch.cat([t, t[:, :, :7]], 2) if t.dim() == 4 else torch.cat([t, t[:, :7]], 1) for t in c.cache]
    big = on_device(big)  # slice on the device: .to() would make the views contiguous
    views = [t[:, :, :45] if t.dim() == 4 else t[:, :45] for t in big]
    assert not views[0].is_contiguous()
    out = _run(c, *views, kernel=kernel)
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
    got = _call(decode_attention_ref, c.q, c.cache, kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dispatch_and_shape_checks() -> None:
    c = make_case(B=1, n_kv=2, rep=1, d=64, T=10)
    ref = _call(decode_attention, c.q, c.cache, c.kw, backend="reference")
    torch.testing.assert_close(ref, _call(decode_attention_ref, c.q, c.cache, c.kw), atol=0, rtol=0)
    auto = _call(decode_attention, on_device(c.q), on_device(c.cache), on_device(c.kw)).cpu()  # a kernel
    torch.testing.assert_close(auto, ref, atol=2e-5, rtol=1e-5)
    head = _call(decode_attention, on_device(c.q), on_device(c.cache), on_device(c.kw), kernel="head").cpu()
    torch.testing.assert_close(head, ref, atol=2e-5, rtol=1e-5)
    bad = list(c.cache)
    bad[4] = bad[4][..., :1]  # v_scale with one group instead of two
    with pytest.raises(ValueError):
        _call(decode_attention, c.q, bad, c.kw)
    with pytest.raises(ValueError):
        _call(decode_attention, c.q, c.cache, {**c.kw, "k_group_size": 48})


@pytest.mark.parametrize("kernel", ["head", "chunk"])
def test_no_valid_token_gives_zeros(kernel: str) -> None:
    c = make_case(B=2, n_kv=1, rep=1, d=64, T=20)
    c.cache[-1][1] = -1  # second sequence: every slot empty
    out = _run(c, kernel=kernel)
    ref = _call(decode_attention_ref, c.q, c.cache, c.kw)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


# Kronecker-factored inverse rotation (Sylvester rotations R = H_G ⊗ H_d): bits 2/3/4, with and
# without the fp segment, GQA and MHA, one and several key groups.
KRON_CASES = {
    "g2-d64-b2-mha-nofp": dict(B=2, n_kv=4, rep=1, d=64, G=2, T=40, F=0, k_bits=2, v_bits=2, g_k=64, g_v=32),
    "g4-d64-b3-gqa2-fp": dict(B=1, n_kv=4, rep=2, d=64, G=4, T=50, F=3, k_bits=3, v_bits=2, g_k=64, g_v=32),
    "g2-d128-b4-gqa3-fp": dict(B=2, n_kv=2, rep=3, d=128, G=2, T=45, F=3, k_bits=4, v_bits=4, g_k=128, g_v=64),
    "g4-d128-b2-mha-fp": dict(B=1, n_kv=4, rep=1, d=128, G=4, T=40, F=2, k_bits=2, v_bits=3, g_k=128, g_v=64),
    "g4-d128-b3-gqa2-nofp-1group": dict(B=1, n_kv=4, rep=2, d=128, G=4, T=60, F=0, k_bits=3, v_bits=2, g_k=512,
                                        g_v=128),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", list(KRON_CASES))
def test_factored_rotation_matches_reference(name: str, dtype: torch.dtype) -> None:
    cfg = KRON_CASES[name]
    c = make_case(dtype=dtype, **cfg)
    assert prepare_rotation(c.kw["rotation"], cfg["d"], dtype).factored
    _check(c, _run(c, factored=True, kernel="head"))  # factored=True raises if the rotation has no factorisation


def test_kernel_choice_is_checked() -> None:
    """An explicit kernel that does not cover the call is refused with its reason; the default covers it."""
    c = make_case(B=1, n_kv=3, rep=1, d=64, G=3, T=20, F=1, g_k=64)  # H192: not kron(H3, H64)
    with pytest.raises(ValueError, match="not Kronecker-factored"):
        _run(c, kernel="chunk")
    _check(c, _run(c))
    c = make_case(B=1, n_kv=2, rep=1, d=64, G=2, T=20, F=1, g_k=16)  # 8 key groups per head group
    with pytest.raises(ValueError, match="key groups are not the rotated head chunks"):
        _run(c, kernel="chunk")
    _check(c, _run(c))  # the default head kernel covers it
    with pytest.raises(ValueError, match="kernel must be"):
        _run(c, kernel="group")  # retired: no default path ran it


# The chunk kernel (kernels/rkv_kernels/decode_chunk.py): key groups = the rotated head chunks (no channel
# permutation), 2/4 bits, folded (g_v = d) and selected value groups, G = 1/2/4, MHA and GQA,
# holes, left padding, NaN garbage in empty slots, fp segment or not, fp-only, several splits.
CHUNK_CASES = {
    "paper-g4-d128-b2-fold-nanholes": dict(B=2, n_kv=8, rep=1, d=128, G=4, T=70, F=3, k_bits=2, v_bits=2,
                                           g_k=128, g_v=128, nan_holes=True),
    "g4-d128-b2-gqa4-fold-splits": dict(B=1, n_kv=4, rep=4, d=128, G=4, T=90, F=2, k_bits=2, v_bits=2, g_k=128,
                                        g_v=128, num_splits=3),
    "g2-d64-b4v2-gqa2-select": dict(B=2, n_kv=4, rep=2, d=64, G=2, T=45, F=3, k_bits=4, v_bits=2, g_k=64, g_v=32),
    "g2-d128-b2v4-mha-nofp": dict(B=2, n_kv=2, rep=1, d=128, G=2, T=40, F=0, k_bits=2, v_bits=4, g_k=128, g_v=128),
    "g1-d128-gqa4-fold": dict(B=2, n_kv=2, rep=4, d=128, G=1, T=50, F=2, k_bits=2, v_bits=2, g_k=128, g_v=128),
    "g4-d64-b2-select4-tiny": dict(B=2, n_kv=4, rep=1, d=64, G=4, T=3, F=2, k_bits=2, v_bits=2, g_k=64, g_v=16),
    "g2-d64-fp-only": dict(B=2, n_kv=2, rep=2, d=64, G=2, T=0, F=6, k_bits=2, v_bits=2, g_k=64, g_v=64),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(CHUNK_CASES))
def test_chunk_kernel_matches_reference(name: str, dtype: torch.dtype) -> None:
    cfg = dict(CHUNK_CASES[name])
    num_splits = cfg.pop("num_splits", None)
    c = make_case(dtype=dtype, permute=False, **cfg)
    out = _run(c, num_splits=num_splits, kernel="chunk")
    _check(c, out)
    if dtype == torch.float32:  # "auto" takes the chunk kernel for these layouts, and agrees with the head kernel
        assert torch.equal(_run(c, num_splits=num_splits, kernel="auto"), out)
        head = _run(c, num_splits=num_splits, kernel="head")
        torch.testing.assert_close(out, head, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [2, 4])
def test_chunk_kernel_large_full_precision_values(bits: int) -> None:
    """fp16 values up to ~60000 in the full-precision segment stay finite (the value accumulator is at
    true scale before they join it)."""
    c = make_case(B=1, n_kv=4, rep=1, d=64, G=2, T=40, F=4, k_bits=bits, v_bits=bits, g_k=64, g_v=64,
                  dtype=torch.float16, permute=False)  # fmt: skip
    c.kw["fp_v"] = (c.kw["fp_v"].float() * 3000).clamp(-6e4, 6e4).half()
    out = _run(c, kernel="chunk")
    assert torch.isfinite(out).all()
    ref = _call(decode_attention_ref, c.q.float(), c.cache, _f32(c))
    torch.testing.assert_close(out.float(), ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())  # fp16 output


def test_chunk_kernel_refuses_what_it_does_not_cover() -> None:
    c = make_case(B=1, n_kv=4, rep=1, d=64, G=2, T=20, F=1, g_k=64)  # calibrated permutation: groups cross chunks
    assert not keys_grouped_by_chunk(c.kw["k_gid"], 64)
    with pytest.raises(ValueError, match="--permutation none"):
        _run(c, kernel="chunk")
    assert torch.equal(_run(c, kernel="auto"), _run(c, kernel="head"))  # auto falls back to the head kernel
    c = make_case(B=1, n_kv=4, rep=1, d=64, G=2, T=20, F=1, g_k=64, k_bits=3, v_bits=3, permute=False)
    with pytest.raises(ValueError, match="3-bit"):
        _run(c, kernel="chunk")
    c = make_case(B=1, n_kv=3, rep=1, d=64, G=3, T=20, F=1, g_k=64, permute=False)  # H192: not kron(H3, H64)
    with pytest.raises(ValueError, match="not Kronecker-factored"):
        _run(c, kernel="chunk")


def test_prepared_rotation_records_chunk_groups() -> None:
    """prepare_rotation(k_gid=) decides the chunk condition once; "auto" trusts it only for that same tensor."""
    c = make_case(B=1, n_kv=4, rep=1, d=64, G=2, T=30, F=1, g_k=64, permute=False)
    rot, gid = on_device(c.kw["rotation"]), on_device(c.kw["k_gid"])
    prep = prepare_rotation(rot, 64, torch.float32, k_gid=gid)
    assert prep.keys_by_chunk is True and prep.k_gid is gid
    assert prepare_rotation(rot, 64, torch.float32).keys_by_chunk is None
    out = _run(c, rotation=prep, k_gid=gid, kernel="auto")
    assert torch.equal(out, _run(c, kernel="chunk"))
    assert torch.equal(_run(c, rotation=prepare_rotation(rot, 64, torch.float32), kernel="auto"),
                       _run(c, kernel="head"))  # no recorded ids: no per-call check, the head kernel


@pytest.mark.parametrize("bits", [2, 4])
def test_code_column_factors_undo_in_place_codes(bits: int) -> None:
    """Codes left in place within their byte, times the factors, are the codes (every channel of a word)."""
    per_word = 32 // bits
    codes = torch.randint(0, 2**bits, (per_word,))
    word = sum(int(c) << (bits * i) for i, c in enumerate(codes))
    in_place = torch.tensor([(word >> (8 * (i // (8 // bits)))) & (((1 << bits) - 1) << (bits * (i % (8 // bits))))
                             for i in range(per_word)], dtype=torch.float32)  # fmt: skip
    torch.testing.assert_close(in_place * code_column_factors(bits, per_word, torch.device("cpu")), codes.float())


@pytest.mark.parametrize("n,d,factored", [(512, 128, True), (256, 64, True), (128, 64, True), (64, 64, True),
                                          (192, 64, False), (384, 128, False)])
def test_prepare_rotation_detects_kronecker_factors(n: int, d: int, factored: bool) -> None:
    r = hadamard_matrix(n)
    prep = prepare_rotation(r, d, torch.float32)
    assert isinstance(prep, PreparedRotation) and prep.factored is factored
    assert prep.head_dim == d and prep.group_heads == n // d and prep.dot_dtype == torch.float32
    order = _plane_order(n, d, r.device)
    torch.testing.assert_close(prep.rtp[torch.argsort(order)], r.T, atol=0, rtol=0)  # plane-ordered R^T
    if not factored:  # e.g. 192 = H_12 ⊗ H_16 is not H_3 ⊗ H_64: the dense path (tested in CASES)
        assert prep.a is None and prep.btp is None
        return
    G = n // d
    assert prep.a.shape == (G, G) and prep.a.dtype == torch.float32 and prep.btp.shape == (d, d)
    b = prep.btp[torch.argsort(_plane_order(d, d, r.device))].T.contiguous()  # undo the plane order of B^T
    torch.testing.assert_close(torch.kron(prep.a, b), r, atol=1e-6, rtol=0)
    torch.testing.assert_close(prep.a @ prep.a.T, torch.eye(G), atol=1e-6, rtol=0)  # orthonormal factors
    half = prepare_rotation(r, d, torch.float16)
    assert half.factored and half.btp.dtype == torch.float16 and half.rtp.dtype == torch.float16
    assert prepare_rotation(r, d, torch.bfloat16).dot_dtype == torch.float32  # bf16 queries: tf32 dots


def test_prepare_rotation_rejects_non_kronecker() -> None:
    q, _ = torch.linalg.qr(torch.randn(128, 128, dtype=torch.float64))
    assert not prepare_rotation(q.float(), 64, torch.float32).factored  # a generic rotation
    r = hadamard_matrix(256)
    r[0, 0] += 1e-3  # one perturbed entry breaks kron(A, B)
    assert not prepare_rotation(r, 64, torch.float32).factored
    with pytest.raises(ValueError):
        prepare_rotation(hadamard_matrix(192), 128, torch.float32)  # 128 does not divide 192


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.float16, 3e-3)])
def test_factored_and_dense_paths_agree(dtype: torch.dtype, atol: float) -> None:
    c = make_case(B=1, n_kv=4, rep=2, d=128, G=4, T=40, F=2, k_bits=3, v_bits=2, g_k=128, g_v=64, dtype=dtype)
    fac, dense = _run(c, factored=True), _run(c, factored=False)
    torch.testing.assert_close(fac.float(), dense.float(), atol=atol, rtol=0)
    _check(c, dense)


@pytest.mark.parametrize("G", [1, 2, 3])
def test_prepared_rotation_equals_raw(G: int) -> None:
    c = make_case(B=2, n_kv=2 * G, rep=2, d=64, G=G, T=40, F=2, k_bits=2, g_k=64, dtype=torch.float16)
    prep = prepare_rotation(on_device(c.kw["rotation"]), 64, torch.float16)
    assert prep.factored is (G != 3)
    raw = _run(c, kernel="head")  # G = 1 with one key group per head would otherwise take the chunk kernel
    assert torch.equal(_run(c, rotation=prep, kernel="head"), raw)
    kw = {**c.kw, "rotation": prep}
    ref = _call(decode_attention, c.q, c.cache, kw, backend="reference")  # the reference takes it too
    torch.testing.assert_close(ref, _call(decode_attention_ref, c.q, c.cache, c.kw), atol=0, rtol=0)
    with pytest.raises(ValueError):  # prepared for fp16 queries, called with fp32 ones
        _run(Case(c.q.float(), c.cache, c.kw), rotation=prep)
    if G == 3:
        with pytest.raises(ValueError):
            _run(c, rotation=prep, factored=True)


GPU_CASES = {
    "llama-like-gqa4-d128-4k": dict(B=4, n_kv=8, rep=4, d=128, G=1, T=4096, F=8, k_bits=2, v_bits=2, g_k=128, g_v=128),
    "paper-G4-d128-2k": dict(B=2, n_kv=8, rep=1, d=128, G=4, T=2048, F=8, k_bits=2, v_bits=2, g_k=128, g_v=64),
    "smollm2-G3-d64-3k": dict(B=3, n_kv=3, rep=3, d=64, G=3, T=3000, F=5, k_bits=3, v_bits=3, g_k=64, g_v=32),
}


GPU_CHUNK_CASES = {
    "paper-G4-d128-by-chunk-4k": dict(B=2, n_kv=8, rep=1, d=128, G=4, T=4096, F=8, k_bits=2, v_bits=2, g_k=128,
                                      g_v=128, permute=False),
    "llama3-G4-gqa4-by-chunk-4k": dict(B=2, n_kv=8, rep=4, d=128, G=4, T=4096, F=137, k_bits=2, v_bits=2, g_k=128,
                                       g_v=128, permute=False),
    "G2-d128-b4-by-chunk-2k": dict(B=2, n_kv=4, rep=2, d=128, G=2, T=2048, F=8, k_bits=4, v_bits=4, g_k=128,
                                   g_v=64, permute=False),
}


GPU_CHUNK_PARAMS = [(name, torch.float16) for name in GPU_CHUNK_CASES] + [
    ("paper-G4-d128-by-chunk-4k", torch.bfloat16),
    ("paper-G4-d128-by-chunk-4k", torch.float32),
]  # each dtype and tile is a compilation of about 20 s on the GPU machine: a small matrix


@pytest.mark.gpu
@pytest.mark.parametrize("name,dtype", GPU_CHUNK_PARAMS)
def test_gpu_chunk_kernel(name: str, dtype: torch.dtype) -> None:
    c = make_case(dtype=dtype, **GPU_CHUNK_CASES[name])
    out = _run(c, kernel="chunk")
    err = _check(c, out)
    if dtype == torch.float16:  # a small tile takes mma.sync instead of wgmma
        other = _run(c, kernel="chunk", block_t=16, num_warps=4)
        assert (other.float() - out.float()).abs().max().item() <= 2 * err + ATOL[dtype]  # so within 3 err of ref


GPU_PARAMS = [(name, torch.float16) for name in GPU_CASES] + [
    ("llama-like-gqa4-d128-4k", torch.bfloat16),
    ("llama-like-gqa4-d128-4k", torch.float32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name,dtype", GPU_PARAMS)
def test_gpu_large(name: str, dtype: torch.dtype) -> None:
    c = make_case(dtype=dtype, **GPU_CASES[name])
    _check(c, _run(c, kernel="head"))  # the chunk kernel: test_gpu_chunk_kernel


@pytest.mark.parametrize("G,d,g_k", [(3, 64, 64), (4, 64, 64), (2, 128, 128), (1, 128, 64)])
def test_several_key_groups_match_reference(G: int, d: int, g_k: int) -> None:
    """Two to four key groups per head group: per-channel scales and zeros by the exact one-hot dot."""
    c = make_case(B=2, n_kv=G, rep=2, d=d, G=G, T=45, F=3, g_k=g_k, k_bits=2, v_bits=3)
    _check(c, _run(c, kernel="head"))
