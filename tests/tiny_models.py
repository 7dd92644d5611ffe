"""Tiny random models of every supported family, for tests that need shapes, not knowledge."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_config(family: str = "llama", head_dim: int = 64, n_heads: int = 4, n_kv: int = 2, layers: int = 2):
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
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    config = cls(**common)
    config._attn_implementation = "sdpa"
    return config


def tiny_model(family: str = "llama", seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kwargs), dtype=torch.float32)
    if hasattr(model.model.layers[0].self_attn, "q_proj") and model.model.layers[0].self_attn.q_proj.bias is not None:
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return model.eval()


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


def save_tiny_model(folder, family: str = "llama", seed: int = 0, **kwargs):
    """A loadable model folder (config, safetensors weights, tokenizer) for CLI and export tests."""
    model = tiny_model(family, seed=seed, **kwargs)
    tokenizer = tiny_tokenizer()
    assert len(tokenizer) <= model.config.vocab_size
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
