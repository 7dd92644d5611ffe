"""The rkv config: format versions (1 reads as prerope, 2 with uniform widths, unknown ones refused), the key
layout's rules and per-layer key/value widths."""

import json

import pytest

from rkv_convert.quant.quantizer import GroupMeta, GroupRanges
from rkv_convert.export.format import (
    DEFAULT_KEY_LAYOUT,
    FORMAT_VERSION,
    KEY_LAYOUTS,
    CheckpointError,
    RkvConfig,
)


def _config(**kw) -> RkvConfig:
    base = dict(bits=2, key_group_size=32, value_group_size=32, head_group_size=1, num_layers=2,
                num_key_value_heads=2, head_dim=64, source_fingerprint="x")  # fmt: skip
    return RkvConfig(**{**base, **kw})


def test_written_version_and_layouts() -> None:
    assert FORMAT_VERSION == 7 and KEY_LAYOUTS == ("prerope", "folded") and DEFAULT_KEY_LAYOUT in KEY_LAYOUTS
    data = _config(key_layout="folded").to_dict()
    assert data["version"] == 7 and data["key_layout"] == "folded" and data["group_meta"] == "fp16"
    assert data["salient_tokens"] == 0 and data["group_ranges"] == "minmax"
    assert list(data) == sorted(data)
    assert RkvConfig.from_dict(json.loads(json.dumps(data))).folded


def test_version_1_reads_as_prerope() -> None:
    data = _config(head_group_size=2).to_dict()
    data["version"] = 1
    del data["key_layout"], data["key_bits"], data["value_bits"], data["group_meta"], data["salient_tokens"]
    del data["group_ranges"]
    config = RkvConfig.from_dict(data)
    assert config.key_layout == "prerope" and not config.folded and config.version == 1
    with pytest.raises(CheckpointError, match="unknown"):  # version 1 had no key_layout field
        RkvConfig.from_dict({**data, "key_layout": "folded"})


@pytest.mark.parametrize("version", [0, 8, None, "2"])
def test_unknown_versions_are_refused_with_the_re_export_message(version) -> None:
    data = _config().to_dict()
    data["version"] = version
    with pytest.raises(CheckpointError, match="re-export the checkpoint"):
        RkvConfig.from_dict(data)


def test_version_2_needs_the_key_layout() -> None:
    data = _config().to_dict()
    data["version"] = 2
    del data["key_layout"], data["key_bits"], data["value_bits"], data["group_meta"], data["salient_tokens"]
    del data["group_ranges"]
    with pytest.raises(CheckpointError, match="missing \\['key_layout'\\]"):
        RkvConfig.from_dict(data)


def test_folded_rules() -> None:
    with pytest.raises(CheckpointError, match="head_group_size must be 1"):
        _config(key_layout="folded", head_group_size=2)
    with pytest.raises(CheckpointError, match="key group size 48 must divide"):
        _config(key_layout="folded", key_group_size=48)
    with pytest.raises(CheckpointError, match="key_layout must be one of"):
        _config(key_layout="post")
    assert _config(key_layout="prerope", head_group_size=2).head_group_channels == 128


def test_version_2_reads_with_every_layer_at_bits() -> None:
    data = _config(bits=3).to_dict()
    data["version"] = 2
    del data["key_bits"], data["value_bits"], data["group_meta"], data["salient_tokens"], data["group_ranges"]
    config = RkvConfig.from_dict(data)
    assert [config.layer_bits(i) for i in range(2)] == [(3, 3), (3, 3)] and not config.mixed_bits
    assert config.key_bits_per_element == 3 + 32 / 32
    with pytest.raises(CheckpointError, match="unknown"):  # version 2 had no per-layer widths
        RkvConfig.from_dict({**data, "key_bits": [2, 3]})
    with pytest.raises(CheckpointError, match="no per-layer key_bits"):
        _config(version=2, key_bits=[2, 3])


def test_per_layer_key_and_value_bits() -> None:
    config = _config(bits=2, key_bits=[3, 2], value_bits=[2, 4])
    assert [config.layer_bits(i) for i in range(2)] == [(3, 2), (2, 4)] and config.mixed_bits
    assert config.key_bits_per_element == (4.0 + 3.0) / 2 and config.value_bits_per_element == (3.0 + 5.0) / 2
    again = RkvConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    data = config.to_dict()
    del data["value_bits"]
    with pytest.raises(CheckpointError, match="missing \\['value_bits'\\]"):
        RkvConfig.from_dict(data)
    with pytest.raises(CheckpointError, match="one of \\(2, 3, 4\\) per layer"):
        _config(key_bits=[2, 5])
    with pytest.raises(CheckpointError, match="per layer \\(2 layers\\)"):
        _config(value_bits=[2])


