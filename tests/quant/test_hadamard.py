import pytest
import torch

from rkv_convert.quant.hadamard import HadamardOrderError, hadamard_factors, hadamard_matrix, has_hadamard

SUPPORTED = [1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024]


@pytest.mark.parametrize("n", SUPPORTED)
def test_hadamard_is_orthogonal(n: int) -> None:
    h = hadamard_matrix(n, normalized=False, dtype=torch.float64)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    hn = hadamard_matrix(n)
    torch.testing.assert_close(hn @ hn.T, torch.eye(n), rtol=0, atol=1e-5)


def test_smollm2_group_is_12_times_16() -> None:
    assert hadamard_factors(192) == (12, 16)


@pytest.mark.parametrize("n", [3, 6, 10, 0])
def test_unknown_orders_are_refused(n: int) -> None:
    assert not has_hadamard(n)
    with pytest.raises(HadamardOrderError):
        hadamard_matrix(n)
