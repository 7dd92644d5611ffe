"""``benchmarks/key_scale_sweep.py`` end to end at tiny size: the user's commands per exponent and export variant,
then its scores."""

import csv
import subprocess
import sys
from pathlib import Path

from tiny_models import save_tiny_model

from rkv_convert.calibrate.artifact import load_artifact

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "key_scale_sweep.py"


def test_sweep_calibrates_exports_and_scores_each_exponent(tmp_path, pipeline_texts) -> None:
    model = save_tiny_model(tmp_path / "model", "llama", n_kv=2)
    _, evaltext = pipeline_texts
    out = tmp_path / "sweep.csv"
    run = subprocess.run([sys.executable, str(SCRIPT), "--model", str(model), "--text", str(evaltext), "--exponents",
                          "0,1", "--lengths", "64", "--windows", "2", "--dev-windows", "1", "--work", str(tmp_path / "w"),
                          "--device", "cpu", "--csv", str(out), "--export-variants", ";--group-ranges searched"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert [(r["exponent"], r["group_ranges"], r["text"], r["protocol"]) for r in rows] == [
        (e, ranges, text, p) for e in ("0.0", "1.0") for ranges in ("minmax", "searched")
        for text, protocols in (("pydoc dev", ("sinks", "oneshot", "deployed")), ("eval.txt", ("oneshot", "deployed")))
        for p in protocols
    ]  # fmt: skip
    assert all(float(r["ppl"]) > 1 and float(r["fp_ppl"]) > 1 for r in rows)
    assert load_artifact(tmp_path / "w" / "cal_0").key_scales is None
    assert load_artifact(tmp_path / "w" / "cal_1").key_scales is not None
