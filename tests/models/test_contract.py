"""The attention modules of every supported family still have what the adapters rely on.

Runs against whatever transformers is installed (CI runs the suite at both ends of the tested
range), and checks that a rename fails loudly, naming the family, the argument and the version.
"""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from tiny_models import FAMILIES, tiny_model

from rkv_convert.models.adapters import ContractError, adapter_for, attach, attention_modules, check_contract, stock_attention

VERSION = re.escape(transformers.__version__)


@pytest.mark.parametrize("family", FAMILIES)
def test_installed_attention_matches_the_adapter_contract(family: str) -> None:
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    for module in attention_modules(model):
        check_contract(adapter, module)


def _renamed_forward_model(family: str, forward) -> torch.nn.Module:
    model = tiny_model(family)
    for module in attention_modules(model):
        module.__class__ = type("Renamed" + type(module).__name__, (type(module),), {"forward": forward})
    return model


def test_a_renamed_cache_argument_fails_naming_family_argument_and_version() -> None:
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, kv_store=None, **kwargs):
        raise AssertionError("never called")

    model = _renamed_forward_model("llama", forward)
    with pytest.raises(ContractError, match=rf"llama family, transformers {VERSION}.*KV cache under none of cache, past_key_values"):
        with attach(model, stock_attention):
            pass


def test_a_missing_argument_fails_naming_it() -> None:
    def forward(self, hidden_states, position_embeddings=None, cache=None, **kwargs):
        raise AssertionError("never called")

    model = _renamed_forward_model("qwen3", forward)
    with pytest.raises(ContractError, match=rf"qwen3 family, transformers {VERSION}.*no argument 'attention_mask'"):
        check_contract(adapter_for(model.config), attention_modules(model)[0])


def test_a_missing_attribute_fails_naming_it() -> None:
    model = tiny_model("qwen3")
    module = attention_modules(model)[0]
    del module.k_norm
    with pytest.raises(ContractError, match=rf"qwen3 family, transformers {VERSION}.*no attribute 'k_norm'"):
        check_contract(adapter_for(model.config), module)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_the_adapted_forward_takes_the_cache_under_either_name(name: str) -> None:
    model = tiny_model("llama")
    seen = []

    def spy(module, q, k, v, pe, mask, cache, layer_input, **kw):
        seen.append(cache)
        return stock_attention(module, q, k, v, pe, mask, None, layer_input, **kw)

    sentinel = object()
    module = attention_modules(model)[0]
    hidden = torch.randn(1, 3, model.config.hidden_size)
    pe = model.model.rotary_emb(hidden, torch.arange(3)[None])
    with torch.no_grad(), attach(model, spy):
        module(hidden, position_embeddings=pe, attention_mask=None, **{name: sentinel})
    assert seen == [sentinel]
