import math

import pytest
import torch

from rkv_convert.quant.packing import PackLayout, layout_for_bits, pack_codes, packed_width, unpack_codes
from rkv_convert.quant.quantizer import (RANGE_FRACTIONS, SCALE_FLOOR, GroupMeta, GroupRanges, bits_per_element, dequantize,
                                         fake_quantize, group_scale_zero, meta_scale_base, quantize, range_candidates,
                                         stored_group_meta)


def _naive_quantize(x: torch.Tensor, bits: int, g: int, clip: float, perm: torch.Tensor | None):
    """Group by group with scalar arithmetic in the documented order (independent of the vectorised code)."""
    rows, channels = x.shape
    order = perm.tolist() if perm is not None else list(range(channels))
    codes = torch.zeros(rows, channels, dtype=torch.uint8)
    scale = torch.zeros(rows, channels // g, dtype=torch.float16)
    zero = torch.zeros(rows, channels // g, dtype=torch.float16)
    top = 2**bits - 1
    for r in range(rows):
        for j in range(channels // g):
            idx = order[j * g : (j + 1) * g]
            vals = x[r, idx].float()
            hi, lo = vals.max() * clip, vals.min() * clip
            s = torch.clamp((hi - lo) / top, min=SCALE_FLOOR).half()
            z = lo.half()
            scale[r, j], zero[r, j] = s, z
            for c in idx:
                q = torch.round((x[r, c].float() - z.float()) / s.float())
                codes[r, c] = int(min(max(q.item(), 0), top))
    return codes, scale, zero


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("g,clip,permuted", [(16, 1.0, False), (32, 0.8, True), (64, 0.9, True)])
def test_codes_scales_zeros_bit_exact(bits: int, g: int, clip: float, permuted: bool) -> None:
    x = torch.randn(5, 128) * torch.linspace(0.2, 5, 128) + 0.3
    perm = torch.randperm(128) if permuted else None
    q = quantize(x, bits, g, clip, perm)
    codes, scale, zero = _naive_quantize(x, bits, g, clip, perm)
    assert torch.equal(q.codes, codes)
    assert torch.equal(q.scale, scale)
    assert torch.equal(q.zero, zero)


@pytest.mark.parametrize("bits,min_sqnr", [(2, 6.0), (3, 13.0), (4, 19.0)])
def test_sqnr_grows_with_bits(bits: int, min_sqnr: float) -> None:
    x = torch.randn(256, 128)
    y = fake_quantize(x, bits, 64)
    sqnr = 20 * math.log10(x.norm() / (x - y).norm())
    assert sqnr > min_sqnr


def test_permutation_only_regroups_channels() -> None:
    x = torch.randn(3, 64)
    perm = torch.randperm(64)
    q = quantize(x, 2, 16, 1.0, perm)
    shuffled = quantize(x[:, perm], 2, 16, 1.0)
    assert torch.equal(q.codes[:, perm], shuffled.codes)
    assert torch.equal(q.scale, shuffled.scale)
    torch.testing.assert_close(dequantize(q)[:, perm], dequantize(shuffled))


def test_constant_group_round_trips() -> None:
    x = torch.full((2, 32), 0.75)
    torch.testing.assert_close(fake_quantize(x, 2, 32), x, rtol=0, atol=1e-3)


def test_bits_per_element() -> None:
    assert bits_per_element(2, 128) == 2.25
    assert bits_per_element(2, 64) == 2.5
    assert bits_per_element(3, 32) == 4.0


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_round_trip_bit_exact(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (4, 3, 64), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == packed_width(64, bits) == 64 * bits // 8
    assert torch.equal(unpack_codes(packed, bits, 64), codes)


def test_documented_bit_orders() -> None:
    assert layout_for_bits(2) is PackLayout.U2_LSB4
    assert pack_codes(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[0b00111001]]
    assert pack_codes(torch.tensor([[5, 10]], dtype=torch.uint8), 4).tolist() == [[0xA5]]
    codes3 = torch.tensor([[7, 0, 5, 1, 2, 3, 4, 6]], dtype=torch.uint8)
    low = [0b01010011, 0b10001110]  # low two bits of (7,0,5,1) and (2,3,4,6): fields 3,0,1,1 and 2,3,0,2
    high = [0b11000101]  # high bits 1,0,1,0,0,0,1,1: channel j at bit j
    assert pack_codes(codes3, 3).tolist() == [low + high]


@pytest.mark.parametrize("bad", [dict(bits=5), dict(group_size=48), dict(clip=0.0), dict(clip=1.5)])
def test_bad_settings_are_refused(bad: dict) -> None:
    args = dict(bits=2, group_size=32, clip=1.0) | bad
    with pytest.raises(ValueError):
        quantize(torch.randn(2, 64), **args)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_log8_group_metadata_costs_little(bits: int) -> None:
    """8-bit scale and zero codes: within 2 % of fp16 metadata's squared error, the grid's centre within s'/8
    of the clipped range's, codes in range, and the decode is ``base * 2**(e/16)``, ``s' * z / 4``."""
    torch.manual_seed(bits)
    x = torch.randn(512, 128) * torch.rand(512, 1) * 3 + torch.randn(128) * 0.5
    g, clip = 64, 0.9
    grouped = x.unflatten(-1, (-1, g))
    base = meta_scale_base(float((grouped.amax(-1) - grouped.amin(-1)).max()), bits, clip)
    q = quantize(x, bits, g, clip, meta_base=base)
    assert q.scale.dtype == torch.uint8 and q.zero.dtype == torch.int8 and q.codes.max() <= (1 << bits) - 1
    err8 = (dequantize(q) - x).square().sum()
    err16 = (fake_quantize(x, bits, g, clip) - x).square().sum()
    assert err8 <= 1.02 * err16, (err8 / err16).item()
    s, z = group_scale_zero(q.scale, q.zero, base)
    torch.testing.assert_close(s, base * 2.0 ** (q.scale.double() / 16).float())
    torch.testing.assert_close(z, s * q.zero.float() / 4)
    L = (1 << bits) - 1
    centre = (grouped.amax(-1) + grouped.amin(-1)) * clip / 2
    assert ((z + L * s / 2 - centre).abs() <= s / 8 + 1e-6).all()
    assert bits_per_element(bits, g, GroupMeta.LOG8) == bits + 0.25 and GroupMeta.LOG8.dtypes == (torch.uint8, torch.int8)


def test_log8_scale_codes_saturate_outside_the_calibrated_range() -> None:
    """A group far above the calibrated range takes the largest code (its range is then clipped), one far below
    the smallest; both decode finite. A bad base is refused."""
    base = meta_scale_base(1e4, 2, 1.0)  # codes from 2**-15.9 to 4x of a 1e4-wide group's scale
    x = torch.stack([torch.linspace(-1e6, 1e6, 64), torch.linspace(-1e-3, 1e-3, 64)])
    q = quantize(x, 2, 64, meta_base=base)
    assert q.scale.flatten().tolist() == [255, 0] and torch.isfinite(dequantize(q)).all()
    with pytest.raises(ValueError, match="meta_base"):
        quantize(x, 2, 64, meta_base=0.0)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("meta_base", [None, 1e-3])
def test_searched_ranges_take_the_best_candidate(bits: int, meta_base: float | None) -> None:
    """Searched ranges: every group's error is the smallest over ``range_candidates`` (each candidate's error
    computed here from its own range), so never above min-max ranges at the layer's clip, and clearly below
    them overall at 2 bits."""
    torch.manual_seed(bits)
    x = torch.randn(3, 40, 128) * torch.rand(128) * 3 + torch.randn(128)
    clip, g = 0.9, 32
    grouped = x.reshape(3, 40, -1, g)
    errs = []
    for a, b in range_candidates(bits, clip):
        scale, zero = stored_group_meta(grouped.amax(-1) * b, grouped.amin(-1) * a, bits, meta_base)
        s, z = group_scale_zero(scale, zero, meta_base)
        codes = ((grouped - z[..., None]) / s[..., None]).round().clamp(0, 2**bits - 1)
        errs.append((codes * s[..., None] + z[..., None] - grouped).square().sum(-1))
    best = torch.stack(errs).min(0).values
    searched = dequantize(quantize(x, bits, g, clip, meta_base=meta_base, ranges=GroupRanges.SEARCHED))
    minmax = dequantize(quantize(x, bits, g, clip, meta_base=meta_base))
    err_s = (searched - x).reshape(3, 40, -1, g).square().sum(-1)
    err_m = (minmax - x).reshape(3, 40, -1, g).square().sum(-1)
    torch.testing.assert_close(err_s, best, rtol=1e-4, atol=1e-6)
    assert (err_s <= err_m * (1 + 1e-5) + 1e-7).all()
    if bits == 2:
        assert err_s.sum() < 0.8 * err_m.sum()


def test_range_candidates() -> None:
    assert range_candidates(2, 0.9) == [(0.9, 0.9)] + [(a, b) for a in RANGE_FRACTIONS[2] for b in RANGE_FRACTIONS[2]]
    with pytest.raises(ValueError, match="searched group ranges"):
        range_candidates(8, 1.0)
