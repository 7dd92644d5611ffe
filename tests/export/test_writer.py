import json

import pytest
import torch
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM

from rkv_convert.calibrate.run import CalibrationOptions, calibrate
from rkv_convert.export.format import CheckpointError, RkvConfig, read_checkpoint
from rkv_convert.export.writer import checkpoint_from_artifact, export_checkpoint
from rkv_convert.models.loading import load_model
from rkv_convert.quant.quantizer import GroupMeta, meta_scale_base

OPTIONS = CalibrationOptions(num_samples=2, seqlen=32, batch_size=2, clip_samples=32)


def _calibrated(folder):
    loaded = load_model(str(folder))
    batches = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    return loaded, calibrate(loaded.model, batches, OPTIONS)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("src") / "model", "qwen2", n_kv=2)


def test_round_trip_with_stock_transformers(source, tmp_path) -> None:
    loaded, art = _calibrated(source)
    ids = torch.randint(0, 128, (1, 21))
    with torch.no_grad():
        reference = loaded.model(ids).logits
    out = export_checkpoint(loaded, art, tmp_path / "ck", bits=3)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference, rtol=0, atol=1e-4)
    ck = read_checkpoint(out)
    assert ck.config.bits == 3 and ck.config.layout == "u3-planes"
    assert ck.config.source_fingerprint == art.meta["source_fingerprint"]
    assert len(ck.layers) == 2
    torch.testing.assert_close(ck.layers[1].key_mean, art.layers[1]["key_mean"])
    assert ck.layers[0].key_clip == art.clip_for(0, 3, "key")
    config = json.loads((out / "config.json").read_text())
    assert list(config["rkv"]) == sorted(config["rkv"])
    assert (out / "tokenizer.json").is_file()


