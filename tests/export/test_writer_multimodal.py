"""``rkv export`` of a multimodal Gemma 3 (``Gemma3ForConditionalGeneration``, model type ``gemma3``):
the vocabulary and shape come from its text config; the exported folder reloads with stock
transformers and gives the source logits."""

import torch
from tiny_models import tiny_gemma3_multimodal, tiny_tokenizer
from transformers import AutoModelForCausalLM

from rkv_convert.calibrate.run import CalibrationOptions, calibrate
from rkv_convert.export.format import read_checkpoint
from rkv_convert.export.writer import export_checkpoint
from rkv_convert.models.loading import load_model

OPTIONS = CalibrationOptions(num_samples=2, seqlen=32, batch_size=2, clip_samples=32)


def test_export_of_a_multimodal_gemma3(tmp_path) -> None:
    model = tiny_gemma3_multimodal()
    assert getattr(model.config, "vocab_size", None) is None  # what export used to read
    model.save_pretrained(tmp_path / "src")
    tiny_tokenizer().save_pretrained(tmp_path / "src")
    loaded = load_model(str(tmp_path / "src"))
    batches = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))  # no image tokens
    art = calibrate(loaded.model, batches, OPTIONS)
    ids = torch.randint(0, 100, (1, 21))
    with torch.no_grad():
        reference = loaded.model(ids).logits
    out = export_checkpoint(loaded, art, tmp_path / "ck", bits=2)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == "Gemma3ForConditionalGeneration"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference, rtol=0, atol=1e-4)
    ck = read_checkpoint(out)
    assert len(ck.layers) == 2 and ck.config.head_dim == 64
