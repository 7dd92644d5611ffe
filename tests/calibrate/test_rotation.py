"""Learned key rotations: orthogonality, the objective agrees with the clip search's, and learning helps."""

import torch

from rkv_convert.calibrate.rotation import cayley, learn_rotation, weighted_error
from rkv_convert.calibrate.search import clip_error
from rkv_convert.quant.hadamard import hadamard_matrix


def test_cayley_is_orthogonal() -> None:
    r = cayley(torch.randn(16, 16, dtype=torch.float64))
    torch.testing.assert_close(r @ r.T, torch.eye(16, dtype=torch.float64))
    torch.testing.assert_close(cayley(torch.zeros(8, 8)), torch.eye(8))


def test_weighted_error_is_the_clip_search_objective() -> None:
    x, w, h = torch.randn(300, 32), torch.rand(32), hadamard_matrix(32)
    want = clip_error(x @ h, 2, 16, 0.8, None, w, h)
    assert abs(weighted_error(x, h, w, 2, 16, 0.8) - want) <= 1e-6 * want


def test_learning_lowers_the_real_error_from_the_hadamard() -> None:
    # keys whose energy sits in a few directions that the Hadamard spreads unevenly over its groups
    d = 32
    basis = torch.linalg.qr(torch.randn(d, d))[0]
    x = (torch.randn(2000, d) * torch.linspace(3.0, 0.05, d)) @ basis.T
    w = torch.rand(d) + 0.5
    h = hadamard_matrix(d)
    got = learn_rotation(x, w, h, bits=2, group_size=8, clip=0.9, steps=200, lr=5e-3)
    torch.testing.assert_close(got.rotation @ got.rotation.T, torch.eye(d), atol=1e-4, rtol=0)
    assert got.error_before == weighted_error(x, h, w, 2, 8, 0.9)
    assert got.error_after == weighted_error(x, got.rotation, w, 2, 8, 0.9)
    assert got.error_after < 0.9 * got.error_before
