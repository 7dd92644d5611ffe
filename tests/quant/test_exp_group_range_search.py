"""The per-group range search of ``benchmarks/exp_group_range_search.py`` (an issue-12 experiment): with no
fractions it is the library's quantizer, bit for bit; with them no group's error grows."""

from __future__ import annotations

import pytest
import torch
from benchmark_scripts import load_benchmark

from rkv_convert.quant.quantizer import dequantize, meta_scale_base, quantize


@pytest.fixture(scope="module")
def exp():
    return load_benchmark("exp_group_range_search")


def _bases(x: torch.Tensor, bits: int, clip: float) -> list[float | None]:
    grouped = x.reshape(*x.shape[:-1], -1, 32)
    return [None, meta_scale_base(float((grouped.amax(-1) - grouped.amin(-1)).max()), bits, clip)]


@pytest.mark.parametrize("bits", [2, 3])
def test_only_the_layer_clip_is_the_library_quantizer(exp, bits: int) -> None:
    x = torch.randn(2, 3, 40, 64) * torch.rand(64) * 4
    for base in _bases(x, bits, 0.9):
        ours = exp.searched_quantize(x, bits, 32, 0.9, base, ())
        ref = quantize(x, bits, 32, 0.9, meta_base=base)
        assert torch.equal(ours.codes, ref.codes)
        assert torch.equal(ours.scale, ref.scale) and torch.equal(ours.zero, ref.zero)


def test_search_never_raises_a_groups_error(exp) -> None:
    x = torch.randn(2, 3, 40, 64) * torch.rand(64) * 4
    for base in _bases(x, 2, 1.0):
        def group_err(q):
            return (dequantize(q) - x).square().reshape(2, 3, 40, 2, 32).sum(-1)

        searched = group_err(exp.searched_quantize(x, 2, 32, 1.0, base, (1.0, 0.9, 0.8, 0.7, 0.6)))
        plain = group_err(quantize(x, 2, 32, 1.0, meta_base=base))
        assert (searched <= plain + 1e-6 * plain).all()
        assert searched.sum() < 0.95 * plain.sum()  # the search finds better ranges for random groups
