"""Test-wide setup: Triton interpreter on machines without CUDA, seeding, the ``gpu`` marker, the test order
under pytest-xdist.

Triton decides at import time whether ``@triton.jit`` functions run compiled or in its CPU
interpreter, so ``TRITON_INTERPRET=1`` is set here, before any test module imports
``triton``, whenever no CUDA device is present. Under the interpreter the kernels'
``backend="auto"`` dispatch runs the Triton kernels on CPU tensors (slow): tests of larger
pipelines that only need the semantics should pass ``backend="reference"``.
"""

from __future__ import annotations

import os

import pytest
import torch
from xdist_balance import balanced_order, known_durations

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def pipeline_texts(tmp_path_factory) -> tuple:
    """``(calibration, evaluation)`` text files for the CLI pipeline tests of tiny models."""
    root = tmp_path_factory.mktemp("texts")
    calib, evaltext = root / "calib.txt", root / "eval.txt"
    calib.write_text("\n\n".join(f"The cache stores key {i} and value {i * 7} in two bits." for i in range(400)))
    evaltext.write_text(" ".join(f"word{i % 37} follows word{(i * 5) % 37}." for i in range(600)))
    return calib, evaltext


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.hookimpl(trylast=True)  # after ``-m``/``-k`` deselection: orders what runs
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests without CUDA; in a pytest-xdist worker, order the tests so that every worker's
    first chunk holds about the same measured time (``xdist_balance``: the GPU suite, whose durations are
    measured; only the order changes)."""
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
    workers = getattr(config, "workerinput", {}).get("workercount")
    weights = known_durations([item.nodeid for item in items]) if workers else None
    if weights is not None:
        items[:] = [items[i] for i in balanced_order(weights, workers)]
