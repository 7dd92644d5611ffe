"""The CLI end to end on a tiny local model, through Typer's test runner."""

import json
import math

import pytest
import torch
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from rkv_convert.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = save_tiny_model(root / "model", "llama", n_kv=2)
    text = root / "calib.txt"
    text.write_text("\n\n".join(f"The cache stores key {i} and value {i * 7} in two bits." for i in range(400)))
    evaltext = root / "eval.txt"
    evaltext.write_text(" ".join(f"word{i % 37} follows word{(i * 5) % 37}." for i in range(600)))
    return root, model, text, evaltext


def _ok(result) -> None:
    assert result.exit_code == 0, result.output


def test_calibrate_export_eval(workspace) -> None:
    root, model, text, evaltext = workspace
    cal, ck = root / "cal", root / "ck"
    args = ["calibrate", str(model), "--out", str(cal), "--data", str(text), "--samples", "2", "--seqlen", "64", "--device", "cpu"]
    _ok(runner.invoke(app, args))
    assert (cal / "calibration.json").is_file()
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "already exists" in refused.output
    _ok(runner.invoke(app, ["export", "--calibration", str(cal), "--out", str(ck), "--bits", "2"]))
    result = runner.invoke(app, ["eval", str(ck), "--text", str(evaltext), "--windows", "2", "--length", "64",
                                 "--schemes", "fp,rtn,kivi,rotatekv", "--bits", "2", "--device", "cpu", "--json"])
    _ok(result)
    rows = json.loads(result.stdout[result.stdout.index("[") :])
    names = [(r["scheme"], r["protocol"]) for r in rows]
    assert ("fp", "oneshot") in names and ("rotatekv", "deployed") in names and len(rows) == 7
    fp = next(r["perplexity"] for r in rows if r["scheme"] == "fp")
    assert all(r["perplexity"] > 1 for r in rows)
    assert next(r for r in rows if r["scheme"] == "rtn")["key_bits"] == 2.5
    assert next(r for r in rows if r["scheme"] == "kivi")["key_bits"] == 3.0
    assert math.isclose(fp, _stock_perplexity(ck, evaltext, windows=2, length=64), rel_tol=1e-4)


def test_calibrate_permutation_option(workspace) -> None:
    """--permutation none groups consecutive rotated channels (identity permutation); a bad value is refused."""
    from rkv_convert.calibrate.artifact import load_artifact

    root, model, text, _ = workspace
    base = ["calibrate", str(model), "--data", str(text), "--samples", "2", "--seqlen", "64", "--device", "cpu"]
    bad = runner.invoke(app, [*base, "--out", str(root / "cal-bad"), "--permutation", "sorted"])
    assert bad.exit_code == 2 and "--permutation must be one of mean_abs, max_abs, rms, none" in bad.output
    assert not (root / "cal-bad").exists()
    _ok(runner.invoke(app, [*base, "--out", str(root / "cal-none"), "--permutation", "none"]))
    artifact = load_artifact(root / "cal-none")
    assert artifact.meta["options"]["perm_statistic"] == "none"
    for layer in artifact.layers:
        assert torch.equal(layer["key_perm"].long(), torch.arange(layer["key_perm"].numel()))


def _stock_perplexity(checkpoint, text, windows: int, length: int) -> float:
    """Perplexity straight from transformers, no rkv code in the forward pass."""
    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor(tok(text.read_text(), add_special_tokens=False)["input_ids"][: windows * length]).view(windows, length)
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


@pytest.mark.parametrize(
    "args,message",
    [
        (["calibrate", "no/such/model", "--out", "X"], "has no config.json"),
        (["calibrate", "missing.gguf", "--out", "X"], "GGUF file not found"),
        (["export", "--calibration", "no/such/artifact", "--out", "X"], "not a calibration artifact"),
        (["eval", "no/such/checkpoint", "--text", "t.txt"], "no config.json"),
    ],
)
def test_bad_inputs_exit_with_clear_errors(tmp_path, monkeypatch, args, message) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "no/such/model").mkdir(parents=True)
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "X").exists()


def test_unsupported_architecture(tmp_path) -> None:
    model = save_tiny_model(tmp_path / "model", "llama")
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "gpt2"
    (model / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["calibrate", str(model), "--out", str(tmp_path / "cal")])
    assert result.exit_code != 0
