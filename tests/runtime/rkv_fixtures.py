"""In-memory rkv checkpoints for tiny random models (until `rkv export` can make real ones).

``make_checkpoint`` calibrates lightly on random tokens: the key mean and a permutation sorted by
mean |rotated key| per head group come from the model's own pre-RoPE keys (``key_layout="folded"``:
head groups of one head, a Hadamard of order ``d``; the permutation sorted on the pre-RoPE rotated
keys is as valid a choice as any for tests), sink channels are the
hidden channels of largest |input|, with a threshold that flags a few tokens; the value Hadamard
is fused into ``v_proj``/``o_proj`` with export's own ``fuse_value_rotation``.
``write_folder`` writes an exported-style folder (HF weights + ``config.json["rkv"]`` +
``rkv.safetensors`` + a character-level tokenizer with a chat template).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from rkv_convert.export.fuse import fuse_value_rotation
from rkv_convert.export.format import Checkpoint, LayerTensors, RkvConfig, tensor_name
from rkv_convert.models.adapters import attach, head_dim, stock_attention, text_config
from rkv_convert.quant.codec import rotate_groups
from rkv_convert.quant.hadamard import hadamard_matrix


@torch.no_grad()
def _observe(model: torch.nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    keys, inputs, values = [], [], []

    def spy(module, q, k, v, pe, mask, cache, layer_input, **kw):
        keys.append(k.transpose(1, 2).reshape(-1, k.shape[1] * k.shape[3]).float().cpu())
        values.append(v.transpose(1, 2).reshape(-1, v.shape[1] * v.shape[3]).float().cpu())
        inputs.append(layer_input.reshape(-1, layer_input.shape[-1]).float().cpu())
        return stock_attention(module, q, k, v, pe, mask, None, layer_input, **kw)

    with attach(model, spy):
        model(ids.to(model.device), use_cache=False)
    return keys, inputs, values


def _largest_group_range(x: torch.Tensor, group: int) -> float:
    g = x.unflatten(-1, (-1, group))
    return float((g.amax(-1) - g.amin(-1)).max())


def make_checkpoint(
    model: torch.nn.Module,
    bits: int = 2,
    key_group_size: int = 64,
    value_group_size: int = 32,
    head_group_size: int | None = None,
    recent_window: int = 16,
    flush_block: int = 8,
    max_sinks: int = 4,
    clip: float = 1.0,
    sink_quantile: float = 0.97,
    seed: int = 0,
    permute: bool = True,
    key_layout: str = "prerope",
    group_meta: str = "fp16",
) -> Checkpoint:
    """A valid checkpoint for ``model`` whose value rotation is fused in place (see module docstring);
    ``group_meta="log8"``: 8-bit group metadata, group ranges from the observed keys (twice the rotated
    pre-RoPE range: RoPE mixes channel pairs) and values."""
    cfg = text_config(model.config)
    n_kv, d = cfg.num_key_value_heads, head_dim(model.config)
    g = head_group_size or (1 if key_layout == "folded" else n_kv)
    config = RkvConfig(
        bits=bits,
        key_group_size=key_group_size,
        value_group_size=value_group_size,
        head_group_size=g,
        num_layers=cfg.num_hidden_layers,
        num_key_value_heads=n_kv,
        head_dim=d,
        source_fingerprint="tiny-random",
        recent_window=recent_window,
        flush_block=flush_block,
        max_sinks=max_sinks,
        key_layout=key_layout,
        group_meta=group_meta,
    )
    key_rotation = hadamard_matrix(g * d)
    value_rotation = hadamard_matrix(d)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (4, 48), generator=gen)
    keys, inputs, values = _observe(model, ids)
    layers = []
    for k, h, v in zip(keys, inputs, values):
        mean = k.mean(0)
        y = rotate_groups(k - mean, key_rotation).abs().mean(0).view(-1, g * d)
        perm = torch.cat([torch.argsort(blk, descending=True) + i * g * d for i, blk in enumerate(y)])
        if not permute:  # key groups of consecutive rotated channels (calibrate --permutation none)
            perm = torch.arange(perm.numel())
        channels = torch.argsort(h.abs().amax(0), descending=True)[:3]
        threshold = torch.quantile(h[:, channels].abs().amax(-1), sink_quantile).item()
        ranges = {}
        if group_meta != "fp16":
            ranges = {"key_group_range": 2 * _largest_group_range(rotate_groups(k - mean, key_rotation), key_group_size),
                      "value_group_range": _largest_group_range(rotate_groups(v, value_rotation), value_group_size)}
        layers.append(LayerTensors(mean, perm, clip, clip, channels, threshold, **ranges))
    fuse_value_rotation(model, value_rotation)
    return Checkpoint(config, key_rotation, value_rotation, layers)


def char_tokenizer():
    """A character-level fast tokenizer (vocab 98) with a tiny chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(32, 127):
        vocab[chr(i)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>")
    fast.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}"
    return fast


