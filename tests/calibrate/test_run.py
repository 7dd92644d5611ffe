import hashlib

import pytest
import torch
from tiny_models import tiny_model

from rkv_convert.calibrate.artifact import load_artifact, save_artifact
from rkv_convert.calibrate.run import CalibrationOptions, calibrate
from rkv_convert.export.format import CheckpointError


def _options(**kw) -> CalibrationOptions:
    """Light settings for the pre-RoPE layout (head groups, grouped rotation); folded: test_calibrate_folded.py."""
    return CalibrationOptions(**{"num_samples": 4, "seqlen": 32, "batch_size": 2, "clip_samples": 64, "key_layout": "prerope", **kw})


def _batches(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(seed))


def _digest(folder) -> str:
    return "".join(hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in sorted(p.name for p in folder.iterdir()))


def test_calibration_is_bit_identical_for_a_seed(tmp_path) -> None:
    model = tiny_model("llama", n_kv=2, head_dim=64)
    a = save_artifact(calibrate(model, _batches(), _options()), tmp_path / "a")
    b = save_artifact(calibrate(model, _batches(), _options()), tmp_path / "b")
    assert _digest(a) == _digest(b)


def test_artifact_contents(tmp_path) -> None:
    model = tiny_model("qwen3", n_kv=2, head_dim=64)
    art = calibrate(model, _batches(), _options(head_group_size=2, key_group_size=32))
    loaded = load_artifact(save_artifact(art, tmp_path / "cal"))
    assert loaded.meta["options"]["head_group_size"] == 2
    assert loaded.key_rotation.shape == (128, 128)
    torch.testing.assert_close(loaded.key_rotation @ loaded.key_rotation.T, torch.eye(128), rtol=0, atol=1e-5)
    for layer in loaded.layers:
        perm = layer["key_perm"]
        assert torch.equal(torch.sort(perm).values, torch.arange(128))  # one head group: any order of its 128
        assert layer["key_clip_by_bits"].shape == (3,)
        assert torch.all((layer["key_clip_by_bits"] > 0) & (layer["key_clip_by_bits"] <= 1))
    # the mean is the mean of the pre-RoPE keys, scaled by the key scale: check layer 0 directly
    with torch.no_grad():
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(_batches()))
        attn = model.model.layers[0].self_attn
        k = attn.k_norm(attn.k_proj(hidden).view(4, 32, 2, 64)).reshape(-1, 128)
    scale = loaded.layers[0]["key_scale"]
    assert torch.equal(scale.reshape(2, 64), scale[:64].expand(2, 64))  # Qwen 3: one scale for all heads
    torch.testing.assert_close(loaded.layers[0]["key_mean"], k.mean(0) * scale, rtol=0, atol=1e-5)


def test_permutation_stays_inside_head_groups() -> None:
    model = tiny_model("llama", n_heads=4, n_kv=4, head_dim=64)
    art = calibrate(model, _batches(), _options(head_group_size=2))
    perm = art.layers[0]["key_perm"]
    for group in range(2):
        block = perm[group * 128 : (group + 1) * 128]
        assert torch.equal(torch.sort(block).values, torch.arange(group * 128, (group + 1) * 128))


@pytest.mark.parametrize(
    "bad,match",
    [(dict(head_group_size=3), "does not divide"), (dict(key_group_size=48), "must divide"), (dict(value_group_size=40), "must divide")],
)
def test_bad_options_are_refused(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        calibrate(tiny_model("llama"), _batches(), _options(**bad))


def test_corrupt_or_missing_artifacts_are_refused(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not a calibration artifact"):
        load_artifact(tmp_path)
    folder = save_artifact(calibrate(tiny_model("llama"), _batches(), _options()), tmp_path / "cal")
    (folder / "calibration.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_artifact(folder)


def test_save_refuses_to_overwrite_and_leaves_nothing(tmp_path) -> None:
    art = calibrate(tiny_model("llama"), _batches(), _options())
    save_artifact(art, tmp_path / "cal")
    with pytest.raises(FileExistsError):
        save_artifact(art, tmp_path / "cal")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal"]


def test_offloaded_weights_are_refused_before_any_pass() -> None:
    """A model placed with disk offload (meta parameters) gets a clear error, not a crash at the end."""
    model = tiny_model("llama")
    layer = model.model.layers[1].mlp.down_proj
    layer.weight = torch.nn.Parameter(torch.empty_like(layer.weight, device="meta"))
    with pytest.raises(ValueError, match="offloaded to disk.*model.layers.1.mlp.down_proj.weight"):
        calibrate(model, _batches(), _options())


def test_save_removes_a_stale_temp_folder_and_refuses_a_file(tmp_path) -> None:
    art = calibrate(tiny_model("llama"), _batches(), _options())
    (tmp_path / ".cal.rkv-tmp-999999999-abc").mkdir()
    save_artifact(art, tmp_path / "cal")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="afile is a file, not a folder"):
        save_artifact(art, tmp_path / "afile", overwrite=True)


def test_learned_value_rotations_lower_the_error_after_o_proj(tmp_path) -> None:
    """Per layer and KV head an orthogonal value rotation that quantizes the values with less error after o_proj
    than the Hadamard does (on the calibration's own windows); off, the artifact has none."""
    from rkv_convert.calibrate.rotation import output_metric, weighted_error
    from rkv_convert.calibrate.run import _run_pass

    model = tiny_model("llama", n_kv=2, head_dim=64)
    art = load_artifact(save_artifact(calibrate(model, _batches(), _options()), tmp_path / "cal"))
    plain = calibrate(model, _batches(), _options(learn_value_rotation=False))
    assert art.meta["artifact_version"] == 4 and all("value_head_rotation" not in layer for layer in plain.layers)
    values: dict[int, torch.Tensor] = {}
    _run_pass(model, _batches(), 2, lambda i, q, k, v, h: values.setdefault(i, v.transpose(1, 2).reshape(-1, 2, 64)),
              "values", None)
    better = 0
    for i, layer in enumerate(art.layers):
        r = layer["value_head_rotation"]
        torch.testing.assert_close(r @ r.transpose(1, 2), torch.eye(64).expand(2, 64, 64), rtol=0, atol=1e-4)
        metric = output_metric(model.model.layers[i].self_attn.o_proj.weight, 2, 64)
        for h in range(2):
            learned = weighted_error(values[i][:, h], r[h], metric[h], 2, 64, art.clip_for(i, 2, "value"))
            hadamard = weighted_error(values[i][:, h], plain.value_rotation, metric[h], 2, 64, plain.clip_for(i, 2, "value"))
            better += learned < hadamard
    assert better == 2 * len(art.layers)
