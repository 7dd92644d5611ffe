"""The CLI reports the errors rkv raises deliberately in one line and a non-zero exit; anything
else (a programming error) still surfaces with its traceback."""

import pytest
from tiny_models import save_tiny_model
from typer.testing import CliRunner

import rkv_convert.calibrate.run as calibrate_run
from rkv_convert.calibrate.observers import CalibrationError
from rkv_convert.cli import app
from rkv_convert.models.adapters import ContractError

runner = CliRunner()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, pipeline_texts):
    root = tmp_path_factory.mktemp("errors")
    return root, save_tiny_model(root / "model", "llama", n_kv=2), pipeline_texts[0]


def _calibrate(workspace, monkeypatch, error: Exception):
    root, model, text = workspace

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(calibrate_run, "calibrate", broken)
    out = root / f"cal-{type(error).__name__}"
    result = runner.invoke(app, ["calibrate", str(model), "--out", str(out), "--data", str(text), "--samples", "2",
                                 "--seqlen", "32", "--device", "cpu"])  # fmt: skip
    return result, out


@pytest.mark.parametrize("error", [
    CalibrationError("no calibration tokens reached the key observer: every token was padding or a sink"),
    ContractError("gemma3: Gemma3Attention.forward has no argument 'position_embeddings'; transformers 9.9"),
])  # fmt: skip
def test_library_errors_print_one_line(workspace, monkeypatch, error: Exception) -> None:
    result, out = _calibrate(workspace, monkeypatch, error)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {error}"], result.output
    assert "Traceback" not in result.output and not out.exists()
    assert isinstance(result.exception, SystemExit)


def test_programming_errors_are_not_swallowed(workspace, monkeypatch) -> None:
    result, _ = _calibrate(workspace, monkeypatch, RuntimeError("shape mismatch in a matmul"))
    assert result.exit_code != 0 and "error: shape mismatch" not in result.output
    assert type(result.exception) is RuntimeError and str(result.exception) == "shape mismatch in a matmul"