def test_version_3_reads_with_fp16_group_metadata() -> None:
    data = _config(key_layout="folded").to_dict()
    data["version"] = 3
    del data["group_meta"], data["salient_tokens"], data["group_ranges"]
    config = RkvConfig.from_dict(data)
    assert config.meta is GroupMeta.FP16 and config.key_bits_per_element == 2 + 32 / 32
    with pytest.raises(CheckpointError, match="unknown"):  # version 3 had no group_meta field
        RkvConfig.from_dict({**data, "group_meta": "log8"})
    data = _config(key_layout="folded").to_dict()
    del data["group_meta"]
    with pytest.raises(CheckpointError, match="missing \\['group_meta'\\]"):
        RkvConfig.from_dict(data)


def test_log8_group_metadata_rules_and_cost() -> None:
    config = _config(key_layout="folded", group_meta="log8", key_bits=[3, 2], value_bits=[2, 2])
    assert config.meta is GroupMeta.LOG8
    assert config.key_bits_per_element == (3 + 16 / 32 + 2 + 16 / 32) / 2 and config.value_bits_per_element == 2.5
    assert RkvConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(CheckpointError, match="folded key layout"):
        _config(key_layout="prerope", group_meta="log8")
    with pytest.raises(CheckpointError, match="group_meta must be one of fp16, log8"):
        _config(key_layout="folded", group_meta="int4")


def test_version_4_reads_with_no_salient_tokens() -> None:
    data = _config(key_layout="folded", group_meta="log8").to_dict()
    data["version"] = 4
    del data["salient_tokens"], data["group_ranges"]
    config = RkvConfig.from_dict(data)
    assert config.salient_tokens == 0 and config.version == 4
    with pytest.raises(CheckpointError, match="unknown"):  # version 4 had no salient_tokens field
        RkvConfig.from_dict({**data, "salient_tokens": 8})
    with pytest.raises(CheckpointError, match="needs format version 5"):
        _config(version=4, salient_tokens=8)
    with pytest.raises(CheckpointError, match="salient_tokens must be >= 0"):
        _config(salient_tokens=-1)
    config = _config(salient_tokens=32)
    assert RkvConfig.from_dict(json.loads(json.dumps(config.to_dict()))).salient_tokens == 32
    data = config.to_dict()
    del data["salient_tokens"]
    with pytest.raises(CheckpointError, match="missing \\['salient_tokens'\\]"):
        RkvConfig.from_dict(data)


def test_version_5_reads_with_min_max_ranges() -> None:
    """Version 6 added ``group_ranges``: a version-5 checkpoint's writes take min-max ranges; searched ranges need
    version 6 and the folded layout; the field is required from version 6 on."""
    data = _config(key_layout="folded", group_meta="log8", salient_tokens=32).to_dict()
    data["version"] = 5
    del data["group_ranges"]
    config = RkvConfig.from_dict(data)
    assert config.ranges is GroupRanges.MINMAX and config.version == 5
    with pytest.raises(CheckpointError, match="unknown"):  # version 5 had no group_ranges field
        RkvConfig.from_dict({**data, "group_ranges": "searched"})
    with pytest.raises(CheckpointError, match="need format version 6"):
        _config(version=5, key_layout="folded", group_ranges="searched")
    with pytest.raises(CheckpointError, match="folded key layout"):
        _config(key_layout="prerope", group_ranges="searched")
    with pytest.raises(CheckpointError, match="group_ranges must be one of minmax, searched"):
        _config(key_layout="folded", group_ranges="best")
    config = _config(key_layout="folded", group_ranges="searched")
    assert RkvConfig.from_dict(json.loads(json.dumps(config.to_dict()))).ranges is GroupRanges.SEARCHED
    data = config.to_dict()
    del data["group_ranges"]
    with pytest.raises(CheckpointError, match="missing \\['group_ranges'\\]"):
        RkvConfig.from_dict(data)
