"""Step-by-step decoding under an evaluation scheme equals re-running the whole sequence each step."""

import dataclasses

import pytest
import torch
from tiny_models import tiny_model

from rkv_convert.calibrate.run import CalibrationOptions, calibrate
from rkv_convert.evaluate.perplexity import _SchemeAttention
from rkv_convert.evaluate.scheme_decode import SchemeDecodeAttention
from rkv_convert.evaluate.schemes import build_scheme
from rkv_convert.export.fuse import fuse_calibration
from rkv_convert.export.writer import checkpoint_from_artifact
from rkv_convert.models.adapters import attach


def _rerun_logits(model, ids, scheme, ck, window) -> torch.Tensor:
    """The reference: the whole sequence through the deployed protocol, the last position's logits."""
    with attach(model, _SchemeAttention(scheme, "deployed", ck, window)):
        return model(input_ids=ids, use_cache=False).logits[:, -1].float()


def _checkpoint(family: str, key_layout: str, max_sinks: int):
    model = tiny_model(family, n_kv=2)
    artifact = calibrate(model, torch.randint(0, 128, (2, 64)),
                         CalibrationOptions(num_samples=2, seqlen=64, batch_size=2, key_layout=key_layout))  # fmt: skip
    fuse_calibration(model, artifact)
    ck = checkpoint_from_artifact(artifact, 2, recent_window=32, flush_block=8, max_sinks=max_sinks)
    # every token crosses the sink threshold: the first max_sinks of the sequence are sinks, so the cap
    # has to hold across the pieces the sequence is fed in
    layers = [dataclasses.replace(layer, sink_channels=torch.tensor([0, 5]), sink_threshold=0.0) for layer in ck.layers]
    # float64: a 2-bit code is a step function, and in fp32 the pieces' and the re-run's keys (matmuls of other
    # shapes) differ in the last bits, enough to move an element that sits on a rounding boundary to the next code
    return model.double().eval(), dataclasses.replace(ck, layers=layers)


@pytest.mark.parametrize("family,key_layout", [("llama", "folded"), ("llama", "prerope"), ("gemma2", "folded")])
@pytest.mark.parametrize("scheme_name", ["rtn", "kivi", "rotatekv"])
def test_pieces_give_the_rerun_logits(family, key_layout, scheme_name) -> None:
    model, ck = _checkpoint(family, key_layout, max_sinks=3)
    scheme = build_scheme(scheme_name, 2, ck)
    window = ck.config.recent_window
    ids = torch.randint(0, 128, (2, 150))
    pieces = [ids[:, :2], ids[:, 2:130], *(ids[:, i : i + 1] for i in range(130, 150))]
    handler, seen, far = SchemeDecodeAttention(scheme, ck, window, query_chunk=48), 0, []
    with torch.no_grad():
        for piece in pieces:
            positions = torch.arange(seen, seen + piece.shape[1])[None]
            with attach(model, handler):
                got = model(input_ids=piece, position_ids=positions, use_cache=False).logits[:, -1].float()
            seen += piece.shape[1]
            want = _rerun_logits(model, ids[:, :seen], scheme, ck, window)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            far.append(seen > window)
        fp = model(input_ids=ids, use_cache=False).logits[:, -1].float()
    assert all(far[1:])  # the quantized read-back took part in every compared step after the first
    assert not torch.allclose(got, fp, atol=1e-3)  # ... and changed the logits
    if scheme.uses_sinks:
        assert all(int(state.sinks[b].sum()) == 3 for state in handler.layers.values() for b in range(2))
        assert all(state.sinks[:, :3].all() for state in handler.layers.values())
