"""The continuous-batching engine: many requests decoding together over one :class:`RowCache`.

One :meth:`Engine.step` does, in order: drop cancelled requests (their rows are freed), admit
waiting requests while a row is free and the cache, grown to hold the request, stays within the
memory budget (each admitted request is prefilled alone and yields its first token), then one
decode forward for every active row. A request that finishes (EOS, ``max_tokens``) frees its row at
once, and the next waiting request takes it on the following step.

**Same greedy tokens alone or in a batch.** A request's computation does not depend on the other
rows: its prefill runs alone, its cache row follows its own flush schedule (:mod:`.row_cache`),
its position ids are its own, and it samples with its own generator (seeded by its ``seed``). What
other rows change is only the batch shape (more rows, and the longest row's slot count, whose
extra slots have position -1): exact arithmetic gives the same logits; floating-point reductions of
other lengths may differ in the last bits (see docs/serving.md).

**Decode path.** On CUDA the decode steps replay CUDA graphs, one per bucket of rows
(:mod:`.row_graph`: the active rows padded to a bucket, static shapes), where the model and cache
allow it; ``EngineConfig.cuda_graph`` forces it on (refused with the reason where it cannot run) or
off. :attr:`Engine.decode_path` says which path runs and, if eager, why. The front ends call
:meth:`Engine.capture_graphs` before the first request: the store is allocated for the longest request
the budget holds and every bucket's graph is captured up front, so a served step is always a replay
(a capture or a bucket's first, eager, step costs several replays, and a store growth drops every graph).
:class:`EngineStats` counts the steps of each kind.

The engine is single-threaded; :mod:`.worker` runs it in a thread for the HTTP server.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..models.compat import CacheDisengagedError
from ..runtime.cache import store_capacity
from ..runtime.decode_graph import decode_graph_supports
from ..runtime.generate import RkvModel, ensure_cache_engaged, sample_next
from .requests import GenerationRequest
from .row_cache import RowCache, row_bytes
from .row_graph import RowDecodeGraph

__all__ = ["EngineConfig", "TokenEvent", "Engine", "default_budget", "bytes_per_row"]

MAX_DEFAULT_BATCH = 256


@dataclass(frozen=True)
class TokenEvent:
    """One new token of a request (``token`` is None on a final event that carries no token)."""

    request_id: str
    token: int | None
    finish_reason: str | None = None  # "stop" (EOS), "length" (max_tokens), "cancelled", "error"
    error: str | None = None


@dataclass(frozen=True)
class EngineConfig:
    """Admission limits: rows (``max_batch``; None = as many as the budget holds at ``max_len``) and bytes."""

    max_len: int  # longest request (prompt + max_tokens) the engine must be able to hold
    budget_bytes: int  # cache memory the engine may allocate
    max_batch: int | None = None
    prefill_tokens_per_step: int = 8192  # prompt tokens prefilled per step (at least one request) before decoding the rest
    cuda_graph: bool | None = None  # decode steps from CUDA graphs: None where supported, True required, False off


@dataclass
class _Sequence:
    request: GenerationRequest
    emit: Callable[[TokenEvent], None]
    generator: torch.Generator | None
    generated: int = 0
    last_token: int = 0
    next_pos: int = 0
    cancelled: bool = False


@dataclass
class EngineStats:
    """Counters the progress bar and /health read."""

    requests_done: int = 0
    tokens_generated: int = 0
    prefills: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0  # wall time of the prefill forwards (each ends with its first token on the host)
    decode_steps: int = 0
    decode_tokens: int = 0  # tokens of decode steps (rows summed over steps)
    decode_seconds: float = 0.0  # wall time of the decode steps (each ends with its tokens on the host)
    graph_replays: int = 0  # decode steps replayed from a captured graph
    graph_replay_seconds: float = 0.0  # their wall time (the rest went to eager steps and captures)
    graph_captures: int = 0  # decode steps that captured a graph (a new bucket, or all again after the store grew)
    eager_steps: int = 0  # decode steps run eagerly (no graphs, or a bucket's first step: it compiles the kernels)
    started: float = field(default_factory=time.perf_counter)

    def as_dict(self) -> dict[str, float]:
        """The counters, plus decode tokens/s and the mean decode batch."""
        out = {k: v for k, v in vars(self).items() if k != "started"}
        out["decode_tokens_per_second"] = self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0
        out["mean_decode_batch"] = self.decode_tokens / self.decode_steps if self.decode_steps else 0.0
        out["mean_replay_ms"] = 1e3 * self.graph_replay_seconds / self.graph_replays if self.graph_replays else 0.0
        return out

    def tokens_per_second(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.tokens_generated / elapsed if elapsed > 0 else 0.0


def bytes_per_row(rkv_model: RkvModel, slots: int) -> int:
    """Cache bytes one row of every layer allocates for ``slots`` store slots (and its fp segment)."""
    cache = rkv_model.new_cache()
    return sum(row_bytes(layer.codec, rkv_model.settings, rkv_model.dtype, slots) for layer in cache.layers)


def default_budget(device: torch.device, cpu_bytes: int, fraction: float = 0.85) -> int:
    """Cache bytes to allow: ``fraction`` of the free memory of a CUDA device, else ``cpu_bytes``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * fraction)
    return int(cpu_bytes)


