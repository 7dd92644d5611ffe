"""Start an ``rkv serve`` app on a free loopback port inside a test, and stop it at the end."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from typing import Iterator

import uvicorn

from rkv_convert.serve.serve_cli import ServerOptions, build_server


@contextlib.contextmanager
def running_server(rkv_model, options: ServerOptions) -> Iterator[tuple[str, object]]:
    """``(base_url, worker)`` of a server on 127.0.0.1:<free port>, stopped (and its engine drained) on exit."""
    app, worker = build_server(rkv_model, options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", worker
    finally:
        server.should_exit = True
        thread.join(30)
        worker.stop(30)
        sock.close()


def sse_events(lines) -> list[dict | str]:
    """The ``data:`` payloads of a server-sent-event stream (JSON decoded, ``[DONE]`` kept as a string)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out
