"""Many sequences over the packed cache: the continuous-batching engine, ``rkv run --prompts`` and ``rkv serve``.

- :mod:`.row_cache`: the packed cache with per-row schedules (rows join and leave a running batch);
- :mod:`.requests`: the request structure and the checks every front end runs first;
- :mod:`.engine`: continuous batching (admission by cache bytes, prefill alone, batched decode);
- :mod:`.batch_job`, :mod:`.job_cli`: the JSONL batch job of ``rkv run``;
- :mod:`.worker`, :mod:`.app`, :mod:`.serve_cli`: the engine thread and the OpenAI-compatible server.
"""
