"""The folded key codec: transform identities (no quantization), and its quantized round trip."""

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from rkv_convert.quant.codec import FoldedKeyCodec, folded_head_rotations
from rkv_convert.quant.hadamard import hadamard_matrix
from rkv_convert.runtime.ops import fold_keys, mean_at, rope, rope_cos_sin, unfold_keys

N_KV, D = 3, 64


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, N_KV, 40, D, generator=g) * 3 + 1
    mean = torch.randn(N_KV * D, generator=g)
    perm = torch.cat([torch.randperm(D, generator=g) + h * D for h in range(N_KV)])
    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=4 * D, num_attention_heads=4, head_dim=D))
    pos = torch.arange(5, 45)[None].expand(2, 40)
    cos, sin = rotary(k, pos)
    return k, mean, perm, rotary, pos, cos, sin


def _sqnr(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(20 * torch.log10(x.norm() / (x - y).norm()))


def test_head_rotations_are_the_hadamard_with_permuted_columns() -> None:
    _, _, perm, *_ = _setup()
    r = folded_head_rotations(hadamard_matrix(D), perm, D)
    assert r.shape == (N_KV, D, D)
    for h in range(N_KV):
        assert torch.equal(r[h], hadamard_matrix(D)[:, perm[h * D : (h + 1) * D] - h * D])
        torch.testing.assert_close(r[h] @ r[h].T, torch.eye(D), rtol=0, atol=1e-5)


def test_fold_then_unfold_gives_the_post_rope_keys_back() -> None:
    """The transform alone (no quantization): exact up to fp32 rounding of the rotation."""
    k, mean, perm, rotary, pos, cos, sin = _setup()
    r = folded_head_rotations(hadamard_matrix(D), perm, D)
    c4, s4 = rope_cos_sin(pos, rotary.inv_freq, rotary.attention_scaling)
    assert torch.equal(c4[:, 0], cos) and torch.equal(s4[:, 0], sin)  # one RoPE table, as transformers makes it
    k_post = apply_rotary_pos_emb(k, k, cos, sin)[1]
    assert torch.equal(rope(k, pos, rotary.inv_freq, rotary.attention_scaling), k_post)
    mu_rope = mean_at(mean.view(N_KV, D), pos, rotary.inv_freq, rotary.attention_scaling)
    y = fold_keys(k_post, mu_rope, r)
    torch.testing.assert_close(unfold_keys(y, mu_rope, r), k_post, rtol=0, atol=2e-5)
    # the same y as centring before RoPE: RoPE(k - mu) @ R_h (RoPE is linear)
    centred = k.float() - mean.view(1, N_KV, 1, D)
    want = rope(centred, pos, rotary.inv_freq, rotary.attention_scaling) @ r[None]
    torch.testing.assert_close(y, want, rtol=0, atol=2e-5)


def test_codec_round_trip_is_post_rope_and_quantizes_consecutive_groups() -> None:
    k, mean, perm, rotary, pos, cos, sin = _setup()
    k_post = apply_rotary_pos_emb(k, k, cos, sin)[1]
    errors = {}
    for bits in (2, 3, 4):
        codec = FoldedKeyCodec(mean, hadamard_matrix(D), perm, bits, 32, 1.0)
        q = codec.encode(k, cos, sin)
        assert q.perm is None and q.codes.shape == k.shape and q.scale.shape == (2, N_KV, 40, D // 32)
        out = codec.roundtrip(k, cos, sin)
        assert out.shape == k.shape and out.dtype == k.dtype
        errors[bits] = _sqnr(k_post, out)
    assert errors[2] > 6 and errors[4] > 20 and errors[2] < errors[3] < errors[4], errors
