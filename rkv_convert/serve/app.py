"""The OpenAI-compatible HTTP API over an :class:`~rkv_convert.serve.worker.EngineWorker` (FastAPI).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as
server-sent events ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``.

Every refusal is an OpenAI-format JSON error ``{"error": {"message", "type", "param", "code"}}``:
400 for a request that cannot run (checked by :func:`~rkv_convert.serve.requests.parse_request`
and the engine's budget before it is queued), 401 for a missing or wrong bearer token (with
``api_key``), 404 for an unknown model, 429 when the waiting queue is full, 503 while the server
shuts down or after its engine failed. A client that disconnects has its request cancelled, which
frees its cache row at the next engine step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..runtime.generate import RkvModel
from .engine import TokenEvent
from .requests import GenerationRequest, Limits, RequestError, parse_request
from .worker import EngineWorker, QueueFull, Unavailable

__all__ = ["create_app", "error_response"]

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}  # fmt: skip
DISCONNECT_POLL_S = 0.25


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """An OpenAI-format error body with ``status``."""
    body = {"error": {"message": message, "type": _ERROR_TYPES.get(status, "invalid_request_error"), "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class _Detokenizer:
    """Text of a growing token list, released in whole characters (a multi-byte character waits).

    Decodes only the tokens since the last released piece (plus the few before them, for context),
    so a long answer costs linear, not quadratic, time; ``sent`` is the text released so far.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""
        self.prefix = self.read = 0  # ids[prefix:read] were decoded into the last piece's context

    def add(self, token: int | None, last: bool = False) -> str:
        """The text ``token`` completes (``last``: release everything left, an unfinished character too)."""
        if token is not None:
            self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or not after.startswith(before) or (after.endswith("\ufffd") and not last):
            return ""
        piece = after[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        self.sent += piece
        return piece


def create_app(rkv_model: RkvModel, worker: EngineWorker, model_name: str, limits: Limits,
               stop_ids: tuple[int, ...] = (), api_key: str | None = None) -> FastAPI:  # fmt: skip
    """The FastAPI app; the caller starts ``worker`` and stops it after the server (see :mod:`.serve_cli`)."""
    app = FastAPI(title="rkv serve", docs_url=None, redoc_url=None)
    tokenizer = rkv_model.tokenizer
    created = int(time.time())

    def _refused(request: Request) -> JSONResponse | None:
        """A 401 unless the request carries the bearer key (a check in each route, not a middleware:
        Starlette's ``BaseHTTPMiddleware`` would hide client disconnects from the routes)."""
        if api_key is None:
            return None
        given = request.headers.get("authorization", "")
        if secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            return None
        return error_response(401, "missing or wrong API key: send the header Authorization: Bearer <key>", code="invalid_api_key")

    @app.exception_handler(404)
    async def _not_found(request: Request, exc) -> JSONResponse:
        return error_response(404, f"no route {request.method} {request.url.path}", code="not_found")

    @app.exception_handler(405)
    async def _bad_method(request: Request, exc) -> JSONResponse:
        return error_response(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")

    @app.get("/health")
    async def health() -> JSONResponse:
        engine = worker.engine
        body = {"status": "ok" if worker.available else "unavailable", "active": engine.active, "waiting": worker.waiting,
                "max_batch": engine.max_batch, "cache_bytes_allocated": engine.cache_bytes(),
                "decode_path": engine.decode_path, "stats": engine.stats.as_dict()}  # fmt: skip
        if worker.failure:
            body["error"] = worker.failure
        return JSONResponse(body, status_code=200 if worker.available else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        if (refusal := _refused(request)) is not None:
            return refusal
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "rkv", "max_model_len": limits.context}
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(request, chat=True)

    async def _generate(http: Request, chat: bool):
        if (refusal := _refused(http)) is not None:
            return refusal
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return error_response(400, f"the body is not valid JSON: {err}", code="invalid_json")
        if isinstance(body, dict) and body.get("model") not in (None, model_name):
            return error_response(404, f"model {body.get('model')!r} is not served here; this server serves {model_name!r}",
                                  "model", "model_not_found")  # fmt: skip
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        try:
            request = parse_request(body, tokenizer, limits, rid, chat, stop_ids)
            if body.get("stream") not in (None, True, False):
                raise RequestError("stream must be true or false", "stream")
            worker.engine.check_fits(request)
        except RequestError as err:
            return error_response(400, str(err), err.param, err.code)
        except ValueError as err:
            return error_response(400, str(err), "max_tokens", "context_length_exceeded")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        try:
            worker.submit(request, events.put_nowait, loop)
        except QueueFull as err:
            return error_response(429, f"the server is busy: {err}; retry later", code="queue_full")
        except Unavailable as err:
            return error_response(503, f"the server cannot take requests: {err}", code="unavailable")
        if body.get("stream"):
            include_usage = isinstance(body.get("stream_options"), dict) and bool(body["stream_options"].get("include_usage"))
            return StreamingResponse(_stream(http, request, events, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        return await _complete(http, request, events, chat)

    async def _next(http: Request, request: GenerationRequest, events: asyncio.Queue, checked: list[float]) -> TokenEvent | None:
        """The next event, or None (request cancelled) once the client has gone away.

        Whether the client is still there is asked at most every ``DISCONNECT_POLL_S`` seconds
        (``checked[0]``: when it was last asked), also while tokens keep coming.
        """
        loop = asyncio.get_running_loop()
        while True:
            if loop.time() - checked[0] >= DISCONNECT_POLL_S:
                checked[0] = loop.time()
                if await http.is_disconnected():
                    worker.cancel(request.id)
                    return None
            try:
                return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue

    async def _complete(http: Request, request: GenerationRequest, events: asyncio.Queue, chat: bool):
        text, n, checked = _Detokenizer(tokenizer), 0, [asyncio.get_running_loop().time()]
        while True:
            event = await _next(http, request, events, checked)
            if event is None:
                return error_response(499, "the client closed the request", code="client_closed")
            if event.token is not None:
                n += 1
            text.add(event.token, last=event.finish_reason is not None)
            if event.finish_reason is not None:
                break
        if event.finish_reason == "error":
            return error_response(500 if worker.available else 503, event.error or "generation failed", code="engine_error")
        usage = {"prompt_tokens": len(request.prompt_ids), "completion_tokens": n,
                 "total_tokens": len(request.prompt_ids) + n}  # fmt: skip
        choice: dict = {"index": 0, "finish_reason": event.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text.sent}
        else:
            choice.update(text=text.sent, logprobs=None)
        return JSONResponse({"id": request.id, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": model_name, "choices": [choice], "usage": usage})  # fmt: skip

    async def _stream(http: Request, request: GenerationRequest, events: asyncio.Queue, chat: bool,
                      include_usage: bool) -> AsyncIterator[str]:  # fmt: skip
        text, finished, n, checked = _Detokenizer(tokenizer), False, 0, [asyncio.get_running_loop().time()]
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({} if piece is None else {"content": piece})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
            body = {"id": request.id, "object": kind, "created": int(time.time()), "model": model_name, "choices": [choice]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            if chat:
                yield chunk(None, None, first=True)
            while True:
                event = await _next(http, request, events, checked)
                if event is None:
                    return
                piece = text.add(event.token, last=event.finish_reason is not None)
                if event.finish_reason == "error":
                    finished = True
                    error = {"error": {"message": event.error, "type": "server_error", "param": None, "code": "engine_error"}}
                    yield f"data: {json.dumps(error)}\n\n"
                    return
                if event.token is not None:
                    n += 1
                if event.finish_reason is not None:
                    finished = True
                    if piece:
                        yield chunk(piece, None)
                    yield chunk(None, event.finish_reason)
                    if include_usage:  # OpenAI's stream_options: a last chunk with no choices and the usage
                        usage = {"prompt_tokens": len(request.prompt_ids), "completion_tokens": n,
                                 "total_tokens": len(request.prompt_ids) + n}  # fmt: skip
                        yield "data: " + json.dumps({"id": request.id, "object": kind, "created": int(time.time()),
                                                     "model": model_name, "choices": [], "usage": usage}) + "\n\n"  # fmt: skip
                    yield "data: [DONE]\n\n"
                    return
                if piece:
                    yield chunk(piece, None)
        finally:
            if not finished:  # the client went away (or the response was cancelled): free the row
                worker.cancel(request.id)

    return app
