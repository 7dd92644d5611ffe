"""The store `rkv export` picks unless told: 8-bit metadata and raised key layers where measured, else the plain store."""

import pytest
import torch
from tiny_models import save_tiny_model

from rkv_convert.calibrate.allocate import key_bits_by_error
from rkv_convert.calibrate.run import CalibrationOptions, calibrate
from rkv_convert.export.format import CheckpointError
from rkv_convert.export.store_choice import choose_store
from rkv_convert.models.loading import load_model
from rkv_convert.quant.quantizer import GroupMeta, GroupRanges


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("src") / "model", "llama", n_kv=2, layers=4)
    loaded = load_model(str(folder))
    batches = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    return calibrate(loaded.model, batches, CalibrationOptions(num_samples=2, seqlen=32, batch_size=2, clip_samples=32))


def _with_layout(art, layout: str):
    return type(art)({**art.meta, "options": {**art.meta["options"], "key_layout": layout}}, art.key_rotation,
                     art.value_rotation, art.layers)  # fmt: skip


@pytest.mark.parametrize("bits", [2, 3])
def test_folded_default_is_log8_with_half_the_key_layers_raised(artifact, bits) -> None:
    store = choose_store(artifact, bits, None, None)
    errors = [layer["key_error_by_bits"].tolist() for layer in artifact.layers]
    assert store.group_meta is GroupMeta.LOG8 and store.group_ranges is GroupRanges.MINMAX
    assert store.key_bits == key_bits_by_error(errors, bits, len(artifact.layers) // 2)
    assert sorted(store.key_bits) == [bits, bits, bits + 1, bits + 1]
    assert store.note.startswith("--key-bits auto: keys at")


@pytest.mark.parametrize("layout,bits", [("prerope", 2), ("prerope", 3), ("folded", 4)])
def test_plain_store_where_log8_was_not_measured(artifact, layout, bits) -> None:
    store = choose_store(_with_layout(artifact, layout), bits, None, None)
    assert (store.group_meta, store.key_bits, store.group_ranges) == (GroupMeta.FP16, [bits] * 4, GroupRanges.MINMAX)


def test_given_options_win(artifact) -> None:
    assert choose_store(artifact, 2, None, GroupMeta.FP16).key_bits == [2, 2, 2, 2]  # fp16 metadata: nothing to pay with
    explicit = choose_store(artifact, 2, [3, 2, 2, 4], None)
    assert (explicit.group_meta, explicit.key_bits) == (GroupMeta.LOG8, [3, 2, 2, 4])
    with pytest.raises(CheckpointError, match="--bits must be 2 or 3"):
        choose_store(artifact, 4, "auto", None)
    with pytest.raises(CheckpointError, match="one of auto, retrieval"):
        choose_store(artifact, 2, "widest", None)
    assert choose_store(artifact, 2, None, None, GroupRanges.SEARCHED).group_ranges is GroupRanges.SEARCHED
    assert choose_store(artifact, 4, None, None, GroupRanges.SEARCHED).group_ranges is GroupRanges.SEARCHED
    with pytest.raises(CheckpointError, match="--group-ranges searched needs the folded key layout"):
        choose_store(_with_layout(artifact, "prerope"), 2, None, None, GroupRanges.SEARCHED)


def test_an_artifact_without_key_errors_is_refused_with_the_fix(artifact) -> None:
    old = type(artifact)(artifact.meta, artifact.key_rotation, artifact.value_rotation,
                         [{k: v for k, v in layer.items() if k != "key_error_by_bits"} for layer in artifact.layers])  # fmt: skip
    with pytest.raises(CheckpointError, match="re-run `rkv calibrate`, or pass --key-bits"):
        choose_store(old, 2, None, None)
    assert choose_store(old, 2, None, GroupMeta.FP16).key_bits == [2, 2, 2, 2]
