"""The engine thread (``serve.worker``): a step's tokens reach the asyncio loop when the next step waits on
its device work, or when the engine runs out of work; never between steps, and none is lost."""

import asyncio
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "runtime"))  # the tiny-checkpoint fixtures live beside the runtime tests
from rkv_fixtures import make_checkpoint
from tiny_models import tiny_model

from rkv_convert.runtime.cache import CacheSettings
from rkv_convert.runtime.generate import RkvModel, SamplingOptions
from rkv_convert.serve.engine import Engine, EngineConfig, TokenEvent
from rkv_convert.serve.requests import GenerationRequest
from rkv_convert.serve.worker import EngineWorker


def test_tokens_reach_the_loop_at_the_next_steps_wait_and_when_idle() -> None:
    model = tiny_model("llama")
    ckpt = make_checkpoint(model, bits=2, recent_window=4, flush_block=4, max_sinks=2, key_layout="folded")
    rkv = RkvModel(model, ckpt, settings=CacheSettings(recent_window=4, flush_block=4, max_sinks=2), backend="reference")
    engine = Engine(rkv, EngineConfig(max_len=64, budget_bytes=2**26, max_batch=2, cuda_graph=False))
    gen = torch.Generator().manual_seed(3)
    greedy = SamplingOptions(temperature=0.0)
    requests = [GenerationRequest(f"r{i}", tuple(torch.randint(0, 128, (9 + 5 * i,), generator=gen).tolist()),
                                  max_tokens=6 + 2 * i, sampling=greedy) for i in range(3)]  # fmt: skip

    worker = EngineWorker(engine, max_queue=8)
    deliver, handed = worker._deliver, []  # (where, whether the engine still had work)

    def at_wait() -> None:
        handed.append(("wait", engine.has_work))
        deliver()

    def in_loop() -> None:
        handed.append(("loop", engine.has_work))
        deliver()

    engine.before_wait, worker._deliver = at_wait, in_loop
    got: dict[str, list[TokenEvent]] = defaultdict(list)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        finished = {r.id: asyncio.Event() for r in requests}

        def emitter(rid: str):
            def emit(event: TokenEvent) -> None:
                got[rid].append(event)
                if event.finish_reason is not None:
                    finished[rid].set()

            return emit

        worker.start()
        for r in requests:
            worker.submit(r, emitter(r.id), loop)
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in finished.values())), timeout=120)

    asyncio.run(run())
    worker.stop(timeout=30)

    for r in requests:  # every token and the final event arrived, in order
        events = got[r.id]
        assert [e.finish_reason for e in events] == [None] * (r.max_tokens - 1) + ["length"]
        assert all(e.token is not None for e in events)
    waits = [has_work for where, has_work in handed if where == "wait"]
    assert waits and all(waits)  # mid-step, with the step's device work queued
    assert all(not has_work for where, has_work in handed if where == "loop")  # never between two steps
