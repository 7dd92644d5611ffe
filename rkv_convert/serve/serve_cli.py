"""``rkv serve CHECKPOINT``: the OpenAI-compatible server (uvicorn + :func:`.app.create_app`).

:func:`build_server` is the library entry (tests run it on a free loopback port in a thread);
:func:`serve_command` is the Typer command registered by the main CLI. On SIGTERM or Ctrl-C,
uvicorn stops accepting connections and waits for the responses in flight (streams included),
then the engine thread drains and the process exits 0.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import typer
import uvicorn

from ..cli_checks import LIBRARY_ERRORS, InputError, check_device, context_length, context_text, fail, make_console
from ..export.format import CheckpointError
from ..runtime.api import load
from ..runtime.cli import _eos_ids
from ..runtime.generate import RkvModel
from .app import create_app
from .engine import Engine, EngineConfig, default_budget
from .requests import Limits
from .worker import EngineWorker

__all__ = ["ServerOptions", "build_server", "serve_command"]


@dataclass(frozen=True)
class ServerOptions:
    """Limits of one server: rows, cache budget, waiting queue, longest request, default max_tokens."""

    max_batch: int | None = None
    cache_memory_gib: float | None = None  # None: 85% of free GPU memory on CUDA, 2 GiB on CPU
    max_queue: int = 64
    max_model_len: int | None = None  # None: the model's context
    default_max_tokens: int = 256
    model_name: str = "rkv"
    api_key: str | None = None
    prefill_tokens_per_step: int = 8192
    cuda_graph: bool | None = None  # decode steps from CUDA graphs (EngineConfig.cuda_graph)


def eos_ids(rkv_model: RkvModel) -> tuple[int, ...]:
    """The model's end-of-sequence ids (generation config and tokenizer), as ``rkv run`` stops on them."""
    return tuple(_eos_ids(rkv_model.tokenizer, rkv_model.model))


def build_server(rkv_model: RkvModel, options: ServerOptions):
    """``(app, worker)``: the FastAPI app and its started engine thread (stop it after the server)."""
    if rkv_model.tokenizer is None:
        raise InputError("the checkpoint has no tokenizer files; re-export it with its tokenizer")
    context = context_length(rkv_model.config)
    max_len = options.max_model_len or context
    if max_len is None:
        raise InputError("the model does not say its context (max_position_embeddings); pass --max-model-len")
    if context is not None and max_len > context:
        raise InputError(f"--max-model-len {max_len} is beyond {context_text(rkv_model.config)}")
    cpu_bytes = int((options.cache_memory_gib if options.cache_memory_gib is not None else 2.0) * 2**30)
    budget = cpu_bytes if options.cache_memory_gib is not None else default_budget(rkv_model.device, cpu_bytes)
    engine = Engine(rkv_model, EngineConfig(max_len=max_len, budget_bytes=budget, max_batch=options.max_batch,
                                            prefill_tokens_per_step=options.prefill_tokens_per_step,
                                            cuda_graph=options.cuda_graph))  # fmt: skip
    engine.capture_graphs()  # before the first request: serving never waits on a capture
    limits = Limits(context=max_len, max_tokens=max_len, default_max_tokens=options.default_max_tokens)
    worker = EngineWorker(engine, options.max_queue).start()
    app = create_app(rkv_model, worker, options.model_name, limits, eos_ids(rkv_model), options.api_key)
    return app, worker


def serve_command(
    checkpoint: Path = typer.Argument(..., help="rkv checkpoint folder written by `rkv export`"),
    host: str = typer.Option("127.0.0.1", help="address to bind (loopback by default; another address exposes the model)"),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port"),
    api_key: str = typer.Option(None, "--api-key", envvar="RKV_API_KEY", help="require Authorization: Bearer KEY on /v1/*"),
    max_batch: int = typer.Option(None, "--max-batch", min=1, help="most sequences decoding at once (default: as many as "
                                  "the cache budget holds at --max-model-len, at most 256)"),
    cache_memory: float = typer.Option(None, "--cache-memory", min=0.0, help="KV cache budget in GiB (default: 85% of free "
                                       "GPU memory on CUDA, 2 GiB on CPU)"),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="requests waiting for a row; more get HTTP 429"),
    max_model_len: int = typer.Option(None, "--max-model-len", min=2, help="longest request, prompt + max_tokens "
                                      "(default: the model's context)"),
    default_max_tokens: int = typer.Option(256, "--default-max-tokens", min=1, help="max_tokens of a request that sets none"),
    model_name: str = typer.Option(None, "--model-name", help="the id clients pass as `model` (default: the folder name)"),
    prefill_tokens: int = typer.Option(8192, "--prefill-tokens", min=1, help="prompt tokens prefilled per engine step "
                                       "(at least one request) between decode steps"),
    cuda_graph: bool = typer.Option(None, "--cuda-graph/--no-cuda-graph", help="replay decode steps from CUDA graphs, "
                                    "one per bucket of rows (default: wherever they can be captured; --cuda-graph "
                                    "fails where they cannot)"),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N"),
    dtype: str = typer.Option("auto", help="auto (fp16 on CUDA, fp32 on CPU), float32, float16 or bfloat16"),
) -> None:
    """Serve an rkv checkpoint over an OpenAI-compatible HTTP API with continuous batching."""
    console = make_console(stderr=True)
    try:
        check_device(device)
        if not checkpoint.is_dir():
            raise InputError(f"{checkpoint}: not a checkpoint folder (run `rkv export` first)")
        rkv_model = load(checkpoint, device=device, dtype=dtype)
        options = ServerOptions(max_batch, cache_memory, max_queue, max_model_len, default_max_tokens,
                                model_name or checkpoint.resolve().name, api_key, prefill_tokens, cuda_graph)  # fmt: skip
        app, worker = build_server(rkv_model, options)
    except (InputError, *LIBRARY_ERRORS) as err:
        fail(console, err, code=1)
    except (CheckpointError, OSError, ValueError) as err:
        fail(console, f"cannot serve {checkpoint}: {err}", code=1)
    if not _is_loopback(host) and api_key is None:
        console.print(f"[yellow]warning: {host} is not a loopback address and no --api-key is set: anyone who reaches "
                      "this port can use the model[/]")  # fmt: skip
    engine = worker.engine
    console.print(f"rkv serve: model {options.model_name!r}, {engine.max_batch} rows, queue {max_queue}, "
                  f"decode steps: {engine.decode_path}{_graphs_note(engine)}, http://{host}:{port}/v1")  # fmt: skip
    # uvicorn drains on SIGTERM, then raises the signal again for the handler it found: make that one
    # a no-op, so that the drained server ends through worker.stop() with exit code 0
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info")).run()
    finally:
        worker.stop()


def _graphs_note(engine: Engine) -> str:
    return f" ({len(engine.graph.graphs)} captured, up to {engine.graph.bounds[-1]} rows)" if engine.graph is not None else ""


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False
