"""Calibration for the folded key layout: head groups of one, H_d, per-head permutations of post-RoPE keys."""

import pytest
import torch
from tiny_models import FAMILIES, tiny_model

from rkv_convert.calibrate.run import CalibrationOptions, calibrate
from rkv_convert.export.writer import checkpoint_from_artifact
from rkv_convert.quant.hadamard import hadamard_matrix


def _options(**kw) -> CalibrationOptions:
    return CalibrationOptions(num_samples=4, seqlen=32, batch_size=2, clip_samples=64, key_group_size=32, **kw)


def _batches() -> torch.Tensor:
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def test_folded_calibration_rotates_each_head_alone() -> None:
    model = tiny_model("qwen3", n_heads=4, n_kv=2, head_dim=64)
    art = calibrate(model, _batches(), _options(key_layout="folded"))
    assert art.meta["options"]["key_layout"] == "folded" and art.meta["options"]["head_group_size"] == 1
    torch.testing.assert_close(art.key_rotation, hadamard_matrix(64), rtol=0, atol=0)
    for layer in art.layers:
        perm = layer["key_perm"]
        for h in range(2):  # one permutation per KV head
            assert torch.equal(torch.sort(perm[h * 64 : (h + 1) * 64]).values, torch.arange(h * 64, (h + 1) * 64))
        assert torch.all((layer["key_clip_by_bits"] > 0) & (layer["key_clip_by_bits"] <= 1))
    ck = checkpoint_from_artifact(art, bits=2)
    assert ck.config.key_layout == "folded" and ck.config.head_group_size == 1
    # the permutation differs from the prerope one: it was decided on post-RoPE keys
    pre = calibrate(model, _batches(), _options(head_group_size=1, key_layout="prerope"))
    assert pre.meta["options"]["key_layout"] == "prerope"
    assert not torch.equal(pre.layers[0]["key_perm"], art.layers[0]["key_perm"])
    torch.testing.assert_close(pre.layers[0]["key_mean"], art.layers[0]["key_mean"], rtol=0, atol=0)


def test_folded_refuses_head_groups_and_unknown_layouts() -> None:
    model = tiny_model("llama", n_kv=2, head_dim=64)
    with pytest.raises(ValueError, match="head groups of 1"):
        calibrate(model, _batches(), _options(key_layout="folded", head_group_size=2))
    with pytest.raises(ValueError, match="key_layout must be one of prerope, folded"):
        calibrate(model, _batches(), _options(key_layout="postrope"))


def test_learned_rotations_are_orthonormal_stored_and_used(tmp_path) -> None:
    from rkv_convert.calibrate.artifact import load_artifact, save_artifact
    from rkv_convert.export.first_key import fit_first_key
    from rkv_convert.quant.codec import folded_head_rotations
    from rkv_convert.quant.quantizer import GroupMeta
    from rkv_convert.runtime.layer_codec import LayerCodec

    model = tiny_model("llama", n_kv=2, head_dim=64)
    art = calibrate(model, _batches(), _options(key_layout="folded", rotation_steps=30))
    plain = calibrate(model, _batches(), _options(key_layout="folded", learn_rotation=False))
    assert "key_head_rotation" not in plain.layers[0]
    for layer, base in zip(art.layers, plain.layers):
        r = layer["key_head_rotation"]
        assert r.shape == (2, 64, 64)
        torch.testing.assert_close(r @ r.transpose(1, 2), torch.eye(64).expand(2, 64, 64), atol=1e-4, rtol=0)
        assert torch.equal(layer["key_perm"], base["key_perm"])
    assert any(not torch.allclose(layer["key_head_rotation"], folded_head_rotations(art.key_rotation, layer["key_perm"], 64))
               for layer in art.layers)  # fmt: skip
    again = load_artifact(save_artifact(art, tmp_path / "art"))
    torch.testing.assert_close(again.layers[1]["key_head_rotation"], art.layers[1]["key_head_rotation"], rtol=0, atol=0)
    for layer, base in zip(again.layers, plain.layers):  # what --key-bits auto and --group-meta log8 read
        for errors in (layer["key_error_by_bits"], base["key_error_by_bits"]):
            assert errors.shape == (3,) and bool((errors[:-1] > errors[1:]).all()) and bool((errors > 0).all())
        assert float(layer["key_group_range"]) > 0 and float(layer["value_group_range"]) > 0
    ck = checkpoint_from_artifact(again, bits=2, group_meta=GroupMeta.FP16)
    codec = LayerCodec.from_checkpoint(ck.config, ck.key_rotation, ck.layers[1], torch.device("cpu"), 1)
    fitted = fit_first_key(art.layers[1]["key_head_rotation"], art.layers[1]["key_first_token"], 2, 32,
                           art.clip_for(1, 2, "key"))  # the export turns R_h by the first-key fit
    torch.testing.assert_close(codec.head_rotation, fitted, rtol=0, atol=0)
    with pytest.raises(ValueError, match="learned key rotations need the folded key layout"):
        calibrate(model, _batches(), _options(key_layout="prerope", learn_rotation=True))


