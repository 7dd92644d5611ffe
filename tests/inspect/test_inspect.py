import json

import pytest
import torch
from tiny_models import save_tiny_model
from typer.testing import CliRunner

pytest.importorskip("matplotlib")

from rkv_convert.calibrate.run import CalibrationOptions, calibrate  # noqa: E402
from rkv_convert.evaluate.schemes import build_scheme  # noqa: E402
from rkv_convert.export.format import read_checkpoint  # noqa: E402
from rkv_convert.export.writer import export_checkpoint  # noqa: E402
from rkv_convert.inspect.cli import inspect_checkpoint, inspect_command  # noqa: E402
from rkv_convert.inspect.stats import collect_stats  # noqa: E402
from rkv_convert.models.loading import load_model  # noqa: E402

FIGURES = {"key_channels_heatmap.png", "key_channel_profiles.png", "massive_activations.png", "sink_attention.png",
           "quant_error.png"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("src") / "model", "llama", n_kv=2)
    loaded = load_model(str(folder))
    batches = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    art = calibrate(loaded.model, batches, CalibrationOptions(num_samples=2, seqlen=32, batch_size=2, clip_samples=32))
    return export_checkpoint(loaded, art, tmp_path_factory.mktemp("ck") / "ck", bits=2)


def _text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return path


def test_stats_have_one_entry_per_layer_and_sane_errors(checkpoint, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    ck = read_checkpoint(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    windows = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(2))
    schemes = {"rotatekv-2": build_scheme("rotatekv", 2, ck), "rotatekv-4": build_scheme("rotatekv", 4, ck)}
    stats = collect_stats(model, ck, windows, schemes)
    assert stats.key_abs_before.shape == (2, 128) and stats.key_abs_reordered.shape == (2, 128)
    # reordering only permutes channels
    torch.testing.assert_close(stats.key_abs_reordered.sort(1).values, stats.key_abs_rotated.sort(1).values)
    assert stats.hidden_token_max.shape == (2, 40)
    assert torch.all((stats.first_token_attention > 0) & (stats.first_token_attention <= 1))
    for which in ("key", "value"):
        assert torch.all(stats.quant_error["rotatekv-4"][which] < stats.quant_error["rotatekv-2"][which])


def test_inspect_writes_and_lists_figures(checkpoint, tmp_path) -> None:
    paths = inspect_checkpoint(checkpoint, tmp_path / "figs", str(_text(tmp_path)), windows=2, length=32, bits=3)
    assert {p.name for p in paths} == FIGURES | {"inspect.json"}
    for p in paths:
        assert p.stat().st_size > 0
    summary = json.loads((tmp_path / "figs" / "inspect.json").read_text())
    assert set(summary["relative_error"]) == {"rtn-3", "kivi-3", "rotatekv-3"}
    assert len(summary["attention_to_token0"]) == 2


def test_inspect_command_through_typer(checkpoint, tmp_path) -> None:
    import typer

    app = typer.Typer()
    app.command("inspect")(inspect_command)
    app.command("noop")(lambda: None)  # two commands: typer keeps the sub-command name
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["inspect", str(checkpoint), "--out", str(out), "--text", str(_text(tmp_path)),
                                      "--windows", "1", "--length", "32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert FIGURES <= {p.name for p in out.iterdir()}
    bad = CliRunner().invoke(app, ["inspect", str(tmp_path / "missing"), "--out", str(out)])
    assert bad.exit_code == 2
