"""The whole CLI with the folded key layout on a tiny model folder: calibrate → export → eval → run."""

import json
import shutil

from tiny_models import save_tiny_model
from typer.testing import CliRunner

from rich.console import Console

from rkv_convert.calibrate.artifact import load_artifact
from rkv_convert.cli import _calibration_table, app
from rkv_convert.export.format import read_checkpoint

runner = CliRunner()


def _ok(result) -> None:
    assert result.exit_code == 0, result.output


def test_folded_calibrate_export_eval_run(tmp_path) -> None:
    model = save_tiny_model(tmp_path / "model", "llama", n_kv=2)
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(f"The cache stores key {i} and value {i * 7} in two bits." for i in range(400)))
    evaltext = tmp_path / "eval.txt"
    evaltext.write_text(" ".join(f"word{i % 37} follows word{(i * 5) % 37}." for i in range(600)))
    cal, ck = tmp_path / "cal", tmp_path / "ck"
    base = ["calibrate", str(model), "--data", str(text), "--samples", "2", "--seqlen", "64", "--device", "cpu"]

    bad = runner.invoke(app, [*base, "--out", str(tmp_path / "bad"), "--key-layout", "postrope"])
    assert bad.exit_code == 2 and "--key-layout must be one of prerope, folded" in " ".join(bad.output.split())
    bad = runner.invoke(app, [*base, "--out", str(tmp_path / "bad"), "--key-layout", "folded", "--head-group-size", "2"])
    assert bad.exit_code == 2 and "--head-group-size 2 needs prerope" in " ".join(bad.output.split())
    assert not (tmp_path / "bad").exists()

    calibrated = runner.invoke(app, [*base, "--out", str(cal), "--key-layout", "folded", "--key-group-size", "32"])
    _ok(calibrated)
    assert "folded keys, head groups of 1" in " ".join(calibrated.output.split())
    assert json.loads((cal / "calibration.json").read_text())["options"]["key_layout"] == "folded"
    wide = Console(width=300, record=True)
    wide.print(_calibration_table(load_artifact(cal)))
    header = wide.export_text().splitlines()[2]
    assert "retrieval head score" in header  # the calibrator's induction scores: a column of the per-layer table

    exported = runner.invoke(app, ["export", "--calibration", str(cal), "--out", str(ck), "--bits", "2",
                                   "--recent-window", "4", "--flush-block", "4", "--max-sinks", "1"])  # fmt: skip
    _ok(exported)
    assert "--key-bits auto: keys at 3 bits in layers" in " ".join(exported.output.split())
    config = read_checkpoint(ck).config
    # the default store in the folded layout: 8-bit metadata paying for 3-bit keys in half the layers, salient tokens
    assert (config.version, config.key_layout, config.head_group_size, config.group_meta) == (7, "folded", 1, "log8")
    assert config.group_ranges == "minmax"
    assert sorted(config.key_bits) == [2, 3] and config.value_bits == [2, 2]
    assert config.salient_tokens == 32
    assert all(layer.key_head_rotation is not None for layer in read_checkpoint(ck).layers)  # learned by default

    result = runner.invoke(app, ["eval", str(ck), "--text", str(evaltext), "--windows", "1", "--length", "64",
                                 "--schemes", "fp,rotatekv", "--bits", "2", "--device", "cpu", "--json"])  # fmt: skip
    _ok(result)
    rows = json.loads(result.stdout[result.stdout.index("[") :])
    assert {(r["scheme"], r["protocol"]) for r in rows} == {("fp", "oneshot"), *((s, p) for s in ("rotatekv", "rotatekv-mixed")
                                                                                   for p in ("oneshot", "deployed"))}  # fmt: skip
    assert all(r["perplexity"] > 1 for r in rows)

    # the plain store is one option away: fp16 metadata, every layer at --bits, no salient tokens
    plain = tmp_path / "ck_plain"
    exported = runner.invoke(app, ["export", "--calibration", str(cal), "--out", str(plain), "--bits", "2",
                                   "--group-meta", "fp16", "--salient-tokens", "0"])  # fmt: skip
    _ok(exported)
    assert "keys at 2 bits in every layer; fp16 group metadata" in " ".join(exported.output.split())
    config = read_checkpoint(plain).config
    assert (config.group_meta, config.key_bits, config.salient_tokens) == ("fp16", [2, 2], 0)

    result = runner.invoke(app, ["run", str(ck), "-p", "The cache stores key 12 and value 84 in", "-n", "6", "--greedy",
                                 "--no-chat", "--device", "cpu"])  # fmt: skip
    _ok(result)

    # 8-bit group metadata with 3-bit keys in one layer: export, eval (as exported and uniform), run
    ck8 = tmp_path / "ck8"
    bad = runner.invoke(app, ["export", "--calibration", str(cal), "--out", str(ck8), "--group-meta", "int8"])
    assert bad.exit_code == 2 and "--group-meta takes one of fp16, log8" in " ".join(bad.output.split())
    bad = runner.invoke(app, ["export", "--calibration", str(cal), "--out", str(ck8), "--group-ranges", "best"])
    assert bad.exit_code == 2 and "--group-ranges takes one of minmax, searched" in " ".join(bad.output.split())
    assert not ck8.exists()
    # with searched group ranges: eval's codecs and the runtime's writes below take them
    exported = runner.invoke(app, ["export", "--calibration", str(cal), "--out", str(ck8), "--bits", "2", "--group-meta",
                                   "log8", "--key-bits", "auto", "--recent-window", "4", "--flush-block", "4",
                                   "--max-sinks", "1", "--salient-tokens", "2", "--group-ranges", "searched"])  # fmt: skip
    _ok(exported)
    assert "--key-bits auto: keys at 3 bits in layers" in " ".join(exported.output.split())
    assert "searched group ranges" in " ".join(exported.output.split())
    config = read_checkpoint(ck8).config
    assert config.group_meta == "log8" and sorted(config.key_bits) == [2, 3]  # half of the 2 layers raised
    assert config.group_ranges == "searched"
    assert config.salient_tokens == 2  # `rkv run` below prefills with them
    assert config.key_bits_per_element == (3.5 + 2.5) / 2  # groups of 32: 16/32 bit
    result = runner.invoke(app, ["eval", str(ck8), "--text", str(evaltext), "--windows", "1", "--length", "64",
                                 "--schemes", "rotatekv", "--bits", "2", "--protocols", "oneshot", "--device", "cpu",
                                 "--json"])  # fmt: skip
    _ok(result)
    rows = json.loads(result.stdout[result.stdout.index("[") :])
    assert sorted((r["bits"], r["key_bits"], r["value_bits"]) for r in rows) == [(2, 2.5, 2.25), (2, 3.0, 2.25)]  # values: groups of 64
    result = runner.invoke(app, ["run", str(ck8), "-p", "The cache stores key 12 and value 84 in", "-n", "6", "--greedy",
                                 "--no-chat", "--device", "cpu"])  # fmt: skip
    _ok(result)

    # --key-bits retrieval: the same added bits, first on the layer with the strongest retrieval head
    ckr = tmp_path / "ckr"
    exported = runner.invoke(app, ["export", "--calibration", str(cal), "--out", str(ckr), "--bits", "2", "--group-meta",
                                   "log8", "--key-bits", "retrieval"])  # fmt: skip
    _ok(exported)
    assert "--key-bits retrieval: keys at" in " ".join(exported.output.split())
    widths = read_checkpoint(ckr).config.key_bits
    assert sum(b - 2 for b in widths) == 1 and sorted(widths) == [2, 3]  # one step for 2 layers: no room for 4 bits

    # an artifact from before the induction scores: refused with what to do, nothing written
    from safetensors.torch import load_file, save_file

    old = tmp_path / "cal_old"
    shutil.copytree(cal, old)
    tensors = load_file(old / "calibration.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith("key_induction")}, old / "calibration.safetensors")
    refused = runner.invoke(app, ["export", "--calibration", str(old), "--out", str(tmp_path / "ck_old"), "--key-bits",
                                  "retrieval"])  # fmt: skip
    assert refused.exit_code != 0 and "needs each layer's key_induction" in " ".join(refused.output.split())
    assert not (tmp_path / "ck_old").exists()
