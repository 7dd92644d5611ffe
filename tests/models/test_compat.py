"""The tested transformers range: declared once, pinned in pyproject.toml, enforced at run time."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from rkv_convert.models.compat import (
    ALLOW_UNTESTED_ENV,
    TESTED_TRANSFORMERS,
    UntestedTransformersError,
    check_transformers_version,
)

ROOT = Path(__file__).resolve().parents[2]


def test_installed_transformers_is_inside_the_tested_range() -> None:
    check_transformers_version()


def test_pyproject_pins_the_tested_range() -> None:
    specs = re.findall(r'^\s*"(transformers[^"]*)"', (ROOT / "pyproject.toml").read_text(), re.M)
    low, high = TESTED_TRANSFORMERS
    assert [s.replace(" ", "") for s in specs] == [f"transformers>={low},<={high}"]


def test_ci_runs_the_readme_test_command_and_the_lowest_release() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    test_command = next(line for line in readme.splitlines() if line.startswith("python3 -m venv") and "pytest" in line)
    assert test_command in ci.splitlines()
    low, _ = TESTED_TRANSFORMERS
    assert f'"transformers=={low}"' in ci


@pytest.mark.parametrize("version", ["5.16.1", "5.25.1", "6.0.0"])
def test_releases_outside_the_range_are_refused_with_the_range_and_the_override(version, monkeypatch) -> None:
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    low, high = TESTED_TRANSFORMERS
    with pytest.raises(UntestedTransformersError, match=rf"{re.escape(version)}.*>={low},<={high}.*{ALLOW_UNTESTED_ENV}=1"):
        check_transformers_version(version)
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")
    check_transformers_version(version)


def test_generation_and_calibration_refuse_an_untested_release(monkeypatch) -> None:
    from rkv_fixtures import make_checkpoint
    from tiny_models import tiny_model

    from rkv_convert.calibrate.run import CalibrationOptions, calibrate
    from rkv_convert.models import compat
    from rkv_convert.runtime.generate import RkvModel

    model = tiny_model("llama")
    checkpoint = make_checkpoint(model)
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    # the module object compat reads: importing a modeling file can replace sys.modules["transformers"]
    # (transformers 5.24), so this file's own `transformers` may be another object when run alone
    monkeypatch.setattr(compat.transformers, "__version__", "9.0.0")
    with pytest.raises(UntestedTransformersError, match="9.0.0"):
        RkvModel(model, checkpoint)
    with pytest.raises(UntestedTransformersError, match="9.0.0"):
        calibrate(model, __import__("torch").randint(0, 128, (2, 16)), CalibrationOptions(num_samples=2, seqlen=16))


def test_python_started_in_the_repository_root_imports_hugging_face_kernels() -> None:
    """transformers imports Hugging Face's ``kernels`` package (a requirement from 5.25, optional before). Python
    started in the repository root (``python -m pytest``, a notebook) has the root on ``sys.path``, so the root's
    ``kernels/`` folder must not be a package of that name: it holds no ``__init__.py`` (the Triton kernels live in
    ``kernels/rkv_kernels/``, installed as ``rkv_convert.kernels``)."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    probe = ("import importlib.util, transformers.activations; s = importlib.util.find_spec('kernels'); "
             "print(s.origin if s is not None else None)")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    origin = run.stdout.strip().splitlines()[-1]
    assert origin in ("None", "") or not Path(origin).resolve().is_relative_to(ROOT / "kernels"), origin
