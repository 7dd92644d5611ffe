"""Experiment (issue 12): which side of the cache loses the pass key, keys or values, and in which layers.

Runs `rkv eval --task passkey`'s evaluation-quantizer path (deployed protocol, as ``rotatekv-eval``) on an
exported checkpoint as exported, and on variants where the keys or the values of chosen layers are stored at
8 bits (groups as exported, clip 1, fp16 scale and zero: near lossless), so the gap each side leaves shows;
or where every group picks its own range at encode time (``exp_group_range_search.py``'s encoder, same bits).

    python benchmarks/exp_passkey_precision.py CK --length 2048 --trials 50 \
        --variants exported,keys8,values8,keys8@17-18-20-21-22-23-24

Variants: ``exported``; ``keys8`` / ``values8`` / ``both8`` (every layer); ``keys8@L-L-...`` and the like (those
layers only); ``search-keys`` / ``search-values`` / ``search-both`` (every layer, ``--grid`` fractions; folded
checkpoints). ``--length`` takes a comma-separated list. The filler is ``pydoc``, as in `rkv eval --task
passkey` (never an evaluation text).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import print_table, report_row  # noqa: E402

from rkv_convert.calibration_data.sources import load_text  # noqa: E402
from rkv_convert.evaluate.passkey import PasskeyOptions, build_trials, score_scheme  # noqa: E402
from rkv_convert.evaluate.schemes import RotateKV, build_scheme  # noqa: E402
from rkv_convert.export.format import Checkpoint, read_checkpoint  # noqa: E402
from exp_group_range_search import SearchedKeys, SearchedValues, with_search  # noqa: E402

SIDES = {"keys8": (True, False), "values8": (False, True), "both8": (True, True)}
SEARCHED = {"search-keys": (True, False), "search-values": (False, True), "search-both": (True, True)}
GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # the 6-fraction grid: most of the 11-fraction grid's one-shot gain


def variant_scheme(checkpoint: Checkpoint, variant: str, grid: tuple[float, ...] = GRID) -> RotateKV:
    """The checkpoint's RotateKV scheme as exported, with ``variant``'s layers (all, or those after ``@``) at
    8 bits on the named side(s), or (``search-*``) every layer's named side(s) encoded with per-group ranges
    searched over ``grid``."""
    base = build_scheme("rotatekv", None, checkpoint)
    if variant == "exported":
        return base
    if variant in SEARCHED:
        if not checkpoint.config.folded:
            raise ValueError(f"variant {variant!r} needs a folded-key checkpoint (rkv calibrate's default)")
        keys, values = SEARCHED[variant]
        return RotateKV(name=base.name, bits=base.bits,
                        key_codecs=[with_search(c, SearchedKeys, grid) if keys else c for c in base.key_codecs],
                        value_codecs=[with_search(c, SearchedValues, grid) if values else c
                                      for c in base.value_codecs])  # fmt: skip
    side, _, spec = variant.partition("@")
    if side not in SIDES:
        raise ValueError(f"unknown variant {variant!r}: exported, {', '.join(SIDES)} (optionally @L-L-..., layers), "
                         f"{', '.join(SEARCHED)}")
    n = len(base.key_codecs)
    layers = set(range(n)) if not spec else {int(x) for x in spec.split("-")}
    if not layers <= set(range(n)):
        raise ValueError(f"variant {variant!r} names layers outside 0..{n - 1}")
    keys, values = SIDES[side]

    def eight(codec, raise_it: bool):
        return dataclasses.replace(codec, bits=8, clip=1.0, meta_base=None) if raise_it else codec

    return RotateKV(name=base.name, bits=base.bits,
                    key_codecs=[eight(c, keys and i in layers) for i, c in enumerate(base.key_codecs)],
                    value_codecs=[eight(c, values and i in layers) for i, c in enumerate(base.value_codecs)])  # fmt: skip


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--length", default="2048", help="prompt length(s) in tokens, comma-separated")
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="exported,keys8,values8")
    p.add_argument("--grid", default=",".join(map(str, GRID)), help="range fractions of the search-* variants")
    p.add_argument("--device", default="cpu")
    p.add_argument("--csv", type=Path, default=None)
    args = p.parse_args()
    ck = read_checkpoint(args.checkpoint)
    variants = args.variants.split(",")
    lengths = tuple(int(n) for n in args.length.split(","))
    grid = tuple(float(f) for f in args.grid.split(","))
    if not all(0.0 < f <= 1.0 for f in grid):
        raise SystemExit(f"--grid fractions must lie in (0, 1], got {args.grid}")
    schemes = {v: variant_scheme(ck, v, grid) for v in variants}  # bad names fail before the model loads
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval().to(args.device)
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    options = PasskeyOptions(lengths=lengths, trials=args.trials, seed=args.seed)
    trials = build_trials(tok, load_text("pydoc"), options)
    rows = []
    for length in lengths:
        for v in variants:
            r = score_scheme(model, tok, ck, schemes[v], v, trials[length], options)
            row = {"variant": v, "length": length, "trials": r.trials, "correct": r.correct,
                   "accuracy": r.accuracy, "seconds": r.seconds, "device": r.device}  # fmt: skip
            rows.append(row)
            report_row("passkey by stored precision", row, args.csv)
    print_table(f"passkey by stored precision ({args.checkpoint.name})", rows)


if __name__ == "__main__":
    main()
