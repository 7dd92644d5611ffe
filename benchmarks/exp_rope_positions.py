"""Experiment (issue 12): is a folded calibration good at the RoPE positions it never saw?

The folded layout caches post-RoPE keys ``RoPE_n(k - mu)``, so the learned rotations, clips and ranges a
calibration fits depend on the positions ``n`` its keys were observed at. This takes the pre-RoPE keys and queries
of a few development windows (the last windows of ``pydoc``, as the defaults' rule), puts each centred key at a
random position in each span, and prints, per span, the calibration's own objective (the query-weighted key error
of :func:`rkv_convert.calibrate.rotation.weighted_error`, 2 bits, the layer's clip) for the learned rotations
against the Hadamard they started from. A ratio that climbs towards 1 for far spans means the learned rotations fit
the calibration window's angles, not the keys.

    python benchmarks/exp_rope_positions.py rkv-out/calibration --spans 0:512,0:1024,4096:8192
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import report_row  # noqa: E402

from rkv_convert.calibrate import search  # noqa: E402
from rkv_convert.calibrate.artifact import load_artifact  # noqa: E402
from rkv_convert.calibrate.rotation import weighted_error  # noqa: E402
from rkv_convert.calibrate.run import _query_energy, _run_pass  # noqa: E402
from rkv_convert.calibration_data.sources import development_windows, load_text  # noqa: E402
from rkv_convert.models.adapters import layer_rope  # noqa: E402
from rkv_convert.models.loading import load_model  # noqa: E402
from rkv_convert.quant.codec import folded_head_rotations  # noqa: E402
from rkv_convert.runtime.ops import rope  # noqa: E402


def _span(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(":"))
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"a span is LO:HI with 0 <= LO < HI, got {text!r}")
    return lo, hi


def layer_errors(q: torch.Tensor, k: torch.Tensor, layer: dict[str, torch.Tensor], key_rotation: torch.Tensor,
                 rope_params: tuple[torch.Tensor, float], span: tuple[int, int], group_size: int,
                 generator: torch.Generator) -> tuple[float, float]:  # fmt: skip
    """``(learned, Hadamard)`` weighted key error of one layer's keys ``k [B, n_kv, T, d]`` (queries ``q``) RoPE'd at
    positions drawn from ``span``, with the artifact's key scale, mean, key groups and 2-bit clip."""
    _, n_kv, _, d = k.shape
    kf, energy = k.float(), _query_energy(q, n_kv).float() / (q.shape[0] * q.shape[2])  # as the calibrator weighs
    scale = layer.get("key_scale")
    if scale is not None:  # keys times the scale, queries times its inverse (calibrate.key_scale)
        kf = kf * scale.view(1, n_kv, 1, d)
        energy = energy / scale.pow(2)
    centred = kf - layer["key_mean"].view(1, n_kv, 1, d)
    pos = torch.randint(*span, (k.shape[0], k.shape[2]), generator=generator)
    x = rope(centred, pos, *rope_params)
    w = search.rope_pair_weights(energy, d).reshape(n_kv, d)
    clip = float(layer["key_clip_by_bits"][0])
    hadamard = folded_head_rotations(key_rotation, layer["key_perm"], d)
    errors = []
    for rotation in (layer["key_head_rotation"], hadamard):
        errors.append(sum(weighted_error(x[:, h].reshape(-1, d), rotation[h].float(), w[h], 2, group_size, clip)
                          for h in range(n_kv)))  # fmt: skip
    return errors[0], errors[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("calibration", type=Path, help="a folded calibration artifact with learned rotations")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--spans", default="0:512,0:1024,4096:8192", help="comma-separated LO:HI position spans")
    p.add_argument("--dev-windows", type=int, default=2, help="development windows of 1,024 tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", type=Path, default=None)
    args = p.parse_args()
    spans = [_span(s) for s in args.spans.split(",")]
    art = load_artifact(args.calibration)
    if "key_head_rotation" not in art.layers[0]:
        raise SystemExit(f"{args.calibration} has no learned rotations (calibrate with the folded layout's defaults)")
    loaded = load_model(args.model, torch.float32, "cpu")
    ids = development_windows(load_text("pydoc"), loaded.tokenizer, args.dev_windows, 1024)
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    _run_pass(loaded.model, ids, args.dev_windows, lambda i, q, k, v, h: captured.setdefault(i, (q, k)), "keys", None)
    ropes = layer_rope(loaded.model)
    generator = torch.Generator().manual_seed(args.seed)
    for lo, hi in spans:
        ratios = []
        total = [0.0, 0.0]
        for i, (q, k) in sorted(captured.items()):
            learned, hadamard = layer_errors(q, k, art.layers[i], art.key_rotation, ropes[i], (lo, hi),
                                             art.meta["options"]["key_group_size"], generator)  # fmt: skip
            ratios.append(learned / hadamard)
            total = [total[0] + learned, total[1] + hadamard]
        ratios.sort()
        report_row("learned / Hadamard key error by RoPE position span", {
            "calibration": str(args.calibration), "rope_span": art.meta["options"].get("rope_span", 0),
            "positions": f"{lo}-{hi}", "ratio_all_layers": total[0] / total[1], "layer_min": ratios[0],
            "layer_median": ratios[len(ratios) // 2], "layer_max": ratios[-1]}, args.csv)  # fmt: skip


if __name__ == "__main__":
    main()
