"""``rkv run --prompts FILE.jsonl --out FILE.jsonl``: many requests through the continuous-batching engine.

Input: one JSON object per line with ``id`` (string or integer, unique), ``prompt`` or ``messages``
and optional ``max_tokens``, ``temperature``, ``top_p``, ``seed`` (checked by
:func:`~rkv_convert.serve.requests.parse_request`). A bad line is reported with its line number and
skipped; the job goes on.

Output: one JSON object per finished request, appended (and flushed) as it finishes:
``{"id", "text", "finish_reason", "prompt_tokens", "completion_tokens"}`` (``"error"`` instead of
text when the engine refused it). A re-run skips the ids already in ``--out``, so a killed job
loses nothing but the requests in flight and resumes. A last line cut short by a kill is dropped
(the file is truncated to its last complete line) and that request runs again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from ..runtime.generate import RkvModel, SamplingOptions
from .engine import Engine, EngineConfig, TokenEvent
from .requests import GenerationRequest, Limits, RequestError, parse_request

__all__ = ["JobSummary", "read_done_ids", "read_requests", "job_engine", "run_job"]


@dataclass
class JobSummary:
    """What a job did: lines read, bad lines (line number, reason), skipped ids, finished requests."""

    lines: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)
    already_done: int = 0
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    truncated_last_line: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0


def read_done_ids(out: Path, summary: JobSummary) -> set[str]:
    """Ids already in ``out``; a partial last line (a killed write) is cut off the file first."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        out.write_bytes(data)
        summary.truncated_last_line = True
    done = set()
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            done.add(str(record["id"]))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{out}:{number} is not an output line of rkv run ({err}); pass another --out") from err
    return done


def read_requests(path: Path, tokenizer, limits: Limits, done: set[str], summary: JobSummary, stop_ids: tuple[int, ...],
                  defaults: SamplingOptions) -> list[GenerationRequest]:  # fmt: skip
    """The requests of ``path`` not yet in ``done``; bad lines go to ``summary.bad`` with their number."""
    requests, seen = [], set()
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            summary.lines += 1
            try:
                body = json.loads(line)
            except json.JSONDecodeError as err:
                summary.bad.append((number, f"not JSON ({err.msg})"))
                continue
            rid = body.get("id") if isinstance(body, dict) else None
            if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
                summary.bad.append((number, "needs an \"id\" (a string or an integer)"))
                continue
            rid = str(rid)
            if rid in seen:
                summary.bad.append((number, f"id {rid!r} appears on an earlier line"))
                continue
            seen.add(rid)
            if rid in done:
                summary.already_done += 1
                continue
            try:
                requests.append(parse_request(body, tokenizer, limits, rid, "messages" in body, stop_ids, defaults))
            except RequestError as err:
                summary.bad.append((number, str(err)))
    return requests


def job_engine(rkv_model: RkvModel, requests: list[GenerationRequest], budget_bytes: int, max_batch: int | None = None,
               cuda_graph: bool | None = None) -> Engine | None:  # fmt: skip
    """The engine for ``requests`` (None when there are none): rows for the longest one, decode graphs captured
    for up to ``len(requests)`` rows (:meth:`Engine.capture_graphs`); ``cuda_graph``: :class:`EngineConfig`.
    Built before the output file is opened, so a refusal writes nothing."""
    if not requests:
        return None
    config = EngineConfig(max_len=max(r.total_tokens for r in requests), budget_bytes=budget_bytes, max_batch=max_batch,
                          cuda_graph=cuda_graph)  # fmt: skip
    engine = Engine(rkv_model, config)
    engine.capture_graphs(len(requests))
    return engine


def run_job(engine: Engine | None, requests: list[GenerationRequest], out: TextIO, summary: JobSummary,
            on_step: Callable[[Engine], None] | None = None) -> None:  # fmt: skip
    """Run ``requests`` on ``engine``, writing each output line to ``out`` as its request finishes."""
    if engine is None:
        return
    tokenizer = engine.model.tokenizer
    tokens: dict[str, list[int]] = {r.id: [] for r in requests}
    prompt_len = {r.id: len(r.prompt_ids) for r in requests}

    def emit(event: TokenEvent) -> None:
        if event.token is not None:
            tokens[event.request_id].append(event.token)
        if event.finish_reason is None:
            return
        ids = tokens.pop(event.request_id)
        record: dict[str, object] = {"id": event.request_id, "finish_reason": event.finish_reason,
                                     "prompt_tokens": prompt_len[event.request_id], "completion_tokens": len(ids)}  # fmt: skip
        if event.error is not None:
            record["error"] = event.error
            summary.failed += 1
        else:
            record["text"] = tokenizer.decode(ids, skip_special_tokens=True)
            summary.completed += 1
        summary.prompt_tokens += prompt_len[event.request_id]
        summary.completion_tokens += len(ids)
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()

    start = time.perf_counter()
    for request in requests:
        try:
            engine.submit(request, emit)
        except ValueError as err:  # needs more cache than the budget allows
            emit(TokenEvent(request.id, None, "error", str(err)))
    while engine.has_work:
        engine.step()
        summary.seconds = time.perf_counter() - start
        if on_step is not None:
            on_step(engine)
