"""Long-context perplexity: the query-chunked attention equals the dense T×T math it replaced."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from rkv_convert.calibrate.run import CalibrationOptions, calibrate
from rkv_convert.export.fuse import fuse_calibration
from rkv_convert.export.writer import checkpoint_from_artifact
from rkv_convert.evaluate.perplexity import PROTOCOLS, _kept_fp_attention, _Shape, perplexity
from rkv_convert.evaluate.schemes import SCHEME_NAMES, KIVI, build_scheme
from rkv_convert.models.adapters import attach
from rkv_convert.quant.sinks import detect_sinks


def _dense(q, k_q, v_q, k_fp, v_fp, sinks, window, scale):
    """The evaluation's former deployed attention: full ``[B, H, T, T]`` scores, one per read-back."""
    rep = q.shape[1] // k_q.shape[1]
    t = q.shape[2]
    pos = torch.arange(t)
    keep_fp = ((pos[:, None] - pos[None, :]) < window).unsqueeze(0).expand(q.shape[0], t, t)
    if sinks is not None:
        keep_fp = keep_fp | sinks[:, None, :]
    keep_fp = keep_fp.unsqueeze(1)
    s_fp = q.float() @ repeat_kv(k_fp, rep).float().transpose(-1, -2)
    s_q = q.float() @ repeat_kv(k_q, rep).float().transpose(-1, -2)
    scores = torch.where(keep_fp, s_fp, s_q) * scale
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return (probs * keep_fp) @ repeat_kv(v_fp, rep).float() + (probs * ~keep_fp) @ repeat_kv(v_q, rep).float()


class _DenseHandler:
    """The evaluation's attention handler before query chunking (``model(ids).logits``, T×T masks)."""

    def __init__(self, scheme, protocol, checkpoint, window):
        self.scheme, self.protocol, self.checkpoint = scheme, protocol, checkpoint
        self.window = 0 if protocol == "sinks" else window

    def __call__(self, module, query, key, value, position_embeddings, attention_mask, cache, layer_input, **kw):
        cos, sin = position_embeddings
        q = apply_rotary_pos_emb(query, query, cos, sin)[0]
        kq = self.scheme.keys(module.layer_idx, key, cos, sin)
        vq = self.scheme.values(module.layer_idx, value)
        rep = module.num_key_value_groups
        if self.protocol == "oneshot" or self.scheme.bits >= 16:
            out = F.scaled_dot_product_attention(q, repeat_kv(kq, rep), repeat_kv(vq, rep), is_causal=True, scale=module.scaling)
        else:
            sinks = None
            if self.scheme.uses_sinks:
                info = self.checkpoint.layers[module.layer_idx]
                sinks = detect_sinks(layer_input, info.sink_channels, info.sink_threshold, self.checkpoint.config.max_sinks)
            k_fp = apply_rotary_pos_emb(key, key, cos, sin)[1]
            out = _dense(q, kq, vq, k_fp, value, sinks, self.window, module.scaling).to(q.dtype)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


