"""decode_folded: Triton kernel (interpreter on CPU) against its pure-torch reference; the folding algebra.

Tolerances follow the dtype: fp32 tight; fp16/bf16 queries: the kernel's error against the fp32
reference is at most 2x the error of the reference computed with low-precision matmul operands,
plus a small atol.
"""

from __future__ import annotations

import dataclasses

import os

import pytest
import torch

from _cache_factory import fold_keys_pre, quantize_folded
from rkv_convert.kernels._common import triton_interpreting
from rkv_convert.kernels.decode_folded import (
    _query_prep,
    _whole_blocks,
    bias_scale,
    decode_folded,
    decode_folded_ref,
    folded_scores_ref,
    mean_scores_ref,
    rotate_queries,
    round_query_int8,
)
from rkv_convert.kernels.folded_params import FoldedParams
from rkv_convert.kernels.packed_kv import PackedKV
from rkv_convert.quant.hadamard import hadamard_matrix
from rkv_convert.quant.packing import pack_codes
from rkv_convert.quant.quantizer import fake_quantize, meta_scale_base, quantize
from rkv_convert.runtime.ops import rope

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ATOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _rotations(n_kv: int, d: int) -> torch.Tensor:
    """Per head: a Hadamard times a channel permutation (head 1: a random orthogonal matrix)."""
    rots = [hadamard_matrix(d)[:, torch.randperm(d)] for _ in range(n_kv)]
    if n_kv > 1:
        rots[1] = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0].float()
    return torch.stack(rots)


