"""Random-weight Llama models calibrated on random tokens: what the speed and placement scripts run.

Speed and placement do not depend on the weights' values, and no real weights can be fetched.
"""

from __future__ import annotations

import time

import torch
from transformers import LlamaConfig

from rkv_convert.calibrate.artifact import CalibrationArtifact
from rkv_convert.calibrate.run import CalibrationOptions, calibrate
from rkv_convert.export.format import DEFAULT_KEY_LAYOUT, DEFAULT_SALIENT_TOKENS
from rkv_convert.export.fuse import fuse_calibration
from rkv_convert.export.store_choice import choose_store
from rkv_convert.export.writer import checkpoint_from_artifact
from rkv_convert.runtime.cache import CacheSettings
from rkv_convert.runtime.generate import RkvModel

__all__ = ["llama_config", "calibrated_rkv"]


def llama_config(*, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
                 max_positions: int = 4096) -> LlamaConfig:  # fmt: skip
    """A Llama config of the given shape (untied embeddings, SDPA attention)."""
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max(4096, max_positions), tie_word_embeddings=False)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    return cfg


def calibrated_rkv(
    model: torch.nn.Module, *, vocab: int, samples: int, seqlen: int, head_group: int | None, key_group: int,
    value_group: int, bits: int, permutation: str = "mean_abs", key_layout: str = DEFAULT_KEY_LAYOUT,
) -> tuple[RkvModel, CalibrationArtifact, float]:
    """Calibrate ``model`` on ``samples`` random windows of ``seqlen`` tokens, fuse its value rotation
    and wrap it with the packed cache `rkv export` writes by default (``export.store_choice``); returns the rkv
    model, the artifact and the calibration seconds.

    Key and value rotations stay Hadamard (``learn_rotation=False``, ``learn_value_rotation=False``): a
    learned rotation is just another orthogonal matrix to the kernels (value rotations are fused into the
    weights), so speed and placement do not change, while learning costs calibration time. Before the
    calibrator learned a layer's heads together on the model's device, the LLaMA-2-7B shape's 1,024 learned
    value rotations (about 0.75 s each on this project's CPU) kept the end-to-end and serving benchmarks from
    printing anything within 430 s on an H100 (twenty-ninth session)."""
    options = CalibrationOptions(source="random-tokens", num_samples=samples, seqlen=seqlen,
                                 head_group_size=head_group, key_group_size=key_group, value_group_size=value_group,
                                 perm_statistic=permutation, key_layout=key_layout, learn_rotation=False,
                                 learn_value_rotation=False)  # fmt: skip
    batches = torch.randint(0, vocab, (samples, seqlen), generator=torch.Generator().manual_seed(0))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    print(f"calibrating the random-weight model on {samples} random windows of {seqlen} tokens", flush=True)
    t0 = time.perf_counter()
    artifact = calibrate(model, batches, options)
    seconds = time.perf_counter() - t0
    store = choose_store(artifact, bits, None, None)
    print(f"rkv store: {store.note}; {DEFAULT_SALIENT_TOKENS} salient tokens (calibrated in {seconds:.1f} s)", flush=True)
    checkpoint = checkpoint_from_artifact(artifact, bits=bits, key_bits=store.key_bits, group_meta=store.group_meta,
                                          salient_tokens=DEFAULT_SALIENT_TOKENS, group_ranges=store.group_ranges)  # fmt: skip
    fuse_calibration(model, artifact)
    return RkvModel(model, checkpoint, settings=CacheSettings.from_config(checkpoint.config)), artifact, seconds
