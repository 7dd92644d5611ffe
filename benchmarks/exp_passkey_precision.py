"""Experiment (issue 12): which side of the cache loses the pass key, keys or values, and in which layers.

Runs `rkv eval --task passkey`'s evaluation-quantizer path (deployed protocol, as ``rotatekv-eval``) on an
exported checkpoint as exported, and on variants where the keys or the values of chosen layers are stored at
8 bits (groups as exported, clip 1, fp16 scale and zero: near lossless), so the gap each side leaves shows;
or where every group picks its own range at encode time (``exp_group_range_search.py``'s encoder, same bits).

    python benchmarks/exp_passkey_precision.py CK --length 2048 --trials 50 \
        --variants exported,keys8,values8,keys8@17-18-20-21-22-23-24

Variants: ``exported``; ``keys8`` / ``values8`` / ``both8`` (every layer); ``keys8@L-L-...`` and the like (those
layers only); ``search-keys`` / ``search-values`` / ``search-both`` (every layer, ``--grid`` fractions; folded
checkpoints); ``needle-keys`` / ``needle-values`` / ``needle-both``: as exported, but the needle sentence's own
tokens read back in full precision on the named side(s) (an oracle: is the loss in the needle's codes, or in the
thousands of filler keys around it?); ``salient-N``: as exported with ``salient_tokens = N`` (``rkv export
--salient-tokens N``: the ``N`` prompt tokens per sequence and layer that the prompt's last tokens attend to
most, kept in full precision; ``rkv_convert.runtime.salient``). ``--length`` takes a comma-separated list.
The filler is ``pydoc``, as in `rkv eval --task passkey` (never an evaluation text).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import print_table, report_row  # noqa: E402

from rkv_convert.calibration_data.sources import load_text  # noqa: E402
from rkv_convert.evaluate.passkey import (  # noqa: E402
    NEEDLE, PasskeyOptions, PasskeyResult, PasskeyTrial, _template_parts, build_trials, score_scheme,
)
from rkv_convert.evaluate.schemes import RotateKV, Scheme, build_scheme  # noqa: E402
from rkv_convert.export.format import Checkpoint, read_checkpoint  # noqa: E402
from exp_group_range_search import SearchedKeys, SearchedValues, with_search  # noqa: E402

SIDES = {"keys8": (True, False), "values8": (False, True), "both8": (True, True)}
NEEDLE_KEPT = {"needle-keys": (True, False), "needle-values": (False, True), "needle-both": (True, True)}
SEARCHED = {"search-keys": (True, False), "search-values": (False, True), "search-both": (True, True)}
GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # the 6-fraction grid: most of the 11-fraction grid's one-shot gain


@dataclass
class NeedleKept(Scheme):
    """``base`` with the tokens of ``spans`` (one ``(start, stop)`` per sequence of the batch, set before each
    batch) read back in full precision on the named side(s)."""

    base: Scheme = field(default_factory=Scheme)
    keep_keys: bool = True
    keep_values: bool = True
    spans: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name, self.bits, self.uses_sinks = self.base.name, self.base.bits, self.base.uses_sinks

    def _mask(self, t: int, device: torch.device) -> torch.Tensor:
        pos = torch.arange(t, device=device)
        return torch.stack([(pos >= a) & (pos < b) for a, b in self.spans])[:, None, :, None]  # [B, 1, T, 1]

    def keys(self, layer, k_pre, cos, sin):
        k = self.base.keys(layer, k_pre, cos, sin)
        return torch.where(self._mask(k.shape[2], k.device), Scheme.keys(self, layer, k_pre, cos, sin), k) if self.keep_keys else k

    def values(self, layer, v):
        vq = self.base.values(layer, v)
        return torch.where(self._mask(v.shape[2], v.device), v, vq) if self.keep_values else vq


def needle_spans(tokenizer, trials: list[PasskeyTrial], options: PasskeyOptions) -> list[tuple[int, int]]:
    """Where each trial's needle sentence sits in its context (``build_trials``' own arithmetic)."""
    head, question = _template_parts(tokenizer)
    spans = []
    for t in trials:
        needle = tokenizer(NEEDLE.format(key=t.key), add_special_tokens=False)["input_ids"]
        budget = t.length - options.max_new_tokens - len(head) - len(needle) - len(question)
        start = len(head) + round(t.depth * budget)
        if t.context[start : start + len(needle)].tolist() != needle:
            raise AssertionError(f"needle of trial {t.key} not found at {start}")
        spans.append((start, start + len(needle)))
    return spans


def score_needle_kept(model, tokenizer, checkpoint: Checkpoint, scheme: NeedleKept, label: str,
                      trials: list[PasskeyTrial], options: PasskeyOptions) -> PasskeyResult:  # fmt: skip
    """``score_scheme`` for a :class:`NeedleKept` scheme, its spans set batch by batch."""
    spans = needle_spans(tokenizer, trials, options)
    correct, answers, began = 0, [], time.perf_counter()
    for s in range(0, len(trials), options.batch_size):
        batch = trials[s : s + options.batch_size]
        scheme.spans = spans[s : s + options.batch_size]
        r = score_scheme(model, tokenizer, checkpoint, scheme, label, batch, replace(options, batch_size=len(batch)))
        correct, answers = correct + r.correct, answers + r.answers
    return PasskeyResult(label, scheme.bits, trials[0].length, len(trials), correct, {}, time.perf_counter() - began,
                         r.device, answers)  # fmt: skip


def variant_checkpoint(checkpoint: Checkpoint, variant: str) -> Checkpoint:
    """The checkpoint a variant runs with: ``salient-N`` sets ``salient_tokens = N``; the others run it as is."""
    if not variant.startswith("salient-"):
        return checkpoint
    return replace(checkpoint, config=replace(checkpoint.config, salient_tokens=int(variant[8:])))


def variant_scheme(checkpoint: Checkpoint, variant: str, grid: tuple[float, ...] = GRID) -> Scheme:
    """The checkpoint's RotateKV scheme as exported, with ``variant``'s layers (all, or those after ``@``) at
    8 bits on the named side(s), or (``search-*``) every layer's named side(s) encoded with per-group ranges
    searched over ``grid``."""
    base = build_scheme("rotatekv", None, checkpoint)
    if variant == "exported":
        return base
    if variant.startswith("salient-") and variant[8:].isdigit():
        return base  # the checkpoint carries the count: variant_checkpoint
    if variant in NEEDLE_KEPT:
        keys, values = NEEDLE_KEPT[variant]
        return NeedleKept(base=base, keep_keys=keys, keep_values=values)
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
                         f"{', '.join(SEARCHED)}, {', '.join(NEEDLE_KEPT)}, salient-N")
    n = len(base.key_codecs)
    layers = set(range(n)) if not spec else {int(x) for x in spec.split("-")}
    if not layers <= set(range(n)):
        raise ValueError(f"variant {variant!r} names layers outside 0..{n - 1}")
    keys, values = SIDES[side]

    def eight(codec, raise_it: bool):
        return replace(codec, bits=8, clip=1.0, meta_base=None) if raise_it else codec

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
            score = score_needle_kept if isinstance(schemes[v], NeedleKept) else score_scheme
            r = score(model, tok, variant_checkpoint(ck, v), schemes[v], v, trials[length], options)
            row = {"variant": v, "length": length, "trials": r.trials, "correct": r.correct,
                   "accuracy": r.accuracy, "seconds": r.seconds, "device": r.device}  # fmt: skip
            rows.append(row)
            report_row("passkey by stored precision", row, args.csv)
    print_table(f"passkey by stored precision ({args.checkpoint.name})", rows)


if __name__ == "__main__":
    main()
