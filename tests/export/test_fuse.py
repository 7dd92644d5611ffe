import pytest
import torch
from tiny_models import FAMILIES, tiny_model

from rkv_convert.export.fuse import fuse_value_rotation
from rkv_convert.models.adapters import adapter_for
from rkv_convert.quant.hadamard import hadamard_matrix


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head_dim,n_kv", [(64, 2), (128, 4), (256, 1)])
def test_fused_value_rotation_keeps_logits(family: str, head_dim: int, n_kv: int) -> None:
    model = tiny_model(family, head_dim=head_dim, n_heads=4, n_kv=n_kv)
    ids = torch.randint(0, 128, (2, 13))
    with torch.no_grad():
        before = model(ids).logits
        proj, rows = adapter_for(model.config).value_rows(model.model.layers[0].self_attn)
        v_before, other_before = proj.weight[rows].clone(), proj.weight[: rows.start].clone()
        fuse_value_rotation(model, hadamard_matrix(head_dim))
        after = model(ids).logits
    assert not torch.allclose(proj.weight[rows], v_before)
    assert torch.equal(proj.weight[: rows.start], other_before)  # a fused qkv_proj's q and k rows untouched
    torch.testing.assert_close(after, before, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_fused_values_are_the_rotated_values(family: str) -> None:
    model = tiny_model(family, head_dim=64)
    attn = model.model.layers[1].self_attn
    project = adapter_for(model.config).project
    x = torch.randn(1, 3, model.config.hidden_size)
    h = hadamard_matrix(64)
    with torch.no_grad():
        v = project(attn, x)[2]
        fuse_value_rotation(model, h)
        v_rot = project(attn, x)[2]
    torch.testing.assert_close(v_rot, v @ h, rtol=0, atol=1e-5)


def _orthogonal(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, d, d, generator=g))[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_per_head_value_rotations_keep_logits(family: str) -> None:
    """Learned value rotations: one orthogonal matrix per layer and KV head (GQA: 4 query heads on 2 KV heads)."""
    model = tiny_model(family, head_dim=64, n_heads=4, n_kv=2)
    n_layers = len(model.model.layers)
    rotations = [_orthogonal(2, 64, seed) for seed in range(n_layers)]
    ids = torch.randint(0, 128, (2, 13))
    with torch.no_grad():
        before = model(ids).logits
        fuse_value_rotation(model, rotations)
        after = model(ids).logits
        fuse_value_rotation(model, [r.transpose(-1, -2) for r in rotations])
        back = model(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-4)
    torch.testing.assert_close(back, before, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="value rotations for"):
        fuse_value_rotation(model, rotations[:-1])


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_each_kv_head_gets_its_own_value_rotation(family: str) -> None:
    model = tiny_model(family, head_dim=64, n_heads=4, n_kv=2)
    attn = model.model.layers[1].self_attn
    project = adapter_for(model.config).project
    x = torch.randn(1, 3, model.config.hidden_size)
    rotations = [_orthogonal(2, 64, seed) for seed in range(len(model.model.layers))]
    with torch.no_grad():
        v = project(attn, x)[2]
        fuse_value_rotation(model, rotations)
        v_rot = project(attn, x)[2]
    torch.testing.assert_close(v_rot, torch.einsum("bhtd,hde->bhte", v, rotations[1]), rtol=0, atol=1e-5)
