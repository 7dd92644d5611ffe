"""The ``rkv`` command line: a thin layer over the library (calibrate → export → eval / run)."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Iterator, Optional

import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .cli_checks import LIBRARY_ERRORS, InputError, check_bits, check_device, check_length, fail, make_console, parse_bits
from .calibrate.key_scale import DEFAULT_KEY_SCALE
from .export.format import DEFAULT_KEY_LAYOUT, DEFAULT_SALIENT_TOKENS, KEY_LAYOUTS
from .models.loading import DEFAULT_MODEL, ModelLoadError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="RotateKV 2-bit KV caches: calibrate, export, evaluate, run.")
console = make_console(stderr=True)

# Errors every command turns into one `error:` line and exit code 2 (never a traceback).
COMMAND_ERRORS = (ValueError, OSError, ModelLoadError, *LIBRARY_ERRORS)

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
    fail(console, err)


@contextmanager
def _phase(doing: str, done: str) -> Iterator[None]:
    """A spinner while ``doing`` runs, then a line saying ``done`` and how long it took (visible when piped too)."""
    start = time.perf_counter()
    with console.status(f"{doing} …"):
        yield
    console.print(f"{done} ({time.perf_counter() - start:.1f} s)")


def _report_removed(folders: list[Path]) -> None:
    for folder in folders:
        console.print(f"removed {folder}, left by an interrupted run")


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
    samples: int = typer.Option(32, min=1, help="Number of calibration windows."),
    seqlen: int = typer.Option(512, min=2, help="Tokens per calibration window (at most the model's context)."),
    seed: int = typer.Option(0, help="Seed for window sampling and row samples."),
    batch_size: int = typer.Option(4, min=1, help="Windows per forward pass."),
    head_group_size: Optional[int] = typer.Option(None, min=1, help="KV heads per rotation group (default: largest with a Hadamard of <=512 channels)."),
    key_group_size: int = typer.Option(64, min=1, help="Key channels per quantization group."),
    value_group_size: int = typer.Option(64, min=1, help="Value channels per quantization group."),
    sink_ratio: float = typer.Option(64.0, min=1.0, help="A residual activation above this multiple of the layer's median |h| is massive (a sink)."),
    permutation: str = typer.Option(
        "mean_abs",
        help="How rotated key channels are grouped for quantization: sorted by mean_abs, max_abs or rms (outlier-aware), "
        "or none (consecutive channels). With none and key groups of one head (--key-group-size = head dim), decoding "
        "takes the faster chunk kernel (docs/benchmarks.md; accuracy cost in docs/accuracy.md).",
    ),
    key_layout: str = typer.Option(
        DEFAULT_KEY_LAYOUT, "--key-layout",
        help="How keys are cached: prerope (RotateKV: pre-RoPE keys, grouped-head rotation) or folded (post-RoPE keys "
        "rotated per KV head, the rotation folded into the query at decode; head groups of 1).",
    ),
    learn_rotation: Optional[bool] = typer.Option(
        None, "--learn-rotation/--no-learn-rotation",
        help="Learn each KV head's key rotation from the Hadamard for the q·k error (folded layout; default: on for folded).",
    ),
    key_scale: float = typer.Option(
        DEFAULT_KEY_SCALE, "--key-scale", min=0.0, max=2.0,
        help="Exponent of a per-channel key scale, folded into the query and key weights at export (logits unchanged): "
        "shrinks key channels the queries barely read. 0: none; 1: the q·k error optimum (docs/accuracy.md).",
    ),
    rope_span: int = typer.Option(
        0, "--rope-span", min=0,
        help="Folded layout: observe each key at a RoPE position drawn from [0, SPAN) (e.g. the model's context) "
        "instead of its own position in its --seqlen window: better as deployed at long contexts, worse one-shot "
        "(docs/accuracy.md). 0: the window's positions.",
    ),
    learn_value_rotation: bool = typer.Option(
        True, "--learn-value-rotation/--no-learn-value-rotation",
        help="Learn each layer's and KV head's value rotation from the Hadamard for the error after o_proj; fused "
        "into the weights at export, free at decode, either key layout (docs/accuracy.md).",
    ),
    fit_first_key: Optional[bool] = typer.Option(
        None, "--fit-first-key/--no-fit-first-key",
        help="Calibrate the first token's key (the attention sink) so that the export turns each head's key rotation "
        "to store it almost exactly: free at decode, lowers perplexity when every key is quantized (folded layout; "
        "default: on for folded; docs/accuracy.md).",
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
    from .calibration_data.sources import load_text, sample_batches
    from .models.loading import load_model
    from .outdir import remove_stale_temp_dirs

    options = CalibrationOptions(data, samples, seqlen, seed, batch_size, head_group_size, key_group_size, value_group_size, sink_ratio,
                                 perm_statistic=permutation, key_layout=key_layout, learn_rotation=learn_rotation,
                                 key_scale=key_scale, rope_span=rope_span,
                                 learn_value_rotation=learn_value_rotation, fit_first_key=fit_first_key)  # fmt: skip
    start = time.perf_counter()
    try:
        torch_dtype = _dtype(dtype)
        config = _check_calibration_inputs(model, out, data, options, device, device_map, trust_remote_code, overwrite)
        _report_removed(remove_stale_temp_dirs(out))
        with _phase(f"reading calibration text '{data}'", f"read calibration text '{data}'"):
            text = load_text(data)
        with _phase(f"loading {model}", f"loaded {model}"):
            loaded = load_model(model, torch_dtype, device, trust_remote_code, device_map=device_map, config=config)
        with _phase(f"tokenizing {len(text):,} characters", f"tokenized: {samples} windows × {seqlen} tokens"):
            batches = sample_batches(text, loaded.tokenizer, samples, seqlen, seed)
        with _progress() as progress:
            artifact = run_calibration(loaded.model, batches, options, _progress_callback(progress))
        artifact.meta["model_source"] = model
        save_artifact(artifact, out, overwrite=overwrite)
    except COMMAND_ERRORS as err:
        _fail(err)
    elapsed = time.perf_counter() - start
    console.print(_calibration_table(artifact))
    console.print(f"calibrated on {batches.numel():,} tokens of '{data}' in {elapsed:.1f} s → [bold]{out}[/]")


def _check_calibration_inputs(model: str, out: Path, data: str, options, device: str, device_map: Optional[str],
                              trust_remote_code: bool, overwrite: bool):  # fmt: skip
    """Everything ``rkv calibrate`` can check without the weights; returns the model's config."""
    from .calibrate.search import PERM_STATISTICS
    from .calibration_data.sources import check_source
    from .models.loading import load_config
    from .outdir import check_output_dir

    check_output_dir(out, overwrite)
    if options.perm_statistic not in PERM_STATISTICS:
        raise InputError(f"--permutation must be one of {', '.join(PERM_STATISTICS)}, got {options.perm_statistic!r}")
    if options.key_layout not in KEY_LAYOUTS:
        raise InputError(f"--key-layout must be one of {', '.join(KEY_LAYOUTS)}, got {options.key_layout!r}")
    if options.learn_rotation and options.key_layout != "folded":
        raise InputError("--learn-rotation needs --key-layout folded (a pre-RoPE rotation is undone per cached key at decode)")
    if options.key_layout == "folded" and options.head_group_size not in (None, 1):
        raise InputError(f"--key-layout folded rotates each KV head alone; --head-group-size {options.head_group_size} needs prerope")
    if options.rope_span and options.key_layout != "folded":
        raise InputError("--rope-span needs --key-layout folded (prerope keys are cached before RoPE, at no position)")
    if options.fit_first_key and options.key_layout != "folded":
        raise InputError("--fit-first-key needs --key-layout folded (a pre-RoPE key rotation is not free at decode)")
    if device_map is None:
        check_device(device)
    check_source(data)
    config = load_config(model, trust_remote_code)
    check_length("--seqlen", options.seqlen, config)
    if options.rope_span:
        check_length("--rope-span", options.rope_span, config)
    return config


