"""The split-count sweep's baseline (``benchmarks/sweep_decode_splits.py``) is the former default rule."""

from __future__ import annotations

from benchmark_scripts import load_benchmark


def test_former_splits_reproduce_the_former_default() -> None:
    """The values the former ``default_splits`` test asserted (4 SMs, waves 8)."""
    former = load_benchmark("sweep_decode_splits").former_splits
    assert former(4, 1024, 128, 4) == 2  # 8 blocks: cdiv(2 * 4, 4)
    assert former(4, 4096, 128, 4) == 2
    assert former(4, 8192, 128, 4) == 4  # 64 blocks: 4 per SM
    assert former(4, 65536, 128, 4) == 8
    assert former(64, 1024, 128, 4) == 1
    assert former(8, 16384, 128, 132) == 128  # llama3-8b batch 1 at 16k on an H100: one block per split