def test_first_key_is_the_mean_centred_scaled_key_of_each_windows_first_token() -> None:
    """``key_first_token`` of layer 0 against the keys computed from the embeddings by hand: the mean over windows of
    ``k_proj(norm(embed(token 0))) * key_scale - key_mean`` per KV head (position 0: RoPE is the identity)."""
    model = tiny_model("llama", n_kv=2, head_dim=64)
    batches = _batches()
    art = calibrate(model, batches, _options(key_layout="folded", rotation_steps=5))
    layer0 = model.model.layers[0]
    with torch.no_grad():
        k = layer0.self_attn.k_proj(layer0.input_layernorm(model.model.embed_tokens(batches[:, 0])))
    expected = (k * art.layers[0]["key_scale"] - art.layers[0]["key_mean"]).mean(0).reshape(2, 64)
    assert all(layer["key_first_token"].shape == (2, 64) for layer in art.layers)
    torch.testing.assert_close(art.layers[0]["key_first_token"], expected, atol=1e-5, rtol=1e-5)
    plain = calibrate(model, batches, _options(key_layout="folded", rotation_steps=5, fit_first_key=False))
    for fitted, layer in zip(art.layers, plain.layers, strict=True):  # the observer changes nothing else
        assert set(fitted) - set(layer) == {"key_first_token"}
        assert [name for name in layer if not torch.equal(layer[name], fitted[name])] == []
    assert "key_first_token" not in calibrate(model, batches, _options(key_layout="prerope")).layers[0]
    with pytest.raises(ValueError, match="first-key fit needs the folded key layout"):
        calibrate(model, batches, _options(key_layout="prerope", fit_first_key=True))


def test_folded_keys_are_observed_at_positions_across_the_span(monkeypatch) -> None:
    """With ``rope_span`` the rotated-key pass RoPEs each centred key at a position drawn from [0, rope_span)
    (seeded), past the calibration window; the default (0) keeps the window's own positions (the model's cos/sin)."""
    from rkv_convert.calibrate import run

    seen: list[torch.Tensor] = []
    real_rope = run.rope

    def recording_rope(x, pos, inv_freq, scaling):
        seen.append(pos.clone())
        return real_rope(x, pos, inv_freq, scaling)

    monkeypatch.setattr(run, "rope", recording_rope)
    model = tiny_model("llama", n_kv=2, head_dim=64)
    opts = _options(key_layout="folded", learn_rotation=False, rope_span=512)
    art = calibrate(model, _batches(), opts)
    n_layers = model.config.num_hidden_layers
    assert len(seen) == n_layers * 2  # every layer, both batches of two windows
    pos = torch.cat([p.flatten() for p in seen])
    assert all(p.shape == (2, 32) for p in seen)
    assert int(pos.min()) >= 0 and int(pos.max()) < 512 and int(pos.max()) >= 32  # past the 32-token window
    assert pos.unique().numel() > pos.numel() // 2  # spread over the span, not a few values
    again = calibrate(model, _batches(), opts)  # seeded: the same positions, the same artifact
    for a, b in zip(art.layers, again.layers):
        for name in a:
            assert torch.equal(a[name], b[name]), name
    seen.clear()
    window = calibrate(model, _batches(), _options(key_layout="folded", learn_rotation=False))
    assert seen == []  # the model's own cos/sin
    assert window.meta["options"]["rope_span"] == 0 and art.meta["options"]["rope_span"] == 512
    assert any(not torch.equal(a["key_group_range"], b["key_group_range"]) for a, b in zip(art.layers, window.layers))


def test_rope_span_is_refused_where_it_cannot_apply() -> None:
    model = tiny_model("llama", n_kv=2, head_dim=64)
    with pytest.raises(ValueError, match="rope_span applies to the folded key layout"):
        calibrate(model, _batches(), _options(key_layout="prerope", head_group_size=1, rope_span=64))
    with pytest.raises(ValueError, match="rope_span must be >= 0"):
        calibrate(model, _batches(), _options(key_layout="folded", rope_span=-1))


@pytest.mark.parametrize("family", FAMILIES)
def test_keys_at_drawn_positions_use_the_models_own_rope(family, monkeypatch) -> None:
    """Drawn positions that happen to be the window's own give the window's artifact: the span path RoPEs keys
    exactly as the model does, in every family (partial RoPE, per-layer tables, longrope)."""
    from rkv_convert.calibrate import run

    monkeypatch.setattr(run, "_draw_positions", lambda b, t, span, g: torch.arange(t).expand(b, t))
    model = tiny_model(family, n_kv=2, head_dim=64)
    window = calibrate(model, _batches(), _options(key_layout="folded", learn_rotation=False))
    drawn = calibrate(model, _batches(), _options(key_layout="folded", learn_rotation=False, rope_span=64))
    for a, b in zip(window.layers, drawn.layers):
        for name in ("key_abs_mean_after", "key_group_range", "key_error_by_bits"):
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
