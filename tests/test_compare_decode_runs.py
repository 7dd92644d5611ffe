"""``benchmarks/compare_decode_runs.py``: the A/B of two decode kernels from benchmark CSVs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from benchmark_scripts import load_benchmark

COLUMNS = ["shape", "batch", "context", "sdpa_graph_ms", "folded_graph_ms", "graph_speedup_vs_sdpa"]


def _write(path: Path, rows: list[tuple[str, int, int, float, float]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for shape, batch, ctx, sdpa, folded in rows:
            w.writerow([shape, batch, ctx, sdpa, folded, sdpa / folded])
    return path


def test_speedup_is_over_the_mean_of_the_former_runs(tmp_path: Path) -> None:
    mod = load_benchmark("compare_decode_runs")
    former = _write(tmp_path / "a.csv", [("m", 1, 1024, 0.010, 0.020), ("m", 8, 4096, 0.100, 0.050),
                                        ("m", 8, 4096, 0.100, 0.040)])  # the last row of a key wins
    cand = _write(tmp_path / "b.csv", [("m", 8, 4096, 0.100, 0.032), ("m", 1, 1024, 0.010, 0.025)])
    again = _write(tmp_path / "c.csv", [("m", 8, 4096, 0.100, 0.024)])
    rows = mod.compare(mod.read_rows(former), mod.read_rows(cand), mod.read_rows(again))
    assert [r.key for r in rows] == [("m", 1, 1024), ("m", 8, 4096)]
    assert rows[0].former_again_us is None and rows[0].speedup == pytest.approx(20 / 25)
    assert rows[1].speedup == pytest.approx((40 + 24) / 2 / 32)
    assert rows[1].candidate_vs_sdpa == pytest.approx(100 / 32) and rows[1].former_vs_sdpa == pytest.approx(100 / 40)
    text = mod.report(rows)
    assert "median 0.900, min 0.800, max 1.000 over 2 rows" in text and "40.0 %" in text  # former spread 40 vs 24


def test_a_file_that_is_not_a_decode_csv_is_refused(tmp_path: Path) -> None:
    mod = load_benchmark("compare_decode_runs")
    other = tmp_path / "x.csv"
    other.write_text("gpu,rows\nH100,3\n")
    with pytest.raises(ValueError, match="folded_graph_ms"):
        mod.read_rows(other)
