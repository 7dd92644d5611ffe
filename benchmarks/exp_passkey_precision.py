"""Experiment (issue 12): which side of the cache loses the pass key, keys or values, and in which layers.

Runs `rkv eval --task passkey`'s evaluation-quantizer path (deployed protocol, as ``rotatekv-eval``) on an
exported checkpoint as exported, and on variants where the keys or the values of chosen layers are stored at
8 bits (groups as exported, clip 1, fp16 scale and zero: near lossless), so the gap each side leaves shows.

    python benchmarks/exp_passkey_precision.py CK --length 2048 --trials 50 \
        --variants exported,keys8,values8,keys8@17-18-20-21-22-23-24

Variants: ``exported``; ``keys8`` / ``values8`` / ``both8`` (every layer); ``keys8@L-L-...`` and the like (those
layers only). The filler is ``pydoc``, as in `rkv eval --task passkey` (never an evaluation text).
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

SIDES = {"keys8": (True, False), "values8": (False, True), "both8": (True, True)}


def variant_scheme(checkpoint: Checkpoint, variant: str) -> RotateKV:
    """The checkpoint's RotateKV scheme as exported, with ``variant``'s layers (all, or those after ``@``) at
    8 bits on the named side(s)."""
    base = build_scheme("rotatekv", None, checkpoint)
    if variant == "exported":
        return base
    side, _, spec = variant.partition("@")
    if side not in SIDES:
        raise ValueError(f"unknown variant {variant!r}: exported, {', '.join(SIDES)}, optionally @L-L-... (layers)")
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
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="exported,keys8,values8")
    p.add_argument("--device", default="cpu")
    p.add_argument("--csv", type=Path, default=None)
    args = p.parse_args()
    ck = read_checkpoint(args.checkpoint)
    variants = args.variants.split(",")
    schemes = {v: variant_scheme(ck, v) for v in variants}  # bad names fail before the model loads
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval().to(args.device)
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    options = PasskeyOptions(lengths=(args.length,), trials=args.trials, seed=args.seed)
    trials = build_trials(tok, load_text("pydoc"), options)[args.length]
    rows = []
    for v in variants:
        r = score_scheme(model, tok, ck, schemes[v], v, trials, options)
        row = {"variant": v, "length": args.length, "trials": r.trials, "correct": r.correct,
               "accuracy": r.accuracy, "seconds": r.seconds, "device": r.device}  # fmt: skip
        rows.append(row)
        report_row("passkey by stored precision", row, args.csv)
    print_table(f"passkey by stored precision ({args.checkpoint.name}, {args.length} tokens)", rows)


if __name__ == "__main__":
    main()
