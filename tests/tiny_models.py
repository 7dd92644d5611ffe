"""Tiny random models of every supported family, for tests that need shapes, not knowledge."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "phi3", "phi3_longrope", "phi4mini",
            "gemma2", "gemma3")
"""One row per supported model type and RoPE variant (``phi3_longrope``: Phi-3 with longrope, as
Phi-3-*-128k; ``phi4mini``: longrope with ``partial_rotary_factor`` 0.75, as Phi-4-mini)."""

LONGROPE = ("phi3_longrope", "phi4mini")
"""Rows whose RoPE is longrope: sequences stay within ``LONGROPE_LIMIT`` tokens in rkv."""
LONGROPE_LIMIT = 256
"""``original_max_position_embeddings`` of the longrope rows (``max_position_embeddings`` is 512)."""

_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
_EXTRA = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(_MOE, num_experts=4, shared_expert_intermediate_size=32),
    "qwen3_moe": dict(_MOE, num_experts=4),
    "phi3": dict(bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "phi3_longrope": dict(bos_token_id=0, eos_token_id=0, pad_token_id=0, original_max_position_embeddings=LONGROPE_LIMIT),
    "phi4mini": dict(bos_token_id=0, eos_token_id=0, pad_token_id=0, partial_rotary_factor=0.75,
                     original_max_position_embeddings=LONGROPE_LIMIT),
    # query_pre_attn_scalar != head_dim so a wrong scale shows; random weights give scores ~0.1, so a cap of 0.1 bites
    "gemma2": dict(query_pre_attn_scalar=48, attn_logit_softcapping=0.1, final_logit_softcapping=30.0,
                   sliding_window=256, layer_types=None),
    "gemma3": dict(query_pre_attn_scalar=48, sliding_window=256, layer_types=["sliding_attention", "full_attention"],
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}),
}
_CONFIGS = {
    "llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mixtral": MixtralConfig,
    "qwen2_moe": Qwen2MoeConfig, "qwen3_moe": Qwen3MoeConfig, "phi3": Phi3Config, "phi3_longrope": Phi3Config, "phi4mini": Phi3Config,
    "gemma2": Gemma2Config, "gemma3": Gemma3TextConfig,
}


def tiny_config(family: str = "llama", head_dim: int = 64, n_heads: int = 4, n_kv: int = 2, layers: int = 2,
                sliding_window: int | None = None):
    """``sliding_window``: overrides the family's window (Gemma: its sliding layers; Mistral, Mixtral, Phi-3: every layer)."""
    common = dict(
        vocab_size=128,
        hidden_size=n_heads * head_dim,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    extra = dict(_EXTRA.get(family, {}))
    if family in ("gemma2", "gemma3") and extra.get("layer_types") is not None:
        extra["layer_types"] = (extra["layer_types"] * layers)[:layers]
    elif family == "gemma2":
        extra["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if sliding_window is not None:
        extra["sliding_window"] = sliding_window
    if family in LONGROPE:
        extra["rope_parameters"] = _longrope_parameters(int(head_dim * extra.get("partial_rotary_factor", 1.0)))
    config = _CONFIGS[family](**common, **extra)
    # Gemma 2's soft cap needs eager attention (SDPA refuses softcap); the others run SDPA
    config._attn_implementation = "eager" if family == "gemma2" else "sdpa"
    return config


def _longrope_parameters(rotary_dim: int) -> dict:
    """Short and long factors that differ in every pair (so a switch to the long ones shows)."""
    pairs = rotary_dim // 2
    return {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.05 * i for i in range(pairs)],
            "long_factor": [1.5 + 0.5 * i for i in range(pairs)]}


def tiny_model(family: str = "llama", seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kwargs), dtype=torch.float32)
    attn = model.model.layers[0].self_attn
    if hasattr(attn, "q_proj") and attn.q_proj.bias is not None:
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return model.eval()


def tiny_gemma3_multimodal(head_dim: int = 64, n_kv: int = 1, seed: int = 0) -> torch.nn.Module:
    """A tiny ``Gemma3ForConditionalGeneration`` (model type ``gemma3``): rkv adapts its text part."""
    from transformers import Gemma3Config

    text = tiny_config("gemma3", head_dim=head_dim, n_kv=n_kv).to_dict()
    vision = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=127)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def tiny_tokenizer():
    """A 128-token byte-level BPE trained on Python's docs (offline, seconds)."""
    import pydoc_data.topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<eos>"], initial_alphabet=[], show_progress=False)
    texts = list(pydoc_data.topics.topics.values())[:10]
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


CHAT_TEMPLATE = ("{% for m in messages %}<eos>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<eos>assistant: {% endif %}")


def tiny_chat_tokenizer():
    """:func:`tiny_tokenizer` with a minimal chat template (passkey tests)."""
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_chat_model(folder, n_kv: int = 2):
    """A tiny Llama folder whose tokenizer has the minimal chat template."""
    tiny_model("llama", n_kv=n_kv).save_pretrained(folder)
    tiny_chat_tokenizer().save_pretrained(folder)
    return folder


def save_tiny_model(folder, family: str = "llama", seed: int = 0, **kwargs):
    """A loadable model folder (config, safetensors weights, tokenizer) for CLI and export tests."""
    model = tiny_model(family, seed=seed, **kwargs)
    tokenizer = tiny_tokenizer()
    assert len(tokenizer) <= model.config.vocab_size
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
