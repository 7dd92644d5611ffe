"""The family-specific pieces of the adapters against transformers' own code: partial RoPE,
per-layer RoPE tables, the soft cap, and one tiny-model row per supported family."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, tiny_model

from rkv_convert.models.adapters import _full_width_rope, attach, attention_modules, layer_rope, layer_softcaps

NEW = ("mixtral", "qwen2_moe", "qwen3_moe", "phi3", "phi4mini", "gemma2", "gemma3")


def test_soft_cap_is_read_and_bites() -> None:
    """Gemma 2's cap reaches every layer, and it changes the logits (so the tests above exercise it)."""
    model = tiny_model("gemma2")
    assert layer_softcaps(model) == [0.1, 0.1]
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        capped = model(ids).logits
        for m in attention_modules(model):
            m.attn_logit_softcapping = None
        uncapped = model(ids).logits
    assert (capped - uncapped).abs().max() > 1e-2


def test_gemma3_layers_get_their_own_rope_base() -> None:
    model = tiny_model("gemma3")
    (local, _), (full, _) = layer_rope(model)
    rotary = model.model.rotary_emb
    assert [m.layer_type for m in attention_modules(model)] == ["sliding_attention", "full_attention"]
    torch.testing.assert_close(local, rotary.sliding_attention_inv_freq.float())
    torch.testing.assert_close(full, rotary.full_attention_inv_freq.float())
    assert not torch.allclose(local, full)


@pytest.mark.parametrize("head_dim,factor,scaling", [(64, 0.75, 1.0), (128, 0.5, 1.0), (96, 0.25, 1.0), (64, 0.75, 1.19)])
def test_partial_rope_as_full_width_rope_keeps_every_score(head_dim: int, factor: float, scaling: float) -> None:
    """Permuted q and k under the padded full-width RoPE give Phi-3's partial-RoPE q·k exactly, also when
    cos/sin carry an attention factor (longrope, Phi-4-mini) that transformers applies to the rotated channels only."""
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_rope

    rotary_dim = int(head_dim * factor)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    pos = torch.arange(9).float()
    emb = torch.cat([pos[:, None] * inv_freq] * 2, -1)[None]
    cos, sin = emb.cos() * scaling, emb.sin() * scaling
    q, k = torch.randn(1, 2, 9, head_dim), torch.randn(1, 2, 9, head_dim)
    q_ref, k_ref = phi3_rope(q, k, cos, sin)
    q_p, k_p, cos_f, sin_f = _full_width_rope(q, k, cos, sin, scaling)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q_f, k_f = apply_rotary_pos_emb(q_p, k_p, cos_f, sin_f)
    torch.testing.assert_close(q_f @ k_f.transpose(-1, -2), q_ref @ k_ref.transpose(-1, -2), rtol=1e-5, atol=1e-5)


def test_phi4mini_rope_table_is_padded_with_zero_frequencies() -> None:
    """Phi-4-mini (longrope, 48 of 64 channels rotated): the short factors padded with zero frequencies,
    and longrope's attention factor sqrt(1 + ln(max / original max) / ln(original max))."""
    import math

    model = tiny_model("phi4mini", head_dim=64)
    inv_freq, scaling = layer_rope(model)[0]
    assert inv_freq.shape == (32,) and scaling == pytest.approx(math.sqrt(1 + math.log(512 / 256) / math.log(256)))
    assert torch.equal(inv_freq[24:], torch.zeros(8)) and (inv_freq[:24] > 0).all()
    torch.testing.assert_close(inv_freq[:24], model.model.rotary_emb.original_inv_freq.float())


def test_every_row_is_a_supported_family() -> None:
    assert set(NEW) <= set(FAMILIES)
    for family in FAMILIES:
        with attach(tiny_model(family), lambda *a, **k: None):
            pass


@pytest.mark.parametrize("family", FAMILIES)
def test_each_attribute_the_adapter_relies_on_is_checked_by_name(family: str) -> None:
    """Removing any attribute an adapter reads fails the contract naming the family, the attribute and
    the installed transformers version (what a transformers release that renames it would see)."""
    import re

    import transformers

    from rkv_convert.models.adapters import ContractError, adapter_for, check_contract

    model = tiny_model(family)
    adapter = adapter_for(model.config)
    module = attention_modules(model)[0]
    check_contract(adapter, module)
    for name in adapter.attributes:
        saved = module.__dict__.get(name, None)
        in_modules = name in module._modules
        value = getattr(module, name)
        delattr(module, name)
        try:
            with pytest.raises(ContractError, match=rf"{adapter.name} family, transformers {re.escape(transformers.__version__)}\) has no attribute '{name}'"):
                check_contract(adapter, module)
        finally:
            if in_modules:
                module._modules[name] = value
            else:
                module.__dict__[name] = saved if saved is not None else value
        check_contract(adapter, module)


def test_soft_capped_models_run_eager_while_attached() -> None:
    """SDPA cannot cap scores (transformers 5.17 loads Gemma 2 with SDPA and drops the cap silently;
    5.24 refuses): while attached, a soft-capped model configured for SDPA runs eager attention."""
    from rkv_convert.models.adapters import stock_attention

    model = tiny_model("gemma2")
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        eager = model(ids).logits
        model.config._attn_implementation = "sdpa"
        with attach(model, stock_attention):
            assert model.config._attn_implementation == "eager"
            got = model(ids).logits
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)


def test_load_model_loads_soft_capped_models_eager(tmp_path) -> None:
    from tiny_models import save_tiny_model

    from rkv_convert.models.loading import load_model

    save_tiny_model(tmp_path / "m", "gemma2")
    assert load_model(str(tmp_path / "m")).model.config._attn_implementation == "eager"
