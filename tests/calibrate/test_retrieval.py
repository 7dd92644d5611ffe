"""Induction scores of the calibrator against the attention probabilities transformers' eager attention returns."""

import pytest
import torch
from tiny_models import LONGROPE_LIMIT, tiny_config

from rkv_convert.calibrate.retrieval import INDUCTION_LENGTH, induction_scores
from transformers import AutoModelForCausalLM


def _reference(model: torch.nn.Module, n_kv: int, copies: int, copy_len: int, seed: int) -> list[torch.Tensor]:
    """The same score from ``output_attentions`` of the family's own eager attention."""
    vocab = model.get_input_embeddings().weight.shape[0]
    first = torch.randint(0, vocab, (copies, copy_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        attn = model(torch.cat([first, first], 1), output_attentions=True, use_cache=False).attentions
    rows = torch.arange(copy_len + 1, 2 * copy_len)
    return [a[:, :, rows, rows - copy_len + 1].mean((0, 2)).reshape(n_kv, -1).amax(-1) for a in attn]


@pytest.mark.parametrize(
    "family, kwargs",
    [("llama", {}), ("qwen2", {}), ("phi4mini", {}), ("gemma2", {}), ("gemma3", {"sliding_window": 6})],
)  # GQA, biased projections, partial RoPE, soft cap and query scalar, a window shorter than the copy
def test_scores_match_eager_attention(family: str, kwargs: dict) -> None:
    config = tiny_config(family, n_heads=4, n_kv=2, layers=2, **kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    for layer in model.model.layers:  # sharper attention than the random init's near-uniform one
        for name, proj in layer.self_attn.named_modules():
            if isinstance(proj, torch.nn.Linear) and name != "o_proj":  # q, k, v (or Phi-3's fused qkv)
                proj.weight.data *= 3
    got = induction_scores(model, 2, seed=3, copies=2, copy_len=12)
    want = _reference(model, 2, 2, 12, 3)
    assert len(got) == 2 and all(g.shape == (2,) for g in got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-6)
    assert max(float(g.max()) for g in got) > 0.0


def test_both_copies_stay_within_a_longrope_limit() -> None:
    """Past ``original_max_position_embeddings`` rkv refuses a longrope forward: the copies shrink to half of it."""
    config = tiny_config("phi3_longrope", n_heads=4, n_kv=2, layers=2)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert 2 * INDUCTION_LENGTH > LONGROPE_LIMIT  # the default length would cross the limit
    got = induction_scores(model, 2, seed=1, copies=2)
    want = _reference(model, 2, 2, LONGROPE_LIMIT // 2, 1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-6)