@pytest.mark.parametrize("window", [0, 1, 5, 16, 100])
@pytest.mark.parametrize("chunk", [1, 7, 16, 40])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_chunked_attention_matches_dense_math(window, chunk, with_sinks) -> None:
    b, hq, hkv, t, d = 2, 6, 2, 40, 16
    q, k_q, v_q, k_fp, v_fp = (torch.randn(b, h, t, d) for h in (hq, hkv, hkv, hkv, hkv))
    sinks = None
    if with_sinks:
        sinks = torch.zeros(b, t, dtype=torch.bool)
        sinks[0, [0, 3, 30]] = True
        sinks[1, [0, 39]] = True
    out = _kept_fp_attention(q, k_q, v_q, k_fp, v_fp, sinks, window, _Shape(0.25), chunk)
    torch.testing.assert_close(out, _dense(q, k_q, v_q, k_fp, v_fp, sinks, window, 0.25), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def lab():
    """A tiny model, its 2-bit checkpoint with sinks that fire, and two 40-token windows."""
    torch.manual_seed(0)
    model = tiny_model("llama", n_kv=2, head_dim=64)
    cal = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    artifact = calibrate(model, cal, CalibrationOptions(num_samples=4, seqlen=32, batch_size=2, clip_samples=64))
    ck = checkpoint_from_artifact(artifact, 2, recent_window=6, max_sinks=3)
    fuse_calibration(model, artifact)
    # A random model has no massive activations: flag its largest hidden channels so the sink path runs.
    ck.layers = [dataclasses.replace(layer, sink_channels=torch.arange(8), sink_threshold=0.05) for layer in ck.layers]
    windows = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    # float64 activations: float32 rounding differences between the two attention paths reach the next layer and can
    # flip a 2-bit code there (a whole head's key after the inverse rotation), which no tolerance on the math covers
    return model.double(), ck, windows


def _schemes(ck):
    yield from (build_scheme(name, 2, ck) for name in SCHEME_NAMES)
    yield KIVI(name="kivi", bits=2, value_rotations=ck.value_rotations(), uses_sinks=True)


def _dense_perplexity(model, windows, scheme, protocol, ck) -> float:
    with torch.no_grad(), attach(model, _DenseHandler(scheme, protocol, ck, ck.config.recent_window)):
        logits = model(windows, use_cache=False).logits.float()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return math.exp(nll.item())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_perplexity_in_query_chunks_matches_the_dense_handler(lab, protocol) -> None:
    model, ck, windows = lab
    for scheme in _schemes(ck):
        expected = _dense_perplexity(model, windows, scheme, protocol, ck)
        for chunk in (5, 1024):
            got = perplexity(model, windows, scheme, protocol, ck, batch_size=2, query_chunk=chunk)
            assert math.isclose(got.perplexity, expected, rel_tol=1e-5), (scheme.name, scheme.uses_sinks, chunk)


def test_sinks_fire_in_the_fixture(lab) -> None:
    model, ck, windows = lab
    got = perplexity(model, windows, build_scheme("rotatekv", 2, ck), "sinks", ck)
    assert got.fp_share > 0, "no sink detected: the fixture does not exercise the sink path"


def test_fp_share_per_protocol(lab) -> None:
    model, ck, windows = lab
    t, window = windows.shape[1], ck.config.recent_window
    assert perplexity(model, windows, build_scheme("fp", 16, ck), "oneshot", ck).fp_share == 1.0
    rotatekv = build_scheme("rotatekv", 2, ck)
    assert perplexity(model, windows, rotatekv, "oneshot", ck).fp_share == 0.0
    sinks = perplexity(model, windows, rotatekv, "sinks", ck).fp_share
    assert 0 < sinks <= ck.config.max_sinks / t
    deployed = perplexity(model, windows, rotatekv, "deployed", ck)
    assert window / t < deployed.fp_share <= (window + ck.config.max_sinks) / t
    rtn = perplexity(model, windows, build_scheme("rtn", 2, ck), "deployed", ck)
    assert rtn.fp_share == window / t
    assert rtn.as_dict()["fp_share"] == rtn.fp_share and rtn.seconds > 0


def test_chunked_attention_matches_dense_math_over_many_blocks() -> None:
    """A SmolLM2-shaped head group over 700 tokens: blocks of 256 queries, a 128-token window, sinks."""
    b, hq, hkv, t, d = 1, 3, 1, 700, 64
    q, k_q, v_q, k_fp, v_fp = (torch.randn(b, h, t, d) for h in (hq, hkv, hkv, hkv, hkv))
    sinks = torch.zeros(b, t, dtype=torch.bool)
    sinks[0, [0, 200, 650]] = True
    for window in (0, 128):
        out = _kept_fp_attention(q, k_q, v_q, k_fp, v_fp, sinks, window, _Shape(0.125), 256)
        torch.testing.assert_close(out, _dense(q, k_q, v_q, k_fp, v_fp, sinks, window, 0.125), rtol=1e-5, atol=1e-5)
