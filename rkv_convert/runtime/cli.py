"""``rkv run``: stream a completion from an rkv checkpoint and report speed and cache size.

A thin layer over :func:`rkv_convert.runtime.api.load` and
:func:`rkv_convert.runtime.generate.stream_generate`; registered by the main CLI as
``app.command("run")(run_command)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from ..cli_checks import LIBRARY_ERRORS, InputError, check_device, check_prompt_fits, fail, make_console
from ..export.format import CheckpointError, RkvConfig
from ..models.loading import BUILTIN_MODELS
from ..serve.job_cli import batch_job
from .api import load
from .generate import GenerationStats, SamplingOptions, stream_generate

__all__ = ["run_command", "build_prompt", "summary_table"]


def build_prompt(tokenizer, prompt: str, chat: bool, system: str | None = None) -> torch.Tensor:
    """Token ids ``[1, T]``: through the tokenizer's chat template when ``chat`` and it has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids


def _eos_ids(tokenizer, model) -> list[int]:
    ids = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    return sorted(ids)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def summary_table(stats: GenerationStats, config: RkvConfig) -> Table:
    table = Table(title="rkv run", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_row("prompt tokens", str(stats.prompt_tokens))
    table.add_row("prefill", f"{stats.prefill_tokens_per_second:,.1f} tok/s ({stats.prefill_seconds * 1e3:.1f} ms)")
    table.add_row("new tokens", str(stats.new_tokens))
    table.add_row("decode", f"{stats.steady_decode_tokens_per_second:,.1f} tok/s ({stats.decode_seconds * 1e3:.1f} ms in all)")
    table.add_row("first decode step", f"{stats.first_decode_seconds * 1e3:.1f} ms (on CUDA it includes compiling the "
                  "Triton kernels and capturing the step)")
    table.add_row("decode path", stats.decode_path)
    table.add_row("KV cache used", _mib(stats.kv_bytes))
    table.add_row("fp16 cache, same tokens", _mib(stats.fp16_equivalent_bytes))
    table.add_row("compression", f"{stats.compression:.2f}x")
    table.add_row("bits / element (all in)", f"{stats.bits_per_element:.2f}")
    widths = "per-layer widths" if config.mixed_bits else f"{config.bits}-bit"
    table.add_row(
        "quantized store bits / element",
        f"K {config.key_bits_per_element:.2f}, V {config.value_bits_per_element:.2f} "
        f"({widths}, groups {config.key_group_size}/{config.value_group_size})",
    )
    if stats.sinks_per_layer:
        table.add_row("sink tokens / layer (mean)", f"{sum(stats.sinks_per_layer) / len(stats.sinks_per_layer):.2f}")
    return table


def run_command(
    checkpoint: str = typer.Argument(..., help="rkv checkpoint folder written by `rkv export`"),
    prompt: str = typer.Option("Explain in two sentences what a KV cache is.", "--prompt", "-p", help="prompt text"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=1, help="tokens to generate"),
    temperature: float = typer.Option(0.7, min=0.0, help="sampling temperature (0 = greedy)"),
    top_p: float = typer.Option(0.9, min=0.0, max=1.0, help="nucleus sampling mass"),
    top_k: int = typer.Option(50, min=0, help="sample among the k most likely tokens (0 = all)"),
    seed: int = typer.Option(0, help="sampling seed"),
    greedy: bool = typer.Option(False, "--greedy/--sample", help="greedy decoding instead of sampling"),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N"),
    device_map: str = typer.Option(None, "--device-map", help="spread the model over devices with accelerate (e.g. auto); replaces --device"),
    dtype: str = typer.Option("auto", help="auto (fp16 on CUDA, fp32 on CPU), float32, float16 or bfloat16"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="wrap the prompt in the tokenizer's chat template"),
    system: str = typer.Option(None, help="system message (chat mode)"),
    prompts: Path = typer.Option(None, "--prompts", help="batch job: a JSONL file of requests (id, prompt or messages, "
                                 "max_tokens, temperature, top_p, seed), run with continuous batching; needs --out"),
    out: Path = typer.Option(None, "--out", help="batch job: JSONL output, one line appended per finished request; "
                             "a re-run skips the ids already there"),
    max_batch: int = typer.Option(None, "--max-batch", help="batch job: most sequences at once (default: as many as the "
                                  "cache budget holds at the longest request)"),
    cuda_graph: bool = typer.Option(None, "--cuda-graph/--no-cuda-graph", help="replay decode steps from captured "
                                    "CUDA graphs (a batch job: one per bucket of rows; default: wherever they can be "
                                    "captured; --cuda-graph fails where they cannot)"),
    cache_memory: float = typer.Option(None, "--cache-memory", help="batch job: KV cache budget in GiB (default: 85% "
                                       "of free GPU memory on CUDA, 2 GiB on CPU)"),
) -> None:
    """Generate text from an rkv checkpoint with the packed 2-4 bit KV cache, streaming it (or a batch job: --prompts)."""
    console = make_console(stderr=True)
    if checkpoint in BUILTIN_MODELS:
        console.print(
            f"[red]{checkpoint} is a source model, not an rkv checkpoint.[/red] Make one first:\n"
            f"  rkv calibrate {checkpoint} --out rkv-out/calibration\n"
            "  rkv export --calibration rkv-out/calibration --out rkv-out/checkpoint\n"
            "then run `rkv run rkv-out/checkpoint`."
        )
        raise typer.Exit(2)
    try:
        if (prompts is None) != (out is None):
            raise InputError("--prompts and --out go together: pass both for a batch job")
        if prompts is not None and not prompts.is_file():
            raise InputError(f"--prompts {prompts}: no such file")
        if not prompt.strip():
            raise InputError("the prompt is empty; pass some text with --prompt")
        if device_map is None:
            check_device(device)
        rkv_model = load(checkpoint, device=device, dtype=dtype, device_map=device_map)
    except (InputError, *LIBRARY_ERRORS) as err:
        _fail(console, str(err))
    except (CheckpointError, OSError, ValueError) as err:
        _fail(console, f"cannot load {checkpoint}: {err}")
    tokenizer = rkv_model.tokenizer
    if tokenizer is None:
        _fail(console, f"{checkpoint} has no tokenizer files; re-export it with its tokenizer")
    sampling = SamplingOptions(0.0 if greedy else temperature, top_p, top_k, seed)
    if prompts is not None:
        try:
            summary = batch_job(rkv_model, prompts, out, sampling, max_new_tokens, _eos_ids(tokenizer, rkv_model.model),
                                max_batch, cache_memory, console, cuda_graph)  # fmt: skip
        except (InputError, ValueError, OSError, *LIBRARY_ERRORS) as err:
            _fail(console, str(err))
        if summary.failed:
            raise typer.Exit(1)
        return
    ids = build_prompt(tokenizer, prompt, chat, system)
    stats = GenerationStats()
    try:
        check_prompt_fits(ids.shape[1], max_new_tokens, rkv_model.model.config)
        _stream(rkv_model, ids, max_new_tokens, sampling, stats, cuda_graph)
    except (ValueError, *LIBRARY_ERRORS) as err:
        _fail(console, str(err))
    if stats.kv_bytes == 0:
        _fail(console, "the rkv cache holds 0 bytes after generation: the model did not write its keys and values to it, "
                       "so the text above did not come from the packed cache; check the installed transformers release")  # fmt: skip
    cfg = rkv_model.checkpoint.config
    console.print(summary_table(stats, cfg))


def _fail(console: Console, message: str) -> None:
    """One red ``error:`` line on stderr, exit code 1."""
    fail(console, message, code=1)


def _stream(rkv_model, ids: torch.Tensor, max_new_tokens: int, sampling: SamplingOptions, stats: GenerationStats,
            cuda_graph: bool | None = None) -> None:  # fmt: skip
    """Generate, writing the text to stdout as it arrives (whole characters only)."""
    tokenizer = rkv_model.tokenizer
    generated: list[int] = []
    printed = ""
    try:
        for token in stream_generate(rkv_model, ids, max_new_tokens=max_new_tokens, sampling=sampling,
                                     eos_token_ids=_eos_ids(tokenizer, rkv_model.model), stats=stats,
                                     cuda_graph=cuda_graph):  # fmt: skip
            generated.append(int(token[0]))
            text = tokenizer.decode(generated, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text[len(printed) :])
                sys.stdout.flush()
                printed = text
    finally:
        if generated:  # end the streamed line, also when generation stops with an error
            sys.stdout.write("\n")
