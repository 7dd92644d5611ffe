"""Where the GPU suite's time goes: every Triton compile with its seconds, per test (a pytest plugin), and a summary.

The GPU suite is bound by Triton compiling on the host's CPU cores (``README``: ``pytest -m gpu``). Loaded as a
plugin, this module registers Triton's compilation listener and appends one JSON line per compile (kernel, stage
seconds, launch warps, the test that triggered it) and one per test call (its seconds) to a file per worker::

    COMPILE_LOG_DIR=/tmp/compiles PYTHONPATH=benchmarks python -m pytest -p triton_compile_log -m gpu -n 16 \\
        --dist worksteal -q
    python benchmarks/triton_compile_log.py /tmp/compiles      # the slowest compiles and tests, seconds per kernel

Without ``COMPILE_LOG_DIR`` the plugin does nothing. Compile seconds measured beside other workers include their
contention for the CPU cores.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time
from pathlib import Path

import pytest

_state: dict[str, str | None] = {"test": None, "out": None}


def _listener(*, src, metadata, metadata_group, times, cache_hit) -> None:
    """Triton's ``knobs.compilation.listener``: one line per compile (cache misses only reach it)."""
    record = {"test": _state["test"], "kernel": getattr(getattr(src, "fn", None), "__name__", type(src).__name__),
              "seconds": times.total / 1e6, "stages": {k: v / 1e6 for k, v in times.lowering_stages},
              "num_warps": metadata.get("num_warps"), "pid": os.getpid()}  # fmt: skip
    _append(record)


def _append(record: dict) -> None:
    with open(_state["out"], "a") as f:
        f.write(json.dumps(record) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    folder = os.environ.get("COMPILE_LOG_DIR")
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    _state["out"] = os.path.join(folder, f"compiles_{os.getpid()}.jsonl")
    import triton

    triton.knobs.compilation.listener = _listener


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    _state["test"] = item.nodeid
    start = time.time()
    yield
    if _state["out"]:
        _append({"test": item.nodeid, "call_seconds": time.time() - start, "pid": os.getpid()})


def summarize(folder: Path, top: int) -> None:
    """Print the ``top`` slowest compiles and tests and the compile seconds per kernel."""
    records = [json.loads(line) for f in sorted(folder.glob("compiles_*.jsonl")) for line in f.read_text().splitlines()]
    compiles = [r for r in records if "kernel" in r]
    tests = [r for r in records if "call_seconds" in r]
    if not compiles and not tests:
        raise SystemExit(f"{folder}: no compiles_*.jsonl records (run pytest with COMPILE_LOG_DIR set, see --help)")
    by_test = collections.defaultdict(list)
    for r in compiles:
        by_test[r["test"]].append(r["seconds"])
    print(f"{len(compiles)} compiles, {sum(r['seconds'] for r in compiles):.1f} s; {len(tests)} tests, "
          f"{sum(r['call_seconds'] for r in tests):.1f} s in their calls")
    print("\nslowest compiles:")
    for r in sorted(compiles, key=lambda r: -r["seconds"])[:top]:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
        print(f"  {r['seconds']:6.1f} s  {r['kernel']} ({r['num_warps']} warps; {stages})  {r['test']}")
    print("\nslowest tests (seconds in compiles):")
    for r in sorted(tests, key=lambda r: -r["call_seconds"])[:top]:
        spent = by_test.get(r["test"], [])
        print(f"  {r['call_seconds']:6.1f} s  ({sum(spent):5.1f} s in {len(spent)})  {r['test']}")
    print("\ncompile seconds per kernel:")
    per_kernel = collections.defaultdict(list)
    for r in compiles:
        per_kernel[r["kernel"]].append(r["seconds"])
    for name, secs in sorted(per_kernel.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {sum(secs):7.1f} s  {len(secs):3d} compiles  {name}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path, help="the COMPILE_LOG_DIR of a pytest run with this plugin")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    summarize(args.folder, args.top)


if __name__ == "__main__":
    main()
