"""``rkv serve`` on a tiny checkpoint, on a free loopback port started and stopped inside each test:
the OpenAI routes (plain and streamed), greedy text alone = under concurrent load at 4x the queue
(only the designed 429s, no 5xx), OpenAI-format 4xx errors, the bearer key, a disconnect freeing its
row, and SIGTERM draining the streams in flight before a clean exit."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "runtime"))  # the tiny-checkpoint fixtures live beside the runtime tests
from rkv_fixtures import tiny_serving_folder  # noqa: E402
from server_fixtures import running_server, sse_events  # noqa: E402

import rkv_convert  # noqa: E402
from rkv_convert.serve.serve_cli import ServerOptions  # noqa: E402

PROMPTS = ["The cat sat on", "Once upon a time", "abc", "Hello, world! How are", "x = 1 + 2 *", "Q: why? A:",
           "zzz", "The quick brown fox", "1 2 3 4 5 6", "In the beginning", "def f(x):", "Dear Sir,"]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_serving_folder(tmp_path_factory.mktemp("rkv") / "tiny-rkv")


@pytest.fixture(scope="module")
def rkv(folder):
    return rkv_convert.load(folder, device="cpu", backend="reference")


def _complete(client: httpx.Client, prompt: str, max_tokens: int = 24, **extra) -> httpx.Response:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return client.post("/v1/completions", json=body, timeout=120)


def test_routes_plain_and_streamed(rkv) -> None:
    with running_server(rkv, ServerOptions(max_batch=4, model_name="tiny")) as (url, _), httpx.Client(base_url=url) as client:
        assert client.get("/health").json()["status"] == "ok"
        models = client.get("/v1/models").json()
        assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
        plain = _complete(client, "The cat sat on").json()
        assert plain["object"] == "text_completion" and plain["choices"][0]["finish_reason"] == "length"
        assert plain["usage"]["completion_tokens"] == 24 and plain["usage"]["prompt_tokens"] == len(rkv.tokenizer("The cat sat on").input_ids)
        with client.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "The cat sat on", "max_tokens": 24,
                                                             "temperature": 0, "stream": True}) as response:  # fmt: skip
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response.iter_lines())
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == plain["choices"][0]["text"]
        ids = rkv.tokenizer("The cat sat on").input_ids  # a prompt of token ids, usage in the last chunk
        with client.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 24, "temperature": 0,
                                                             "stream": True, "stream_options": {"include_usage": True}}) as response:  # fmt: skip
            events = sse_events(response.iter_lines())
        assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 24
        assert "".join(e["choices"][0]["text"] for e in events[:-2]) == plain["choices"][0]["text"]

        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "temperature": 0}
        reply = client.post("/v1/chat/completions", json=chat).json()
        assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"
        with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as response:
            events = sse_events(response.iter_lines())
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
        assert streamed == reply["choices"][0]["message"]["content"]


def test_overload_gets_only_429_and_accepted_requests_match_alone(rkv) -> None:
    options = ServerOptions(max_batch=2, max_queue=3, model_name="tiny")
    with running_server(rkv, options) as (url, worker), httpx.Client(base_url=url) as client:
        alone = {p: _complete(client, p).json()["choices"][0]["text"] for p in PROMPTS}  # one at a time: alone
        results: dict[str, httpx.Response] = {}
        barrier = threading.Barrier(len(PROMPTS))  # 12 clients at once: 4x the queue of 3

        def one(prompt: str) -> None:
            with httpx.Client(base_url=url) as c:
                barrier.wait()
                results[prompt] = _complete(c, prompt)

        threads = [threading.Thread(target=one, args=(p,)) for p in PROMPTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        statuses = sorted(r.status_code for r in results.values())
        assert set(statuses) <= {200, 429}, statuses
        assert 429 in statuses, f"the load never filled the queue: {statuses}"
        for prompt, response in results.items():
            if response.status_code == 429:
                error = response.json()["error"]
                assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
            else:
                assert response.json()["choices"][0]["text"] == alone[prompt], prompt
        assert statuses.count(200) >= options.max_queue  # a full queue is taken; rows free up as the engine admits
        assert client.get("/health").json()["active"] == 0


def test_bad_requests_get_openai_errors(rkv) -> None:
    with running_server(rkv, ServerOptions(max_batch=2, model_name="tiny", api_key="sesame")) as (url, _):
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer sesame"}) as client:
            cases = [
                (client.post("/v1/completions", content=b"{not json"), 400, None, "invalid_json"),
                (client.post("/v1/completions", json={"max_tokens": 3}), 400, "prompt", None),
                (client.post("/v1/completions", json={"prompt": "a", "n": 2}), 400, "n", None),
                (client.post("/v1/completions", json={"prompt": "a", "temperature": 5}), 400, "temperature", None),
                (client.post("/v1/completions", json={"prompt": "a", "max_tokens": 600}), 400, "max_tokens", None),
                (client.post("/v1/completions", json={"prompt": "a" * 500, "max_tokens": 20}), 400, "max_tokens",
                 "context_length_exceeded"),
                (client.post("/v1/completions", json={"prompt": "a", "stop": ["x"]}), 400, "stop", None),
                (client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}), 400,
                 "messages[0].role", None),
                (client.post("/v1/completions", json={"model": "gpt-9", "prompt": "a"}), 404, "model", "model_not_found"),
                (client.get("/v1/nothing"), 404, None, "not_found"),
            ]  # fmt: skip
            for response, status, param, code in cases:
                assert response.status_code == status, (response.status_code, response.text)
                error = response.json()["error"]
                assert error["message"] and error["param"] == param and error["type"], error
                if code is not None:
                    assert error["code"] == code, error
            assert _complete(client, "ok", max_tokens=2).status_code == 200
        with httpx.Client(base_url=url) as anonymous:
            refused = _complete(anonymous, "ok", max_tokens=2)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
            assert anonymous.get("/health").status_code == 200  # health needs no key


def test_a_disconnect_frees_its_row(rkv) -> None:
    with running_server(rkv, ServerOptions(max_batch=2, model_name="tiny")) as (url, worker), httpx.Client(base_url=url) as client:
        body = {"model": "tiny", "prompt": "go on and on", "max_tokens": 480, "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            while not next(lines).startswith("data: "):
                pass
            assert worker.engine.active == 1
        deadline = time.monotonic() + 10
        while worker.engine.active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.engine.active == 0 and worker.engine.cache.active == 0
        assert worker.engine.stats.tokens_generated < 480  # stopped early, not run to the end
        assert worker.engine.stats.requests_done == 0  # cancelled, not finished
        with pytest.raises(httpx.ReadTimeout):  # a plain (not streamed) request whose client gives up
            client.post("/v1/completions", json={**body, "stream": False}, timeout=1.0)
        deadline = time.monotonic() + 10
        while worker.engine.active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.engine.active == 0 and worker.engine.stats.requests_done == 0
        assert _complete(client, "still serving", max_tokens=3).status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_the_streams_in_flight_then_exits(folder) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # CPU: the reference ops, not the interpreter
    env["OMP_NUM_THREADS"] = "1"
    rkv_bin = Path(sys.executable).with_name("rkv")
    proc = subprocess.Popen([str(rkv_bin), "serve", str(folder), "--port", str(port), "--device", "cpu", "--model-name", "tiny"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
            time.sleep(0.2)
        body = {"model": "tiny", "prompt": "long answer", "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.Client(base_url=url, timeout=120) as client, client.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            events = sse_events([first, *lines])
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_refuses_what_it_cannot_serve_in_one_line(folder, tmp_path) -> None:
    import typer
    from typer.testing import CliRunner

    from rkv_convert.serve.serve_cli import serve_command

    app = typer.Typer()
    app.command("serve")(serve_command)
    app.command("noop")(lambda: None)
    for args, message in [([str(tmp_path / "none")], "not a checkpoint folder"),
                          ([str(folder), "--device", "cpu", "--max-model-len", "4096"], "beyond the model's context of 512"),
                          ([str(folder), "--device", "cpu", "--cache-memory", "0.000001"], "raise the budget")]:  # fmt: skip
        result = CliRunner().invoke(app, ["serve", *args])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert message in " ".join(result.output.split()), result.output
