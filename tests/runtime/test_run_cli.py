"""``rkv run``'s refusals: inputs it cannot serve and failures it must not hide, each one line and a non-zero exit."""

import shutil

import pytest
import torch
import typer
from rkv_fixtures import char_tokenizer, make_checkpoint, write_folder
from tiny_models import tiny_model
from typer.testing import CliRunner

import rkv_convert.runtime.cli as run_cli
from rkv_convert.models.compat import CacheDisengagedError, UntestedTransformersError
from rkv_convert.runtime.cli import run_command
from rkv_convert.runtime.generate import GenerationStats


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_model("qwen2")  # context: 512 positions
    ckpt = make_checkpoint(model, bits=2, recent_window=4, flush_block=4, max_sinks=2)
    return write_folder(ckpt, model, char_tokenizer(), tmp_path_factory.mktemp("rkv") / "tiny-rkv")


def _run(*args: str):
    app = typer.Typer()
    app.command("run")(run_command)
    app.command("noop")(lambda: None)  # two commands: typer keeps `run` as a sub-command
    return CliRunner().invoke(app, ["run", *args])


def _one_line_error(result, message: str) -> None:
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert message in " ".join(result.output.split()), result.output


def test_prompt_longer_than_the_context_is_refused(folder) -> None:
    result = _run(str(folder), "-p", "x" * 600, "-n", "3", "--greedy", "--no-chat", "--device", "cpu")
    _one_line_error(result, "the prompt has 600 tokens; with --max-new-tokens 3 that is 603, beyond the model's context of 512")
    result = _run(str(folder), "-p", "x" * 500, "-n", "20", "--greedy", "--no-chat", "--device", "cpu")
    _one_line_error(result, "beyond the model's context of 512")


def test_empty_prompt_is_refused(folder) -> None:
    result = _run(str(folder), "-p", "", "--no-chat", "--device", "cpu")
    _one_line_error(result, "the prompt is empty")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused(folder) -> None:
    _one_line_error(_run(str(folder), "--device", "cuda"), "--device cuda: no CUDA device")


def test_truncated_weights_are_named(folder, tmp_path) -> None:
    broken = shutil.copytree(folder, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = _run(str(broken), "-p", "hi", "--device", "cpu")
    _one_line_error(result, "model.safetensors is truncated or corrupt")
    assert "re-export" in result.output


def _fake_stream(error: Exception | None = None, kv_bytes: int = 0):
    def stream(model, ids, *args, stats: GenerationStats | None = None, **kwargs):
        if error is not None:
            raise error
        stats.prompt_tokens, stats.new_tokens, stats.kv_bytes = ids.shape[1], 2, kv_bytes
        yield torch.tensor([40])
        yield torch.tensor([41])

    return stream


@pytest.mark.parametrize(
    "error,message",
    [
        (CacheDisengagedError("the rkv cache received no tokens during prefill"), "error: the rkv cache received no tokens"),
        (UntestedTransformersError("transformers 9.0 is installed"), "error: transformers 9.0 is installed"),
    ],
)
def test_generation_errors_are_one_line(folder, monkeypatch, error, message) -> None:
    monkeypatch.setattr(run_cli, "stream_generate", _fake_stream(error))
    _one_line_error(_run(str(folder), "-p", "hello", "--device", "cpu"), message)


def test_a_summary_with_an_empty_cache_fails(folder, monkeypatch) -> None:
    monkeypatch.setattr(run_cli, "stream_generate", _fake_stream(kv_bytes=0))
    result = _run(str(folder), "-p", "hello", "--device", "cpu")
    _one_line_error(result, "the rkv cache holds 0 bytes after generation")
    assert "compression" not in result.output
    monkeypatch.setattr(run_cli, "stream_generate", _fake_stream(kv_bytes=4096))
    result = _run(str(folder), "-p", "hello", "--device", "cpu")
    assert result.exit_code == 0 and "KV cache used" in result.output


def test_untested_transformers_at_load_is_one_line(folder, monkeypatch) -> None:
    def untested(*args, **kwargs):
        raise UntestedTransformersError("transformers 9.0 is installed")

    monkeypatch.setattr(run_cli, "load", untested)
    _one_line_error(_run(str(folder), "-p", "hello", "--device", "cpu"), "error: transformers 9.0 is installed")


def test_summary_reports_per_layer_widths() -> None:
    """A mixed-width checkpoint's summary gives the stored bits averaged over layers, not ``bits``'s."""
    from rich.console import Console

    from rkv_convert.export.format import RkvConfig
    from rkv_convert.runtime.cli import summary_table
    from rkv_convert.runtime.generate import GenerationStats

    cfg = RkvConfig(bits=2, key_group_size=32, value_group_size=32, head_group_size=1, num_layers=2,
                    num_key_value_heads=2, head_dim=64, source_fingerprint="x", key_bits=[3, 2], value_bits=[2, 4])  # fmt: skip
    console = Console(width=200, record=True)
    console.print(summary_table(GenerationStats(), cfg))
    text = console.export_text()
    assert "K 3.50, V 4.00 (per-layer widths, groups 32/32)" in text, text


def test_cuda_graph_that_cannot_be_captured_is_refused(folder) -> None:
    """``--cuda-graph`` insists: on CPU the run stops with the reason instead of decoding eagerly."""
    result = _run(str(folder), "-p", "hello", "-n", "4", "--greedy", "--no-chat", "--device", "cpu", "--cuda-graph")
    _one_line_error(result, "cannot capture the decode step in a CUDA graph: CUDA graphs need every layer on one CUDA device")
    jobs = folder.parent / "jobs.jsonl"
    jobs.write_text('{"id": "a", "prompt": "hi"}\n')
    result = _run(str(folder), "--prompts", str(jobs), "--out", str(folder.parent / "o.jsonl"), "--device", "cpu", "--cuda-graph")
    _one_line_error(result, "cannot capture the engine's decode step in a CUDA graph: CUDA graphs need every layer")
    assert not (folder.parent / "o.jsonl").exists()  # refused before the output was opened


def test_summary_names_the_decode_path(folder) -> None:
    result = _run(str(folder), "-p", "hello", "-n", "4", "--greedy", "--no-chat", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "decode path" in result.output and "eager (CUDA graphs need every layer" in " ".join(result.output.split())
