"""The engine in a thread: thread-safe submit and cancel, a bounded waiting queue, a drain on stop.

The HTTP handlers run on the asyncio loop; the model runs here, one :meth:`Engine.step` at a
time, so a long forward never blocks the loop. Requests wait in the engine's queue until a row is
free; :meth:`EngineWorker.submit` refuses one more than ``max_queue`` waiting (:class:`QueueFull`,
HTTP 429) and any once the worker stops or its engine failed (:class:`Unavailable`, HTTP 503).

**When the loop gets the tokens.** Both threads share the interpreter lock, and the engine's host
work (a prefill launches a few thousand kernels) stretches by whatever the loop runs meanwhile. The
tokens of a step are therefore handed to the loop when the *next* step has queued its device work
and waits for it (``Engine.before_wait``), or when the engine runs out of work: the loop's streaming
then overlaps the engine's wait on the GPU instead of its launches.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Callable

from .engine import Engine, TokenEvent
from .requests import GenerationRequest

__all__ = ["EngineWorker", "QueueFull", "Unavailable"]

log = logging.getLogger("rkv.serve")


class QueueFull(RuntimeError):
    """The waiting queue is full: try again later (HTTP 429)."""


class Unavailable(RuntimeError):
    """The worker is stopping or its engine failed (HTTP 503)."""


class EngineWorker:
    """Runs an :class:`Engine` in a daemon thread (see the module docstring)."""

    def __init__(self, engine: Engine, max_queue: int) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0  # submitted, not yet taken into a row (inbox + engine queue)
        self._wake = threading.Event()
        self._stopping = False
        self.failure: str | None = None
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}  # events of the current step, per loop (engine thread only)
        self._thread = threading.Thread(target=self._loop, name="rkv-engine", daemon=True)
        engine.before_wait = self._deliver

    def start(self) -> "EngineWorker":
        self._thread.start()
        return self

    @property
    def available(self) -> bool:
        return not self._stopping and self.failure is None and self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return self._waiting

    def submit(self, request: GenerationRequest, emit: Callable[[TokenEvent], None],
               loop: asyncio.AbstractEventLoop | None = None) -> None:  # fmt: skip
        """Queue ``request`` or raise QueueFull / Unavailable.

        ``emit`` gets each event: on ``loop`` when given (the events of one engine step are handed
        over in one call, one wake-up of the loop per step rather than per token), else in the
        engine thread.
        """
        if loop is not None:
            emit = self._on_loop(emit, loop)
        with self._lock:
            if not self.available:
                raise Unavailable(self.failure or "the server is shutting down")
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} requests are already waiting (the queue holds {self.max_queue})")
            self._waiting += 1
        self._inbox.put(("submit", request, emit))
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        """Stop ``request_id`` (a client went away): its row is freed at the next step."""
        self._inbox.put(("cancel", request_id, None))
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish every request already taken, then end the thread."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def _on_loop(self, emit: Callable[[TokenEvent], None], loop: asyncio.AbstractEventLoop) -> Callable[[TokenEvent], None]:
        def buffered(event: TokenEvent) -> None:
            self._outbox.setdefault(loop, []).append((emit, event))

        return buffered

    def _deliver(self) -> None:
        """Hand the events buffered during a step to their loops (one call per loop)."""
        outbox, self._outbox = self._outbox, {}
        for loop, batch in outbox.items():
            try:
                loop.call_soon_threadsafe(_run_all, batch)
            except RuntimeError:  # the loop is closed: its clients are gone
                pass

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, arg, emit = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                emit = self._counting(emit)
                if self.failure is not None:
                    emit(TokenEvent(arg.id, None, "error", self.failure))
                    continue
                try:
                    self.engine.submit(arg, emit)
                except ValueError as err:  # checked before queueing; the store may have grown since
                    emit(TokenEvent(arg.id, None, "error", str(err)))
            else:
                self.engine.cancel(arg)

    def _counting(self, emit: Callable[[TokenEvent], None]) -> Callable[[TokenEvent], None]:
        """``emit`` that also notes when the request leaves the waiting queue (first event)."""
        first = [True]

        def wrapped(event: TokenEvent) -> None:
            if first[0]:
                first[0] = False
                with self._lock:
                    self._waiting -= 1
            emit(event)

        return wrapped

    def _loop(self) -> None:
        while True:
            self._drain_inbox()
            if self.engine.has_work:
                try:
                    self.engine.step()  # hands the previous step's events over once its device work is queued
                except Exception as err:  # the engine cannot go on: end every request with an error, refuse new ones
                    log.exception("engine step failed")
                    self.failure = f"the engine failed: {type(err).__name__}: {err}"
                    self.engine.fail_all(self.failure)
                if not self.engine.has_work:
                    self._deliver()
                continue
            self._deliver()
            if self._stopping and self._inbox.empty():
                return
            self._wake.wait(0.05)
            self._wake.clear()


def _run_all(batch: list) -> None:
    for emit, event in batch:
        emit(event)
