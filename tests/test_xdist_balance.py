"""The test order under pytest-xdist (``xdist_balance``): xdist's own first split, and balanced chunks."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
from xdist.scheduler.worksteal import WorkStealingScheduling
from xdist_balance import DURATIONS, balanced_order, chunk_sizes, durations_from_log, known_durations


class _Node:
    """What the scheduler touches of a worker controller: it records the tests it is sent."""

    def __init__(self, name: str) -> None:
        self.gateway = SimpleNamespace(id=name)
        self.shutting_down = False
        self.sent: list[int] = []

    def send_runtest_some(self, indices: list[int]) -> None:
        self.sent.extend(indices)

    def shutdown(self) -> None:
        self.shutting_down = True


@pytest.mark.parametrize(("n", "workers"), [(70, 12), (5, 3), (100, 7), (12, 12)])
def test_chunk_sizes_are_what_worksteal_sends_first(n: int, workers: int) -> None:
    """The scheduler of the installed xdist, given ``n`` collected tests and ``workers`` nodes, sends
    each node the contiguous chunk ``chunk_sizes`` predicts."""
    config = SimpleNamespace(getvalue=lambda name: [f"{workers}*popen"] if name == "tx" else None)
    sched = WorkStealingScheduling(config)
    nodes = [_Node(f"gw{i}") for i in range(workers)]
    ids = [f"t{i}" for i in range(n)]
    for node in nodes:
        sched.add_node(node)
        sched.add_node_collection(node, ids)
    sched.schedule()
    start = 0
    for node, size in zip(nodes, chunk_sizes(n, workers), strict=True):
        assert node.sent == list(range(start, start + size))
        start += size
    assert start == n


def test_balanced_order_evens_the_chunks_and_keeps_every_test() -> None:
    """Random durations with a few slow tests collected together: the balanced chunks' heaviest load is
    within the slowest test of the ideal mean, far below the collected order's; every test appears once,
    and each chunk runs slowest first."""
    rng = random.Random(0)
    weights = [rng.uniform(60, 90) for _ in range(4)] + [rng.uniform(1, 20) for _ in range(66)]
    workers = 12

    def loads(order: list[int]) -> list[float]:
        out, k = [], 0
        for size in chunk_sizes(len(order), workers):
            out.append(sum(weights[i] for i in order[k : k + size]))
            k += size
        return out

    order = balanced_order(weights, workers)
    assert sorted(order) == list(range(len(weights)))
    mean = sum(weights) / workers
    assert max(loads(order)) <= mean + max(weights)
    assert max(loads(order)) < 0.75 * max(loads(list(range(len(weights)))))
    k = 0
    for size in chunk_sizes(len(order), workers):
        chunk = [weights[i] for i in order[k : k + size]]
        assert chunk == sorted(chunk, reverse=True)
        k += size


def test_known_durations_fill_unlisted_tests_with_the_median_only_for_a_measured_suite(tmp_path) -> None:
    path = tmp_path / "durations.json"
    path.write_text(json.dumps({"measured": "test", "seconds": {"a": 1.0, "b": 3.0, "c": 10.0}}))
    assert known_durations(["a", "x", "c"], path, min_share=0.5) == [1.0, 5.5, 10.0]  # the median of a and c
    assert known_durations(["a", "x", "c"], path) is None  # under 90 % listed (the CPU suite): collected order
    assert known_durations(["a", "b", "c"], path) == [1.0, 3.0, 10.0]
    assert known_durations(["a"], tmp_path / "missing.json") is None


def test_the_shipped_durations_name_collected_gpu_tests(request: pytest.FixtureRequest) -> None:
    """Every test id in ``gpu_durations.json`` is one this suite collects (a renamed test would silently
    lose its weight)."""
    seconds = json.loads(DURATIONS.read_text())["seconds"]
    collected = {item.nodeid for item in request.session.items}
    opt = request.config.option
    if opt.markexpr or opt.keyword or len(collected) < 500:  # a selection, not the whole suite
        pytest.skip("needs the whole suite collected (no -m, -k or file arguments)")
    missing = sorted(set(seconds) - collected)
    assert not missing, f"gpu_durations.json names tests that no longer exist: {missing[:5]}"


def test_durations_from_log_sums_the_phases_of_each_test() -> None:
    log = ("== slowest durations ==\n"
           "12.50s call     tests/a.py::test_x[1]\n"
           "0.30s setup    tests/a.py::test_x[1]\n"
           "4.00s call     tests/b.py::test_y\n"
           "(3 durations < 0.005s hidden.)\n")  # fmt: skip
    assert durations_from_log(log) == {"tests/a.py::test_x[1]": 12.8, "tests/b.py::test_y": 4.0}
