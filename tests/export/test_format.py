"""The rkv config: format versions (1 reads as prerope, unknown ones refused) and the key layout's rules."""

import json

import pytest

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
    assert FORMAT_VERSION == 2 and KEY_LAYOUTS == ("prerope", "folded") and DEFAULT_KEY_LAYOUT in KEY_LAYOUTS
    data = _config(key_layout="folded").to_dict()
    assert data["version"] == 2 and data["key_layout"] == "folded"
    assert list(data) == sorted(data)
    assert RkvConfig.from_dict(json.loads(json.dumps(data))).folded


def test_version_1_reads_as_prerope() -> None:
    data = _config(head_group_size=2).to_dict()
    data["version"] = 1
    del data["key_layout"]
    config = RkvConfig.from_dict(data)
    assert config.key_layout == "prerope" and not config.folded and config.version == 1
    with pytest.raises(CheckpointError, match="unknown"):  # version 1 had no key_layout field
        RkvConfig.from_dict({**data, "key_layout": "folded"})


@pytest.mark.parametrize("version", [0, 3, None, "2"])
def test_unknown_versions_are_refused_with_the_re_export_message(version) -> None:
    data = _config().to_dict()
    data["version"] = version
    with pytest.raises(CheckpointError, match="re-export the checkpoint"):
        RkvConfig.from_dict(data)


def test_version_2_needs_the_key_layout() -> None:
    data = _config().to_dict()
    del data["key_layout"]
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
