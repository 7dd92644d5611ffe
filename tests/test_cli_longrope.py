"""The whole CLI on a tiny longrope Phi-3 (as Phi-3-*-128k) from a ``save_pretrained`` folder, both key
layouts, and the one-line refusals of whatever would cross ``original_max_position_embeddings``
(calibration and evaluation windows, a prompt plus its new tokens, a server's context)."""

import json

import pytest
import typer
from tiny_models import LONGROPE_LIMIT, save_tiny_model
from typer.testing import CliRunner

from rkv_convert.cli import app
from rkv_convert.serve.serve_cli import serve_command

runner = CliRunner()
WHY = f"rkv's limit of {LONGROPE_LIMIT} tokens for this model (original_max_position_embeddings: longrope"


def _ok(result) -> None:
    assert result.exit_code == 0, result.output


def _refused(result, *parts: str) -> None:
    text = " ".join(result.output.split())
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert all(p in text for p in parts), result.output


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("phi3_longrope") / "model", "phi3_longrope", n_kv=2)


def _calibrate_export(model, calib, root, layout: str):
    cal, ck = root / f"cal-{layout}", root / f"ck-{layout}"
    _ok(runner.invoke(app, ["calibrate", str(model), "--out", str(cal), "--data", str(calib), "--samples", "2",
                            "--seqlen", "64", "--device", "cpu", "--key-group-size", "32", "--key-layout", layout]))  # fmt: skip
    _ok(runner.invoke(app, ["export", "--calibration", str(cal), "--out", str(ck), "--bits", "2",
                            "--recent-window", "4", "--flush-block", "4", "--max-sinks", "1"]))  # fmt: skip
    return ck


@pytest.mark.parametrize("layout", ["folded", "prerope"])
def test_calibrate_export_eval_run_within_the_limit(tmp_path, pipeline_texts, model_folder, layout: str) -> None:
    calib, evaltext = pipeline_texts
    ck = _calibrate_export(model_folder, calib, tmp_path, layout)
    result = runner.invoke(app, ["eval", str(ck), "--text", str(evaltext), "--windows", "1", "--length", str(LONGROPE_LIMIT),
                                 "--schemes", "fp,rotatekv", "--bits", "2", "--device", "cpu", "--json"])  # fmt: skip
    _ok(result)
    rows = json.loads(result.stdout[result.stdout.index("[") :])
    mixed = {"rotatekv-mixed"} if layout == "folded" else set()  # the folded default store raises half the key layers
    assert {r["scheme"] for r in rows} == {"fp", "rotatekv", *mixed} and all(r["perplexity"] > 1 for r in rows)
    _ok(runner.invoke(app, ["run", str(ck), "-p", "The cache stores key 12 and value 84 in", "-n", "12", "--greedy",
                            "--no-chat", "--device", "cpu"]))  # fmt: skip


def test_everything_that_would_cross_the_limit_is_refused_in_one_line(tmp_path, pipeline_texts, model_folder) -> None:
    calib, evaltext = pipeline_texts
    over = str(LONGROPE_LIMIT + 1)
    _refused(runner.invoke(app, ["calibrate", str(model_folder), "--out", str(tmp_path / "cal"), "--data", str(calib),
                                 "--seqlen", over, "--device", "cpu"]), f"--seqlen {over} is longer than {WHY}")  # fmt: skip
    assert not (tmp_path / "cal").exists()
    ck = _calibrate_export(model_folder, calib, tmp_path, "folded")
    _refused(runner.invoke(app, ["eval", str(ck), "--text", str(evaltext), "--windows", "1", "--length", over,
                                 "--device", "cpu"]), f"--length {over} is longer than {WHY}")  # fmt: skip
    _refused(runner.invoke(app, ["run", str(ck), "-p", "The cache stores key 12 and value 84 in", "-n", "250", "--greedy",
                                 "--no-chat", "--device", "cpu"]),
             "with --max-new-tokens 250 that is", f"beyond {WHY}", "long factors")  # fmt: skip
    serve = typer.Typer()
    serve.command("serve")(serve_command)
    serve.command("noop")(lambda: None)
    _refused(runner.invoke(serve, ["serve", str(ck), "--device", "cpu", "--max-model-len", "512"]),
             f"--max-model-len 512 is beyond {WHY}")
