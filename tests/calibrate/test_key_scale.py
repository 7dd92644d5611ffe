"""The key scale: its formula, its fusion into every family's weights (logits unchanged), and the calibration that
observes the scaled keys and records the scale for export."""

import pytest
import torch
from tiny_models import FAMILIES, tiny_model

from rkv_convert.calibrate.artifact import load_artifact, save_artifact
from rkv_convert.calibrate.key_scale import key_scale
from rkv_convert.calibrate.run import CalibrationOptions, calibrate
from rkv_convert.export.fuse import fuse_key_scale
from rkv_convert.models.adapters import adapter_for, attach, attention_modules, stock_attention


def _options(**kw) -> CalibrationOptions:
    return CalibrationOptions(num_samples=4, seqlen=32, batch_size=2, clip_samples=64, key_group_size=32,
                              key_layout="folded", learn_rotation=False, **kw)  # fmt: skip


def _batches() -> torch.Tensor:
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def test_key_scale_formula_pairs_and_normalisation() -> None:
    g = torch.Generator().manual_seed(1)
    d, n_kv = 8, 2
    w, s = torch.rand(n_kv * d, generator=g) + 0.1, torch.rand(n_kv * d, generator=g) + 0.1
    scale = key_scale(w, s, d, 1.0)
    pair = lambda x: (x.reshape(n_kv, 2, d // 2).sum(1)).repeat(1, 2)  # noqa: E731  RoPE pairs (i, i + d/2)
    expected = (pair(w.double()) / pair(s.double())) ** 0.25
    expected = expected / expected.log().mean(-1, keepdim=True).exp()
    torch.testing.assert_close(scale, expected.float(), rtol=1e-5, atol=0)
    assert torch.equal(scale[:, : d // 2], scale[:, d // 2 :])  # tied within pairs: commutes with RoPE
    torch.testing.assert_close(scale.log().mean(-1), torch.zeros(n_kv), atol=1e-6, rtol=0)
    torch.testing.assert_close(key_scale(w, s, d, 0.0), torch.ones(n_kv, d), rtol=0, atol=0)
    half = key_scale(w, s, d, 0.5)
    torch.testing.assert_close(half, scale.sqrt(), rtol=1e-5, atol=0)
    shared = key_scale(w, s, d, 1.0, shared=True)
    assert torch.equal(shared[0], shared[1])


def _scores(model, ids) -> list[torch.Tensor]:
    """Per layer, the post-RoPE ``q·k`` of every query head against its KV head's keys."""
    out = []

    def tap(module, q, k, v, pe, mask, cache, layer_input, **kw):
        cos, sin = pe
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        qr, kr = apply_rotary_pos_emb(q.float(), k.float(), cos.float(), sin.float())
        kr = kr.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        out.append(qr @ kr.transpose(-1, -2))
        return stock_attention(module, q, k, v, pe, mask, cache, **kw)

    with torch.no_grad(), attach(model, tap):
        model(ids, use_cache=False)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_key_scale_keeps_every_score_and_the_logits(family: str) -> None:
    model = tiny_model(family, n_heads=4, n_kv=2, head_dim=64).float()
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    n_layers = len(attention_modules(model))
    raw = [torch.exp(torch.randn(2, 32, generator=g)).repeat(1, 2) for _ in range(n_layers)]  # tied in pairs
    shared = adapter_for(model.config).shared_qk_scale
    scales = [s[:1].expand(2, -1).contiguous() if shared else s for s in raw]
    before_scores, before = _scores(model, ids), model(ids).logits
    keys_before = []
    with torch.no_grad(), attach(model, lambda m, q, k, v, pe, mask, c, h, **kw: (keys_before.append(k.float()),
                                                                                  stock_attention(m, q, k, v, pe, mask, c, **kw))[1]):
        model(ids, use_cache=False)
    fuse_key_scale(model, scales)
    keys_after = []
    with torch.no_grad(), attach(model, lambda m, q, k, v, pe, mask, c, h, **kw: (keys_after.append(k.float()),
                                                                                 stock_attention(m, q, k, v, pe, mask, c, **kw))[1]):
        model(ids, use_cache=False)
    for s, kb, ka in zip(scales, keys_before, keys_after):  # the keys handlers see are scaled channel by channel
        torch.testing.assert_close(ka, kb * s.view(1, 2, 1, 64), rtol=1e-4, atol=1e-5)
    for b, a in zip(before_scores, _scores(model, ids)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_norm_families_refuse_a_per_head_scale() -> None:
    model = tiny_model("qwen3", n_heads=4, n_kv=2, head_dim=64)
    scale = torch.ones(2, 64)
    scale[1] *= 2.0
    with pytest.raises(ValueError, match="same for all heads"):
        fuse_key_scale(model, [scale] * len(attention_modules(model)))


def test_calibration_observes_the_scaled_keys_and_records_the_scale(tmp_path) -> None:
    model = tiny_model("llama", n_heads=4, n_kv=2, head_dim=64)
    plain = calibrate(model, _batches(), _options(key_scale=0.0))
    scaled = calibrate(model, _batches(), _options(key_scale=1.0))
    assert plain.key_scales is None and plain.meta["artifact_version"] == 4
    assert scaled.meta["source_fingerprint"] == plain.meta["source_fingerprint"]  # the model is left as it was
    for p, s in zip(plain.layers, scaled.layers):
        scale = s["key_scale"]
        assert scale.shape == (128,) and not torch.allclose(scale, torch.ones(128), atol=1e-2)
        torch.testing.assert_close(s["key_mean"], p["key_mean"] * scale, rtol=1e-6, atol=1e-7)
        # the scale trades range for query weight: the weighted key error the clip search minimises drops
        assert float(s["key_error_by_bits"][0]) < float(p["key_error_by_bits"][0])
    save_artifact(scaled, tmp_path / "cal")
    loaded = load_artifact(tmp_path / "cal")
    for a, b in zip(loaded.key_scales, scaled.key_scales):
        assert torch.equal(a, b)


def test_key_scale_option_is_checked() -> None:
    model = tiny_model("llama", n_heads=4, n_kv=2, head_dim=64)
    with pytest.raises(ValueError, match="key_scale is an exponent"):
        calibrate(model, _batches(), _options(key_scale=-1.0))
