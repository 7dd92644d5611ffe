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
