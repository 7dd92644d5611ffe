"""The CLI end to end on a tiny local model, through Typer's test runner."""

import json
import math
import os
import shutil

import pytest
import torch
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from rkv_convert.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, pipeline_texts):
    root = tmp_path_factory.mktemp("cli")
    return root, save_tiny_model(root / "model", "llama", n_kv=2), *pipeline_texts


def _calibrate_args(model, out, text) -> list[str]:
    return ["calibrate", str(model), "--out", str(out), "--data", str(text), "--samples", "2", "--seqlen", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def exported(workspace):
    """(artifact folder, checkpoint folder, calibrate's output) made through the CLI once per module."""
    root, model, text, _ = workspace
    cal, ck = root / "cal", root / "ck"
    calibrated = runner.invoke(app, _calibrate_args(model, cal, text))
    _ok(calibrated)
    _ok(runner.invoke(app, ["export", "--calibration", str(cal), "--out", str(ck), "--bits", "2"]))
    return cal, ck, calibrated.output


def _ok(result) -> None:
    assert result.exit_code == 0, result.output


def _one_line_error(result, message: str) -> None:
    """A non-zero exit with ``message`` in the output and no traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert message in " ".join(result.output.split()), result.output


def test_calibrate_export_eval(workspace, exported) -> None:
    root, model, text, evaltext = workspace
    cal, ck, _ = exported
    assert (cal / "calibration.json").is_file()
    refused = runner.invoke(app, _calibrate_args(model, cal, text))
    assert refused.exit_code == 2 and "already exists" in refused.output
    result = runner.invoke(app, ["eval", str(ck), "--text", str(evaltext), "--windows", "2", "--length", "64",
                                 "--schemes", "fp,rtn,kivi,rotatekv", "--bits", "2", "--device", "cpu", "--json"])
    _ok(result)
    rows = json.loads(result.stdout[result.stdout.index("[") :])
    names = [(r["scheme"], r["protocol"]) for r in rows]
    assert ("fp", "oneshot") in names and ("rotatekv", "deployed") in names
    assert ("rotatekv-mixed", "deployed") in names and len(rows) == 9  # the default store raises half the key layers
    fp = next(r["perplexity"] for r in rows if r["scheme"] == "fp")
    assert all(r["perplexity"] > 1 for r in rows)
    assert next(r for r in rows if r["scheme"] == "rtn")["key_bits"] == 2.5
    assert next(r for r in rows if r["scheme"] == "kivi")["key_bits"] == 3.0
    assert math.isclose(fp, _stock_perplexity(ck, evaltext, windows=2, length=64), rel_tol=1e-4)


def test_calibrate_reports_each_phase_and_a_complete_table(exported) -> None:
    """Progress lines for reading, loading and tokenizing, bars for the passes; the table is not cut at 80 columns."""
    output = exported[2]
    for phase in ("read calibration text", "loaded", "tokenized", "sinks", "key means", "rotated keys"):
        assert phase in output, output
    for header in ("key outlier ratio before", "key scale min-max", "value clip 2/3/4 bit"):
        assert header in output, output


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


def test_calibrate_key_scale_option(workspace, exported) -> None:
    """The default calibration records a key scale, which export fuses into the weights; --key-scale 0 records none."""
    from rkv_convert.calibrate.artifact import load_artifact

    root, model, text, _ = workspace
    cal, ck, _ = exported
    scaled = load_artifact(cal)
    assert scaled.meta["options"]["key_scale"] == 1.0 and scaled.key_scales is not None
    source = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    fused = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32)
    scale = scaled.key_scales[0]
    k_source, k_fused = source.model.layers[0].self_attn.k_proj.weight, fused.model.layers[0].self_attn.k_proj.weight
    torch.testing.assert_close(k_fused, k_source * scale[:, None], rtol=1e-6, atol=0)
    _ok(runner.invoke(app, [*_calibrate_args(model, root / "cal-noscale", text), "--key-scale", "0"]))
    plain = load_artifact(root / "cal-noscale")
    assert plain.meta["options"]["key_scale"] == 0.0 and plain.key_scales is None


def test_calibrate_rope_span_option(workspace, exported) -> None:
    """--rope-span is recorded in the artifact and named in the calibration table; without it the span is 0."""
    from rkv_convert.calibrate.artifact import load_artifact

    root, model, text, _ = workspace
    result = runner.invoke(app, [*_calibrate_args(model, root / "cal-span", text), "--rope-span", "256"])
    _ok(result)
    assert "observed at RoPE positions 0-255" in " ".join(result.output.split())
    assert load_artifact(root / "cal-span").meta["options"]["rope_span"] == 256
    assert load_artifact(exported[0]).meta["options"]["rope_span"] == 0


def test_calibrate_value_rotation_option(workspace, exported) -> None:
    """Value rotations are learned by default; --no-learn-value-rotation keeps the Hadamard, and the table says which."""
    from rkv_convert.calibrate.artifact import load_artifact

    root, model, text, _ = workspace
    result = runner.invoke(app, [*_calibrate_args(model, root / "cal-vh", text), "--no-learn-value-rotation"])
    _ok(result)
    assert "value rotation: Hadamard" in " ".join(result.output.split())
    plain, learned = load_artifact(root / "cal-vh"), load_artifact(exported[0])
    assert plain.meta["options"]["learn_value_rotation"] is False and learned.meta["options"]["learn_value_rotation"]
    assert all("value_head_rotation" not in layer for layer in plain.layers)
    assert all("value_head_rotation" in layer for layer in learned.layers)


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


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a command loads model weights (what the checks must come before)."""
    import rkv_convert.models.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(loading, "load_model", refuse)


def _bad_files(root):
    empty = root / "empty.txt"
    empty.write_text("")
    binary = root / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    afile = root / "afile"
    afile.write_text("not a folder")
    return {"EMPTY": empty, "BINARY": binary, "AFILE": afile, "MISSING": root / "missing.txt"}


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--samples", "0"], "Invalid value for '--samples'"),
        (["--seqlen", "1"], "Invalid value for '--seqlen'"),
        (["--batch-size", "0"], "Invalid value for '--batch-size'"),
        (["--key-group-size", "0"], "Invalid value for '--key-group-size'"),
        (["--seqlen", "100000"], "--seqlen 100000 is longer than the model's context of 512 tokens"),
        (["--data", "MISSING"], "calibration file not found"),
        (["--data", "EMPTY"], "empty.txt is empty"),
        (["--data", "BINARY"], "binary.txt is not text"),
        (["--out", "AFILE", "--overwrite"], "afile is a file, not a folder"),
        (["--dtype", "float64"], "dtype must be one of float32, float16, bfloat16"),
        (["--key-scale", "3"], "Invalid value for '--key-scale'"),
        (["--rope-span", "-1"], "Invalid value for '--rope-span'"),
        (["--rope-span", "100000"], "--rope-span 100000 is longer than the model's context of 512 tokens"),
        (["--key-layout", "prerope", "--rope-span", "64"], "--rope-span needs --key-layout folded"),
    ],
)
def test_calibrate_checks_inputs_before_loading(workspace, tmp_path, no_model_loads, extra, message) -> None:
    _, model, text, _ = workspace
    files = _bad_files(tmp_path)
    extra = [str(files.get(a, a)) for a in extra]
    args = ["calibrate", str(model), "--out", str(tmp_path / "cal"), "--data", str(text), "--device", "cpu", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "cal").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_calibrate_on_missing_cuda_is_refused(workspace, tmp_path, no_model_loads) -> None:
    _, model, text, _ = workspace
    result = runner.invoke(app, ["calibrate", str(model), "--out", str(tmp_path / "c"), "--data", str(text), "--device", "cuda"])
    _one_line_error(result, "--device cuda: no CUDA device")


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--bits", "5"], "--bits must be one of 2, 3, 4, got 5"),
        (["--flush-block", "0"], "Invalid value for '--flush-block'"),
        (["--recent-window", "-1"], "Invalid value for '--recent-window'"),
        (["--max-sinks", "-1"], "Invalid value for '--max-sinks'"),
        (["--salient-tokens", "-1"], "Invalid value for '--salient-tokens'"),
        (["--bits", "4", "--key-bits", "auto"], "--key-bits auto raises keys above --bits, so --bits must be 2 or 3"),
        (["--out", "AFILE", "--overwrite"], "afile is a file, not a folder"),
    ],
)
def test_export_checks_inputs_before_loading(exported, tmp_path, no_model_loads, extra, message) -> None:
    files = _bad_files(tmp_path)
    extra = [str(files.get(a, a)) for a in extra]
    result = runner.invoke(app, ["export", "--calibration", str(exported[0]), "--out", str(tmp_path / "ck"), *extra])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "ck").exists()


