"""``rkv inspect``: figures of what the key transform, the sinks and each KV scheme do, layer by layer.

Registered by ``rkv_convert/cli.py`` as ``app.command("inspect")(inspect_command)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer
from rich.table import Table

from ..cli_checks import LIBRARY_ERRORS, check_device, fail, make_console

__all__ = ["inspect_command", "inspect_checkpoint"]

console = make_console(stderr=True)


def inspect_checkpoint(checkpoint: str | Path, out: str | Path, text: str = "pydoc", windows: int = 4, length: int = 512,
                       bits: int | None = None, device: str = "cpu") -> list[Path]:
    """Library entry point: gather the statistics on ``windows`` × ``length`` tokens of ``text``
    (a calibration source name or a file), write the PNGs and ``inspect.json`` into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..calibration_data.sources import load_text
    from ..evaluate.perplexity import token_windows
    from ..evaluate.schemes import build_scheme
    from ..export.format import RKV_TENSORS_FILE, read_checkpoint, tensor_name
    from .plots import require_matplotlib, summary, write_plots
    from .stats import collect_stats

    require_matplotlib()  # fail before the forward pass, not after
    ck = read_checkpoint(checkpoint)
    bits = bits or ck.config.bits
    clips = None
    if bits != ck.config.bits:
        from safetensors.torch import load_file

        tensors = load_file(str(Path(checkpoint) / RKV_TENSORS_FILE))
        clips = {w: [tensors[tensor_name(i, f"{w}_clip_by_bits")] for i in range(ck.config.num_layers)] for w in ("key", "value")}
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    body = Path(text).read_text(encoding="utf-8") if Path(text).is_file() else load_text(text)
    ids = token_windows(tokenizer, body, length, windows)
    schemes = {f"{name}-{bits}": build_scheme(name, bits, ck, clips) for name in ("rtn", "kivi", "rotatekv")}
    stats = collect_stats(model, ck, ids, schemes)
    folder = Path(out)
    paths = write_plots(stats, folder, f"{bits}-bit, {ids.shape[0]}×{ids.shape[1]} tokens")
    meta = {"checkpoint": str(checkpoint), "text": text, "windows": int(ids.shape[0]), "length": int(ids.shape[1]), "bits": bits}
    (folder / "inspect.json").write_text(json.dumps({**meta, **summary(stats)}, indent=2) + "\n")
    return paths + [folder / "inspect.json"]


def inspect_command(
    checkpoint: Path = typer.Argument(Path("rkv-out/checkpoint"), help="Folder written by `rkv export`."),
    out: Path = typer.Option(Path("rkv-out/inspect"), help="Folder for the PNG figures and inspect.json."),
    text: str = typer.Option("pydoc", help="Text to run: a calibration source name (pydoc) or a text file."),
    windows: int = typer.Option(4, min=1, help="Windows of text."),
    length: int = typer.Option(512, min=2, help="Tokens per window."),
    bits: int = typer.Option(0, min=0, help="Bit width of the schemes compared (0 = the checkpoint's)."),
    device: str = typer.Option("cuda" if torch.cuda.is_available() else "cpu"),
) -> None:
    """Plot per-layer key channel magnitudes (before/after rotation and reordering), massive activations,
    attention to sink tokens and quantization error per scheme; list the files written."""
    from ..export.format import CheckpointError

    try:
        check_device(device)
        with console.status("running the model and drawing"):
            paths = inspect_checkpoint(checkpoint, out, text, windows, length, bits or None, device)
    except (CheckpointError, OSError, ValueError, RuntimeError, *LIBRARY_ERRORS) as err:
        fail(console, err)
    table = Table(title=f"rkv inspect → {out}")
    table.add_column("file")
    table.add_column("shows")
    shows = {
        "key_channels_heatmap.png": "mean |k| per layer × channel: pre-RoPE, centred+rotated, calibrated order",
        "key_channel_profiles.png": "the same per channel for the first, middle and last layer",
        "massive_activations.png": "|h| over tokens × channels; max |h| per token and layer; max/median per layer",
        "sink_attention.png": "attention mass on token 0 and on detected sinks, sinks per window",
        "quant_error.png": "relative key/value error per layer for RTN, KIVI-style and RotateKV",
        "inspect.json": "the numbers behind the figures",
    }
    for p in paths:
        table.add_row(str(p), shows.get(p.name, ""))
    make_console().print(table)
