"""Test-wide setup: Triton interpreter on machines without CUDA, seeding, the ``gpu`` marker.

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