def test_export_removes_stale_temp_folders_of_its_output(exported, tmp_path) -> None:
    """A folder left by a killed run (dead process id in its name) goes; one of a live run stays."""
    stale = tmp_path / ".ck.rkv-tmp-999999999-abcd1234"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    live = tmp_path / f".ck.rkv-tmp-{os.getpid()}-abcd1234"
    live.mkdir()
    other = tmp_path / ".other.rkv-tmp-999999999-abcd1234"
    other.mkdir()
    result = runner.invoke(app, ["export", "--calibration", str(exported[0]), "--out", str(tmp_path / "ck")])
    _ok(result)
    assert not stale.exists() and live.exists() and other.exists()
    assert "removed" in result.output and stale.name in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".ck.rkv-tmp-" f"{os.getpid()}-abcd1234", other.name, "ck"])


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--windows", "-1"], "Invalid value for '--windows'"),
        (["--length", "0"], "Invalid value for '--length'"),
        (["--length", "1"], "Invalid value for '--length'"),
        (["--bits", "two"], "--bits takes a comma list of 2, 3, 4; got 'two'"),
        (["--bits", "2,5"], "--bits takes a comma list of 2, 3, 4; got '2,5'"),
        (["--length", "4096"], "--length 4096 is longer than the model's context of 512 tokens"),
    ],
)
def test_eval_checks_its_options(workspace, exported, extra, message) -> None:
    evaltext = workspace[3]
    result = runner.invoke(app, ["eval", str(exported[1]), "--text", str(evaltext), "--device", "cpu", *extra])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert message in " ".join(result.output.split()), result.output


