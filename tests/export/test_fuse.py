import pytest
import torch
from tiny_models import FAMILIES, tiny_model

from rkv_convert.export.fuse import fuse_value_rotation
from rkv_convert.quant.hadamard import hadamard_matrix


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head_dim,n_kv", [(64, 2), (128, 4), (256, 1)])
def test_fused_value_rotation_keeps_logits(family: str, head_dim: int, n_kv: int) -> None:
    model = tiny_model(family, head_dim=head_dim, n_heads=4, n_kv=n_kv)
    ids = torch.randint(0, 128, (2, 13))
    with torch.no_grad():
        before = model(ids).logits
        v_before = model.model.layers[0].self_attn.v_proj.weight.clone()
        fuse_value_rotation(model, hadamard_matrix(head_dim))
        after = model(ids).logits
    assert not torch.allclose(model.model.layers[0].self_attn.v_proj.weight, v_before)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-4)


def test_fused_values_are_the_rotated_values() -> None:
    model = tiny_model("qwen2", head_dim=64)
    attn = model.model.layers[1].self_attn
    x = torch.randn(3, attn.v_proj.in_features)
    h = hadamard_matrix(64)
    with torch.no_grad():
        v = attn.v_proj(x).reshape(3, -1, 64)
        fuse_value_rotation(model, h)
        v_rot = attn.v_proj(x).reshape(3, -1, 64)
    torch.testing.assert_close(v_rot, v @ h, rtol=0, atol=1e-5)
