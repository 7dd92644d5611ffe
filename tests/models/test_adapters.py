import pytest
import torch
from tiny_models import FAMILIES, tiny_config, tiny_model

from rkv_convert.models.adapters import UnsupportedModelError, adapter_for, attach, attention_modules, stock_attention


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_stock_handler_reproduces_logits(family: str, head_dim: int) -> None:
    model = tiny_model(family, head_dim=head_dim)
    ids = torch.randint(0, 128, (2, 17))
    with torch.no_grad():
        expected = model(ids).logits
        with attach(model, stock_attention):
            got = model(ids).logits
        after = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)
    assert all("forward" not in m.__dict__ for m in attention_modules(model))


def test_generate_through_adapter_matches_stock() -> None:
    model = tiny_model("qwen3")
    ids = torch.randint(0, 128, (1, 9))
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    with attach(model, stock_attention):
        got = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)


def test_handler_sees_pre_rope_keys_and_layer_input() -> None:
    model = tiny_model("llama")
    seen = []

    def spy(module, q, k, v, pe, mask, cache, layer_input, **kw):
        seen.append((module.layer_idx, k.detach().clone(), layer_input))
        return stock_attention(module, q, k, v, pe, mask, cache, layer_input, **kw)

    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad(), attach(model, spy):
        model(ids)
        hidden = model.model.embed_tokens(ids)
        attn = model.model.layers[0].self_attn
        k_expected = attn.k_proj(model.model.layers[0].input_layernorm(hidden)).view(1, 5, -1, 64).transpose(1, 2)
    assert [s[0] for s in seen] == [0, 1]
    torch.testing.assert_close(seen[0][1], k_expected)
    torch.testing.assert_close(seen[0][2], hidden)


def test_unsupported_architecture_names_supported_ones() -> None:
    config = tiny_config("llama")
    config.model_type = "gpt2"
    with pytest.raises(UnsupportedModelError, match="llama.*mistral.*qwen2.*qwen3"):
        adapter_for(config)