def test_eval_table_is_complete_when_piped(workspace, exported) -> None:
    """Not a terminal (CliRunner): every column of the table is printed whole, not cut at 80 characters."""
    result = runner.invoke(app, ["eval", str(exported[1]), "--text", str(workspace[3]), "--windows", "1", "--length", "64",
                                 "--schemes", "fp,rotatekv", "--bits", "2", "--device", "cpu"])
    _ok(result)
    for header in ("K bits/elem", "V bits/elem", "effective bits", "× FP", "deployed = sinks + 128-token recent window"):
        assert header in result.output, result.output
    assert any(line.count("│") >= 9 and "rotatekv" in line and "deployed" in line for line in result.output.splitlines())


def _truncated_copy(checkpoint, folder):
    copy = shutil.copytree(checkpoint, folder)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return copy


def test_truncated_weights_give_one_line_errors(workspace, exported, tmp_path) -> None:
    broken = _truncated_copy(exported[1], tmp_path / "broken")
    evaltext = str(workspace[3])
    result = runner.invoke(app, ["eval", str(broken), "--text", evaltext, "--device", "cpu"])
    _one_line_error(result, "model.safetensors is truncated or corrupt")
    assert "re-export" in result.output
    result = runner.invoke(app, ["inspect", str(broken), "--out", str(tmp_path / "figs"), "--text", evaltext, "--device", "cpu"])
    _one_line_error(result, "model.safetensors is truncated or corrupt")


def test_library_errors_are_one_line(workspace, exported, tmp_path, monkeypatch) -> None:
    """An untested transformers release or a disengaged cache: an `error:` line and a non-zero exit."""
    import rkv_convert.calibrate.run as calibrate_run
    import rkv_convert.evaluate.perplexity as perplexity
    from rkv_convert.models.compat import CacheDisengagedError, UntestedTransformersError

    def untested(*args, **kwargs):
        raise UntestedTransformersError("transformers 9.0 is installed; rkv is tested with transformers>=5.17,<=5.24")

    def disengaged(*args, **kwargs):
        raise CacheDisengagedError("the rkv cache received no tokens")

    _, model, text, evaltext = workspace
    monkeypatch.setattr(calibrate_run, "calibrate", untested)
    result = runner.invoke(app, _calibrate_args(model, tmp_path / "cal", text))
    _one_line_error(result, "error: transformers 9.0 is installed")
    monkeypatch.setattr(perplexity, "perplexity", disengaged)
    result = runner.invoke(app, ["eval", str(exported[1]), "--text", str(evaltext), "--windows", "1", "--length", "64",
                                 "--device", "cpu"])
    _one_line_error(result, "error: the rkv cache received no tokens")
