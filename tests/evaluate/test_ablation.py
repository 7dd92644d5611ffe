import dataclasses
import math

import pytest
import torch
from tiny_models import tiny_model

from rkv_convert.calibrate.run import CalibrationOptions
from rkv_convert.evaluate.ablation import run_ablation
from rkv_convert.evaluate.ablation_report import markdown_table
from rkv_convert.evaluate.domains import package_docs_text
from rkv_convert.evaluate.schemes import RotateKVSourceValues
from rkv_convert.evaluate.variants import SELECTION, Variant, default_variants
from rkv_convert.quant.codec import ValueCodec
from rkv_convert.quant.hadamard import hadamard_matrix
from rkv_convert.quant.quantizer import fake_quantize


def test_source_values_are_quantized_before_the_value_rotation() -> None:
    """The "no value rotation" row: values turned back to the source basis, quantized per token there, turned forward
    (each KV head by its own rotation, as learned value rotations are)."""
    rotation = torch.stack([hadamard_matrix(16), torch.linalg.qr(torch.randn(16, 16))[0], hadamard_matrix(16).T])
    source = torch.randn(2, 3, 5, 16)  # [B, H, T, d]
    rotated = torch.einsum("bhtd,hde->bhte", source, rotation)
    scheme = RotateKVSourceValues(value_codecs=[ValueCodec(2, 16, 1.0)], value_rotations=[rotation])
    expected = torch.einsum("bhtd,hde->bhte", fake_quantize(source.transpose(1, 2).reshape(2, 5, 48), 2, 16)
                            .reshape(2, 5, 3, 16).transpose(1, 2), rotation)  # fmt: skip
    torch.testing.assert_close(scheme.values(0, rotated), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, rotated, atol=1e-2)  # 2 bits do change the values


def test_variant_rows_leave_out_the_default_itself() -> None:
    mse = [v.name for v in default_variants(CalibrationOptions(clip_objective="mse"))]
    assert len(mse) == len(set(mse))
    assert "clip searched by key MSE" not in mse and "clip searched by q·k error" in mse
    other = [v.name for v in default_variants(CalibrationOptions(clip_objective="qk", perm_statistic="rms"))]
    assert "clip searched by key MSE" in other and "permutation by rms" not in other


def test_small_ablation_runs_end_to_end() -> None:
    model = tiny_model("llama", n_kv=2, head_dim=64)
    cal = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    windows = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1))
    variants = [
        Variant("fp", "baseline", scheme="fp", protocols=("oneshot",)),
        Variant("kivi+sinks", "baseline", scheme="kivi", protocols=("sinks", "deployed")),
        Variant("RotateKV default", "default", recent_window=16),
        Variant("no value rotation", "value rotation", value_rotation=False, recent_window=16),
        Variant("permutation by rms", "permutation", {"perm_statistic": "rms"}, recent_window=16),
        Variant("keys +1", "key/value bits", key_extra_bits=1, protocols=("oneshot",)),
        Variant("allocated", "bit allocation", allocation_extra=0.25, protocols=("oneshot",)),
    ]
    options = CalibrationOptions(num_samples=4, seqlen=32, batch_size=2, clip_samples=64, key_layout="prerope")
    rows, chosen, trail = run_ablation(model, cal, {"t": (windows, variants)}, (2,), 2, options, log=lambda m: None,
                                       dev_windows=windows[:1])
    assert len(trail) == sum(len(values) for _, values in SELECTION)
    assert set(chosen) <= {option for option, _ in SELECTION}
    assert len(rows) == 1 + 2 + 3 * 3 + 2
    by_name = {r["variant"]: r for r in rows if r["protocol"] == "oneshot"}
    assert (by_name["keys +1"]["key_bits"], by_name["keys +1"]["value_bits"]) == (3.5, 2.5)
    allocated = by_name["allocated"]
    assert (allocated["key_bits"] + allocated["value_bits"]) / 2 <= 2.5 + 0.25 + 1e-9
    assert all(math.isfinite(r["ppl"]) and r["ratio_fp"] > 0 for r in rows)
    assert {r["protocol"] for r in rows if r["variant"] == "RotateKV default"} == {"oneshot", "sinks", "deployed"}
    table = markdown_table(rows, "t", (2,))
    assert "| RotateKV default |" in table and "2b deployed" in table


def test_package_docs_text_reads_metadata_bodies(tmp_path) -> None:
    for name, body in (("b-1.0", "B" * 600), ("a-1.0", "A" * 600), ("c-1.0", "A" * 600), ("d-1.0", "short")):
        (tmp_path / f"{name}.dist-info").mkdir()
        (tmp_path / f"{name}.dist-info" / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\n\n{body}\n")
    text = package_docs_text(tmp_path)
    assert text == "A" * 600 + "\n\n" + "B" * 600  # sorted, duplicate and short bodies dropped


def test_variant_names_have_no_commas() -> None:
    """benchmarks/accuracy_ablation.py --only takes a comma list of names."""
    from rkv_convert.evaluate.variants import long_context_variants, second_domain_variants

    names = [v.name for make in (default_variants, second_domain_variants, long_context_variants) for v in make()]
    assert names and not [n for n in names if "," in n]


def test_every_variants_options_are_valid_calibration_options() -> None:
    """Each row's calibration overrides, on the ablation's base, pass the calibrator's own checks (a row that could
    only fail after the earlier rows' calibrations would waste a long run)."""
    from rkv_convert.calibrate.run import _validate
    from rkv_convert.evaluate.variants import ABLATION_BASE, long_context_variants, second_domain_variants

    shape = {"num_key_value_heads": 3, "head_dim": 64}  # SmolLM2-135M, the ablation's model
    rows = [v for make in (default_variants, second_domain_variants, long_context_variants) for v in make()]
    assert any(v.options.get("rope_span") for v in rows)
    for v in rows:
        _validate(dataclasses.replace(ABLATION_BASE, **v.options), shape)