def _calibration_table(artifact) -> Table:
    from .calibrate.search import outlier_ratio

    opts = artifact.meta["options"]
    span = opts.get("rope_span")
    where = f", observed at RoPE positions 0-{span - 1}" if span else ""
    values = "learned per KV head" if "value_head_rotation" in artifact.layers[0] else "Hadamard"
    first = ", first key fitted" if "key_first_token" in artifact.layers[0] else ""
    table = Table(title=f"per-layer calibration ({opts.get('key_layout', 'prerope')} keys{where}, head groups of {opts['head_group_size']}, "
                  f"key/value groups {opts['key_group_size']}/{opts['value_group_size']}, value rotation: {values}{first})")
    induction = all("key_induction" in layer for layer in artifact.layers)
    scales = artifact.key_scales
    for col in ("layer", "key outlier ratio before", "after rotation", *(("key scale min-max",) if scales else ()),
                "sink channels", "sink tokens", "key clip 2/3/4 bit", "value clip 2/3/4 bit",
                *(("retrieval head score",) if induction else ())):  # fmt: skip
        table.add_column(col, justify="right")
    for i, layer in enumerate(artifact.layers):
        table.add_row(
            str(i),
            f"{outlier_ratio(layer['key_abs_mean_before']):.2f}",
            f"{outlier_ratio(layer['key_abs_mean_after']):.2f}",
            *((f"{float(scales[i].min()):.2f}-{float(scales[i].max()):.2f}",) if scales else ()),
            ",".join(map(str, layer["sink_channels"].tolist())) or "-",
            str(artifact.meta["sink_tokens_flagged"][i]),
            "/".join(f"{c:.3g}" for c in layer["key_clip_by_bits"].tolist()),
            "/".join(f"{c:.3g}" for c in layer["value_clip_by_bits"].tolist()),
            *((f"{float(layer['key_induction'].max()):.3f}",) if induction else ()),
        )
    return table


