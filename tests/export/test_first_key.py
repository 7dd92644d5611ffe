"""The first-key fit (rkv_convert.export.first_key) against the quantizer it fits for."""

import pytest
import torch

from rkv_convert.export.first_key import fit_first_key, reflection, stored_exactly
from rkv_convert.quant.quantizer import GroupRanges, dequantize, meta_scale_base, quantize


def _error(y: torch.Tensor, bits: int, group: int, clip: float, base: float | None, ranges=GroupRanges.MINMAX) -> float:
    back = dequantize(quantize(y[None], bits, group, clip, meta_base=base, ranges=ranges))[0]
    return float((back - y).norm() / y.norm())


def _orthogonal(d: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, generator=generator))[0]


def test_reflection_maps_one_vector_onto_another_of_equal_norm() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, generator=g)
    b = torch.randn(64, generator=g)
    b = b * (a.norm() / b.norm())
    f = reflection(a, b)
    torch.testing.assert_close(a @ f, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(f @ f.T, torch.eye(64), atol=1e-5, rtol=0)
    assert torch.equal(reflection(a, a.clone()), torch.eye(64))


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("meta", ["fp16", "log8"])
@pytest.mark.parametrize("ranges", list(GroupRanges))
def test_the_target_keeps_the_norm_and_is_stored_with_far_less_error(bits: int, meta: str, ranges: GroupRanges) -> None:
    g = torch.Generator().manual_seed(bits)
    d, group, clip = 128, 64, 0.9
    y0 = torch.randn(d, generator=g) * 3.0
    base = meta_scale_base(float(y0.max() - y0.min()) * 2, bits, clip) if meta == "log8" else None
    t = stored_exactly(y0, bits, group, clip, base, ranges)
    torch.testing.assert_close(t.norm(), y0.norm(), rtol=1e-5, atol=0)
    before, after = _error(y0, bits, group, clip, base, ranges), _error(t, bits, group, clip, base, ranges)
    assert after < 0.5 * before, (before, after)
    assert float(torch.nn.functional.cosine_similarity(t, y0, dim=0)) > 0.9  # a nearby vector, not any stored one


def test_fit_turns_each_head_so_its_first_key_is_stored_almost_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    n_kv, d, group, clip, bits = 3, 64, 64, 0.85, 2
    rotations = torch.stack([_orthogonal(d, g) for _ in range(n_kv)])
    first = torch.randn(n_kv, d, generator=g) * 5.0
    fitted = fit_first_key(rotations, first, bits, group, clip)
    assert fitted.shape == (n_kv, d, d) and fitted.dtype == torch.float32
    torch.testing.assert_close(fitted @ fitted.transpose(1, 2), torch.eye(d).expand(n_kv, d, d), atol=1e-5, rtol=0)
    for h in range(n_kv):
        before = _error(first[h] @ rotations[h], bits, group, clip, None)
        after = _error(first[h] @ fitted[h], bits, group, clip, None)
        assert after < 0.5 * before, (h, before, after)
