"""Cache semantics: append, block flushes, append-only store, sinks, padding, growth, bytes."""

import pytest
import torch

from rkv_convert.export.format import LayerTensors, RkvConfig
from rkv_convert.quant.codec import KeyCodec, ValueCodec
from rkv_convert.quant.hadamard import hadamard_matrix
from rkv_convert.runtime.attention import stored_tokens
from rkv_convert.runtime.cache import CacheSettings, RkvCacheLayer
from rkv_convert.runtime.layer_codec import LayerCodec
from rkv_convert.runtime.ops import rope

N_KV, D = 4, 32
ROPE = (1.0 / 10000 ** (torch.arange(0, D, 2).float() / D), 1.0)  # (inv_freq, attention_scaling)


def make_codec(bits: int = 2, g: int = 2, key_group: int = 32, value_group: int = 16) -> tuple[LayerCodec, KeyCodec, ValueCodec]:
    config = RkvConfig(bits=bits, key_group_size=key_group, value_group_size=value_group, head_group_size=g,
                       num_layers=1, num_key_value_heads=N_KV, head_dim=D, source_fingerprint="t")  # fmt: skip
    gd = g * D
    perm = torch.cat([torch.randperm(gd) + i * gd for i in range(N_KV // g)])
    mean = torch.randn(N_KV * D)
    rotation = hadamard_matrix(gd)
    layer = LayerTensors(mean, perm, 0.9, 1.0, torch.tensor([0]), 1.0)
    codec = LayerCodec.from_checkpoint(config, rotation, layer, torch.device("cpu"))
    return codec, KeyCodec(mean, rotation, perm, bits, key_group, 0.9), ValueCodec(bits, value_group, 1.0)


def make_layer(recent_window=4, flush_block=4, max_sinks=2, **codec_kwargs) -> RkvCacheLayer:
    codec = make_codec(**codec_kwargs)[0]
    return RkvCacheLayer(codec, CacheSettings(recent_window, flush_block, max_sinks), backend="reference", rope=ROPE)


def tokens(b: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(b, N_KV, t, D) * 2 + 1, torch.randn(b, N_KV, t, D)


def positions(b: int, start: int, t: int) -> torch.Tensor:
    return torch.arange(start, start + t)[None].expand(b, t)


def test_decode_appends_flush_in_whole_blocks_and_never_requantize() -> None:
    layer = make_layer(recent_window=4, flush_block=4, max_sinks=0)
    snapshots = []
    for step in range(40):
        k, v = tokens(2, 1)
        layer.append(k, v, positions(2, step, 1))
        assert layer.n_window == min(step + 1, 8) if layer.n_quant == 0 else True
        assert layer.n_window <= 8  # the newest token is in full precision before the flush
        moved = layer.flush()
        assert moved in (0, 4)
        assert 0 <= layer.n_window - 4 < 4 or layer.n_quant == 0
        assert layer.n_quant % 4 == 0 and layer.n_quant + layer.n_window == step + 1
        snapshots.append({k: t.clone() for k, t in layer.quantized().items()})
    final = layer.quantized()
    for snap in snapshots:  # append only: every earlier slot is bit-identical at the end
        n = snap["pos"].shape[1]
        for name, t in snap.items():
            assert torch.equal(final[name][:, :, :n] if t.dim() == 4 else final[name][:, :n], t)
    assert torch.equal(final["pos"][0], torch.arange(layer.n_quant, dtype=torch.int32))


def test_prefill_keeps_recent_window_and_codes_match_the_codec() -> None:
    codec, key_codec, value_codec = make_codec(bits=2)
    layer = RkvCacheLayer(codec, CacheSettings(recent_window=5, flush_block=4, max_sinks=0), backend="reference", rope=ROPE)
    k, v = tokens(2, 23)
    layer.append(k, v, positions(2, 0, 23))
    layer.flush()
    assert (layer.n_quant, layer.n_window) == (16, 7)
    fp = layer.full_precision()
    torch.testing.assert_close(fp["fp_k"][:, :, layer.window_start :], k[:, :, 16:], rtol=0, atol=0)
    assert torch.equal(fp["fp_pos"][0, layer.window_start :], torch.arange(16, 23, dtype=torch.int32))
    # the store decodes to exactly what the evaluation codec gives for the same tokens (post-RoPE)
    keys, values, pos = stored_tokens(layer)
    flat_k = k[:, :, :16].transpose(1, 2).reshape(2, 16, N_KV * D)
    want_k = rope(key_codec.roundtrip(flat_k).view(2, 16, N_KV, D).transpose(1, 2), pos[:, :16], *ROPE)
    torch.testing.assert_close(keys[:, :, :16], want_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values[:, :, :16], value_codec.roundtrip(v[:, :, :16]), rtol=0, atol=0)
    q = key_codec.encode(flat_k)  # codes/scales bit-exact against the reference quantizer
    assert torch.equal(layer.k_scale[:, :, :16].transpose(1, 2).reshape(2, 16, -1), q.scale)


def test_sinks_take_free_slots_per_sequence_then_overflow_is_quantized() -> None:
    layer = make_layer(recent_window=2, flush_block=2, max_sinks=2)
    k, v = tokens(2, 12)
    sinks = torch.zeros(2, 12, dtype=torch.bool)
    sinks[0, [0, 3, 5, 9]] = True  # four candidates, two slots
    sinks[1, [7]] = True
    layer.append(k, v, positions(2, 0, 12), sinks=sinks)
    layer.flush()
    assert layer.n_sinks.tolist() == [2, 1]
    fp_pos = layer.full_precision()["fp_pos"]
    assert fp_pos[0, :2].tolist() == [0, 3] and fp_pos[1, :2].tolist() == [7, -1]
    assert fp_pos[:, layer.scratch_slot].tolist() == [-1, -1]
    torch.testing.assert_close(layer.fp_k[0, :, 1], k[0, :, 3], rtol=0, atol=0)
    # a sink's own slot is empty (-1) for its sequence; overflow candidates (5, 9) stay ordinary
    store_pos = layer.quantized()["pos"]
    assert 3 not in store_pos[0].tolist() and 5 in store_pos[0].tolist()
    assert 7 not in store_pos[1].tolist()
    every = torch.cat([store_pos, fp_pos], 1)
    for b in range(2):  # each real token is held exactly once
        held = sorted(p for p in every[b].tolist() if p >= 0)
        assert held == list(range(12))
    # later sinks find no slot for sequence 0 but one for sequence 1
    k2, v2 = tokens(2, 1)
    layer.append(k2, v2, positions(2, 12, 1), sinks=torch.ones(2, 1, dtype=torch.bool))
    assert layer.n_sinks.tolist() == [2, 2]


def test_sinks_token_by_token_match_one_append() -> None:
    """Decode appends one token at a time (the sink ranks then come from the counts alone): the same
    sink slots, window, positions and counts as appending the tokens together, padding included."""
    k, v = tokens(3, 12)
    sinks = torch.zeros(3, 12, dtype=torch.bool)
    sinks[0, [0, 3, 5, 9]] = True  # more candidates than slots
    sinks[1, [7]] = True
    sinks[2, [1, 2, 6]] = True
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[2, :2] = False  # left padding: flagged padding is never a sink
    pos = (valid.long().cumsum(1) - 1).clamp_min(0)
    together, one_by_one = make_layer(recent_window=16, flush_block=4, max_sinks=2), make_layer(16, 4, 2)
    one_by_one.codec = together.codec
    together.append(k, v, pos, valid=valid, sinks=sinks)
    for i in range(12):
        one_by_one.append(k[:, :, i : i + 1], v[:, :, i : i + 1], pos[:, i : i + 1], valid=valid[:, i : i + 1],
                          sinks=sinks[:, i : i + 1])  # fmt: skip
    assert together.n_sinks.tolist() == [2, 1, 2]
    held = [i for i in range(together.fp_k.shape[2]) if i != together.scratch_slot]  # the scratch slot's k/v: never read
    for name in ("fp_k", "fp_v"):
        assert torch.equal(getattr(one_by_one, name)[:, :, held], getattr(together, name)[:, :, held]), name
    for name in ("fp_pos", "n_sinks"):
        assert torch.equal(getattr(one_by_one, name), getattr(together, name)), name
    assert together.fp_pos[:, together.scratch_slot].tolist() == [-1, -1, -1]


def test_left_padding_gets_no_position_and_zeros() -> None:
    layer = make_layer(recent_window=2, flush_block=2, max_sinks=1)
    k, v = tokens(2, 10)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :4] = False
    pos = (valid.long().cumsum(1) - 1).clamp_min(0)
    layer.append(k, v, pos, valid=valid, sinks=~valid)  # padding is never a sink
    layer.flush()
    assert layer.n_sinks.tolist() == [0, 0]
    assert layer.quantized()["pos"][1, :4].tolist() == [-1] * 4
    keys, values, all_pos = stored_tokens(layer)
    assert sorted(p for p in all_pos[1].tolist() if p >= 0) == list(range(6))
    assert layer.length == 10


def test_store_grows_geometrically_and_keeps_old_slots() -> None:
    layer = make_layer(recent_window=0, flush_block=16, max_sinks=0)
    caps = []
    first = None
    for i in range(20):
        k, v = tokens(1, 16)
        layer.append(k, v, positions(1, 16 * i, 16))
        layer.flush()
        if first is None:
            first = layer.k_codes[:, :, :16].clone()
        caps.append(layer.pos.shape[1])
    assert layer.n_quant == 320
    assert sorted(set(caps)) == [128, 256, 512]  # whole 128-slot blocks; two reallocations for 320 tokens
    assert torch.equal(layer.k_codes[:, :, :16], first)


def test_multi_token_append_larger_than_the_window() -> None:
    layer = make_layer(recent_window=3, flush_block=2, max_sinks=0)
    k, v = tokens(1, 4)
    layer.append(k, v, positions(1, 0, 4))
    k2, v2 = tokens(1, 9)
    layer.append(k2, v2, positions(1, 4, 9))
    layer.flush()
    assert layer.n_quant + layer.n_window == 13 and layer.n_quant % 2 == 0 and 3 <= layer.n_window < 5
    _, _, pos = stored_tokens(layer)
    assert sorted(p for p in pos[0].tolist() if p >= 0) == list(range(13))


@pytest.mark.parametrize("bits,key_group,value_group", [(2, 64, 32), (4, 32, 16), (3, 64, 32)])
def test_bytes_accounting(bits: int, key_group: int, value_group: int) -> None:
    layer = make_layer(recent_window=8, flush_block=8, max_sinks=2, bits=bits, key_group=key_group, value_group=value_group)
    k, v = tokens(3, 100)
    layer.append(k.half(), v.half(), positions(3, 0, 100))
    layer.flush()
    n_q, n_w = layer.n_quant, layer.n_window
    assert n_q + n_w == 100
    per_token_q = N_KV * D * bits / 8 * 2 + (N_KV * D // key_group + N_KV * D // value_group) * 4 + 4
    per_token_fp = 2 * N_KV * D * 2 + 4
    expected = 3 * (n_q * per_token_q + (2 + 1 + n_w) * per_token_fp)
    assert layer.bytes_used() == expected
    assert layer.fp16_equivalent_bytes() == 3 * 100 * 2 * N_KV * D * 2
    assert layer.bytes_allocated() >= layer.bytes_used()
    # a long sequence approaches the nominal bits per element of the codes plus scales
    long = make_layer(recent_window=0, flush_block=64, max_sinks=0, bits=bits, key_group=key_group, value_group=value_group)
    k, v = tokens(1, 4096)
    long.append(k.half(), v.half(), positions(1, 0, 4096))
    long.flush()
    nominal = bits + 16 * (1 / key_group + 1 / value_group) + 32 / (2 * N_KV * D)
    assert abs(8 * long.bytes_used() / long.num_elements() - nominal) < 0.05


def test_reorder_and_update_contract() -> None:
    layer = make_layer()
    k, v = tokens(3, 12)
    layer.append(k, v, positions(3, 0, 12))
    layer.flush()
    before = layer.fp_k.clone(), layer.k_codes.clone()
    layer.reorder_cache(torch.tensor([2, 0, 0]))
    assert torch.equal(layer.fp_k[0], before[0][2]) and torch.equal(layer.k_codes[2], before[1][0])
    assert layer.get_seq_length() == 12 and layer.get_mask_sizes(1) == (13, 0)
    assert layer.get_mask_sizes(torch.arange(12, 15)) == (15, 0)  # older transformers pass cache_position
    with pytest.raises(TypeError, match="pre-RoPE"):
        layer.update(k, v)
    with pytest.raises(NotImplementedError):
        layer.crop(-1)
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.bytes_used() == 0