def make_case(*, B: int = 2, n_kv: int = 2, rep: int = 1, d: int = 64, T: int = 40, F: int = 0, bits: int = 2,
              v_bits: int | None = None, g_k: int = 64, g_v: int = 64, dtype: torch.dtype = torch.float32,
              pos0: int = 0, gap: bool = False, nan_holes: bool = False, spare: int = 0, att: float = 1.0,
              meta8: bool = False) -> tuple[torch.Tensor, PackedKV, FoldedParams]:  # fmt: skip
    """Random keys with a large shared mean and outlier channels, left padding in batch 1, a hole in
    batch 0 (``gap``: its positions also jump by 7 halfway), ``spare`` unused slots past ``T``;
    ``meta8``: scales and zeros as 8-bit codes (bases from the data's largest group ranges)."""
    v_bits = bits if v_bits is None else v_bits
    cap = T + spare
    mean = torch.randn(n_kv, d) * 2.0
    scale = torch.ones(d)
    scale[torch.randperm(d)[:3]] = 6.0
    k = mean[None, :, None, :] + torch.randn(B, n_kv, cap + F, d) * scale + 0.3 * torch.randn(d)
    v = torch.randn(B, n_kv, cap + F, d) * 0.5 + 0.1 * torch.randn(d)
    pos = torch.arange(cap, dtype=torch.int32).repeat(B, 1) + pos0
    if gap:
        pos[0, T // 2:] += 7
    if B > 1:
        pad = T // 3
        pos[1, :pad] = -1
        pos[1, pad:] -= pad
    if T > 5:
        pos[0, 5] = -1
    pos[:, T:] = -1
    rotation = _rotations(n_kv, d)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    bases = None
    if meta8:
        y = fold_keys_pre(k[:, :, :cap], pos, mean, rotation, inv_freq, att)
        bases = (meta_scale_base(_largest_range(y, g_k), bits, 0.9), meta_scale_base(_largest_range(v, g_v), v_bits, 0.9))
    if cap:
        kc, ks, kz = quantize_folded(k[:, :, :cap], pos, mean, rotation, inv_freq, att, bits, g_k, clip=0.9,
                                     meta_base=bases and bases[0])  # fmt: skip
        vq = quantize(v[:, :, :cap], v_bits, g_v, 0.9, meta_base=bases and bases[1])
        vc, vs, vz = pack_codes(vq.codes, v_bits), vq.scale, vq.zero
    else:
        kc, ks, kz = torch.empty(B, n_kv, 0, d * bits // 8, dtype=torch.uint8), *torch.empty(2, B, n_kv, 0, d // g_k).half()
        vc, vs, vz = torch.empty(B, n_kv, 0, d * v_bits // 8, dtype=torch.uint8), *torch.empty(2, B, n_kv, 0, d // g_v).half()
    if nan_holes:
        hole = (pos < 0)[:, None, :].expand(B, n_kv, cap)
        ks[hole] = float("nan")
        vs[hole] = float("nan")
    fp = (None, None, None)
    if F:
        last = pos.max(1, keepdim=True).values if cap else torch.zeros(B, 1, dtype=torch.int32)
        fp_pos = (last + 1 + torch.arange(F, dtype=torch.int32)).to(torch.int32)
        fp_pos[:, min(1, F - 1)] = -1  # an empty scratch slot
        kf = k[:, :, cap:].clone()
        kf[:, :, 0] *= 3.0  # a sink-like token far from the mean
        fp = (rope(kf, fp_pos.clamp_min(0), inv_freq, att).to(dtype), v[:, :, cap:].to(dtype), fp_pos)
    kv = PackedKV(kc, ks, kz, vc, vs, vz, pos, *fp)
    params = FoldedParams(rotation=rotation, mean=mean, inv_freq=inv_freq, attention_scaling=att,
                          sm_scale=d**-0.5, bits=bits, g_k=g_k, g_v=g_v, v_bits=v_bits, meta_bases=bases)
    q = (torch.randn(B, n_kv * rep, d) * 0.7).to(dtype)
    return q, kv, params


def _largest_range(x: torch.Tensor, group: int) -> float:
    g = x.float().unflatten(-1, (-1, group))
    return float((g.amax(-1) - g.amin(-1)).max()) if g.numel() else 1.0


def _dev(x):
    return x.to(DEV) if isinstance(x, (torch.Tensor, PackedKV, FoldedParams)) else x


def _run(q, kv, params, **kw) -> torch.Tensor:
    return decode_folded(_dev(q), _dev(kv), _dev(params), backend="triton", **kw).cpu()


def _f32(kv: PackedKV) -> PackedKV:
    return kv._replace(fp_k=None if kv.fp_k is None else kv.fp_k.float(), fp_v=None if kv.fp_v is None else kv.fp_v.float())


def _check(q, kv, params, out, n_tokens=None) -> float:
    dtype = q.dtype
    assert out.dtype == dtype and out.shape == q.shape
    ref = decode_folded_ref(_dev(q.float()), _dev(_f32(kv)), _dev(params), n_tokens=n_tokens, query_int8=False).cpu()
    err = (out.float() - ref).abs().max().item()
    low_err = 0.0
    if dtype != torch.float32:
        low = decode_folded_ref(_dev(q), _dev(kv), _dev(params), n_tokens=n_tokens, compute_dtype=dtype).cpu()
        low_err = (low.float() - ref).abs().max().item()
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    print(f"\n[{test}] max|kernel-ref32|={err:.3e} max|ref_lowp-ref32|={low_err:.3e} max|ref32|={ref.abs().max():.2f}")
    assert torch.isfinite(out).all()
    assert err <= 2 * low_err + ATOL[dtype], (err, low_err)
    return err


CASES = {
    "gqa4-d128-g64-fp": dict(B=2, n_kv=2, rep=4, d=128, T=70, F=5, g_k=64, g_v=64),
    "smollm2-d64-rep3": dict(B=2, n_kv=3, rep=3, d=64, T=45, F=4, g_k=32, g_v=64),
    "mha-d64-g32-nofp": dict(B=2, n_kv=2, rep=1, d=64, T=50, F=0, g_k=32, g_v=32),
    "b3-gap": dict(B=2, n_kv=1, rep=2, d=64, T=60, F=3, bits=3, g_k=64, g_v=32, gap=True),
    "b4v2-nanholes": dict(B=2, n_kv=2, rep=2, d=64, T=40, F=2, bits=4, v_bits=2, g_k=32, g_v=64, nan_holes=True),
    "gemma-d256-rep2": dict(B=2, n_kv=1, rep=2, d=256, T=40, F=3, g_k=32, g_v=32),  # the smaller tiles of d = 256
    # head dim 128 at 3 and 4 bits: fp16 takes the integer key dots with codes unpacked by conversion
    "d128-b3": dict(B=2, n_kv=1, rep=2, d=128, T=40, F=2, bits=3, g_k=64, g_v=64),
    "d128-b4v3-g32": dict(B=1, n_kv=2, rep=1, d=128, T=35, F=2, bits=4, v_bits=3, g_k=32, g_v=64),
    # 8-bit group metadata (uint8 scale codes, int8 zero codes)
    "meta8-gqa4-d128": dict(B=2, n_kv=2, rep=4, d=128, T=70, F=5, g_k=64, g_v=64, meta8=True),
    "meta8-d64-b3v2": dict(B=2, n_kv=3, rep=3, d=64, T=45, F=4, bits=3, v_bits=2, g_k=64, g_v=64, meta8=True),
    "meta8-d64-b4v3": dict(B=2, n_kv=3, rep=3, d=64, T=45, F=4, bits=4, v_bits=3, g_k=64, g_v=64, meta8=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name: str, dtype: torch.dtype) -> None:
    q, kv, params = make_case(dtype=dtype, **CASES[name])
    _check(q, kv, params, _run(q, kv, params, block_n=16, num_splits=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_head_dim_256_default_tiles(dtype: torch.dtype) -> None:
    """Head dim 256 at the launch defaults (smaller blocks, ``_tiles``), two splits and the fp segment."""
    q, kv, params = make_case(dtype=dtype, **CASES["gemma-d256-rep2"])
    _check(q, kv, params, _run(q, kv, params, num_splits=2))


@pytest.mark.parametrize("d", [64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mean_bias_kernel_matches_reference(dtype: torch.dtype, d: int) -> None:
    """The mean-bias kernel alone against :func:`mean_scores_ref`, ``-inf`` exactly on empty slots
    (left padding, a hole), at positions near 20k where fp16 cos/sin operands round most; at head dim 256
    fp32 queries sum the frequencies in chunks."""
    q, kv, params = make_case(dtype=dtype, B=2, n_kv=2, rep=3, d=d, T=70, att=1.3, pos0=20000)
    _check_mean_bias(q, kv, params)


def _check_mean_bias(q: torch.Tensor, kv: PackedKV, params: FoldedParams) -> torch.Tensor:
    """The prep launch's mean bias (fp16 for fp16 queries, scaled by :func:`bias_scale`) against
    :func:`mean_scores_ref`; returns the fp32 reference."""
    dtype = q.dtype
    got = _query_prep(_dev(q), _dev(kv.pos), _dev(params), kv.pos.shape[1], triton_interpreting())[0].cpu()
    assert got.dtype == (torch.float16 if dtype == torch.float16 else torch.float32)
    got = got.float() * bias_scale(got.dtype)
    ref = mean_scores_ref(q.float(), kv.pos, params)
    empty = (kv.pos < 0)[:, None, :].expand_as(ref)
    assert empty.any() and bool(torch.isneginf(got[empty]).all()) and bool(torch.isfinite(got[~empty]).all())
    err = (got[~empty] - ref[~empty]).abs().max().item()
    low_err = (mean_scores_ref(q, kv.pos, params, dtype)[~empty] - ref[~empty]).abs().max().item()
    assert err <= 2 * low_err + ATOL[dtype] * ref.abs().max().item(), (err, low_err)
    return ref


def test_fp16_mean_bias_keeps_sums_beyond_the_fp16_range() -> None:
    """fp16 queries store the bias in fp16 at 1/64 of its value: a bias beyond 65,504 whose per-frequency terms
    are within the fp16 range (the prep's dot operands are fp16) stays finite and matches the reference."""
    q, kv, params = make_case(dtype=torch.float16, B=2, n_kv=2, rep=2, d=64, T=70)
    q = torch.ones_like(q) * 8.0
    params = dataclasses.replace(params, mean=torch.full_like(params.mean, 500.0), _on_device={})
    half = params.mean.shape[1] // 2
    terms = (q.float()[..., :half] * 500.0 * 2).abs().max().item()  # |q_i mu_i + q_{i+d/2} mu_{i+d/2}|
    assert terms < 65504.0
    ref = _check_mean_bias(q, kv, params)
    assert ref[torch.isfinite(ref)].abs().max().item() > 65504.0  # the case reaches beyond fp16's range


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_kv,rep,d", [(2, 3, 64), (3, 1, 128), (1, 4, 256)])
def test_query_rotation_matches_reference(dtype: torch.dtype, n_kv: int, rep: int, d: int) -> None:
    """The rotation programs of the prep launch against :func:`rotate_queries` on the plane-ordered
    rotation: fp16 queries round ``q'`` to fp16 (one fp16 step apart at most: summation order), others fp32."""
    q, kv, params = make_case(dtype=dtype, B=2, n_kv=n_kv, rep=rep, d=d, T=20)
    q = torch.cat([q, q], -1)[..., :d]  # rows at a stride of 2d: the kernel reads any row stride
    assert q.stride(1) == 2 * d
    got = _query_prep(_dev(q), _dev(kv.pos), _dev(params), 20, triton_interpreting())[1].cpu()
    ref = rotate_queries(q, params.rotation_planes(torch.device("cpu"), q.dtype))
    assert got.dtype == (torch.float16 if dtype == torch.float16 else torch.float32) == ref.dtype
    step = {torch.float16: 2**-10, torch.float32: 1e-5, torch.bfloat16: 1e-5}[dtype]
    torch.testing.assert_close(got.float(), ref.float(), rtol=step, atol=step * ref.abs().max().item())


def test_bf16_one_launch() -> None:
    """bf16 queries (fp32 dot operands); one split: the fp segment joins it and no merge runs."""
    q, kv, params = make_case(dtype=torch.bfloat16, B=2, n_kv=2, rep=2, d=64, T=30, F=3, g_k=64, g_v=32)
    _check(q, kv, params, _run(q, kv, params, block_n=32, num_splits=1))


def test_split_count_and_pipeline_depth_do_not_matter() -> None:
    """Splits 1 (one launch), 2 and 3 and pipeline depths 1-3 agree; positions with a gap and a hole."""
    q, kv, params = make_case(B=1, n_kv=1, rep=2, d=64, T=90, F=3, g_k=32, gap=True)
    outs = [_run(q, kv, params, block_n=16, num_splits=s, num_stages=n) for s in (1, 2, 3) for n in (1, 3)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=2e-5, rtol=1e-5)
    _check(q, kv, params, outs[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp_segment_read_in_parts(dtype: torch.dtype) -> None:
    """A 150-slot fp segment read by three parts beside three short splits (``fp_slots_per_part``):
    the reference, and the same output as one launch that reads everything."""
    from rkv_convert.kernels.decode_folded import fp_slots_per_part

    assert fp_slots_per_part(150, 3, 32, 64, programs=4, device=torch.device("cpu")) == 64  # three parts
    assert fp_slots_per_part(150, 3, 32, 64, programs=64, device=torch.device("cpu")) == 192  # grid full: one
    assert fp_slots_per_part(150, 3, 4096, 64, programs=4, device=torch.device("cpu")) == 192  # long splits: one
    q, kv, params = make_case(dtype=dtype, B=2, n_kv=2, rep=2, d=64, T=70, F=150, g_k=32, g_v=64)
    parts = _run(q, kv, params, block_n=16, num_splits=3)
    _check(q, kv, params, parts)
    one = _run(q, kv, params, block_n=16, num_splits=1)
    torch.testing.assert_close(parts.float(), one.float(), atol=ATOL[dtype], rtol=0)


def test_default_splits_short_and_long_contexts() -> None:
    """Below 64 blocks about 2 programs per SM (rounded up); from 64 blocks one round of ``resident`` programs per
    SM (rounded down), each split at least 2 blocks (4 from 128 blocks). CPU: 4 SMs assumed."""
    from rkv_convert.kernels.decode_folded import default_splits

    cpu = torch.device("cpu")
    assert default_splits(4, 1024, 128, cpu) == 2  # 8 blocks: cdiv(2 * 4, 4)
    assert default_splits(3, 4096, 128, cpu) == 3  # 32 blocks: cdiv(2 * 4, 3), rounded up
    assert default_splits(64, 1024, 128, cpu) == 1
    assert default_splits(4, 0, 128, cpu) == 0
    assert default_splits(4, 8192, 128, cpu, resident=4) == 4  # 64 blocks: 16 programs in one round
    assert default_splits(6, 65536, 128, cpu, resident=4) == 2  # 16 // 6, rounded down (3 would start a 2nd round)
    assert default_splits(20, 65536, 128, cpu, resident=4) == 2  # one per head fills between one and two rounds
    assert default_splits(40, 65536, 128, cpu, resident=4) == 1
    assert default_splits(1, 16384, 128, cpu, resident=16) == 32  # 128 blocks: 64 fit, but 4 blocks per split
    assert default_splits(1, 8192, 128, cpu, resident=16) == 32  # 64 blocks: 2 per split
    assert default_splits(1, 16384, 64, cpu, resident=16) == 64  # the block count, not the slots, decides


def test_fp16_mean_bias_at_large_positions() -> None:
    """Mean bias at positions near 20k (fp16 queries: fp16 cos/sin operands): within the dtype's tolerance."""
    q, kv, params = make_case(B=2, n_kv=1, rep=4, d=64, T=40, F=2, g_k=64, dtype=torch.float16, pos0=20000)
    _check(q, kv, params, _run(q, kv, params, block_n=32))


def test_scale_rows_are_made_whole() -> None:
    """Scale/zero tensors whose slot stride is not their group count (a channel slice) are copied, not misread."""
    q, kv, params = make_case(B=2, n_kv=2, rep=1, d=64, T=20, F=0, g_k=32, g_v=32)
    wide = kv._replace(k_scale=torch.cat([kv.k_scale, kv.k_scale], -1)[..., :2],
                       k_zero=torch.cat([kv.k_zero, kv.k_zero], -1)[..., :2])
    assert wide.k_scale.stride(-2) != wide.k_scale.shape[-1]
    _check(q, kv, params, _run(q, wide, params, block_n=16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_softcap_matches_reference(dtype: torch.dtype) -> None:
    """Gemma 2's soft-capped logits: kernel vs reference, with a cap small enough to bind (scores
    several times the cap), across two splits and the fp segment."""
    q, kv, params = make_case(dtype=dtype, B=2, n_kv=2, rep=2, d=64, T=50, F=3, g_k=32, g_v=64)
    q = q * 4
    capped = dataclasses.replace(params, softcap=2.0, _on_device={})
    ref_plain = decode_folded_ref(q.float(), _f32(kv), params)
    ref_capped = decode_folded_ref(q.float(), _f32(kv), capped)
    assert (ref_plain - ref_capped).abs().max() > 0.05  # the cap changes the result: the test can fail
    _check(q, kv, capped, _run(q, kv, capped, block_n=16, num_splits=2))


def test_softcap_must_be_positive() -> None:
    _, _, params = make_case(B=1, n_kv=1, rep=1, d=64, T=8)
    with pytest.raises(ValueError, match="softcap"):
        dataclasses.replace(params, softcap=0.0, _on_device={})


def test_n_tokens_and_strided_views() -> None:
    """Slots past ``n_tokens`` (garbage scales) are not read; cache tensors may be views of larger buffers."""
    q, kv, params = make_case(B=2, n_kv=2, rep=1, d=64, T=33, F=2, g_k=64, g_v=32, spare=9)
    kv = kv._replace(k_scale=kv.k_scale.clone(), v_scale=kv.v_scale.clone())
    kv.k_scale[:, :, 33:] = float("nan")
    kv.v_scale[:, :, 33:] = float("nan")
    big = PackedKV(*(torch.cat([t, t[..., :3, :] if t.dim() == 4 else t[:, :3]], -2 if t.dim() == 4 else -1)
                     for t in kv[:7]), *kv[7:])
    views = big.truncated(42)
    assert not views.k_codes.is_contiguous()
    _check(q, kv, params, _run(q, views, params, n_tokens=33, block_n=16, num_splits=2), n_tokens=33)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_whole_blocks_read_unmasked_match_masked_and_reference(dtype: torch.dtype) -> None:
    """A store whose capacity holds whole blocks (``MASKLESS``: no bounds masks; slots past ``n_tokens``
    and holes hold real, finite codes and scales, excluded by their ``-inf`` bias alone) gives the
    reference's output, and the masked launch's (a view one block short of whole)."""
    q, kv, params = make_case(dtype=dtype, B=2, n_kv=2, rep=3, d=64, T=37, F=3, g_k=32, g_v=64, spare=11, gap=True)
    assert _whole_blocks(37, 16, kv.k_codes.shape[2]) and not _whole_blocks(37, 16, 40)
    assert bool(kv.k_scale[:, :, 37:].abs().gt(0).any())  # the spare slots are not zeros
    unmasked = _run(q, kv, params, n_tokens=37, block_n=16, num_splits=2)
    masked = _run(q, kv.truncated(40), params, n_tokens=37, block_n=16, num_splits=2)
    _check(q, kv, params, unmasked, n_tokens=37)
    torch.testing.assert_close(unmasked, masked, atol=ATOL[dtype], rtol=0)


def test_fp_segment_only() -> None:
    q, kv, params = make_case(B=2, n_kv=2, rep=2, d=64, T=0, F=6, g_k=64, g_v=64)
    _check(q, kv, params, _run(q, kv, params))


def test_folded_scores_equal_unfolded_attention_scores() -> None:
    """q'·y + q·RoPE_n(mu) == q·RoPE_n(k) for unquantized y = RoPE_n(k - mu) @ R (exact algebra, fp32)."""
    B, n_kv, rep, d, T = 2, 3, 3, 64, 20
    _, kv, params = make_case(B=B, n_kv=n_kv, rep=rep, d=d, T=T, att=1.3)
    k = params.mean[None, :, None, :] + torch.randn(B, n_kv, T, d) * 3.0
    pos = kv.pos.clamp_min(0) + 1000  # large positions: RoPE mixes strongly
    q = torch.randn(B, n_kv * rep, d)
    y = fold_keys_pre(k, pos, params.mean, params.rotation, params.inv_freq, params.attention_scaling)
    folded = folded_scores_ref(q, y, pos, params)
    keys = rope(k, pos, params.inv_freq, params.attention_scaling).repeat_interleave(rep, 1)  # repeat_kv
    direct = torch.einsum("bhd,bhtd->bht", q, keys)
    torch.testing.assert_close(folded, direct, atol=1e-3, rtol=1e-5)
    assert direct.abs().max() > 100  # the mean term is a large share of the score


def test_int8_query_costs_little_next_to_two_bit_keys() -> None:
    """fp16 kernels round ``q R_h`` to 8 bits per key group (integer key dots): on real-shaped data the
    score error this adds is under 3 % of what 2-bit keys already cost, and it is not zero (the
    rounding is applied)."""
    torch.manual_seed(3)
    B, n_kv, rep, d, T = 2, 2, 4, 128, 256
    _, kv, params = make_case(B=B, n_kv=n_kv, rep=rep, d=d, T=T, g_k=64)
    q = torch.randn(B, n_kv * rep, d) * torch.linspace(0.2, 3.0, d)  # uneven channel scales, as real queries
    y = torch.randn(B, n_kv, T, d) * torch.linspace(3.0, 0.3, d)
    pos = torch.arange(T, dtype=torch.int32).expand(B, T)
    y2 = fake_quantize(y, 2, 64)
    exact = folded_scores_ref(q, y, pos, params)
    keys_err = (folded_scores_ref(q, y2, pos, params) - exact).pow(2).mean().sqrt()
    both_err = (folded_scores_ref(q, y2, pos, params, query_int8=True) - exact).pow(2).mean().sqrt()
    query_err = (folded_scores_ref(q, y2, pos, params, query_int8=True) - folded_scores_ref(q, y2, pos, params)).pow(2).mean().sqrt()
    assert 0 < query_err < 0.03 * keys_err, (query_err, keys_err)
    assert both_err < 1.001 * keys_err


def test_round_query_int8_steps() -> None:
    """Each key group's largest entry maps to +-127 steps exactly; all-zero groups stay zero."""
    x = torch.randn(3, 128)
    x[1, 64:] = 0.0
    r = round_query_int8(x, 64).reshape(3, 2, 64)
    step = x.reshape(3, 2, 64).abs().amax(-1, keepdim=True) / 127
    steps = r / torch.where(step > 0, step, torch.ones_like(step))
    torch.testing.assert_close(steps, steps.round(), atol=1e-3, rtol=0)
    assert steps.abs().amax() <= 127.001 and bool((r[1, 1] == 0).all())
    assert (r - x.reshape(3, 2, 64)).abs().le(step / 2 + 1e-6).all()


def test_reference_backend_and_bad_options() -> None:
    """backend='reference' is the reference; an unknown unpack path is refused."""
    q, kv, params = make_case(B=1, n_kv=2, rep=2, d=64, T=12, bits=2, g_k=32)
    out = decode_folded(q, kv, params, backend="reference")
    torch.testing.assert_close(out, decode_folded_ref(q, kv, params), atol=0, rtol=0)
    with pytest.raises(ValueError, match="unpack"):
        decode_folded(q, kv, params, backend="triton", unpack="bogus")


GPU_CASES = {  # (case, dtype, one launch too): few compiled variants, so that -m gpu stays quick
    "llama3-like-fp16": (dict(B=2, n_kv=8, rep=4, d=128, T=3000, F=137, g_k=64, g_v=64, pos0=25000, spare=72),
                         torch.float16, True),  # spare: whole 128-slot blocks (unmasked), as the runtime's stores
    "llama2-like-bf16": (dict(B=3, n_kv=4, rep=1, d=128, T=2500, F=137, g_k=64, g_v=64), torch.bfloat16, False),
    "llama2-like-fp16-g32": (dict(B=3, n_kv=4, rep=1, d=128, T=2500, F=137, g_k=32, g_v=128), torch.float16, False),
    "smollm2-gap-b3-fp32": (dict(B=2, n_kv=3, rep=3, d=64, T=700, F=20, bits=3, g_k=32, g_v=64, gap=True, spare=68),
                            torch.float32, False),
    "llama3-like-meta8-fp16": (dict(B=2, n_kv=8, rep=4, d=128, T=3000, F=137, g_k=64, g_v=64, spare=72, meta8=True),
                               torch.float16, False),
    # 3-bit keys with fp16 queries at head dim 128: codes by shift and mask (CUDA only; the interpreter converts)
    "llama2-like-k3v2-meta8-fp16": (dict(B=2, n_kv=4, rep=1, d=128, T=1500, F=137, bits=3, v_bits=2, g_k=64, g_v=64,
                                         spare=36, meta8=True), torch.float16, True),
    # 4-bit keys likewise: whole rows split into even and odd bytes, nibbles by shift and mask
    "llama3-like-k4v2-meta8-fp16": (dict(B=2, n_kv=4, rep=4, d=128, T=1500, F=137, bits=4, v_bits=2, g_k=64, g_v=64,
                                         spare=36, meta8=True), torch.float16, True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_kernel(name: str) -> None:
    cfg, dtype, one_launch = GPU_CASES[name]
    q, kv, params = make_case(dtype=dtype, **cfg)
    _check(q, kv, params, _run(q, kv, params))
    if one_launch:
        _check(q, kv, params, _run(q, kv, params, num_splits=1))


def test_fp16_kernel_computes_the_int8_query_reference() -> None:
    """At head dim 128 with fp16 queries the kernel's key dots take ``q R_h`` in 8 bits: it is much
    closer to the reference that rounds the same way than to the one that does not."""
    torch.manual_seed(0)
    q, kv, params = make_case(dtype=torch.float16, **CASES["gqa4-d128-g64-fp"])
    out = _run(q, kv, params, block_n=16, num_splits=2).float()
    as_kernel = decode_folded_ref(_dev(q), _dev(_f32(kv)), _dev(params), query_int8=True).float().cpu()
    unrounded = decode_folded_ref(_dev(q.float()), _dev(_f32(kv)), _dev(params), query_int8=False).cpu()
    near, far = (out - as_kernel).abs().max().item(), (out - unrounded).abs().max().item()
    assert near < 0.25 * far, (near, far)
