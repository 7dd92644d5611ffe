"""``benchmarks/exp_rope_positions.py`` (an issue-12 experiment) at tiny size: the per-layer errors it compares."""

import torch
from benchmark_scripts import load_benchmark
from tiny_models import tiny_model

from rkv_convert.calibrate.run import CalibrationOptions, calibrate
from rkv_convert.models.adapters import layer_rope
from rkv_convert.quant.codec import folded_head_rotations


def test_layer_errors_compare_learned_and_hadamard_rotations_at_sampled_positions() -> None:
    exp = load_benchmark("exp_rope_positions")
    model = tiny_model("llama", n_kv=2, head_dim=64)
    batches = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    art = calibrate(model, batches, CalibrationOptions(num_samples=4, seqlen=32, batch_size=2, clip_samples=64,
                                                       key_group_size=32, key_layout="folded", rotation_steps=30))
    captured = {}
    exp._run_pass(model, batches, 4, lambda i, q, k, v, h: captured.setdefault(i, (q, k)), "keys", None)
    q, k = captured[0]
    layer, rope = art.layers[0], layer_rope(model)[0]
    learned, hadamard = exp.layer_errors(q, k, layer, art.key_rotation, rope, (0, 512), 32, torch.Generator().manual_seed(1))
    assert 0 < learned < float("inf") and 0 < hadamard < float("inf") and learned != hadamard
    # the same rotation on both sides, the same positions: the same error
    same = {**layer, "key_head_rotation": folded_head_rotations(art.key_rotation, layer["key_perm"], 64)}
    a, b = exp.layer_errors(q, k, same, art.key_rotation, rope, (0, 512), 32, torch.Generator().manual_seed(1))
    assert a == b
    # other positions, other keys: the error moves
    far, _ = exp.layer_errors(q, k, layer, art.key_rotation, rope, (4096, 8192), 32, torch.Generator().manual_seed(1))
    assert far != learned
