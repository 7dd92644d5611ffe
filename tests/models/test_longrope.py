"""Longrope (Phi-3-*-128k, Phi-4-mini) at the model boundary: rkv caches with the short factors and
longrope's attention factor, which transformers uses while a sequence stays within
``original_max_position_embeddings``, and refuses any attached forward that reaches past it."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import LONGROPE, LONGROPE_LIMIT, tiny_config, tiny_model

from rkv_convert.cli_checks import InputError, check_length, check_prompt_fits, context_length
from rkv_convert.models.adapters import RopeLimitError, attach, layer_rope, rope_limit, stock_attention


@pytest.mark.parametrize("family", LONGROPE)
def test_the_limit_comes_from_the_config(family: str) -> None:
    config = tiny_config(family)
    limit = rope_limit(config)
    assert limit is not None and limit.tokens == LONGROPE_LIMIT and "long factors" in limit.why
    assert context_length(config) == LONGROPE_LIMIT < config.max_position_embeddings
    assert rope_limit(tiny_config("phi3")) is None and context_length(tiny_config("phi3")) == 512


@pytest.mark.parametrize("family", LONGROPE)
def test_layer_rope_gives_the_short_factors_even_after_a_long_forward(family: str) -> None:
    """transformers rewrites ``inv_freq`` to the long factors in place once a forward goes past the limit;
    rkv's table stays the short one (what every sequence within the limit runs with)."""
    model = tiny_model(family)
    rotary = model.model.rotary_emb
    short = rotary.original_inv_freq.float().clone()
    with torch.no_grad():
        model(torch.randint(0, 128, (1, LONGROPE_LIMIT + 8)))  # stock model, no rkv: switches to the long factors
    assert not torch.allclose(rotary.inv_freq.float(), short)
    for inv_freq, scaling in layer_rope(model):
        torch.testing.assert_close(inv_freq[: short.shape[0]], short)
        assert scaling == pytest.approx(math.sqrt(1 + math.log(512 / LONGROPE_LIMIT) / math.log(LONGROPE_LIMIT)))


@pytest.mark.parametrize("family", LONGROPE)
def test_the_switch_past_the_limit_changes_the_logits(family: str) -> None:
    """Why rkv refuses: in transformers, one more token past the limit changes the logits of every earlier token."""
    model = tiny_model(family)
    ids = torch.randint(0, 128, (1, LONGROPE_LIMIT + 1))
    with torch.no_grad():
        within = model(ids[:, :LONGROPE_LIMIT]).logits
        past = model(ids).logits[:, :LONGROPE_LIMIT]
    assert (within - past).abs().max() > 1e-3


@pytest.mark.parametrize("family", LONGROPE)
def test_attached_forward_reproduces_the_model_up_to_the_limit_and_refuses_past_it(family: str) -> None:
    model = tiny_model(family)
    ids = torch.randint(0, 128, (2, LONGROPE_LIMIT + 1))
    with torch.no_grad():
        want = model(ids[:, :LONGROPE_LIMIT]).logits
        with attach(model, stock_attention):
            got = model(ids[:, :LONGROPE_LIMIT]).logits
            with pytest.raises(RopeLimitError, match=rf"position {LONGROPE_LIMIT} is past rkv's limit of {LONGROPE_LIMIT} "
                               r"tokens.*original_max_position_embeddings.*long factors"):  # fmt: skip
                model(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_the_command_checks_name_the_limit_and_why() -> None:
    config = tiny_config("phi3_longrope")
    check_length("--length", LONGROPE_LIMIT, config)
    check_prompt_fits(LONGROPE_LIMIT - 10, 10, config)
    with pytest.raises(InputError, match=rf"--length {LONGROPE_LIMIT + 1} is longer than rkv's limit of {LONGROPE_LIMIT} "
                       r"tokens for this model \(original_max_position_embeddings: longrope .*\); use --length 256 or less"):  # fmt: skip
        check_length("--length", LONGROPE_LIMIT + 1, config)
    with pytest.raises(InputError, match=r"that is 257, beyond rkv's limit of 256 tokens .*lower --max-new-tokens"):
        check_prompt_fits(LONGROPE_LIMIT - 10, 11, config)
