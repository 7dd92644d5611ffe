"""Order tests so that pytest-xdist's workers start with balanced loads (what the GPU suite needs).

``pytest -n W --dist worksteal`` splits the collected tests into W contiguous chunks, one per worker
(``remaining // workers_left`` tests each, in turn); an idle worker later takes the unstarted tail of
the longest queue. A test that has started cannot move, so a chunk that holds several slow tests sets
the wall time: on an H200 the five decode-kernel chunk tests, collected together, made one worker's
chunk 130 s of a suite whose tests sum to 981 s (82 s per worker).

:func:`balanced_order` fills the chunks from measured durations (``gpu_durations.json``): slowest test
first, each into the chunk with the least load that has room left; every chunk runs slowest first, so
that what others may steal is its quick tail. Only the order changes, never what runs, and only for a run
whose tests are nearly all measured (the GPU suite): other runs keep the collected order, in which a module's
tests stay together and share their fixtures.

Refresh the durations after adding or renaming GPU tests (a test the file does not name weighs the median)::

    python -m pytest -m gpu -n 12 --dist worksteal -q --durations=0 > gpu.log
    python tests/xdist_balance.py gpu.log "one NVIDIA H200, <date>, cold Triton cache"
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

__all__ = ["DURATIONS", "chunk_sizes", "balanced_order", "known_durations", "durations_from_log"]

DURATIONS = Path(__file__).with_name("gpu_durations.json")


def chunk_sizes(n: int, workers: int) -> list[int]:
    """How many of ``n`` tests each of ``workers`` chunks gets (xdist's first split: ``left // workers_left``)."""
    sizes, left = [], n
    for i in range(workers):
        sizes.append(left // (workers - i))
        left -= sizes[-1]
    return sizes


def balanced_order(weights: Sequence[float], workers: int) -> list[int]:
    """Indices of the tests, reordered so that each of the ``workers`` chunks holds about the same weight."""
    sizes = chunk_sizes(len(weights), workers)
    chunks: list[list[int]] = [[] for _ in sizes]
    load = [0.0] * len(sizes)
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        c = min((c for c in range(len(sizes)) if len(chunks[c]) < sizes[c]), key=lambda c: (load[c], c))
        chunks[c].append(i)
        load[c] += weights[i]
    return [i for chunk in chunks for i in chunk]


def known_durations(node_ids: Sequence[str], path: Path = DURATIONS, min_share: float = 0.9) -> list[float] | None:
    """Seconds per test from ``path`` (unlisted tests: the median of the listed ones); None unless at least
    ``min_share`` of the tests are listed: a run of other tests (the CPU suite) keeps its collected order, whose
    contiguous modules share their fixtures."""
    if not path.is_file() or not node_ids:
        return None
    seconds: dict[str, float] = json.loads(path.read_text())["seconds"]
    listed = [seconds[n] for n in node_ids if n in seconds]
    if len(listed) < min_share * len(node_ids):
        return None
    typical = statistics.median(listed)
    return [seconds.get(n, typical) for n in node_ids]


def durations_from_log(text: str) -> dict[str, float]:
    """Seconds per test id (setup + call + teardown) from the ``--durations=0`` report of a pytest run."""
    seconds: dict[str, float] = defaultdict(float)
    for m in re.finditer(r"^([0-9.]+)s (?:call|setup|teardown)\s+(\S+)$", text, re.MULTILINE):
        seconds[m.group(2)] += float(m.group(1))
    return {k: round(v, 1) for k, v in sorted(seconds.items())}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python tests/xdist_balance.py PYTEST_LOG 'where and when it was measured'")
    measured = durations_from_log(Path(sys.argv[1]).read_text())
    if not measured:
        sys.exit(f"{sys.argv[1]} holds no --durations=0 report: run pytest with --durations=0")
    DURATIONS.write_text(json.dumps({"measured": sys.argv[2], "seconds": measured}, indent=1) + "\n")
    print(f"{DURATIONS}: {len(measured)} tests, {sum(measured.values()):.0f} s")
