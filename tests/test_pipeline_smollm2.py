"""One real-model run: SmolLM2-135M-Instruct (built-in GGUF) through calibrate → export → eval."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from rkv_convert.calibrate.run import CalibrationOptions, calibrate
from rkv_convert.calibration_data.sources import load_text, sample_batches
from rkv_convert.evaluate.perplexity import perplexity, token_windows
from rkv_convert.evaluate.schemes import build_scheme
from rkv_convert.export.format import read_checkpoint
from rkv_convert.export.writer import export_checkpoint
from rkv_convert.models.loading import load_model

pytestmark = pytest.mark.slow
WIKI_TEST = "/work/shared/data/wikitext-2-raw/wiki.test.raw"


def test_smollm2_calibrate_export_eval(tmp_path) -> None:
    pytest.importorskip("gguf")
    loaded = load_model("smollm2-135m")
    # the default path (learned key rotations included) with fewer Adam steps, to keep CI short
    options = CalibrationOptions(num_samples=4, seqlen=256, batch_size=4, clip_samples=512, rotation_steps=20)
    batches = sample_batches(load_text("pydoc"), loaded.tokenizer, options.num_samples, options.seqlen, options.seed)
    artifact = calibrate(loaded.model, batches, options)
    shape = artifact.meta["model"]
    assert (shape["num_key_value_heads"], shape["head_dim"], artifact.meta["options"]["head_group_size"]) == (3, 64, 1)
    assert artifact.key_rotation.shape == (64, 64) and artifact.meta["options"]["key_layout"] == "folded"  # the default layout: H_64 per head
    late = artifact.layers[-1]
    assert late["sink_channels"].numel() > 0  # SmolLM2's first tokens carry massive activations late in the stack

    out = export_checkpoint(loaded, artifact, tmp_path / "ck", bits=2)
    ck = read_checkpoint(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    windows = token_windows(loaded.tokenizer, open(WIKI_TEST, encoding="utf-8").read(), 256, 2)
    fp = perplexity(model, windows, build_scheme("fp", 16, ck), "oneshot", ck).perplexity
    rtn = perplexity(model, windows, build_scheme("rtn", 2, ck), "oneshot", ck).perplexity
    rot = perplexity(model, windows, build_scheme("rotatekv", 2, ck), "oneshot", ck).perplexity
    deployed = perplexity(model, windows, build_scheme("rotatekv", 2, ck), "deployed", ck).perplexity
    rot4 = perplexity(model, windows, build_scheme("rotatekv", 4, ck, None), "oneshot", ck)
    assert 5 < fp < 60
    assert rot < rtn  # the method beats plain round-to-nearest at equal bits (2.5/elem)
    assert deployed < rot
    assert rot4.key_bits == 4.5 and rot4.perplexity > fp
