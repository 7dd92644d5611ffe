"""Per-layer width allocation: sensitivity runs on a tiny model, and the greedy choice under a budget."""

import math

import pytest
import torch
from tiny_models import tiny_model

from rkv_convert.calibrate.allocate import (
    Sensitivity, allocate_bits, key_bits_by_error, key_bits_for_retrieval, measure_sensitivity,
)
from rkv_convert.calibrate.run import CalibrationOptions, calibrate
from rkv_convert.evaluate.perplexity import perplexity
from rkv_convert.evaluate.schemes import build_scheme
from rkv_convert.export.fuse import fuse_calibration
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
    fuse_calibration(model, artifact)
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


def test_key_bits_for_retrieval_spends_the_same_bits_on_retrieval_layers_first() -> None:
    errors = [[1.0, 0.9, 0.1], [1.0, 0.2, 0.1], [1.0, 0.5, 0.1], [1.0, 0.8, 0.1], [1.0, 0.95, 0.1], [1.0, 0.3, 0.1]]
    induction = [[0.0, 0.5], [0.01, 0.0], [0.05, 0.02], [0.3, 0.2], [0.0, 0.0], [0.09, 0.0]]
    # 3 steps: layer 0 (0.5) to 4 bits (2 steps), layer 3 (0.3) would need 2 more: the last step goes to the
    # largest error drop among the others (layer 1: 0.8)
    assert key_bits_for_retrieval(errors, induction, 2, 3) == [4, 3, 2, 2, 2, 2]
    assert key_bits_for_retrieval(errors, induction, 2, 4) == [4, 2, 2, 4, 2, 2]
    assert key_bits_for_retrieval(errors, induction, 2, 6) == [4, 3, 2, 4, 2, 3]  # then the drops 0.8 and 0.7
    assert key_bits_for_retrieval(errors, induction, 2, 3, threshold=0.6) == key_bits_by_error(errors, 2, 3)
    assert key_bits_for_retrieval(errors, induction, 3, 2) == [4, 3, 3, 4, 3, 3]  # 4 bits at most: one step each
    widths = key_bits_for_retrieval(errors, induction, 2, 5)
    assert sum(w - 2 for w in widths) == 5  # every step spent, as many added bits as --key-bits auto's
    with pytest.raises(ValueError, match="one induction score list per layer"):
        key_bits_for_retrieval(errors, induction[:2], 2, 3)
    with pytest.raises(ValueError, match="--bits 2 or 3"):
        key_bits_for_retrieval(errors, induction, 4, 1)
