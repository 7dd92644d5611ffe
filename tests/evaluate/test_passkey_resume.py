"""Resuming the passkey task: results saved after each path × bits × length, a later run with the
same folder adds only what is missing, and a folder made another way is refused."""

import csv
import json

import pytest
import torch
from tiny_models import save_chat_model, tiny_chat_tokenizer, tiny_model
from typer.testing import CliRunner

from rkv_convert.calibrate.run import CalibrationOptions, calibrate
from rkv_convert.cli import app
from rkv_convert.evaluate.checkpoints import checkpoint_at_bits
from rkv_convert.evaluate.passkey import PasskeyOptions, PasskeyResult, run_passkey
from rkv_convert.evaluate.passkey_store import PasskeySetup, load_results, save_results
from rkv_convert.export.fuse import fuse_calibration
from rkv_convert.export.writer import checkpoint_from_artifact

FILLER = " ".join(f"The method number {i} returns a list of names." for i in range(300))
runner = CliRunner()


def _result(path: str, bits: int, length: int, correct: int = 1) -> PasskeyResult:
    return PasskeyResult(path, bits, length, 2, correct, {"0.5": correct / 2}, 1.5, "cpu", [" 12345.", " 4."])


def test_saved_results_load_back_and_another_setup_is_refused(tmp_path) -> None:
    setup = PasskeySetup(trials=2, depths=(0.1, 0.5), seed=0, max_new_tokens=10, checkpoint_sha256="ab" * 32)
    assert load_results(tmp_path / "none", setup) == []
    results = [_result("fp", 16, 300, 2), _result("kivi", 2, 300)]
    save_results(tmp_path, setup, results)
    assert load_results(tmp_path, setup) == results
    rows = list(csv.DictReader((tmp_path / "passkey.csv").open()))
    assert [(r["path"], r["correct"], r["fp_accuracy"]) for r in rows] == [("fp", "2", "1.0000"), ("kivi", "1", "1.0000")]
    assert not list(tmp_path.glob(".passkey*"))  # no temp file left behind

    for other, named in [(PasskeySetup(3, (0.1, 0.5), 0, 10, "ab" * 32), "trials 2 there, 3 now"),
                         (PasskeySetup(2, (0.1, 0.5), 1, 10, "ab" * 32), "seed 0 there, 1 now"),
                         (PasskeySetup(2, (0.1, 0.5), 0, 10, "cd" * 32), "checkpoint_sha256")]:  # fmt: skip
        with pytest.raises(ValueError, match=named):
            load_results(tmp_path, other)
    saved = json.loads((tmp_path / "passkey.json").read_text())
    del saved["setup"]["prompt_feeding"]  # written before prompts were fed in one piece
    (tmp_path / "passkey.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="prompt_feeding None there, 'one piece' now"):
        load_results(tmp_path, setup)
    (tmp_path / "passkey.json").write_text(json.dumps([r.as_dict() for r in results]))  # the former list format
    with pytest.raises(ValueError, match="not a resumable passkey results file"):
        load_results(tmp_path, setup)


def test_run_passkey_skips_what_is_done_and_reports_after_each_result() -> None:
    tok = tiny_chat_tokenizer()
    source = tiny_model("llama", n_kv=2)
    artifact = calibrate(source, torch.randint(0, 128, (2, 64)), CalibrationOptions(num_samples=2, seqlen=64, batch_size=2))
    fuse_calibration(source, artifact)
    ck = checkpoint_from_artifact(artifact, 2, recent_window=16, flush_block=8, max_sinks=2)
    clips = {w: [layer[f"{w}_clip_by_bits"] for layer in artifact.layers] for w in ("key", "value")}
    opts = PasskeyOptions(lengths=(300, 320), trials=2, depths=(0.5,), max_new_tokens=4, batch_size=2)
    at = lambda b: checkpoint_at_bits(ck, clips, b)  # noqa: E731

    full = run_passkey(source, tok, ck, at, ["fp", "kivi"], [2], opts, FILLER, backend="reference")
    seen: list[list] = []
    resumed = run_passkey(source, tok, ck, at, ["fp", "kivi"], [2], opts, FILLER, backend="reference",
                          done=full[:3], on_result=lambda so_far: seen.append(list(so_far)))  # fmt: skip
    assert resumed[:3] == full[:3]  # the done results are returned as they were, not re-run
    assert [(r.path, r.bits, r.length) for r in resumed] == [(r.path, r.bits, r.length) for r in full]
    assert resumed[3].answers == full[3].answers and resumed[3].correct == full[3].correct
    assert len(seen) == 1 and len(seen[0]) == 4  # one new result, reported with everything before it


def test_cli_passkey_resumes_from_its_out_folder(tmp_path, pipeline_texts) -> None:
    folder = save_chat_model(tmp_path / "model")
    text = pipeline_texts[0]
    cal, ck, out = tmp_path / "cal", tmp_path / "ck", tmp_path / "pk"
    for args in (["calibrate", str(folder), "--data", str(text), "--samples", "2", "--seqlen", "64", "--device", "cpu",
                  "--out", str(cal)],
                 ["export", "--calibration", str(cal), "--out", str(ck), "--bits", "2", "--recent-window", "16",
                  "--flush-block", "8"]):  # fmt: skip
        done = runner.invoke(app, args)
        assert done.exit_code == 0, done.output
    base = ["eval", str(ck), "--task", "passkey", "--lengths", "300", "--trials", "2", "--device", "cpu", "--bits", "2",
            "--out", str(out)]  # fmt: skip

    first = runner.invoke(app, [*base, "--schemes", "fp"])
    assert first.exit_code == 0, first.output
    saved = json.loads((out / "passkey.json").read_text())
    assert [r["path"] for r in saved["results"]] == ["fp"] and saved["setup"]["trials"] == 2

    second = runner.invoke(app, [*base, "--schemes", "fp,kivi"])
    assert second.exit_code == 0, second.output
    flat = " ".join(second.output.split())
    assert "fp-16 @ 300: already done (resumed)" in flat and "hold 2 results (1 resumed)" in flat
    saved_again = json.loads((out / "passkey.json").read_text())
    assert saved_again["results"][0] == saved["results"][0]  # fp kept from the first run, not re-run
    rows = list(csv.DictReader((out / "passkey.csv").open()))
    assert [(r["path"], r["bits"]) for r in rows] == [("fp", "16"), ("kivi", "2")]

    bad = runner.invoke(app, [*base, "--trials", "3", "--schemes", "fp"])  # the last --trials wins
    assert bad.exit_code == 2 and "trials 2 there, 3 now" in " ".join(bad.output.split())
    assert json.loads((out / "passkey.json").read_text()) == saved_again  # nothing written by the refused run


def test_checkpoint_digest_follows_the_rkv_config(tmp_path) -> None:
    """Two checkpoints with the same tensors but another ``rkv`` config (e.g. salient tokens) answer differently."""
    from rkv_convert.evaluate.passkey_store import checkpoint_digest

    (tmp_path / "rkv.safetensors").write_bytes(b"tensors")
    (tmp_path / "config.json").write_text(json.dumps({"rkv": {"salient_tokens": 0}, "hidden_size": 8}))
    before = checkpoint_digest(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8, "rkv": {"salient_tokens": 0}}))
    assert checkpoint_digest(tmp_path) == before  # key order does not matter
    (tmp_path / "config.json").write_text(json.dumps({"rkv": {"salient_tokens": 32}, "hidden_size": 8}))
    assert checkpoint_digest(tmp_path) != before
