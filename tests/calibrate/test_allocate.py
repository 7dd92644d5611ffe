"""Per-layer width allocation: sensitivity runs on a tiny model, and the greedy choice under a budget."""

import math

import pytest
import torch
from tiny_models import tiny_model

from rkv_convert.calibrate.allocate import key_bits_by_error, Sensitivity, allocate_bits, measure_sensitivity
from rkv_convert.calibrate.run import CalibrationOptions, calibrate
from rkv_convert.evaluate.perplexity import perplexity
from rkv_convert.evaluate.schemes import build_scheme
from rkv_convert.export.fuse import fuse_value_rotation
from rkv_convert.export.writer import checkpoint_from_artifact


def test_allocation_follows_gain_and_keeps_the_budget() -> None:
    s = Sensitivity(low=2, high=3, base_nll=3.0, key_gain=[0.05, 0.01, -0.02, 0.03], value_gain=[0.002, 0.04, 0.0, 0.001])
    # 4 layers, g=64: all at 2 bits = 2.5; each raised pair adds 1/8 bit per element on average
    a = allocate_bits(s, 2.75, 64, 64)
    assert a.raised == ["k0", "v1"] and a.key_bits == [3, 2, 2, 2] and a.value_bits == [2, 3, 2, 2]
    assert a.bits_per_element == pytest.approx(2.75)
    b = allocate_bits(s, 10.0, 64, 64)  # a large budget still raises only pairs that gained
    assert b.raised == ["k0", "v1", "k3", "k1", "v0", "v3"] and b.key_bits[2] == 2 and b.value_bits[2] == 2
    assert allocate_bits(s, 2.6, 64, 64).raised == []
    with pytest.raises(ValueError, match="below every layer at 2 bits"):
        allocate_bits(s, 2.4, 64, 64)


def test_sensitivity_runs_on_a_tiny_model() -> None:
    model = tiny_model("llama", n_kv=2)
    artifact = calibrate(model, torch.randint(0, 128, (2, 64)), CalibrationOptions(num_samples=2, seqlen=64, batch_size=2))
    fuse_value_rotation(model, artifact.value_rotation)
    dev = torch.randint(0, 128, (2, 48))
    seen = []

    def at(kb, vb):
        seen.append((list(kb), list(vb)))
        return checkpoint_from_artifact(artifact, 2, key_bits=kb, value_bits=vb)

    s = measure_sensitivity(model, dev, at, 2, protocol="oneshot", batch_size=2)
    assert seen == [([2, 2], [2, 2]), ([3, 2], [2, 2]), ([2, 3], [2, 2]), ([2, 2], [3, 2]), ([2, 2], [2, 3])]
    ck = at([2, 3], [2, 2])
    raised = math.log(perplexity(model, dev, build_scheme("rotatekv", None, ck), "oneshot", ck).perplexity)
    assert s.key_gain[1] == pytest.approx(s.base_nll - raised, abs=1e-6)
    assert len(s.value_gain) == 2 and s.tokens == dev.numel()


def test_key_bits_by_error_raises_the_layers_that_gain_most() -> None:
    errors = [[4.0, 3.5, 3.4], [9.0, 2.0, 1.0], [1.0, 0.9, 0.8], [5.0, 1.0, 0.5]]  # gains at 2 -> 3 bits: 0.5, 7, 0.1, 4
    assert key_bits_by_error(errors, 2, 2) == [2, 3, 2, 3]
    assert key_bits_by_error(errors, 3, 1) == [3, 4, 3, 3]  # gains at 3 -> 4 bits: 0.1, 1, 0.1, 0.5
    assert key_bits_by_error(errors, 2, 0) == [2, 2, 2, 2]
    assert key_bits_by_error([[1.0, 0.5, 0.1]] * 3, 2, 2) == [3, 3, 2]  # ties: lower layers first
    with pytest.raises(ValueError, match="--bits 2 or 3"):
        key_bits_by_error(errors, 4, 1)
    with pytest.raises(ValueError, match="cannot raise 5 of 4"):
        key_bits_by_error(errors, 2, 5)