class Engine:
    """Continuous batching over the packed cache (see the module docstring)."""

    def __init__(self, rkv_model: RkvModel, config: EngineConfig) -> None:
        self.model = rkv_model
        self.config = config
        self._row_fixed = bytes_per_row(rkv_model, 0)
        self._row_per_slot = bytes_per_row(rkv_model, 1) - self._row_fixed
        per_row = self._row_fixed + self._row_per_slot * config.max_len
        fits = config.budget_bytes // per_row
        if config.max_batch is None and fits < 1:
            raise ValueError(f"one sequence of {config.max_len} tokens needs {per_row / 2**20:.1f} MiB of cache, "
                             f"the budget is {config.budget_bytes / 2**20:.1f} MiB; raise the budget or lower the length")  # fmt: skip
        self.max_batch = config.max_batch or int(min(fits, MAX_DEFAULT_BATCH))
        base = rkv_model.new_cache()
        self.cache = RowCache(base, self.max_batch, slots=0, dtype=rkv_model.dtype)
        self.rows: list[_Sequence] = []  # rows[r] runs in cache row r
        self.waiting: deque[_Sequence] = deque()
        self.stats = EngineStats()
        self.device = rkv_model.device
        self.graph, self.decode_path = self._decode_runner(config.cuda_graph)
        # called when a step has queued its device work and is about to wait for the result (see .worker)
        self.before_wait: Callable[[], None] | None = None

    def _decode_runner(self, cuda_graph: bool | None) -> tuple[RowDecodeGraph | None, str]:
        """The CUDA-graph runner of the decode steps (or None) and the path in words."""
        if cuda_graph is False:
            return None, "eager (CUDA graphs off)"
        reason = decode_graph_supports(self.cache, self.model.model)
        if reason is None:
            return RowDecodeGraph(self.model.model, self.cache, self.model.cache_argument), "CUDA graph"
        if cuda_graph:
            raise ValueError(f"cannot capture the engine's decode step in a CUDA graph: {reason}; "
                             "run without --cuda-graph (eager steps)")  # fmt: skip
        return None, f"eager ({reason})"

    def capture_graphs(self, rows: int | None = None) -> int:
        """Capture the decode graphs before any request: the store allocated for the longest request the
        budget holds, then every bucket up to the one holding ``rows`` (default ``max_batch``) run once
        eagerly (compiles its kernels) and captured, with padding rows only. Serving then never stalls on a
        capture or a bucket's first, eager, step (each costs several replays), and the store never grows
        (which would drop every graph). Returns the graphs held (0 on the eager path)."""
        if self.graph is None:
            return 0
        if self.rows or self.waiting:
            raise RuntimeError("capture_graphs() runs before the first request")
        self.cache.grow_slots(self.largest_request_slots())
        top = self.graph.bound(min(rows or self.max_batch, self.max_batch))
        for bound in (b for b in self.graph.bounds if b <= top):
            while bound not in self.graph.graphs:
                self._padding_step(bound)
        return len(self.graph.graphs)

    def largest_request_slots(self) -> int:
        """The most tokens a request may hold here: ``max_len``, or fewer where the budget ends first."""
        slots = self.config.max_len
        while slots > 0 and self.cache_bytes_for(slots) > self.config.budget_bytes:
            slots = store_capacity(slots) - store_capacity(1)  # one block less
        return max(slots, 0)

    @torch.no_grad()
    def _padding_step(self, bound: int) -> None:
        """One static step over ``bound`` padding rows (no row active): token 0 at position 0 into each scratch slot."""
        inputs = torch.zeros(2, bound, 1, dtype=torch.long, device=self.device)
        self.cache.begin_step(bound=bound)
        with self.model.attached():
            self.graph.step(inputs[0], inputs[1])
        self.cache.flush()
        self.cache.end_step()

    # ----- requests --------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, emit: Callable[[TokenEvent], None]) -> None:
        """Queue ``request``; ``emit`` gets each of its tokens (and the final event) from :meth:`step`."""
        self.check_fits(request)
        generator = None
        if not request.sampling.greedy:
            generator = torch.Generator(device=self.device)
            if request.sampling.seed is None:
                generator.seed()
            else:
                generator.manual_seed(request.sampling.seed)
        self.waiting.append(_Sequence(request, emit, generator))

    def cancel(self, request_id: str) -> None:
        """Stop ``request_id`` before the next step (a waiting one is dropped, a running one frees its row)."""
        for seq in (*self.rows, *self.waiting):
            if seq.request.id == request_id:
                seq.cancelled = True

    @property
    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    @property
    def active(self) -> int:
        return len(self.rows)

    def cache_bytes(self) -> int:
        """Cache bytes allocated now (every row, store grown to the longest request admitted)."""
        return self.cache_bytes_for(self.cache.store_slots())

    def cache_bytes_for(self, slots: int) -> int:
        """Bytes of ``max_batch`` rows whose store holds ``slots`` (allocated in whole blocks, as the cache does)."""
        return self.max_batch * (self._row_fixed + self._row_per_slot * store_capacity(slots))

    # ----- the loop --------------------------------------------------------------------------
    def step(self) -> None:
        """Drop cancelled requests, admit what fits, decode one token for every active row."""
        self._drop_cancelled()
        self._admit()
        if self.rows:
            self._decode()

    def run_until_done(self) -> None:
        while self.has_work:
            self.step()

    def fail_all(self, message: str) -> None:
        """End every request with an ``error`` event (the engine cannot go on)."""
        for seq in (*self.rows, *self.waiting):
            seq.emit(TokenEvent(seq.request.id, None, "error", message))
        for r in reversed(range(len(self.rows))):
            self._release(r)
        self.waiting.clear()

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            seq.emit(TokenEvent(seq.request.id, None, "cancelled"))
        for r in reversed(range(len(self.rows))):
            if self.rows[r].cancelled:
                seq = self.rows[r]
                self._release(r)
                seq.emit(TokenEvent(seq.request.id, None, "cancelled"))

    def check_fits(self, request: GenerationRequest) -> None:
        """Raise ``ValueError`` unless the cache, its store grown to hold ``request``, fits the budget.

        The store is one rectangle (``max_batch`` rows of the longest admitted request's slots), so
        a request fits or never does, whatever else runs; the front ends call this before queueing.
        """
        if request.total_tokens > self.config.max_len:
            raise ValueError(f"the request needs {request.total_tokens} tokens (prompt + max_tokens), the engine "
                             f"holds at most {self.config.max_len} per request")  # fmt: skip
        need = self.cache_bytes_for(max(self.cache.store_slots(), request.total_tokens))
        if need > self.config.budget_bytes:
            raise ValueError(f"the request needs {request.total_tokens} cache slots in each of {self.max_batch} rows "
                             f"({need / 2**20:.1f} MiB), beyond the cache budget of {self.config.budget_bytes / 2**20:.1f} MiB; "
                             "lower max_tokens or restart with a smaller --max-batch")  # fmt: skip

    def _admit(self) -> None:
        """Prefill waiting requests into free rows, up to ``prefill_tokens_per_step`` prompt tokens
        (a long queue does not stall the running rows' decoding, nor every first token, for long)."""
        budget = self.config.prefill_tokens_per_step
        while self.waiting and len(self.rows) < self.max_batch and budget > 0:
            seq = self.waiting.popleft()
            try:
                self.check_fits(seq.request)
            except ValueError as err:
                seq.emit(TokenEvent(seq.request.id, None, "error", str(err)))
                continue
            self.cache.grow_slots(seq.request.total_tokens)
            self._prefill(seq)
            budget -= len(seq.request.prompt_ids)

    @torch.no_grad()
    def _prefill(self, seq: _Sequence) -> None:
        """Prefill ``seq`` alone (a batch-1 cache), copy it into the next row, emit its first token."""
        rkv, start = self.model, time.perf_counter()
        ids = torch.tensor([seq.request.prompt_ids], dtype=torch.long, device=self.device)
        t = ids.shape[1]
        single = self.cache.single(reserve_tokens=t)
        mask = torch.ones_like(ids)
        positions = torch.arange(t, device=self.device)[None]
        with rkv.attached() as model:
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                        **{rkv.cache_argument: single})  # fmt: skip
        ensure_cache_engaged(single, t, "at prefill")
        self.cache.load_row(len(self.rows), single)
        self.rows.append(seq)
        seq.next_pos = t
        sampled = sample_next(out.logits[:, -1].to(self.device), seq.request.sampling, seq.generator)
        self._waiting()
        token = int(sampled[0])
        self.stats.prefills += 1
        self.stats.prefill_tokens += t
        self.stats.prefill_seconds += time.perf_counter() - start
        self._accept(len(self.rows) - 1, token)

    @torch.no_grad()
    def _decode(self) -> None:
        a, start = len(self.rows), time.perf_counter()
        if self.graph is not None:
            logits, path = self._decode_logits(self.graph)
        else:
            logits, path = self._decode_logits_eager(), "eager"
        self.cache.end_step()
        greedy = [r for r in range(a) if self.rows[r].request.sampling.greedy]
        picked: dict[int, int] = {}
        argmax = logits[greedy].argmax(-1) if greedy else None  # one argmax and one device-to-host copy for all greedy rows
        self._waiting()
        if argmax is not None:
            picked.update(zip(greedy, argmax.tolist()))
        for r in range(a):
            seq = self.rows[r]
            seq.next_pos += 1
            if r not in picked:
                picked[r] = int(sample_next(logits[r : r + 1], seq.request.sampling, seq.generator)[0])
        seconds = time.perf_counter() - start
        self.stats.decode_steps += 1
        self.stats.decode_tokens += a
        self.stats.decode_seconds += seconds
        if path == "replay":
            self.stats.graph_replays += 1
            self.stats.graph_replay_seconds += seconds
        elif path == "capture":
            self.stats.graph_captures += 1
        else:
            self.stats.eager_steps += 1
        for r in reversed(range(a)):  # releases move the last row down: go from the top
            self._accept(r, picked[r])

    def _decode_logits_eager(self) -> torch.Tensor:
        """One plain decode forward over the active rows; their logits ``[active, vocab]``."""
        rkv = self.model
        tokens = torch.tensor([[s.last_token] for s in self.rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[s.next_pos] for s in self.rows], dtype=torch.long, device=self.device)
        self.cache.begin_step()
        with rkv.attached() as model:
            out = model(input_ids=tokens, position_ids=positions, use_cache=True, **{rkv.cache_argument: self.cache})
        self._check_written()
        return out.logits[:, -1].to(self.device)

    def _decode_logits(self, runner: RowDecodeGraph) -> tuple[torch.Tensor, str]:
        """One static decode step over the active rows padded to their bucket (replayed where captured):
        the active rows' logits ``[active, vocab]`` and how the step ran (``replay``, ``capture``, ``eager``).
        Padding rows feed token 0 at position 0."""
        a = len(self.rows)
        bound = runner.bound(a)
        host = torch.zeros(2, bound, 1, dtype=torch.long)
        host[0, :a, 0] = torch.tensor([s.last_token for s in self.rows])
        host[1, :a, 0] = torch.tensor([s.next_pos for s in self.rows])
        inputs = host.to(self.device)
        self.cache.begin_step(bound=bound)
        with self.model.attached():
            logits, path = runner.step(inputs[0], inputs[1])
        if path != "replay":  # the Python forward ran: the handler counted its appends
            self._check_written()
        self.cache.flush()
        return logits[:a].to(self.device), path

    def _waiting(self) -> None:
        """The step's device work is queued and the host is about to wait for it: run ``before_wait``."""
        if self.before_wait is not None:
            self.before_wait()

    def _check_written(self) -> None:
        written = self.cache.layers_written()
        if any(n != 1 for n in written):
            raise CacheDisengagedError(f"the rkv row cache did not receive the decode step: layers appended {sorted(set(written))} "
                                       "tokens instead of 1; the model's attention bypassed rkv")  # fmt: skip

    def _accept(self, row: int, token_id: int) -> None:
        """Record ``row``'s new token, emit it, and free the row when the request is done."""
        seq = self.rows[row]
        seq.generated += 1
        seq.last_token = token_id
        self.stats.tokens_generated += 1
        if token_id in seq.request.stop_ids:
            self._finish(row, TokenEvent(seq.request.id, None, "stop"))
        elif seq.generated >= seq.request.max_tokens:
            self._finish(row, TokenEvent(seq.request.id, token_id, "length"))
        else:
            seq.emit(TokenEvent(seq.request.id, token_id))

    def _finish(self, row: int, event: TokenEvent) -> None:
        seq = self.rows[row]
        self._release(row)
        self.stats.requests_done += 1
        seq.emit(event)

    def _release(self, row: int) -> None:
        moved = self.cache.release_row(row)
        last = self.rows.pop()
        if moved is not None:
            self.rows[row] = last