def write_folder(checkpoint: Checkpoint, model: torch.nn.Module, tokenizer, path: str | Path) -> Path:
    """An exported-style folder: HF weights, ``config.json["rkv"]``, ``rkv.safetensors``, tokenizer."""
    folder = Path(path)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    config_path = folder / "config.json"
    full = json.loads(config_path.read_text())
    full["rkv"] = checkpoint.config.to_dict()
    config_path.write_text(json.dumps(full, indent=2, sort_keys=True))
    tensors = {"key_rotation": checkpoint.key_rotation.contiguous(), "value_rotation": checkpoint.value_rotation.contiguous()}
    for i, layer in enumerate(checkpoint.layers):
        tensors[tensor_name(i, "key_mean")] = layer.key_mean.contiguous()
        tensors[tensor_name(i, "key_perm")] = layer.key_perm.contiguous()
        tensors[tensor_name(i, "key_clip")] = torch.tensor(layer.key_clip)
        tensors[tensor_name(i, "value_clip")] = torch.tensor(layer.value_clip)
        tensors[tensor_name(i, "sink_channels")] = layer.sink_channels.contiguous()
        tensors[tensor_name(i, "sink_threshold")] = torch.tensor(layer.sink_threshold)
        for name in ("key_group_range", "value_group_range"):
            if getattr(layer, name) is not None:
                tensors[tensor_name(i, name)] = torch.tensor(getattr(layer, name), dtype=torch.float32)
    save_file(tensors, str(folder / "rkv.safetensors"))
    return folder


def tiny_serving_folder(out: str | Path) -> Path:
    """The tiny folded Qwen2 checkpoint folder the serving tests run (512 positions, window 4, flush 4, 2 sinks)."""
    from tiny_models import tiny_model

    torch.manual_seed(0)
    model = tiny_model("qwen2")
    ckpt = make_checkpoint(model, bits=2, recent_window=4, flush_block=4, max_sinks=2, key_layout="folded")
    return write_folder(ckpt, model, char_tokenizer(), out)


@torch.no_grad()
def decode_logits(model, cache, ids: torch.Tensor, steps: int, feed: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits of a prefill of ``ids`` and ``steps`` decode steps through ``cache`` (rkv attention attached).

    Greedy, or with ``feed [B, steps]`` those tokens instead (teacher-forced: a near-tie that picks
    another token must not make two backends' paths part).
    """
    from rkv_convert.models.compat import cache_kwargs
    from rkv_convert.runtime.attention import rkv_attention

    with attach(model, rkv_attention):
        out = model(ids, **cache_kwargs(model, cache), use_cache=True)
        logits = [out.logits[:, -1:]]
        for j in range(steps):
            new = out.logits[:, -1:].argmax(-1) if feed is None else feed[:, j : j + 1]
            out = model(new, **cache_kwargs(model, cache), use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, 1).float()
