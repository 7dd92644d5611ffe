"""The largest-batch search of ``benchmarks/bench_end_to_end.py`` (also used by ``bench_serve.py``) on a fake job
whose peak memory is linear in the batch: it finds the true largest batch, and with ``fails_at`` (fp16 out of
memory at the second probe, as on an 80 GB card) it never tries that batch or above."""

from __future__ import annotations

import pytest
import torch
from benchmark_scripts import load_benchmark

BASE, PER_SEQ = 13 * 2**30, 2**31 + 12345  # weights, and bytes per sequence


@pytest.fixture(scope="module")
def e2e():
    return load_benchmark("bench_end_to_end")


def _job(largest: int, tried: list[int]):
    def job(batch: int) -> dict[str, float]:
        tried.append(batch)
        if batch > largest:
            raise torch.OutOfMemoryError("fake")
        return {"peak_bytes": BASE + PER_SEQ * batch}

    return job


@pytest.mark.parametrize("largest", [17, 33, 40])
def test_finds_the_largest_batch_above_the_probes(e2e, largest: int) -> None:
    tried: list[int] = []
    job = _job(largest, tried)
    probes = {b: job(b) for b in (8, 16)}
    limit = BASE + PER_SEQ * largest + PER_SEQ // 2  # the memory model's fit guesses it exactly
    batch, result = e2e.largest_batch(job, (8, 16), probes, limit, max_tries=4)
    assert batch == largest
    assert result["peak_bytes"] == BASE + PER_SEQ * largest


def test_a_known_failure_bounds_the_search(e2e) -> None:
    tried: list[int] = []
    job = _job(17, tried)
    probes = {b: job(b) for b in (8, 16)}  # 32 is known to fail
    limit = BASE + PER_SEQ * 60  # a loose limit: without the bound the first guess would be 60
    batch, _ = e2e.largest_batch(job, (8, 16), probes, limit, max_tries=4, fails_at=32)
    assert batch == 17
    assert max(tried) < 32
    assert len(tried) - 2 <= 4


def test_no_try_when_the_bound_is_next_to_the_probe(e2e) -> None:
    tried: list[int] = []
    job = _job(16, tried)
    probes = {b: job(b) for b in (8, 16)}
    batch, _ = e2e.largest_batch(job, (8, 16), probes, BASE + PER_SEQ * 60, max_tries=4, fails_at=17)
    assert (batch, tried) == (16, [8, 16])


def test_the_fit_reads_the_named_bytes(e2e) -> None:
    """fp16's search fits reserved bytes: with allocated bytes a third lower, the first guess would overshoot."""
    tried: list[int] = []
    job = _job(17, tried)

    def with_reserved(batch: int) -> dict[str, float]:
        out = job(batch)
        return {"peak_bytes": BASE + (out["peak_bytes"] - BASE) * 2 // 3, "reserved_bytes": out["peak_bytes"]}

    probes = {b: with_reserved(b) for b in (8, 16)}
    limit = BASE + PER_SEQ * 17 + PER_SEQ // 2
    batch, _ = e2e.largest_batch(with_reserved, (8, 16), probes, limit, max_tries=1, fit="reserved_bytes")
    assert (batch, tried[2:]) == (17, [17])
    tried.clear()
    batch, _ = e2e.largest_batch(with_reserved, (8, 16), probes, limit, max_tries=1)
    assert batch == 16 and tried[0] > 17  # allocated bytes guess too high, and the one try fails


def test_warm_largest_falls_back_to_the_single_run_and_says_so(e2e, monkeypatch, capsys) -> None:
    """fp16's largest batch is timed warm; when two runs in a row do not fit, the search's single run is reported."""
    single = {"peak_bytes": 1, "decode_tok_s": 10.0}

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("fake")

    monkeypatch.setattr(e2e, "run_hf", oom)
    assert e2e.warm_largest(None, 17, single, 4096, 128, 32000) is single
    assert "single run is reported" in capsys.readouterr().out
    warm = {"peak_bytes": 1, "decode_tok_s": 12.0}
    monkeypatch.setattr(e2e, "run_hf", lambda *args: warm)
    assert e2e.warm_largest(None, 17, single, 4096, 128, 32000) is warm
