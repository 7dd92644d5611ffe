"""``rkv serve`` on the real SmolLM2-135M-Instruct checkpoint through the official ``openai`` client (slow):
greedy answers are the same alone and among concurrent requests, streamed and plain, and the
client's own error classes see the server's 4xx errors."""

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from server_fixtures import running_server  # noqa: E402
from smollm2_checkpoint import export_smollm2  # noqa: E402

from rkv_convert.serve.serve_cli import ServerOptions  # noqa: E402

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?", "Who wrote Hamlet?",
             "Write one sentence about the sea.", "What is Python used for?"]  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_smollm2(tmp_path_factory.mktemp("smollm2-serve") / "rkv-2bit")


def test_openai_client_alone_equals_concurrent(exported) -> None:
    import openai

    import rkv_convert

    rkv = rkv_convert.load(exported, device="cpu", backend="reference")
    with running_server(rkv, ServerOptions(max_batch=4, max_queue=16, model_name="smollm2")) as (url, worker):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)

        def ask(question: str) -> str:
            reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": question}],
                                                   max_tokens=40, temperature=0)  # fmt: skip
            assert reply.choices[0].finish_reason in ("stop", "length")
            return reply.choices[0].message.content

        alone = {q: ask(q) for q in QUESTIONS}
        assert "Paris" in alone[QUESTIONS[0]], alone[QUESTIONS[0]]
        with ThreadPoolExecutor(len(QUESTIONS)) as pool:  # all at once: 4 rows busy, 2 waiting, staggered joins
            together = dict(zip(QUESTIONS, pool.map(ask, QUESTIONS)))
        assert together == alone

        stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                                max_tokens=40, temperature=0, stream=True)  # fmt: skip
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == alone[QUESTIONS[0]]

        completion = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)
        assert completion.choices[0].text and completion.usage.completion_tokens <= 8
        assert [m.id for m in client.models.list().data] == ["smollm2"]

        with pytest.raises(openai.BadRequestError, match="context"):
            client.completions.create(model="smollm2", prompt="hi " * 100, max_tokens=8150)
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.completions.create(model="smollm2", prompt="hi", max_tokens=10**6)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="gpt-4", prompt="hi", max_tokens=4)
        assert worker.engine.active == 0
