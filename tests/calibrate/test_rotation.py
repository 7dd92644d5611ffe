"""Learned key and value rotations: orthogonality, the objectives (the clip search's; the error after o_proj), learning helps."""

import pytest
import torch

from rkv_convert.calibrate.rotation import cayley, learn_rotations, output_metric, weighted_error, weighted_errors
from rkv_convert.calibrate.search import clip_error
from rkv_convert.quant.hadamard import hadamard_matrix


def test_cayley_is_orthogonal() -> None:
    r = cayley(torch.randn(16, 16, dtype=torch.float64))
    torch.testing.assert_close(r @ r.T, torch.eye(16, dtype=torch.float64))
    torch.testing.assert_close(cayley(torch.zeros(8, 8)), torch.eye(8))
    a = torch.randn(3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(cayley(a), torch.stack([cayley(m) for m in a]))


def test_weighted_error_is_the_clip_search_objective() -> None:
    x, w, h = torch.randn(300, 32), torch.rand(32), hadamard_matrix(32)
    want = clip_error(x @ h, 2, 16, 0.8, None, w, h)
    assert abs(weighted_error(x, h, w, 2, 16, 0.8) - want) <= 1e-6 * want


@pytest.mark.parametrize("objective", ["per-channel weight", "output metric"])
def test_learning_lowers_the_real_error_from_the_hadamard(objective: str) -> None:
    # rows whose energy sits in a few directions that the Hadamard spreads unevenly over its groups
    d = 32
    basis = torch.linalg.qr(torch.randn(d, d))[0]
    x = (torch.randn(2000, d) * torch.linspace(3.0, 0.05, d)) @ basis.T
    w = torch.rand(d) + 0.5 if objective == "per-channel weight" else output_metric(torch.randn(48, 2 * d), 1, d)[0]
    h = hadamard_matrix(d)
    got = learn_rotations(x[:, None], w[None], h[None], bits=2, group_size=8, clip=0.9, steps=200, lr=5e-3)
    r = got.rotation[0]
    torch.testing.assert_close(r @ r.T, torch.eye(d), atol=1e-4, rtol=0)
    assert float(got.error_before[0]) == weighted_error(x, h, w, 2, 8, 0.9)
    assert float(got.error_after[0]) == weighted_error(x, r, w, 2, 8, 0.9)
    assert got.error_after[0] < 0.9 * got.error_before[0]


@pytest.mark.parametrize("objective", ["per-channel weight", "output metric"])
def test_a_head_learned_in_a_batch_depends_on_its_own_rows_alone(objective: str) -> None:
    """The batched loss is the sum of the heads' own losses, so a head's rotation and errors are the same, bit for
    bit, whatever the other heads of the batch hold. (Against a batch of one head they agree only up to fp32
    summation order, which 60 Adam steps through a rounding quantizer amplify machine by machine.)"""
    n_kv, d = 3, 16

    def metric() -> torch.Tensor:
        if objective == "per-channel weight":
            return torch.rand(n_kv, d) + 0.5
        return output_metric(torch.randn(40, n_kv * d), n_kv, d)

    x = torch.randn(800, n_kv, d) * torch.linspace(2.0, 0.1, d)
    w = metric()
    h = hadamard_matrix(d).expand(n_kv, d, d)
    together = learn_rotations(x, w, h, bits=2, group_size=8, clip=0.9, steps=60, lr=5e-3)
    for i in range(n_kv):
        others_x, others_w = torch.randn_like(x) * 3.0, metric()  # other rows and weights, head i's own kept
        others_x[:, i], others_w[i] = x[:, i], w[i]
        mixed = learn_rotations(others_x, others_w, h, bits=2, group_size=8, clip=0.9, steps=60, lr=5e-3)
        torch.testing.assert_close(mixed.rotation[i], together.rotation[i], atol=0, rtol=0)
        torch.testing.assert_close(mixed.error_after[i], together.error_after[i], atol=0, rtol=0)
        j = (i + 1) % n_kv
        assert (mixed.rotation[j] - together.rotation[j]).abs().max() > 1e-2  # the other heads did change
    assert (together.error_after < together.error_before).all()
    torch.testing.assert_close(together.error_after, weighted_errors(x, together.rotation, w, 2, 8, 0.9))


def test_a_diagonal_root_is_the_per_channel_weight() -> None:
    x, w, h = torch.randn(300, 32), torch.rand(32), hadamard_matrix(32)
    want = weighted_error(x, h, w, 2, 16, 0.8)
    got = weighted_error(x, h, torch.diag(w.sqrt()), 2, 16, 0.8)
    assert abs(got - want) <= 1e-5 * want


def test_output_metric_is_the_error_after_o_proj() -> None:
    """``|e M_h|²`` is ``Σ_j |O_j e|²`` over the query heads ``j`` reading KV head ``h`` (up to one scale per head)."""
    n_kv, rep, d, out = 2, 3, 16, 40
    o_proj = torch.randn(out, n_kv * rep * d)
    metric = output_metric(o_proj, n_kv, d)
    e = torch.randn(5, d)
    for h in range(n_kv):
        cols = [o_proj[:, (h * rep + j) * d:(h * rep + j + 1) * d] for j in range(rep)]
        direct = sum((e @ c.T).pow(2).sum(-1) for c in cols)
        gram = sum(c.T @ c for c in cols)
        scale = gram.diagonal().mean()
        torch.testing.assert_close((e @ metric[h]).pow(2).sum(-1) * scale, direct, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_rotations_learned_on_cuda_are_those_learned_on_the_cpu() -> None:
    """The calibrator learns on the model's device: on CUDA the same optimisation, up to fp32 summation order (10
    steps: the suite shares one GPU among its workers, so every launch counts)."""
    n_kv, d = 4, 64
    x = torch.randn(2000, n_kv, d) * torch.linspace(2.0, 0.1, d)
    w = output_metric(torch.randn(96, 2 * n_kv * d), n_kv, d)
    h = hadamard_matrix(d).expand(n_kv, d, d)
    cpu = learn_rotations(x, w, h, bits=2, group_size=64, clip=0.9, steps=10, lr=5e-3)
    gpu = learn_rotations(x.cuda(), w, h, bits=2, group_size=64, clip=0.9, steps=10, lr=5e-3)
    assert gpu.rotation.is_cuda
    torch.testing.assert_close(gpu.error_before.cpu(), cpu.error_before, rtol=1e-4, atol=0)
    torch.testing.assert_close(gpu.error_after.cpu(), cpu.error_after, rtol=1e-2, atol=0)
    assert (gpu.error_after < gpu.error_before).all()
    r = gpu.rotation
    torch.testing.assert_close(r @ r.transpose(1, 2), torch.eye(d, device="cuda").expand(n_kv, d, d), rtol=0, atol=1e-4)