@app.command()
def export(
    calibration: Path = typer.Option(Path("rkv-out/calibration"), help="Artifact folder written by `rkv calibrate`."),
    out: Path = typer.Option(Path("rkv-out/checkpoint"), help="Folder for the augmented checkpoint."),
    model: Optional[str] = typer.Option(None, help="Source model (default: the one the artifact was calibrated on)."),
    bits: int = typer.Option(2, help="Bits per cached key/value element: 2, 3 or 4."),
    key_bits: Optional[str] = typer.Option(None, help="Key widths: one of 2, 3, 4 for every layer, a comma list with one per layer, 'auto': half the layers at --bits + 1, those whose calibrated key error falls most, or 'retrieval': the same bits, spent first on the layers with retrieval heads (4-bit keys), then as auto (default: auto under log8 metadata, else --bits)."),
    value_bits: Optional[str] = typer.Option(None, help="Value widths, like --key-bits (default: --bits)."),
    group_meta: Optional[str] = typer.Option(None, help="Group scales and zeros: fp16 (2 bytes each) or log8 (1 byte each: 0.25 bit per element less at groups of 64, which pays for --key-bits auto; folded key layout only) (default: log8 for folded keys at --bits 2 or 3, else fp16)."),
    group_ranges: Optional[str] = typer.Option(None, help="How the cache writes set each group's range: minmax (clip x [min, max]) or searched (per group the best of five ranges by squared error: lower perplexity, 8k one-shot 1.45x -> 1.32x full precision, but 4 points less passkey retrieval at 8k and about 4x slower cache writes; folded key layout only; see docs/accuracy.md)."),
    recent_window: int = typer.Option(128, min=0, help="Recent tokens kept in full precision by the runtime."),
    flush_block: int = typer.Option(64, min=1, help="Tokens moved from the window to the quantized store at a time."),
    max_sinks: int = typer.Option(8, min=0, help="Most sink tokens per sequence kept in full precision."),
    salient_tokens: int = typer.Option(DEFAULT_SALIENT_TOKENS, min=0, help="Prompt tokens per sequence and layer kept in full precision because the prompt's last tokens attend to them most (picked at the end of the prefill; passkey retrieval needs them, see docs/accuracy.md)."),
    dtype: str = typer.Option("float32", help="Weights dtype of the written checkpoint."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code/--no-trust-remote-code"),
    overwrite: bool = typer.Option(False, "--overwrite/--no-overwrite", help="Replace an existing --out folder."),
) -> None:
    """Write weights with the value rotation fused, the calibration tensors and the rkv config."""
    from .calibrate.artifact import load_artifact
    from .export.format import CheckpointError
    from .export.store_choice import KEY_BITS_RULES, choose_store
    from .export.writer import export_checkpoint
    from .models.loading import load_model
    from .outdir import check_output_dir, remove_stale_temp_dirs
    from .quant.quantizer import GroupMeta, GroupRanges

    try:
        torch_dtype = _dtype(dtype)
        check_bits(bits)
        meta = None if group_meta is None else _choice("--group-meta", GroupMeta, group_meta)
        ranges = None if group_ranges is None else _choice("--group-ranges", GroupRanges, group_ranges)
        check_output_dir(out, overwrite)
        artifact = load_artifact(calibration)
        n_layers = artifact.meta["model"]["num_hidden_layers"]
        values = _layer_widths("--value-bits", value_bits, n_layers)
        keys = key_bits if key_bits in KEY_BITS_RULES else _layer_widths("--key-bits", key_bits, n_layers)
        store = choose_store(artifact, bits, keys, meta, ranges)
        console.print(store.note)
        source = model or artifact.meta.get("model_source")
        if not source:
            raise CheckpointError("the artifact does not record its model; pass --model")
        _report_removed(remove_stale_temp_dirs(out))
        with _phase(f"loading {source}", f"loaded {source}"):
            loaded = load_model(source, torch_dtype, "cpu", trust_remote_code)
        with console.status("fusing the value rotation, checking logits, writing"):
            path = export_checkpoint(loaded, artifact, out, bits, recent_window, flush_block, max_sinks, overwrite,
                                     key_bits=store.key_bits, value_bits=values, group_meta=store.group_meta,
                                     salient_tokens=salient_tokens, group_ranges=store.group_ranges)  # fmt: skip
    except COMMAND_ERRORS as err:
        _fail(err)
    console.print(f"exported {bits}-bit rkv checkpoint of {source} → [bold]{path}[/]")


def _choice(option: str, choices: type[Enum], text: str) -> Enum:
    """An export option that names one member of ``choices`` (``--group-meta``, ``--group-ranges``)."""
    try:
        return choices(text)
    except ValueError:
        raise InputError(f"{option} takes one of {', '.join(c.value for c in choices)}, got {text!r}") from None


def _layer_widths(option: str, text: Optional[str], num_layers: int) -> Optional[list[int]]:
    """``--key-bits``/``--value-bits``: one width for every layer, or one per layer."""
    if text is None:
        return None
    items = [x.strip() for x in text.split(",")]
    widths = [int(x) for x in items if x.isdigit() and int(x) in (2, 3, 4)]
    if len(widths) != len(items) or len(widths) not in (1, num_layers):
        raise InputError(f"{option} takes one of 2, 3, 4 or a comma list of {num_layers} of them (one per layer); got {text!r}")
    return widths * num_layers if len(widths) == 1 else widths


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Argument(Path("rkv-out/checkpoint"), help="Folder written by `rkv export`."),
    text: Optional[Path] = typer.Option(None, help="Evaluation text file (e.g. wiki.test.raw); needed by --task perplexity."),
    windows: int = typer.Option(8, min=0, help="Number of non-overlapping windows (0 = all)."),
    length: int = typer.Option(1024, min=2, help="Tokens per window (at most the model's context)."),
    schemes: str = typer.Option("fp,rtn,kivi,rotatekv", help="Comma list of fp, rtn, kivi, rotatekv. --task passkey also takes rotatekv-eval (the eval's quantizer) and rotatekv-exported (the packed cache with the checkpoint's own per-layer widths and store)."),
    bits: str = typer.Option("2,3,4", help="Comma list of bit widths for the quantized schemes."),
    protocols: str = typer.Option("oneshot,deployed", help="Comma list: oneshot (all tokens quantized), sinks (sink tokens fp), deployed (sinks + recent window fp)."),
    recent_window: Optional[int] = typer.Option(None, help="Recent-window length for the deployed protocol (default: the checkpoint's)."),
    device: str = typer.Option("cuda" if torch.cuda.is_available() else "cpu"),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON on stdout."),
    task: str = typer.Option("perplexity", help="perplexity (--text windows) or passkey (pass key hidden in pydoc filler, greedy answers)."),
    lengths: str = typer.Option("1024,2048,4096,8192", help="passkey: comma list of prompt lengths in tokens (answer included)."),
    trials: int = typer.Option(50, min=1, help="passkey: trials per length (depths 10-90 % in turn)."),
    passkey_batch: int = typer.Option(10, min=1, help="passkey: trials decoded together."),
    seed: int = typer.Option(0, help="passkey: seed of the keys, depths and filler offsets."),
    out: Optional[Path] = typer.Option(None, help="passkey: write passkey.csv and passkey.json (every answer) into this folder after each result; a later run with the same --out resumes."),
) -> None:
    """Perplexity side by side (full precision, RTN, KIVI-style and RotateKV at their real bits per element), or passkey retrieval."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if task == "passkey":
        _passkey(checkpoint, schemes, bits, lengths, trials, passkey_batch, seed, device, out, as_json)
        return
    if task != "perplexity":
        _fail(InputError(f"--task must be perplexity or passkey, got {task!r}"))

    from .evaluate.checkpoints import clip_tables
    from .evaluate.perplexity import perplexity, token_windows
    from .evaluate.schemes import build_scheme
    from .export.format import read_checkpoint
    from .models.loading import load_config

    try:
        scheme_list, bit_list, protocol_list = _eval_choices(schemes, bits, protocols)
        check_device(device)
        ck = read_checkpoint(checkpoint)
        check_length("--length", length, load_config(str(checkpoint)))
        if text is None:
            raise InputError("--task perplexity needs --text (an evaluation text file, e.g. wiki.test.raw)")
        if not text.is_file():
            raise FileNotFoundError(f"evaluation text not found: {text}")
        clips = clip_tables(checkpoint, ck.config.num_layers)
        with _phase(f"loading {checkpoint}", f"loaded {checkpoint}"):
            model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
            tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        ids = token_windows(tokenizer, text.read_text(encoding="utf-8"), length, windows or None)
        runs = [("fp", 16, p) for p in protocol_list[:1]] if "fp" in scheme_list else []
        runs += [(s, b, p) for s in scheme_list if s != "fp" for b in bit_list for p in protocol_list]
        if ck.config.mixed_bits and "rotatekv" in scheme_list:  # the checkpoint as exported: per-layer widths
            runs += [("rotatekv", None, p) for p in protocol_list]
        results = []
        with _progress() as progress:
            for name, b, protocol in runs:
                label = f"{name}-{b or 'mixed'} {protocol}" if name != "fp" else "fp16"
                task = progress.add_task(label, total=ids.shape[0])
                scheme = build_scheme(name, b, ck, clips)
                results.append(perplexity(model, ids, scheme, protocol, ck, recent_window,
                                          progress=lambda done, total, t=task: progress.update(t, completed=done)))
    except COMMAND_ERRORS as err:
        _fail(err)
    if as_json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
        return
    window = ck.config.recent_window if recent_window is None else recent_window
    make_console().print(_perplexity_table(results, ids.shape[0], length, window))


def _passkey(checkpoint: Path, schemes: str, bits: str, lengths: str, trials: int, batch: int, seed: int, device: str,
             out: Optional[Path], as_json: bool) -> None:  # fmt: skip
    """``rkv eval --task passkey``: accuracy per path, bit width and length (a table, or JSON; CSV/JSON in ``out``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .calibration_data.sources import load_text
    from .evaluate.checkpoints import checkpoint_at_bits, clip_tables
    from .evaluate.passkey import PASSKEY_PATHS, PasskeyOptions, run_passkey
    from .evaluate.passkey_store import PasskeySetup, load_results, save_results
    from .export.format import read_checkpoint
    from .models.loading import load_config

    try:
        paths = [s.strip() for s in schemes.split(",") if s.strip()]
        if not paths or any(p not in PASSKEY_PATHS for p in paths):
            raise InputError(f"--schemes for the passkey task: a comma list of {', '.join(PASSKEY_PATHS)}; got {schemes!r}")
        bit_list = parse_bits(bits)
        items = [x.strip() for x in lengths.split(",") if x.strip()]
        if not items or not all(x.isdigit() for x in items):
            raise InputError(f"--lengths takes a comma list of token counts, got {lengths!r}")
        options = PasskeyOptions(lengths=tuple(int(x) for x in items), trials=trials, batch_size=batch, seed=seed)
        check_device(device)
        ck = read_checkpoint(checkpoint)
        config = load_config(str(checkpoint))
        for n in options.lengths:
            check_length("--lengths", n, config)
        clips = clip_tables(checkpoint, ck.config.num_layers)
        if out is not None and out.exists() and not out.is_dir():
            raise InputError(f"--out {out} exists and is not a folder")
        setup = PasskeySetup.of(options, checkpoint)
        done = load_results(out, setup) if out is not None else []
        save = (lambda so_far: save_results(out, setup, so_far)) if out is not None else None
        with _phase(f"loading {checkpoint}", f"loaded {checkpoint}"):
            model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
            tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        results = run_passkey(model, tokenizer, ck, lambda b: checkpoint_at_bits(ck, clips, b), paths, bit_list, options,
                              load_text("pydoc"), log=console.print, done=done, on_result=save)  # fmt: skip
    except COMMAND_ERRORS as err:
        _fail(err)
    if out is not None:
        console.print(f"{out / 'passkey.csv'} and {out / 'passkey.json'} hold {len(results)} results ({len(done)} resumed)")
    if as_json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
        return
    make_console().print(_passkey_table(results, options))


def _passkey_table(results: list, options) -> Table:
    lengths = list(options.lengths)
    fp = {r.length: r.accuracy for r in results if r.path == "fp"}
    where = sorted({r.device for r in results})
    table = Table(title=f"passkey retrieval: {options.trials} trials per length, depths {min(options.depths):.0%}-"
                        f"{max(options.depths):.0%}, greedy, chat template; ran on {', '.join(where)}; "
                        "accuracy (points vs FP)")  # fmt: skip
    for col in ("path", "bits", *(f"{n} tokens" for n in lengths), "seconds"):
        table.add_column(col, justify="right")
    for key in dict.fromkeys((r.path, r.bits) for r in results):
        mine = {r.length: r for r in results if (r.path, r.bits) == key}
        cells = []
        for n in lengths:
            r = mine.get(n)
            delta = f" ({100 * (r.accuracy - fp[n]):+.0f})" if r and n in fp and r.path != "fp" else ""
            cells.append(f"{100 * r.accuracy:.0f} %{delta}" if r else "-")
        table.add_row(key[0], str(key[1]), *cells, f"{sum(r.seconds for r in mine.values()):.1f}")
    return table


def _eval_choices(schemes: str, bits: str, protocols: str) -> tuple[list[str], list[int], list[str]]:
    """``rkv eval``'s comma lists, each checked against its valid values."""
    from .evaluate.perplexity import PROTOCOLS
    from .evaluate.schemes import SCHEME_NAMES

    scheme_list = [s.strip() for s in schemes.split(",") if s.strip()]
    protocol_list = [p.strip() for p in protocols.split(",") if p.strip()]
    bad = [s for s in scheme_list if s not in SCHEME_NAMES] + [p for p in protocol_list if p not in PROTOCOLS]
    if bad or not scheme_list or not protocol_list:
        raise InputError(f"unknown or missing scheme/protocol {bad}: schemes {', '.join(SCHEME_NAMES)}; protocols {', '.join(PROTOCOLS)}")
    return scheme_list, parse_bits(bits), protocol_list


def _perplexity_table(results: list, windows: int, length: int, window: int) -> Table:
    fp = next((r.perplexity for r in results if r.scheme == "fp"), None)
    table = Table(title=f"WikiText-style perplexity: {windows} windows × {length} tokens; deployed = sinks + {window}-token recent window in fp16; "
                  "fp share = tokens held in fp16 at a window's last token; seconds = wall time of the run")
    for col in ("scheme", "bits", "protocol", "K bits/elem", "V bits/elem", "effective bits", "fp share", "PPL", "× FP", "seconds"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r.scheme, str(r.bits), r.protocol if r.scheme != "fp" else "-", f"{r.key_bits:.2f}", f"{r.value_bits:.2f}",
                      f"{r.effective_bits:.2f}", f"{100 * r.fp_share:.2f} %", f"{r.perplexity:.2f}",
                      f"{r.perplexity / fp:.3f}" if fp else "-", f"{r.seconds:.1f}")
    return table


def _register_subcommands() -> None:
    """``rkv run``, ``rkv serve`` and ``rkv inspect`` live beside the code they drive."""
    from .inspect.cli import inspect_command
    from .runtime.cli import run_command
    from .serve.serve_cli import serve_command

    app.command("run", help="Generate from an exported checkpoint with the packed rkv cache (streaming, then a summary).")(run_command)
    app.command("serve", help="Serve an exported checkpoint over an OpenAI-compatible HTTP API with continuous batching.")(serve_command)
    app.command("inspect", help="Write PNG figures of key channels, massive activations, sink attention and quantization error.")(inspect_command)


_register_subcommands()

if __name__ == "__main__":
    app()
