"""`rkv eval --task passkey` on a tiny model folder: table, CSV/JSON files, refusals."""

import csv
import json

from tiny_models import save_chat_model, save_tiny_model
from typer.testing import CliRunner

from rkv_convert.cli import app

runner = CliRunner()
def _ok(result) -> None:
    assert result.exit_code == 0, result.output


def test_eval_passkey(tmp_path, pipeline_texts) -> None:
    folder = save_chat_model(tmp_path / "model")
    text = pipeline_texts[0]
    cal, ck, out = tmp_path / "cal", tmp_path / "ck", tmp_path / "pk"
    _ok(runner.invoke(app, ["calibrate", str(folder), "--data", str(text), "--samples", "2", "--seqlen", "64",
                            "--device", "cpu", "--out", str(cal)]))  # fmt: skip
    _ok(runner.invoke(app, ["export", "--calibration", str(cal), "--out", str(ck), "--bits", "2", "--recent-window", "16",
                            "--flush-block", "8"]))  # fmt: skip
    base = ["eval", str(ck), "--task", "passkey", "--lengths", "300", "--trials", "2", "--device", "cpu"]

    result = runner.invoke(app, [*base, "--schemes", "fp,rotatekv,kivi", "--bits", "2,3", "--out", str(out)])
    _ok(result)
    flat = " ".join(result.output.split())
    assert "passkey retrieval: 2 trials per length" in flat and "ran on cpu" in flat
    rows = list(csv.DictReader((out / "passkey.csv").open()))
    assert [(r["path"], r["bits"]) for r in rows] == [("fp", "16"), ("rotatekv", "2"), ("rotatekv", "3"), ("kivi", "2"), ("kivi", "3")]
    assert all(r["length"] == "300" and r["trials"] == "2" and r["device"].startswith("cpu") for r in rows)
    records = json.loads((out / "passkey.json").read_text())["results"]
    assert len(records) == 5 and all(len(r["answers"]) == 2 for r in records)

    bad = runner.invoke(app, [*base, "--schemes", "fp,nope"])
    assert bad.exit_code == 2 and "--schemes for the passkey task" in " ".join(bad.output.split())
    bad = runner.invoke(app, [*base, "--lengths", "300,99999"])
    assert bad.exit_code == 2 and "--lengths 99999 is longer than the model's context" in " ".join(bad.output.split())
    bad = runner.invoke(app, ["eval", str(ck), "--length", "64", "--device", "cpu"])
    assert bad.exit_code == 2 and "--task perplexity needs --text" in " ".join(bad.output.split())


def test_export_with_per_layer_widths_and_eval_as_exported(tmp_path, pipeline_texts) -> None:
    folder = save_tiny_model(tmp_path / "model", n_kv=2)
    text, evaltext = pipeline_texts
    cal, ck = tmp_path / "cal", tmp_path / "ck"
    _ok(runner.invoke(app, ["calibrate", str(folder), "--data", str(text), "--samples", "2", "--seqlen", "64",
                            "--device", "cpu", "--out", str(cal)]))  # fmt: skip
    bad = runner.invoke(app, ["export", "--calibration", str(cal), "--out", str(ck), "--key-bits", "3,2,4"])
    assert bad.exit_code == 2 and "--key-bits takes one of 2, 3, 4 or a comma list of 2" in " ".join(bad.output.split())
    assert not ck.exists()
    _ok(runner.invoke(app, ["export", "--calibration", str(cal), "--out", str(ck), "--bits", "2", "--key-bits", "3,2",
                            "--value-bits", "4", "--recent-window", "8", "--flush-block", "8"]))  # fmt: skip
    from rkv_convert.export.format import read_checkpoint

    config = read_checkpoint(ck).config
    assert (config.version, config.key_bits, config.value_bits) == (7, [3, 2], [4, 4])
    result = runner.invoke(app, ["eval", str(ck), "--text", str(evaltext), "--windows", "1", "--length", "64",
                                 "--schemes", "rotatekv", "--bits", "2", "--protocols", "oneshot", "--device", "cpu",
                                 "--json"])  # fmt: skip
    _ok(result)
    rows = json.loads(result.stdout[result.stdout.index("[") :])
    # the default 8-bit metadata: a quarter bit per element at groups of 64
    assert [(r["scheme"], r["key_bits"], r["value_bits"]) for r in rows] == [("rotatekv", 2.25, 2.25), ("rotatekv-mixed", 2.75, 4.25)]
