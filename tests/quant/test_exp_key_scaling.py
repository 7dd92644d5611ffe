"""The scaled key codec of ``benchmarks/exp_key_scaling.py`` (an issue-12 experiment): its unfold inverts its
fold, a unit scale is the library's folded codec bit for bit, the scale is tied within RoPE pairs, and its range
search with no fractions encodes as the scaled codec does."""

from __future__ import annotations

import pytest
import torch
from benchmark_scripts import load_benchmark

from rkv_convert.quant.codec import FoldedKeyCodec
from rkv_convert.quant.hadamard import hadamard_matrix
from rkv_convert.runtime.ops import apply_rope

N_KV, D = 2, 16


@pytest.fixture(scope="module")
def exp():
    return load_benchmark("exp_key_scaling")


def _rope(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    ang = torch.arange(t).float()[:, None] * inv
    emb = torch.cat([ang, ang], -1)[None]
    return emb.cos(), emb.sin()


def _codec(exp, scale: torch.Tensor):
    perm = torch.cat([torch.randperm(D) + h * D for h in range(N_KV)])
    return exp.ScaledKeys(torch.randn(N_KV * D), hadamard_matrix(D), perm, 2, 8, 0.9, scale=scale)


def test_unfold_inverts_fold(exp) -> None:
    codec = _codec(exp, torch.rand(N_KV, D) * 3 + 0.2)
    k = torch.randn(1, N_KV, 12, D) * 2
    cos, sin = _rope(12)
    back = codec.unfold(codec.fold(k, cos, sin), cos, sin)
    torch.testing.assert_close(back, apply_rope(k, cos.unsqueeze(1), sin.unsqueeze(1)), rtol=1e-5, atol=1e-5)


def test_unit_scale_is_the_library_codec(exp) -> None:
    codec = _codec(exp, torch.ones(N_KV, D))
    plain = FoldedKeyCodec(codec.mean, codec.rotation, codec.perm, 2, 8, 0.9)
    k = torch.randn(1, N_KV, 12, D) * 2
    cos, sin = _rope(12)
    ours, ref = codec.encode(k, cos, sin), plain.encode(k, cos, sin)
    assert torch.equal(ours.codes, ref.codes)
    torch.testing.assert_close(codec.decode(ours, cos, sin), plain.decode(ref, cos, sin), rtol=1e-5, atol=1e-5)


def test_pair_scale_is_tied_within_rope_pairs_and_has_unit_geometric_mean(exp) -> None:
    x = torch.randn(500, N_KV, D) * torch.rand(N_KV, D) * 4
    w = torch.rand(N_KV * D) + 0.1
    for alpha in (0.0, 0.5, 1.0):
        s = exp.pair_scale(x, w, alpha)
        torch.testing.assert_close(s[:, : D // 2], s[:, D // 2 :])
        torch.testing.assert_close(s.log().mean(-1), torch.zeros(N_KV), atol=1e-5, rtol=0)
    assert torch.equal(exp.pair_scale(x, w, 0.0), torch.ones(N_KV, D))
    assert not torch.allclose(exp.pair_scale(x, w, 1.0), torch.ones(N_KV, D))


def test_range_search_without_fractions_is_the_scaled_codec(exp) -> None:
    codec = _codec(exp, torch.rand(N_KV, D) * 3 + 0.2)
    searched = exp.ScaledSearchedKeys(codec.mean, codec.rotation, codec.perm, 2, 8, 0.9, scale=codec.scale)
    k = torch.randn(1, N_KV, 12, D) * 2
    cos, sin = _rope(12)
    ours, ref = searched.encode(k, cos, sin), codec.encode(k, cos, sin)
    assert torch.equal(ours.codes, ref.codes)
    assert torch.equal(ours.scale, ref.scale) and torch.equal(ours.zero, ref.zero)
