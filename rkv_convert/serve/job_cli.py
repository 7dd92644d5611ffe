"""The batch-job side of ``rkv run`` (``--prompts/--out``): progress bar, resume and summary table.

Called by :func:`rkv_convert.runtime.cli.run_command`; the work is :mod:`.batch_job`'s.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..cli_checks import InputError, context_length
from ..runtime.generate import RkvModel, SamplingOptions
from .batch_job import JobSummary, job_engine, read_done_ids, read_requests, run_job
from .engine import Engine, default_budget
from .requests import Limits

__all__ = ["batch_job", "job_table"]


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def batch_job(rkv_model: RkvModel, prompts: Path, out: Path, defaults: SamplingOptions, max_new_tokens: int,
              eos_ids: list[int], max_batch: int | None, cache_memory_gib: float | None, console: Console,
              cuda_graph: bool | None = None) -> JobSummary:  # fmt: skip
    """Run every request of ``prompts`` not yet in ``out``; returns the summary (also printed)."""
    if not prompts.is_file():
        raise InputError(f"--prompts {prompts}: no such file")
    if out.resolve() == prompts.resolve():
        raise InputError("--out must be another file than --prompts")
    if out.exists() and not out.is_file():
        raise InputError(f"--out {out}: not a file")
    if max_batch is not None and max_batch < 1:
        raise InputError(f"--max-batch must be at least 1, got {max_batch}")
    tokenizer = rkv_model.tokenizer
    context = context_length(rkv_model.config) or 2**31
    limits = Limits(context=context, max_tokens=context, default_max_tokens=max_new_tokens)
    summary = JobSummary()
    done = read_done_ids(out, summary)
    requests = read_requests(prompts, tokenizer, limits, done, summary, tuple(eos_ids), defaults)
    for number, reason in summary.bad:
        console.print(f"[yellow]{prompts}:{number}: skipped: {reason}[/]", soft_wrap=True)
    if summary.truncated_last_line:
        console.print(f"[yellow]{out}: its last line was cut short (a killed run); dropped, that request runs again[/]")
    cpu_bytes = int((cache_memory_gib if cache_memory_gib is not None else 2.0) * 2**30)
    budget = cpu_bytes if cache_memory_gib is not None else default_budget(rkv_model.device, cpu_bytes)
    engine = job_engine(rkv_model, requests, budget, max_batch, cuda_graph)
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = (TextColumn("[bold]requests"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[speed]}"), TextColumn("{task.fields[cache]}"))  # fmt: skip
    with out.open("a", encoding="utf-8") as sink, Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("job", total=len(requests), speed="", cache="")

        def on_step(engine: Engine) -> None:
            progress.update(task, completed=summary.completed + summary.failed,
                            speed=f"{summary.tokens_per_second:,.1f} tok/s",
                            cache=f"cache {_mib(engine.cache.bytes_used())} used / {_mib(engine.cache_bytes())} allocated, "
                                  f"{engine.active} rows")  # fmt: skip

        run_job(engine, requests, sink, summary, on_step)
        progress.update(task, completed=summary.completed + summary.failed)
    console.print(job_table(summary, engine, out))
    return summary


def job_table(summary: JobSummary, engine: Engine | None, out: Path) -> Table:
    table = Table(title="rkv run --prompts", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_row("lines read", str(summary.lines))
    table.add_row("bad lines (skipped)", str(len(summary.bad)))
    table.add_row("already in --out (skipped)", str(summary.already_done))
    table.add_row("completed", str(summary.completed))
    table.add_row("failed", str(summary.failed))
    table.add_row("prompt tokens", f"{summary.prompt_tokens:,}")
    table.add_row("generated tokens", f"{summary.completion_tokens:,}")
    table.add_row("generation", f"{summary.tokens_per_second:,.1f} tok/s over {summary.seconds:.1f} s")
    if engine is not None:
        table.add_row("rows (max batch)", str(engine.max_batch))
        table.add_row("decode steps", engine.decode_path)
        table.add_row("cache allocated", _mib(engine.cache_bytes()))
    table.add_row("output", str(out))
    return table
