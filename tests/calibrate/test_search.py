import pytest
import torch
from tiny_models import tiny_model

from rkv_convert.calibrate import search
from rkv_convert.calibrate.run import CalibrationOptions, calibrate
from rkv_convert.quant.hadamard import hadamard_matrix
from rkv_convert.quant.quantizer import fake_quantize


def _batches() -> torch.Tensor:
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def _options(**kw) -> CalibrationOptions:
    return CalibrationOptions(num_samples=4, seqlen=32, batch_size=2, clip_samples=64, **kw)


def test_default_head_group_size_needs_a_hadamard() -> None:
    assert search.default_head_group_size(3, 64) == 3  # 192 = 12 * 16
    assert search.default_head_group_size(8, 128) == 4  # 512, not 1024
    assert search.default_head_group_size(5, 64) == 5  # 320 = 20 * 16
    assert search.default_head_group_size(7, 128) == 1  # 896 too big, 128 alone


def test_permutation_sorts_each_head_group_by_magnitude() -> None:
    stat = torch.tensor([1.0, 5.0, 3.0, 2.0, 0.5, 4.0])
    assert search.channel_permutation(stat, 3).tolist() == [1, 2, 0, 5, 3, 4]


@pytest.mark.parametrize("statistic", search.PERM_STATISTICS)
def test_every_permutation_statistic_gives_a_block_permutation(statistic: str) -> None:
    rows = torch.randn(50, 8) * torch.tensor([1, 9, 2, 8, 3, 7, 4, 6.0])
    stats = {"abs_after": rows.abs().mean(0), "key_rows": rows}
    perm = search.permutation_for(statistic, stats, 4)
    assert torch.equal(perm[:4].sort().values, torch.arange(4)) and torch.equal(perm[4:].sort().values, torch.arange(4, 8))
    if statistic == "none":
        assert torch.equal(perm, torch.arange(8))
    else:
        assert perm[:2].tolist() == [1, 3]  # the two big channels of the first head group first
    with pytest.raises(ValueError, match="permutation statistic"):
        search.permutation_for("signed_sum", stats, 4)


def test_clip_search_prefers_clipping_heavy_tails_at_two_bits() -> None:
    rows = torch.randn(512, 64)
    rows[:, 0] *= 8  # one outlier channel per group: clipping it trades a little error for a finer grid
    clip, err = search.search_clip(rows, 2, 64, None)
    assert clip < 1.0
    assert err <= (fake_quantize(rows, 2, 64, 1.0) - rows).pow(2).mean().item()
    assert clip in search.CLIP_GRID


def test_weighted_clip_error_matches_a_direct_computation() -> None:
    rot = hadamard_matrix(8)
    rows = torch.randn(32, 16)
    weight = torch.rand(16)
    diff = fake_quantize(rows, 2, 8, 0.9) - rows
    back = torch.cat([diff[:, :8] @ rot.T, diff[:, 8:] @ rot.T], dim=1)
    expected = (back.pow(2) * weight).mean().item()
    assert search.clip_error(rows, 2, 8, 0.9, None, weight, rot) == pytest.approx(expected, rel=1e-5)
    # unit weights: the rotation is orthonormal, so the weighted error is the plain one
    assert search.clip_error(rows, 2, 8, 0.9, None, torch.ones(16), rot) == pytest.approx(
        search.clip_error(rows, 2, 8, 0.9, None), rel=1e-4)


def test_rope_pair_weights_share_energy_within_each_pair() -> None:
    q = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0])  # two heads of d=4: pairs (0,2), (1,3)
    assert search.rope_pair_weights(q, 4).tolist() == [4.0, 6.0, 4.0, 6.0, 40.0, 60.0, 40.0, 60.0]


def test_sink_channels_from_massive_tokens() -> None:
    token_max = torch.tensor([500.0, 1.0, 2.0, 300.0, 1.5])
    token_argmax = torch.tensor([7, 0, 1, 7, 2])
    channels, threshold, flagged = search.select_sink_channels(token_max, token_argmax, 1.0, 64.0, 8)
    assert channels.tolist() == [7] and threshold == 64.0 and flagged == 2
    none, inf, zero = search.select_sink_channels(token_max / 100, token_argmax, 1.0, 64.0, 8)
    assert none.numel() == 0 and inf == float("inf") and zero == 0


def test_sink_threshold_rises_when_a_channel_is_massive_in_every_token() -> None:
    """Gemma 3: channel 3 is far above ratio × median in all tokens; then the top 2 % of per-token
    maxima (the two tokens standing out, and two more) are sinks, not every token."""
    token_max = torch.full((200,), 900.0) + torch.arange(200.0)
    token_max[[0, 57]] = 50_000.0
    token_argmax = torch.full((200,), 3)
    token_argmax[57] = 5
    channels, threshold, flagged = search.select_sink_channels(token_max, token_argmax, 1.0, 64.0, 8)
    assert flagged == 4 and channels.tolist() == [3, 5]
    assert 1090 < threshold < 50_000
    few = token_max.clone()
    few[100:] = 10.0  # half the tokens massive: the ratio threshold stands
    assert search.select_sink_channels(few, token_argmax, 1.0, 64.0, 8)[1:] == (64.0, 100)


@pytest.mark.parametrize(
    "overrides",
    [dict(center_keys=False), dict(rotate_keys=False), dict(perm_statistic="max_abs"), dict(clip_objective="qk"),
     dict(key_clip=0.85, value_clip=0.95)],
)
def test_calibration_options_take_effect(overrides: dict) -> None:
    model = tiny_model("llama", n_kv=2, head_dim=64)
    art = calibrate(model, _batches(), _options(**overrides))
    layer = art.layers[0]
    if overrides.get("center_keys") is False:
        assert torch.equal(layer["key_mean"], torch.zeros(128))
    if overrides.get("rotate_keys") is False:
        assert torch.equal(art.key_rotation, torch.eye(art.key_rotation.shape[0]))
    if "key_clip" in overrides:
        assert layer["key_clip_by_bits"].tolist() == pytest.approx([0.85] * 3)
        assert layer["value_clip_by_bits"].tolist() == pytest.approx([0.95] * 3)
    assert art.meta["options"] | overrides == art.meta["options"]  # recorded in the artifact


@pytest.mark.parametrize("bad", [dict(perm_statistic="signed"), dict(clip_objective="kl"), dict(key_clip=1.5)])
def test_bad_search_options_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        calibrate(tiny_model("llama"), _batches(), _options(**bad))
