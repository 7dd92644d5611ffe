"""Per-layer key and value widths (format version 3) reach the packed cache and its decode path."""

import dataclasses

import pytest
import torch
from reference_handler import EvalReference
from rkv_fixtures import make_checkpoint
from test_attention import _prompt, _run
from tiny_models import tiny_model

from rkv_convert.export.format import Checkpoint
from rkv_convert.quant.packing import packed_width
from rkv_convert.runtime.attention import rkv_attention
from rkv_convert.runtime.cache import CacheSettings, RkvCache
from rkv_convert.runtime.layer_codec import LayerCodec


@pytest.mark.parametrize("key_layout", ["prerope", "folded"])
def test_mixed_widths_decode_like_the_reference(key_layout: str) -> None:
    model = tiny_model("llama")
    ck = make_checkpoint(model, bits=2, key_group_size=32, value_group_size=16, sink_quantile=0.9, key_layout=key_layout)
    ck = Checkpoint(dataclasses.replace(ck.config, key_bits=[3, 2], value_bits=[2, 4]), ck.key_rotation, ck.value_rotation,
                    ck.layers)  # fmt: skip
    settings = CacheSettings(recent_window=4, flush_block=4, max_sinks=2)
    ids, mask = _prompt(pad=0)
    cache = RkvCache.from_checkpoint(ck, model, settings, backend="reference")
    got = _run(model, rkv_attention, ids, mask, steps=8, cache=cache)
    want = _run(model, EvalReference(model, ck, settings), ids, mask, steps=8)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    gk = ck.config.head_group_channels
    for layer, (kb, vb) in zip(cache.layers, [(3, 2), (2, 4)]):
        assert (layer.codec.key_bits, layer.codec.value_bits) == (kb, vb)
        assert layer.n_quant > 0
        assert layer.k_codes.shape[-1] == packed_width(gk, kb) and layer.v_codes.shape[-1] == packed_width(ck.config.head_dim, vb)
    # the same checkpoint at uniform 2 bits decodes differently: the per-layer widths are really used
    uniform = Checkpoint(dataclasses.replace(ck.config, key_bits=[2, 2], value_bits=[2, 2]), ck.key_rotation,
                         ck.value_rotation, ck.layers)  # fmt: skip
    other = _run(model, rkv_attention, ids, mask, steps=8, cache=RkvCache.from_checkpoint(uniform, model, settings, backend="reference"))
    assert (other - got).abs().max() > 1e-3


def test_layer_codec_needs_its_index_when_widths_differ() -> None:
    model = tiny_model("llama")
    ck = make_checkpoint(model, bits=2, key_group_size=32, value_group_size=16)
    mixed = dataclasses.replace(ck.config, key_bits=[3, 2], value_bits=[2, 2])
    with pytest.raises(ValueError, match="pass layer_index"):
        LayerCodec.from_checkpoint(mixed, ck.key_rotation, ck.layers[0], torch.device("cpu"))
    codec = LayerCodec.from_checkpoint(mixed, ck.key_rotation, ck.layers[1], torch.device("cpu"), 1)
    assert (codec.key_bits, codec.value_bits) == (2, 2)
