"""The ``rkv`` command line: a thin layer over the library (calibrate → export → eval / run)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .models.loading import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True, help="RotateKV 2-bit KV caches: calibrate, export, evaluate, run.")
console = Console(stderr=True)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise typer.BadParameter(f"dtype must be one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False,
    )


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}")
    raise typer.Exit(code=2)


def _progress_callback(progress: Progress):
    tasks: dict[str, int] = {}

    def update(label: str, done: int, total: int) -> None:
        if label not in tasks:
            tasks[label] = progress.add_task(label, total=total)
        progress.update(tasks[label], completed=done)

    return update


@app.command()
def calibrate(
    model: str = typer.Argument(DEFAULT_MODEL, help="Hub id, local folder, .gguf file, or 'smollm2-135m'."),
    out: Path = typer.Option(Path("rkv-out/calibration"), help="Folder for the calibration artifact."),
    data: str = typer.Option("pydoc", help="Calibration text: pydoc (built-in, offline), wikitext2, c4, pile, or a .txt/.jsonl/.parquet file."),
    samples: int = typer.Option(32, help="Number of calibration windows."),
    seqlen: int = typer.Option(512, help="Tokens per calibration window."),
    seed: int = typer.Option(0, help="Seed for window sampling and row samples."),
    batch_size: int = typer.Option(4, help="Windows per forward pass."),
    head_group_size: Optional[int] = typer.Option(None, help="KV heads per rotation group (default: largest with a Hadamard of <=512 channels)."),
    key_group_size: int = typer.Option(64, help="Key channels per quantization group."),
    value_group_size: int = typer.Option(64, help="Value channels per quantization group."),
    sink_ratio: float = typer.Option(64.0, help="A residual activation above this multiple of the layer's median |h| is massive (a sink)."),
    permutation: str = typer.Option(
        "mean_abs",
        help="How rotated key channels are grouped for quantization: sorted by mean_abs, max_abs or rms (outlier-aware), "
        "or none (consecutive channels). With none and key groups of one head (--key-group-size = head dim), decoding "
        "takes the faster chunk kernel (docs/benchmarks.md; accuracy cost in docs/accuracy.md).",
    ),
    device: str = typer.Option("cuda" if torch.cuda.is_available() else "cpu", help="Device for the forward passes."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="Spread the model over devices with accelerate (e.g. auto); replaces --device."),
    dtype: str = typer.Option("float32", help="Model dtype: float32, float16, bfloat16."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code/--no-trust-remote-code", help="Allow model code from the hub."),
    overwrite: bool = typer.Option(False, "--overwrite/--no-overwrite", help="Replace an existing --out folder."),
) -> None:
    """Gather key/activation statistics and build per-layer rotations, permutations, clips and sink channels."""
    from .calibrate.artifact import save_artifact
    from .calibrate.run import CalibrationOptions
    from .calibrate.run import calibrate as run_calibration
    from .calibration_data.sources import CalibrationDataError, load_text, sample_batches
    from .export.format import CheckpointError
    from .models.adapters import UnsupportedModelError
    from .models.loading import ModelLoadError, load_model

    if out.exists() and not overwrite:
        _fail(FileExistsError(f"{out} already exists; pass --overwrite or choose another --out"))
    from .calibrate.search import PERM_STATISTICS

    if permutation not in PERM_STATISTICS:
        _fail(ValueError(f"--permutation must be one of {', '.join(PERM_STATISTICS)}, got {permutation!r}"))
    options = CalibrationOptions(data, samples, seqlen, seed, batch_size, head_group_size, key_group_size, value_group_size, sink_ratio,
                                 perm_statistic=permutation)  # fmt: skip
    start = time.perf_counter()
    try:
        with console.status(f"loading {model}"):
            loaded = load_model(model, _dtype(dtype), device, trust_remote_code, device_map=device_map)
            batches = sample_batches(load_text(data), loaded.tokenizer, samples, seqlen, seed)
        with _progress() as progress:
            artifact = run_calibration(loaded.model, batches, options, _progress_callback(progress))
        artifact.meta["model_source"] = model
        save_artifact(artifact, out, overwrite=overwrite)
    except (ModelLoadError, UnsupportedModelError, CalibrationDataError, CheckpointError, ValueError, FileExistsError) as err:
        _fail(err)
    elapsed = time.perf_counter() - start
    console.print(_calibration_table(artifact))
    console.print(f"calibrated on {batches.numel():,} tokens of '{data}' in {elapsed:.1f} s → [bold]{out}[/]")


def _calibration_table(artifact) -> Table:
    from .calibrate.search import outlier_ratio

    opts = artifact.meta["options"]
    table = Table(title=f"per-layer calibration (head groups of {opts['head_group_size']}, key/value groups {opts['key_group_size']}/{opts['value_group_size']})")
    for col in ("layer", "key outlier ratio before", "after rotation", "sink channels", "sink tokens", "key clip 2/3/4 bit", "value clip 2/3/4 bit"):
        table.add_column(col, justify="right")
    for i, layer in enumerate(artifact.layers):
        table.add_row(
            str(i),
            f"{outlier_ratio(layer['key_abs_mean_before']):.2f}",
            f"{outlier_ratio(layer['key_abs_mean_after']):.2f}",
            ",".join(map(str, layer["sink_channels"].tolist())) or "-",
            str(artifact.meta["sink_tokens_flagged"][i]),
            "/".join(f"{c:.3g}" for c in layer["key_clip_by_bits"].tolist()),
            "/".join(f"{c:.3g}" for c in layer["value_clip_by_bits"].tolist()),
        )
    return table


@app.command()
def export(
    calibration: Path = typer.Option(Path("rkv-out/calibration"), help="Artifact folder written by `rkv calibrate`."),
    out: Path = typer.Option(Path("rkv-out/checkpoint"), help="Folder for the augmented checkpoint."),
    model: Optional[str] = typer.Option(None, help="Source model (default: the one the artifact was calibrated on)."),
    bits: int = typer.Option(2, help="Bits per cached key/value element: 2, 3 or 4."),
    recent_window: int = typer.Option(128, help="Recent tokens kept in full precision by the runtime."),
    flush_block: int = typer.Option(64, help="Tokens moved from the window to the quantized store at a time."),
    max_sinks: int = typer.Option(8, help="Most sink tokens per sequence kept in full precision."),
    dtype: str = typer.Option("float32", help="Weights dtype of the written checkpoint."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code/--no-trust-remote-code"),
    overwrite: bool = typer.Option(False, "--overwrite/--no-overwrite", help="Replace an existing --out folder."),
) -> None:
    """Write weights with the value rotation fused, the calibration tensors and the rkv config."""
    from .calibrate.artifact import load_artifact
    from .export.format import CheckpointError
    from .export.writer import export_checkpoint
    from .models.adapters import UnsupportedModelError
    from .models.loading import ModelLoadError, load_model

    try:
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite or choose another --out")
        artifact = load_artifact(calibration)
        source = model or artifact.meta.get("model_source")
        if not source:
            raise CheckpointError("the artifact does not record its model; pass --model")
        with console.status(f"loading {source}"):
            loaded = load_model(source, _dtype(dtype), "cpu", trust_remote_code)
        with console.status("fusing the value rotation, checking logits, writing"):
            path = export_checkpoint(loaded, artifact, out, bits, recent_window, flush_block, max_sinks, overwrite)
    except (CheckpointError, ModelLoadError, UnsupportedModelError, FileExistsError, ValueError) as err:
        _fail(err)
    console.print(f"exported {bits}-bit rkv checkpoint of {source} → [bold]{path}[/]")


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Argument(Path("rkv-out/checkpoint"), help="Folder written by `rkv export`."),
    text: Path = typer.Option(..., help="Evaluation text file (e.g. wiki.test.raw)."),
    windows: int = typer.Option(8, help="Number of non-overlapping windows (0 = all)."),
    length: int = typer.Option(1024, help="Tokens per window."),
    schemes: str = typer.Option("fp,rtn,kivi,rotatekv", help="Comma list of fp, rtn, kivi, rotatekv."),
    bits: str = typer.Option("2,3,4", help="Comma list of bit widths for the quantized schemes."),
    protocols: str = typer.Option("oneshot,deployed", help="Comma list: oneshot (all tokens quantized), deployed (sinks + recent window fp)."),
    recent_window: Optional[int] = typer.Option(None, help="Recent-window length for the deployed protocol (default: the checkpoint's)."),
    device: str = typer.Option("cuda" if torch.cuda.is_available() else "cpu"),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON on stdout."),
) -> None:
    """Perplexity side by side: full precision, RTN, KIVI-style and RotateKV at their real bits per element."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluate.perplexity import PROTOCOLS, perplexity, token_windows
    from .evaluate.schemes import SCHEME_NAMES, build_scheme
    from .export.format import CheckpointError, read_checkpoint

    try:
        ck = read_checkpoint(checkpoint)
        if not text.is_file():
            raise FileNotFoundError(f"evaluation text not found: {text}")
        scheme_list = [s.strip() for s in schemes.split(",") if s.strip()]
        bad = [s for s in scheme_list if s not in SCHEME_NAMES]
        protocol_list = [p.strip() for p in protocols.split(",") if p.strip()]
        bad += [p for p in protocol_list if p not in PROTOCOLS]
        bit_list = [int(b) for b in bits.split(",") if b.strip()]
        if bad or any(b not in (2, 3, 4) for b in bit_list):
            raise ValueError(f"unknown scheme/protocol {bad} or bits {bit_list}: schemes {SCHEME_NAMES}, protocols {PROTOCOLS}, bits 2,3,4")
        clips = _clip_tables(checkpoint, ck.config.num_layers)
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        ids = token_windows(tokenizer, text.read_text(encoding="utf-8"), length, windows or None)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        _fail(err)
    runs = [("fp", 16, p) for p in protocol_list[:1]] if "fp" in scheme_list else []
    runs += [(s, b, p) for s in scheme_list if s != "fp" for b in bit_list for p in protocol_list]
    results = []
    with _progress() as progress:
        for name, b, protocol in runs:
            label = f"{name}-{b} {protocol}" if name != "fp" else "fp16"
            task = progress.add_task(label, total=ids.shape[0])
            scheme = build_scheme(name, b, ck, clips)
            results.append(perplexity(model, ids, scheme, protocol, ck, recent_window,
                                      progress=lambda done, total, t=task: progress.update(t, completed=done)))
    if as_json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
        return
    fp = next((r.perplexity for r in results if r.scheme == "fp"), None)
    window = ck.config.recent_window if recent_window is None else recent_window
    table = Table(title=f"WikiText-style perplexity: {ids.shape[0]} windows × {length} tokens; deployed = sinks + {window}-token recent window in fp16")
    for col in ("scheme", "bits", "protocol", "K bits/elem", "V bits/elem", "effective bits", "PPL", "× FP"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r.scheme, str(r.bits), r.protocol if r.scheme != "fp" else "-", f"{r.key_bits:.2f}", f"{r.value_bits:.2f}",
                      f"{r.effective_bits:.2f}", f"{r.perplexity:.2f}", f"{r.perplexity / fp:.3f}" if fp else "-")
    Console().print(table)


def _clip_tables(checkpoint: Path, num_layers: int) -> dict[str, list[torch.Tensor]]:
    from safetensors.torch import load_file

    from .export.format import RKV_TENSORS_FILE, CheckpointError, tensor_name

    tensors = load_file(str(checkpoint / RKV_TENSORS_FILE))
    try:
        return {w: [tensors[tensor_name(i, f"{w}_clip_by_bits")] for i in range(num_layers)] for w in ("key", "value")}
    except KeyError as err:
        raise CheckpointError(f"{checkpoint} lacks per-bit clip tables ({err}); re-export it") from err


def _register_subcommands() -> None:
    """``rkv run`` and ``rkv inspect`` live beside the code they drive."""
    from .inspect.cli import inspect_command
    from .runtime.cli import run_command

    app.command("run", help="Generate from an exported checkpoint with the packed rkv cache (streaming, then a summary).")(run_command)
    app.command("inspect", help="Write PNG figures of key channels, massive activations, sink attention and quantization error.")(inspect_command)


_register_subcommands()

if __name__ == "__main__":
    app()
