import torch

from rkv_convert.quant.sinks import detect_sinks


def test_sinks_flagged_from_channels_and_capped() -> None:
    h = torch.randn(2, 10, 16)
    h[0, [0, 3, 7], 5] = 400.0
    h[1, 2, 9] = -300.0  # a channel outside the calibrated set is ignored
    flags = detect_sinks(h, torch.tensor([5, 11]), threshold=100.0, max_sinks=2)
    assert flags[0].nonzero().squeeze(1).tolist() == [0, 3]
    assert not flags[1].any()


def test_no_channels_means_no_sinks() -> None:
    assert not detect_sinks(torch.randn(1, 4, 8) * 1e4, torch.zeros(0, dtype=torch.long), float("inf"), 8).any()
