"""The evaluation reproduces each family's own attention: soft cap (Gemma 2), sliding windows shorter
than the text (Gemma 2/3, Mistral-style), per-layer RoPE (Gemma 3), partial RoPE (Phi-4-mini)."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

from rkv_convert.calibrate.run import CalibrationOptions, calibrate
from rkv_convert.export.writer import checkpoint_from_artifact
from rkv_convert.evaluate.perplexity import perplexity
from rkv_convert.evaluate.schemes import build_scheme
from rkv_convert.export.fuse import fuse_calibration

CASES = [("gemma2", 8), ("gemma3", 8), ("mixtral", 8), ("phi4mini", None), ("qwen3_moe", None), ("phi3", 8)]


def _model_perplexity(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(windows, use_cache=False).logits.float()
    return math.exp(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item())


@pytest.mark.parametrize("family,sliding", CASES)
def test_full_precision_reads_give_the_models_own_perplexity(family: str, sliding: int | None) -> None:
    """FP (one-shot path) and RotateKV with every token inside the recent window (deployed path) both
    read back exact keys: each must give the model's own perplexity, windows longer than the slide."""
    model = tiny_model(family, sliding_window=sliding)
    cal = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    artifact = calibrate(model, cal, CalibrationOptions(num_samples=2, seqlen=24, batch_size=2, clip_samples=32))
    fuse_calibration(model, artifact)
    windows = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(1))
    expected = _model_perplexity(model, windows)
    ck = checkpoint_from_artifact(artifact, 2, recent_window=64, max_sinks=0)
    fp = perplexity(model, windows, build_scheme("fp", 16, ck), "oneshot", ck)
    assert math.isclose(fp.perplexity, expected, rel_tol=1e-5), (fp.perplexity, expected)
    kept = perplexity(model, windows, build_scheme("rotatekv", 2, ck), "deployed", ck, query_chunk=7)
    assert math.isclose(kept.perplexity, expected, rel_tol=1e-5), (kept.perplexity, expected)
    quantized = perplexity(model, windows, build_scheme("rotatekv", 2, ck), "oneshot", ck)
    # the reads above were not trivially exact: 2-bit reads miss the model's own perplexity by far more than the
    # 1e-5 bar they met (tiny random models have near-uniform logits: phi3 moved by 4e-4 on an AVX-512 CPU)
    assert not math.isclose(quantized.perplexity, expected, rel_tol=1e-4), (quantized.perplexity, expected)