def test_in_memory_checkpoint_equals_the_exported_one(source, tmp_path) -> None:
    loaded, art = _calibrated(source)
    in_memory = checkpoint_from_artifact(art, bits=2, recent_window=32, flush_block=16, max_sinks=4)
    written = read_checkpoint(export_checkpoint(loaded, art, tmp_path / "ck", bits=2, recent_window=32, flush_block=16, max_sinks=4))
    assert in_memory.config == written.config
    assert torch.equal(in_memory.key_rotation, written.key_rotation)
    assert torch.equal(in_memory.value_rotation, written.value_rotation)
    for a, b in zip(in_memory.layers, written.layers, strict=True):
        for name in ("key_mean", "key_perm", "sink_channels"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert (a.key_clip, a.value_clip, a.sink_threshold) == (b.key_clip, b.value_clip, b.sink_threshold)
    with pytest.raises(CheckpointError, match="bits"):
        checkpoint_from_artifact(art, bits=5)


def _assert_nothing_left(parent, expected: set[str]) -> None:
    assert {p.name for p in parent.iterdir()} == expected


def test_artifact_from_other_weights_is_refused(source, tmp_path) -> None:
    _, art = _calibrated(source)
    other = load_model(str(save_tiny_model(tmp_path / "other", "qwen2", seed=1, n_kv=2)))
    with pytest.raises(CheckpointError, match="different weights"):
        export_checkpoint(other, art, tmp_path / "ck")
    _assert_nothing_left(tmp_path, {"other"})


def test_artifact_for_other_shape_is_refused(source, tmp_path) -> None:
    _, art = _calibrated(source)
    other = load_model(str(save_tiny_model(tmp_path / "other", "qwen2", n_kv=4)))
    with pytest.raises(CheckpointError, match="shaped"):
        export_checkpoint(other, art, tmp_path / "ck")
    _assert_nothing_left(tmp_path, {"other"})


@pytest.mark.parametrize("bits", [1, 5, 8])
def test_bits_outside_supported_are_refused(source, tmp_path, bits: int) -> None:
    loaded, art = _calibrated(source)
    with pytest.raises(CheckpointError, match="bits"):
        export_checkpoint(loaded, art, tmp_path / "ck", bits=bits)
    _assert_nothing_left(tmp_path, set())


def test_existing_output_is_not_overwritten(source, tmp_path) -> None:
    loaded, art = _calibrated(source)
    (tmp_path / "ck").mkdir()
    with pytest.raises(FileExistsError):
        export_checkpoint(loaded, art, tmp_path / "ck")


def test_failure_while_writing_leaves_nothing(source, tmp_path, monkeypatch) -> None:
    loaded, art = _calibrated(source)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("rkv_convert.export.writer.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(loaded, art, tmp_path / "ck")
    _assert_nothing_left(tmp_path, set())


def test_config_validation_messages() -> None:
    base = dict(bits=2, key_group_size=64, value_group_size=64, head_group_size=3, num_layers=2,
                num_key_value_heads=3, head_dim=64, source_fingerprint="x")
    RkvConfig(**base)
    with pytest.raises(CheckpointError, match="does not divide the 4 KV heads"):
        RkvConfig(**base | dict(num_key_value_heads=4))
    with pytest.raises(CheckpointError, match="bits"):
        RkvConfig(**base | dict(bits=5))
    with pytest.raises(CheckpointError, match="version 8.*re-export"):
        RkvConfig.from_dict(RkvConfig(**base).to_dict() | {"version": 8})
    with pytest.raises(CheckpointError, match="unknown"):
        RkvConfig.from_dict(RkvConfig(**base).to_dict() | {"colour": "red"})


def test_read_checkpoint_errors(source, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        read_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no 'rkv' section"):
        read_checkpoint(source)
    loaded, art = _calibrated(source)
    out = export_checkpoint(loaded, art, tmp_path / "ck")
    (out / "rkv.safetensors").write_bytes(b"broken")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_checkpoint(out)
    (out / "rkv.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        read_checkpoint(out)


def test_output_that_is_a_file_is_refused_before_fusing(source, tmp_path, monkeypatch) -> None:
    loaded, art = _calibrated(source)
    (tmp_path / "afile").write_text("x")

    def fused(*args, **kwargs):
        raise AssertionError("fused before checking the output path")

    monkeypatch.setattr("rkv_convert.export.writer.fuse_calibration", fused)
    with pytest.raises(NotADirectoryError, match="afile is a file, not a folder"):
        export_checkpoint(loaded, art, tmp_path / "afile", overwrite=True)


def test_export_removes_a_stale_temp_folder(source, tmp_path) -> None:
    loaded, art = _calibrated(source)
    stale = tmp_path / ".ck.rkv-tmp-999999999-abc"
    stale.mkdir()
    export_checkpoint(loaded, art, tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_truncated_weights_are_refused_by_name(source, tmp_path) -> None:
    loaded, art = _calibrated(source)
    out = export_checkpoint(loaded, art, tmp_path / "ck")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated or corrupt .*; re-export"):
        read_checkpoint(out)


def test_log8_group_metadata_export(source, tmp_path) -> None:
    """8-bit group metadata: the calibrated group ranges travel into the checkpoint (and its in-memory twin), the
    bases follow from them, and an artifact without ranges or with pre-RoPE keys is refused with the fix."""
    loaded, art = _calibrated(source)
    assert all(float(layer["key_group_range"]) > 0 and float(layer["value_group_range"]) > 0 for layer in art.layers)
    ck = read_checkpoint(export_checkpoint(loaded, art, tmp_path / "ck", bits=2, group_meta=GroupMeta.LOG8,
                                           key_bits=[3, 2]))  # fmt: skip
    assert ck.config.meta is GroupMeta.LOG8 and ck.config.key_bits_per_element == (3.25 + 2.25) / 2
    in_memory = checkpoint_from_artifact(art, bits=2, group_meta=GroupMeta.LOG8, key_bits=[3, 2])
    for i, (a, b) in enumerate(zip(in_memory.layers, ck.layers, strict=True)):
        assert a.key_group_range == b.key_group_range == float(art.layers[i]["key_group_range"])
        assert a.value_group_range == b.value_group_range
    k_base, v_base = ck.layers[0].meta_bases(3, 2)
    assert k_base == meta_scale_base(ck.layers[0].key_group_range, 3, ck.layers[0].key_clip)
    fp16 = read_checkpoint(export_checkpoint(load_model(str(source)), art, tmp_path / "fp16", bits=2))  # unfused weights
    assert fp16.layers[0].key_group_range is None and fp16.config.meta is GroupMeta.FP16
    old = type(art)(art.meta, art.key_rotation, art.value_rotation,
                    [{k: v for k, v in layer.items() if not k.endswith("group_range")} for layer in art.layers])
    with pytest.raises(CheckpointError, match="re-run `rkv calibrate`"):
        checkpoint_from_artifact(old, group_meta=GroupMeta.LOG8)
    prerope = type(art)({**art.meta, "options": {**art.meta["options"], "key_layout": "prerope"}}, art.key_rotation,
                        art.value_rotation, art.layers)  # fmt: skip
    with pytest.raises(CheckpointError, match="folded key layout"):
        checkpoint_from_artifact(prerope, group_meta=GroupMeta.LOG8)


def test_key_scale_is_fused_into_the_exported_weights(source, tmp_path) -> None:
    """The exported model's keys are the scaled keys the artifact's statistics describe, and its logits the source's."""
    loaded = load_model(str(source))
    batches = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    options = CalibrationOptions(num_samples=2, seqlen=32, batch_size=2, clip_samples=32, key_scale=1.0)
    art = calibrate(loaded.model, batches, options)
    ids = torch.randint(0, 128, (1, 21))
    with torch.no_grad():
        reference = loaded.model(ids).logits
    source_k = loaded.model.model.layers[0].self_attn.k_proj.weight.clone()
    out = export_checkpoint(loaded, art, tmp_path / "ck", bits=2)
    reloaded = load_model(str(out)).model
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference, rtol=0, atol=1e-4)
    scale = art.key_scales[0]
    torch.testing.assert_close(reloaded.model.layers[0].self_attn.k_proj.weight, source_k * scale[:, None], rtol=1e-6, atol=0)
    again = calibrate(reloaded, batches, CalibrationOptions(num_samples=2, seqlen=32, batch_size=2, clip_samples=32))
    for a, b in zip(again.layers, art.layers):  # keys of the exported weights = the keys the artifact was made from
        torch.testing.assert_close(a["key_mean"], b["key_mean"], rtol=1e-4, atol=1e-5)
    assert read_checkpoint(out).layers[0].key_mean.shape == scale.shape


def test_learned_value_rotations_are_fused_and_recorded(source, tmp_path) -> None:
    """The exported model's values are the source's times each KV head's learned rotation; the checkpoint records
    them (format version 7) for the baselines, and the logits stay the source's."""
    from rkv_convert.models.adapters import adapter_for

    loaded, art = _calibrated(source)
    assert all(layer["value_head_rotation"].shape == (2, 64, 64) for layer in art.layers)
    attn = loaded.model.model.layers[1].self_attn
    x = torch.randn(1, 5, loaded.model.config.hidden_size)
    ids = torch.randint(0, 128, (1, 21))
    with torch.no_grad():
        source_v = adapter_for(loaded.model.config).project(attn, x)[2]
        reference = loaded.model(ids).logits
    out = export_checkpoint(loaded, art, tmp_path / "ck", bits=2)
    reloaded = load_model(str(out)).model
    with torch.no_grad():
        v = adapter_for(reloaded.config).project(reloaded.model.layers[1].self_attn, x)[2]
        torch.testing.assert_close(reloaded(ids).logits, reference, rtol=0, atol=1e-4)
    learned = art.layers[1]["value_head_rotation"]
    torch.testing.assert_close(v, torch.einsum("bhtd,hde->bhte", source_v, learned), rtol=0, atol=1e-5)
    ck = read_checkpoint(out)
    assert ck.config.version == 7
    torch.testing.assert_close(ck.value_rotations()[1], learned)
    assert not torch.allclose(ck.value_rotations()[1], ck.value_rotation.expand(2, 64, 64), atol=1e-3)


def test_value_head_rotation_needs_version_7(source, tmp_path) -> None:
    loaded, art = _calibrated(source)
    out = export_checkpoint(loaded, art, tmp_path / "ck", bits=2)
    path = out / "config.json"
    full = json.loads(path.read_text())
    full["rkv"]["version"] = 6
    path.write_text(json.dumps(full))
    with pytest.raises(CheckpointError, match="value_head_rotation needs format version 7"):
        read_checkpoint(out)


@pytest.mark.parametrize("meta", list(GroupMeta))
def test_the_first_key_fit_is_written_for_each_layers_store(source, tmp_path, meta: GroupMeta) -> None:
    """Each layer's written ``key_head_rotation`` is its learned ``R_h`` turned by the first-key fit for the layer's
    own key width, clip and group metadata (the in-memory checkpoint the same); the calibrated first key is stored
    with less error than through ``R_h``; an artifact without ``key_first_token`` writes ``R_h`` unchanged."""
    from rkv_convert.quant.quantizer import dequantize, quantize

    loaded, art = _calibrated(source)
    key_bits = [3, 2]
    ck = read_checkpoint(export_checkpoint(loaded, art, tmp_path / "ck", bits=2, group_meta=meta, key_bits=key_bits))
    in_memory = checkpoint_from_artifact(art, bits=2, group_meta=meta, key_bits=key_bits)
    for i, (layer, written, kept) in enumerate(zip(art.layers, ck.layers, in_memory.layers, strict=True)):
        bits = key_bits[i]
        base = written.meta_bases(bits, 2)[0] if meta is GroupMeta.LOG8 else None
        assert torch.equal(written.key_head_rotation, kept.key_head_rotation)
        errors = []
        for rotation in (layer["key_head_rotation"], written.key_head_rotation):
            y = torch.einsum("hd,hde->he", layer["key_first_token"], rotation)
            back = dequantize(quantize(y, bits, 64, written.key_clip, meta_base=base))
            errors.append(float((back - y).norm() / y.norm()))
        assert errors[1] < 0.5 * errors[0], (i, errors)
    plain = type(art)(art.meta, art.key_rotation, art.value_rotation,
                      [{k: v for k, v in layer.items() if k != "key_first_token"} for layer in art.layers])
    for layer, written in zip(art.layers, checkpoint_from_artifact(plain, bits=2, group_meta=meta).layers):
        assert torch.equal(written.key_head_rotation, layer["key_head_rotation"])
